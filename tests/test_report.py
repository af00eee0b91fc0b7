"""report.py on synthetic results: statistics, best step, verdicts, sign conventions, robustness, plots."""
import json
import math
import random

import pytest

import report

STEPS = [0, 100, 200, 300]
PROBE_BENCHES = ["presence_random", "colour", "probe_avg"]


def fake_rows(gain=None, losses=("ntp", "prior", "oracle"), seeds=(0, 1, 2), noise=0.002, grid=True, mix=None):
    """Rows like eval output: probes rise with step, NLL falls; `gain` shifts each loss (+ = better on every row)."""
    gain = gain or {"ntp": 0.0, "prior": 0.03, "oracle": 0.08}
    rows = []
    for phase in ("main", "grid") if grid else ("main",):
        for loss in losses:
            for lr in ([1e-3] if phase == "main" else [3e-4, 1e-3, 3e-3]):
                lr_pen = 0.0 if lr == 1e-3 else 0.02  # the grid's best lr is 1e-3 for every loss
                for seed in seeds:
                    rng = random.Random(f"{phase}{loss}{lr}{seed}")
                    for step in STEPS:
                        t = step / STEPS[-1]
                        vals = {b: 0.5 + 0.2 * t + gain[loss] - lr_pen for b in PROBE_BENCHES}
                        vals.update(nll_image=3.0 - t - 10 * gain[loss], nll_boiler=1.0 - 0.2 * t, nll_noise=5.0,
                                    gap_all=0.1 + gain[loss], nll_w_gt_0p5=2.0)
                        for b, v in vals.items():
                            row = {"arch": "h", "loss": loss, "seed": seed, "lr": lr, "step": step, "phase": phase,
                                   "benchmark": b, "value": v + rng.gauss(0, noise), "extra": "ignored"}
                            if mix:
                                row["mix"] = mix
                            rows.append(row)
    return rows


def test_mean_std_over_seeds():
    rows = [{"arch": "h", "loss": "ntp", "seed": s, "lr": 1e-3, "step": 10, "benchmark": "colour", "value": v}
            for s, v in enumerate([0.5, 0.6, 0.7])]
    st = report.summarize(rows)["web"]["h"]["final"]["stats"]["ntp"]["colour"]  # missing mix/phase -> web/main
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.6) and st["std"] == pytest.approx(0.1)


def test_duplicate_rows_of_one_seed_are_averaged_not_counted_as_seeds():
    rows = [{"arch": "u", "loss": "ntp", "seed": 0, "step": 1, "benchmark": "count", "value": v} for v in (0.2, 0.4)]
    st = report.summarize(rows)["web"]["u"]["final"]["stats"]["ntp"]["count"]
    assert st["n"] == 1 and st["mean"] == pytest.approx(0.3) and st["std"] == 0


def test_best_step_is_chosen_per_method():
    rows = []
    for loss, peak in (("ntp", 100), ("prior", 200)):
        for seed in (0, 1):
            for step in STEPS:
                rows.append({"arch": "h", "loss": loss, "seed": seed, "step": step, "benchmark": "probe_avg",
                             "value": (0.9 if step == peak else 0.5) + 0.01 * seed})
    fam = report.summarize(rows)["web"]["h"]
    assert fam["best"]["step"] == {"ntp": 100, "prior": 200}
    assert fam["final"]["step"] == {"ntp": 300, "prior": 300}
    assert fam["best"]["stats"]["prior"]["probe_avg"]["mean"] == pytest.approx(0.905)


@pytest.mark.parametrize("prior_gain, verdict, better", [(0.03, "PRIOR better", 1), (-0.03, "NTP better", -1),
                                                          (0.0005, "no clear difference", 0)])
def test_verdicts(tmp_path, prior_gain, verdict, better):
    rows = fake_rows({"ntp": 0.0, "prior": prior_gain, "oracle": 0.08}, noise=0.004)
    fam = report.summarize(rows)["web"]["h"]
    c = fam["final"]["vs_ntp"]["prior"]["probe_avg"]
    assert (c["verdict"], c["better"]) == (verdict, better)
    assert c["se"] > 0 and c["clear"] == (better != 0)
    md = open(report.write_report(rows, tmp_path)).read()
    assert verdict in md
    assert ["no clear gain or loss", "a gain", "a loss"][better] in md  # the auto-written paragraph says which


def test_relative_improvement_sign_for_nll_and_accuracy():
    fam = report.summarize(fake_rows())["web"]["h"]
    cmp = fam["final"]["vs_ntp"]["prior"]
    nll, acc = cmp["nll_image"], cmp["probe_avg"]
    assert nll["diff"] < 0 and nll["rel"] > 0 and nll["verdict"] == "PRIOR better"  # lower NLL is a gain
    ntp = fam["final"]["stats"]["ntp"]["nll_image"]["mean"]
    assert nll["rel"] == pytest.approx(-nll["diff"] / ntp)
    assert acc["diff"] > 0 and acc["rel"] > 0 and cmp["gap_all"]["rel"] > 0  # gap_* is higher-is-better
    assert report.lower_better("nll_image_shuffled") and not report.lower_better("gap_image")


def test_single_seed_is_never_clear():
    fam = report.summarize(fake_rows(seeds=(0,)))["web"]["h"]
    assert all(c["verdict"] == "no clear difference" for c in fam["final"]["vs_ntp"]["prior"].values())


def test_grid_best_lr_and_benchmark_order():
    fam = report.summarize(fake_rows(mix="noisy"))["noisy"]["h"]
    assert fam["best_lr"] == {"ntp": 1e-3, "prior": 1e-3, "oracle": 1e-3}
    assert set(fam["grid"]["prior"]) == {3e-4, 1e-3, 3e-3}
    assert fam["benchmarks"] == ["presence_random", "colour", "probe_avg", "nll_image", "nll_boiler", "nll_noise",
                                 "nll_w_gt_0p5", "gap_all"]


def test_missing_grid_and_oracle_do_not_crash(tmp_path):
    rows = fake_rows(losses=("ntp", "prior"), grid=False)
    md = open(report.write_report(rows, tmp_path)).read()
    assert "No grid runs" in md and "Oracle" not in md and "PRIOR − NTP" in md
    assert not (tmp_path / "lr_grid_web_h.png").exists()
    only_ntp = report.write_report(fake_rows(losses=("ntp",), gain={"ntp": 0}), tmp_path / "ntp")
    assert "NTP (n=3, step 300)" in open(only_ntp).read()  # a table with nothing to compare against
    no_main = [r for r in fake_rows() if r["phase"] == "grid"]
    assert "No main-phase runs" in open(report.write_report(no_main, tmp_path / "grid_only")).read()


def test_nan_values_stay_visible(tmp_path):
    rows = fake_rows(grid=False)
    for r in rows:
        if r["loss"] == "prior" and r["seed"] == 0 and r["benchmark"] == "probe_avg":
            r["value"] = float("nan")  # a diverged run
    fam = report.summarize(rows)["web"]["h"]
    assert math.isnan(fam["final"]["stats"]["prior"]["probe_avg"]["mean"])
    assert fam["final"]["vs_ntp"]["prior"]["probe_avg"]["verdict"] == "no clear difference"
    report.write_report(rows, tmp_path)


def test_plots_and_cli(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_rows() + fake_rows(mix="noisy")))
    report.main(["--results", str(path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "results.md").read_text()
    for mix in ("web", "noisy"):
        for stem in ("curves", "average", "token_nll", "lr_grid"):
            png = tmp_path / "out" / f"{stem}_{mix}_h.png"
            assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({png.name})" in md
    assert md.index("Mix `web`") < md.index("Mix `noisy`")
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0
