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
    from data.images import load_image
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 25700, dtype=np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert (load_image(io.BytesIO(buf.getvalue()), 6) == 100).all()  # 25700 / 65535 x 255 = 100, not white
    buf = io.BytesIO()
    Image.new("I", (6, 6), 65535).save(buf, format="TIFF")  # 32-bit integer mode, 16-bit values
    assert (load_image(io.BytesIO(buf.getvalue()), 6) == 255).all()
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 0.4, dtype=np.float32)).save(buf, format="TIFF")  # float 0..1
    assert (load_image(io.BytesIO(buf.getvalue()), 6) == 102).all()


# ----------------------------------------------------------------------------- 3. one writer per run folder

def _train_cfg(tiny, out_dir, **kw):
    from test_train import config
    return config(tiny, out_dir, **{"steps": 2, "save_every": 2, **kw})


def test_a_fresh_run_into_a_run_folder_is_refused_unless_resume_or_overwrite(tiny, tmp_path):
    import train
    from utils import UserError
    run = tmp_path / "run"
    train.main(_train_cfg(tiny, run))
    log = (run / "log.jsonl").read_text()
    refused = r"--out-dir .*run holds another run \(config.json, log.jsonl, last.pt, \.\.\.\)"
    with pytest.raises(UserError, match=refused):
        train.main(_train_cfg(tiny, run, seed=1))
    assert (run / "log.jsonl").read_text() == log  # nothing appended, nothing overwritten
    train.main(_train_cfg(tiny, run, seed=1, steps=1, save_every=1, overwrite=True))
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # the old run's files are gone
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_000001.pt"]


def test_resume_without_last_pt_is_refused(tiny, tmp_path):
    import train
    from utils import UserError
    with pytest.raises(UserError, match=r"--resume: no last.pt in .*nowhere to continue from"):
        train.main(_train_cfg(tiny, tmp_path / "nowhere", resume=True))
    assert not (tmp_path / "nowhere").exists()
    train.main(_train_cfg(tiny, tmp_path / "job", resume=True, overwrite=True))  # a restartable job's first start
    assert (tmp_path / "job" / "last.pt").exists()


def test_run_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys
    from train import LOCK, release_lock, take_lock
    from utils import UserError
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
    from train import LOCK
    from utils import UserError
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


# ----------------------------------------------------------------------------- 4. damaged files are refused on load

def flip_inside(path, tensor):
    """Flip one byte in the middle of `tensor`'s stored bytes in the torch.save'd file at `path`."""
    data, raw = bytearray(open(path, "rb").read()), tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0
    data[at + len(raw) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def test_a_checkpoint_with_a_flipped_byte_is_refused(tmp_path):
    from utils import UserError
    from utils import load_checkpoint, safe_load
    path = str(tmp_path / "ckpt.pt")
    w = torch.arange(4096, dtype=torch.float32)
    torch.save({"model": {"w": w}, "model_config": {}, "step": 1}, path)
    assert torch.equal(load_checkpoint(path, "vlm")["model"]["w"], w)
    flip_inside(path, w)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], w)  # torch itself loads it
    with pytest.raises(UserError, match=r"ckpt.pt: damaged: its member .*data/0 fails the zip CRC check"):
        load_checkpoint(path, "vlm")
    with pytest.raises(UserError, match="fails the zip CRC check"):
        safe_load(path, path, "a ViT encoder")


def test_a_damaged_reference_lm_or_score_file_is_refused(tiny, tmp_path):
    import shutil
    from data.record_types import DataError
    from data.records import read_records
    from data.scores import load_scores
    from utils import UserError
    from utils import text_fingerprint
    from model import load_lm
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    ref = tmp_path / "ref.pt"
    shutil.copy(tiny["ref_lm"], ref)
    flip_inside(ref, max(torch.load(ref, weights_only=True)["model"].values(), key=torch.numel))
    with pytest.raises(UserError, match="ref.pt: damaged"):
        load_lm(str(ref), tok)
    scores = tmp_path / "scores.pt"
    shutil.copy(tiny["scores"], scores)
    flip_inside(scores, torch.load(scores, weights_only=True)["p_ref"])
    with pytest.raises(DataError, match="scores.pt: damaged"):
        load_scores(str(scores), T.fingerprint(tok), text_fingerprint(read_records(str(tiny["train"]))))


def test_a_damaged_feature_cache_file_is_computed_again(tmp_path):
    from scale.features import encoder_features, feature_key
    from test_features import images, small_encoder
    enc, x = small_encoder(), images()
    feats = encoder_features(enc, x, str(tmp_path)).clone()
    path = tmp_path / f"{feature_key(enc, x, 'cpu')}.pt"
    flip_inside(path, feats)
    messages = []
    assert torch.equal(encoder_features(enc, x, str(tmp_path), log=messages.append), feats)
    assert "computing it again" in messages[0]


def test_score_ids_moved_between_records_are_refused(tiny, tmp_path):
    from data.record_types import DataError
    from data.records import read_records
    from data.scores import load_scores
    from utils import text_fingerprint
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    data_fp = text_fingerprint(read_records(str(tiny["train"])))
    blob = torch.load(tiny["scores"], weights_only=True)
    off = blob["offsets"].tolist()
    lengths = [b - a for a, b in zip(off[:-1], off[1:])]
    i = 0
    j = next(k for k in range(1, len(lengths)) if lengths[k] == lengths[i])  # two records of one length
    ids = list(blob["ids"])
    ids[i], ids[j] = ids[j], ids[i]
    torch.save({**blob, "ids": ids}, tmp_path / "edited.pt")  # a hand edit: a valid zip, lengths still fit
    assert len(load_scores(str(tiny["scores"]), T.fingerprint(tok), data_fp)) == len(ids)
    with pytest.raises(DataError, match="edited.pt: its record ids are not those score.py wrote"):
        load_scores(str(tmp_path / "edited.pt"), T.fingerprint(tok), data_fp)


@pytest.mark.parametrize("failure", ["enospc", "torch"])
def test_a_full_disk_while_saving_says_so_and_leaves_no_tmp(tmp_path, monkeypatch, failure):
    import errno
    import utils as U
    from utils import UserError
    path = str(tmp_path / "last.pt")
    U.atomic_save({"step": 1}, path)
    real = torch.save

    def full(obj, f):  # what a full disk does: part of the file, then an error
        open(f, "wb").write(b"PK\x03\x04 half a file")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 52")
    monkeypatch.setattr(U.torch, "save", full)
    with pytest.raises(UserError, match=r"last.pt: no space left on the device .* the previous file is intact"):
        U.atomic_save({"step": 2}, path)
    monkeypatch.setattr(U.torch, "save", real)
    assert os.listdir(tmp_path) == ["last.pt"] and torch.load(path, weights_only=True) == {"step": 1}


# ----------------------------------------------------------------------------- 5. half a line in log.jsonl

def test_resume_after_half_a_log_line(tiny, tmp_path):
    import train
    from train import trim_log
    from scale.alarm import past_ntp
    run = tmp_path / "run"
    train.main(_train_cfg(tiny, run, steps=4, save_every=2, stop_at=2))
    with open(run / "log.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": 4.1, "ntp": 4.\xc3')  # a full disk while logging step 3: half a line
    assert len(past_ntp(str(run / "log.jsonl"), 3)[0]) == 2
    train.main(_train_cfg(tiny, run, steps=4, save_every=2, resume=True))
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == [1, 2, 3, 4]
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 2}\n{"step": 3}\n[]\n')  # torn in the middle, a list
    trim_log(str(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


# ----------------------------------------------------------------------------- 6. broken tar shards

def test_a_broken_shard_counts_as_a_lost_shard_not_one_record(tmp_path, capfd):
    import tarfile
    from data.record_types import DataError
    from data.records import read_records
    from test_faults import good_samples, write_shard
    for s in range(2):
        write_shard(tmp_path / f"{s:06d}.tar", good_samples(100, 100 * s))
    (tmp_path / "000002.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match=r"1 of 3 shards are broken \(33.33% of the shards, more than max_bad_"):
        read_records(tmp_path)  # was: "skipped 1 of 201", and training on two thirds of the data
    (tmp_path / "000002.tar").unlink()
    full = (tmp_path / "000001.tar").read_bytes()
    with tarfile.open(tmp_path / "000001.tar") as tf:
        at = tf.getmember("000150.png").offset
    (tmp_path / "000001.tar").write_bytes(full[:at] + b"\x07" * 512 + full[at + 512:])  # a corrupt header
    with pytest.raises(DataError, match="1 of 2 shards are broken .*000001.tar: no end-of-archive marker"):
        read_records(tmp_path)
    assert len(read_records(tmp_path, max_bad_fraction=0.5)) == 150
    assert "1 of 2 shards are broken" in capfd.readouterr().err
