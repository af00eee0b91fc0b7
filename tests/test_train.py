import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train
from utils import atomic_save, load_checkpoint
from data.packing import global_batch, make_samples
from model import load_model
from model import build_model
import baselines  # noqa: F401 (registers rho1, cal and the objectives: the baseline tests below)
import scale  # noqa: F401 (--fsdp, --image-cache, timm encoders: the tests of scale/ features below)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tiny, out_dir, **kw):
    base = dict(data=str(tiny["train"]), tokenizer=str(tiny["tokenizer"]), scores=str(tiny["scores"]),
                out_dir=str(out_dir), image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                n_layer=1, n_head=2, d_model=32, batch_size=8, row_len=64, steps=6, warmup=2, save_every=3,
                device="cpu", lr=3e-3)
    base.update(kw)
    return train.TrainConfig(**base)


def weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("arch", ["h", "u"])
@pytest.mark.parametrize("loss", ["ntp", "prior", "rare", "oracle"])
def test_every_family_and_loss_trains(tiny, tmp_path, arch, loss):
    train.main(config(tiny, tmp_path, arch=arch, loss=loss, steps=2, save_every=1,
                      text_data=str(tiny["text"]) if arch == "u" else ""))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000001.pt", "ckpt_000002.pt", "config.json", "last.pt", "log.jsonl"]
    import json
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [l["step"] for l in lines] == [1, 2]
    assert {"loss", "ntp", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "nll_image", "nll_boiler"} <= set(lines[0])
    if loss == "ntp":
        assert lines[0]["loss"] == pytest.approx(lines[0]["ntp"], rel=1e-5)


def test_resume_is_bitwise_identical(tiny, tmp_path):
    train.main(config(tiny, tmp_path / "straight", loss="prior"))
    train.main(config(tiny, tmp_path / "stopped", loss="prior", stop_at=4))
    assert not (tmp_path / "stopped" / "ckpt_000006.pt").exists()
    train.main(config(tiny, tmp_path / "stopped", loss="prior", resume=True))
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rebuilt_from_checkpoint_gives_identical_logits(tiny, tmp_path):
    model = train.main(config(tiny, tmp_path, steps=2)).eval()
    rebuilt, ckpt = load_model(str(tmp_path / "ckpt_000002.pt"))
    ids = torch.tensor([model.image_tokens() + [1, 20, 21, 22]])
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(ids, images), rebuilt(ids, images))
    assert ckpt["config"]["arch"] == "h" and ckpt["step"] == 2


def test_projector_only_leaves_encoder_and_decoder_untouched(tiny, tmp_path):
    model = train.main(config(tiny, tmp_path, train="projector", steps=3))
    torch.manual_seed(0)  # build_model's initialisation, before training
    start = build_model(config(tiny, tmp_path, train="projector"), train.T.load_tokenizer(str(tiny["tokenizer"])))
    for name in ("encoder", "decoder", "projector"):
        same = all(torch.equal(p, q) for p, q in zip(model.parts()[name].parameters(),
                                                     start.parts()[name].parameters()))
        assert same == (name != "projector"), name


def test_few_pairs_overfit(tiny, tmp_path):
    import json
    from data.records import read_records
    few = tmp_path / "few.jsonl"
    with open(tiny["train"]) as src, open(few, "w") as dst:
        dst.writelines(src.readlines()[:4])
    # images resolve relative to the JSONL's folder: point them at the originals
    rows = [json.loads(l) for l in open(few)]
    for r in rows:
        r["image"] = str(tiny["root"] / r["image"])
    with open(few, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(read_records(str(few))) == 4
    train.main(config(tiny, tmp_path / "run", data=str(few), batch_size=4, steps=150, warmup=10, lr=1e-2,
                      save_every=150, d_model=64))
    last = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")][-1]
    assert last["ntp"] < 0.05


def test_refuses_scores_of_other_captions(tiny, tmp_path):
    other = tmp_path / "other.jsonl"
    lines = open(tiny["train"]).readlines()[:-1]  # one caption fewer: another data set
    other.write_text("".join(l.replace('"images/', f'"{tiny["root"]}/images/') for l in lines))
    with pytest.raises(ValueError, match="caption data mismatch") as err:
        train.main(config(tiny, tmp_path / "run", data=str(other), loss="prior"))
    assert str(other) in str(err.value) and str(tiny["scores"]) in str(err.value)


def test_non_finite_loss_stops_with_a_useful_message(tiny, tmp_path):
    with pytest.raises(RuntimeError, match=r"non-finite .* step \d+; batch sample ids \['train-"):
        train.main(config(tiny, tmp_path, lr=1e30, warmup=1, grad_clip=1e30, steps=6))


def test_two_processes_equal_one(tiny, tmp_path):
    """torchrun with 2 gloo processes and half the batch each gives the 1-process result (float tolerance); the
    2-process run keeps its images in an --image-cache file (rank 0 decodes, rank 1 waits and maps it)."""
    args = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
            "--loss", "prior", "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1",
            "--vit-heads", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8",
            "--row-len", "64", "--steps", "3", "--save-every", "3", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        script = [os.path.join(ROOT, "train.py")] if n == 1 else ["-m", "scale", "train"]  # --image-cache: scale/
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *script,
               *args, "--out-dir", str(tmp_path / f"n{n}")]
        if n == 2:
            cmd += ["--image-cache", str(tmp_path / "cache" / "images_16.u8")]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.getsize(tmp_path / "cache" / "images_16.u8") % (3 * 16 * 16) == 0
    a, b = weights(tmp_path / "n1" / "last.pt"), weights(tmp_path / "n2" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def log_losses(path):
    import json
    return [json.loads(l)["loss"] for l in open(path)]


def test_fsdp_two_processes_equal_one_and_checkpoints_load_anywhere(tiny, tmp_path):
    """FSDP2 on 2 gloo CPU processes (with gradient accumulation) follows the 1-process run, and the checkpoints
    move between sharded and unsharded runs: a plain run stops at step 1, a 2-process --fsdp run resumes it
    (optimizer state carried into the shards) and stops at 3, a plain run resumes that to step 4."""
    kw = dict(loss="prior", steps=4, save_every=1)
    train.main(config(tiny, tmp_path / "one", **kw))
    train.main(config(tiny, tmp_path / "mixed", stop_at=1, **kw))
    args = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
            "--loss", "prior", "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1",
            "--vit-heads", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8",
            "--row-len", "64", "--steps", "4", "--warmup", "2", "--lr", "3e-3", "--save-every", "1", "--device", "cpu",
            "--threads", "1", "--fsdp", "--micro-batch", "2", "--resume", "--stop-at", "3",
            "--out-dir", str(tmp_path / "mixed")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scale", "train", *args]  # --fsdp: scale/fsdp.py
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    fsdp_ckpt = load_checkpoint(tmp_path / "mixed" / "last.pt")
    assert fsdp_ckpt["step"] == 3 and fsdp_ckpt["optimizer_format"] == "fqn"
    # gathered, not sharded: a plain process rebuilds the model from it, equal to the 1-process run's
    rebuilt, _ = load_model(str(tmp_path / "mixed" / "ckpt_000003.pt"))
    for k, v in weights(tmp_path / "one" / "ckpt_000003.pt").items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    train.main(config(tiny, tmp_path / "mixed", resume=True, **kw))
    assert log_losses(tmp_path / "mixed" / "log.jsonl") == pytest.approx(
        log_losses(tmp_path / "one" / "log.jsonl"), rel=1e-5)
    a, b = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "mixed" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_timm_encoder_from_weights_file_trains_only_the_projector(tiny, tmp_path):
    import json
    import timm
    from scale.timm_encoder import TimmEncoder
    kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    torch.manual_seed(123)  # weights unlike the ones train.py's seeded build would make
    source = TimmEncoder("vit_tiny_patch16_224", kwargs).model.state_dict()
    torch.save(source, tmp_path / "vit.pt")
    cfg = config(tiny, tmp_path / "run", vision="timm:vit_tiny_patch16_224", vision_weights=str(tmp_path / "vit.pt"),
                 vision_kwargs=json.dumps(kwargs), train="projector", steps=2, save_every=2)
    model = train.main(cfg)
    # image size and token count come from the timm model, not --image-size 16 / --patch-size 4
    assert model.cfg.image_size == 32 and len(model.image_tokens()) == 16 and model.cfg.vit_dim == 32
    for k, v in source.items():  # frozen: still exactly the file's weights after training
        assert torch.equal(model.encoder.model.state_dict()[k], v), k
    torch.manual_seed(0)
    start = build_model(cfg, train.T.load_tokenizer(str(tiny["tokenizer"])))
    for name in ("decoder", "projector"):
        same = all(torch.equal(p, q) for p, q in zip(model.parts()[name].parameters(),
                                                     start.parts()[name].parameters()))
        assert same == (name == "decoder"), name
    # a backward pass reaches the projector only
    ids = torch.tensor([model.image_tokens() + [train.T.BOS, 20, 21]])
    model(ids, torch.randn(1, 3, 32, 32)).sum().backward()
    for name, part in model.parts().items():
        assert all((p.grad is not None) == (name == "projector") for p in part.parameters()), name
    # the checkpoint alone rebuilds it, offline and without the weights file
    os.remove(tmp_path / "vit.pt")
    rebuilt, ckpt = load_model(str(tmp_path / "run" / "ckpt_000002.pt"))
    assert ckpt["model_config"]["vision"] == "timm:vit_tiny_patch16_224"
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(ids, images), rebuilt(ids, images))
    with pytest.raises(FileNotFoundError, match="no vision weights file"):
        train.main(config(tiny, tmp_path / "r2", vision="timm:vit_tiny_patch16_224",
                          vision_weights=str(tmp_path / "vit.pt")))
    with pytest.raises(ValueError, match="two encoders"):
        train.main(config(tiny, tmp_path / "r3", vision="timm:vit_tiny_patch16_224", init_encoder="x.pt"))
    with pytest.raises(ValueError, match="row-len"):
        train.main(config(tiny, tmp_path / "r4", vision="timm:vit_tiny_patch16_224", row_len=64))  # 196 tokens


# ----------------------------------------------------------------------------- baselines: rho1, cal, --objective

@pytest.mark.parametrize("arch", ["h", "u"])
@pytest.mark.parametrize("loss,objective", [("rho1", "none"), ("cal", "none"), ("ntp", "itm"), ("ntp", "itc"),
                                            ("ntp", "recon"), ("prior", "itc")])
def test_baselines_train_end_to_end(tiny, tmp_path, arch, loss, objective):
    """Each new choice runs 2 steps of train.py (U-LVLM with text-only rows mixed in); the log carries the
    auxiliary loss, the checkpoints carry the heads, and load_model (eval.py's loader) rebuilds the VLM
    from them without the heads, with identical logits."""
    import json
    model = train.main(config(tiny, tmp_path, arch=arch, loss=loss, objective=objective, steps=2, save_every=2,
                              text_data=str(tiny["text"]) if arch == "u" else "")).eval()
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [l["step"] for l in lines] == [1, 2]
    assert all(math.isfinite(l["loss"]) for l in lines)
    assert ("aux" in lines[0]) == (objective != "none")
    if objective != "none":
        assert lines[0]["aux"] > 0 and math.isfinite(lines[0]["aux"])
    ckpt = load_checkpoint(tmp_path / "ckpt_000002.pt")
    assert any(k.startswith("aux.") for k in ckpt["model"]) == (objective != "none")
    rebuilt, _ = load_model(str(tmp_path / "ckpt_000002.pt"))
    assert not hasattr(rebuilt, "aux")
    ids = torch.tensor([model.image_tokens() + [1, 20, 21, 22]])
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(ids, images), rebuilt(ids, images))


@pytest.mark.parametrize("loss,objective", [("rho1", "itc"), ("cal", "itm")])
def test_resume_is_bitwise_identical_with_heads(tiny, tmp_path, loss, objective):
    kw = dict(loss=loss, objective=objective, steps=4, save_every=2)
    train.main(config(tiny, tmp_path / "straight", **kw))
    train.main(config(tiny, tmp_path / "stopped", stop_at=2, **kw))
    train.main(config(tiny, tmp_path / "stopped", resume=True, **kw))
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "stopped" / "last.pt")
    assert any(k.startswith("aux.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_losses(tmp_path / "straight" / "log.jsonl") == log_losses(tmp_path / "stopped" / "log.jsonl")


def test_init_from_a_run_with_heads(tiny, tmp_path):
    train.main(config(tiny, tmp_path / "a", objective="itm", steps=2, save_every=2))
    start = weights(tmp_path / "a" / "ckpt_000002.pt")
    # into a plain run: the heads are left behind
    plain = train.main(config(tiny, tmp_path / "b", init_from=str(tmp_path / "a" / "ckpt_000002.pt"), steps=1, lr=0.0))
    assert not hasattr(plain, "aux")
    # into a run with the same objective: the heads come along (lr 0: nothing moves)
    same = train.main(config(tiny, tmp_path / "c", objective="itm", init_from=str(tmp_path / "a" / "ckpt_000002.pt"),
                             steps=1, lr=0.0))
    assert torch.equal(same.aux.itm.weight, start["aux.itm.weight"])


def test_projector_only_with_an_objective_trains_projector_and_heads(tiny, tmp_path):
    model = train.main(config(tiny, tmp_path, train="projector", objective="recon", steps=3))
    torch.manual_seed(0)
    cfg = config(tiny, tmp_path, train="projector", objective="recon")
    start = build_model(cfg, train.T.load_tokenizer(str(tiny["tokenizer"])), train.method_hook(cfg))
    parts = {**model.parts(), "aux": model.aux}
    for name, part in parts.items():
        before = start.aux if name == "aux" else start.parts()[name]
        same = all(torch.equal(p, q) for p, q in zip(part.parameters(), before.parameters()))
        assert same == (name not in ("projector", "aux")), name


def test_new_flags_have_help():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--objective", "--aux-weight", "--rho1-keep", "--itc-dim", "--attn-scores", "rho1", "cal", "attn"):
        assert flag in done.stdout, flag


def test_two_processes_with_cal_and_itm(tiny, tmp_path):
    """DDP (2 gloo processes, accumulation) with the extra forwards: CAL's without gradient, ITM's with."""
    import json
    args = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--loss", "cal", "--objective", "itm",
            "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2",
            "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8", "--micro-batch", "2",
            "--row-len", "64", "--steps", "2", "--save-every", "2", "--device", "cpu", "--threads", "1",
            "--out-dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "baselines", "train", *args]  # train.py with the baselines' plug-ins
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert len(lines) == 2 and all(math.isfinite(l["aux"]) for l in lines)
    assert any(k.startswith("aux.itm") for k in weights(tmp_path / "last.pt"))


# ----------------------------------------------------------------------------- training really reweights
def spread_scores(tiny, tmp_path):
    """The tiny reference LM is barely trained (p_ref ~ 0.01 everywhere): a score file of the same captions
    with p_ref spread over [0, 0.95], so that PRIOR's weights clearly differ from NTP's."""
    from data.scores import save_scores
    blob = torch.load(tiny["scores"], weights_only=True)
    p_ref = train.load_scores(str(tiny["scores"]), blob["fingerprint"]["tokenizer"], blob["fingerprint"]["data"])
    g = torch.Generator().manual_seed(0)
    path = str(tmp_path / "spread.pt")
    save_scores(path, list(p_ref), [0.95 * torch.rand(len(p), generator=g) for p in p_ref.values()],
                blob["fingerprint"])
    return path


def test_logged_prior_loss_equals_a_hand_computation(tiny, tmp_path):
    """Step 1's logged loss (computed before the first update) equals PRIOR's Eq. 4 written out by hand on the
    initial model, one caption at a time: sum_c sum_i k_c w_i / sum_j w_j * nll_i / sum_c k_c with w = 1 - p_ref.
    If training ignored the weights (all ones) the log would show the plain NTP mean instead."""
    import json
    import torch.nn.functional as F
    from data.packing import pack
    from data.records import read_records
    from data.images import load_images, normalize
    from data.scores import load_scores
    cfg = config(tiny, tmp_path, loss="prior", steps=1, save_every=1, scores=str(spread_scores(tiny, tmp_path)))
    train.main(cfg)
    logged = json.loads(open(tmp_path / "log.jsonl").readline())
    tok = train.T.load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok).eval()
    records = read_records(cfg.data)
    p_ref = load_scores(cfg.scores, train.T.fingerprint(tok), train.text_fingerprint(records))
    records, images = load_images(records, model.cfg.image_size)
    samples = make_samples(tok, records, {"p_ref": p_ref})
    weighted = plain = tokens = 0.0
    with torch.no_grad():
        for i in global_batch(0, len(samples), cfg.batch_size, cfg.seed):
            b = pack([samples[i]], cfg.row_len, model.image_tokens())
            logits = model(b.input_ids, normalize(images[[i]]), b.position_ids, b.doc_ids)
            valid = b.labels[0] != -100
            nll = -F.log_softmax(logits[0].double(), -1)[valid].gather(1, b.labels[0][valid][:, None])[:, 0]
            w = 1 - torch.tensor(samples[i].inputs["p_ref"], dtype=torch.float64)
            k = len(nll)
            weighted += float((k * w / w.sum() * nll).sum())
            plain += float(nll.sum())
            tokens += k
    # At initialisation every token's NLL is near log(V), so the weighting moves the mean only a little, but
    # 20x more than the tolerance (float32 sums of ~500 NLLs of ~5.6, packed differently: ~1e-6 relative).
    assert abs(weighted - plain) / tokens > 0.002
    assert logged["loss"] == pytest.approx(weighted / tokens, rel=2e-5)
    assert logged["ntp"] == pytest.approx(plain / tokens, rel=2e-5)


def test_uniform_prior_weights_are_ntp_bit_for_bit_and_real_ones_are_not(tiny, tmp_path):
    """PRIOR with p_ref = 0 everywhere (w = 1) is NTP exactly (the factor k_c w / sum w is 1.0); with spread
    p_ref the first update already differs. (Another constant gives NTP only to rounding: sum_j w_j in float32
    is not exactly k w.)"""
    from data.scores import save_scores
    blob = torch.load(tiny["scores"], weights_only=True)
    p_ref = train.load_scores(str(tiny["scores"]), blob["fingerprint"]["tokenizer"], blob["fingerprint"]["data"])
    uniform = str(tmp_path / "uniform.pt")
    save_scores(uniform, list(p_ref), [torch.zeros_like(p) for p in p_ref.values()], blob["fingerprint"])
    for name, loss, scores in (("ntp", "ntp", tiny["scores"]), ("flat", "prior", uniform),
                               ("prior", "prior", spread_scores(tiny, tmp_path))):
        train.main(config(tiny, tmp_path / name, loss=loss, scores=str(scores), steps=2, save_every=2))
    ntp, flat, prior = (weights(tmp_path / n / "ckpt_000002.pt") for n in ("ntp", "flat", "prior"))
    assert all(torch.equal(ntp[k], flat[k]) for k in ntp)
    assert not all(torch.equal(ntp[k], prior[k]) for k in ntp)


def test_shuffled_prior_permutes_each_captions_weights(tiny, tmp_path):
    """The control keeps each caption's multiset of scores but moves them to other tokens, the same way for
    every seed; its training differs from PRIOR's."""
    from loss import shuffle_within_captions
    blob = torch.load(tiny["scores"], weights_only=True)
    p_ref = train.load_scores(str(tiny["scores"]), blob["fingerprint"]["tokenizer"], blob["fingerprint"]["data"])
    a, b = shuffle_within_captions(p_ref), shuffle_within_captions(p_ref)
    moved = 0
    for rid, p in p_ref.items():
        assert torch.equal(a[rid], b[rid]) and torch.equal(a[rid].sort().values, p.sort().values)
        moved += not torch.equal(a[rid], p)
    assert moved > 0.8 * len(p_ref)
    spread = str(spread_scores(tiny, tmp_path))
    for loss in ("prior", "prior_shuffled"):
        train.main(config(tiny, tmp_path / loss, loss=loss, steps=2, save_every=2, scores=spread))
    x, y = (weights(tmp_path / n / "ckpt_000002.pt") for n in ("prior", "prior_shuffled"))
    assert not all(torch.equal(x[k], y[k]) for k in x)


def test_oracle_weights_follow_the_tags():
    """The tag oracle: image and glue words 1, boiler and noise --oracle-low; unknown positions (-1) low too
    (they carry no loss)."""
    from types import SimpleNamespace
    from data.tags import CATEGORIES
    tags = torch.tensor([[CATEGORIES.index(c) for c in ("image", "glue", "boiler", "noise")] + [-1]])
    batch = SimpleNamespace(tags=tags, inputs={}, labels=torch.zeros(1, 5, dtype=torch.long))
    cfg = train.TrainConfig(loss="oracle", oracle_low=0.25)
    assert train.WEIGHTINGS["oracle"].weights(cfg, batch, None).tolist() == [[1.0, 1.0, 0.25, 0.25, 0.25]]


def test_resume_refuses_changed_flags_and_keeps_the_record(tiny, tmp_path):
    """A resume under flags that define another run stops before anything is written, naming each flag with its
    old and new value; config.json and the log keep describing the run that happened."""
    import json
    run = tmp_path / "run"
    train.main(config(tiny, run, arch="u", loss="prior", steps=4, save_every=2))
    before = (run / "config.json").read_text()
    for kw, names in ((dict(loss="ntp", seed=7, lr=0.01), ("--loss 'prior' -> 'ntp'", "--seed 0 -> 7", "--lr")),
                      (dict(d_model=48), ("--d-model 32 -> 48",)), (dict(steps=8), ("--steps 4 -> 8",))):
        with pytest.raises(ValueError, match="--resume") as err:
            train.main(config(tiny, run, **{**dict(arch="u", loss="prior", steps=4, save_every=2, resume=True), **kw}))
        assert all(n in str(err.value) for n in names) and "\n" not in str(err.value)
    assert (run / "config.json").read_text() == before and sorted(os.listdir(run)) == [
        "ckpt_000002.pt", "ckpt_000004.pt", "config.json", "last.pt", "log.jsonl"]
    # flags that do not change the result may differ
    train.main(config(tiny, run, arch="u", loss="prior", steps=4, save_every=2, resume=True, threads=1, workers=1,
                      stop_at=4))
    assert json.load(open(run / "config.json"))["config"]["loss"] == "prior"


def test_resume_log_has_each_step_once(tiny, tmp_path):
    """A run killed after its last checkpoint logged steps past it; the resumed run logs them again, once."""
    import json
    train.main(config(tiny, tmp_path, steps=6, save_every=3, stop_at=3))
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:  # what a run killed at step 5 leaves: steps 4 and 5 logged, last.pt at step 3
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + json.dumps({"step": 5, "loss": 9.0}) + "\n")
    train.main(config(tiny, tmp_path, steps=6, save_every=3, resume=True))
    steps = [json.loads(line)["step"] for line in open(log)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_init_from_of_the_other_family_is_refused(tiny, tmp_path):
    train.main(config(tiny, tmp_path / "u", arch="u", steps=1, save_every=1))
    with pytest.raises(ValueError, match=r"U-LVLM, but --arch is h") as err:
        train.main(config(tiny, tmp_path / "h", arch="h", init_from=str(tmp_path / "u" / "last.pt")))
    assert "\n" not in str(err.value) and not (tmp_path / "h").exists()


def test_checkpoint_of_the_wrong_kind_is_named(tiny, tmp_path):
    train.main(config(tiny, tmp_path / "run", steps=1, save_every=1))
    vlm, lm = str(tmp_path / "run" / "last.pt"), str(tiny["ref_lm"])
    for kw, expected in ((dict(init_decoder=vlm), "--init-decoder: .* is a train.py checkpoint .*, not a reference_lm"),
                         (dict(init_encoder=lm), "--init-encoder: .* is a reference_lm.py checkpoint .*, not a tools/"),
                         (dict(init_from=lm), "--init-from: .* is a reference_lm.py checkpoint .*, not a train.py")):
        with pytest.raises(ValueError, match=expected):
            train.main(config(tiny, tmp_path / "other", **kw))
    with pytest.raises(ValueError, match="is a reference_lm.py checkpoint"):
        load_model(lm)


def test_text_data_honours_max_bad_fraction(tiny, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text(open(tiny["text"]).read() + "{broken\n{broken\n")  # 2 bad of 102
    kw = dict(arch="u", text_data=str(text), steps=1, save_every=1)
    from data.record_types import DataError
    with pytest.raises(DataError, match="max_bad_fraction"):
        train.main(config(tiny, tmp_path / "a", **kw))
    train.main(config(tiny, tmp_path / "b", max_bad_fraction=0.05, **kw))


def test_resume_follows_moved_files_but_not_other_contents(tiny, tmp_path):
    """A path may change (a moved artefacts folder) if what it holds is the same; other scores are refused."""
    import shutil
    moved = tmp_path / "moved_scores.pt"
    shutil.copy(tiny["scores"], moved)
    run = tmp_path / "run"
    train.main(config(tiny, run, loss="prior", steps=4, save_every=2, stop_at=2))
    train.main(config(tiny, run, loss="prior", steps=4, save_every=2, stop_at=3, resume=True, scores=str(moved)))
    import score
    blob = torch.load(moved, weights_only=True)
    blob["p_ref"] = (blob["p_ref"].to(torch.int32) // 2).to(torch.uint16)  # same records and fingerprints, other scores
    atomic_save(blob, str(moved))
    with pytest.raises(ValueError, match="--resume: --scores .* is not the file the run"):
        train.main(config(tiny, run, loss="prior", steps=4, save_every=2, resume=True, scores=str(moved)))
    with pytest.raises(ValueError, match="--init-decoder '' -> "):
        train.main(config(tiny, run, loss="prior", steps=4, save_every=2, resume=True,
                          init_decoder=str(tiny["ref_lm"])))


def test_a_weighting_registered_from_a_test_file_trains(tiny, tmp_path):
    """One extension point: a new --loss is a function registered by name, here from this file alone (no edit to
    packing, checkpoints or flag checks). Its per-token input rides in Sample.inputs / Batch.inputs like p_ref: the
    weights are what it says (tokens of even id 100 times lighter, scaled by 1 + p_ref) and change the run."""
    seen = []

    @train.weighting("test_squared_first_half", inputs={"p_ref": "scores"})
    def squared_first_half(cfg, batch, state):
        seen.append(batch.inputs["p_ref"].shape == batch.labels.shape)
        return (1 + batch.inputs["p_ref"]) * torch.where(batch.labels % 2 == 0, 0.01, 1.0)
    try:
        new = train.main(config(tiny, tmp_path / "new", loss="test_squared_first_half", steps=2, save_every=2))
        ntp = train.main(config(tiny, tmp_path / "ntp", loss="ntp", steps=2, save_every=2))
    finally:
        del train.WEIGHTINGS["test_squared_first_half"]
    assert seen and all(seen)
    assert json.load(open(tmp_path / "new" / "config.json"))["config"]["loss"] == "test_squared_first_half"
    assert not all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), ntp.state_dict().values()))
    assert abs(log_losses(tmp_path / "new" / "log.jsonl")[0] - log_losses(tmp_path / "ntp" / "log.jsonl")[0]) > 1e-3
    with pytest.raises(ValueError, match="no such weighting"):  # gone again: --loss names only what is registered
        train.main(config(tiny, tmp_path / "gone", loss="test_squared_first_half", steps=1))
