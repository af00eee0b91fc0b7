"""GPU readiness, tested on a CPU: no device-to-host syncs inside a step, one graph under torch.compile,
honest profile totals and MFU, device-independent scores, threads under torchrun (docs/gpu.md)."""
import contextlib
import random

import pytest
import torch

import tokenizer as T
import train
from data import packing
from data.packing import Sample
from model import VLM, DecoderConfig, VLMConfig

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class Host(torch.Tensor):
    """Marks tensors the packer made on the host: reading them back costs nothing on a GPU."""


@contextlib.contextmanager
def count_syncs(monkeypatch):
    """Count the calls that would make the host wait for a GPU (reading a device tensor back), made on any tensor
    but the packer's host tensors. Packed batches are marked Host (the mark follows them through host-side ops);
    to_device strips it, as the copy to a GPU would."""
    calls, host = [], []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            if not isinstance(self, Host) and not host:
                calls.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    pack, to_device = packing.pack, packing.to_device

    def host_pack(*a, **kw):
        b = pack(*a, **kw)
        for f in packing.FIELDS:
            setattr(b, f, getattr(b, f).as_subclass(Host))
        return b

    def device_copy(t, device):
        return to_device(t, device).as_subclass(torch.Tensor).clone()
    global_batch = train.global_batch

    def host_global_batch(*a, **kw):  # sample indices: a host-side permutation
        host.append(1)
        try:
            return global_batch(*a, **kw)
        finally:
            host.pop()
    monkeypatch.setattr(train, "global_batch", host_global_batch)
    monkeypatch.setattr(train, "pack", host_pack)
    monkeypatch.setattr(packing, "to_device", device_copy)
    monkeypatch.setattr(train, "to_device", device_copy)
    yield calls


def tiny_model(arch, max_seq_len=64):
    torch.manual_seed(0)
    return VLM(VLMConfig(arch=arch, image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                         decoder=DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=max_seq_len)))


def tiny_data(model, n=16, text=0):
    rng = random.Random(0)
    samples = [Sample([rng.randrange(10, 64) for _ in range(rng.randint(3, 9))], index=i) for i in range(n)]
    for s in samples:
        s.p_ref = [rng.random() for _ in range(len(s.caption_ids) + 1)]
        s.tags = [rng.randrange(-1, 3) for _ in range(len(s.caption_ids) + 1)]
    texts = [Sample([rng.randrange(10, 64) for _ in range(5)], p_ref=[0.5] * 6, tags=[-1] * 6) for _ in range(text)]
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    return train.Data(samples, images, model.image_tokens(), texts)


@pytest.mark.parametrize("arch,loss,objective", [("h", "prior", "none"), ("u", "ntp", "none"), ("h", "ntp", "itm")])
def test_one_sync_per_training_step(monkeypatch, arch, loss, objective):
    model = tiny_model(arch)
    cfg = train.TrainConfig(arch=arch, loss=loss, objective=objective, batch_size=8, micro_batch=4, row_len=64,
                            device="cpu", text_data="x" if arch == "u" else "")
    if objective != "none":
        train.attach_heads(model, objective)
    data = tiny_data(model, text=8 if arch == "u" else 0)
    train.train_step(cfg, 0, model, data, "cpu")  # warm: first-call work (lazy init) is not the step's
    with count_syncs(monkeypatch) as calls:
        stats, _, _ = train.train_step(cfg, 1, model, data, "cpu")
    assert calls == ["tolist"], calls  # the statistics, read once at the end of the step (train.train_step)
    assert stats["tokens"] > 0


@pytest.mark.parametrize("arch", ["h", "u"])
def test_forward_compiles_to_one_graph(arch):
    model = tiny_model(arch)
    batch = packing.pack([Sample([10, 11, 12], index=0), Sample([13, 14], index=1)], 64, model.image_tokens())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batch.input_ids, torch.randn(2, 3, 16, 16), batch.position_ids,
                                             batch.doc_ids)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_bad_inputs_are_still_refused():
    model = tiny_model("h", max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len 8"):
        model.decoder(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(RuntimeError, match="max_seq_len 8"):  # given positions: checked on the device
        model.decoder(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 8]]))
    ids = torch.tensor([model.image_tokens() + [1, 20]])
    with pytest.raises(RuntimeError, match="slots do not match 2 images"):
        model(ids, torch.randn(2, 3, 16, 16))
