"""Small pieces the scripts share: device and precision, the lr schedule, fingerprints, atomic saves."""
import contextlib
import hashlib
import math
import os
import random

import torch


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def autocast(device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on CPU, where bf16 is slower."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step, max_steps, lr, warmup):
    """Linear warm-up to `lr`, then cosine decay to lr/10 at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def text_fingerprint(records):
    """Fingerprint of a caption set: ids and captions, so a score file can be matched to its data."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.id}\t{r.caption}\n".encode())
    return h.hexdigest()[:16]


def file_fingerprint(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_fingerprint(what, expected, found, expected_from, found_from):
    if expected != found:
        raise ValueError(f"{what} mismatch: {expected_from} was made with {expected}, "
                         f"but {found_from} is {found}. Re-run the step that made {expected_from}.")


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only: a checkpoint from an untrusted source cannot run code when loaded.
    return torch.load(path, map_location="cpu", weights_only=True)
