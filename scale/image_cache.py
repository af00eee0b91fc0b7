"""--image-cache FILE: load_images through a file the returned tensor maps (torch.from_file), so the OS pages in
the images a batch touches and memory stays flat however many images there are (LLaVA-558K at 224 px is 84 GB of
pixels). A later call with the same records, size and image files (paths, byte sizes, modification times) maps the
file again without decoding anything. data.images.load_images' plug-in "image_cache"; "image_cache_ready" tells
train.py's other ranks when rank 0 has written it.
"""
import hashlib
import json
import os
import sys

import torch
from tqdm import tqdm

from data.images import _decode_all, _to_tensor, check_decoded
from utils import register


def _images_key(records, size):
    """What a cache file must match: the size, and each record's id and image file (path, span, bytes, mtime)."""
    h = hashlib.sha256(f"v1 {size}".encode())
    stats = {}
    for r in records:
        if r.image not in stats:
            try:
                st = os.stat(r.image)
                stats[r.image] = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                stats[r.image] = "missing"
        h.update(f"\n{r.id}\t{r.image}\t{r.image_span}\t{stats[r.image]}".encode())
    return h.hexdigest()


def _cache_meta(cache, key, per_image):
    """The cache's .json if it is complete and made from these images (key), else None."""
    try:
        meta = json.load(open(cache + ".json"))
        if meta.get("key") == key and os.path.getsize(cache) == len(meta["kept"]) * per_image:
            return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


@register("image_cache_ready")
def images_cached(records, size, cache):
    """Whether `cache` holds these records' images at this size (what load_images(..., cache=) would map)."""
    return _cache_meta(cache, _images_key(list(records), size), 3 * size * size) is not None


@register("image_cache")
def cached_images(records, jobs, size, max_bad_fraction, workers, cache):
    """load_images through a file: `cache` holds the kept images' pixels back to back, `cache`.json the key,
    which records were kept and why the others were not. The .json is written last, so a run killed while
    decoding leaves no cache that looks complete."""
    n, per_image = len(records), 3 * size * size
    key, meta_path = _images_key(records, size), cache + ".json"
    meta = _cache_meta(cache, key, per_image)
    if meta is None and os.path.exists(meta_path):
        print(f"load_images: {cache} was made from other images or settings; decoding again", file=sys.stderr)
    if meta is None:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        kept_index, bad = [], []
        with open(tmp, "wb") as f, tqdm(total=n, desc=f"decoding images to {os.path.basename(cache)}", unit="img",
                                        disable=not sys.stderr.isatty()) as bar:
            for i, (rec, res) in enumerate(zip(records, _decode_all(jobs, workers))):
                if isinstance(res, bytes):  # HWC bytes; the file holds CHW, as the tensor does
                    f.write(_to_tensor(res, size).contiguous().numpy().tobytes())
                    kept_index.append(i)
                else:
                    bad.append((f"record {rec.id}", res[0], res[1]))
                bar.update()
        os.replace(tmp, cache)
        meta = {"key": key, "size": size, "n": n, "kept": kept_index, "bad": bad}
        with open(f"{meta_path}.tmp{os.getpid()}", "w") as f:  # per process: runs may decode side by side
            json.dump(meta, f)
        os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)
    kept = [records[i] for i in meta["kept"]]
    check_decoded([tuple(b) for b in meta["bad"]], kept, n, max_bad_fraction)
    if not kept:  # an empty input (a non-empty one with nothing decodable has raised above)
        return kept, torch.empty((0, 3, size, size), dtype=torch.uint8)
    images = torch.from_file(cache, shared=False, size=len(kept) * per_image, dtype=torch.uint8)
    return kept, images.view(len(kept), 3, size, size)
