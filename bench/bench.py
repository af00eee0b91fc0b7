"""Benchmark: how fast training, scoring and data loading run on this machine, and how close the training
step comes to the machine's own limit (in the spirit of nanoGPT's bench.py).

    python -m bench.bench                                        # train.py's default model (--preset small)
    python -m bench.bench --preset bench --json out/bench.json   # decoder width 384: docs/performance.md
    python -m bench.bench --preset tiny                          # a few seconds: the test
    python -m bench.bench --preset cpu --threads 2  # the main job's CPU preset: feature cache speedup

Every number is the median over --steps repetitions after --warmup untimed ones:
  train step    train.train_step + gradient clip + AdamW, exactly what train.py runs per step, for NTP and
                for PRIOR alternately on the same model and the same batches; PRIOR's cost is the median of
                the per-step ratios (each pair moments apart, so load changes during the run cancel).
  FLOP/s        step_flops (6 x params x tokens + attention, documented there) / step time, next to
                the FLOP/s of a big matmul measured in the same run (fp32 on CPU, bf16 on CUDA): the
                practical ceiling. On CUDA also MFU = FLOP/s / the GPU's dense bf16 peak (PEAK_BF16).
  scoring       score.label_probs: the reference LM, forward only, captions grouped by length, as score.py scores.
  loading       data.images.load_images decoding PNGs, images/s, against what a train step consumes.
  padding       share of the positions a train step computes that are padding (packing as train.py does).
  memory        peak resident memory (CPU) or torch.cuda.max_memory_allocated (CUDA).
  H recipe      the frozen-ViT projector-only step from pixels vs from cached ViT features (--feature-cache),
                paired (h_feature_cache_speedup), and that step split by kind of work (bench_parts.h_recipe).
  GPT-2 stack   forward + backward of our decoder vs a plain GPT-2 block stack of the same size, 8 rows of
                row_len tokens, paired (bench_parts.reference_stack; decoder_over_gpt2). docs/performance.md.
  eval          one checkpoint's eval.evaluate_model on generated probes (160 rows per kind) over training the 30
                steps between two checkpoints (eval_over_train; bench_parts.eval_cost). train_over_matmul: FLOP/s.
Data: the built-in generator (python -m world.generate, realistic caption lengths) writes a few captions and
PNGs into a temporary folder; if it cannot run, synthetic 25-45-token captions and random PNGs stand in.
The reference LM and the VLM are freshly initialised: speed does not depend on the weights.

Other processes share the CPU: the table prints the load average before the timed steps and how many cores
other processes kept busy during them; trust the numbers when that is ~0 (re-run otherwise). --profile
prints where a forward+backward's time goes (matmul, attention, everything else).
"""
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars inside the timed regions
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data import tokenizer as T  # noqa: E402
from bench import parts as bench_parts  # noqa: E402
import train  # noqa: E402
from utils import flag, make_optimizer, pick_device, run
from model import Decoder, DecoderConfig, build_model, count_params
from data.images import load_images  # noqa: E402
from data.packing import global_batch, make_samples, pack  # noqa: E402
from data.record_types import Record  # noqa: E402
from data.records import read_records  # noqa: E402
from scale.flops import peak_flops, step_flops  # noqa: E402
from score import label_probs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model and batch per preset; anything not named is train.py's default (small = train.py's defaults).
PRESETS = {
    "tiny": dict(d_model=32, n_layer=1, n_head=2, vit_dim=16, vit_depth=1, vit_heads=2, image_size=16,
                 patch_size=4, batch_size=8, row_len=64),
    "small": dict(),
    "bench": dict(d_model=384, n_layer=6, n_head=6),
    "cpu": dict(d_model=128, n_layer=4, n_head=4, patch_size=16),  # main.py PRESETS["cpu"], ViT defaults
    # main.py --preset gpu's VLM (decoder d 512 x 8 layers, 16 px patches, batch 256, rows of 192)
    "gpu": dict(d_model=512, n_layer=8, n_head=8, patch_size=16, batch_size=256, row_len=192),
}
# (timed steps, generated pairs, reference captions, matmul side on CPU, tokenizer vocabulary)
SIZES = {"tiny": (3, 48, 100, 256, 300), "small": (30, 1024, 2000, 2048, 2048), "bench": (30, 1024, 2000, 2048, 2048),
         "cpu": (30, 1024, 2000, 2048, 1024), "gpu": (30, 4096, 2000, 2048, 2048)}
EVAL_ROWS = {"tiny": dict(n_probe=4, max_rows=4, reps=1)}  # bench_parts.eval_cost; else the cpu preset's 160


@dataclass
class BenchConfig:
    preset: str = flag("small", "tiny: seconds, for tests; small: train.py's default; bench: d 384 x 6; "
                       "cpu/gpu: main.py's", list(PRESETS))
    arch: str = flag("h", "h: ViT -> projector -> LM; u: encoder-free pixel patches -> LM", ["h", "u"])
    steps: int = flag(0, "timed train steps per loss, median reported (0 = the preset's: 3 tiny, "
                      "30 otherwise)")
    warmup: int = flag(2, "untimed steps per loss first (allocator, caches, torch.compile)")
    batch_size: int = flag(0, "image-caption samples per step (0 = the preset's: 8 tiny, else "
                           "train.py's 32)")
    row_len: int = flag(0, "tokens per packed row at most (0 = the preset's: 64 tiny, else "
                        "train.py's 256)")
    pairs: int = flag(0, "image-caption pairs to generate: caption lengths, loader timing, scoring (0 "
                      "= the preset's)")
    threads: int = flag(0, "torch CPU threads (0 = os.cpu_count())")
    device: str = flag("auto", "auto, cpu or cuda")
    compile: bool = flag(False, "torch.compile the model, as train.py --compile (compiling is part of "
                         "the warm-up)")
    peak_tflops: float = flag(0.0, "dense bf16 peak of the GPU in TFLOP/s for MFU (0 = from "
                              "PEAK_BF16 by name)")
    profile: bool = flag(False, "also run torch.profiler over two PRIOR forward+backward passes and print "
                         "where the time goes")
    parts_only: bool = flag(False, "only the H recipe and the GPT-2 stack (bench_parts), on --pairs pairs")
    json: str = flag("", "also write the results to this file, one flat JSON object")
    seed: int = flag(0, "seed of the generated data and the model")


# ----------------------------------------------------------------------------- data

def make_data(folder, pairs, n_ref, image_size, seed):
    """(train records with images, reference captions): from the built-in generator if it runs, else synthetic."""
    out = os.path.join(folder, "synth")
    cmd = [sys.executable, "-m", "world.generate", "--out", out, "--seed", str(seed), "--n-train", str(pairs),
           "--n-ref", str(n_ref), "--image-size", str(image_size), "--workers", "1"]
    cmd += [x for k in ("text", "label", "val", "test", "probe") for x in (f"--n-{k}", "0")]
    try:
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
        train_recs = read_records(os.path.join(out, "train.jsonl"))
        ref = [r.caption for r in read_records(os.path.join(out, "ref.jsonl"), require_image=False, check_files=False)]
        return train_recs, ref, "world.generate"
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"world.generate unavailable ({type(e).__name__}); synthetic 25-45-word captions instead",
              file=sys.stderr)
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(500)]
    caption = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(25, 45)))
    os.makedirs(os.path.join(folder, "png"), exist_ok=True)
    recs = []
    for i in range(pairs):
        path = os.path.join(folder, "png", f"{i}.png")
        Image.frombytes("RGB", (image_size, image_size), rng.randbytes(3 * image_size ** 2)).save(path)
        recs.append(Record(id=str(i), caption=caption(), image=path))
    return recs, [caption() for _ in range(n_ref)], "synthetic"


# ----------------------------------------------------------------------------- timing helpers

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_flops(device, n, reps=20):
    """FLOP/s of an n x n x n matmul, the practical ceiling: fp32 on CPU, bf16 on CUDA (what autocast uses)."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / statistics.median(timed(lambda: a @ b, device)[0] for _ in range(reps))


def cpu_seconds():
    """(CPU seconds all processes have used, CPU seconds this process has used): their difference over a
    run tells how busy other processes kept the machine meanwhile (Linux; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    me = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- the benchmark

def parts_only(cfg):
    """bench_parts alone (the H recipe, the GPT-2 comparison) on this script's data, on the CPU."""
    torch.set_num_threads(cfg.threads or os.cpu_count())
    steps, pairs = cfg.steps or 20, cfg.pairs or 512
    *_, vocab = SIZES[cfg.preset]
    tcfg = train.TrainConfig(**PRESETS[cfg.preset], device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        records, ref, _ = make_data(tmp, pairs, 500, tcfg.image_size, 0)
        tok = T.train_tokenizer(ref + [x.caption for x in records], vocab)
        records, images = load_images(records, tcfg.image_size)
    samples = make_samples(tok, records)
    for s in samples:  # PRIOR's weights need scores; their values do not change the speed
        s.inputs["p_ref"] = [0.5] * (len(s.caption_ids) + 1)
    r = {"preset": cfg.preset, "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0]}
    r.update(bench_parts.h_recipe(tcfg, tok, samples, images, steps))
    r.update(bench_parts.eval_cost(tcfg, tok, r["h_step_s_cached"], **EVAL_ROWS.get(cfg.preset, {})))
    r.update(bench_parts.reference_stack(tok.get_vocab_size(), tcfg.d_model, tcfg.n_layer, tcfg.n_head, tcfg.row_len,
                                         reps=max(steps // 2, 3)))
    print(f"python -m bench.bench --parts-only --preset {cfg.preset} --threads {r['threads']} (1-min load "
          f"average {r['load_avg_1m']:.2f} before)")
    for k, v in bench_parts.print_rows(r):
        print(f"  {k:<22}  {v}")
    return r


def main(cfg):
    if cfg.parts_only:
        r = parts_only(cfg)
        if cfg.json:
            os.makedirs(os.path.dirname(cfg.json) or ".", exist_ok=True)
            with open(cfg.json, "w") as f:
                json.dump(r, f, indent=1)
        return r
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads or os.cpu_count())
    torch.manual_seed(cfg.seed)
    steps, pairs, n_ref, mm_side, vocab = SIZES[cfg.preset]
    steps, pairs = cfg.steps or steps, cfg.pairs or pairs
    over = {k: v for k, v in (("batch_size", cfg.batch_size), ("row_len", cfg.row_len)) if v}
    tcfg = train.TrainConfig(**{**PRESETS[cfg.preset], **over}, arch=cfg.arch, device=device, compile=cfg.compile)
    r = {"preset": cfg.preset, "arch": cfg.arch, "device": torch.cuda.get_device_name(device)
         if device.startswith("cuda") else "cpu", "threads": torch.get_num_threads(), "batch_size": tcfg.batch_size,
         "row_len": tcfg.row_len, "d_model": tcfg.d_model, "n_layer": tcfg.n_layer, "compile": cfg.compile}

    with tempfile.TemporaryDirectory() as tmp:
        records, ref_captions, r["data"] = make_data(tmp, pairs, n_ref, tcfg.image_size, cfg.seed)
        tok = T.train_tokenizer(ref_captions + [x.caption for x in records], vocab)
        # Loading: decode every PNG once, as train.py does at start-up (a first pass warms the file cache).
        load_images(records[:16], tcfg.image_size)
        seconds, (records, images) = timed(lambda: load_images(records, tcfg.image_size), "cpu")
        r["loader_images_per_s"] = len(records) / seconds

    # Scoring: a reference LM the size of the preset's decoder, forward only, as score.py runs it.
    ref = Decoder(DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=tcfg.n_layer, n_head=tcfg.n_head,
                                d_model=tcfg.d_model, max_seq_len=512))
    samples = make_samples(tok, records)
    label_probs(ref, samples[:32], 512, 16, device)  # warm-up
    seconds, (p_ref, positions) = timed(lambda: label_probs(ref, samples, 512, 16, device), device)
    r["score_tokens_per_s"] = positions / seconds
    del ref
    for s, p in zip(samples, p_ref):  # PRIOR's weights come from these scores, as in training
        s.inputs["p_ref"] = p.tolist()

    # Training: one model, one optimizer; NTP and PRIOR take turns on the same step's batch.
    model = build_model(tcfg, tok).to(device)
    opt = make_optimizer(model.parameters(), tcfg.lr, tcfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_model = torch.compile(model, dynamic=True) if cfg.compile else model
    data = train.Data(samples, images, model.image_tokens())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times, counts = {"ntp": [], "prior": [], "optimizer": []}, []
    r["load_avg_1m"] = os.getloadavg()[0]  # before the timed steps: mostly other processes
    cpu0, t0 = cpu_seconds(), time.perf_counter()

    def optimize():
        torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(cfg.warmup + steps):
        for loss in (("ntp", "prior") if i % 2 else ("prior", "ntp")):  # alternate who goes first
            forward_backward, (stats, _, _) = timed(
                lambda: train.train_step(dataclasses.replace(tcfg, loss=loss), i, train_model, data, device), device)
            optimizer, _ = timed(optimize, device)
            if i >= cfg.warmup:
                times[loss].append(forward_backward + optimizer)
                times["optimizer"].append(optimizer)
                counts.append(stats)
    r["peak_memory_mb"] = peak_memory_mb(device)
    cpu1, wall = cpu_seconds(), time.perf_counter() - t0
    # cores kept busy by other processes during the timed steps (0 = a quiet machine)
    r["other_processes_cores"] = ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall if cpu0 and cpu1 else None
    r["train_step_s_ntp"] = statistics.median(times["ntp"])
    r["train_step_s_prior"] = statistics.median(times["prior"])
    # Paired: each step's PRIOR time over the same step's NTP time (same batch, moments apart), so a change
    # in machine load during the run cancels out; then the median.
    r["prior_over_ntp_step_time"] = statistics.median(p / n for p, n in zip(times["prior"], times["ntp"]))
    r["train_step_s_optimizer"] = statistics.median(times["optimizer"])  # gradient clip + AdamW, in both

    # Work per step, averaged over the timed steps (both arms see the same batches).
    mean = {k: statistics.mean(c[k] for c in counts) for k in counts[0]}
    real = mean["positions"] - mean["padding"]
    # The attention each document needs (per-document causal), and what a dense masked kernel over the row computes
    flops = step_flops(model, real, mean["tokens"], mean["images"], mean["attended"] / real)
    r["params"] = count_params(model)
    r["train_flops_per_step"] = flops
    r["train_flops_per_step_dense_rows"] = step_flops(model, real, mean["tokens"], mean["images"],
                                                            mean["context"] / real)
    r["attention_computed_over_needed"] = mean["context"] / mean["attended"]
    r["train_tokens_per_s"] = real / r["train_step_s_prior"]  # image + text positions, padding excluded
    r["train_caption_tokens_per_s"] = mean["tokens"] / r["train_step_s_prior"]
    r["train_flops_per_s"] = flops / r["train_step_s_prior"]
    r["matmul_flops_per_s"] = matmul_flops(device, 8192 if device.startswith("cuda") else mm_side)
    r["flops_fraction_of_matmul"] = r["train_flops_per_s"] / r["matmul_flops_per_s"]
    r["train_over_matmul"] = r["flops_fraction_of_matmul"]  # the name issue 23's target uses
    peak = peak_flops(device, cfg.peak_tflops)
    r["peak_flops_per_s"], r["mfu"] = peak, (r["train_flops_per_s"] / peak if peak else None)
    r["pad_fraction"] = mean["padding"] / mean["positions"]
    # What in-order (next-fit) packing, the packer's default, would pad on the same batches.
    prefix, padded, total = model.image_tokens(), 0, 0
    for i in range(cfg.warmup, cfg.warmup + steps):
        b = pack([samples[j] for j in global_batch(i, len(samples), tcfg.batch_size, tcfg.seed)],
                 tcfg.row_len, prefix)
        padded, total = padded + int((b.input_ids == T.PAD).sum()), total + b.input_ids.numel()
    r["pad_fraction_next_fit"] = padded / total
    r["loader_images_per_s_needed"] = tcfg.batch_size / r["train_step_s_prior"]
    r["loader_headroom"] = r["loader_images_per_s"] / r["loader_images_per_s_needed"]
    r.update(bench_parts.h_recipe(tcfg, tok, samples, images, steps, cfg.warmup, lambda: sync(device)))
    r.update(bench_parts.eval_cost(tcfg, tok, r["h_step_s_cached"], **EVAL_ROWS.get(cfg.preset, {})))
    r.update(bench_parts.reference_stack(tok.get_vocab_size(), tcfg.d_model, tcfg.n_layer, tcfg.n_head, tcfg.row_len,
                                         reps=max(steps // 3, 3), device=device, sync=lambda: sync(device)))

    print_table(r, cfg)
    if cfg.profile:
        prior = dataclasses.replace(tcfg, loss="prior")
        bench_parts.profile(lambda i: train.train_step(prior, i, train_model, data, device),
                device, r)
    if cfg.json:
        os.makedirs(os.path.dirname(cfg.json) or ".", exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


def print_table(r, cfg):
    g = lambda x: f"{x / 1e9:,.1f} GFLOP/s"
    rows = [
        ("setup", f"{r['preset']} ({r['arch']}-LVLM, d_model {r['d_model']} x {r['n_layer']} layers, "
                  f"{r['params'] / 1e6:.1f}M params), batch {r['batch_size']}, row_len {r['row_len']}, "
                  f"{r['device']}, {r['threads']} threads, data {r['data']}"),
        ("machine load", f"1-min load average {r['load_avg_1m']:.2f} before the steps; other processes kept "
                         + (f"{max(0.0, r['other_processes_cores']):.2f}" if r["other_processes_cores"] is not None
                            else "? ") + f" of {os.cpu_count()} cores busy during them"),
        ("train step NTP", f"{r['train_step_s_ntp'] * 1e3:,.1f} ms"),
        ("train step PRIOR", f"{r['train_step_s_prior'] * 1e3:,.1f} ms"),
        ("PRIOR / NTP step time", f"{r['prior_over_ntp_step_time']:.3f}"),
        ("train tokens/s", f"{r['train_tokens_per_s']:,.0f} (non-padding positions; "
                           f"{r['train_caption_tokens_per_s']:,.0f} caption tokens/s)"),
        ("train FLOP/s", f"{g(r['train_flops_per_s'])} ({r['train_flops_per_step'] / 1e9:,.1f} GFLOP a step needed; "
                         f"{r['train_flops_per_step_dense_rows'] / 1e9:,.1f} with attention over whole rows, "
                         f"{r['attention_computed_over_needed']:.1f}x the attention scores needed)"),
        ("matmul FLOP/s", g(r["matmul_flops_per_s"])),
        ("train / matmul", f"{r['flops_fraction_of_matmul']:.1%}"),
        ("of which optimizer", f"{r['train_step_s_optimizer'] * 1e3:,.1f} ms a step (gradient clip + AdamW)"),
        ("MFU (bf16 peak)", f"{r['mfu']:.1%} of {r['peak_flops_per_s'] / 1e12:,.0f} TFLOP/s" if r["mfu"] else
                            "n/a (CPU)" if r["device"] == "cpu" else
                            f"n/a: no peak known for {r['device']!r} (pass --peak-tflops)"),
        ("score tokens/s", f"{r['score_tokens_per_s']:,.0f}"),
        ("loader images/s", f"{r['loader_images_per_s']:,.0f} (a step consumes {r['loader_images_per_s_needed']:,.1f}"
                            f"/s: {r['loader_headroom']:,.0f}x headroom)"),
        ("padding", f"{r['pad_fraction']:.1%} of computed positions (in-order packing: "
                    f"{r['pad_fraction_next_fit']:.1%})"),
        ("peak memory", f"{r['peak_memory_mb']:,.0f} MB"),
    ] + bench_parts.print_rows(r)
    width = max(len(k) for k, _ in rows)
    print(f"\npython -m bench.bench --preset {cfg.preset}" + (f" --arch {cfg.arch}" if cfg.arch != "h" else "") +
          (" --compile" if cfg.compile else ""))
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    run(main, BenchConfig, description=__doc__)
