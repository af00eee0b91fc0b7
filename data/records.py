"""The one reader for caption data: JSONL (text-only files have no "image"), LLaVA pre-training JSON, COCO captions
("captions.json::image_folder") and, through the "shards" plug-in (scale/shard_reader.py), webdataset tar shards,
all as `Record`s (data/record_types.py). Formats and bad records: docs/formats.md and docs/own_data.md.

    recs = read_records("coco/annotations/captions_train2017.json::coco/train2017")
"""
import json
import os

from data.record_types import BadRecord, DataError, Record, Tally
from utils import plugin


def _record(obj, key, folder, require_image, check_files, llava=False, coco_names=None):
    """One JSON value (or a JSONL line's bytes) -> Record, or raise BadRecord(reason[, detail])."""
    if isinstance(obj, bytes):
        try:
            obj = json.loads(obj.decode("utf-8").rstrip("\r\n"))  # one line: no line 2 in the message
        except UnicodeDecodeError:
            raise BadRecord("non-UTF-8 line") from None
        except json.JSONDecodeError as e:
            raise BadRecord("broken JSON", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    extra = dict(obj)  # every field but caption, image and id stays in Record.extra
    if coco_names is not None:  # a COCO annotation names its image by image_id
        image_id = extra.get("image_id")
        if not isinstance(image_id, (int, str)) or image_id not in coco_names:
            raise BadRecord("unknown image_id", repr(image_id))
        extra["image"] = coco_names[image_id]
    if llava:  # the caption is the first gpt turn; the human prompt and "<image>" markers are dropped
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


def _lines(path, stem):
    """(bytes, default id, location) of each non-blank line: bytes, so one non-UTF-8 line is one bad record."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield raw, f"{stem}:{n}", f"line {n}"


def iter_records(path, require_image=True, check_files=True, images_root=None, tally=None):
    """Stream the Records of a data source; bad ones are counted in `tally`, whole-file problems raise DataError.
    The caller checks the tally at the end (tally.finish(max_bad_fraction)), as read_records does."""
    path, images_root = split_source(path, images_root)
    tally = Tally("records", path) if tally is None else tally
    tally.where = tally.where or path
    if path.lower().endswith(".tar") or os.path.isdir(path):  # tar shards: a .tar path, glob, range or folder
        if images_root is not None:
            raise DataError(f"{path}: tar shards hold their images; an image folder ({images_root}) "
                            "makes no sense here")
        yield from plugin("shards", f"tar shards ({path})")(path, require_image, check_files, tally)
        return
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = os.path.abspath(images_root) if images_root is not None else os.path.dirname(os.path.abspath(path))
    stem, ext = os.path.splitext(os.path.basename(path))
    llava, names = False, None
    if ext.lower() == ".jsonl":
        items = _lines(path, stem)
    elif ext.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a valid UTF-8 JSON file ({e})") from None
        where = "entry"
        if isinstance(entries, dict) and "annotations" in entries:  # COCO: one record per caption
            images, entries, where = entries.get("images"), entries["annotations"], "annotation"
            if not isinstance(images, list) or not isinstance(entries, list):
                raise DataError(f"{path}: a COCO captions file needs lists \"images\" and \"annotations\"")
            if images_root is None and require_image:
                raise DataError(f"{path}: COCO captions keep their images elsewhere; name the image folder: "
                                f"--data {path}::path/to/images (or images_root= in Python)")
            names = {im["id"]: im["file_name"] for im in images if isinstance(im, dict)
                     and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str)}
        elif isinstance(entries, list):
            llava = True
        else:
            raise DataError(f"{path}: expected a JSON list of LLaVA entries or a COCO captions object "
                            f"with \"images\" and \"annotations\", got {type(entries).__name__}")
        items = ((obj, f"{stem}:{i}", f"{where} {i}") for i, obj in enumerate(entries))
    else:
        raise DataError(f"{path}: unknown extension {ext.lower()!r}; use .jsonl (captions), .json (LLaVA or COCO) "
                        f"or .tar shards")
    for obj, key, location in items:
        tally.total += 1
        try:
            rec = _record(obj, key, folder, require_image, check_files, llava, names)
        except BadRecord as e:
            tally.bad(location, *e.args)
            continue
        tally.good += 1
        yield rec


def read_records(path, require_image=True, max_bad_fraction=0.01, check_files=True, images_root=None):
    """Read any supported caption source into a list of Records; bad ones skipped, counted and reported."""
    tally = Tally("records")
    good = list(iter_records(path, require_image, check_files, images_root, tally))
    tally.finish(max_bad_fraction)
    return good
