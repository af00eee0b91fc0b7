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
    from scale.shards import ShardStream
    ds = ShardStream("shards/{000000..000099}.tar", image_size=48, shuffle=True)   # rank/world from torchrun
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2):
            batch["id"], batch["caption"], batch["image"]   # lists, and uint8 (32, 3, 48, 48)

Writing shards from any readable caption source (e.g. to try the streaming path on a JSONL):
    python -m scale.shards --data data/synth/train.jsonl --out shards/train --per-shard 5000
    # -> shards/train/000000.tar, 000001.tar, ...: key.<image ext> + key.json {"caption", "id", other fields}

Split: the shards (shuffled per epoch with a seed every rank shares) are dealt round-robin to the
world * num_workers readers; when there are fewer shards than readers, every reader walks all shards and
keeps every (world * num_workers)-th sample instead, so nothing is duplicated or lost either way.
"""
import json
import os
import random
import tarfile
from dataclasses import dataclass

import torch

from data.images import decode_image_bytes
from data.record_types import BadRecord, Tally
from scale.shard_reader import IMAGE_EXTS, expand_shards, tar_groups, tar_record
from utils import UserError, flag, run


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


@dataclass
class ShardsConfig:
    data: str = flag("", "required: any caption source read_records reads (.jsonl, LLaVA/COCO .json with "
                         "::folder, .tar)")
    out: str = flag("", "required: folder for the shards 000000.tar, 000001.tar, ...")
    per_shard: int = flag(10000, "samples per shard", min=1)
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")


def write(cfg):
    """`python -m scale.shards`: read --data, write it as shards into --out."""
    from data.records import read_records
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    paths = write_shards(records, cfg.out, cfg.per_shard)
    print(f"wrote {len(records)} samples in {len(paths)} shards to {cfg.out}")


def main(argv=None):
    return run(write, ShardsConfig, argv, description=__doc__)


if __name__ == "__main__":
    main()
