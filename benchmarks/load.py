"""Reading evaluation files: multiple-choice questions (eval.py --mc and --probes, benchmarks/qa.py's question files),
held-out captions (eval.py --test), and the paper's benchmarks as distributed (eval.py --bench, docs/benchmarks.md:
POPE json-lines, MME folders, VLMEvalKit TSVs, SEED-Bench JSON; the readers are benchmarks/formats.py's), decoded
once per process, with the same --max-rows subset for every checkpoint; and report_skipped, which counts the
items a model could not score.

    from benchmarks.load import load_bench
    records, images, image_index = load_bench("pope:coco_pope_random.json::coco/val2014", size=48)"""
import base64
import io
import json
import os
import sys

import torch

from benchmarks.formats import KINDS, mc_prompt, read_mme, read_pope, read_seed, read_tsv  # noqa: F401 (API)
from data.images import load_image, load_images
from data.record_types import DataError, report_bad
from eval import _data, data_key, load_mc, read_mc, report_skipped, subsample  # noqa: F401 (API)
from utils import UserError

# ----------------------------------------------------------------------------- the paper's benchmarks (--bench)
def parse_bench(spec):
    """'kind:path[::images]' -> (kind, path, images or None); kinds: KINDS (seed_tsv/mmstar/mmbench: TSVs).
    A bad spec is the user's mistake (UserError: eval.py prints it as one line)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise UserError(f"--bench {spec!r}: expected KIND:PATH[::IMAGE_FOLDER], KIND one of {', '.join(KINDS)}")
    path, images = rest.split("::", 1) if "::" in rest else (rest, None)
    if not os.path.exists(path):
        raise UserError(f"--bench {spec!r}: {path} does not exist")
    if images is not None and not os.path.isdir(images):
        raise UserError(f"--bench {spec!r}: image folder {images} does not exist")
    return kind, path, images


def read_bench(spec, max_bad_fraction=0.05):
    """The Records of one --bench spec (parse_bench)."""
    kind, path, images = parse_bench(spec)
    if kind in ("pope", "mme") and path.endswith(".tsv"):  # VLMEvalKit's POPE.tsv / MME.tsv
        return read_tsv(path, kind, max_bad_fraction)
    if kind == "pope":
        return read_pope(path, images, max_bad_fraction)
    if kind == "mme":
        return read_mme(path, max_bad_fraction)
    if kind == "seed":
        return read_seed(path, images, max_bad_fraction)
    return read_tsv(path, kind, max_bad_fraction)


def unit_of(record):
    """The whole a --max-rows subset keeps or drops together: an MME image (its two questions: acc+ pairs them), a
    POPE image (all its questions), an MMBench question with its circular copies (group = index % 1e6); any other
    question alone."""
    e = record.extra
    if e.get("bench") == "mme":
        return e["image_key"]
    if e.get("bench") == "pope":
        return record.image or e["image_id"]
    return e.get("group", record.id)


def subsample_units(records, max_rows, seed):
    """A fixed random subset of whole units (unit_of), in file order: units in a seeded random order are taken until
    max_rows questions are reached (so a little over max_rows when the last unit has several). eval.subsample
    draws single rows, which would split an image's MME pair or a question's rotations and bias acc+ / circular."""
    if not max_rows or len(records) <= max_rows:
        return records
    units = {}
    for i, r in enumerate(records):
        units.setdefault(unit_of(r), []).append(i)
    groups = list(units.values())
    keep = []
    for u in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(keep) >= max_rows:
            break
        keep += groups[u]
    return [records[i] for i in sorted(keep)]


def load_bench(spec, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    """(records, uint8 images (M, 3, size, size), image index of each record): each distinct image decoded once
    (POPE asks 6 questions of an image, MME 2). Undecodable images drop their questions, counted like bad rows.
    max_rows: a fixed subset of whole units (subsample_units)."""
    key = ("bench", spec, size, max_rows, seed)
    if key in _data:
        return _data[key]
    records = subsample_units(read_bench(spec, max_bad_fraction), max_rows, seed)
    first = {}
    for r in records:
        first.setdefault(r.image or r.extra["image_b64"], r)
    uniq = list(first.values())
    if uniq[0].image is not None:
        kept, images = load_images(uniq, size, max_bad_fraction)
        at = {r.image: i for i, r in enumerate(kept)}
        keep = [r for r in records if r.image in at]
        index = [at[r.image] for r in keep]
    else:
        decoded, bad = {}, []
        for r in uniq:
            try:
                decoded[r.extra["image_b64"]] = load_image(io.BytesIO(base64.b64decode(r.extra["image_b64"])), size)
            except Exception as e:  # binascii.Error or any of PIL's errors: this image is unusable
                bad.append((f"row {r.id}", "cannot decode base64 image", f"{type(e).__name__}: {e}"))
        report_bad("images", spec, bad, len(uniq), max_bad_fraction)
        if not decoded:
            raise DataError(f"{spec}: none of the {len(uniq)} images decodes")
        at = {k: i for i, k in enumerate(decoded)}
        keep = [r for r in records if r.extra["image_b64"] in at]
        index = [at[r.extra["image_b64"]] for r in keep]
        images = torch.stack(list(decoded.values()))
        for r in keep:
            r.extra.pop("image_b64", None)  # decoded once: the base64 text need not stay in memory
    _data[key] = keep, images, index
    return _data[key]
