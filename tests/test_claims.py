"""experiments/claims.py: the gate read first, the two co-primary comparisons at 97.5% with their robustness rows,
and how firm each lr choice was, on made-up rows whose answers are known by hand."""
from experiments import claims
from experiments.protocol import PRIMARY

STEPS = (10, 20, 30)


def rows(pilot_seeds, main_seeds=range(6), oracle_edge=0.3, prior_edge=0.2):
    """A pilot (validation curves at lrs 1e-3 and 3e-3, 3e-3 better) and main runs; seed s shifts every arm alike,
    and each arm's edge over NTP differs a little by seed so the differences have a spread."""
    edge = {"ntp": 0.0, "prior": prior_edge, "prior_shuffled": 0.0, "oracle": oracle_edge}
    out = []
    for arm, e in edge.items():
        for lr, base in ((1e-3, 0.5), (3e-3, 1.0)):
            for s in pilot_seeds:
                wobble = 0.02 * ((s * 7 + len(arm)) % 5 - 2)  # -0.04 .. +0.04, differs by arm and seed
                for step in STEPS:
                    out.append({"mix": "web", "arch": "h", "loss": arm, "seed": s, "lr": lr, "step": step,
                                "phase": "grid", "benchmark": PRIMARY, "value": base + e + wobble + 0.1 * s})
        for s in main_seeds:
            wobble = 0.02 * ((s * 3 + len(arm)) % 5 - 2)
            for step in STEPS:
                out.append({"mix": "web", "arch": "h", "loss": arm, "seed": s, "lr": 3e-3, "step": step,
                            "phase": "main", "benchmark": PRIMARY, "value": 1.0 + e + wobble + 0.1 * s})
    return out


def section(r):
    from experiments import reporting
    return "\n".join(claims.claims_section(reporting.summarize(r)))


def test_gate_passes_with_five_seeds_and_is_not_read_with_three():
    five = section(rows(range(100, 105)))
    assert "**Positive control (passed)**" in five and "lower bound is +" in five
    three = section(rows(range(100, 103)))
    assert "**Positive control (FAILED)**" in three and "not read (3 seeds)" in three
    none = section(rows(range(100, 105), oracle_edge=0.0))  # the oracle equals NTP: the gate must fail
    assert "**Positive control (FAILED)**" in none


def test_co_primary_at_bonferroni_level_with_robustness_rows():
    md = section(rows(range(100, 105)))
    assert "97.5% intervals" in md
    prior_ntp = next(line for line in md.splitlines() if line.startswith("| PRIOR − NTP | 6 |"))
    # d_s = 0.2 + 0.02 x (wobble difference: -3, 2, -3, 2, 2, -3 over seeds 0-5): mean 0.2 - 0.01 = 0.190
    assert "| better |" in prior_ntp and prior_ntp.split("|")[3].strip().startswith("+0.190 [")
    prior_shuffled = next(line for line in md.splitlines() if line.startswith("| PRIOR − PRIOR (shuffled) | 6 |"))
    assert "| better |" in prior_shuffled
    assert "| PRIOR − NTP | 0.001 | 5 |" in md and "| PRIOR − NTP | 0.003 | 5 |" in md  # one row per common lr
    flat = section(rows(range(100, 105), prior_edge=0.0))
    assert "| better |" not in next(line for line in flat.splitlines() if line.startswith("| PRIOR − NTP | 6 |"))


def test_lr_firmness_by_hand():
    scores = {"ntp": {1e-3: {1: 0.5, 2: 0.6, 3: 0.9}, 3e-3: {1: 1.0, 2: 0.7, 3: 0.8}}}
    pilot = {"ntp": (3e-3, True, {})}
    table = "\n".join(claims.lr_firmness(scores, pilot))
    # d = +0.5, +0.1, -0.1: mean +0.167, sd 0.306; the chosen lr wins on 2 of 3 seeds
    assert "| NTP | 0.003 | 0.001 | +0.167 ± 0.306 | 2 of 3 |" in table
