"""
Tar shards in webdataset layout read as Records: shard specs, member headers grouped into samples, one sample's
Record. The layout, the specs and the bad-sample rules are in scale/shards.py's doc, which writes shards; train.py
--stream decodes the images of these Records per batch (scale/stream.py).
"""
import glob
import json
import os
import re
import tarfile

from data.record_types import BadRecord, DataError, Record, Tally
from utils import register


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RANGE = re.compile(r"^(.*)\{(\d+)\.\.(\d+)\}(.*)$")


def expand_shards(spec):
    """Sorted shard paths of a spec (module doc); DataError when none exist or some are missing."""
    spec = os.fspath(spec)
    m = RANGE.match(spec)
    if m:
        head, a, b, tail = m.groups()
        width = len(a)  # {000000..000099}: numbers zero-padded to the width written
        paths = [f"{head}{i:0{width}d}{tail}" for i in range(int(a), int(b) + 1)]
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    elif os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        paths = [spec]
    if not paths:
        hint = " (a folder of images? write a JSONL of them: see docs/own_data.md)" if os.path.isdir(spec) else ""
        raise DataError(f"{spec}: matches no .tar shards{hint}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})")
    return [os.path.abspath(p) for p in paths]


def _key_ext(name):
    """'dir/000123.seg.json' -> ('dir/000123', 'seg.json'): webdataset's key is the name up to the first dot."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def tar_groups(path):
    """Yield one item per sample of a shard, in order, reading only member headers:
        ("sample", key, {ext: (offset, size)})        a run of members sharing a key
        ("cut", key, detail)                          the shard broke off inside this sample
        ("shard", reason, detail)                     a problem of the whole shard (not a tar; no end marker)
    The caller reads the member bytes it needs at (offset, size) itself."""
    size = os.path.getsize(path)
    try:
        tf = tarfile.open(path, "r:")  # "r:": plain tar, seekable, so skipping an image costs one seek
    except (tarfile.TarError, OSError) as e:
        yield ("shard", "unreadable shard", f"{type(e).__name__}: {e} (its samples cannot be counted)")
        return
    key, members = None, {}
    with tf:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = _key_ext(info.name)
                if not ext:
                    continue
                if k != key:
                    if members:
                        yield ("sample", key, members)
                    key, members = k, {}
                members[ext] = (info.offset_data, info.size)
        except (tarfile.TarError, OSError) as e:  # tarfile: "unexpected end of data" for a cut member
            yield ("cut", key, f"shard cut off near byte {tf.offset} ({e})")
            return
        end = tf.offset
    if members:
        # A member running past the end of the file means the shard was cut inside it.
        last = max(off + n for off, n in members.values())
        if last > size:
            yield ("cut", key, f"shard cut off at byte {size}, inside a member ending at byte {last}")
            return
        yield ("sample", key, members)
    # tarfile stops quietly at a missing or corrupt header; a whole tar ends with zero blocks, so check.
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(512)
    if len(marker) < 512 or marker.count(0) != 512:
        yield ("shard", "no end-of-archive marker",
               f"{path} stops at byte {end} without tar's end marker: cut off or corrupt; anything after is lost")


def _read(f, span):
    offset, size = span
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise BadRecord("shard cut off mid-member", f"{len(data)} of {size} bytes at byte {offset}")
    return data


def tar_record(path, key, members, f, require_image=True, want_image_bytes=False):
    """One sample's Record (and, if asked, its image bytes) from its members; raises BadRecord(reason).
    f: the shard, open for binary reading."""
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(_read(f, members["json"]).decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRecord("non-UTF-8 json member") from None
        except json.JSONDecodeError as e:
            raise BadRecord("broken json member", str(e)) from None
        if not isinstance(meta, dict):
            raise BadRecord("json member not an object")
    if "txt" in members:
        try:
            caption = _read(f, members["txt"]).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("non-UTF-8 caption") from None
        meta.pop("caption", None)
    elif "caption" in meta:
        caption = meta.pop("caption")
    else:
        raise BadRecord("missing caption member")
    if not isinstance(caption, str):
        raise BadRecord("caption not a string")
    caption = caption.strip()
    if not caption:
        raise BadRecord("empty caption")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    image = span = data = None
    if ext is None:
        if require_image:
            raise BadRecord("missing image member")
    else:
        image, span = path, members[ext]
        if want_image_bytes:
            data = _read(f, span)
    rid = meta.pop("id", None)
    return Record(id=str(rid) if rid is not None else key, caption=caption, image=image, extra=meta,
                  image_span=span), data


@register("shards")
def iter_shard_records(spec, require_image=True, check_files=True, tally=None):
    """Records of every sample of every shard, in order (data/records.iter_records for .tar specs).
    check_files is accepted for symmetry: a member cut off by the end of the file is always caught. A broken shard
    is a bad record and a broken shard in `tally` (Tally.broken: the bad fraction counts shards too)."""
    tally = tally if tally is not None else Tally("records", spec)
    for path in expand_shards(spec):
        tally.shards += 1
        with open(path, "rb") as f:
            for kind, key, detail in tar_groups(path):
                tally.total += 1
                if kind == "shard":
                    tally.bad(path, key, detail)
                    tally.broken.append((path, key))
                    continue
                if kind == "cut":
                    tally.bad(f"{path}:{key}", "shard cut off mid-member", detail)
                    tally.broken.append((path, "shard cut off mid-member"))
                    continue
                try:
                    rec, _ = tar_record(path, key, detail, f, require_image)
                except BadRecord as e:
                    tally.bad(f"{path}:{key}", e.args[0], e.args[1] if len(e.args) > 1 else "")
                    continue
                tally.good += 1
                yield rec
