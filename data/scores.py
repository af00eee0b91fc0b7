"""The score file: p_ref per caption label (caption tokens, then <|eos|>), written by score.py, read by train.py
and eval.py, as uint16 (p * 65535: error < 1e-5), with fingerprints of the tokenizer, the reference model, the
captions and (one-file layout) the record ids in order. Layouts: one torch.save'd file {"ids", "offsets", "p_ref",
"fingerprint"}, or (score.py --stream) an index {"format": INDEX_FORMAT, ...} with a shard per process
(scale/score_shards.py). What load_scores checks: docs/formats.md."""
import bisect
import hashlib
import os

import torch

from data.record_types import DataError
from utils import atomic_save, check_fingerprint, plugin, safe_load

INDEX_FORMAT = "prior-scores-index-1"


def quantise(p_ref):
    """Per-caption p_ref tensors -> (offsets int64 (n+1), uint16 p * 65535)."""
    offsets = torch.tensor([0] + [len(p) for p in p_ref], dtype=torch.int64).cumsum(0)
    flat = torch.cat(p_ref) if p_ref else torch.zeros(0)
    return offsets, (flat.clamp(0, 1) * 65535).round().to(torch.int32).to(torch.uint16)


def ids_fingerprint(ids):
    """A hash of record ids in their order: which scores belong to which record."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def save_scores(path, ids, p_ref, fingerprints):
    """The one-file layout (module doc), written to a temporary file and renamed: never left half-written."""
    offsets, quantised = quantise(p_ref)
    ids = list(ids)
    atomic_save({"ids": ids, "offsets": offsets, "p_ref": quantised,
                 "fingerprint": {**fingerprints, "ids": ids_fingerprint(ids)}}, path)


def _block(name, blob):
    """Check one {"ids", "offsets", "p_ref"} block; returns (ids, offsets list, float p_ref)."""
    if not isinstance(blob, dict) or not {"ids", "offsets", "p_ref"} <= set(blob):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise DataError(f"{name}: not a score file (expected keys ids, offsets, p_ref; found {keys})")
    ids, offsets, p = blob["ids"], blob["offsets"], blob["p_ref"]
    if not isinstance(p, torch.Tensor) or p.dim() != 1:
        raise DataError(f"{name}: p_ref is not a 1-d tensor")
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.is_floating_point():
        raise DataError(f"{name}: offsets are not a 1-d integer tensor")
    off = offsets.tolist()
    if (len(off) != len(ids) + 1 or off[0] != 0 or off[-1] != len(p)
            or any(b < a for a, b in zip(off[:-1], off[1:]))):
        raise DataError(f"{name}: offsets do not fit {len(ids)} records and {len(p)} scores (file damaged?)")
    if p.dtype == torch.uint16:
        values = p.to(torch.int32).float() / 65535  # always inside [0, 1]
    elif p.is_floating_point():  # hand-made score files may hold probabilities as floats: check them
        values = p.float()
        wrong = ~torch.isfinite(values) | (values < 0) | (values > 1)
        if wrong.any():
            k = int(wrong.nonzero()[0])
            rec = ids[bisect.bisect_right(off, k) - 1]  # the record whose [start, end) holds position k
            raise DataError(f"{name}: {int(wrong.sum())} scores are NaN, infinite or outside [0, 1] "
                            f"(first: {float(values[k])} in record {rec!r}); p_ref must be a probability")
    else:
        raise DataError(f"{name}: p_ref has dtype {p.dtype}; expected uint16 (score.py) or float probabilities")
    return ids, off, values


def load_scores(path, tokenizer_fp, data_fp, data_from="the training captions"):
    """{record id: p_ref float tensor}, from a one-file or an indexed score file (module doc); refuses scores
    made with another tokenizer or other captions, and damaged files, with a message naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no score file at {path}: make one with `python score.py --out {path}`")
    blob = safe_load(path, path, "a score file", DataError)  # weights-only: a score file cannot run code
    if not isinstance(blob, dict) or not isinstance(blob.get("fingerprint"), dict):
        raise DataError(f"{path}: not a score file (no fingerprint)")
    fp = blob["fingerprint"]
    for key in ("tokenizer", "data"):
        if key not in fp:
            raise DataError(f"{path}: not a score file (its fingerprint has no {key!r})")
    check_fingerprint("tokenizer", fp["tokenizer"], tokenizer_fp, path, "the tokenizer in use")
    check_fingerprint("caption data", fp["data"], data_fp, path, data_from)
    if blob.get("format") == INDEX_FORMAT:  # the indexed layout: scale/score_shards.py reads its shards
        blocks = plugin("score_index", f"the score index {path}")(path, blob)
    else:
        blocks = [_block(path, blob)]
        if "ids" in fp and ids_fingerprint(blocks[0][0]) != fp["ids"]:  # older files have none
            raise DataError(f"{path}: its record ids are not those score.py wrote (hash {ids_fingerprint(blocks[0][0])}"
                            f", written {fp['ids']}): ids were changed or reordered, so scores would go to the wrong "
                            f"records; re-run score.py")
    out = {i: values[a:b] for ids, off, values in blocks for i, a, b in zip(ids, off[:-1], off[1:])}
    n = sum(len(ids) for ids, _, _ in blocks)
    if len(out) != n:
        raise DataError(f"{path}: {n - len(out)} record ids appear more than once; every record needs its own "
                        f"id (an \"id\" field, or leave it out to get file:line ids)")
    return out
