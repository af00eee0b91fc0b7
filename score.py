"""Offline token scoring: p_ref(t_i | t_<i) from the text-only reference LM for every caption token.

    python score.py --ref out/ref_lm.pt --data data/synth/train.jsonl --out out/scores_train.pt
    # big data: one shard file per process, scored and written in chunks (memory stays flat), and an index
    torchrun --standalone --nproc_per_node=4 score.py --ref out/ref_lm.pt --data "shards/{000000..000099}.tar" \\
        --out out/scores_train.pt
    python score.py --stream ...     # the same streaming, sharded format from one process

Stored per caption, aligned with the training tokenisation (the labels: caption tokens, then <|eos|>), as
uint16 (p * 65535, so 2 bytes a token and error < 1e-5), with a fingerprint of the tokenizer, the reference
model and the caption data. Training derives w = (1 - p_ref)^alpha itself, so alpha stays a training flag.

Two layouts, both read by load_scores(path, ...) -> {record id: float tensor}:
  one file   (default, one process): torch.save of {"ids", "offsets", "p_ref", "fingerprint"}.
  indexed    (--stream, or any run under torchrun): --out is a small index {"format", "shards": [{"file",
             "bytes", "sha256", "records", "tokens"}], "fingerprint"}, and each process r of N writes
             <out stem>.shards/rank-0000r-of-0000N.bin: a magic line, then frames (8-byte little-endian
             length + a torch.save'd dict): chunks {"ids", "offsets", "p_ref"}, then one end frame. Records
             are dealt round-robin (record i to rank i % N). Every process reads the captions twice: once
             for the data fingerprint and the bad-record check (cheap: no model), once to score its share;
             rank 0 writes the index after all shards are closed, and the reader checks each shard's size and
             sha256 against it, so a shard cut short, missing or from another run is refused by name.

Captions longer than the reference LM's context (min(--row-len, the model's max_seq_len) positions) are
scored on the tokens that fit; the rest get p_ref = 0, i.e. weight 1, as plain NTP would give them. They are
counted and reported, never dropped, so every record keeps one score per label.

When the captions carry the generator's ground-truth word tags (image, glue, boiler, noise), it reports how
well the weights find image-related tokens (ROC-AUC, mean weight per category, the share of each category
that the reference LM predicts with p_ref > 0.5) and draws a picture like the
paper's Fig. 1: a few captions with each token shaded by its weight (with --stream: on the first
--report-captions captions of rank 0's share).

Flags in detail: --data takes LLaVA/COCO JSON as path::image_folder. With --batch-rows, --row-len is also the
tokens per forward pass. --stream keeps memory flat as data grows.
"""
import bisect
import hashlib
import io
import json
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import tokenizer as T
from cli import parse_config
from data.record_types import DataError, Tally
from data.records import iter_records, read_records
from health import weight_collapse
from reference_lm import caption_samples, load_lm
from utils import (atomic_save, check_fingerprint, file_fingerprint, pick_device, safe_load,
                   text_fingerprint)

CATEGORIES = ("image", "boiler", "noise", "glue")  # the generator's word tags (data/generate.py)
INDEX_FORMAT = "prior-scores-index-1"
SHARD_MAGIC = b"PRIOR-SCORES-SHARD-1\n"


@dataclass
class ScoreConfig:
    ref: str = field(default="out/ref_lm.pt", metadata={"help": "reference LM checkpoint from reference_lm.py"})
    tokenizer: str = field(default="out/tokenizer.json",
                           metadata={"help": "tokenizer.json the reference LM was trained with"})
    data: str = field(default="data/synth/train.jsonl",
                      metadata={"help": "caption data to score (the VLM's training data): .jsonl, LLaVA/COCO "
                                        ".json, .tar shards"})
    out: str = field(default="out/scores_train.pt",
                     metadata={"help": "score file (or, with --stream / torchrun, index file) to write; report .json "
                                       "and .png beside it"})
    row_len: int = field(default=512,
                         metadata={"help": "longest caption scored whole (capped by the model's context); tokens per "
                                           "row of a forward pass"})
    batch_rows: int = field(default=16,
                            metadata={"help": "a forward pass holds up to row_len x batch_rows tokens (captions "
                                              "of one length)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    stream: bool = field(default=False,
                         metadata={"help": "score in chunks, write a shard per process and an index at --out (always "
                                           "on under torchrun)"})
    chunk: int = field(default=2048, metadata={"help": "with --stream: captions scored and written at a time"})
    report_captions: int = field(default=2000,
                                 metadata={"help": "with --stream: captions (the first of rank 0's share) kept for the "
                                                   "relevance report and picture"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more than this share of records is bad"})


def context_len(model, row_len):
    """Longest sample (bos + caption, in positions) the reference LM scores in one piece."""
    return min(row_len, model.cfg.max_seq_len)


def count_overlong(samples, ctx):
    """(captions longer than ctx positions, their labels past it): what gets p_ref = 0 (module doc)."""
    over = [len(s.caption_ids) + 1 - ctx for s in samples if len(s.caption_ids) + 1 > ctx]
    return len(over), sum(over)


@torch.inference_mode()
def label_probs(model, samples, row_len, batch_rows, device, progress=True):
    """p_ref of every label of every sample, as one tensor per sample (forward only), and the positions run.

    Captions are grouped by length and each batch holds captions of one length, row_len * batch_rows tokens
    at most: no padding at all, and no cross-document mask, so attention is the fast causal kernel over one
    caption (~30 positions) instead of a masked pass over a packed 512-position row, most of whose scores
    the mask throws away. (Training packs, because it needs batches of random captions; scoring may order
    them as it likes.) A caption longer than the model's context is scored on its first ctx labels (ctx
    positions: <|bos|> and ctx - 1 tokens); its later labels (and <|eos|>) get 0 (see the module doc;
    count_overlong counts exactly those)."""
    model.eval().to(device)
    ctx = context_len(model, row_len)
    clipped = [s.caption_ids if len(s.caption_ids) + 1 <= ctx else s.caption_ids[:ctx] for s in samples]
    by_length = {}
    for i, ids in enumerate(clipped):
        by_length.setdefault(len(ids), []).append(i)
    out, positions = [None] * len(samples), 0
    bar = tqdm(total=len(samples), desc="score", dynamic_ncols=True, disable=not progress)
    for n, members in sorted(by_length.items()):
        per_batch = max(1, row_len * batch_rows // (n + 1))
        for start in range(0, len(members), per_batch):
            chunk = members[start:start + per_batch]
            # (B, n + 2); a clipped caption (n = ctx, only clipped ones are that long) ends without <|eos|>
            seqs = torch.tensor([[T.BOS] + list(clipped[i]) + ([T.EOS] if n < ctx else []) for i in chunk])
            inputs, labels = seqs[:, :-1].to(device), seqs[:, 1:].to(device)
            # float32 on every device, autocast off: under bf16 autocast p_ref moves and a score
            # file would depend on the device that wrote it. Scoring is forward only, a small share of the work.
            with torch.autocast(torch.device(device).type, enabled=False):
                logits = model(inputs)
            logp = logits.float().log_softmax(-1).gather(2, labels[..., None]).squeeze(2)
            for i, p in zip(chunk, logp.exp().cpu()):
                out[i] = p
            positions += inputs.numel()
            bar.update(len(chunk))
    bar.close()
    for i, s in enumerate(samples):
        if len(clipped[i]) < len(s.caption_ids):  # the labels past the context: p_ref 0
            out[i] = torch.cat([out[i], out[i].new_zeros(len(s.caption_ids) + 1 - len(clipped[i]))])
    return out, positions


def quantise(p_ref):
    """Per-caption p_ref tensors -> (offsets int64 (n+1), uint16 p * 65535)."""
    offsets = torch.tensor([0] + [len(p) for p in p_ref], dtype=torch.int64).cumsum(0)
    flat = torch.cat(p_ref) if p_ref else torch.zeros(0)
    return offsets, (flat.clamp(0, 1) * 65535).round().to(torch.int32).to(torch.uint16)


def save_scores(path, ids, p_ref, fingerprints):
    """The one-file layout (module doc), written to a temporary file and renamed: never left half-written."""
    offsets, quantised = quantise(p_ref)
    atomic_save({"ids": list(ids), "offsets": offsets, "p_ref": quantised, "fingerprint": fingerprints}, path)


# ----------------------------------------------------------------------------- reading score files

def _torch_load(source, name):
    """A weights-only torch.load (a score file cannot run code), every failure a DataError naming the file."""
    return safe_load(source, name, "a score file", DataError)


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


def _read_frames(path):
    """Frames of a shard file (module doc), checking the magic and that no frame is cut short.
    Yields dicts; returns the sha256 of the whole file via StopIteration.value (see _load_shard)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        magic = f.read(len(SHARD_MAGIC))
        sha.update(magic)
        if magic != SHARD_MAGIC:
            raise DataError(f"{path}: not a score shard (bad magic)")
        while True:
            head = f.read(8)
            if not head:
                return sha.hexdigest()
            sha.update(head)
            if len(head) != 8:
                raise DataError(f"{path}: cut short inside a frame header")
            (n,) = struct.unpack("<Q", head)
            data = f.read(n)
            sha.update(data)
            if len(data) != n:
                raise DataError(f"{path}: cut short: a frame of {n} bytes has only {len(data)}")
            yield _torch_load(io.BytesIO(data), path)


def _load_shard(path):
    """(blocks, end frame, sha256) of one shard file; refuses a shard without its end frame."""
    blocks, end, frames = [], None, _read_frames(path)
    while True:
        try:
            frame = next(frames)
        except StopIteration as stop:
            sha = stop.value
            break
        if isinstance(frame, dict) and frame.get("end"):
            end = frame
        else:
            blocks.append(_block(path, frame))
    if end is None:
        raise DataError(f"{path}: incomplete shard (no end frame): its process stopped early; re-run score.py")
    return blocks, end, sha


def load_scores(path, tokenizer_fp, data_fp, data_from="the training captions"):
    """{record id: p_ref float tensor}, from a one-file or an indexed score file (module doc); refuses scores
    made with another tokenizer or other captions, and damaged files, with a message naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no score file at {path}: make one with `python score.py --out {path}`")
    blob = _torch_load(path, path)
    if not isinstance(blob, dict) or not isinstance(blob.get("fingerprint"), dict):
        raise DataError(f"{path}: not a score file (no fingerprint)")
    fp = blob["fingerprint"]
    for key in ("tokenizer", "data"):
        if key not in fp:
            raise DataError(f"{path}: not a score file (its fingerprint has no {key!r})")
    check_fingerprint("tokenizer", fp["tokenizer"], tokenizer_fp, path, "the tokenizer in use")
    check_fingerprint("caption data", fp["data"], data_fp, path, data_from)
    if blob.get("format") == INDEX_FORMAT:
        blocks = _load_index(path, blob)
    else:
        blocks = [_block(path, blob)]
    out, n = {}, 0
    for ids, off, values in blocks:
        n += len(ids)
        for i, a, b in zip(ids, off[:-1], off[1:]):
            out[i] = values[a:b]
    if len(out) != n:
        raise DataError(f"{path}: {n - len(out)} record ids appear more than once; every record needs its own "
                        f"id (an \"id\" field, or leave it out to get file:line ids)")
    return out


def _load_index(path, index):
    folder = os.path.dirname(os.path.abspath(path))
    blocks = []
    for s in index["shards"]:
        shard = os.path.join(folder, s["file"])
        if not os.path.isfile(shard):
            raise DataError(f"{path}: its shard {shard} is missing")
        size = os.path.getsize(shard)
        if size != s["bytes"]:
            raise DataError(f"{shard}: {size} bytes, but the index {path} says {s['bytes']}: the shard is cut "
                            f"short or from another run; re-run score.py")
        got, end, sha = _load_shard(shard)
        if sha != s["sha256"]:
            raise DataError(f"{shard}: content (sha256 {sha[:16]}) differs from what the index {path} recorded "
                            f"({s['sha256'][:16]}): damaged or from another run; re-run score.py")
        if sum(len(ids) for ids, _, _ in got) != s["records"]:
            raise DataError(f"{shard}: holds {sum(len(ids) for ids, _, _ in got)} records, the index says "
                            f"{s['records']}")
        blocks += got
    return blocks


# ----------------------------------------------------------------------------- writing shards

def shard_path(out, rank, world):
    return os.path.join(os.path.splitext(out)[0] + ".shards", f"rank-{rank:05d}-of-{world:05d}.bin")


class ShardWriter:
    """One process's shard (module doc), written frame by frame to a temporary name and renamed on close,
    so a shard under its final name is always complete; its size and sha256 are known without re-reading."""

    def __init__(self, path):
        self.path, self.tmp = path, path + ".tmp"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = self.records = self.tokens = 0
        self._write(SHARD_MAGIC)

    def _write(self, data):
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def _frame(self, obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        self._write(struct.pack("<Q", len(data)))
        self._write(data)

    def write(self, ids, p_ref):
        offsets, quantised = quantise(p_ref)
        self._frame({"ids": list(ids), "offsets": offsets, "p_ref": quantised})
        self.records += len(ids)
        self.tokens += len(quantised)

    def close(self, **end):
        self._frame({"end": True, "records": self.records, "tokens": self.tokens, **end})
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest(), "records": self.records, "tokens": self.tokens}


# ----------------------------------------------------------------------------- report and picture

def roc_auc(pos, neg):
    """P(a random positive scores above a random negative), ties count half (Mann-Whitney U)."""
    scores = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(scores)
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank of tied values, 1-based
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def token_tags(tok, records):
    """Category id (index into CATEGORIES) of each label, -1 for <|eos|> or untagged words."""
    if any(not isinstance(r.extra.get("tags"), list) for r in records):
        return None
    word_index = T.token_word_index(tok, [r.caption for r in records])
    out, wrong = [], []
    for r, index in zip(records, word_index):
        words = r.extra["tags"]
        if len(words) != len([w for w in r.caption.split(" ") if w]) or any(w not in CATEGORIES for w in words):
            wrong.append(r.id)  # tags that do not fit the caption are not ground truth: leave them out
            out.append([-1] * (len(index) + 1))
            continue
        out.append([CATEGORIES.index(words[w]) if w >= 0 else -1 for w in index] + [-1])
    if wrong:
        print(f"{len(wrong)} records have tags that do not match their caption's words (first: {wrong[0]}); "
              f"their tokens count as untagged", file=sys.stderr)
    return out


def relevance_report(p_ref, tags):
    w = torch.cat(p_ref).clamp(0, 1)
    w = 1 - w  # alpha = 1, the paper's default
    t = torch.tensor([c for row in tags for c in row])
    by = {name: w[t == i] for i, name in enumerate(CATEGORIES)}
    other = torch.cat([by["boiler"], by["noise"]])
    report = {"mean_w": {k: float(v.mean()) if len(v) else None for k, v in by.items()},
              "share": {k: len(v) / max(1, int((t >= 0).sum())) for k, v in by.items()},
              # tokens the reference LM predicts well (p_ref > 0.5, w < 0.5): for image words, PRIOR's risk
              "predicted": {k: float((v < 0.5).float().mean()) if len(v) else None for k, v in by.items()}}
    report["auc"] = {}
    for name, neg in (("image_vs_boiler", by["boiler"]), ("image_vs_noise", by["noise"]), ("image_vs_rest", other)):
        report["auc"][name] = roc_auc(by["image"], neg) if len(by["image"]) and len(neg) else None
    return report


def draw_weights(path, tok, records, samples, p_ref, n=6):
    """The paper's Fig. 1 in miniature: tokens shaded by w = 1 - p_ref (darker = more weight)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(samples))
    fig = plt.figure(figsize=(14, 0.75 * n + 0.6))
    cmap = plt.get_cmap("Reds")
    for row in range(n):
        y = 1 - (row + 0.8) / (n + 0.3)
        x = 0.005
        for token_id, p in zip(samples[row].caption_ids, p_ref[row].tolist()):
            text = tok.decode([token_id]).replace(" ", "")
            w = 1 - p
            fig.text(x, y, text, family="monospace", fontsize=9, color="white" if w > 0.6 else "black",
                     bbox=dict(boxstyle="square,pad=0.15", fc=cmap(w), ec="none"))
            x += 0.0072 * (len(text) + 1)
            if x > 0.97:
                x, y = 0.005, y - 0.3 / (n + 0.3)
    fig.text(0.005, 0.01, "token weight w = 1 - p_ref (white = 0, dark red = 1)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _relevance(report, tok, records, samples, p_ref):
    tags = token_tags(tok, records)
    if tags is None:
        return
    report["relevance"] = rel = relevance_report(p_ref, tags)
    print("mean weight w = 1 - p_ref by ground-truth category: " +
          ", ".join(f"{k} {v:.3f} ({rel['share'][k]:.0%} of tokens)"
                    for k, v in rel["mean_w"].items() if v is not None))
    print("ROC-AUC of w for image-related tokens: " +
          ", ".join(f"{k} {v:.3f}" for k, v in rel["auc"].items() if v is not None))
    print("share predicted by the reference LM (p_ref > 0.5): " +
          ", ".join(f"{k} {v:.3f}" for k, v in rel["predicted"].items() if v is not None))


def _overlong_note(n_long, n_labels, ctx, where):
    if n_long:
        print(f"{where}: {n_long} captions are longer than the reference LM's context of {ctx} positions; "
              f"their {n_labels} labels past it got p_ref = 0 (weight 1, as in NTP)", file=sys.stderr)


def _write_report(cfg, report, tok, records, samples, p_ref):
    base = os.path.splitext(cfg.out)[0]
    if p_ref:  # do the weights collapse (a memorising reference LM)? health.weight_collapse, numbers in the report
        report["weights"], warning = weight_collapse(p_ref)
        if warning:
            report["weights"]["warning"] = warning
            print(warning, file=sys.stderr)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    if samples:
        draw_weights(base + ".png", tok, records, samples, p_ref)
    print(f"saved {cfg.out}, {base}.json, {base}.png")


# ----------------------------------------------------------------------------- the two modes

def refuse_duplicate_ids(ids, path):
    """Scores are keyed by record id: two records with one id cannot both be scored (train.py would refuse the
    file later), so scoring refuses them first."""
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(f"{path}: {len(dup)} record ids appear more than once (first: {dup[0]!r}); every record "
                        f"needs its own id (an \"id\" field, or leave it out to get file:line ids)")


def fingerprints_of(cfg, tok, data_fp):
    return {"tokenizer": T.fingerprint(tok), "reference": file_fingerprint(cfg.ref), "data": data_fp,
            "data_path": os.path.abspath(cfg.data), "reference_path": os.path.abspath(cfg.ref)}


def warn_if_trained_on(cfg, ckpt, data_fp):
    if ckpt["data"] == data_fp:
        print(f"WARNING: {cfg.ref} was trained on these very captions; its scores will be inflated "
              "(the paper scores captions disjoint from the reference LM's training set)")


def score_one_file(cfg, tok, model, ckpt, device):
    """Everything in memory, one file out (the default for one process)."""
    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    refuse_duplicate_ids((r.id for r in records), cfg.data)
    data_fp = text_fingerprint(records)
    warn_if_trained_on(cfg, ckpt, data_fp)
    samples = caption_samples(tok, records)
    ctx = context_len(model, cfg.row_len)
    n_long, n_past = count_overlong(samples, ctx)
    t0 = time.perf_counter()
    p_ref, positions = label_probs(model, samples, cfg.row_len, cfg.batch_rows, device)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(p) for p in p_ref) - n_past  # labels scored; those past the context are counted apart
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    save_scores(cfg.out, [r.id for r in records], p_ref, fingerprints_of(cfg, tok, data_fp))
    _overlong_note(n_long, n_past, ctx, cfg.data)
    report = {"config": asdict(cfg), "captions": len(records), "tokens": n_tokens,
              "pad_fraction": 1 - n_tokens / positions, "score_tokens_per_s": positions / seconds,
              "ref_train_tokens_per_s": ckpt.get("train_tokens_per_s"),
              "overlong": {"captions": n_long, "labels_past_context": n_past, "context": ctx}}
    print(f"scored {len(records)} captions, {n_tokens} tokens in {seconds:.1f}s: "
          f"{report['score_tokens_per_s']:,.0f} tokens/s scoring vs "
          f"{report['ref_train_tokens_per_s'] or float('nan'):,.0f} tokens/s reference-LM training "
          f"({report['score_tokens_per_s'] / (report['ref_train_tokens_per_s'] or float('nan')):.1f}x)")
    _relevance(report, tok, records, samples, p_ref)
    _write_report(cfg, report, tok, records, samples, p_ref)
    return report


def data_pass(cfg):
    """First pass of the streaming mode: (number of records, data fingerprint), and the bad-record check.
    The fingerprint is utils.text_fingerprint's, fed one record at a time."""
    tally, h, n, ids = Tally("records", cfg.data), hashlib.sha256(), 0, []
    for r in iter_records(cfg.data, tally=tally):
        h.update(f"{r.id}\t{r.caption}\n".encode())
        ids.append(r.id)
        n += 1
    tally.finish(cfg.max_bad_fraction)
    refuse_duplicate_ids(ids, cfg.data)
    return n, h.hexdigest()[:16]


def score_stream(cfg, tok, model, ckpt, device, rank, world):
    """This process's share, scored and written chunk by chunk; rank 0 then writes the index (module doc)."""
    n_records, data_fp = data_pass(cfg)
    if rank == 0:
        warn_if_trained_on(cfg, ckpt, data_fp)
        if os.path.exists(cfg.out):  # an old index must not outlive the shards this run rewrites
            os.remove(cfg.out)
    fingerprints = fingerprints_of(cfg, tok, data_fp)
    writer = ShardWriter(shard_path(cfg.out, rank, world))
    ctx = context_len(model, cfg.row_len)
    kept = {"records": [], "samples": [], "p_ref": []}  # rank 0's first captions, for the report
    stats = {"positions": 0, "seconds": 0.0, "long": 0, "past": 0}

    def flush(chunk):
        samples = caption_samples(tok, chunk)
        n_long, n_past = count_overlong(samples, ctx)
        t0 = time.perf_counter()
        p_ref, positions = label_probs(model, samples, cfg.row_len, cfg.batch_rows, device, progress=False)
        stats["seconds"] += time.perf_counter() - t0
        stats["positions"] += positions
        stats["long"] += n_long
        stats["past"] += n_past
        writer.write([r.id for r in chunk], p_ref)
        room = cfg.report_captions - len(kept["records"]) if rank == 0 else 0
        if room > 0:
            kept["records"] += chunk[:room]
            kept["samples"] += samples[:room]
            kept["p_ref"] += p_ref[:room]

    chunk = []
    bar = tqdm(total=n_records, desc=f"score (rank {rank} of {world})", dynamic_ncols=True, disable=rank != 0)
    # The second pass reads exactly the records of the first (same file, same rules): record i is rank i % world's.
    for i, r in enumerate(iter_records(cfg.data, tally=Tally("records", cfg.data))):
        bar.update()
        if i % world != rank:
            continue
        chunk.append(r)
        if len(chunk) >= cfg.chunk:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    bar.close()
    summary = writer.close(rank=rank, world=world, fingerprint=fingerprints, overlong=stats["long"])
    summary["file"] = os.path.relpath(writer.path, os.path.dirname(os.path.abspath(cfg.out)))
    _overlong_note(stats["long"], stats["past"], ctx, f"{cfg.data} (rank {rank})")

    summaries = [None] * world
    if world > 1:
        dist.all_gather_object(summaries, summary)  # also the barrier: every shard is closed after this
    else:
        summaries = [summary]
    if rank != 0:
        return None
    records, tokens = sum(s["records"] for s in summaries), sum(s["tokens"] for s in summaries)
    if records != n_records:
        raise DataError(f"{cfg.data}: the shards hold {records} records but the data has {n_records}: "
                        f"did the data change while scoring?")
    atomic_save({"format": INDEX_FORMAT, "shards": summaries, "records": records, "tokens": tokens,
                 "fingerprint": fingerprints}, cfg.out)
    per_s = stats["positions"] / max(stats["seconds"], 1e-9)
    report = {"config": asdict(cfg), "captions": records, "tokens": tokens, "processes": world,
              "score_tokens_per_s": per_s, "score_tokens_per_s_all_processes": per_s * world,
              "ref_train_tokens_per_s": ckpt.get("train_tokens_per_s"),
              "overlong": {"captions": sum(s.get("overlong", 0) for s in summaries), "context": ctx},
              "report_captions": len(kept["records"])}
    print(f"scored {records} captions, {tokens} tokens in {world} shard(s) under {os.path.dirname(writer.path)}; "
          f"rank 0 at {per_s:,.0f} tokens/s")
    _relevance(report, tok, kept["records"], kept["samples"], kept["p_ref"])
    _write_report(cfg, report, tok, kept["records"], kept["samples"], kept["p_ref"])
    return report


def main(cfg):
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world_env > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only to gather the shard summaries: CPU objects, any device
        started = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if world_env > 1 else (0, 1)
    device = pick_device(cfg.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    tok = T.load_tokenizer(cfg.tokenizer)
    model, ckpt = load_lm(cfg.ref, tok)
    try:
        if cfg.stream or world > 1:
            result = score_stream(cfg, tok, model, ckpt, device, rank, world)
        else:
            result = score_one_file(cfg, tok, model, ckpt, device)
        if started:  # tear down together (see the end of train.main)
            dist.barrier()
        return result
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(ScoreConfig, description=__doc__))
