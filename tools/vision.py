"""Pretrain the H-LVLM's vision encoder on the synthetic scenes' ground truth (stage 2 of the H-LVLM recipe).

The paper's H-LVLM trains only an MLP projector between a pretrained, frozen CLIP-ViT and a pretrained,
frozen LM. We have no weights to download, so we pretrain our own small ViT here, with supervision the
generator gives us for free: every image is a 3x3 grid of cells, each empty or holding one object with a
shape, a colour and a size. The ViT learns to say, for every cell, what is in it.

    python -m world.generate --out data/synth                          # the data (once)
    python -m tools.vision --data data/synth/label.jsonl --out out/vit.pt   # this stage alone
    python train.py --arch h --init-decoder out/base_lm.pt --init-encoder out/vit.pt --train projector ...

Why per-cell heads on the patch tokens: the projector reads the ViT's patch tokens one by one, never a
pooled vector, so what the LM can learn is only what the patch tokens carry. The heads see nothing but the
mean of the patch tokens covering a cell (a fixed linear pooling, no attention of their own), and a linear
classifier on that mean: to name the object in a cell, the cell's own patch tokens must encode it, linearly.

Defaults (1000 steps of 32 images, ~7 epochs of label.jsonl's 4,750 training images) reach, on the 250
held-out images: shape 0.89, colour 1.00, size 1.00, empty-vs-object 1.00, whole scene right 0.78, in 148 s
with --threads 1 on a shared 2-core CPU (0.12-0.2 s a step). Shape is the slow one to learn; colour and size
are solved within ~300 steps. On a CPU that other jobs also use, --threads 1 is much faster than 2 (two
OpenMP threads wait on each other whenever one of them is descheduled).

Labels are positional, so augmentation must not move anything: no flips, no crops, no colour jitter (colour
is a label too). The only augmentation offered is per-pixel Gaussian noise (--pixel-noise), off by default:
at this budget the model is not yet overfitting much and 0.1 did not help (shape 0.89 vs 0.91 without).

Writes --out (the checkpoint train.py's --init-encoder reads):
    {"model": encoder state_dict, "vit_config": {image_size, patch_size, vit_dim, vit_depth, vit_heads},
     "heads": cell-head state_dict, "classes": {"shape": [...], "colour": [...], "size": [...]},
     "config": this Config as a dict, "data": text fingerprint of --data, "val_accuracy": {...}}
and next to it <out stem>.json with the validation accuracies.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from utils import (Checks, atomic_save, atomic_write, autocast, check_out, flag, lr_at, make_optimizer,
                   pick_device, run, seed_everything, text_fingerprint)
from data.records import read_records
from data.images import load_images, normalize
from data.record_types import DataError
from model import VLMConfig, build_vit, count_params

GRID = 3                                  # the generator's scenes are 3x3 grids of cells
ATTRS = ("shape", "colour", "size")       # one classifier per attribute, per cell
EMPTY = "empty"                           # class 0 of every attribute: no object in the cell
ROW_NAMES = ("top", "middle", "bottom")   # the generator writes positions as words; ints 0-2 work too
COL_NAMES = ("left", "center", "right")


@dataclass
class Config(Checks):
    data: str = flag("data/synth/label.jsonl", "JSONL with the generator's 'scene' field per record")
    out: str = flag("out/vit.pt", "checkpoint path; accuracies go to <stem>.json beside it")
    val_fraction: float = flag(0.05, "share of records held out for validation")
    image_size: int = flag(48, "images are resized to this square size")
    patch_size: int = flag(8, "ViT patch side in pixels")
    vit_dim: int = flag(192, "ViT width")
    vit_depth: int = flag(4, "ViT blocks")
    vit_heads: int = flag(3, "ViT attention heads")
    steps: int = flag(1000, "optimizer steps")
    batch_size: int = flag(32, "images per step")
    lr: float = flag(2e-3, "peak learning rate")
    warmup: int = flag(50, "linear warm-up steps, then cosine to lr/10")
    weight_decay: float = flag(0.05, "AdamW weight decay on matrices")
    grad_clip: float = flag(1.0, "gradient-norm clip (0 = no clipping)")
    pixel_noise: float = flag(0.0, "std of Gaussian noise added to normalised pixels (0 = none)")
    eval_every: int = flag(250, "print validation accuracy every N steps (0 = only at the end)")
    seed: int = flag(0, "seed for initialisation, split and batch order")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")
    workers: int = flag(0, "processes for decoding images at start-up")
    device: str = flag("auto", "auto, cpu or cuda")
    threads: int = flag(0, "torch CPU threads (0 = torch's default; 1 is fastest on a "
                        "busy shared CPU)")



# ----------------------------------------------------------------------------- labels
def cell_of(obj):
    """Cell index 0..8 (row-major) of one scene object; row/col as the generator's words or as ints 0-2."""
    out = []
    for key, names in (("row", ROW_NAMES), ("col", COL_NAMES)):
        v = obj[key]
        i = names.index(v) if v in names else v
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < GRID:
            raise ValueError(f"object {obj}: {key} must be one of {names} or 0-{GRID - 1}, got {v!r}")
        out.append(i)
    return out[0] * GRID + out[1]


def scenes_of(records, path="data"):
    """Each record's scene (list of objects), with a clear error for data that has none."""
    for r in records:
        scene = r.extra.get("scene")
        if not isinstance(scene, list):
            what = ("has no 'scene' field" if scene is None
                    else f"has a 'scene' that is not a list ({type(scene).__name__})")
            raise DataError(f"{path}: record {r.id} {what}. tools/vision.py trains on the generator's ground truth: "
                            f"use data/synth/label.jsonl or train.jsonl from `python -m world.generate`")
        for obj in scene:
            missing = [k for k in ("row", "col") + ATTRS if not isinstance(obj, dict) or k not in obj]
            if missing:
                raise DataError(f"{path}: record {r.id}: scene object {obj!r} lacks {missing}")
    return [r.extra["scene"] for r in records]


def build_classes(scenes):
    """Class names per attribute, 'empty' first, the rest sorted: the same data always gives the same ids."""
    return {a: [EMPTY] + sorted({str(o[a]) for s in scenes for o in s}) for a in ATTRS}


def scene_labels(scene, classes):
    """(GRID*GRID, len(ATTRS)) class ids: row = cell (row-major), column = attribute; 0 = empty cell."""
    ids = {a: {name: i for i, name in enumerate(classes[a])} for a in ATTRS}
    labels = torch.zeros(GRID * GRID, len(ATTRS), dtype=torch.long)
    seen = set()
    for obj in scene:
        cell = cell_of(obj)
        if cell in seen:
            raise ValueError(f"two objects in cell {cell} of scene {scene}")
        seen.add(cell)
        for j, a in enumerate(ATTRS):
            name = str(obj[a])
            if name not in ids[a]:
                raise ValueError(f"unknown {a} {name!r}; known: {classes[a][1:]}")
            labels[cell, j] = ids[a][name]
    return labels


# ----------------------------------------------------------------------------- heads
def cell_pooling(image_size, patch_size):
    """(GRID*GRID, grid*grid) matrix averaging the patch tokens that cover each cell, weighted by the
    overlap area, so it also works when cells and patches don't line up (48 px / patch 8: 2x2 patches a cell)."""
    g = image_size // patch_size
    edges = torch.arange(g + 1, dtype=torch.float64) * patch_size
    cell_edges = torch.arange(GRID + 1, dtype=torch.float64) * image_size / GRID
    lo = torch.maximum(cell_edges[:-1, None], edges[None, :-1])
    hi = torch.minimum(cell_edges[1:, None], edges[None, 1:])
    overlap = (hi - lo).clamp(min=0)                       # (GRID, g): 1-d overlap of cell row i and patch row j
    w = (overlap[:, None, :, None] * overlap[None, :, None, :]).reshape(GRID * GRID, g * g)
    return (w / w.sum(1, keepdim=True)).float()


class CellHeads(nn.Module):
    """Per cell: mean of its patch tokens -> one linear classifier per attribute. Deliberately weak (no
    attention, no hidden layer) so the encoder's patch tokens must carry the answer themselves."""

    def __init__(self, vit_dim, classes, image_size, patch_size):
        super().__init__()
        self.register_buffer("pool", cell_pooling(image_size, patch_size))
        self.heads = nn.ModuleDict({a: nn.Linear(vit_dim, len(classes[a])) for a in ATTRS})

    def forward(self, tokens):
        """tokens (N, grid*grid, D) -> {attr: logits (N, GRID*GRID, classes)}"""
        cells = torch.einsum("cp,npd->ncd", self.pool, tokens.float())
        return {a: head(cells) for a, head in self.heads.items()}


def cell_loss(logits, labels):
    """Mean cross-entropy over cells, summed over attributes."""
    return sum(F.cross_entropy(logits[a].flatten(0, 1), labels[..., j].flatten()) for j, a in enumerate(ATTRS))


@torch.no_grad()
def accuracy(encoder, heads, images, labels, device, batch=256):
    """Per-attribute accuracy. shape/colour/size: over cells that hold an object (predicting 'empty' there is
    wrong); empty: object-vs-empty over all cells, read from the shape head; scene: images with every cell
    and attribute right."""
    encoder.eval()
    preds = []
    for i in range(0, len(images), batch):
        with autocast(device):
            logits = heads(encoder.forward_features(normalize(images[i:i + batch].to(device))))
        preds.append(torch.stack([logits[a].argmax(-1) for a in ATTRS], -1).cpu())
    encoder.train()
    pred = torch.cat(preds)                                 # (N, cells, attrs)
    occupied = labels[..., 0] != 0
    right = pred == labels
    out = {a: float(right[..., j][occupied].float().mean()) for j, a in enumerate(ATTRS)}
    out["empty"] = float(((pred[..., 0] == 0) == ~occupied).float().mean())
    out["scene"] = float(right.flatten(1).all(1).float().mean())
    return out


def show(acc):
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items())


# ----------------------------------------------------------------------------- training
def main(cfg):
    t_start, cpu_start = time.time(), time.process_time()
    check_out(cfg.out)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    scenes_of(records, cfg.data)  # fail before spending time decoding images
    data_fp = text_fingerprint(records)
    records, images = load_images(records, cfg.image_size, cfg.max_bad_fraction, cfg.workers)
    scenes = scenes_of(records, cfg.data)

    # Fixed split from the seed; the vocabularies come from the training part only.
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = max(1, round(cfg.val_fraction * len(records))) if cfg.val_fraction > 0 and len(records) > 1 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    classes = build_classes([scenes[i] for i in train_idx])
    for i in val_idx:  # a class seen only in validation could never be predicted: say so instead
        for o in scenes[i]:
            for a in ATTRS:
                if str(o[a]) not in classes[a]:
                    raise DataError(f"{cfg.data}: {a} {o[a]!r} (record {records[i].id}) occurs only in the "
                                    f"validation split; use more data")
    labels = torch.stack([scene_labels(s, classes) for s in scenes])
    train_images, train_labels = images[train_idx], labels[train_idx]
    val_images, val_labels = images[val_idx], labels[val_idx]

    vit_config = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, vit_dim=cfg.vit_dim,
                      vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads)
    torch.manual_seed(cfg.seed)
    encoder = build_vit(VLMConfig(**vit_config)).to(device)
    heads = CellHeads(cfg.vit_dim, classes, cfg.image_size, cfg.patch_size).to(device)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay)
    print(f"ViT {count_params(encoder) / 1e6:.2f}M params, {cfg.image_size}px / {cfg.patch_size}px patches; "
          f"{len(train_idx)} train / {len(val_idx)} val images; classes "
          + ", ".join(f"{a} {len(c) - 1}" for a, c in classes.items()) + f"; {device}")

    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batch order and noise: own stream, reproducible
    order, pos = torch.randperm(len(train_idx), generator=gen), 0
    bar = tqdm(range(cfg.steps), desc="vit", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + cfg.batch_size > len(order):  # new epoch, new shuffle; a short tail is dropped (drop_last)
            order, pos = torch.randperm(len(train_idx), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x = normalize(train_images[idx].to(device))
        if cfg.pixel_noise > 0:
            x = x + cfg.pixel_noise * torch.randn(x.shape, generator=gen).to(device)
        with autocast(device):
            loss = cell_loss(heads(encoder.forward_features(x)), train_labels[idx].to(device))
        loss.backward()
        loss = loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        if not math.isfinite(loss) or not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite loss or gradient at step {step}; try a lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if cfg.eval_every and n_val and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            tqdm.write(f"step {step + 1}: loss {loss:.4f}  val " +
                       show(accuracy(encoder, heads, val_images, val_labels, device)))

    val_acc = accuracy(encoder, heads, val_images, val_labels, device) if n_val else {}
    seconds, cpu_seconds = time.time() - t_start, time.process_time() - cpu_start
    print(f"done in {seconds:.0f}s ({cpu_seconds:.0f} CPU-s); final loss {loss:.4f}; val accuracy: {show(val_acc)}")
    atomic_save({"model": encoder.state_dict(), "vit_config": vit_config, "heads": heads.state_dict(),
                 "classes": classes, "config": asdict(cfg), "data": data_fp, "val_accuracy": val_acc}, cfg.out)
    summary = {"val_accuracy": val_acc, "n_train": len(train_idx), "n_val": n_val, "steps": cfg.steps,
               "batch_size": cfg.batch_size, "final_loss": loss, "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu_seconds, 1), "threads": torch.get_num_threads(), "data": data_fp,
               "checkpoint": cfg.out}
    atomic_write(os.path.splitext(cfg.out)[0] + ".json", json.dumps(summary, indent=1))
    print(f"wrote {cfg.out} and {os.path.splitext(cfg.out)[0]}.json")
    return encoder, heads, summary


if __name__ == "__main__":
    run(main, Config, description=__doc__)
