"""Small pieces the scripts share: device and precision, the lr schedule and optimizer, fingerprints, atomic saves,
and the one checked load path (safe_load: no code runs, damaged bytes are refused; load_checkpoint: and the kind)."""
import contextlib
import errno
import hashlib
import math
import os
import pickle
import random
import shutil
import zipfile

import torch

from lib.cli import UserError


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
        raise UserError(f"{what} mismatch: {expected_from} was made with {expected}, "
                         f"but {found_from} is {found}. Re-run the step that made {expected_from}.")


def _disk_full(e):
    """Is `e` what a full disk raises during torch.save? OSError ENOSPC, or torch's zip writer's RuntimeError
    ("unexpected pos ...", its only words for a short write)."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e)))


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint. A write
    that fails (a full disk: one line saying so) removes the temporary file and leaves the old one as it was."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _disk_full(e):
            free = shutil.disk_usage(folder).free
            old = "the previous file is intact" if os.path.exists(path) else "no file was left"
            raise UserError(f"{path}: no space left on the device ({free / 2**20:.1f} MiB free in {folder}) while "
                            f"saving; {old}, and no {os.path.basename(tmp)}: free some space and run again") from None
        raise


def check_zip(path, name, what="a checkpoint", error=UserError):
    """Refuse a damaged file: torch.save writes a zip whose every member carries a CRC-32, which torch.load never
    checks (a flipped byte loads as a wrong weight). zipfile.testzip reads each member and checks it: cheaper than
    a stored sha256 (measured in docs/formats.md), and old files carry the CRCs too. Not a zip: left to torch.load."""
    if not isinstance(path, (str, os.PathLike)) or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # a damaged member header: zipfile cannot even walk the members
        bad = f"? ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    if bad is not None:
        raise error(f"{name}: damaged: its member {bad} fails the zip CRC check (bytes changed since it was saved); "
                    f"it is not {what} as it was written: make it again, or copy it again") from None


def safe_load(source, name, what="a checkpoint", error=UserError, mmap=False):
    """torch.load with weights_only=True, so a file from an untrusted source cannot run code when loaded, after
    check_zip (a damaged file is refused); every failure becomes one `error` that names the file (never torch's
    advice to retry with weights_only=False). mmap: map the tensors from the file (a path) instead of reading them."""
    check_zip(source, name, what, error)
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as e:  # objects a weights-only load refuses (not any file pickle cannot read:
        if "global" not in str(e).lower():  # a JSON or text file is not a pickle at all: "Unsupported operand")
            detail = next((x.strip() for x in str(e).splitlines() if x.strip().startswith("Unsupported")), "")
            detail = ": " + detail if detail else ""
            raise error(f"{name}: cannot read it as {what} (not a file torch.save wrote{detail}); is it the right "
                        f"file?") from None
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise error(f"{name}: holds Python objects that a safe (weights-only) load refuses"
                    f"{' (' + culprit + ')' if culprit else ''}; it is not {what} made by this project, and "
                    f"loading it unsafely could run code: not loaded") from None
    except Exception as e:  # a file cut short, or not a torch file at all
        first_line = (str(e).splitlines() or [""])[0][:300]
        raise error(f"{name}: cannot read it as {what} ({type(e).__name__}: {first_line}); it may be cut short "
                    f"or made by something else") from None


KINDS = {"vlm": "a train.py checkpoint (a VLM)", "lm": "a reference_lm.py checkpoint (a language model)",
         "vit": "a tools/vision.py checkpoint (a ViT encoder)", "scores": "a score file (score.py or baselines/)",
         "score-index": "a sharded score file's index (score.py)", "state-dict": "a bare state dict (no config)",
         "unknown": "no checkpoint this project writes"}


def checkpoint_kind(ckpt):
    """Which of KINDS a loaded file is, told by the keys each script writes."""
    if isinstance(ckpt, dict):
        for key, kind in (("model_config", "vlm"), ("decoder_config", "lm"), ("vit_config", "vit"),
                          ("p_ref", "scores"), ("shards", "score-index")):
            if key in ckpt:
                return kind
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return "state-dict"
    return "unknown"


def load_checkpoint(path, kind=None, flag=""):
    """A checkpoint, loaded safely; with `kind` (a KINDS key), one line naming the file, what it is and what was
    expected when it is another kind (never a KeyError further on). flag: the option that named it, for the message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}no checkpoint at {path}")
    ckpt = safe_load(path, f"{flag}: {path}" if flag else path)
    found = checkpoint_kind(ckpt)
    if kind is not None and found != kind:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is {KINDS[found]}, not {KINDS[kind]} as expected")
    return ckpt


def make_optimizer(params, lr, weight_decay):
    """AdamW with decay on matrices only (norms, biases and 1-d gains are not decayed)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)
