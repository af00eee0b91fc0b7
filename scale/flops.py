"""FLOPs of a training step and the GPU's peak: with this plug-in ("flops") train.py's log lines carry
flops_per_s and mfu (FLOP/s over the device's dense bf16 peak); bench.py compares them with the machine's own
matmul.
"""
import sys

import torch

from data import tokenizer as T
from model import count_params
from utils import register


def step_flops(model, positions, labelled, images, context):
    """Training FLOPs (forward + backward) of the work a step needs, in the nanoGPT/PaLM accounting:
    a weight multiplying a token's vector costs 2 FLOPs per weight forward and 4 backward (the input's and
    the weight's gradient), 6 x params per token; attention (scores and mixing, 2 x 2 x d x context per
    token and layer forward) adds 12 x n_layer x d_model x context per token, forward and backward.

        decoder  (6 x non-embedding params + 12 x n_layer x d_model x context) x positions
        head     6 x d_model x vocab x labelled    (logits only where a label is; the tied embedding is
                                                    a lookup and costs nothing)
        vision   (6 x (encoder + projector params) + 12 x depth x vit_dim x patches/image) x patches

    positions: the non-padding positions of the step (padding is waste, so it does not count as work
    done); labelled: the positions with a label; images: images encoded; context: keys per query, on average:
    attended_pairs / positions for the attention each document needs (causal, inside the document; train.py
    logs this), or the row width for what a dense masked kernel computes (bench.py reports both). Frozen weights
    skip their weight gradient (4N, not 6N); like everyone we still count 6N, so numbers compare across recipes
    and papers."""
    d = model.decoder.cfg
    head = d.vocab_size * d.d_model
    flops = (6 * (count_params(model.decoder) - head) + 12 * d.n_layer * d.d_model * context) * positions
    flops += 6 * head * labelled
    patches = images * model.grid ** 2
    if model.cfg.arch == "h":
        vision = count_params(model.encoder) + count_params(model.projector)
        flops += (6 * vision + 12 * model.cfg.vit_depth * model.cfg.vit_dim * model.grid ** 2) * patches
    else:
        flops += 6 * count_params(model.patch_embed) * patches
    return flops


# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from NVIDIA's data sheets (their sparse figure / 2).
# Keys are whole words of torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); the
# longest key whose words all appear wins, so "H100 NVL" is not taken for an H100 SXM, nor "L40S" for an L40.
PEAK_BF16 = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12, "H800 PCIe": 756e12,
    "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12, "H20": 148e12,
    "A100": 312e12, "A800": 312e12, "A30": 165e12, "A10": 125e12, "A40": 150e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "B200": 2250e12, "B100": 1750e12, "GB200": 2500e12,
}


def name_words(name):
    return set(name.upper().replace("-", " ").replace("_", " ").split())


def peak_for_name(name):
    """Dense bf16 peak (FLOP/s) of a GPU by its device name (PEAK_BF16), None if the name is not known."""
    words = name_words(name)
    known = [key for key in PEAK_BF16 if name_words(key) <= words]
    return PEAK_BF16[max(known, key=lambda k: len(name_words(k)))] if known else None


def peak_flops(device, peak_tflops=0.0):
    """The GPU's dense bf16 peak (FLOP/s): peak_tflops (--peak-tflops) if given, else from PEAK_BF16 by device
    name; None on a CPU or for an unknown GPU (MFU is then not reported: pass --peak-tflops)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not str(device).startswith("cuda"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def attended_pairs(doc_ids, real):
    """Query-key pairs causal attention inside each document needs: n (n + 1) / 2 per document of n positions;
    padding (real False) counts nothing. Host tensors."""
    R, L = doc_ids.shape
    docs = (doc_ids + torch.arange(R)[:, None] * (L + 1))[real]  # unique over the batch
    n = torch.bincount(docs - docs.min()) if docs.numel() else docs
    return int((n * (n + 1) // 2).sum())


@register("attention_work")
def attention_work(batch):
    """train.count_work's attention counts of a packed batch: context (non-padding positions x row width: what a
    masked attention kernel computes) and attended pairs (what each document needs: what step_flops counts)."""
    R, L = batch.input_ids.shape
    real = batch.input_ids != T.PAD
    return ("context", int(real.sum()) * L), ("attended", attended_pairs(batch.doc_ids, real))


_told = set()  # devices already told that their peak is unknown


@register("flops")
def log_flops(cfg, model, stats, seconds, device):
    """{"flops_per_s", "mfu" (when the peak is known)} of a step's stats (train.count_work's sums)."""
    real = stats["positions"] - stats["padding"]
    flops = step_flops(model, real, stats["tokens"], stats["images"], stats["attended"] / real)
    out, peak = {"flops_per_s": flops / seconds}, peak_flops(device, cfg.peak_tflops)
    if peak:
        out["mfu"] = out["flops_per_s"] / peak
    elif str(device).startswith("cuda") and device not in _told:
        _told.add(device)
        print(f"note: no bf16 peak known for {torch.cuda.get_device_name(device)!r}: no MFU in the log "
              f"(pass --peak-tflops)", file=sys.stderr)
    return out
