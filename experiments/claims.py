"""results.md's first section: the main job's verdicts under the rules of experiments/protocol.py, from the rows
alone. The positive control comes first (the gate: if the tag oracle does not beat NTP, the endpoint cannot judge
PRIOR), then the two co-primary comparisons (PRIOR - NTP, PRIOR - shuffled: 97.5% intervals, Bonferroni), their
robustness at every common learning rate of the pilot grid, how firm each lr choice was per seed, and the paper's
three claims, each arm against NTP: the final model, the peak (the step the arm's pilot validation curve peaks at,
read on the test captions) and stability (the largest drop from the running best along the test curve), with the
minimum detectable effect beside each verdict and PRIOR's share of the oracle's gain.
"""
import math

from experiments.protocol import (CO_LEVEL, CO_PRIMARY, GATE_SEEDS, PRIMARY, TAIL, choose_lr, converged, every_seed,
                                  gate, lr_score, max_drop, mde, mean_curve, peak_step, share_of_oracle, tail_mean)
from experiments.stats import ci, fmt, md_table, paired, pm, summary

ARMS = ["oracle", "prior", "prior_shuffled", "anti_prior", "prior_shuffled_tag", "prior_alpha0.5", "prior_alpha2"]
NAMES = {"ntp": "NTP", "prior": "PRIOR", "prior_shuffled": "PRIOR (shuffled)", "oracle": "Oracle",
         "anti_prior": "anti-PRIOR", "prior_shuffled_tag": "PRIOR (shuffled in tags)",
         "prior_alpha0.5": "PRIOR (α 0.5)", "prior_alpha2": "PRIOR (α 2)"}  # experiments/controls.py's arms


def seed_curves(steps, bench=PRIMARY):
    """{step: {bench: {seed: v}}} -> {seed: {step: v}}."""
    out = {}
    for step, benches in steps.items():
        for seed, v in benches.get(bench, {}).items():
            out.setdefault(seed, {})[step] = v
    return out


def pilot_scores(grid_runs):
    """{loss: {lr: {seed: validation score}}}: each pilot run's score is the mean of its last TAIL checkpoints."""
    out = {}
    for (loss, lr), steps in grid_runs.items():
        out.setdefault(loss, {})[lr] = {s: tail_mean(c) for s, c in seed_curves(steps).items()}
    return out


def pilot_choice(grid_runs):
    """{loss: (chosen lr, at edge, {seed: validation curve at that lr})} from the pilot's {(loss, lr): steps}."""
    by_loss = {}
    for (loss, lr), steps in grid_runs.items():
        by_loss.setdefault(loss, {})[lr] = seed_curves(steps)
    out = {}
    for loss, lrs in by_loss.items():
        scores = {lr: lr_score(list(curves.values())) for lr, curves in lrs.items() if curves}
        if scores:
            chosen, edge = choose_lr(scores)
            out[loss] = (chosen, edge, lrs[chosen])
    return out


def verdict_row(label, c, ntp_mean):
    """A claims-table row; MDE / NTP only where NTP's mean is a level (not a drop, not ~0)."""
    bound = mde(c["sd_d"], c["n"])
    share = f"{bound / abs(ntp_mean):.0%}" if ntp_mean and abs(ntp_mean) >= 0.01 and not math.isnan(bound) else "–"
    return [label, str(c["n"]), ci(c), c["verdict"], fmt(bound), share]


def setting_claims(mix, arch, fam):
    """Lines for one setting: the positive control, convergence, and the claims table."""
    head = f"### `{mix}` · {'H-LVLM' if arch == 'h' else 'U-LVLM'}"
    pilot = pilot_choice(fam.get("grid_runs", {}))
    runs = fam["runs"]
    if "ntp" not in runs or "ntp" not in pilot:
        return [head, "", "No NTP pilot or main runs: no claims."]
    lines = [head, ""]
    ntp_val = pilot["ntp"][2]
    if "oracle" in pilot:
        seeds = sorted(set(ntp_val) & set(pilot["oracle"][2]))
        d = [tail_mean(pilot["oracle"][2][s]) - tail_mean(ntp_val[s]) for s in seeds]
        ok, lower = gate(d)
        lines.append(f"- **Positive control ({'passed' if ok else 'FAILED'})**: on the validation captions (pilot "
                     f"seeds {', '.join(map(str, seeds))}, each arm at its chosen lr) the oracle − NTP on "
                     f"`{PRIMARY}` is {', '.join(fmt(x, sign=True) for x in d)}; the gate's one-sided 95% lower "
                     f"bound is {fmt(lower, sign=True) if len(d) >= GATE_SEEDS else f'not read ({len(d)} seeds)'} "
                     f"(protocol.gate: passes above 0, over ≥ {GATE_SEEDS} seeds; the old rule "
                     f"\"> 0 on every seed\" {'passes' if every_seed(d) else 'fails'}). " +
                     ("The endpoint can see a right weighting." if ok else
                      "The endpoint did not register a weighting that is right by construction: the verdicts on "
                      "PRIOR below cannot be read as evidence either way."))
    flat, share = converged(mean_curve(list(ntp_val.values())))
    lines.append(f"- NTP's validation curve {'flattened' if flat else 'had NOT flattened'} by the last step (the last "
                 f"third of the steps added {share:.0%} of its rise; rule: at most 10%).")
    lines.append("- Learning rates (pilot, validation): " + ", ".join(
        f"{NAMES.get(k, k)} {v[0]:g}{' (grid edge)' if v[1] else ''}" for k, v in sorted(pilot.items())) + ".")
    curves = {a: seed_curves(steps) for a, steps in runs.items()}
    last = {a: {s: c[max(c)] for s, c in cs.items()} for a, cs in curves.items()}
    table, diffs = [], {}
    for arm in [a for a in ARMS if a in curves]:
        c = paired(last[arm], last["ntp"])
        diffs[arm] = {s: last[arm][s] - last["ntp"][s] for s in c["seeds"]}
        table.append(verdict_row(f"{NAMES[arm]} − NTP, final step", c, c["ref_mean"]))
        src = pilot.get(arm) or pilot.get("prior" if arm == "prior_shuffled" else "ntp")
        at, ntp_at = peak_step(mean_curve(list(src[2].values()))), peak_step(mean_curve(list(ntp_val.values())))
        peak = {s: cv[at] for s, cv in curves[arm].items() if at in cv}
        ntp_peak = {s: cv[ntp_at] for s, cv in curves["ntp"].items() if ntp_at in cv}
        c = paired(peak, ntp_peak)
        table.append(verdict_row(f"{NAMES[arm]} − NTP, peak (step {at} vs {ntp_at})", c, c["ref_mean"]))
        c = paired({s: max_drop(cv) for s, cv in curves[arm].items()},
                   {s: max_drop(cv) for s, cv in curves["ntp"].items()}, lower_is_better=True)
        table.append(verdict_row(f"{NAMES[arm]} vs NTP, stability (largest drop, NTP − arm)", c, None))
    lines += ["", *md_table(["comparison on the test captions", "n pairs", "mean d [95% CI]", "verdict", "MDE (80%)",
                             "MDE / NTP"], table)]
    lines += ["", *co_primary(last, pilot_scores(fam.get("grid_runs", {})))]
    lines += ["", *lr_firmness(pilot_scores(fam.get("grid_runs", {})), pilot)]
    ntp_mean = summary(last["ntp"])
    lines += ["", f"NTP's final `{PRIMARY}`: {pm(ntp_mean)} over {ntp_mean['n']} seeds."]
    if "prior" in diffs and "oracle" in diffs:
        seeds = sorted(set(diffs["prior"]) & set(diffs["oracle"]))
        share, lo, hi = share_of_oracle([diffs["prior"][s] for s in seeds], [diffs["oracle"][s] for s in seeds])
        lines.append(f"PRIOR's share of the oracle's gain at the final step: {fmt(share)} [{fmt(lo)}, {fmt(hi)}] "
                     f"(bootstrap over {len(seeds)} seeds; meaningful only when the oracle's gain is clear).")
    return lines


def co_primary(last, scores):
    """The two declared comparisons at the final step on the test captions, each at CO_LEVEL (Bonferroni), and
    their robustness: the same differences on validation (pilot seeds) at every lr of the grid both arms ran."""
    rows, robust = [], []
    for arm, ref in CO_PRIMARY:
        if arm not in last or ref not in last:
            continue
        c = paired(last[arm], last[ref], level=CO_LEVEL)
        bound = mde(c["sd_d"], c["n"], level=CO_LEVEL)
        rows.append([f"{NAMES[arm]} − {NAMES[ref]}", str(c["n"]), ci(c), c["verdict"], fmt(bound),
                     f"{bound / abs(c['ref_mean']):.0%}" if abs(c["ref_mean"]) >= 0.01 else "–"])
        for lr in sorted(set(scores.get(arm, {})) & set(scores.get(ref, {}))):
            v = paired(scores[arm][lr], scores[ref][lr], level=CO_LEVEL)
            robust.append([f"{NAMES[arm]} − {NAMES[ref]}", f"{lr:g}", str(v["n"]), ci(v), v["verdict"]])
    if not rows:
        return []
    out = [f"**Co-primary comparisons** (declared; final step, test captions, each arm at its own lr; "
           f"{CO_LEVEL:.1%} intervals: Bonferroni for two):", "",
           *md_table(["comparison", "n pairs", f"mean d [{CO_LEVEL:.1%} CI]", "verdict", "MDE (80%)", "MDE / ref"],
                     rows)]
    if robust:
        out += ["", "Robustness: the same differences on validation at each common lr of the pilot grid (pilot "
                f"seeds; each run's mean of its last {TAIL} checkpoints):", "",
                *md_table(["comparison", "lr", "n pairs", f"mean d [{CO_LEVEL:.1%} CI]", "verdict"], robust)]
    return out


def lr_firmness(scores, pilot):
    """Per arm: the chosen lr's validation advantage over each grid neighbour, per pilot seed (is the choice
    noise?): mean ± sd over seeds and the seeds where the chosen lr won."""
    rows = []
    for arm, (chosen, _, _) in sorted(pilot.items()):
        grid = sorted(scores.get(arm, {}))
        if chosen not in grid:
            continue
        i = grid.index(chosen)
        for other in grid[max(0, i - 1):i] + grid[i + 1:i + 2]:
            seeds = sorted(set(scores[arm][chosen]) & set(scores[arm][other]))
            d = [scores[arm][chosen][s] - scores[arm][other][s] for s in seeds]
            if len(d) < 2:
                continue
            mean = sum(d) / len(d)
            sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
            rows.append([NAMES.get(arm, arm), f"{chosen:g}", f"{other:g}", f"{fmt(mean, sign=True)} ± {fmt(sd)}",
                         f"{sum(x > 0 for x in d)} of {len(d)}"])
    if not rows:
        return []
    return ["How firm each lr choice is: the chosen lr's validation score minus its grid neighbour's, per pilot seed:",
            "", *md_table(["arm", "chosen", "neighbour", "mean ± sd over seeds", "seeds where chosen wins"], rows)]


def claims_section(summ):
    md = ["## Verdicts (experiments/protocol.py's rules, declared in docs/experiment.md)", ""]
    for mix, fams in summ.items():
        for arch, fam in fams.items():
            md += setting_claims(mix, arch, fam) + [""]
    return md
