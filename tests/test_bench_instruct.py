"""experiments/bench_instruct.py in the main job's worker: the benchmark-format files (POPE, MMBench) are asked of an
instruction-tuned copy of a main run's last checkpoint; the run itself is untouched and a re-run redoes nothing.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bench_instruct.py
"""
import glob
import hashlib
import json
import os

import pytest
import torch

import experiments  # noqa: F401 (the lab's plug-ins: --instruct, --feature-cache, the bench scorer)
import train
from data import tokenizer as T
from world.generate import GenConfig, generate
from experiments import experiment
from experiments.bench_instruct import MARKER, qa_train_file
from experiments.worker import train_eval
from utils import parse_config

IT = 3  # tuning steps here (the main job's default is 20)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_it")
    data = root / "data_web"
    generate(GenConfig(out=str(data), n_ref=20, n_text=40, n_label=4, n_train=40, n_val=4, n_test=12, n_probe=5,
                       n_probe_val=4, workers=1))
    T.main(["--data", f"{data}/train.jsonl,{data}/text.jsonl", "--out", f"{root}/tok.json", "--vocab-size", "300"])
    bench = experiment.Experiment.bench_specs(str(data))
    spec = {"out": "eval.json", "probes": str(data / "probes"), "test": str(data / "test.jsonl"), "max_rows": 8,
            "bench": bench, "feature_cache": "",
            "instruct": {"data": qa_train_file(str(data)), "steps": IT, "lr": 1e-3, "train": ""}}

    def config(out, arch="u"):
        extra = ["--train", "projector", "--feature-cache", str(root / "features")] if arch == "h" else []
        return parse_config(train.TrainConfig, [
            "--data", f"{data}/train.jsonl", "--tokenizer", f"{root}/tok.json", "--arch", arch, "--loss", "ntp",
            "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--vit-dim", "32", "--vit-depth", "1",
            "--vit-heads", "2", "--image-size", "16", "--patch-size", "8", "--batch-size", "8", "--row-len", "160",
            "--steps", "4", "--save-every", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
            "--out-dir", str(root / out), *extra])
    return root, data, spec, config


def run_files(run):
    """{name: sha256} of every file of the run's own (ckpt_*.pt, last.pt, log.jsonl, config.json)."""
    names = glob.glob(os.path.join(run, "*.pt")) + [os.path.join(run, n) for n in ("log.jsonl", "config.json")]
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in names}


def rows_at(run, step):
    return {r["benchmark"]: r["value"] for r in json.load(open(os.path.join(run, "eval.json"))) if r["step"] == step}


@pytest.mark.parametrize("arch", ["u", "h"])
def test_tuned_copy_is_evaluated_and_the_run_is_untouched(setup, arch):
    """A finished run, then the evaluation with the tuned copy: its files are byte-identical, the bench rows and
    the marker are at the last step alone, the copy trained in RUN/instruct/ and left no weights there."""
    root, _, spec, config = setup
    cfg = config(f"finished_{arch}", arch)
    train_eval(cfg, [{k: v for k, v in spec.items() if k not in ("bench", "instruct")} | {"out": "probes.json"}])
    before = run_files(cfg.out_dir)
    train_eval(cfg, [{**spec, "feature_cache": cfg.feature_cache}])
    assert run_files(cfg.out_dir) == before
    final, early = rows_at(cfg.out_dir, 4), rows_at(cfg.out_dir, 2)
    assert final[MARKER] == IT and MARKER not in early
    for name in ("pope_f1", "pope_random_f1", "pope_yes_ratio", "pope_sum_f1", "pope_norm_f1", "pope_tail_logp",
                 "mmbench_circular", "probe_avg", "gap_image"):
        assert name in final, name
    assert "gap_image" in early and not any(k.startswith(("pope", "mmbench", "probe")) for k in early)
    assert final["pope_tail_logp"] < 0  # "yes" is 2 tokens in this tokenizer: its 2nd token's log p is scored
    it_dir = os.path.join(cfg.out_dir, "instruct")
    assert not glob.glob(os.path.join(it_dir, "*.pt"))
    assert len(open(os.path.join(it_dir, "log.jsonl")).readlines()) == IT
    it_cfg = json.load(open(os.path.join(it_dir, "config.json")))["config"]
    assert (it_cfg["instruct"], it_cfg["loss"], it_cfg["init_from"], it_cfg["train"]) == (
        True, "ntp", os.path.join(cfg.out_dir, "ckpt_000004.pt"), "projector" if arch == "h" else "all")


def test_tuning_inside_training_changes_no_training_and_reruns_skip_it(setup):
    """The copy tuned inside the run's own train.main (its last checkpoint's callback) leaves the run's weights
    and log as training without it; a re-run evaluates and tunes nothing."""
    root, _, spec, config = setup
    a, b = config("with_it"), config("without_it")
    train_eval(a, [spec])
    train_eval(b, [{k: v for k, v in spec.items() if k not in ("bench", "instruct")}])
    for name in ("ckpt_000004.pt", "last.pt"):
        x, y = (torch.load(os.path.join(r.out_dir, name), weights_only=False)["model"] for r in (a, b))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    loss = lambda r: [json.loads(x)["loss"] for x in open(os.path.join(r.out_dir, "log.jsonl"))]  # noqa: E731
    assert loss(a) == loss(b) and rows_at(a.out_dir, 4)[MARKER] == IT
    evals, log = (os.path.join(a.out_dir, n) for n in ("eval.json", "instruct/log.jsonl"))
    seen = open(evals).read(), os.stat(log).st_mtime_ns
    timing = train_eval(a, [spec])
    assert timing["train_s"] == 0 and timing["eval_s"] == 0
    assert (open(evals).read(), os.stat(log).st_mtime_ns) == seen


def test_main_job_spec_asks_for_the_tuning(setup, tmp_path, monkeypatch):
    """Experiment.eval_spec: main (test) runs get the tuning (20 steps by default, the preset's it_steps), built on
    the training scenes' questions; pilot (val) runs and it_steps 0 do not."""
    _, data, _, _ = setup
    os.symlink(data, tmp_path / "data_web")
    exp = experiment.Experiment(experiment.ExperimentConfig(preset="smoke", out=str(tmp_path)))
    spec = exp.eval_spec("web", "u", "test")
    assert spec["instruct"] == {"data": str(tmp_path / "data_web" / "bench" / "qa_train.jsonl"), "steps": 20,
                                "lr": 1e-3, "train": "", "image_cache": str(tmp_path / "images_web_qa.u8")}
    qa = [json.loads(x) for x in open(spec["instruct"]["data"])]
    assert qa and all(q["source"].startswith("train") for q in qa)  # never the test scenes the files ask about
    assert spec["bench"] and "instruct" not in exp.eval_spec("web", "u", "val")
    monkeypatch.setitem(experiment.PRESETS["smoke"], "it_scenes", 3)  # questions about the first 3 scenes alone
    few = exp.eval_spec("web", "u", "test")["instruct"]
    assert few["data"].endswith("qa_train_3.jsonl") and few["image_cache"] == str(tmp_path / "images_web_qa3.u8")
    sources = [json.loads(x)["source"] for x in open(few["data"])]
    first = list(dict.fromkeys(q["source"] for q in qa))[:3]  # the full file's scenes, in train.jsonl's order
    assert set(sources) == set(first) and len(sources) <= 6  # per_scene 2
    monkeypatch.setitem(experiment.PRESETS["smoke"], "it_steps", 0)
    assert "instruct" not in exp.eval_spec("web", "u", "test")  # the raw checkpoint, as before


def test_yes_no_diagnostic_rows_and_errors(setup, capsys, monkeypatch):
    """experiments/yes_no.py on a tiny run: a row per PART:STEPS, shares in [0, 1], every question asked; one-line
    errors for a folder that is not a run and for a malformed --tune."""
    from experiments import yes_no
    from experiments.bench_instruct import IT_LR
    from utils import UserError
    root, data, _, config = setup
    cfg = config("yes_no_run")
    train.main(cfg)
    tune, lrs, tune_main = "all:2,:1,:0,all:2:0.05", [], train.main
    monkeypatch.setattr(train, "main", lambda c: lrs.append(c.lr) or tune_main(c))  # the copies' tuning lrs
    rows = yes_no.main(yes_no.YesNoConfig(run=cfg.out_dir, data=str(data), tune=tune, max_rows=0))
    assert [(r["part"], r["steps"], r["lr"]) for r in rows] == [("all", 2, IT_LR), ("all", 1, IT_LR), ("all", 0, 0.0),
                                                                ("all", 2, 0.05)]  # '': the run's part
    assert all(0 <= r["yes_share"] <= 1 and r["n"] == 4 for r in rows)  # one presence question per val scene
    assert lrs == [IT_LR, IT_LR, 0.05]  # the row's lr is the one its copy was tuned at (none for 0 steps)
    assert "what the image adds" in capsys.readouterr().out
    rows = yes_no.main(yes_no.YesNoConfig(run=cfg.out_dir, data=str(data), tune=":0", max_rows=0, pope=True))
    assert 0 <= rows[0]["pope_acc"] <= 100 and 0 <= rows[0]["pope_yes_ratio"] <= 100  # --pope: the bench files too
    for bad in ("all", "all:2:x", "all:2:0", "all:2:1e-3:4"):
        with pytest.raises(UserError, match="--tune all"):
            yes_no.main(yes_no.YesNoConfig(run=cfg.out_dir, data=str(data), tune=bad))
    with pytest.raises(UserError, match="--run"):
        yes_no.main(yes_no.YesNoConfig(run=str(root), data=str(data)))


def test_the_question_images_cache_changes_no_row(setup):
    """The tuning's images read from the main job's cache of the QA file (decoded once, not once per run) give
    the same tuned copy as decoding them: every bench row equal, and the cache file is written."""
    root, _, spec, config = setup
    cache = str(root / "images_qa.u8")
    rows = []
    for name, it in (("decoded", spec["instruct"]), ("cached", {**spec["instruct"], "image_cache": cache})):
        cfg = config(name)
        train_eval(cfg, [{**spec, "instruct": it, "probes": None, "test": None}])
        rows.append(rows_at(cfg.out_dir, 4))
    assert rows[0] == rows[1] and "pope_f1" in rows[0] and os.path.exists(cache)
