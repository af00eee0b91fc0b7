"""
Tar shards in webdataset layout: reading them as Records, and streaming them across torchrun ranks and
DataLoader workers with every sample seen exactly once per epoch.

Layout: each sample is a run of consecutive members sharing a key (the member name up to the first dot of
its file name): key.jpg|jpeg|png|webp (the image) and key.txt (the caption, UTF-8) or key.json
({"caption": ..., "id": optional, any other fields}); when both exist the .txt is the caption and the
json's other fields go to Record.extra. Other members are ignored. Shards are read with the standard
library's tarfile, one member header at a time, so a shard of any size needs no memory beyond one sample.

Shard specs (anything read_records / every script's --data accepts ending in .tar):
    shards/000000.tar                 one shard
    shards/                           every *.tar in a folder
    "shards/*.tar"                    a glob (quote it, so the shell leaves it alone)
    "shards/{000000..000099}.tar"     a webdataset-style range

Bad samples are skipped and counted with the same rule as data/records.py: a missing or non-UTF-8
caption, a broken json member, a missing image member, an undecodable image (when streaming decoded
images), a shard cut off mid-member (tarfile's "unexpected end of data"), and a shard that ends without
tar's end-of-archive marker (cut at a member boundary, or a corrupt header: whatever followed is lost and
we say so), or one that is not a tar at all (counted as one bad sample: its samples cannot be counted).

Usage:
    from data.shards import ShardStream
    ds = ShardStream("shards/{000000..000099}.tar", image_size=48, shuffle=True)   # rank/world from torchrun
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2):
            batch["id"], batch["caption"], batch["image"]   # lists, and uint8 (32, 3, 48, 48)

Writing shards from any readable caption source (e.g. to try the streaming path on a JSONL):
    python -m data.shards --data data/synth/train.jsonl --out shards/train --per-shard 5000
    # -> shards/train/000000.tar, 000001.tar, ...: key.<image ext> + key.json {"caption", "id", other fields}

Split: the shards (shuffled per epoch with a seed every rank shares) are dealt round-robin to the
world * num_workers readers; when there are fewer shards than readers, every reader walks all shards and
keeps every (world * num_workers)-th sample instead, so nothing is duplicated or lost either way.
"""
import glob
import json
import os
import random
import re
import tarfile

import torch

from data.records import BadRecord, DataError, Record, Tally, decode_image_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RANGE = re.compile(r"^(.*)\{(\d+)\.\.(\d+)\}(.*)$")


def is_shard_spec(path):
    """True for what expand_shards reads: a .tar path, glob or range, or a folder."""
    path = os.fspath(path)
    return path.lower().endswith(".tar") or os.path.isdir(path)


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


def iter_shard_records(spec, require_image=True, check_files=True, tally=None):
    """Records of every sample of every shard, in order (data/records.iter_records for .tar specs).
    check_files is accepted for symmetry: a member cut off by the end of the file is always caught."""
    tally = tally if tally is not None else Tally("records", spec)
    for path in expand_shards(spec):
        with open(path, "rb") as f:
            for kind, key, detail in tar_groups(path):
                tally.total += 1
                if kind == "shard":
                    tally.bad(path, key, detail)
                    continue
                if kind == "cut":
                    tally.bad(f"{path}:{key}", "shard cut off mid-member", detail)
                    continue
                try:
                    rec, _ = tar_record(path, key, detail, f, require_image)
                except BadRecord as e:
                    tally.bad(f"{path}:{key}", e.args[0], e.args[1] if len(e.args) > 1 else "")
                    continue
                tally.good += 1
                yield rec


def _rank_world():
    """This process's (rank, world): from torch.distributed when it is running, else torchrun's env."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(torch.utils.data.IterableDataset):
    """Samples {"id", "caption", "image"} of tar shards, each to exactly one (rank, DataLoader worker).

    image_size: decode images to uint8 (3, S, S); None keeps the encoded bytes (no decoding, no check).
    rank / world: default to torch.distributed's or torchrun's; pass them to run a share by hand.
    shuffle: shard order (and the samples within a reader, through a buffer of shuffle_buffer) changes
    with set_epoch(e), the same way on every rank. Each reader checks its own bad fraction at its end."""

    def __init__(self, spec, image_size=None, rank=None, world=None, shuffle=False, seed=0,
                 shuffle_buffer=0, require_image=True, max_bad_fraction=0.01):
        super().__init__()
        self.spec, self.shards = spec, expand_shards(spec)
        self.image_size, self.rank, self.world = image_size, rank, world
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.require_image, self.max_bad_fraction = require_image, max_bad_fraction
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def plan(self, rank, world, worker, workers):
        """(shards this reader walks, keep every n-th sample, starting at sample k): the split of the module doc."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1000003 + self.epoch).shuffle(shards)
        readers, me = world * workers, rank * workers + worker
        if len(shards) >= readers:
            return shards[me::readers], 1, 0
        return shards, readers, me

    def __iter__(self):
        rank, world = _rank_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world if self.world is not None else world
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards, stride, start = self.plan(rank, world, worker, workers)
        tally = Tally("samples", f"{self.spec} (rank {rank} of {world}, worker {worker} of {workers})")
        samples = self._samples(shards, stride, start, tally)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = _buffer_shuffle(samples, self.shuffle_buffer,
                                      random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}"))
        yield from samples
        if tally.total:  # a reader with nothing to read has nothing to report
            tally.report(self.max_bad_fraction)

    def _samples(self, shards, stride, start, tally):
        n = -1
        for path in shards:
            with open(path, "rb") as f:
                for kind, key, detail in tar_groups(path):
                    if kind == "shard":  # counted once, by the reader that owns sample 0 of a shared walk
                        if start == 0:
                            tally.total += 1
                            tally.bad(path, key, detail)
                        continue
                    n += 1
                    if n % stride != start:
                        continue
                    tally.total += 1
                    loc = f"{path}:{key}"
                    if kind == "cut":
                        tally.bad(loc, "shard cut off mid-member", detail)
                        continue
                    try:
                        rec, data = tar_record(path, key, detail, f, self.require_image, want_image_bytes=True)
                    except BadRecord as e:
                        tally.bad(loc, e.args[0], e.args[1] if len(e.args) > 1 else "")
                        continue
                    sample = {"id": rec.id, "caption": rec.caption}
                    if data is not None:
                        if self.image_size:
                            try:
                                sample["image"] = decode_image_bytes(data, self.image_size)
                            except Exception as e:  # PIL raises many types for bad bytes: skip and count
                                tally.bad(loc, "cannot decode image", f"{type(e).__name__}: {e}")
                                continue
                        else:
                            sample["image"] = data
                    tally.good += 1
                    yield sample


def _buffer_shuffle(items, size, rng):
    """Shuffle a stream through a buffer of `size` items (webdataset's trick: no need to hold an epoch)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _image_ext(data, name=""):
    """Member extension for an image: its file's, when the reader knows it, else sniffed from the bytes.
    (Pixels are decoded by content, so a BMP stored as .png still decodes; the name only has to be known.)"""
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    if ext in IMAGE_EXTS:
        return ext
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[8:12] == b"WEBP":
        return "webp"
    return "png"


def write_shards(records, out, per_shard=10000):
    """Write Records (with image files) as webdataset shards out/000000.tar, ... ; returns the shard paths.
    Each sample: <n>.<image ext> (the file's bytes, not re-encoded) and <n>.json {"caption", "id", extra}."""
    import io
    os.makedirs(out, exist_ok=True)
    paths, tf = [], None
    try:
        for n, rec in enumerate(records):
            if n % per_shard == 0:
                if tf is not None:
                    tf.close()
                paths.append(os.path.join(out, f"{n // per_shard:06d}.tar"))
                tf = tarfile.open(paths[-1] + ".tmp", "w")
            key = f"{n:09d}"
            members = [("json", json.dumps({"caption": rec.caption, "id": rec.id, **rec.extra}).encode())]
            if rec.image is not None:
                with open(rec.image, "rb") as f:
                    if rec.image_span is not None:
                        f.seek(rec.image_span[0])
                    data = f.read(rec.image_span[1] if rec.image_span is not None else -1)
                ext = _image_ext(data, rec.image if rec.image_span is None else "")
                members.insert(0, (ext, data))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    finally:
        if tf is not None:
            tf.close()
    for p in paths:  # renamed only when complete, so a crash never leaves a shard that looks whole
        os.replace(p + ".tmp", p)
    return paths


def main(argv=None):
    import argparse
    from data.records import read_records
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="any caption source read_records reads (.jsonl, LLaVA/COCO .json with ::folder, .tar)")
    parser.add_argument("--out", required=True, help="folder for the shards 000000.tar, 000001.tar, ...")
    parser.add_argument("--per-shard", type=int, default=10000, help="samples per shard (default: 10000)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="stop if more than this share of records is bad (default: 0.01)")
    args = parser.parse_args(argv)
    records = read_records(args.data, max_bad_fraction=args.max_bad_fraction)
    paths = write_shards(records, args.out, args.per_shard)
    print(f"wrote {len(records)} samples in {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    main()
