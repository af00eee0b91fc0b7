"""
Faults of issue 22 ("nothing lost, nothing silently wrong"), one test per case; each fails on the code before it:
scores at the context edge, 16-bit images, one writer per run folder, checked files, a torn log line, broken tar
shards counted by what they lost, flag ranges, one-line errors, and the training alarm's rule.

    .venv/bin/python -m pytest -q tests/test_faults2.py
"""
import io
import json
import os
import types

import pytest
import torch
from PIL import Image

from data import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- 1. scores at the context edge

def test_every_caption_length_up_to_and_past_the_context_gets_one_score_per_label(tiny):
    import score
    from model import load_lm
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    model, _ = load_lm(str(tiny["ref_lm"]), tok)
    ctx = 8
    lengths = list(range(1, ctx + 4))
    samples = [types.SimpleNamespace(caption_ids=[5 + (k % 50) for k in range(n)]) for n in lengths]
    p_ref, _ = score.label_probs(model, samples, ctx, 4, "cpu", progress=False)
    for n, s, p in zip(lengths, samples, p_ref):
        assert len(p) == n + 1, n  # caption tokens, then <|eos|>: exactly ctx tokens too
        seq = [T.BOS] + s.caption_ids + [T.EOS]
        fit = min(n + 1, ctx)  # labels the context holds; the rest are 0 (weight 1, as in NTP)
        with torch.no_grad():
            probs = model.eval()(torch.tensor([seq[:fit]])).softmax(-1)
        probs = probs[0, torch.arange(fit), torch.tensor(seq[1:fit + 1])]
        torch.testing.assert_close(p[:fit], probs, atol=2e-5, rtol=0)
        assert (p[fit:] == 0).all() and (p[:fit] > 0).all()


# ----------------------------------------------------------------------------- 2. 16-bit images

def test_16_bit_greyscale_png_is_converted_by_value():
    import numpy as np
    from data.images import decode_image_bytes
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 25700, dtype=np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert (decode_image_bytes(buf.getvalue(), 6) == 100).all()  # 25700 / 65535 x 255 = 100, not white
    buf = io.BytesIO()
    Image.new("I", (6, 6), 65535).save(buf, format="TIFF")  # 32-bit integer mode, 16-bit values
    assert (decode_image_bytes(buf.getvalue(), 6) == 255).all()
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 0.4, dtype=np.float32)).save(buf, format="TIFF")  # float 0..1
    assert (decode_image_bytes(buf.getvalue(), 6) == 102).all()


# ----------------------------------------------------------------------------- 3. one writer per run folder

def _train_cfg(tiny, out_dir, **kw):
    from test_train import config
    return config(tiny, out_dir, **{"steps": 2, "save_every": 2, **kw})


def test_a_fresh_run_into_a_run_folder_is_refused_unless_resume_or_overwrite(tiny, tmp_path):
    import train
    from lib.cli import UserError
    run = tmp_path / "run"
    train.main(_train_cfg(tiny, run))
    log = (run / "log.jsonl").read_text()
    with pytest.raises(UserError, match=r"--out-dir .*run holds another run \(config.json, log.jsonl, last.pt, \.\.\.\)"):
        train.main(_train_cfg(tiny, run, seed=1))
    assert (run / "log.jsonl").read_text() == log  # nothing appended, nothing overwritten
    train.main(_train_cfg(tiny, run, seed=1, steps=1, save_every=1, overwrite=True))
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # the old run's files are gone
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_000001.pt"]


def test_resume_without_last_pt_is_refused(tiny, tmp_path):
    import train
    from lib.cli import UserError
    with pytest.raises(UserError, match=r"--resume: no last.pt in .*nowhere to continue from"):
        train.main(_train_cfg(tiny, tmp_path / "nowhere", resume=True))
    assert not (tmp_path / "nowhere").exists()
    train.main(_train_cfg(tiny, tmp_path / "job", resume=True, overwrite=True))  # a restartable job's first start
    assert (tmp_path / "job" / "last.pt").exists()


def test_run_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    from lib.checkpoint import LOCK, release_lock, take_lock
    from lib.cli import UserError
    here = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": live.pid, "host": here}))
        with pytest.raises(UserError, match=f"in use by process {live.pid} on {here}"):
            take_lock(str(tmp_path))
    finally:
        live.kill()
        live.wait()
    path = take_lock(str(tmp_path))  # its holder is gone (killed: no exit handler ran): stale
    assert f"left by process {live.pid}, which is gone" in capsys.readouterr().out
    assert json.loads(open(path).read()) == {"pid": os.getpid(), "host": here}
    assert take_lock(str(tmp_path)) == path  # this process's own
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(UserError, match=f"in use by process 1 on elsewhere .*delete {path}"):
        take_lock(str(tmp_path))
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": here}))
    release_lock(path)
    assert not os.path.exists(path)


def test_a_second_writer_while_a_run_holds_the_folder_is_refused(tiny, tmp_path):
    import subprocess
    import sys
    import train
    from lib.checkpoint import LOCK
    from lib.cli import UserError
    run = tmp_path / "run"
    train.main(_train_cfg(tiny, run, steps=1, save_every=1, stop_at=1))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another process on this host holds the lock (as a run started with --resume would)
        (run / LOCK).write_text(json.dumps({"pid": live.pid, "host": __import__("socket").gethostname()}))
        before = (run / "last.pt").read_bytes()
        with pytest.raises(UserError, match=f"in use by process {live.pid}"):
            train.main(_train_cfg(tiny, run, steps=1, save_every=1, resume=True))
        assert (run / "last.pt").read_bytes() == before
    finally:
        live.kill()
        live.wait()
