"""experiments/reporting.py and stats.py: t quantiles, paired verdicts, primary endpoint, regeneration."""
import json
import math
import random

import pytest

from experiments import report, reporting, stats
from experiments.protocol import PRIMARY

ARMS = ("ntp", "prior", "prior_shuffled", "oracle")
GAIN = {"ntp": 0.0, "prior": 0.03, "prior_shuffled": 0.0, "oracle": 0.08}


def fake_rows(mixes=("web", "noisy"), archs=("h", "u"), arms=ARMS, seeds=range(5), steps=(100, 200, 300), gain=None,
              grid=True, noise=0.005, cc=True):
    """Eval-like rows: probes rise with step, image NLL falls; seed s shifts every arm alike (paired design)."""
    gain, rows = gain or GAIN, []
    for mix in mixes:
        for arch in archs:
            for arm in arms:
                for seed in seeds:
                    rng = random.Random(f"{mix}{arch}{arm}{seed}")
                    shift = random.Random(f"{mix}{arch}{seed}").gauss(0, .03)  # the seed's effect, shared by arms
                    for step in steps:
                        t, g = step / steps[-1], gain[arm] + shift
                        vals = {"presence_random": 0.6 + 0.2 * t + g, "colour": 0.3 + 0.2 * t + g, "count": 0.3 + g,

                                "probe_avg": 0.4 + 0.2 * t + g, "nll_image": 3.0 - t - 5 * g, "nll_glue": 2.0,
                                "nll_boiler": 1.0, "nll_noise": 5.0, "nll_image_shuffled": 4.0, "gap_colour": 1 + g}
                        if cc:
                            vals["probe_cc_avg"], vals[PRIMARY] = 0.2 + 0.2 * t + g, 0.1 + 0.2 * t + g
                        for b, v in vals.items():
                            rows.append({"mix": mix, "arch": arch, "loss": arm, "seed": seed, "lr": 1e-3, "step": step,
                                         "phase": "main", "benchmark": b, "value": v + rng.gauss(0, noise)})
                if grid:  # a pilot: validation curves per lr on seeds 100-104 (the gate reads >= 5)
                    for lr, score in ((3e-4, 0.1), (1e-3, 0.3), (3e-3, 0.2)):
                        for step, seed in ((step, seed) for step in steps for seed in range(100, 105)):
                            rows.append({"mix": mix, "arch": arch, "loss": arm, "seed": seed, "lr": lr, "step": step,
                                         "phase": "grid", "benchmark": PRIMARY,
                                         "value": score + gain[arm] * step / steps[-1] + 0.01 * (seed - 102)})
    return rows


def test_t_quantile_matches_printed_tables():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042), (1000, 1.962)):
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_quantile(0.995, 10) == pytest.approx(3.169, abs=6e-4)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=6e-4)
    assert stats.t_cdf(stats.t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_paired_matches_hand_computation():
    ntp = {s: 10.0 + 0.1 * s for s in range(5)}
    arm = {s: ntp[s] + d for s, d in zip(range(5), [1, 2, 3, 4, 5])}
    c = stats.paired(arm, ntp)
    assert (c["n"], c["mean_d"]) == (5, pytest.approx(3.0))
    assert c["sd_d"] == pytest.approx(1.5811, abs=1e-4)
    assert (c["lo"], c["hi"]) == (pytest.approx(1.037, abs=1e-3), pytest.approx(4.963, abs=1e-3))  # 3 ± 2.776·0.7071
    assert c["verdict"] == "better" and c["effect"] == pytest.approx(3 / 1.5811, abs=1e-4)
    assert c["rel"] == pytest.approx(3 / 10.2)
    low = stats.paired(arm, ntp, lower_is_better=True)  # nll: a higher value is worse, d is negated
    assert low["mean_d"] == pytest.approx(-3.0) and low["verdict"] == "worse" and low["hi"] < 0


def test_paired_verdict_edge_cases():
    ntp = {0: 1.0, 1: 2.0, 2: 3.0}
    assert stats.paired({0: 1.1, 1: 1.9, 2: 3.05}, ntp)["verdict"] == "no clear difference"
    assert stats.paired({0: 5.0}, ntp)["verdict"] == "1 seed"
    assert stats.paired({7: 5.0}, ntp)["verdict"] == "no shared seeds"
    assert stats.paired({0: float("nan"), 1: 2.0}, ntp)["verdict"] == "not computable (NaN)"


def test_only_shared_seeds_are_paired():
    """An unpaired layout: NTP ran seeds 0-4, PRIOR seeds 0-2 and 7; only 0, 1, 2 enter the differences."""
    rows = []
    for loss, seeds in (("ntp", range(5)), ("prior", (0, 1, 2, 7))):
        for s in seeds:
            value = 10.0 * s + (0.5 + 0.1 * s if loss == "prior" else 0.0) + (100 if s == 7 else 0)
            rows.append({"arch": "h", "loss": loss, "seed": s, "step": 5, "benchmark": "colour", "value": value})
    fam = reporting.summarize(rows)["web"]["h"]
    c = fam["final"]["vs"]["prior"]["colour"]
    assert c["seeds"] == [0, 1, 2] and c["n"] == 3
    assert c["mean_d"] == pytest.approx(0.6) and c["sd_d"] == pytest.approx(0.1) and c["verdict"] == "better"
    assert c["ref_mean"] == pytest.approx(10.0)  # NTP's mean over the shared seeds, not over all five


def test_duplicate_rows_of_one_seed_are_averaged_not_counted_as_seeds():
    rows = [{"arch": "u", "loss": "ntp", "seed": 0, "step": 1, "benchmark": "count", "value": v} for v in (0.2, 0.4)]
    fam = reporting.summarize(rows)["web"]["u"]
    assert fam["final"]["vals"]["ntp"]["count"] == {0: pytest.approx(0.3)} and fam["seeds"]["ntp"] == [0]


def _ckpt(vals, **kw):
    return [{"arch": "h", "loss": "ntp", "seed": 0, "step": 1, "benchmark": b, "value": v, **kw}
            for b, v in vals.items()]


def test_primary_endpoint_computed_from_probe_and_chance_rows():
    vals = {"presence_random": 0.7, "presence_popular": 0.6, "colour": 0.5, "count": 0.4, "chance_colour": 0.25,
            "chance_count": 0.25}
    rows, n = reporting.prepare(_ckpt(vals))
    got = {r["benchmark"]: r["value"] for r in rows}
    presence, colour, count = (0.4 + 0.2) / 2, (0.5 - 0.25) / 0.75, (0.4 - 0.25) / 0.75
    assert n == 2 and got["probe_cc_avg"] == pytest.approx((presence + colour + count) / 3)
    assert got["probe_cc_avg_nocount"] == pytest.approx((presence + colour) / 2)
    fam = reporting.summarize(_ckpt(vals))["web"]["h"]
    assert "chance_colour" not in fam["benchmarks"] and "probe_cc_avg" in fam["benchmarks"]
    no_chance = {k: v for k, v in vals.items() if k != "chance_count"}  # count's chance unknown: never guessed
    got = {r["benchmark"]: r["value"] for r in reporting.prepare(_ckpt(no_chance))[0]}
    assert "probe_cc_avg" not in got and got["probe_cc_avg_nocount"] == pytest.approx((presence + colour) / 2)
    given = {r["benchmark"]: r["value"] for r in reporting.prepare(_ckpt({**vals, "probe_cc_avg": 0.9}))[0]}
    assert given["probe_cc_avg"] == 0.9  # eval.py's value wins


def _cli(tmp_path, rows, out, *extra):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    report.main(["--results", str(path), "--out", str(tmp_path / out), *extra])
    return (tmp_path / out / "results.md").read_bytes()


def test_results_md_regenerates_byte_for_byte(tmp_path):
    rows = fake_rows()
    a, b = _cli(tmp_path, rows, "a", "--no-plots"), _cli(tmp_path, rows, "b", "--no-plots")
    assert a == b
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    assert _cli(tmp_path, shuffled, "c", "--no-plots") == a  # row order does not matter
    md = a.decode()
    assert str(tmp_path) not in md and "`results.json`" in md and not list((tmp_path / "a").glob("*.png"))
    primary, second = md.index(f"## Primary endpoint: `{PRIMARY}`"), md.index("## Secondary (not corrected")
    assert md.index("## Verdicts") < md.index("**Positive control (passed)**") < primary < second
    assert "PRIOR (shuffled) − NTP" in md[primary:second] and "Oracle − NTP" in md[primary:second]
    assert md.count("mix `noisy` · U-LVLM: PRIOR − NTP = ") == 1
    assert md.index("### Mix `web` · H-LVLM") < md.index("### Mix `web` · U-LVLM") < md.index("### Mix `noisy`")


def test_secondary_lists_each_benchmark_once_and_counts_only_base_rows(tmp_path):
    md = open(reporting.write_report(fake_rows(mixes=("web",), archs=("h",)), tmp_path, plots=False)).read()
    final = md[md.index("#### Final step"):md.index("#### Best step")]
    for b in ("colour", "probe_avg", "nll_image", "nll_glue", "gap_colour"):
        assert final.count(f"| `{b}` ") == 1
    assert f"| `{PRIMARY}` " not in final and "nll_image_shuffled" not in final  # primary rows sit above
    assert "Counted over the 7 base rows only" in md  # 3 probe files + 4 nll categories, no averages
    assert "Best step (flattering" in md


def test_verdicts_in_report(tmp_path):
    fam = reporting.summarize(fake_rows(mixes=("web",), archs=("h",)))["web"]["h"]
    vs = fam["final"]["vs"]
    assert vs["prior"]["probe_cc_avg"]["verdict"] == "better" and vs["oracle"]["nll_image"]["verdict"] == "better"
    assert vs["prior"]["nll_image"]["mean_d"] > 0  # lower NLL is a positive d
    assert vs["prior_shuffled"]["probe_cc_avg"]["verdict"] == "no clear difference"
    worse = reporting.summarize(fake_rows(mixes=("web",), archs=("h",), gain={**GAIN, "prior": -0.03}))["web"]["h"]
    assert worse["final"]["vs"]["prior"]["probe_cc_avg"]["verdict"] == "worse"
    one = reporting.write_report(fake_rows(mixes=("web",), archs=("h",), seeds=(0,)), tmp_path, plots=False)
    assert "→ **1 seed**" in open(one).read()


def test_still_improving_adds_auc_row(tmp_path):
    rising = fake_rows(mixes=("web",), archs=("h",))
    fam = reporting.summarize(rising)["web"]["h"]
    assert fam["improving"]["prior"] == (5, 5) and fam["auc"]["vs"]["prior"]["verdict"] == "better"
    md = open(reporting.write_report(rising, tmp_path, plots=False)).read()
    assert "still improving at the last step (5/5 seeds)" in md and f"| `{reporting.AUC}` ↑ |" in md
    peaked = [dict(r, value=r["value"] + (0.5 if r["step"] == 200 else 0)) for r in rising]
    fam = reporting.summarize(peaked)["web"]["h"]
    assert fam["improving"]["prior"] == (0, 5) and fam["auc"] is None
    assert fam["best"]["step"]["prior"] == 200 and fam["final"]["step"]["prior"] == 300


def test_grid_chosen_lr_and_edge():
    fam = reporting.summarize(fake_rows(mixes=("web",), archs=("h",)))["web"]["h"]
    g = fam["grid"]["prior"]
    assert fam["grid_by"] == PRIMARY and g["tried"] == [3e-4, 1e-3, 3e-3]
    assert g["chosen"] == 1e-3 and not g["edge"]
    rows = [dict(r, value=100 * r["lr"]) if r["phase"] == "grid" else r  # scores 0.03, 0.1, 0.3: the top lr wins
            for r in fake_rows(mixes=("web",), archs=("h",))]
    fam = reporting.summarize(rows)["web"]["h"]
    assert fam["grid"]["ntp"]["chosen"] == 3e-3 and fam["grid"]["ntp"]["edge"]
    assert "at the edge of the grid" in "\n".join(reporting._grid_table(fam))


def test_data_rows_become_the_data_table(tmp_path, capsys):
    rows = fake_rows(mixes=("web",), archs=("h",)) + [
        {"mix": "web", "phase": "data", "arch": "", "loss": "", "seed": 0, "lr": 0, "step": 0,
         "benchmark": b, "value": v}
        for b, v in (("predicted_image", 0.25), ("mean_image", 0.7), ("share_image", 0.3), ("predicted_boiler", 0.9))]
    md = open(reporting.write_report(rows, tmp_path, plots=False)).read()
    assert "| `web` | image | 0.300 | 0.700 | 0.250 |" in md and "| `web` | boiler | – | – | 0.900 |" in md
    with pytest.raises(SystemExit) as e:
        report.main(["--results", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: --results {tmp_path / 'missing.json'}: ")


def test_missing_parts_do_not_crash(tmp_path):
    rows = fake_rows(mixes=("web",), archs=("h",), arms=("ntp", "prior"), grid=False, cc=False)
    md = open(reporting.write_report(rows, tmp_path, plots=False)).read()
    assert "No grid runs" in md and "Oracle" not in md and f"no `{PRIMARY}` for NTP and another arm" in md
    only_ntp = reporting.write_report(fake_rows(mixes=("web",), archs=("h",), arms=("ntp",)), tmp_path / "n",
                                      plots=False)
    assert "NTP (n=5, step 300)" in open(only_ntp).read()
    no_main = [r for r in fake_rows(mixes=("web",), archs=("h",)) if r["phase"] == "grid"]
    assert "No main-phase runs" in open(reporting.write_report(no_main, tmp_path / "g", plots=False)).read()


def test_nan_values_stay_visible(tmp_path):
    rows = fake_rows(mixes=("web",), archs=("h",), grid=False)
    for r in rows:
        if r["loss"] == "prior" and r["seed"] == 0 and r["benchmark"] == PRIMARY:
            r["value"] = None  # a diverged run
    fam = reporting.summarize(rows)["web"]["h"]
    assert math.isnan(stats.summary(fam["final"]["vals"]["prior"][PRIMARY])["mean"])
    assert fam["final"]["vs"]["prior"][PRIMARY]["verdict"] == "not computable (NaN)"
    reporting.write_report(rows, tmp_path, plots=False)


def test_names_order_and_paper_helpers():
    assert reporting.name("prior_shuffled") == "PRIOR (shuffled)" and reporting.name("ntp+itm") == "NTP + ITM"
    assert "glue" in reporting.CATS
    order = sorted(["nll_noise", "gap_image", "nll_glue", "probe_cc_avg", "colour", "nll_image", "probe_avg"],
                   key=reporting.bench_key)
    assert order == ["colour", "probe_avg", "gap_image", "probe_cc_avg", "nll_image", "nll_glue", "nll_noise"]
    a, b = reporting.stats({0: 0.5, 1: 0.6, 2: 0.7}), reporting.stats({0: 0.4, 1: 0.4, 2: 0.4})
    # paper.py's Welch test
    assert a["std"] == pytest.approx(0.1) and reporting.compare(a, b, "colour", "prior")["clear"]
    assert reporting.compare(a, b, "nll_image", "prior")["rel"] < 0


def test_plots_and_cli(tmp_path):
    rows = fake_rows(mixes=("web",), archs=("h",))
    md = _cli(tmp_path, rows, "out")
    assert md == _cli(tmp_path, rows, "text", "--no-plots")  # results.md does not depend on drawing
    for stem in ("curves", "average", "token_nll", "lr_grid"):
        png = tmp_path / "out" / f"{stem}_web_h.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in md.decode()
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
