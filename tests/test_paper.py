"""experiments/paper.py and its modules (experiments/paper_*.py): the power-law fit and its intervals, and each
command's --quick mode end to end.

The end-to-end tests run on a miniature of the main job's output folder, built once per session in this
process (the smoke experiment itself takes ~2 minutes of subprocesses, too long for the test budget): the
generator's data, tokenizer, reference LM and scores, base LM and ViT, made by the same functions the main job
runs, plus the experiment_config.json and chosen_lrs.json it writes. It has no main runs, so `instruct` also
exercises pre-training its own checkpoints.
"""
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from experiments import paper, paper_scaling
from experiments.paper_setup import Setup
from experiments.powerlaw import bootstrap_alpha, fit_power_law, holdout, log_sizes, predict
from experiments.stats import t_quantile


# ----------------------------------------------------------------------------- statistics
def test_t_quantile_matches_tables():
    for dof, q in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, dof) == pytest.approx(q, abs=2e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=2e-4)
    assert t_quantile(0.025, 5) == pytest.approx(-2.5706, abs=2e-4)


@pytest.mark.parametrize("alpha,d_c", [(-0.07, 1e13), (0.12, 3e4), (-0.5, 2e5)])
def test_fit_recovers_exact_power_law(alpha, d_c):
    D = np.geomspace(7e6, 7e7, 6)
    fit = fit_power_law(D, (D / d_c) ** alpha)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-10)
    assert fit["D_c"] == pytest.approx(d_c, rel=1e-6)
    assert fit["ci"][0] == pytest.approx(alpha, abs=1e-8) and fit["ci"][1] == pytest.approx(alpha, abs=1e-8)
    assert predict(fit, 1e8) == pytest.approx((1e8 / d_c) ** alpha, rel=1e-9)
    h = holdout(D, (D / d_c) ** alpha)
    assert h["rel_error"] < 1e-9 and h["D"] == pytest.approx(7e7)


def test_fit_with_noise_covers_the_truth():
    rng = np.random.default_rng(1)
    alpha, d_c = -0.08, 5e12
    D = np.repeat(np.geomspace(1e6, 1e7, 6), 3)  # 6 sizes over 10x, 3 seeds each
    y = (D / d_c) ** alpha * np.exp(rng.normal(0, 0.01, len(D)))
    fit = fit_power_law(D, y)
    assert fit["ci"][0] < alpha < fit["ci"][1]
    boot, slopes = bootstrap_alpha(D, y, seed=0)
    assert boot[0] < alpha < boot[1]
    assert abs(fit["alpha"] - alpha) < 0.01 and fit["n"] == 18
    assert math.log(fit["D_c"]) == pytest.approx(math.log(d_c), rel=0.05)
    # the interval has the width the standard error says
    assert fit["ci"][1] - fit["ci"][0] == pytest.approx(2 * t_quantile(0.975, 16) * fit["se_alpha"])


def test_t_interval_coverage_is_nominal():
    """Over many synthetic data sets the 95% interval holds the true exponent about 95% of the time."""
    rng = np.random.default_rng(0)
    alpha, d_c, D = 0.1, 1e3, np.repeat(np.geomspace(1e6, 1e7, 5), 2)
    hits = 0
    for _ in range(400):
        y = (D / d_c) ** alpha * np.exp(rng.normal(0, 0.02, len(D)))
        lo, hi = fit_power_law(D, y)["ci"]
        hits += lo < alpha < hi
    assert 0.91 <= hits / 400 <= 0.985


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError):
        fit_power_law([1e6, 1e6, 1e6], [1.0, 1.1, 0.9])  # one size: no slope
    with pytest.raises(ValueError):
        fit_power_law([1e6, 2e6], [1.0, -0.5])  # not positive
    assert log_sizes(8000) == [800, 1268, 2010, 3185, 5048, 8000]
    assert log_sizes(120, k=5, minimum=16)[0] == 16


def test_tokens_seen_and_subsets(tmp_path):
    lengths = [3, 5, 7, 11]
    assert paper_scaling.tokens_seen(lengths, 2, 2, seed=0) == sum(lengths)  # one epoch: every caption once
    assert paper_scaling.tokens_seen(lengths, 4, 2, seed=0) == 2 * sum(lengths)
    src = tmp_path / "d" / "train.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"id": f"r{i}", "image": f"images/{i}.png", "caption": f"c {i}"}) + "\n"
                           for i in range(5)))
    out = paper_scaling.write_subset(str(src), str(tmp_path / "sub" / "train_3.jsonl"), 3)
    rows = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"] and rows[1]["caption"] == "c 1"
    assert (os.path.normpath(os.path.join(tmp_path / "sub", rows[2]["image"]))
            == str(tmp_path / "d" / "images" / "2.png"))
    with pytest.raises(ValueError):
        paper_scaling.write_subset(str(src), str(tmp_path / "sub" / "x.jsonl"), 6)


# ----------------------------------------------------------------------------- the commands, --quick
@pytest.fixture(scope="session")
def mini_out(tmp_path_factory):
    """A miniature main-job output folder (see the module docstring)."""
    import reference_lm
    import score
    from data import tokenizer
    from tools import vision
    from world.generate import GenConfig, generate
    root = tmp_path_factory.mktemp("paper_from")
    data = root / "data_web"
    sizes = dict(n_ref=300, n_text=300, n_label=64, n_train=120, n_val=16, n_test=30, n_probe=8)
    generate(GenConfig(out=str(data), workers=1, **sizes))
    tok = str(root / "tokenizer.json")
    tokenizer.main(["--data", f"{data}/text.jsonl,{data}/train.jsonl", "--out", tok, "--vocab-size", "400"])
    lm = dict(tokenizer=tok, n_layer=1, n_head=2, d_model=32, row_len=128, batch_rows=4, steps=10,
              eval_every=10, device="cpu")
    reference_lm.train_lm(reference_lm.RefConfig(data=str(data / "ref.jsonl"), out=str(root / "ref_lm_web.pt"), **lm))
    reference_lm.train_lm(reference_lm.RefConfig(data=str(data / "text.jsonl"),
                                                 out=str(root / "base_lm.pt"), seed=1, **lm))
    for split in ("train", "test"):
        score.main(score.ScoreConfig(ref=str(root / "ref_lm_web.pt"), tokenizer=tok, data=str(data / f"{split}.jsonl"),
                                     out=str(root / f"scores_web_{split}.pt"), device="cpu"))
    vision.main(vision.Config(data=str(data / "label.jsonl"), out=str(root / "vit.pt"), patch_size=16, vit_dim=32,
                              vit_depth=1, vit_heads=2, steps=3, batch_size=16, warmup=1, eval_every=0, device="cpu"))
    preset = dict(data=sizes, vocab=400, lm=dict(lm, steps=10), base_lm=dict(steps=10), seeds=1, lrs={"h": [3e-3]},
                  vit=dict(steps=3, batch_size=16, patch_size=16), stage1_steps=2, eval_rows=8, mixes="web",
                  vlm=dict(steps=4, batch_size=8, save_every=2, warmup=1, row_len=128, patch_size=16))
    config = dict(out=str(root), preset="smoke", stage="all", mixes="", archs="h", other_mix_archs="h",
                  losses="ntp,prior", seeds=0, parallel=1, device="cpu", seed=0)
    (root / "experiment_config.json").write_text(json.dumps({"config": config, "preset": preset}))
    (root / "chosen_lrs.json").write_text(json.dumps({"web/h": {"ntp": 3e-3, "prior": 3e-3}}))
    return root


def read(path):
    with open(path) as f:
        return f.read()


def test_ablation_quick(mini_out, tmp_path):
    out = tmp_path / "ablation"
    paper.main(["ablation", "--from", str(mini_out), "--out", str(out), "--quick"])
    md = read(out / "results.md")
    for label in ("NTP", "PRIOR α=0.5", "PRIOR α=1", "PRIOR α=2", "PRIOR α=4", "PRIOR α=1 w/o k"):
        assert f"| {label} (n=1)" in md
    assert "`probe_avg` ↑" in md and "`nll_image` ↓" in md and "`gap_image` ↑" in md
    assert os.path.getsize(out / "ablation.png") > 10_000
    res = json.loads(read(out / "results.json"))
    configs = {}
    for d in (out / "runs" / "web" / "h").iterdir():
        c = json.loads(read(d / "config.json"))["config"]
        configs[d.name.split("_lr")[0]] = (c["loss"], c["alpha"], c["no_k"], c["steps"])
    assert configs == {"ntp": ("ntp", 1.0, False, 2), "prior_a0.5": ("prior", 0.5, False, 2),
                       "prior_a1": ("prior", 1.0, False, 2), "prior_a2": ("prior", 2.0, False, 2),
                       "prior_a4": ("prior", 4.0, False, 2), "prior_nok": ("prior", 1.0, True, 2)}
    assert set(res["stats"]) == set(configs)
    # the relative change vs NTP is signed so that positive is better (report.compare)
    c = res["vs_ntp"]["prior_a2"]["nll_image"]
    ntp, x = res["stats"]["ntp"]["nll_image"]["mean"], res["stats"]["prior_a2"]["nll_image"]["mean"]
    assert c["rel"] == pytest.approx((ntp - x) / ntp)
    # a re-run finds every run finished and only writes the report again
    paper.main(["ablation", "--from", str(mini_out), "--out", str(out), "--quick"])
    assert json.loads(read(out / "results.json"))["stats"] == res["stats"]


def test_scaling_quick(mini_out, tmp_path):
    out = tmp_path / "scaling"
    paper.main(["scaling", "--from", str(mini_out), "--out", str(out), "--quick"])
    res = json.loads(read(out / "results.json"))
    sizes = res["sizes"]
    assert len(sizes) >= 5 and sizes[-1] / sizes[0] >= 7.5 and sizes[-1] == 120
    pts = res["points"]
    assert len(pts) == 2 * len(sizes)
    for m in ("ntp", "prior"):
        D = [p["D"] for p in sorted((p for p in pts if p["method"] == m), key=lambda p: p["n"])]
        assert D == sorted(D) and D[-1] > 5 * D[0]
        for tgt in ("probe_avg", "nll_image"):
            f = res["fits"][f"{tgt}/{m}"]
            assert f["ci"][0] <= f["alpha"] <= f["ci"][1] and f["holdout"]["rel_error"] >= 0
    # subsets keep their records' ids and get their own score files, equal to the full file's scores
    for n in sizes[:-1]:
        assert (out / "data" / f"train_{n}.jsonl").exists() and (out / "data" / f"scores_train_{n}.pt").exists()
    assert 0 <= max(res["score_max_abs_diff"].values()) < 1e-3
    prior_run = next(d for d in (out / "runs" / "web" / "h").iterdir() if d.name.startswith(f"prior_n{sizes[0]}_"))
    c = json.loads(read(prior_run / "config.json"))["config"]
    assert c["scores"].endswith(f"scores_train_{sizes[0]}.pt") and c["data"].endswith(f"train_{sizes[0]}.jsonl")
    md = read(out / "results.md")
    assert "alpha_D" in md and "rel. error" in md and "| `nll_image` | PRIOR |" in md
    assert os.path.getsize(out / "scaling.png") > 10_000


def test_instruct_quick(mini_out, tmp_path):
    out = tmp_path / "instruct"
    paper.main(["instruct", "--from", str(mini_out), "--out", str(out), "--quick"])
    res = json.loads(read(out / "results.json"))
    for key in ("ntp/pre", "ntp/it", "prior/pre", "prior/it"):
        st = res["stats"][key]
        for b in ("em_avg", "mc_avg", "em_count", "mc_presence", "probe_avg", "nll_image"):
            assert b in st, (key, b)
            assert 0 <= st["em_avg"]["mean"] <= 1
    # tuned from the pre-trained checkpoint, on training scenes only, with the answer-only loss
    c = json.loads(read(out / "runs" / "prior_s0_it3_answer" / "config.json"))["config"]
    assert c["init_from"].endswith("ckpt_000002.pt") and "pretrain" in c["init_from"]
    assert c["loss"] == "prior" and c["scores"].endswith("qa_train_answer_mask.pt") and c["train"] == "all"
    train_q = [json.loads(x) for x in open(out / "qa" / "qa_train.jsonl")]
    assert train_q and all(q["source"].startswith("train-") for q in train_q)
    answers = [json.loads(x) for x in open(out / "answers_ntp_s0_it.jsonl")]
    assert len(answers) == 5 * 8 and all(a["id"].startswith("test-") for a in answers)
    assert {a["kind"] for a in answers} == {"count", "colour", "shape", "position", "presence"}
    em = sum(a["correct"] for a in answers if a["kind"] == "count") / 8
    assert res["stats"]["ntp/it"]["em_count"]["mean"] == pytest.approx(em)
    md = read(out / "results.md")
    assert "`em_avg` ↑" in md and "`mc_avg` ↑" in md and "PRIOR − NTP after tuning" in md
    assert os.path.getsize(out / "instruct.png") > 10_000


def test_baselines_quick(mini_out, tmp_path):
    out = tmp_path / "baselines"
    paper.main(["baselines", "--from", str(mini_out), "--out", str(out), "--quick", "--arms", "attn,itm,rho1"])
    res = json.loads(read(out / "results.json"))
    assert set(res["stats"]) == {"ntp", "prior", "attn", "itm", "rho1"}
    # each baseline trains with its own flags in the main job's recipe, at its lr from the grid
    configs = {}
    for d in (out / "runs" / "web" / "h").iterdir():
        if d.name.endswith("_val"):
            assert (d / "eval.json").exists() and not (d / "config.json").exists()  # a grid run's checkpoint, on val
            continue
        c = json.loads(read(d / "config.json"))["config"]
        configs[d.name.split("_lr")[0]] = (c["loss"], c["objective"], c["train"], c["steps"])
    assert configs == {"ntp": ("ntp", "none", "projector", 2), "prior": ("prior", "none", "projector", 2),
                       "attn": ("attn", "none", "projector", 2), "itm": ("ntp", "itm", "projector", 2),
                       "rho1": ("rho1", "none", "projector", 2)}
    assert (out / "attn_scores_train.pt").exists()
    assert set(res["chosen_lr"]) == {"attn", "itm", "rho1"} and set(res["lr_grid"]["itm"]) == {"0.003"}
    rel = res["relevance"]["attention weighting"]
    assert 0 <= rel["mean_w"]["image"] <= 1 and 0 <= rel["auc"]["image_vs_rest"] <= 1
    md = read(out / "results.md")
    for label in ("| NTP |", "| PRIOR |", "| attention weighting |", "| NTP + ITM |", "| Rho-1 (not in the paper) |"):
        assert label in md, label
    assert "Learning-rate grid" in md and os.path.getsize(out / "baselines.png") > 10_000
    with pytest.raises(SystemExit, match="unknown --arms"):
        paper.main(["baselines", "--from", str(mini_out), "--out", str(out), "--quick", "--arms", "clip"])


def parse(argv):
    """The config of `python -m experiments.paper <argv>`, without running it."""
    from utils import parse_config
    _, cls = paper.command_of(argv)
    cfg = parse_config(cls, argv[1:], description=f"python -m experiments.paper {argv[0]}: {cls.__doc__}")
    cfg.argv = list(argv)
    return cfg


def test_same_run_reads_a_moved_artefacts_folder(mini_out, tmp_path):
    """A main-job run made when the artefacts folder lived elsewhere (copied, renamed) still counts as the same
    run: its recorded paths are read relative to the folder it was in. Another setting does not."""
    args = parse(["ablation", "--from", str(mini_out), "--out", str(tmp_path / "o"), "--quick"])
    s = Setup(args, "ablation")
    run = os.path.join(s.src, "runs", "web", "h", "ntp_moved_folder")
    targs = s.train_config("ntp", 3e-3, 0, run)
    config = dataclasses.asdict(targs)
    old = "/elsewhere/out"
    moved = {k: old + v[len(s.src):] if isinstance(v, str) and v.startswith(s.src + os.sep) else v
             for k, v in config.items()}
    assert moved["data"].startswith(old) and moved["out_dir"].startswith(old)
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"config": moved}, f)
    assert s.same_run(run, targs)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"config": {**moved, "lr": 1e-2}}, f)
    assert not s.same_run(run, targs)


def test_each_command_parses_its_own_flags(capsys):
    """One config per command: `--from` (the field from_) and the command's flags parse; another command's flag,
    an unknown command or none at all end as one `error:` line with exit code 2."""
    cfg = parse(["scaling", "--from", "elsewhere", "--epochs", "2", "--quick"])
    assert isinstance(cfg, paper.ScalingConfig) and cfg.command == "scaling"
    assert (cfg.from_dir, cfg.epochs, cfg.quick, cfg.methods) == ("elsewhere", 2.0, True, "ntp,prior")
    assert cfg.argv == ["scaling", "--from", "elsewhere", "--epochs", "2", "--quick"]
    with pytest.raises(SystemExit) as e:
        parse(["scaling", "--alphas", "1"])  # ablation's flag
    assert e.value.code == 2 and "unrecognized arguments: --alphas" in capsys.readouterr().err
    for argv in (["fig9"], []):
        with pytest.raises(SystemExit) as e:
            paper.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the first argument is the command")
