import os
import subprocess
import sys

import pytest
import torch

import train
from utils import load_checkpoint

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
    rebuilt, ckpt = train.load_model(str(tmp_path / "ckpt_000002.pt"))
    ids = torch.tensor([model.image_tokens() + [1, 20, 21, 22]])
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(ids, images), rebuilt(ids, images))
    assert ckpt["config"]["arch"] == "h" and ckpt["step"] == 2


def test_projector_only_leaves_encoder_and_decoder_untouched(tiny, tmp_path):
    model = train.main(config(tiny, tmp_path, train="projector", steps=3))
    torch.manual_seed(0)  # build_model's initialisation, before training
    start = train.build_model(config(tiny, tmp_path, train="projector"), train.T.load_tokenizer(str(tiny["tokenizer"])))
    for name in ("encoder", "decoder", "projector"):
        same = all(torch.equal(p, q) for p, q in zip(model.parts()[name].parameters(), start.parts()[name].parameters()))
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
    """torchrun with 2 gloo processes and half the batch each gives the 1-process result (float tolerance)."""
    args = ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
            "--loss", "prior", "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1",
            "--vit-heads", "2", "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8",
            "--row-len", "64", "--steps", "3", "--save-every", "3", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.join(ROOT, "train.py"), *args, "--out-dir", str(tmp_path / f"n{n}")]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "n1" / "last.pt"), weights(tmp_path / "n2" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
