"""
The one reader for caption data: JSONL caption files, LLaVA pre-training JSON, COCO captions and tar
shards in webdataset layout, all turned into the same `Record`s (data/record_types.py); data/images.py decodes
their images into uint8 tensors.

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
          size) inside it; id: the json's "id", else the key. See scale/shards.py, which also
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
    from data.records import read_records
    from data.images import load_images, normalize
    recs = read_records("data/synth/train.jsonl")
    recs = read_records("coco/annotations/captions_train2017.json::coco/train2017")
    recs, imgs = load_images(recs, size=48)      # imgs: uint8 (N, 3, 48, 48)
    recs, imgs = load_images(recs, 48, cache="out/images_48.u8")  # the same, kept in a file, not in memory
    x = normalize(imgs[:64].to(device))           # float32, ImageNet mean/std
"""
import json
import os

from data.record_types import BadRecord, DataError, Record, Tally
from utils import plugin


def is_shard_spec(path):
    """True for tar shards: a .tar path, glob or range, or a folder (read by scale/shard_reader.py)."""
    path = os.fspath(path)
    return path.lower().endswith(".tar") or os.path.isdir(path)


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
    if is_shard_spec(path):
        if images_root is not None:
            raise DataError(f"{path}: tar shards hold their images; an image folder ({images_root}) "
                            "makes no sense here")
        yield from plugin("shards", f"tar shards ({path})")(path, require_image, check_files, tally)
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
