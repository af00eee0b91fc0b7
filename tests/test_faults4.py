"""
Issue 30, the second adversarial pass (tests/test_writes.py has the sweep of every script's writes):
A. eval.py --run-dir evaluates what a checkpoint lacks, and refuses another run's eval.json and a folder that is no run;
B. flags that were ignored or misread: --d-model/--n-layer/--n-head against an --init-* model, --init-from with
   --init-decoder, --grad-clip 0 (no clipping), world.generate's ranges, EXIF-rotated JPEGs;
C. mistakes that ended in a traceback, now one line; D. the write helpers (utils.check_out, atomic_write, run).

    .venv/bin/python -m pytest -q tests/test_faults4.py
"""
import errno
import json
import os
import shutil

import pytest
import torch

from utils import UserError, parse_config

SMALL = dict(image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2, n_layer=1, n_head=2, d_model=32,
             batch_size=8, row_len=64, steps=2, warmup=0, save_every=1, device="cpu", lr=3e-3)


def config(tiny, out_dir, **kw):
    import train
    return train.TrainConfig(**{"data": str(tiny["train"]), "tokenizer": str(tiny["tokenizer"]),
                                "out_dir": str(out_dir), **SMALL, **kw})


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Two runs of two checkpoints each (seeds 0 and 1) and a probe folder and an MC file on the tiny images."""
    import train
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train.main(config(tiny, root / f"run{seed}", seed=seed))
    rows = [json.loads(line) for line in open(tiny["train"])][:4]
    os.makedirs(root / "probes")
    for path in (root / "probes" / "colour.jsonl", root / "mine.jsonl"):
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps({"image": str(tiny["root"] / r["image"]), "prompt": "a",
                                    "choices": ["red circle", "blue square"], "answer": 0}) + "\n")
    return root


def fresh_run(runs, tmp_path, seed=0):
    shutil.copytree(runs / f"run{seed}", tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    return str(tmp_path / "run")


# ----------------------------------------------------------------------------- A. eval.py --run-dir

def test_run_dir_evaluates_each_checkpoint_on_what_is_asked_now(runs, tmp_path, monkeypatch):
    """A new --mc (or --bench) on an evaluated run is evaluated for every checkpoint; what is there is not redone."""
    import eval as E
    run, probes, mine = fresh_run(runs, tmp_path), str(runs / "probes"), str(runs / "mine.jsonl")
    rows = E.evaluate_run(run, probes_dir=probes, max_rows=4)
    assert sorted({r["step"] for r in rows}) == [1, 2] and not any(r["benchmark"] == "mine" for r in rows)
    calls = []
    real = E.evaluate_model
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    rows = E.evaluate_run(run, probes_dir=probes, mc_files=[mine], max_rows=4)
    assert json.load(open(os.path.join(run, "eval.json"))) == rows
    assert [c.get("mc_files") for c in calls] == [[mine], [mine]] and not any(c.get("probes_dir") for c in calls)
    for step in (1, 2):
        at = {r["benchmark"]: r for r in rows if r["step"] == step}
        assert {"mine", "mine_norm", "colour", "probe_avg"} <= set(at)
        assert at["mine"]["source"] == f"--mc {os.path.abspath(mine)}" and at["colour"]["source"].startswith("--probes")
        assert at["mine"]["ckpt"] == E.ckpt_fingerprint(os.path.join(run, f"ckpt_{step:06d}.pt"))
    calls.clear()
    assert E.evaluate_run(run, probes_dir=probes, mc_files=[mine], max_rows=4) == rows and calls == []


def test_a_bench_added_later_is_evaluated_for_every_checkpoint(runs, tmp_path, monkeypatch):
    """The same for --bench, its specs together (POPE's splits are pooled); the scoring is stubbed here
    (benchmarks/scoring.py is tested on its own)."""
    import eval as E
    run, probes = fresh_run(runs, tmp_path), str(runs / "probes")
    E.evaluate_run(run, probes_dir=probes, max_rows=4)
    calls = []
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: calls.append(k) or {"pope_f1": 50.0, "mme_perception": 9})
    rows = E.evaluate_run(run, probes_dir=probes, bench=["pope:a.json", "mme:b"], bench_generate=4, max_rows=4)
    assert [(c["bench"], c["bench_generate"]) for c in calls] == [(["pope:a.json", "mme:b"], 4)] * 2
    pope = [r for r in rows if r["benchmark"] == "pope_f1"]
    assert [r["step"] for r in pope] == [1, 2] and pope[0]["source"] == "--bench pope:a.json,mme:b --bench-generate 4"


def test_another_runs_eval_json_is_refused(runs, tmp_path):
    import eval as E
    probes = str(runs / "probes")
    E.evaluate_run(fresh_run(runs, tmp_path / "a", seed=0), probes_dir=probes, max_rows=4)
    other = fresh_run(runs, tmp_path / "b", seed=1)
    shutil.copy(tmp_path / "a" / "run" / "eval.json", other)
    before = open(os.path.join(other, "eval.json")).read()
    with pytest.raises(UserError, match=r"eval.json: its rows of step 1 come from other weights than .*ckpt_000001.pt"):
        E.evaluate_run(other, probes_dir=probes, max_rows=4)
    assert open(os.path.join(other, "eval.json")).read() == before


def test_an_eval_json_left_from_before_overwrite_is_refused(tiny, runs, tmp_path):
    import eval as E
    import train
    run = fresh_run(runs, tmp_path)
    E.evaluate_run(run, probes_dir=str(runs / "probes"), max_rows=4)
    train.main(config(tiny, run, seed=5, overwrite=True))  # a new run in the folder; its old eval.json stays
    with pytest.raises(UserError, match="left from before train.py --overwrite"):
        E.evaluate_run(run, probes_dir=str(runs / "probes"), max_rows=4)


def test_in_process_rows_get_their_checkpoints_fingerprint(runs, tmp_path):
    """experiments/worker.py writes rows through write_rows without a fingerprint: they get the checkpoint's."""
    import eval as E
    run = fresh_run(runs, tmp_path)
    E.write_rows(os.path.join(run, "eval.json"), [{"step": 2, "benchmark": "x", "value": 1.0, "source": "s"}])
    row, = json.load(open(os.path.join(run, "eval.json")))
    assert row["ckpt"] == E.ckpt_fingerprint(os.path.join(run, "ckpt_000002.pt"))


@pytest.mark.parametrize("what", ["file", "missing", "empty"])
def test_a_run_dir_that_is_no_run_is_one_line(runs, tmp_path, what):
    import eval as E
    path = tmp_path / "x"
    if what == "file":
        path.write_text("not a folder")
    elif what == "empty":
        path.mkdir()
    expected = {"file": "is a file", "missing": "is absent", "empty": r"has no ckpt_\*.pt"}[what]
    with pytest.raises(UserError, match=f"--run-dir {path} {expected}"):
        E.evaluate_run(str(path), probes_dir=str(runs / "probes"))


# ----------------------------------------------------------------------------- B. models and flags

@pytest.mark.parametrize("init", ["from", "decoder"])
def test_decoder_sizes_that_disagree_with_the_loaded_model_are_refused(tiny, runs, tmp_path, init):
    import train
    source = {"from": str(runs / "run0" / "ckpt_000002.pt"), "decoder": str(tiny["ref_lm"])}[init]
    kw = {f"init_{init}": source}
    with pytest.raises(UserError, match=f"--d-model 64: the --init-{init} model has d_model 32"):
        train.main(config(tiny, tmp_path / "a", **kw, d_model=64, n_head=4))
    with pytest.raises(UserError, match=f"--n-layer 3: the --init-{init} model has n_layer 1"):
        train.main(config(tiny, tmp_path / "b", **kw, n_layer=3))
    defaults = {k: getattr(train.TrainConfig, k) for k in ("d_model", "n_layer", "n_head")}
    model = train.main(config(tiny, tmp_path / "c", **kw, **defaults, steps=1))  # the defaults: the model's own
    assert model.decoder.cfg.d_model == 32


def test_init_from_with_init_decoder_is_refused(tiny, runs, tmp_path):
    import train
    with pytest.raises(UserError, match="--init-from holds every weight: give it alone, without --init-decoder"):
        train.main(config(tiny, tmp_path / "a", init_from=str(runs / "run0" / "ckpt_000002.pt"),
                          init_decoder=str(tiny["ref_lm"])))
    assert not (tmp_path / "a").exists()


def test_grad_clip_0_is_no_clipping(tiny, tmp_path):
    """--grad-clip 0 used to scale every gradient by 0 (nothing trained): now it trains as an unreachable clip."""
    import train
    from utils import load_checkpoint
    for name, clip in (("none", 0.0), ("huge", 1e9), ("tight", 1e-3)):
        train.main(config(tiny, tmp_path / name, grad_clip=clip, steps=1))
    w = {name: load_checkpoint(str(tmp_path / name / "last.pt"))["model"] for name in ("none", "huge", "tight")}
    assert all(torch.equal(w["none"][k], w["huge"][k]) for k in w["none"])
    assert not all(torch.equal(w["none"][k], w["tight"][k]) for k in w["none"])
    assert "0 = no clipping" in train.TrainConfig.__dataclass_fields__["grad_clip"].metadata["help"]


@pytest.mark.parametrize("argv, message", [
    (["--n-train", "-5"], "--n-train -5: allowed values are an integer >= 1"),
    (["--n-val", "-1"], "--n-val -1: allowed values are an integer >= 0"),
    (["--min-objects", "0"], "--min-objects 0: allowed values are an integer >= 1 and <= 9"),
    (["--n-colours", "2"], "--n-colours 2: allowed values are an integer >= 4"),
    (["--n-shapes", "99"], "--n-shapes 99: allowed values are an integer >= 2 and <= 8"),
    (["--image-share", "1.5"], "--image-share 1.5: allowed values are a finite number >= 0.0 and <= 1.0"),
    (["--pair-prob", "nan"], "--pair-prob nan: allowed values are a finite number"),
    (["--noise-vocab", "0"], "--noise-vocab 0: allowed values are an integer >= 1 and <= 10000"),
])
def test_generate_flags_are_checked(argv, message):
    from world.generate import GenConfig
    with pytest.raises(UserError) as err:
        parse_config(GenConfig, argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_generate_checks_what_ranges_cannot_say_before_writing(tmp_path):
    from world.generate import GenConfig, generate
    for kw in (dict(min_objects=3, max_objects=2), dict(max_objects=6, n_shapes=6), dict(image_share=0.0)):
        with pytest.raises(UserError, match="--min-objects .* <= --max-objects .* < --n-shapes .* and 0 < --image"):
            generate(GenConfig(out=str(tmp_path / "out"), **kw))  # a config built in code is checked too
    assert not (tmp_path / "out").exists()


def test_an_exif_rotated_jpeg_decodes_upright(tmp_path):
    from PIL import Image

    from data.images import load_image
    im = Image.new("RGB", (16, 8), (230, 20, 20))  # stored: red, its left half blue
    im.paste((20, 20, 230), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown turned 90 degrees clockwise, so the stored left is the top
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    x = load_image(str(tmp_path / "photo.jpg"), 16).float()
    top, bottom = x[:, 1:6].mean((1, 2)), x[:, 10:15].mean((1, 2))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2], (top, bottom)


# ----------------------------------------------------------------------------- C. one line, not a traceback

@pytest.mark.parametrize("module, cls, argv, message", [
    ("train", "TrainConfig", ["--patch-size", "7"], "--image-size 48 is not divisible by --patch-size 7"),
    ("train", "TrainConfig", ["--d-model", "34", "--n-head", "2"], "--d-model 34 / --n-head 2 = 17 per head: "
                                                                    "allowed are even head widths"),
    ("reference_lm", "RefConfig", ["--d-model", "30", "--n-head", "2"], "--d-model 30 / --n-head 2 = 15 per head"),
    ("eval", "EvalConfig", ["--bench-generate", "-3"], "--bench-generate -3: allowed values are an integer >= 0"),
])
def test_flags_that_ended_in_a_traceback_are_refused(module, cls, argv, message):
    import importlib
    with pytest.raises(UserError) as err:
        parse_config(getattr(importlib.import_module(module), cls), argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def one_line(capsys, main, cls, argv):
    from utils import run
    with pytest.raises(SystemExit) as done:
        run(main, cls, argv)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_an_unknown_timm_model_is_one_line(tiny, tmp_path, capsys):
    import scale  # noqa: F401 (the timm encoder's plug-in)
    import train
    argv = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--out-dir", str(tmp_path / "r"),
            "--vision", "timm:no_such_model_xyz", "--device", "cpu"]
    assert "timm has no model 'no_such_model_xyz'" in one_line(capsys, train.main, train.TrainConfig, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tiny, tmp_path, capsys):
    import train
    argv = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--out-dir", str(tmp_path / "r"),
            "--device", "cuda"]
    assert "--device cuda: this machine has no CUDA device" in one_line(capsys, train.main, train.TrainConfig, argv)
    assert not (tmp_path / "r").exists()


def test_row_len_beyond_the_init_from_models_context_is_refused(tiny, runs, tmp_path):
    import train
    with pytest.raises(UserError, match="--row-len 512: the --init-from model reads at most 64 tokens"):
        train.main(config(tiny, tmp_path / "r", init_from=str(runs / "run0" / "ckpt_000002.pt"), row_len=512))


def test_instruction_data_without_images_is_one_line(tiny, tmp_path):
    import benchmarks  # noqa: F401 (the instruct plug-in)
    import train
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{"id": i, "conversations": [{"from": "human", "value": "hi"},
                                                            {"from": "gpt", "value": "hello"}]} for i in range(4)]))
    with pytest.raises(UserError, match=f"--data {data}: none of its 4 entries has an image to train on"):
        train.main(config(tiny, tmp_path / "r", data=str(data), instruct=True))


# ----------------------------------------------------------------------------- D. the write helpers

def test_check_out_names_the_flag_and_the_path(tmp_path, monkeypatch):
    from utils import check_out
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    check_out(str(tmp_path / "new" / "deeper" / "out.pt"))  # folders made later: fine
    check_out(str(tmp_path / "folder"), "dir", "--out-dir")
    under_a_file = f"cannot be written: {tmp_path / 'file'} is a file"
    for path, kind, message in ((tmp_path / "folder", "file", "is a folder, not a file"),
                                (tmp_path / "file", "dir", "is a file, not a folder"),
                                (tmp_path / "file" / "out.pt", "file", under_a_file),
                                (tmp_path / "file" / "a" / "b", "dir", under_a_file)):
        with pytest.raises(UserError, match=f"^--flag {path} {message}"):
            check_out(str(path), kind, "--flag")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (as root, only a mock is)
    with pytest.raises(UserError, match=f"--out {tmp_path}/out.pt cannot be written: {tmp_path} is read-only"):
        check_out(str(tmp_path / "out.pt"))


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.ENOTDIR, errno.EISDIR])
def test_a_refused_write_is_one_line_naming_the_file(capsys, code):
    from dataclasses import dataclass

    def main(cfg):
        raise OSError(code, os.strerror(code), "/some/where/out.pt")

    @dataclass
    class Nothing:
        pass
    assert one_line(capsys, main, Nothing, []) == f"error: /some/where/out.pt: {os.strerror(code)}"


@pytest.mark.parametrize("failure", [OSError(errno.EFBIG, "File too large"), RuntimeError("basic_ios::clear: "
                                     "iostream error"), Exception("File too large (os error 27)")])
def test_a_failed_write_leaves_the_old_file_and_no_tmp(tmp_path, failure):
    from utils import atomic_write
    path = tmp_path / "tokenizer.json"
    path.write_text("old")

    def write(tmp):
        open(tmp, "w").close()  # a 0-byte file, then the failure
        raise failure
    with pytest.raises(UserError, match=r"tokenizer.json: .* while saving; the previous file is intact, and no "
                                        r"tokenizer.json.tmp"):
        atomic_write(str(path), write)
    assert os.listdir(tmp_path) == ["tokenizer.json"] and path.read_text() == "old"
    with pytest.raises(KeyError):  # a bug of ours is not a write failure
        atomic_write(str(path), lambda tmp: {}["x"])


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import train

    def full(obj, f):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train.json, "dump", full)
    with pytest.raises(UserError, match=f"--out-dir {tmp_path}: cannot write its lock .*run.lock"):
        train.take_lock(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_log_line_that_cannot_be_written_is_one_line(tmp_path):
    from utils import RunLog
    log = RunLog(str(tmp_path / "log.jsonl"))
    log.file.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(UserError, match=r"log.jsonl: No space left on device while logging; its earlier lines"):
        log.write({"step": 1})
