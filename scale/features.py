"""Feature cache: the frozen H-LVLM encoder's output, computed once per image set and kept in a file.

In the paper's H-LVLM recipe (train.py --train projector) the ViT never changes, yet every step of every run
would run it again on the same images. `encoder_features` runs it once over all images and stores the patch
features (N, grid*grid, vit_dim) in FOLDER/<key>.pt; train.py and eval.py (--feature-cache FOLDER) then feed
the projector from that file (VLM.embed_images accepts the features in place of pixels).

The key (the file's name) is a hash of everything the features depend on: the encoder's weights and
architecture, the images' pixels (the uint8 tensor the run decoded), and how they are computed (CPU fp32 or
CUDA bf16 autocast). A changed encoder or image set gets a new file; the folder can hold files for several
data sets (training, probes, test) and encoders at once, and old ones are never read again (delete the
folder to reclaim the space). The file is memory-mapped on load (torch.load(mmap=True)).

Several processes may build the same file at once (two runs starting together): each writes its own
temporary file and renames it into place (atomic), so a reader sees either no file or a complete one; the
second writer wastes one encoder pass, never corrupts anything. A file that does not load, or whose stored
key or shape disagrees, is computed again.

Exactness: the cached features are what the encoder gives in the run itself, up to float rounding of the
batch size (the cache runs the encoder over 256 images at once, a step over its own batch); see
tests/test_features.py. Randomness in the encoder (dropout, drop-path) would make every step's features
differ, so an encoder with any is refused.
"""
import hashlib
import os
import sys
import uuid

import torch

from utils import autocast, register, safe_load

VERSION = "features-v1"


def random_parts(encoder):
    """Names of the encoder's modules that draw random numbers in training mode (dropout, drop-path)."""
    out = []
    for name, m in encoder.named_modules():
        dropout = isinstance(m, torch.nn.modules.dropout._DropoutNd)
        p = getattr(m, "p", None) if dropout else getattr(m, "drop_prob", None)  # timm's DropPath: drop_prob
        if p:
            out.append(name or type(m).__name__)
    return out


def feature_key(encoder, images, device):
    """Hex key of (encoder weights and architecture, the uint8 images, compute mode)."""
    h = hashlib.sha256(VERSION.encode())
    h.update(f"{type(encoder).__name__} {getattr(encoder, 'name', '')} {tuple(images.shape)}".encode())
    h.update(("cuda-bf16" if str(device).startswith("cuda") else "cpu-fp32").encode())
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(images.contiguous().view(-1).numpy().tobytes())  # the pixels themselves, not file names
    return h.hexdigest()[:32]


def compute_features(encoder, images, device, chunk=256):
    """(N, P, D) float32 features of uint8 images (N, 3, S, S), on the CPU; no autograd state."""
    from data.images import normalize
    out = []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(images), chunk):
            out.append(encoder.forward_features(normalize(images[i:i + chunk].to(device))).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _load(path, key, n):
    try:
        # a flipped byte keeps the key right: safe_load's CRC check catches it
        obj = safe_load(path, path, "a feature-cache file", mmap=True)
        if obj.get("key") == key and obj["features"].shape[0] == n:
            return obj["features"]
    except Exception:  # missing, truncated or foreign file: compute again
        pass
    return None


@register("feature_cache")
def encoder_features(encoder, images, folder, device="cpu", log=None):
    """The encoder's features of `images` (uint8, N x 3 x S x S), from FOLDER/<key>.pt or computed and stored
    there. Returns a float32 CPU tensor (N, grid*grid, D), memory-mapped from the file."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    bad = random_parts(encoder) if encoder.training else []
    if bad:
        raise ValueError(f"--feature-cache: the encoder draws random numbers ({', '.join(bad[:3])}): cached "
                         f"features would differ from the run's; train without --feature-cache")
    key = feature_key(encoder, images, device)
    path = os.path.join(folder, f"{key}.pt")
    feats = _load(path, key, len(images))
    if feats is not None:
        return feats
    if os.path.exists(path):
        log(f"--feature-cache: {path} is unreadable or incomplete; computing it again")
    os.makedirs(folder, exist_ok=True)
    feats = compute_features(encoder, images, device)
    # A temporary name unique to this process and thread, then an atomic rename: concurrent builders of the
    # same key each write a whole file, and the last rename wins with identical content.
    tmp = f"{path}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}"
    torch.save({"key": key, "features": feats, "version": VERSION}, tmp)
    os.replace(tmp, path)
    log(f"--feature-cache: encoder features of {len(images)} images -> {path}")
    return _load(path, key, len(images))
