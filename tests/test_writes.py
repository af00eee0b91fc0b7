"""Issue 30.D-E: every script that writes checks its output path before its long work, and a write that fails leaves
nothing half-written. Each script entry point runs as a subprocess three ways:

    read-only   its output under a folder it may not write to (chmod 0o555; as root, which ignores permissions, under
                a file instead, where no folder can be made)
    full disk   every write past 64 bytes fails (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG, as a full disk's ENOSPC)
    wrong kind  a folder where it writes a file, or a file where it writes a folder

and must end with exit code 2 and one line on stderr (progress bars aside), every file that was there before as it
was (byte for byte), no temporary file and no new empty one. The 36 runs go four at a time (under a minute on two
cores).

    .venv/bin/python -m pytest -q tests/test_writes.py
"""
import concurrent.futures
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from utils import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 64  # bytes: every real output is larger
VLM = ["--steps", "1", "--warmup", "0", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
       "--vit-dim", "32", "--vit-depth", "1", "--vit-heads", "2", "--row-len", "64", "--device", "cpu"]
MODES = ("read-only", "full-disk", "wrong-kind")


def scripts(t, made):
    """name: (argv before the output flag, the output flag, "file" or "dir" at the output path)."""
    return {
        "train": (["train.py", "--data", t["train"], "--tokenizer", t["tokenizer"], *VLM], "--out-dir", "dir"),
        "eval": (["eval.py", "--probes", made["probes"], "--device", "cpu"], "--run-dir", "eval.json"),
        "score": (["score.py", "--ref", t["ref_lm"], "--tokenizer", t["tokenizer"], "--data", t["train"],
                   "--row-len", "64", "--device", "cpu"], "--out", "file"),
        "reference_lm": (["reference_lm.py", "--data", t["ref"], "--tokenizer", t["tokenizer"], "--steps", "1",
                          "--warmup", "0", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--row-len", "64",
                          "--batch-rows", "4", "--device", "cpu"], "--out", "file"),
        "world.generate": (["-m", "world.generate", "--workers", "0", *(x for k in ("ref", "text", "label", "train",
                           "val", "test") for x in (f"--n-{k}", "3")), "--n-probe", "2", "--n-probe-val", "2"],
                          "--out", "dir"),
        "data.tokenizer": (["-m", "data.tokenizer", "--data", t["ref"], "--vocab-size", "300"], "--out", "file"),
        "scale.shards": (["-m", "scale.shards", "--data", t["train"]], "--out", "dir"),
        "scale.export": (["-m", "scale.export", "--ckpt", made["ckpt"]], "--out", "dir"),
        "tools.vision": (["-m", "tools.vision", "--data", t["train"], "--steps", "1", "--warmup", "0", "--batch-size",
                          "4", "--vit-dim", "32", "--vit-depth", "1", "--vit-heads", "2", "--eval-every", "0",
                          "--device", "cpu"], "--out", "file"),
        "benchmarks.qa": (["-m", "benchmarks.qa", "--data", made["scenes"]], "--out", "file"),
        "baselines.attention": (["-m", "baselines.attention", "--data", t["train"], "--tokenizer", t["tokenizer"],
                                 "--steps", "1", "--batch-size", "4", "--d-model", "32", "--vit-dim", "32",
                                 "--vit-depth", "1", "--vit-heads", "2", "--device", "cpu"], "--out", "file"),
        "experiments.main": (["-m", "experiments.main", "--preset", "smoke", "--stage", "prepare"], "--out", "dir"),
    }


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    """A trained run (two checkpoints) evaluated on an MC file (eval.json), its export, a probe folder and a
    generator-style scene file."""
    import eval as E
    import train
    from scale.export import export_vlm
    root = tmp_path_factory.mktemp("made")
    argv = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), *VLM, "--steps", "2",
            "--save-every", "1", "--out-dir", str(root / "run")]
    train.main(parse_config(train.TrainConfig, argv))
    export_vlm(str(root / "run" / "ckpt_000002.pt"), str(root / "export"))
    rows = [json.loads(line) for line in open(tiny["train"])][:4]
    os.makedirs(root / "probes")
    with open(root / "probes" / "colour.jsonl", "w") as f, open(root / "scenes.jsonl", "w") as g:
        for r in rows:
            f.write(json.dumps({"image": str(tiny["root"] / r["image"]), "prompt": "a",
                                "choices": ["red circle", "blue square"], "answer": 0}) + "\n")
            scene = [{**o, "row": "middle", "col": "center"} for o in r["scene"]]  # the generator's position words
            g.write(json.dumps({**r, "image": str(tiny["root"] / r["image"]), "scene": scene}) + "\n")
    shutil.copy(root / "probes" / "colour.jsonl", root / "mine.jsonl")
    E.evaluate_run(str(root / "run"), mc_files=[str(root / "mine.jsonl")])  # --probes is still to do
    return {"root": root, "run": str(root / "run"), "ckpt": str(root / "run" / "ckpt_000001.pt"),
            "export": str(root / "export"), "probes": str(root / "probes"), "scenes": str(root / "scenes.jsonl")}


def snapshot(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def prepare(name, mode, kind, made, d):
    """(the output path to give, the folder to set read-only or None) for one case, in the empty folder d."""
    with open(d / "notes.txt", "w") as f:
        f.write("a file of the user's, beside the output\n")
    if name == "eval":  # the output is --run-dir's eval.json
        run = shutil.copytree(made["run"], str(d / "run"))  # its eval.json has --mc rows: --probes is to do
        if mode == "wrong-kind":
            os.remove(os.path.join(run, "eval.json"))
            os.makedirs(os.path.join(run, "eval.json", "inside"))
        return run, run if mode == "read-only" else None
    out = d / ("ro" if mode == "read-only" else ".") / ("out" if kind == "dir" else "out.bin")
    if mode == "read-only":
        os.makedirs(out.parent)
        return str(out), str(out.parent)
    if mode == "full-disk" and name == "scale.export":  # an earlier export stays whole
        shutil.copytree(made["export"], out)
    elif mode == "full-disk" and kind == "file":
        out.write_bytes(b"the previous output, to be left as it was\n" * 4)
    elif mode == "full-disk":
        os.makedirs(out)
        (out / "old.txt").write_text("an older file in the output folder\n")
    elif kind == "file":  # wrong kind: a folder where the file goes
        os.makedirs(out / "inside")
        (out / "inside" / "keep.txt").write_text("keep me\n")
    else:  # wrong kind: a file where the folder goes
        out.write_text("a file where a folder is wanted\n")
    return str(out), None


def full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run_case(name, mode, spec, made, d):
    argv, flag, kind = spec
    out, read_only = prepare(name, mode, kind, made, d)
    fallback = False
    if read_only:
        os.chmod(read_only, 0o555)
        if os.access(read_only, os.W_OK):  # root: permissions do not bind it; a path under a file cannot be made
            os.chmod(read_only, 0o755)
            (d / "blocker").write_text("a file where the output's folder would go\n")
            out, fallback = str(d / "blocker" / os.path.basename(out)), True
    before = snapshot(d)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRIOR_DEBUG": ""}
    try:
        done = subprocess.run([sys.executable, *argv, flag, out], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=env, preexec_fn=full_disk if mode == "full-disk" else None)
    finally:
        if read_only:
            os.chmod(read_only, 0o755)
    return {"done": done, "before": before, "after": snapshot(d), "fallback": fallback}


@pytest.fixture(scope="module")
def results(tiny, made, tmp_path_factory):
    t = {k: str(v) for k, v in tiny.items()}
    cases = [(name, mode, spec) for name, spec in scripts(t, made).items() for mode in MODES]
    root = tmp_path_factory.mktemp("writes")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {(name, mode): pool.submit(run_case, name, mode, spec, made, root / f"{name}-{mode}")
                   for name, mode, spec in cases if not os.makedirs(root / f"{name}-{mode}")}
        out = {k: f.exception() or f.result() for k, f in futures.items()}
    return out


def message_lines(stderr):
    """stderr's lines less tqdm's progress bars (a failed save at the end of a run follows its bar)."""
    return [x for x in re.split(r"[\r\n]+", stderr.strip()) if x.strip() and not re.search(r"\d+%\||it/s\]", x)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(scripts({k: "" for k in ("train", "tokenizer", "ref_lm", "ref")},
                                              {k: "" for k in ("probes", "ckpt", "scenes")})))
def test_a_script_that_cannot_write_says_so_in_one_line_and_changes_nothing(results, name, mode):
    r = results[name, mode]
    if isinstance(r, Exception):
        raise r
    done, before, after = r["done"], r["before"], r["after"]
    lines = message_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert not changed, f"changed or removed: {changed}; {lines}"
    new = set(after) - set(before)
    assert not [p for p in new if "tmp" in os.path.basename(p)], f"temporary files left: {new}"
    assert not [p for p in new if not after[p] and not p.endswith((".log", "log.jsonl"))], f"empty files: {new}"
    if mode == "read-only" or mode == "wrong-kind":  # refused before any long work: nothing new at all
        assert not new, new
