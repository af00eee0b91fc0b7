"""Image decoding for data/records.py's Records: one image (file or tar member) to a uint8 (3, size, size) RGB
tensor, a whole record list at once (undecodable images skipped and reported like bad records), and the ImageNet
normalisation the models see: `recs, imgs = load_images(recs, 48)`, `x = normalize(imgs[:64].to(device))`."""
import io
import sys
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from data.record_types import DataError, report_bad
from utils import plugin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _decode(path, size, span=None):
    """Decode one image (a file name or object, or the tar member at `span` = (offset, length) inside the file) to
    RGB bytes (size*size*3, HWC), bicubic-resized to size x size."""
    if span is not None:
        offset, length = span
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise OSError(f"{path}: image member at byte {offset} is cut short ({len(data)} of {length} bytes)")
        path = io.BytesIO(data)
    with Image.open(path) as im:
        im.load()  # decode now, so truncated files fail here and not later
        ImageOps.exif_transpose(im, in_place=True)  # a camera's EXIF orientation: upright, as a viewer shows it
        if im.mode.startswith("I") or im.mode == "F":
            # 16-bit or float greyscale: convert("RGB") would clip the values at 255 (a 16-bit 39% grey would come
            # out white), so map them by value to 8 bits: I;16* and I (PIL's 16-bit greyscale) / 257, F as 0..1
            a = np.asarray(im).astype(np.float64)
            a = a * 255 if im.mode == "F" else a / 257
            im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-d uint8: mode L
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # composite on white: convert("RGB") would show whatever colour hides under transparent pixels
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im.convert("RGBA"))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return im.tobytes()


def _to_tensor(buf, size):
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def load_image(path, size, span=None):
    """_decode's image (io.BytesIO(data) for bytes in memory) as uint8 (3, size, size) RGB; raises if undecodable."""
    return _to_tensor(_decode(path, size, span), size).contiguous()


def _try_load(job):
    """Worker: (path, size, span) -> RGB bytes, or (reason, detail) if the image can't be decoded. Bytes, not
    tensors: torch sends tensors between processes through shared memory, ~10x slower for many tiny images."""
    path, size, span = job
    try:
        return _decode(path, size, span)
    except FileNotFoundError:
        return ("missing image file", path)
    except Exception as e:  # PIL raises many types for bad files; any of them means "skip this one"
        where = path if span is None else f"{path} at byte {span[0]}"
        return ("cannot decode image", f"{where}: {type(e).__name__}: {e}")


def _decode_all(jobs, workers):
    """Yield _try_load results in job order, in-process or from a Pool of `workers`."""
    if workers <= 0:
        yield from map(_try_load, jobs)
        return
    with Pool(workers) as pool:  # imap keeps the order; chunks amortise the IPC
        yield from pool.imap(_try_load, jobs, chunksize=max(1, min(256, len(jobs) // (4 * workers))))


def load_images(records, size, max_bad_fraction=0.01, workers=0, cache=""):
    """Decode every record's image into uint8 (N, 3, size, size), dropping (and reporting) undecodable ones:
    (kept_records, images) in the input order. With `cache` (--image-cache) the tensor maps a file instead."""
    records = list(records)
    n = len(records)
    missing = [r.id for r in records if r.image is None]
    if missing:
        raise DataError(f"load_images: {len(missing)} records have no image (first: {missing[0]}); "
                        f"was the file read with require_image=False?")
    jobs = [(r.image, size, r.image_span) for r in records]
    if cache:
        return plugin("image_cache", "--image-cache")(records, jobs, size, max_bad_fraction, workers, cache)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    kept, bad = [], []
    for rec, res in tqdm(zip(records, _decode_all(jobs, workers)), total=n, desc="decoding images", unit="img",
                         disable=not sys.stderr.isatty()):
        if isinstance(res, bytes):
            out[len(kept)] = _to_tensor(res, size)
            kept.append(rec)
        else:
            bad.append((f"record {rec.id}", res[0], res[1]))
    check_decoded(bad, kept, n, max_bad_fraction)
    return kept, out[:len(kept)]


def check_decoded(bad, kept, n, max_bad_fraction):
    if n:
        report_bad("images", "load_images", bad, n, max_bad_fraction)
        if not kept:
            raise DataError(f"load_images: none of the {n} images could be decoded")


_STATS = {}  # device -> (mean, std): built once per device, not copied to the GPU at every call


def normalize(images_uint8):
    """uint8 (N,3,S,S) or (3,S,S) on any device -> float32 normalized with ImageNet mean/std."""
    x = images_uint8.float().div_(255)
    if x.device not in _STATS:
        _STATS[x.device] = torch.tensor([IMAGENET_MEAN, IMAGENET_STD], device=x.device).view(2, 3, 1, 1)
    mean, std = _STATS[x.device]
    return (x - mean) / std
