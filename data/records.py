"""
The one reader for caption data: JSONL caption files, LLaVA pre-training JSON, COCO captions and tar
shards in webdataset layout, all turned into the same `Record`s, plus image decoding into uint8 tensors.

Formats (picked by extension, then by shape):
  .jsonl  one object a line: {"image": "images/000123.png", "caption": "a red circle ..."}
          image paths are relative to the JSONL file's folder (absolute paths work too);
          every other field ("id", "tags", "scene", ...) is kept in Record.extra.
          Text-only files (for the text-only reference LM) simply have no "image" key:
          read them with require_image=False (an "image" field, if any, is then resolved
          but its file is not checked: a text-only reader never opens it).
  .json   a list: LLaVA [{"id", "image", "conversations": [{"from": "human", ...},
          {"from": "gpt", "value": caption}]}]; the caption is the first gpt turn, the
          human prompt and "<image>" markers are dropped.
  .json   an object: COCO captions {"images": [{"id", "file_name"}], "annotations":
          [{"id", "image_id", "caption"}]}, one record per caption (id: the annotation's id);
          "image_id" and other annotation fields go to Record.extra. The image folder must be
          named (see below), since COCO keeps images apart from the annotations.
  .tar    webdataset shards: members key.jpg|jpeg|png|webp and key.txt (the caption, UTF-8)
          or key.json ({"caption": ..., optional "id" and other fields}); give one shard, a
          folder of them, a glob ("shards/*.tar") or a range ("shards/{000000..000099}.tar").
          Record.image is then the shard's path and Record.image_span the member's (offset,
          size) inside it; id: the json's "id", else the key. See data/shards.py, which also
          streams shards across torchrun ranks and DataLoader workers.
  Default ids are "<file stem>:<line number>" (1-based) for .jsonl and "<file stem>:<list
  index>" (0-based) for LLaVA / COCO.

Where the images are: "path::folder" (or images_root=folder) reads image paths relative to
`folder` (relative to the current directory, like any path argument) instead of the data file's
folder. Needed for COCO (`captions_train2017.json::train2017`) and handy for LLaVA-558K, whose
"image" fields are relative to its images/ folder. Every script's --data takes this form.

Bad records are skipped, counted per reason and reported on stderr; if more than
max_bad_fraction of a file is bad we raise DataError instead of quietly training on
what is left of a corrupt file. Blank lines in a JSONL file are not records and are
ignored. `iter_records` streams the same records with a `Tally` for data too big to list.

Usage:
    from data.records import read_records, load_images, normalize
    recs = read_records("data/synth/train.jsonl")
    recs = read_records("coco/annotations/captions_train2017.json::coco/train2017")
    recs, imgs = load_images(recs, size=48)      # imgs: uint8 (N, 3, 48, 48)
    recs, imgs = load_images(recs, 48, cache="out/images_48.u8")  # the same, kept in a file, not in memory
    x = normalize(imgs[:64].to(device))           # float32, ImageNet mean/std
"""
import io
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
    id: str               # "id" field if present, else "<file stem>:<line>" / "<file stem>:<index>" / tar key
    caption: str          # stripped
    image: str | None     # absolute path (of the image, or of the tar shard holding it), None for text-only
    extra: dict = field(default_factory=dict)  # every other field, untouched
    image_span: tuple | None = None  # (offset, size) of the image's bytes inside `image` (tar member); None: whole file


class DataError(ValueError):
    """Bad user data; the message says which file and what is wrong with it."""


class BadRecord(Exception):
    """One bad record; args[0] is a short reason used as the counting key."""


class Tally:
    """Bad-record accounting of one pass over a data source, in bounded memory (counts per reason and
    the first five problems), so a stream of any length can be checked with the max-bad-fraction rule."""

    def __init__(self, what="records", where=""):
        self.what, self.where = what, where
        self.total = 0   # records seen, good or bad
        self.good = 0    # records handed on
        self.counts = Counter()
        self.first = []  # (location, reason, detail) of the first few problems

    @property
    def n_bad(self):
        return sum(self.counts.values())

    def bad(self, location, reason, detail=""):
        self.counts[reason] += 1
        if len(self.first) < 5:
            self.first.append((location, reason, detail))

    def merge(self, other):
        """Add another tally's counts (e.g. of another worker)."""
        self.total += other.total
        self.good += other.good
        self.counts.update(other.counts)
        self.first = (self.first + other.first)[:5]

    def report(self, max_bad_fraction):
        """Print the skip summary (if anything was skipped) and raise DataError above max_bad_fraction."""
        if not self.counts:
            return
        n_bad = self.n_bad
        counts = sorted(self.counts.items(), key=lambda kv: -kv[1])  # stable: first seen first among ties
        summary = (f"skipped {n_bad} of {self.total} {self.what} in {self.where}: "
                   + ", ".join(f"{r} x {n}" for r, n in counts))
        first = "\n".join(f"  {loc}: {reason}{': ' + detail if detail else ''}" for loc, reason, detail in self.first)
        print(summary + "\n" + first, file=sys.stderr)
        frac = n_bad / max(1, self.total)
        if frac > max_bad_fraction:
            raise DataError(f"{self.where}: {n_bad} of {self.total} {self.what} are bad ({frac:.2%}), more than "
                            f"max_bad_fraction={max_bad_fraction:.2%}; first problems:\n{first}\n"
                            f"fix the data or raise max_bad_fraction")

    def finish(self, max_bad_fraction):
        """The end-of-pass checks read_records makes: not empty, not too many bad, at least one good."""
        if self.total == 0:
            raise DataError(f"{self.where}: empty file, no {self.what}")
        self.report(max_bad_fraction)
        if self.good == 0:
            raise DataError(f"{self.where}: none of the {self.total} {self.what} is usable")


def report_bad(what, where, bad, total, max_bad_fraction):
    """Print the skip summary and enforce the bad fraction. bad = [(location, reason, detail)]."""
    tally = Tally(what, where)
    for loc, reason, detail in bad:
        tally.bad(loc, reason, detail)
    tally.total = total
    tally.report(max_bad_fraction)


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


def split_source(path, images_root=None):
    """'captions.json::images' -> ('captions.json', 'images'); a path that exists as it is stays whole."""
    path = os.fspath(path)
    if "::" in path and not os.path.exists(path):
        path, root = path.rsplit("::", 1)
        if images_root is not None and os.path.abspath(root) != os.path.abspath(images_root):
            raise DataError(f"{path}: two image folders given, {root!r} (after ::) and images_root={images_root!r}")
        images_root = root
    if images_root is not None and not os.path.isdir(images_root):
        raise DataError(f"{path}: image folder {images_root} does not exist")
    return path, images_root


def iter_records(path, require_image=True, check_files=True, images_root=None, tally=None):
    """Stream the Records of a data source (see the module doc); bad ones are counted in `tally`.

    Whole-file problems (no such file, not JSON, unknown format) raise DataError. The caller checks the tally
    at the end (tally.finish(max_bad_fraction)), as read_records does."""
    path, images_root = split_source(path, images_root)
    if tally is None:
        tally = Tally("records", path)
    tally.where = tally.where or path
    from data import shards  # here, not at the top: data/shards.py imports this module
    if shards.is_shard_spec(path):
        if images_root is not None:
            raise DataError(f"{path}: tar shards hold their images; an image folder ({images_root}) "
                            "makes no sense here")
        yield from shards.iter_shard_records(path, require_image, check_files, tally)
        return
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = os.path.abspath(images_root) if images_root is not None else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    ext = os.path.splitext(path)[1].lower()

    def make(obj, key, loc, llava=False):
        tally.total += 1
        try:
            rec = _record(obj, key, folder, require_image, check_files, llava)
        except BadRecord as e:
            tally.bad(loc, e.args[0], e.args[1] if len(e.args) > 1 else "")
            return None
        tally.good += 1
        return rec

    if ext == ".jsonl":
        with open(path, "rb") as f:  # bytes, so one non-UTF-8 line is one bad record, not a dead file
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8").rstrip("\r\n"))  # one line: no line 2 in the message
                except UnicodeDecodeError:
                    tally.total += 1
                    tally.bad(f"line {n}", "non-UTF-8 line")
                    continue
                except json.JSONDecodeError as e:
                    tally.total += 1
                    tally.bad(f"line {n}", "broken JSON", f"{e.msg} at column {e.colno}")
                    continue
                rec = make(obj, f"{stem}:{n}", f"line {n}")
                if rec is not None:
                    yield rec
    elif ext == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid UTF-8 JSON file ({e})") from None
        if isinstance(entries, dict) and "annotations" in entries:
            yield from _iter_coco(entries, path, stem, images_root, require_image, check_files, tally)
            return
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected a JSON list of LLaVA entries or a COCO captions object "
                            f"with \"images\" and \"annotations\", got {type(entries).__name__}")
        for i, obj in enumerate(entries):
            rec = make(obj, f"{stem}:{i}", f"entry {i}", llava=True)
            if rec is not None:
                yield rec
    else:
        raise DataError(f"{path}: unknown extension {ext!r}; use .jsonl (captions), .json (LLaVA or COCO) "
                        f"or .tar shards")


def _iter_coco(obj, path, stem, images_root, require_image, check_files, tally):
    """Records of a COCO captions file: one per annotation, its image found through image_id."""
    images, annotations = obj.get("images"), obj.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: a COCO captions file needs lists \"images\" and \"annotations\"")
    if images_root is None and require_image:
        raise DataError(f"{path}: COCO captions keep their images elsewhere; name the image folder: "
                        f"--data {path}::path/to/images (or images_root= in Python)")
    folder = os.path.abspath(images_root) if images_root is not None else os.path.dirname(os.path.abspath(path))
    names = {}
    for im in images:
        if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str):
            names[im["id"]] = im["file_name"]
    for i, ann in enumerate(annotations):
        tally.total += 1
        try:
            if not isinstance(ann, dict):
                raise BadRecord("not an object")
            image_id = ann.get("image_id")
            if not isinstance(image_id, (int, str)) or image_id not in names:
                raise BadRecord("unknown image_id", repr(image_id))
            rec = _record({**ann, "image": names[image_id]}, f"{stem}:{i}", folder, require_image, check_files,
                          llava=False)
        except BadRecord as e:
            tally.bad(f"annotation {i}", e.args[0], e.args[1] if len(e.args) > 1 else "")
            continue
        tally.good += 1
        yield rec


def read_records(path, require_image=True, max_bad_fraction=0.01, check_files=True, images_root=None):
    """Read any supported caption source (module doc) into a list of Records; bad ones skipped and counted."""
    tally = Tally("records", split_source(path, images_root)[0])
    good = list(iter_records(path, require_image, check_files, images_root, tally))
    tally.finish(max_bad_fraction)
    return good


def _open(path, span=None):
    """The image's bytes as a file object: the whole file, or `span` = (offset, size) inside it (a tar member)."""
    if span is None:
        return path
    offset, size = span
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: image member at byte {offset} is cut short ({len(data)} of {size} bytes)")
    return io.BytesIO(data)


def _decode(src, size):
    """Decode one image (a path or file object) to RGB bytes (size*size*3, HWC), bicubic-resized to size x size."""
    with Image.open(src) as im:
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


def load_image(path, size, span=None):
    """Decode one image file (or the tar member at `span` inside it) to uint8 (3, size, size) RGB."""
    return _to_tensor(_decode(_open(path, span), size), size).contiguous()


def decode_image_bytes(data, size):
    """Encoded image bytes (e.g. a tar member) -> uint8 (3, size, size) RGB; raises on undecodable bytes."""
    return _to_tensor(_decode(io.BytesIO(data), size), size).contiguous()


def _try_load(job):
    """Worker: (path, size, span) -> RGB bytes, or (reason, detail) if the image can't be decoded.

    Bytes, not tensors: torch sends tensors between processes through shared-memory
    handles, which for thousands of tiny images is ~10x slower than pickling bytes.
    """
    path, size, span = job
    try:
        return _decode(_open(path, span), size)
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
    with Pool(workers) as pool:
        # imap keeps input order, so results line up with records; chunks amortize the IPC.
        yield from pool.imap(_try_load, jobs, chunksize=max(1, min(256, len(jobs) // (4 * workers))))


def load_images(records, size, max_bad_fraction=0.01, workers=0, cache=""):
    """Decode every record's image once into uint8 (N, 3, size, size); drop (and report) undecodable ones.

    Returns (kept_records, images) in the input order, images[i] belonging to kept_records[i].
    With `cache` (a file path) the decoded images go to that file instead of memory, and the returned tensor
    maps it (torch.from_file): the OS pages in the images a batch touches, so memory stays flat however many
    images there are (LLaVA-558K at 224 px is 84 GB of pixels). A later call with the same records, size and
    image files (paths, byte sizes, modification times) maps the file again without decoding anything.
    """
    records = list(records)
    n = len(records)
    missing = [r.id for r in records if r.image is None]
    if missing:
        raise DataError(f"load_images: {len(missing)} records have no image (first: {missing[0]}); "
                        f"was the file read with require_image=False?")
    jobs = [(r.image, size, r.image_span) for r in records]
    if cache:
        return _cached_images(records, jobs, size, max_bad_fraction, workers, cache)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    kept, bad = [], []
    with tqdm(total=n, desc="decoding images", unit="img", disable=not sys.stderr.isatty()) as bar:
        for rec, res in zip(records, _decode_all(jobs, workers)):
            if isinstance(res, bytes):
                out[len(kept)] = _to_tensor(res, size)
                kept.append(rec)
            else:
                bad.append((f"record {rec.id}", res[0], res[1]))
            bar.update()
    _check_decoded(bad, kept, n, max_bad_fraction)
    return kept, out[:len(kept)]


def _check_decoded(bad, kept, n, max_bad_fraction):
    if n:
        report_bad("images", "load_images", bad, n, max_bad_fraction)
        if not kept:
            raise DataError(f"load_images: none of the {n} images could be decoded")


def _images_key(records, size):
    """What a cache file must match: the size, and each record's id and image file (path, span, bytes, mtime)."""
    import hashlib
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


def images_cached(records, size, cache):
    """Whether `cache` holds these records' images at this size (what load_images(..., cache=) would map)."""
    return _cache_meta(cache, _images_key(list(records), size), 3 * size * size) is not None


def _cached_images(records, jobs, size, max_bad_fraction, workers, cache):
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
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + ".tmp", meta_path)
    kept = [records[i] for i in meta["kept"]]
    _check_decoded([tuple(b) for b in meta["bad"]], kept, n, max_bad_fraction)
    if not kept:  # an empty input (a non-empty one with nothing decodable has raised above)
        return kept, torch.empty((0, 3, size, size), dtype=torch.uint8)
    images = torch.from_file(cache, shared=False, size=len(kept) * per_image, dtype=torch.uint8)
    return kept, images.view(len(kept), 3, size, size)


_STATS = {}  # device -> (mean, std): built once per device, not copied to the GPU at every call


def normalize(images_uint8):
    """uint8 (N,3,S,S) or (3,S,S) on any device -> float32 normalized with ImageNet mean/std."""
    x = images_uint8.float().div_(255)
    if x.device not in _STATS:
        _STATS[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1),
                            torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1))
    mean, std = _STATS[x.device]
    return (x - mean) / std
