"""Parts of bench.py: where an H-LVLM projector-only step's time goes, what the feature cache saves, and how
our decoder compares with a plain GPT-2-style block stack of the same size.

    h_recipe(...)       the paper's H-LVLM recipe (frozen ViT and decoder, --train projector): one step from
                        pixels vs one from cached encoder features (scale/features.py), paired, and the step
                        split by kind of work (packing, encoder forward, projector + decoder forward/backward,
                        optimizer).
    eval_cost(...)      one checkpoint's evaluation (eval.evaluate_model on generated probes, as the main job's
                        worker runs it at every checkpoint) over the training steps between two checkpoints.
    reference_stack(...)  forward + backward (logits over the vocabulary and cross-entropy at every position) of
                        model.Decoder vs GPT2, a textbook GPT-2 stack (LayerNorm, GELU MLP 4x, learned
                        positions, biases, tied head) of the same width, depth and about the same parameters.

Both time the two sides alternately and report the median of the per-pair ratios, so load from other
processes during the run mostly cancels; the absolute times are medians too and move with the load. Each
ratio comes twice: by wall-clock time and by this process's CPU time (`*_cpu`), which on a machine shared with
other processes tracks the work done better (with --threads 1 it is not inflated by threads waiting on each
other). On their own, without bench.py's other measurements (a few minutes less):

    python -m bench.bench --parts-only --preset cpu --threads 1 --pairs 512 --steps 20
"""
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from scale.features import compute_features
from data.packing import pack
from data.images import normalize
from model import Decoder, DecoderConfig, build_model, count_params
from utils import make_optimizer
from data.packing import global_batch


CPU = []  # per-call process CPU seconds of the last _clock calls (read by the callers just after)


def _clock(fn, sync):
    """Wall seconds of fn(); its process CPU seconds are appended to CPU."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    CPU.append(time.process_time() - c0)
    return time.perf_counter() - t0


class GPT2Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """The reference: GPT-2's architecture (learned positions, LayerNorm, GELU MLP, biases, tied head)."""

    def __init__(self, vocab, d, n_layer, n_head, max_len):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(GPT2Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def reference_stack(vocab, d_model, n_layer, n_head, row_len, rows=8, reps=10, device="cpu", sync=lambda: None):
    """Median ms of one forward + backward of ours (plain causal rows, and packed rows with doc_ids as training
    runs) and of GPT2 on the same `rows` x `row_len` tokens, and the median paired ratio ours / GPT2."""
    torch.manual_seed(0)
    ours = Decoder(DecoderConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d_model,
                                 max_seq_len=row_len)).to(device)
    ref = GPT2(vocab, d_model, n_layer, n_head, row_len).to(device)
    ids = torch.randint(4, vocab, (rows, row_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:].flatten()
    docs = (torch.arange(row_len, device=device) // (row_len // 4)).expand(rows, row_len)  # 4 documents a row
    pos = torch.arange(row_len, device=device) % (row_len // 4)
    runs = {"ours": lambda: ours(x), "ours_packed": lambda: ours(x, position_ids=pos.expand(rows, row_len),
                                                                  doc_ids=docs), "gpt2": lambda: ref(x)}
    times, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for i in range(reps + 2):
        for k, fn in (runs.items() if i % 2 else reversed(list(runs.items()))):
            t = _clock(lambda: F.cross_entropy(fn().flatten(0, 1).float(), y).backward(), sync)
            if i >= 2:
                times[k].append(t)
                cpu[k].append(CPU[-1])
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return {"ref_rows": rows, "ref_row_len": row_len, "ref_d_model": d_model, "ref_n_layer": n_layer,
            "ref_params_ours": count_params(ours), "ref_params_gpt2": count_params(ref),
            "ref_ms_ours": 1e3 * statistics.median(times["ours"]),
            "ref_ms_ours_packed": 1e3 * statistics.median(times["ours_packed"]),
            "ref_ms_gpt2": 1e3 * statistics.median(times["gpt2"]),
            "ref_ours_over_gpt2": statistics.median(a / b for a, b in zip(times["ours"], times["gpt2"])),
            "decoder_over_gpt2": statistics.median(a / b for a, b in zip(times["ours"], times["gpt2"])),
            "ref_ours_packed_over_gpt2": statistics.median(a / b for a, b in zip(times["ours_packed"], times["gpt2"])),
            "ref_ours_over_gpt2_cpu": statistics.median(a / b for a, b in zip(cpu["ours"], cpu["gpt2"])),
            "ref_ours_packed_over_gpt2_cpu": statistics.median(a / b for a, b in zip(cpu["ours_packed"], cpu["gpt2"]))}


def eval_cost(tcfg, tok, step_s, n_probe=160, max_rows=160, every=30, reps=3, seed=0):
    """eval_over_train: the seconds of eval.evaluate_model on the probes (blind probes included), at the main
    job's cpu preset's sizes (160 rows per probe kind, --max-rows 160, H-LVLM with its probe features cached as
    the worker's --feature-cache does after a run's first checkpoint), over `every` train steps of step_s each
    (a checkpoint every 30 steps). The probes come from world.generate in a temporary folder; median of reps."""
    import eval as E  # the evaluation the worker runs; imported here so bench.py's other numbers do not need it
    cfg = dataclasses.replace(tcfg, arch="h", train="projector")
    torch.manual_seed(seed)
    model = build_model(cfg, tok).to(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "synth")
        cmd = [sys.executable, "-m", "world.generate", "--out", out, "--seed", str(seed), "--n-probe", str(n_probe),
               "--image-size", str(cfg.image_size), "--workers", "1"]
        cmd += [x for k in ("train", "ref", "text", "label", "val", "test", "probe-val") for x in (f"--n-{k}", "1")]
        subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True,
                       capture_output=True, text=True, timeout=600)
        kw = dict(probes_dir=os.path.join(out, "probes"), device=cfg.device, max_rows=max_rows,
                  feature_cache=os.path.join(tmp, "features"))
        E.evaluate_model(model, tok, **kw)  # builds the probe images' feature file, as a run's first checkpoint
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            values = E.evaluate_model(model, tok, **kw)
            times.append(time.perf_counter() - t0)
    eval_s = statistics.median(times)
    return {"eval_s_checkpoint": eval_s, "eval_train_s_interval": every * step_s, "eval_every": every,
            "eval_benchmarks": len(values), "eval_over_train": eval_s / (every * step_s)}


def h_recipe(tcfg, tok, samples, images, steps, warmup=2, sync=lambda: None):
    """The H-LVLM projector-only step from pixels and from cached features (same model, same batches, taking
    turns), and a per-kind-of-work split of the step. Returns a flat dict of seconds and ratios."""
    device = tcfg.device
    cfg = dataclasses.replace(tcfg, arch="h", train="projector", loss="prior")
    torch.manual_seed(0)
    model = build_model(cfg, tok).to(device)
    t0 = time.perf_counter()
    features = compute_features(model.encoder, images, device)  # what --feature-cache stores, once per image set
    build = time.perf_counter() - t0
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plain = train.Data(samples, images, model.image_tokens())
    cached = dataclasses.replace(plain, features=features)

    def optimize():
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = {k: [] for k in ("pixels", "cached", "optimizer", "packing", "encoder", "cached_fb", "pixels_cpu",
                         "cached_cpu")}
    for i in range(warmup + steps):
        ids = global_batch(i, len(samples), cfg.batch_size, cfg.seed)
        order = (("pixels", plain), ("cached", cached))
        for kind, data in (order if i % 2 else order[::-1]):  # alternate who goes first
            fb = _clock(lambda: train.train_step(cfg, i, model, data, device), sync)
            opt_s = _clock(optimize, sync)
            if i >= warmup:
                t[kind].append(fb + opt_s)
                t[kind + "_cpu"].append(CPU[-1] + CPU[-2])
                t["optimizer"].append(opt_s)
                if kind == "cached":
                    t["cached_fb"].append(fb)
        # The parts a step does before the model runs, and the frozen encoder's forward, on the same batch.
        batch = [None]

        def host():
            b = pack([samples[j] for j in ids], cfg.row_len, model.image_tokens(), tight=True)
            b.to(device)
            batch[0] = normalize(images[b.indices].to(device))
        packing = _clock(host, sync)
        with torch.no_grad():
            encoder = _clock(lambda: model.encoder.forward_features(batch[0]), sync)
        if i >= warmup:
            t["packing"].append(packing)
            t["encoder"].append(encoder)
    med = {k: statistics.median(v) for k, v in t.items()}
    decoder = max(med["cached_fb"] - med["packing"], 0.0)  # the cached step is packing + projector + decoder
    return {"h_step_s_pixels": med["pixels"], "h_step_s_cached": med["cached"],
            "h_feature_cache_speedup": statistics.median(a / b for a, b in zip(t["pixels"], t["cached"])),
            "h_feature_cache_speedup_cpu": statistics.median(a / b for a, b in zip(t["pixels_cpu"], t["cached_cpu"])),
            "h_feature_cache_build_s": build, "h_feature_cache_images": len(images),
            "h_trainable_params": count_params(model, True),
            "h_part_s_packing": med["packing"], "h_part_s_encoder_forward": med["encoder"],
            "h_part_s_projector_decoder_fb": decoder, "h_part_s_optimizer": statistics.median(t["optimizer"]),
            "h_image_tokens": len(model.image_tokens()), "h_vit_dim": model.cfg.vit_dim,
            "h_vit_depth": model.cfg.vit_depth, "h_image_size": model.cfg.image_size}


def print_rows(r):
    """Rows for bench.print_table."""
    ms = lambda s: f"{s * 1e3:,.1f} ms"
    parts = ("packing", "encoder_forward", "projector_decoder_fb", "optimizer")
    split = ", ".join(f"{p.replace('_fb', ' fwd+bwd').replace('_', ' ')} {ms(r['h_part_s_' + p])}" for p in parts)
    return [
        ("H projector-only step", f"{ms(r['h_step_s_pixels'])} from pixels, {ms(r['h_step_s_cached'])} from cached "
                                  f"features (ViT {r['h_vit_dim']} x {r['h_vit_depth']}, {r['h_image_size']} px, "
                                  f"{r['h_image_tokens']} tokens/image)"),
        ("feature cache speedup", f"{r['h_feature_cache_speedup']:.2f}x wall, {r['h_feature_cache_speedup_cpu']:.2f}x "
                                  f"CPU time (paired medians; building the cache: "
                                  f"{r['h_feature_cache_build_s']:.1f} s for {r['h_feature_cache_images']} images)"),
        ("H step by kind", split),
        ("checkpoint evaluation", f"{r['eval_s_checkpoint']:.2f} s for {r['eval_benchmarks']} probe numbers vs "
                                  f"{r['eval_train_s_interval']:.1f} s training {r['eval_every']} steps "
                                  f"(eval_over_train {r['eval_over_train']:.3f})"),
        ("ours vs GPT-2 stack", f"{r['ref_ms_ours']:,.0f} ms vs {r['ref_ms_gpt2']:,.0f} ms fwd+bwd "
                                f"({r['ref_ours_over_gpt2']:.3f}x wall, {r['ref_ours_over_gpt2_cpu']:.3f}x CPU; packed "
                                f"rows {r['ref_ours_packed_over_gpt2']:.3f}x wall), "
                                f"d {r['ref_d_model']} x {r['ref_n_layer']}, {r['ref_rows']} x {r['ref_row_len']} "
                                f"tokens, {r['ref_params_ours'] / 1e6:.2f}M vs "
                                f"{r['ref_params_gpt2'] / 1e6:.2f}M params"),
    ]


# Kinds of work by event name: aten operators (CPU profiles) and GPU kernel names (CUDA profiles). Attention
# first: fmha_cutlassF / flash kernels contain "cutlass"-like parts of matmul names.
KINDS = (("attention", ("scaled_dot_product", "flash", "fmha", "efficient_attention", "cudnn_attention",
                        "attention")),
         ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation", "convolution", "gemm",
                     "xmma", "cublas", "cutlass", "nvjet", "wgmma")))
OTHER = "everything else (elementwise, norms, loss, copies)"


def kind_of(name):
    """The kind of work an operator or kernel name is: attention, matmul or everything else."""
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), OTHER)


def time_by_kind(events, on_gpu):
    """{kind: time} and the total from (name, where, self time) events, where = "cpu" (an operator on the host)
    or "gpu" (a kernel). On a GPU only kernels count: an operator's GPU time is its kernels' time again, and
    summing both counts the GPU's work twice. On a CPU the operators' own CPU time counts."""
    where = "gpu" if on_gpu else "cpu"
    mine = [(name, t) for name, w, t in events if w == where]
    by_kind = {kind: 0.0 for kind, _ in KINDS}
    by_kind[OTHER] = 0.0
    for name, t in mine:
        by_kind[kind_of(name)] += t
    return by_kind, sum(t for _, t in mine)


def profile_events(prof, on_gpu):
    """torch.profiler results as (name, "cpu" or "gpu", self time in microseconds) for time_by_kind."""
    from torch.autograd import DeviceType
    out = []
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CUDA:
            out.append((e.key, "gpu", e.self_device_time_total))
        else:
            out.append((e.key, "cpu", e.self_cpu_time_total))
    return out


def profile(fn, device, r):
    """Where a forward+backward's time goes, by kind of kernel: torch.profiler over two calls."""
    from torch.profiler import ProfilerActivity
    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(2):
            fn(i)
        if cuda:
            torch.cuda.synchronize(device)
    by_kind, total = time_by_kind(profile_events(prof, cuda), cuda)
    r.update({f"profile_{k.split()[0]}_fraction": v / max(total, 1) for k, v in by_kind.items()})
    print(f"\nforward + backward, {'GPU kernel' if cuda else 'CPU'} time by kind (optimizer step apart: "
          f"{r['train_step_s_optimizer'] * 1e3:.1f} ms of the {r['train_step_s_prior'] * 1e3:.1f} ms step):")
    for k, v in by_kind.items():
        print(f"  {k:<52} {v / max(total, 1):6.1%}")
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15))
