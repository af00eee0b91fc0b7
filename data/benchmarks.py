"""Reading evaluation files: multiple-choice questions (eval.py --mc and --probes, data/qa.py's question files),
held-out captions (eval.py --test), and the paper's benchmarks as distributed (eval.py --bench, docs/benchmarks.md:
POPE json-lines, MME folders, VLMEvalKit TSVs, SEED-Bench JSON; the readers are data/bench_formats.py's), decoded
once per process, with the same --max-rows subset for every checkpoint; and report_skipped, which counts the
items a model could not score.

    from data.benchmarks import load_bench
    records, images, image_index = load_bench("pope:coco_pope_random.json::coco/val2014", size=48)"""
import base64
import json
import os
import sys

import torch

from data.records import read_records
from data.images import decode_image_bytes, load_images
from data.bench_formats import KINDS, mc_prompt, read_mme, read_pope, read_seed, read_tsv  # noqa: F401 (API)
from data.record_types import BadRecord, DataError, Record, report_bad
from lib.cli import UserError
from lib.utils import text_fingerprint

_data = {}  # data_key -> (records, uint8 images[, fingerprint of the whole file])


def data_key(kind, path, size, max_rows, seed):
    return kind, os.path.abspath(path), os.path.getmtime(path), size, max_rows, seed


def subsample(items, max_rows, seed):
    """A fixed random subset in file order, so every checkpoint sees the same rows."""
    if not max_rows or len(items) <= max_rows:
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:max_rows]
    return [items[i] for i in sorted(keep.tolist())]


def _question(obj, key, folder):
    """One MC row -> Record(caption=prompt, extra={"choices", "answer"}), or raise BadRecord(reason)."""
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    image, prompt, choices, answer = obj.get("image"), obj.get("prompt", ""), obj.get("choices"), obj.get("answer")
    if not isinstance(image, str) or not image.strip():
        raise BadRecord("missing image field")
    image = os.path.abspath(os.path.join(folder, image))
    if not os.path.isfile(image):
        raise BadRecord("missing image file", image)
    if not isinstance(prompt, str):
        raise BadRecord("prompt not a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRecord("fewer than 2 choices")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRecord("empty or non-string choice")
    if type(answer) is not int or not 0 <= answer < len(choices):  # type(): True is not a valid answer
        raise BadRecord("answer not a choice index")
    # Stripped, so that encode(prompt) + encode(choice) is the tokenisation of "prompt choice" (add_prefix_space).
    return Record(str(obj.get("id", key)), prompt.strip(), image,
                  {"choices": [c.strip() for c in choices], "answer": answer})


def read_mc(path, max_bad_fraction=0.05):
    """Valid questions of a multiple-choice JSONL file; bad rows are skipped and reported like data/records.py."""
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    good, bad, total = [], [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                good.append(_question(json.loads(raw.decode("utf-8")), f"{stem}:{n}", folder))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append((f"line {n}", "broken JSON", ""))
            except BadRecord as e:
                bad.append((f"line {n}", e.args[0], e.args[1] if len(e.args) > 1 else ""))
    if total == 0:
        raise DataError(f"{path}: no questions")
    report_bad("questions", path, bad, total, max_bad_fraction)
    if not good:
        raise DataError(f"{path}: none of the {total} questions is usable")
    return good


def load_mc(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("mc", path, size, max_rows, seed)
    if key not in _data:  # undecodable images are dropped and reported by load_images
        _data[key] = load_images(subsample(read_mc(path, max_bad_fraction), max_rows, seed), size, max_bad_fraction)
    return _data[key]


def load_test(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("test", path, size, max_rows, seed)
    if key not in _data:
        records = read_records(path, max_bad_fraction=max_bad_fraction)
        _data[key] = (*load_images(subsample(records, max_rows, seed), size, max_bad_fraction),
                      text_fingerprint(records))
    return _data[key]


def report_skipped(out, name, skipped, total, what):
    """Items longer than the model's context: counted in the results (name_skipped) and on stderr."""
    if skipped:
        out[f"{name}_skipped"] = skipped
        print(f"warning: {name}: {skipped} of {total} {what} reach past the model's context and are not scored "
              f"(counted as {name}_skipped)", file=sys.stderr)


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


def load_bench(spec, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    """(records, uint8 images (M, 3, size, size), image index of each record): each distinct image decoded once
    (POPE asks 6 questions of an image, MME 2). Undecodable images drop their questions, counted like bad rows."""
    key = ("bench", spec, size, max_rows, seed)
    if key in _data:
        return _data[key]
    records = subsample(read_bench(spec, max_bad_fraction), max_rows, seed)
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
                decoded[r.extra["image_b64"]] = decode_image_bytes(base64.b64decode(r.extra["image_b64"]), size)
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
