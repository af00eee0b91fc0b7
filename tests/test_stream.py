"""train.py --stream (scale/stream.py): images decoded per batch from image files or tar shards.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_stream.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from data.images import load_images
from data.records import read_records
from scale.shards import write_shards
from scale.stream import StreamedImages
from tests.test_train import ROOT, config, weights


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory):
    """tiny's train.jsonl as 3 tar shards (16 samples each), in the same order."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(read_records(str(tiny["train"])), str(out), per_shard=16)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_images_are_the_decoded_ones(tiny, shards, workers):
    for source in (str(tiny["train"]), f"{shards}/"):  # image files, and members of tar shards
        records = read_records(source)
        kept, decoded = load_images(records, 16)
        streamed = StreamedImages(records, 16, workers)
        assert len(kept) == len(streamed) == 48 and streamed.shape == tuple(decoded.shape)
        idx = torch.tensor([47, 3, 3, 20, 0])
        assert torch.equal(streamed[idx], decoded[idx]) and torch.equal(streamed[5:9], decoded[5:9])
        streamed.close()
    tar = read_records(f"{shards}/")
    assert [r.id for r in tar] == [r.id for r in read_records(str(tiny["train"]))]
    assert tar[0].image_span is not None  # a byte span inside the shard: nothing was decoded to list them


def test_stream_trains_the_same_batches_as_in_memory(tiny, shards, tmp_path):
    """Same order (global_batch by seed and step), same pixels: the same run, bit for bit, from tar shards."""
    a = train.main(config(tiny, tmp_path / "memory", loss="prior", steps=3))
    b = train.main(config(tiny, tmp_path / "stream", loss="prior", steps=3, stream=True, data=f"{shards}/"))
    assert isinstance(b is not None and b, torch.nn.Module)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    la, lb = ([json.loads(x)["loss"] for x in open(tmp_path / r / "log.jsonl")] for r in ("memory", "stream"))
    assert la == lb
    with pytest.raises(ValueError, match="--stream decodes per batch"):
        train.main(config(tiny, tmp_path / "x", stream=True, image_cache=str(tmp_path / "c.u8")))


def test_sigkill_mid_stream_then_resume_equals_an_uninterrupted_run(tiny, shards, tmp_path):
    args = ["--data", f"{shards}/", "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
            "--loss", "prior", "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1",
            "--vit-heads", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8",
            "--row-len", "64", "--steps", "16", "--save-every", "1", "--warmup", "2", "--device", "cpu",
            "--threads", "1", "--stream", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out, *extra):
        return [sys.executable, "-m", "scale", "train", *args, "--out-dir", str(out), *extra]

    done = subprocess.run(command(tmp_path / "straight"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = tmp_path / "killed" / "log.jsonl"
    proc = subprocess.Popen(command(tmp_path / "killed"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding workers, mid-stream
    proc.wait()
    stopped = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"]
    assert 1 <= stopped < 16, "the run finished before it could be killed"
    done = subprocess.run(command(tmp_path / "killed", "--resume"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "killed" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = ([json.loads(x)["loss"] for x in open(p / "log.jsonl")] for p in
                         (tmp_path / "straight", tmp_path / "killed"))
    assert resumed == straight


def test_two_processes_stream_tar_shards_and_resume(tiny, shards, tmp_path):
    """torchrun, 2 gloo processes, --stream from tar shards: stopped at step 2, resumed to 4, equal to one
    process decoding everything in memory (float tolerance: gradients are summed in another order)."""
    train.main(config(tiny, tmp_path / "one", loss="prior", steps=4, save_every=2))
    args = ["--data", f"{shards}/", "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
            "--loss", "prior", "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1",
            "--vit-heads", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8",
            "--row-len", "64", "--steps", "4", "--save-every", "2", "--warmup", "2", "--lr", "3e-3",
            "--device", "cpu", "--threads", "1", "--stream", "--out-dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--stop-at", "2"], ["--resume"]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scale", "train", *args, *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
