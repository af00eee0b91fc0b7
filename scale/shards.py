"""
Tar shards in webdataset layout: writing them (python -m scale.shards), and the layout, specs and bad-sample rules
that scale/shard_reader.py reads them by (iter_shard_records: their Records, for read_records and every script's
--data). train.py decodes their images up front (data/images.load_images) or, with --stream, per batch from the
members' byte spans (scale/stream.py's StreamedImages).

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
caption, a broken json member, a missing image member, a shard cut off mid-member (tarfile's "unexpected end
of data"), and a shard that ends without tar's end-of-archive marker (cut at a member boundary, or a corrupt
header: whatever followed is lost and we say so), or one that is not a tar at all (counted as one bad sample:
its samples cannot be counted). An undecodable image is found when it is decoded: load_images drops and counts
it; --stream, which cannot know before its batch comes, puts a black image in its place with a warning
(StreamedImages.bad counts them).

Writing shards from any readable caption source (e.g. to try the streaming path on a JSONL):
    python -m scale.shards --data data/synth/train.jsonl --out shards/train --per-shard 5000
    # -> shards/train/000000.tar, 000001.tar, ...: key.<image ext> + key.json {"caption", "id", other fields}
"""
import contextlib
import json
import os
import tarfile
from dataclasses import dataclass

from scale.shard_reader import IMAGE_EXTS
from utils import UserError, check_out, flag, run


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
        if tf is not None:
            tf.close()
    except BaseException as e:  # a failed write (a full disk): no half-written shard (.tar.tmp) is left behind
        with contextlib.suppress(Exception):
            tf.close()
        for p in paths:
            with contextlib.suppress(OSError):
                os.remove(p + ".tmp")
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # not a missing image: a write
            raise UserError(f"{paths[-1]}: {e.strerror} while writing; no shard of it was left") from None
        raise
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
    check_out(cfg.out, "dir")
    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    paths = write_shards(records, cfg.out, cfg.per_shard)
    print(f"wrote {len(records)} samples in {len(paths)} shards to {cfg.out}")


def main(argv=None):
    return run(write, ShardsConfig, argv, description=__doc__)


if __name__ == "__main__":
    main()
