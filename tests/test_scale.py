"""The options for big models and shared runs (docs/scale.md, docs/llama.md): --grad-checkpoint, --vision-layer,
frozen parts in bf16, --wandb, and the exported VLM folder (scale/export.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_scale.py
"""
import glob
import os
import json
import struct

import pytest
import torch

import scale  # noqa: F401 (plug-ins: exported folders, hf:FOLDER)
import train
from model import build_model, frozen_to_bf16, load_model
from scale.timm_encoder import TimmEncoder
from model import Decoder, DecoderConfig, load_model
from tests.test_train import config

VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


# ----------------------------------------------------------------------------- --grad-checkpoint
def test_checkpointed_blocks_give_the_same_loss_and_gradients(monkeypatch):
    import model as M
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, max_seq_len=16))
    ids = torch.randint(0, 50, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])  # packed rows: the mask goes through the checkpoint too
    calls, forward = [], M.Block.forward  # counted in forward itself: the recomputation runs no module hooks
    monkeypatch.setattr(M.Block, "forward", lambda self, *a: calls.append(1) or forward(self, *a))

    def loss_and_grads(on):
        model.grad_checkpoint = on
        model.zero_grad()
        calls.clear()
        loss = model(ids, doc_ids=doc_ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    (l0, g0, n0), (l1, g1, n1) = loss_and_grads(False), loss_and_grads(True)
    assert (n0, n1) == (3, 6)  # checkpointed: each block runs again in backward
    # The recomputation repeats the same float operations in the same order: equal up to 1e-6 (here bit for bit).
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)
    calls.clear()
    with torch.no_grad():  # inference never recomputes
        model(ids)
    assert len(calls) == 3


def test_train_with_grad_checkpoint_equals_without(tiny, tmp_path):
    a = train.main(config(tiny, tmp_path / "a", steps=2))
    b = train.main(config(tiny, tmp_path / "b", steps=2, grad_checkpoint=True))
    assert b.decoder.grad_checkpoint and not a.decoder.grad_checkpoint
    la, lb = ([json.loads(x) for x in open(tmp_path / r / "log.jsonl")] for r in "ab")
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=1e-6)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


# ----------------------------------------------------------------------------- --vision-layer
def test_vision_layer_is_timms_penultimate_block():
    torch.manual_seed(0)
    final = TimmEncoder("vit_tiny_patch16_224", VIT)
    llava = TimmEncoder("vit_tiny_patch16_224", {**VIT, "vision_layer": -2})
    llava.model.load_state_dict(final.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    for i, block in enumerate(final.model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    full = final.forward_features(x)  # runs every block: the hook keeps block 1's output (the penultimate of 3)
    ran = []
    llava.model.blocks[2].register_forward_hook(lambda *_: ran.append(1))
    feats = llava.forward_features(x)
    skip = final.model.num_prefix_tokens
    assert feats.shape == full.shape == (2, 16, 32)
    torch.testing.assert_close(feats, seen[1][:, skip:], atol=0, rtol=0)  # timm's own block output, class token off
    renorm = x * final.scale + final.shift
    own = final.model.forward_intermediates(renorm, indices=[1], norm=False, output_fmt="NLC",
                                            intermediates_only=True)[0]
    torch.testing.assert_close(feats, own, atol=0, rtol=0)
    assert not torch.allclose(feats, full) and not ran  # not the final features; the last block never ran
    with pytest.raises(ValueError, match="has 3 blocks"):
        TimmEncoder("vit_tiny_patch16_224", {**VIT, "vision_layer": -4})


def test_vision_layer_flag_is_saved_and_rebuilt(tiny, tmp_path):
    kw = dict(vision="timm:vit_tiny_patch16_224", vision_kwargs=json.dumps(VIT), train="projector", steps=1,
              save_every=1, row_len=64)
    model = train.main(config(tiny, tmp_path, vision_layer=-2, **kw)).eval()
    assert model.encoder.layer == -2
    rebuilt, ckpt = load_model(str(tmp_path / "ckpt_000001.pt"))
    assert ckpt["model_config"]["vision_kwargs"]["vision_layer"] == -2 and rebuilt.encoder.layer == -2
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.embed_images(images), rebuilt.embed_images(images))
    with pytest.raises(ValueError, match="--vision-layer needs --vision"):
        build_model(config(tiny, tmp_path / "x", vision_layer=-2), train.T.load_tokenizer(str(tiny["tokenizer"])))


# ----------------------------------------------------------------------------- frozen parts in bf16
def test_frozen_parts_go_bf16_on_cuda_only(tiny, tmp_path, monkeypatch):
    tok = train.T.load_tokenizer(str(tiny["tokenizer"]))
    cpu = build_model(config(tiny, tmp_path, train="projector"), tok)
    assert {p.dtype for p in cpu.parameters()} == {torch.float32}  # CPU: unchanged
    # device "cuda" only decides the dtype; the tensors stay on the CPU here, so no GPU is needed (but
    # utils.pick_device refuses --device cuda where torch sees none)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = build_model(config(tiny, tmp_path, train="projector", device="cuda"), tok)
    for name, part in gpu.parts().items():
        assert {p.dtype for p in part.parameters()} == {torch.float32 if name == "projector" else torch.bfloat16}
    assert gpu.decoder.head.weight is gpu.decoder.embed.weight  # still tied
    assert {b.dtype for b in gpu.buffers()} == {torch.float32}  # RoPE tables and the like keep their precision
    for how in (dict(train="all", device="cuda"), dict(train="projector", device="cuda", fsdp=True)):
        assert {p.dtype for p in build_model(config(tiny, tmp_path, **how), tok).parameters()} == {torch.float32}
    names = frozen_to_bf16(build_model(config(tiny, tmp_path, train="projector"), tok), "cuda:3")
    assert names and all(n.startswith(("encoder.", "decoder.")) for n in names)
    assert frozen_to_bf16(cpu, "cpu") == []


# ----------------------------------------------------------------------------- --wandb
def wandb_records(path):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, each record a
    7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes), parsed as protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, out, parts = open(path, "rb").read(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a header: the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
    return out


def wandb_history(path, internal=False):
    """The logged rows of a .wandb file, without wandb's own _step, _runtime, _timestamp unless `internal`. wandb's
    service process may still be writing after run.finish() returns: read once the run's exit record is there."""
    import time
    for _ in range(300):
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return [{k: v for k, v in row.items() if internal or not k.startswith("_")} for row in rows]


def test_wandb_offline_history_equals_log(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(config(tiny, tmp_path, steps=3, wandb="prior-test"))
    log = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_history(run_file) == log
    assert [h["_step"] for h in wandb_history(run_file, internal=True)] == [1, 2, 3]
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged = {i.key: json.loads(i.value_json) for i in run.config.update}  # config.json's dict
    assert json.load(open(tmp_path / "config.json")) == {k: v for k, v in logged.items() if k != "_wandb"}


def test_wandb_missing_is_one_line(tiny, tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "wandb" else
                        real(name, *a, **k))
    with pytest.raises(ValueError, match="pip install -r requirements-wandb.txt"):
        train.main(config(tiny, tmp_path, steps=1, wandb="x"))


# ----------------------------------------------------------------------------- exported folder
def test_exported_folder_reloads_to_identical_logits(tiny, tmp_path):
    import eval as evaluation
    from scale.export import export_vlm
    from safetensors.torch import load_file
    train.main(config(tiny, tmp_path / "run", loss="prior", steps=2, save_every=2))
    ckpt = str(tmp_path / "run" / "ckpt_000002.pt")
    meta = export_vlm(ckpt, str(tmp_path / "vlm"))
    assert meta["image_tokens"] == 16 and meta["projector"]["in"] == 16 and meta["tied"] == {
        "decoder.head.weight": "decoder.embed.weight"}
    assert "decoder.head.weight" not in load_file(str(tmp_path / "vlm" / "model.safetensors"))
    a, _ = load_model(ckpt)
    b, folder = load_model(str(tmp_path / "vlm"))
    ids = torch.tensor([a.image_tokens() + [1, 20, 21, 22]] * 2)
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(a(ids, images), b(ids, images))
    assert folder["config"]["tokenizer"].endswith("vlm/tokenizer.json")
    # eval.py --ckpt FOLDER: the same results as on the checkpoint (its tokenizer comes from the folder)
    kw = dict(test_path=str(tiny["train"]), test_scores=str(tiny["scores"]), device="cpu")
    assert evaluation.evaluate_checkpoint(str(tmp_path / "vlm"), **kw) == evaluation.evaluate_checkpoint(ckpt, **kw)
    # train.py --init-from FOLDER starts from the same weights as --init-from the checkpoint
    x = train.main(config(tiny, tmp_path / "x", steps=1, init_from=ckpt))
    y = train.main(config(tiny, tmp_path / "y", steps=1, init_from=str(tmp_path / "vlm")))
    assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    with pytest.raises(ValueError, match="not an exported VLM"):
        load_model(str(tmp_path / "run"))


def test_export_never_mixes_or_overwrites_and_checks_its_bytes(tiny, tmp_path, monkeypatch):
    """An export goes to a temporary folder and is swapped in whole: an interrupted re-export leaves the earlier
    export as it was; a run folder or a file as --out is refused; flipped bytes in model.safetensors are refused
    on load (the export records its sha256)."""
    import scale.export as E
    train.main(config(tiny, tmp_path / "run", loss="prior", steps=2, save_every=1))
    first, second = str(tmp_path / "run" / "ckpt_000001.pt"), str(tmp_path / "run" / "ckpt_000002.pt")
    out = str(tmp_path / "vlm")
    E.export_vlm(first, out)
    files = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(E.json, "dump", full_disk)  # the re-export fails after its weights are written
    with pytest.raises(ValueError, match="nothing was changed"):
        E.export_vlm(second, out)
    monkeypatch.undo()
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == files
    assert sorted(os.listdir(tmp_path)) == ["run", "vlm"]  # no temporary folder left behind
    assert E.export_vlm(second, out)["step"] == 2 and load_model(out)[1]["step"] == 2
    for bad in (str(tmp_path / "run"), first):  # a run folder, a file
        with pytest.raises(ValueError, match="--out"):
            E.export_vlm(second, bad)
    assert os.path.isfile(os.path.join(tmp_path, "run", "config.json"))
    weights = os.path.join(out, "model.safetensors")
    blob = bytearray(open(weights, "rb").read())
    blob[-10] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        load_model(out)


# ----------------------------------------------------------------------------- reference_lm.py under torchrun
def test_reference_lm_two_gloo_processes_equal_one(tiny, tmp_path):
    """DDP and FSDP2 over 2 gloo CPU processes, each with half of every step's rows, give the 1-process LM: the
    loss is the mean over the whole step's tokens, so only the order of float sums differs (1e-5)."""
    import os
    import subprocess
    import sys
    from tests.test_train import ROOT
    from utils import load_checkpoint
    args = ["--data", str(tiny["ref"]), "--tokenizer", str(tiny["tokenizer"]), "--n-layer", "2", "--n-head", "2",
            "--d-model", "32", "--row-len", "64", "--batch-rows", "4", "--steps", "6", "--eval-every", "3",
            "--device", "cpu", "--grad-checkpoint"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": (1, []), "ddp": (2, []), "fsdp": (2, ["--fsdp"])}
    for name, (n, extra) in runs.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "scale", "reference_lm", *args, *extra, "--out", str(tmp_path / f"{name}.pt")]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{n} process(es)" in done.stdout
    one = load_checkpoint(tmp_path / "one.pt")
    for name in ("ddp", "fsdp"):
        other = load_checkpoint(tmp_path / f"{name}.pt")
        assert [h["step"] for h in other["history"]] == [3, 6] and other["kept_step"] == one["kept_step"]
        for a, b in zip(one["history"], other["history"]):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-5)
        for k, v in one["model"].items():
            torch.testing.assert_close(other["model"][k], v, atol=1e-5, rtol=1e-4, msg=f"{name} {k}")


def test_reference_lm_wandb_logs_the_history(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import reference_lm
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reference_lm.train_lm(reference_lm.RefConfig(data=str(tiny["ref"]), tokenizer=str(tiny["tokenizer"]),
                                                 out=str(tmp_path / "lm.pt"), n_layer=1, n_head=2, d_model=32,
                                                 row_len=64, batch_rows=4, steps=4, eval_every=2, device="cpu",
                                                 wandb="prior-test"))
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_history(run_file) == json.load(open(tmp_path / "lm.json"))["history"]
