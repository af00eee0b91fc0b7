"""
The one reader for caption data: JSONL caption files and LLaVA pre-training JSON,
turned into a list of `Record`s, plus image decoding into one uint8 tensor.

Formats (picked by extension):
  .jsonl  one object a line: {"image": "images/000123.png", "caption": "a red circle ..."}
          image paths are relative to the JSONL file's folder (absolute paths work too);
          every other field ("id", "tags", "scene", ...) is kept in Record.extra.
          Text-only files (for the text-only reference LM) simply have no "image" key:
          read them with require_image=False (an "image" field, if any, is then resolved
          but its file is not checked: a text-only reader never opens it).
  .json   a LLaVA list [{"id", "image", "conversations": [{"from": "human", ...},
          {"from": "gpt", "value": caption}]}]; the caption is the first gpt turn, the
          human prompt and "<image>" markers are dropped.
          Default ids are "<file stem>:<line number>" (1-based) for .jsonl and
          "<file stem>:<list index>" (0-based) for .json.

Bad records are skipped, counted per reason and reported on stderr; if more than
max_bad_fraction of a file is bad we raise DataError instead of quietly training on
what is left of a corrupt file. Blank lines in a JSONL file are not records and are
ignored.

Usage:
    from data.records import read_records, load_images, normalize
    recs = read_records("data/synth/train.jsonl")
    recs, imgs = load_images(recs, size=48)      # imgs: uint8 (N, 3, 48, 48)
    x = normalize(imgs[:64].to(device))           # float32, ImageNet mean/std
"""
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool

import torch
from PIL import Image
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Record:
    id: str               # "id" field if present, else "<file stem>:<line>" / "<file stem>:<index>"
    caption: str          # stripped
    image: str | None     # absolute path, None for text-only
    extra: dict = field(default_factory=dict)  # every other field, untouched


class DataError(ValueError):
    """Bad user data; the message says which file and what is wrong with it."""


class BadRecord(Exception):
    """One bad record; args[0] is a short reason used as the counting key."""


def report_bad(what, where, bad, total, max_bad_fraction):
    """Print the skip summary and enforce the bad fraction. bad = [(location, reason, detail)]."""
    if not bad:
        return
    counts = Counter(reason for _, reason, _ in bad).most_common()
    summary = f"skipped {len(bad)} of {total} {what} in {where}: " + ", ".join(f"{r} x {n}" for r, n in counts)
    first = "\n".join(f"  {loc}: {reason}{': ' + detail if detail else ''}" for loc, reason, detail in bad[:5])
    print(summary + "\n" + first, file=sys.stderr)
    frac = len(bad) / total
    if frac > max_bad_fraction:
        raise DataError(f"{where}: {len(bad)} of {total} {what} are bad ({frac:.2%}), more than "
                        f"max_bad_fraction={max_bad_fraction:.2%}; first problems:\n{first}\n"
                        f"fix the data or raise max_bad_fraction")


def _record(obj, key, folder, require_image, check_files, llava):
    """Turn one parsed JSON object into a Record, or raise BadRecord(reason)."""
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    extra = dict(obj)
    if llava:
        turns = extra.pop("conversations", None)
        if not isinstance(turns, list):
            raise BadRecord("no conversations list")
        gpt = [t for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        if not gpt:
            raise BadRecord("no gpt turn")
        caption = gpt[0].get("value")
    else:
        if "caption" not in extra:
            raise BadRecord("missing caption")
        caption = extra.pop("caption")
    if not isinstance(caption, str):
        raise BadRecord("caption not a string")
    caption = caption.replace("<image>", "").strip() if llava else caption.strip()
    if not caption:
        raise BadRecord("empty caption")
    image = extra.pop("image", None)
    if image is None:
        if require_image:
            raise BadRecord("missing image field")
    elif not isinstance(image, str):
        raise BadRecord("image not a string")
    elif not image.strip():
        raise BadRecord("empty image path")
    else:
        image = os.path.abspath(os.path.join(folder, image))  # join keeps absolute paths as they are
        # Text-only readers (require_image=False) never look at pixels, so only check when needed.
        if check_files and require_image and not os.path.isfile(image):
            raise BadRecord("missing image file", image)
    rid = extra.pop("id", None)
    return Record(id=str(rid) if rid is not None else key, caption=caption, image=image, extra=extra)


def read_records(path, require_image=True, max_bad_fraction=0.01, check_files=True):
    """Read a .jsonl caption file or a LLaVA .json file into a list of Records (see module doc)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    ext = os.path.splitext(path)[1].lower()
    args = (folder, require_image, check_files)
    good, bad, total = [], [], 0

    def add(obj, key, loc, llava):
        try:
            good.append(_record(obj, key, *args, llava=llava))
        except BadRecord as e:
            bad.append((loc, e.args[0], e.args[1] if len(e.args) > 1 else ""))

    if ext == ".jsonl":
        with open(path, "rb") as f:  # bytes, so one non-UTF-8 line is one bad record, not a dead file
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                total += 1
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad.append((f"line {n}", "non-UTF-8 line", ""))
                    continue
                except json.JSONDecodeError as e:
                    bad.append((f"line {n}", "broken JSON", str(e)))
                    continue
                add(obj, f"{stem}:{n}", f"line {n}", llava=False)
    elif ext == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid UTF-8 JSON file ({e})") from None
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected a JSON list of LLaVA entries, got {type(entries).__name__}")
        total = len(entries)
        for i, obj in enumerate(entries):
            add(obj, f"{stem}:{i}", f"entry {i}", llava=True)
    else:
        raise DataError(f"{path}: unknown extension {ext!r}; use .jsonl (captions) or .json (LLaVA)")

    if total == 0:
        raise DataError(f"{path}: empty file, no records")
    report_bad("records", path, bad, total, max_bad_fraction)
    if not good:
        raise DataError(f"{path}: none of the {total} records is usable")
    return good


def _decode(path, size):
    """Decode one image file to RGB bytes (size*size*3, HWC), bicubic-resized to exactly size x size."""
    with Image.open(path) as im:
        im.load()  # decode now, so truncated files fail here and not later
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Composite on white: plain convert("RGB") would expose whatever colour hides
            # under transparent pixels (often black), which is not what the image shows.
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im.convert("RGBA"))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return im.tobytes()


def _to_tensor(buf, size):
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def load_image(path, size):
    """Decode one image file to uint8 (3, size, size) RGB, bicubic-resized to exactly size x size."""
    return _to_tensor(_decode(path, size), size).contiguous()


def _try_load(job):
    """Worker: (path, size) -> RGB bytes, or (reason, detail) if the file can't be decoded.

    Bytes, not tensors: torch sends tensors between processes through shared-memory
    handles, which for thousands of tiny images is ~10x slower than pickling bytes.
    """
    path, size = job
    try:
        return _decode(path, size)
    except FileNotFoundError:
        return ("missing image file", path)
    except Exception as e:  # PIL raises many types for bad files; any of them means "skip this one"
        return ("cannot decode image", f"{path}: {type(e).__name__}: {e}")


def _decode_all(jobs, workers):
    """Yield _try_load results in job order, in-process or from a Pool of `workers`."""
    if workers <= 0:
        yield from map(_try_load, jobs)
        return
    with Pool(workers) as pool:
        # imap keeps input order, so results line up with records; chunks amortize the IPC.
        yield from pool.imap(_try_load, jobs, chunksize=max(1, min(256, len(jobs) // (4 * workers))))


def load_images(records, size, max_bad_fraction=0.01, workers=0):
    """Decode every record's image once into uint8 (N, 3, size, size); drop (and report) undecodable ones.

    Returns (kept_records, images) in the input order, images[i] belonging to kept_records[i].
    """
    records = list(records)
    n = len(records)
    missing = [r.id for r in records if r.image is None]
    if missing:
        raise DataError(f"load_images: {len(missing)} records have no image (first: {missing[0]}); "
                        f"was the file read with require_image=False?")
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    kept, bad = [], []
    jobs = [(r.image, size) for r in records]
    with tqdm(total=n, desc="decoding images", unit="img", disable=not sys.stderr.isatty()) as bar:
        for rec, res in zip(records, _decode_all(jobs, workers)):
            if isinstance(res, bytes):
                out[len(kept)] = _to_tensor(res, size)
                kept.append(rec)
            else:
                bad.append((f"record {rec.id}", res[0], res[1]))
            bar.update()
    if n:
        report_bad("images", "load_images", bad, n, max_bad_fraction)
        if not kept:
            raise DataError(f"load_images: none of the {n} images could be decoded")
    return kept, out[:len(kept)]


def normalize(images_uint8):
    """uint8 (N,3,S,S) or (3,S,S) on any device -> float32 normalized with ImageNet mean/std."""
    x = images_uint8.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std
