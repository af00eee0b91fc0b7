"""GPU readiness, tested on a CPU: no device-to-host syncs inside a step, one graph under torch.compile,
honest profile totals and MFU, device-independent scores, threads under torchrun (docs/gpu.md)."""
import contextlib
import random

import pytest
import torch

import baselines
import train
from data import packing
from data.packing import Sample
from model import VLM, Decoder, DecoderConfig, VLMConfig
from baselines.heads import attach_heads
from data.packing import global_batch
from utils import setup_distributed
from scale.flops import peak_flops, peak_for_name, step_flops
from scale.flops import attended_pairs

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
    monkeypatch.setattr(baselines, "pack", host_pack)  # the objectives' host-side positions (baselines.hook)
    monkeypatch.setattr(baselines, "to_device", device_copy)
    yield calls


def tiny_model(arch, max_seq_len=64):
    torch.manual_seed(0)
    return VLM(VLMConfig(arch=arch, image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                         decoder=DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32,
                                               max_seq_len=max_seq_len)))


def tiny_data(model, n=16, text=0):
    rng = random.Random(0)
    samples = [Sample([rng.randrange(10, 64) for _ in range(rng.randint(3, 9))], index=i) for i in range(n)]
    for s in samples:
        s.inputs["p_ref"] = [rng.random() for _ in range(len(s.caption_ids) + 1)]
        s.tags = [rng.randrange(-1, 3) for _ in range(len(s.caption_ids) + 1)]
    texts = [Sample([rng.randrange(10, 64) for _ in range(5)], {"p_ref": [0.5] * 6}, tags=[-1] * 6)
             for _ in range(text)]
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    return train.Data(samples, images, model.image_tokens(), texts)


@pytest.mark.parametrize("arch,loss,objective", [("h", "prior", "none"), ("u", "ntp", "none"), ("h", "ntp", "itm")])
def test_one_sync_per_training_step(monkeypatch, arch, loss, objective):
    model = tiny_model(arch)
    cfg = train.TrainConfig(arch=arch, loss=loss, objective=objective, batch_size=8, micro_batch=4, row_len=64,
                            device="cpu", text_data="x" if arch == "u" else "")
    if objective != "none":
        attach_heads(model, objective)
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


def test_profile_counts_gpu_time_once_and_knows_kernel_names():
    from bench import parts as bench
    events = [  # (name, where, self time): operators on the host, kernels on the GPU
        ("aten::mm", "cpu", 50.0), ("aten::addmm", "cpu", 30.0), ("aten::_efficient_attention_forward", "cpu", 20.0),
        ("aten::mul", "cpu", 10.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gpu", 400.0),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "gpu", 100.0),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "gpu", 300.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::mul>", "gpu", 200.0),
    ]
    by_kind, total = bench.time_by_kind(events, on_gpu=True)
    assert total == 1000.0  # the kernels only: the operators' time is not added again
    assert by_kind["matmul"] == 500.0 and by_kind["attention"] == 300.0 and by_kind[bench.OTHER] == 200.0
    by_kind, total = bench.time_by_kind(events, on_gpu=False)
    assert total == 110.0 and by_kind["matmul"] == 80.0 and by_kind["attention"] == 20.0


def test_peak_table_matches_whole_names():
    cases = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA H200 NVL": 835, "NVIDIA H800": 989, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312,
             "NVIDIA A800-SXM4-80GB": 312, "NVIDIA L40S": 362, "NVIDIA L40": 181, "NVIDIA L4": 121,
             "NVIDIA B200": 2250, "NVIDIA GH200 480GB": 989}
    for name, tflops in cases.items():
        assert peak_for_name(name) == tflops * 1e12, name
    for unknown in ("Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA GeForce RTX 4090", "NVIDIA A10G"):
        assert peak_for_name(unknown) is None, unknown
    assert peak_flops("cpu") is None and peak_flops("cpu", 100.0) == 100e12  # --peak-tflops


def test_flops_count_the_attention_each_document_needs():
    # one row of 10 positions: documents of 3 and 5 positions, then 2 of padding
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]])
    real = torch.tensor([[True] * 8 + [False] * 2])
    assert attended_pairs(doc_ids, real) == 3 * 4 // 2 + 5 * 6 // 2  # 21 causal query-key pairs, not 8 x 10
    model = tiny_model("h")  # 1 layer, d 32: attention costs 12 x 1 x 32 FLOPs per query-key pair
    assert step_flops(model, 8, 0, 0, 21 / 8) - step_flops(model, 8, 0, 0, 0) == 12 * 32 * 21
    # train_step counts them from the packed batch, next to the dense row width
    data = tiny_data(model)
    cfg = train.TrainConfig(batch_size=8, row_len=64, device="cpu")
    stats = train.train_step(cfg, 0, model, data, "cpu")[0]
    ids = global_batch(0, 16, 8, 0)
    lengths = [len(model.image_tokens()) + 1 + len(data.samples[i].caption_ids) for i in ids]
    assert stats["attended"] == sum(n * (n + 1) // 2 for n in lengths) < stats["context"]


def test_scores_do_not_depend_on_autocast(monkeypatch):
    import score
    torch.manual_seed(0)
    ref = Decoder(DecoderConfig(vocab_size=300, n_layer=2, n_head=2, d_model=64, max_seq_len=64))
    with torch.no_grad():  # weights as large as a trained LM's: bf16 rounding then shows in p_ref
        for p in ref.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
        ref.embed.weight.normal_(0, 1.0)
    rng = random.Random(0)
    samples = [Sample([rng.randrange(10, 300) for _ in range(rng.randint(3, 12))]) for _ in range(24)]
    fp32, _ = score.label_probs(ref, samples, 64, 4, "cpu", progress=False)
    bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)  # what the GPU path runs under
    monkeypatch.setattr(score, "autocast", bf16, raising=False)
    with bf16("cpu"):
        mixed, _ = score.label_probs(ref, samples, 64, 4, "cpu", progress=False)
    # bf16 would move p_ref by ~2e-3 here (up to ~0.03 with a trained LM); float32 scoring agrees to 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(fp32, mixed)) <= 1e-6


def test_threads_split_over_runs_and_torchrun_processes(tmp_path, monkeypatch):
    from experiments import experiment
    monkeypatch.setattr(experiment.os, "cpu_count", lambda: 16)
    exp = experiment.Experiment(experiment.ExperimentConfig(out=str(tmp_path), parallel=2, nproc=4))
    assert exp.jobs.threads_per_process((train.TrainConfig(arch="h"), "train")) == 2  # 16 cores / 2 runs / 4 processes
    assert exp.jobs.threads_per_process((experiment.ScoreConfig(), "score")) == 8   # not under torchrun
    one = experiment.Experiment(experiment.ExperimentConfig(out=str(tmp_path), parallel=1, nproc=32))
    assert one.jobs.threads_per_process((train.TrainConfig(), "train")) == 1


def test_gpus_without_bf16_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ValueError, match="V100-SXM2-16GB has no bf16"):
        setup_distributed("cuda")
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # alone: no process group
    assert setup_distributed("cpu") == (0, 1, "cpu")
