"""
Faults and bad input: every one gives a clear error naming the file and the problem, or a counted skip;
never a bare traceback from deep inside a library, never a silent loss.

    .venv/bin/python -m pytest -q tests/test_faults.py

Covers: truncated, corrupt and zero-byte images (in a folder and inside tar shards), zero-byte data and
score files, non-UTF-8 and over-long captions, a tar shard cut off mid-member or at a member boundary,
a score file cut short, NaN / out-of-range / wrongly typed scores, a process SIGKILLed while writing a
checkpoint (the previous one still loads, and `train.py --resume` goes on), and a checkpoint or score file
whose pickle would run code when loaded.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

from data import tokenizer as T
from data.records import read_records
from data.images import load_images
from data.record_types import DataError
from data.scores import load_scores
from scale.stream import StreamedImages  # importing scale registers its tar-shard reader
from utils import atomic_save, load_checkpoint, text_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from test_records import png_bytes, write_shard  # noqa: E402  (tests/ is on sys.path under pytest)


def good_samples(n, start=0):
    return [(f"{i:06d}", {"png": png_bytes(), "txt": f"caption {i}".encode()}) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- images and captions

def test_bad_images_and_captions_in_a_shard_are_counted(tmp_path, capfd):
    data = png_bytes()
    samples = good_samples(20) + [
        ("bad01", {"png": data[: len(data) // 2], "txt": b"truncated image"}),
        ("bad02", {"png": b"not an image at all", "txt": b"corrupt image"}),
        ("bad03", {"png": b"", "txt": b"zero-byte image"}),
        ("bad04", {"png": data, "txt": b"caf\xe9"}),                        # latin-1, not UTF-8
        ("bad05", {"png": data}),                                           # no caption member
        ("bad06", {"txt": b"no image"}),                                    # no image member
        ("bad07", {"png": data, "json": b'{"caption": '}),                  # broken json member
        ("bad08", {"png": data, "txt": b"   "}),                            # empty caption
    ]
    shard = write_shard(tmp_path / "000000.tar", samples)
    # Reading records does not decode pixels (as for JSONL): the image problems show up at decoding.
    recs = read_records(shard, max_bad_fraction=0.5)
    assert len(recs) == 23
    err = capfd.readouterr().err
    for reason in ("non-UTF-8 caption x 1", "missing caption member x 1", "missing image member x 1",
                   "broken json member x 1", "empty caption x 1"):
        assert reason in err, reason
    kept, imgs = load_images(recs, 4, max_bad_fraction=0.5)
    assert len(kept) == 20 and "cannot decode image x 3" in capfd.readouterr().err
    with pytest.raises(DataError, match=r"5 of 28 records are bad .* max_bad_fraction"):
        read_records(shard)  # default 1%
    # train.py --stream decodes a member when its batch comes: each undecodable image is a black image, warned and
    # counted (StreamedImages.bad), the good ones are load_images' pixels
    capfd.readouterr()
    streamed = StreamedImages(recs, 4)
    got = streamed[range(len(recs))]
    black = [r.id for r, image in zip(recs, got) if not image.any()]
    assert black == ["bad01", "bad02", "bad03"] and streamed.bad == 3
    assert torch.equal(got[:20], imgs)
    err = capfd.readouterr().err
    assert all(f"--stream: record {k}: cannot decode image" in err for k in black)


def test_zero_byte_files(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(DataError, match="empty.json: not a valid UTF-8 JSON file"):
        read_records(tmp_path / "empty.json")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="1 of 1 shards are broken") as err:
        read_records(tmp_path / "empty.tar")
    assert "unreadable shard" in str(err.value) and "empty.tar" in str(err.value)
    (tmp_path / "scores.pt").write_bytes(b"")
    with pytest.raises(DataError, match="scores.pt: cannot read it as a score file"):
        load_scores(str(tmp_path / "scores.pt"), "tok", "data")


def test_one_unreadable_shard_among_many_is_skipped_and_counted(tmp_path, capfd):
    for s in range(3):
        write_shard(tmp_path / f"{s:06d}.tar", good_samples(40, 40 * s))
    (tmp_path / "000003.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(DataError, match=r"1 of 4 shards are broken \(25.00% of the shards, more than max_bad_fraction"):
        read_records(tmp_path)  # a quarter of the data lost: refused, though it is 1 record of 121
    assert len(read_records(tmp_path, max_bad_fraction=0.25)) == 120
    err = capfd.readouterr().err
    assert "skipped 1 of 121 records" in err and "unreadable shard x 1" in err and "000003.tar" in err
    assert "1 of 4 shards are broken" in err


# ----------------------------------------------------------------------------- tar shards cut off

def test_shard_cut_off_mid_member_or_at_a_boundary(tmp_path, capfd):
    full = write_shard(tmp_path / "full.tar", good_samples(200)).read_bytes()
    # Mid-member: inside the 51st sample's image. Everything before is kept, the cut is counted.
    with tarfile.open(tmp_path / "full.tar") as tf:
        member = tf.getmember("000050.png")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[: member.offset_data + 10])
    recs = read_records(cut, max_bad_fraction=1.0)  # its only shard is broken: 100% of the shards
    assert [r.id for r in recs] == [f"{i:06d}" for i in range(50)]
    err = capfd.readouterr().err
    assert "shard cut off mid-member x 1" in err and "cut.tar" in err
    with pytest.raises(DataError, match="cut.tar: 1 of 1 shards are broken"):
        read_records(cut)  # over 1%: refused, not trained on quietly
    streamed = StreamedImages(recs, 4)  # what --stream reads of it: the 50 samples before the cut, every one whole
    assert torch.equal(streamed[range(50)], load_images(recs, 4)[1]) and streamed.bad == 0
    # At a member boundary: tarfile itself would stop quietly; the missing end-of-archive marker is counted.
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(full[: member.offset])  # ends right after sample 49's last member
    recs = read_records(boundary, max_bad_fraction=1.0)
    assert len(recs) == 50
    err = capfd.readouterr().err
    assert "no end-of-archive marker x 1" in err and "anything after is lost" in err
    # The last member cut short (no header after it to trip over) is caught too.
    last = tmp_path / "last.tar"
    with tarfile.open(tmp_path / "full.tar") as tf:
        final = tf.getmember("000199.txt")
    last.write_bytes(full[: final.offset_data + 3])
    recs = read_records(last, max_bad_fraction=1.0)
    assert len(recs) == 199 and "shard cut off mid-member x 1" in capfd.readouterr().err


# ----------------------------------------------------------------------------- over-long captions

def test_overlong_caption_truncation_in_training_is_reported(tiny, tmp_path, capfd):
    """train.py keeps the start of a caption longer than a row (pack(truncate=True)) and says so."""
    import train
    rows = [json.loads(l) for l in open(tiny["train"])][:8]
    rows[0]["caption"] = " ".join(["stock photo : a red circle by ann"] * 12)  # ~80 tokens, rows hold 64
    for r in rows:
        r["image"] = str(tiny["root"] / r["image"])
        r.pop("tags", None)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(train.TrainConfig(data=str(data), tokenizer=str(tiny["tokenizer"]), out_dir=str(tmp_path / "run"),
                                 image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2, n_layer=1,
                                 n_head=2, d_model=32, batch_size=8, row_len=64, steps=1, warmup=1, save_every=1,
                                 device="cpu", loss="ntp"))
    err = capfd.readouterr().err
    assert "1 of 8 image-caption samples are longer than --row-len 64" in err, err


# ----------------------------------------------------------------------------- damaged score files

def _tiny_fps(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    return T.fingerprint(tok), text_fingerprint(read_records(str(tiny["train"])))


def test_score_file_cut_short(tiny, tmp_path):
    data = open(tiny["scores"], "rb").read()
    cut = tmp_path / "scores.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{cut}: cannot read it as a score file .* cut short"):
        load_scores(str(cut), *_tiny_fps(tiny))


def _hand_made(path, p_ref, offsets=None, ids=("a", "b")):
    fp = {"tokenizer": "tok", "data": "data"}
    offsets = torch.tensor([0, 2, len(p_ref)]) if offsets is None else offsets
    torch.save({"ids": list(ids), "offsets": offsets, "p_ref": p_ref, "fingerprint": fp}, path)
    return str(path)


def test_nan_or_out_of_range_scores(tmp_path):
    ok = load_scores(_hand_made(tmp_path / "ok.pt", torch.tensor([0.5, 0.25, 1.0, 0.0])), "tok", "data")
    assert ok["a"].tolist() == [0.5, 0.25] and ok["b"].tolist() == [1.0, 0.0]  # float files are accepted
    for values, first in (([0.5, 0.2, float("nan"), 0.1], "nan"), ([0.5, 1.5, 0.3, 0.1], "1.5"),
                          ([0.5, 0.2, 0.3, -0.1], "-0.1"), ([0.5, 0.2, float("inf"), 0.1], "inf")):
        path = _hand_made(tmp_path / "bad.pt", torch.tensor(values))
        with pytest.raises(DataError,
                           match=rf"bad.pt: 1 scores are NaN, infinite or outside \[0, 1\] \(first: {first}"):
            load_scores(path, "tok", "data")
    with pytest.raises(DataError, match="record 'b'"):
        load_scores(_hand_made(tmp_path / "bad.pt", torch.tensor([0.5, 0.2, 7.0, 0.1])), "tok", "data")
    with pytest.raises(DataError, match="dtype torch.int64"):
        load_scores(_hand_made(tmp_path / "int.pt", torch.tensor([1, 2, 3, 4])), "tok", "data")
    with pytest.raises(DataError, match="offsets do not fit 2 records and 4 scores"):
        load_scores(_hand_made(tmp_path / "off.pt", torch.zeros(4), torch.tensor([0, 3, 9])), "tok", "data")
    with pytest.raises(DataError, match="appear more than once"):
        load_scores(_hand_made(tmp_path / "dup.pt", torch.zeros(4), ids=("a", "a")), "tok", "data")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt: not a score file"):
        load_scores(str(tmp_path / "other.pt"), "tok", "data")


# ----------------------------------------------------------------------------- crashes while saving

SAVER = """
import sys, torch
from utils import atomic_save
x = torch.empty(16 * 2**20)  # 64 MB: each save takes a while, so the kill lands mid-write
i = 0
while True:
    x.fill_(i)
    atomic_save({"i": i, "x": x}, sys.argv[1])
    i += 1
"""


def test_sigkill_during_atomic_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    tmp = str(path) + ".tmp"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:  # first save complete
            time.sleep(0.01)
        assert path.exists(), "the saver never finished a first save"
        while not os.path.exists(tmp) and time.time() < deadline:  # the next save is under way
            time.sleep(0.001)
        time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(str(path))  # the last complete save, whole
    assert torch.equal(state["x"], torch.full_like(state["x"], state["i"]))
    atomic_save({"i": -1}, str(path))  # a leftover .tmp does not get in the way of the next save
    assert load_checkpoint(str(path))["i"] == -1


def test_train_killed_while_checkpointing_resumes(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tiny["train"]),
            "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]), "--loss", "prior",
            "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2",
            "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8", "--row-len", "64",
            "--device", "cpu", "--out-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    errors = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: a full pipe would stall the trainer
    proc = subprocess.Popen(args + ["--threads", "1", "--steps", "100000", "--save-every", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.time() + 120
        log = run / "log.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        # Every step saves last.pt: wait until one is being written, then kill.
        while not (run / "last.pt.tmp").exists() and time.time() < deadline:
            time.sleep(0.0005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        errors.close()
    state = load_checkpoint(str(run / "last.pt"))
    step = state["step"]
    assert step >= 2  # the log had 3 steps; the kill may have hit step 3's save, leaving step 2's whole
    # The same command line with --resume, run in this process (train.py's own argument parsing; no second
    # interpreter start-up): it must go on from the surviving checkpoint.
    import train
    from utils import parse_config
    train.main(parse_config(train.TrainConfig, args[2:] + ["--steps", "100000", "--save-every", "1", "--resume",
                                                           "--stop-at", str(step + 2)]))
    assert f"resumed from {run / 'last.pt'} at step {step}" in capsys.readouterr().out
    assert load_checkpoint(str(run / "last.pt"))["step"] == step + 2


# ----------------------------------------------------------------------------- untrusted pickles

class Exploit:
    """Unpickling this object runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_untrusted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "payload": Exploit(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil.pt: holds Python objects that a safe \(weights-only\) load "
                                         r"refuses .* not loaded"):
        load_checkpoint(str(evil))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"evil.pt: holds Python objects that a safe \(weights-only\) load refuses "
                                        r"\(.*GLOBAL posix.system.*\).* not loaded"):
        load_scores(str(evil), "tok", "data")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # proof that the file is dangerous: an unsafe load runs it
    assert marker.exists()


def test_untrusted_vision_weights_get_the_safe_load_message(tmp_path):
    """--vision-weights goes through the same safe load: the project's message, never torch's advice to retry
    with weights_only=False."""
    from scale.timm_encoder import load_vision_weights
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Exploit(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil.pt: holds Python objects that a safe \(weights-only\) load "
                                         r"refuses") as err:
        load_vision_weights(None, str(evil))
    assert "weights_only=False" not in str(err.value) and not marker.exists()
