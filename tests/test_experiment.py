"""The main job end to end, in miniature (the smoke preset: every stage, ~1 minute on 2 cores).

    python -m pytest tests/test_experiment.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import experiment  # noqa: E402


def run(out, *extra):
    done = subprocess.run([sys.executable, str(ROOT / "experiment.py"), "--preset", "smoke", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return out, run(out)


def test_smoke_writes_every_output(smoke):
    out, log = smoke
    assert log.splitlines()[1].startswith("estimate: 4 lr-grid runs + 8 more main runs")
    rows = json.loads((out / "results.json").read_text())
    assert rows and all({"arch", "loss", "seed", "step", "benchmark", "value"} <= set(r) for r in rows)
    main = [r for r in rows if r.get("phase") == "main"]
    assert {(r["arch"], r["loss"]) for r in main} == {(a, l) for a in "hu" for l in ("ntp", "prior", "oracle")}
    assert {r["seed"] for r in main} == {0, 1}
    assert {r["step"] for r in main} == {3, 6}  # every checkpoint evaluated
    for b in ("probe_avg", "nll_image", "gap_image", "presence"):
        assert any(r["benchmark"] == b for r in main), b
    md = (out / "results.md").read_text()
    assert "H-LVLM" in md and "U-LVLM" in md and "PRIOR" in md
    for png in ("curves_web_h.png", "average_web_u.png", "token_nll_web_h.png", "importance_web.png",
                "token_weights_web.png"):
        assert (out / png).stat().st_size > 1000, png
    relevance = json.loads((out / "scores_web_train.json").read_text())["relevance"]
    assert set(relevance["auc"]) == {"image_vs_boiler", "image_vs_noise", "image_vs_rest"}


def test_rerun_skips_finished_work(smoke):
    out, _ = smoke
    log = run(out)
    assert "(done)" in log and "0 to train" in log


def test_torchrun_launcher():
    exp = experiment.Experiment(experiment.ExperimentConfig(preset="smoke", nproc=4, out="/tmp/prior_launcher"))
    assert exp.launcher(["train.py", "--arch", "h"]) == ["-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node=4"]
    assert exp.launcher(["eval.py"]) == []
