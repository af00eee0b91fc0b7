"""Captions (and image placeholders) packed into training rows.

One sample = prefix + <|bos|> + caption + <|eos|>, the prefix being the image's placeholder tokens (none for the
text-only LMs). Labels are the sequence shifted by one: the caption tokens and <|eos|>; everything before (image,
bos) gets -100, no loss. Samples go back to back into rows of `row_len` tokens: `doc_ids` number them inside a row
(padding has its own) so attention never crosses samples, and `position_ids` restart at 0 for each, so a packed
sample sees exactly what it would see alone.

Two packers. The default keeps sample order and starts a new row when the next sample does not fit (next-fit):
score.py reads results back in order. `tight=True`, for training, where order inside a batch does not matter,
spreads the samples evenly over the fewest rows that hold them, and the batch is only as wide as its fullest row:
padding costs as much compute as a real token, and next-fit leaves a row's tail empty when a few long samples fill
it. The price is host time. `python -m bench.bench` compares the padding of both (pad_fraction_next_fit).
"""
import array
import heapq
import math
import sys
from dataclasses import dataclass, field

import torch

from data import tokenizer as T

IGNORE = -100
FIELDS = ("input_ids", "labels", "position_ids", "doc_ids", "tags")
# each field's value where padding goes (doc_ids: a new document); every per-token input (Batch.inputs) is 0 there
FILL = {"input_ids": T.PAD, "labels": IGNORE, "position_ids": 0, "tags": -1}


def to_device(t, device):
    """Host tensor -> device. On CUDA through pinned (page-locked) memory: a copy from ordinary memory is
    synchronous, one from pinned memory is queued and overlaps with the GPU's work."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Sample:
    caption_ids: list        # caption tokens, without bos/eos
    inputs: dict = field(default_factory=dict)  # per-token inputs of a weighting, one value per label (caption
    #                          tokens, then eos): "p_ref" (score.py's reference-LM probabilities), a baseline's own
    tags: list = None        # ground-truth category id per label (-1: unknown)
    index: int = -1          # position in the data set (its image, its record)
    loss_mask: list = None   # 1 = train on the label, 0 = no loss there (instruction data: its pieces); None: all


@dataclass
class Batch:
    input_ids: torch.Tensor     # (R, L)
    labels: torch.Tensor        # (R, L) -100 where no loss
    position_ids: torch.Tensor  # (R, L)
    doc_ids: torch.Tensor       # (R, L) sample number within the row; padding has its own
    tags: torch.Tensor          # (R, L) long, -1 where unknown
    inputs: dict                # name -> (R, L) float: the samples' per-token inputs, 0 where a sample has none
    indices: list               # data-set index of each packed sample, in the order their images are needed

    def to(self, device):
        for name in FIELDS:
            setattr(self, name, to_device(getattr(self, name), device))
        self.inputs = {k: to_device(v, device) for k, v in self.inputs.items()}
        return self

    def pad_to(self, width):
        """Widen every row to `width` with padding (its own document: it attends only to itself)."""
        extra = width - self.input_ids.shape[1]
        if extra <= 0:
            return self

        def padded(t, fill):  # fill: a number, or one per row (R, 1)
            fill = torch.as_tensor(fill, dtype=t.dtype, device=t.device)
            return torch.cat([t, fill.expand(len(t), extra)], dim=1)
        for name in FIELDS:
            fill = self.doc_ids.max(dim=1, keepdim=True).values + 1 if name == "doc_ids" else FILL[name]
            setattr(self, name, padded(getattr(self, name), fill))
        self.inputs = {k: padded(v, 0.0) for k, v in self.inputs.items()}
        return self


def cat(a, b):
    """The rows of a, then the rows of b, in one Batch (the narrower one is padded to the wider)."""
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])
    a, b = a.pad_to(width), b.pad_to(width)
    inputs = {k: torch.cat([x.inputs.get(k, torch.zeros(x.input_ids.shape)) for x in (a, b)])
              for k in {**a.inputs, **b.inputs}}
    return Batch(*(torch.cat([getattr(a, n), getattr(b, n)]) for n in FIELDS), inputs, a.indices + b.indices)


def next_fit(sizes, row_len):
    """Rows of sample numbers, in order; a new row starts when the next sample does not fit."""
    rows, row, used = [], [], 0
    for i, n in enumerate(sizes):
        if used + n > row_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    return rows + [row] if row else rows


def balance(sizes, n_rows):
    """(rows of sample numbers, length of the fullest row): samples spread over n_rows rows, the fullest as short as
    is cheap: longest first onto the emptiest row (LPT), then, while it helps, move or swap one sample of the fullest
    row with one of the 8 emptiest rows (at most 64 times: a bounded cost for big batches)."""
    rows, loads = [[] for _ in range(n_rows)], [0] * n_rows
    heap = [(0, r) for r in range(n_rows)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable sort: deterministic
        _, r = heapq.heappop(heap)
        rows[r].append(i)
        loads[r] += sizes[i]
        heapq.heappush(heap, (loads[r], r))
    for _ in range(min(4 * n_rows, 64)):
        top = max(range(n_rows), key=loads.__getitem__)
        best = None  # (new fullest of the two rows, sample of top, other row, its sample or None, size moved)
        for r in heapq.nsmallest(8, range(n_rows), key=loads.__getitem__):
            for i in rows[top] if r != top else ():
                for j in [None] + rows[r]:
                    moved = sizes[i] - (0 if j is None else sizes[j])
                    peak = max(loads[top] - moved, loads[r] + moved)
                    if moved > 0 and peak < loads[top] and (best is None or peak < best[0]):
                        best = (peak, i, r, j, moved)
        if best is None:
            break
        _, i, r, j, moved = best
        rows[top].remove(i)
        rows[r].append(i)
        if j is not None:
            rows[r].remove(j)
            rows[top].append(j)
        loads[top] -= moved
        loads[r] += moved
    return rows, max(loads)


def tight_rows(sizes, row_len):
    """(rows, width): the fewest rows that `balance` can fit in row_len (binary search between the lower
    bound and what next-fit needs), and the batch only as wide as the fullest of them."""
    lo, hi = max(1, math.ceil(sum(sizes) / row_len)), len(next_fit(sizes, row_len))
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        rows, width = balance(sizes, mid)
        if width <= row_len:
            best, hi = ([row for row in rows if row], width), mid - 1
        else:
            lo = mid + 1
    return best or (next_fit(sizes, row_len), row_len)


def pack(samples, row_len, prefix=(), truncate=True, tight=False):
    """Pack samples into rows. tight=False: in order (next-fit), every row row_len wide, the last one padded.
    tight=True: any order, as few rows as possible and only as wide as the fullest (see the module doc).
    Samples longer than row_len lose the end of their caption (truncate=True; <|eos|> stays) or raise. A cut
    masked sample (instruction data) trains its <|eos|> label only after a kept answer token (the rule below)."""
    prefix = list(prefix)
    kept = []
    for s in samples:
        n = len(prefix) + len(s.caption_ids) + 1
        if n > row_len:
            if not truncate:
                raise ValueError(f"sample {s.index} needs {n} positions, more than row_len {row_len}")
            keep = row_len - len(prefix) - 1
            mask = s.loss_mask
            if mask is not None:
                # The rule for a cut masked sample: its closing <|eos|> label trains only when the last kept label
                # is a trained (assistant) label that is not itself an end of turn (<|eos|>). A cut may end inside
                # a question: an <|eos|> trained there would teach "ask, then stop", and a sample cut before its
                # first answer would train "answer nothing" (warn_unanswered counts those: with this rule they
                # have no trained label). A cut right after an inner answer's <|eos|> would teach <|eos|> twice.
                mask = mask[:keep]
                mask = mask + [int(bool(mask) and mask[-1] == 1 and s.caption_ids[keep - 1] != T.EOS)]
            s = Sample(s.caption_ids[:keep], {k: v[:keep] + [v[-1]] for k, v in s.inputs.items()},
                       s.tags and s.tags[:keep] + [s.tags[-1]], s.index, mask)
        for name, got in (*s.inputs.items(), ("tags", s.tags), ("loss_mask", s.loss_mask)):
            if got is not None and len(got) != len(s.caption_ids) + 1:
                raise ValueError(f"sample {s.index}: {len(got)} {name} for {len(s.caption_ids) + 1} labels")
        kept.append(s)
    sizes = [len(prefix) + len(s.caption_ids) + 1 for s in kept]
    if tight and sizes:
        rows, width = tight_rows(sizes, row_len)
    else:
        rows, width = next_fit(sizes, row_len), row_len

    # Build every field as one flat Python list and convert once: a few tensor ops per batch instead of
    # several per sample (this runs on the host every step, while the GPU waits for the batch).
    cols = {name: [] for name in FIELDS}
    ids, labels, pos, docs, tags = cols.values()
    inputs, indices = {k: [] for s in kept for k in s.inputs}, []
    for row in rows:
        for d, i in enumerate(row):
            s, n = kept[i], sizes[i]
            caption = list(s.caption_ids)
            ids += prefix + [T.BOS] + caption
            targets = caption + [T.EOS]
            labels += [IGNORE] * len(prefix) + (targets if s.loss_mask is None else
                                                [t if m else IGNORE for t, m in zip(targets, s.loss_mask)])
            pos += range(n)
            docs += [d] * n
            tags += [-1] * len(prefix) + (list(s.tags) if s.tags is not None else [-1] * (n - len(prefix)))
            for k, values in inputs.items():
                values += [0.0] * len(prefix) + (list(s.inputs[k]) if k in s.inputs else [0.0] * (n - len(prefix)))
            indices.append(s.index)
        pad = width - sum(sizes[i] for i in row)
        for name, values in cols.items():  # padding: its own document at position 0, attends only to padding
            values += [len(row) if name == "doc_ids" else FILL[name]] * pad
        for values in inputs.values():
            values += [0.0] * pad
    # list -> tensor through array.array: ~4x faster than torch.tensor(list) for long lists
    shape = (len(rows), width)
    cols = {k: torch.frombuffer(array.array("q", v), dtype=torch.long).view(shape) for k, v in cols.items()}
    inputs = {k: torch.frombuffer(array.array("f", v), dtype=torch.float).view(shape) for k, v in inputs.items()}
    return Batch(**cols, inputs=inputs, indices=indices)


def n_labels(s):
    """Labels of a sample that carry loss: caption tokens + <|eos|>, less those its loss_mask leaves out."""
    return len(s.caption_ids) + 1 if s.loss_mask is None else sum(s.loss_mask)


def count_overlong(samples, ctx):
    """(captions longer than ctx positions, their labels past it): what gets p_ref = 0 (module doc)."""
    over = [len(s.caption_ids) + 1 - ctx for s in samples if len(s.caption_ids) + 1 > ctx]
    return len(over), sum(over)


def warn_overlong(samples, row_len, prefix_len, what):
    """Warn (stderr) about samples longer than a row holds: pack() keeps their start and <|eos|>."""
    room = row_len - prefix_len
    n_long, lost = count_overlong(samples, room)
    if n_long:
        print(f"warning: {n_long} of {len(samples)} {what} samples are longer than --row-len {row_len} allows ({room} "
              f"positions after the image); training keeps their start and drops {lost} caption tokens in all (raise "
              f"--row-len to keep them)", file=sys.stderr)


def warn_unanswered(row_len, *groups):
    """Warn (stderr, one line) about instruction samples (with a loss_mask) that pack() cuts before their first
    answer token, and return their number; groups are (samples, prefix length) pairs. By pack's rule such a sample
    keeps no trained label, not even <|eos|>: it fills row space and trains nothing, and this line is the only sign."""
    lost = masked = 0
    for samples, prefix_len in groups:
        room = row_len - prefix_len - 1  # caption tokens a row keeps (pack)
        for s in samples:
            if s.loss_mask is not None:
                masked += 1
                lost += len(s.caption_ids) > room and not any(s.loss_mask[:max(room, 0)])
    if lost:
        print(f"warning: {lost} of {masked} instruction conversations have no answer token within --row-len "
              f"{row_len} (their questions fill the row): they train nothing (raise --row-len to train them)",
              file=sys.stderr)
    return lost


def make_samples(tok, records, inputs=None, tags=None, source=""):
    """One Sample per record: its caption's tokens, its per-token `inputs` ({name: {record id: tensor}}, read from
    the file `source`) and tags (a list per record) if given. A record with extra["pieces"] = [(text, trained)]
    (instruction data, benchmarks/instruct.py) is its pieces' tokens end to end, with loss_mask 1 on the trained
    pieces and <|eos|>. A piece may be a list of token ids in place of text, taken as is: the way to a special token
    (the text "<|eos|>" is text, never the token). A record whose inputs do not fit its tokens is refused."""
    pieces = [r.extra.get("pieces") or [(r.caption, True)] for r in records]
    ids = iter(T.encode_captions(tok, [text for p in pieces for text, _ in p if isinstance(text, str)]))
    out = []
    for i, (r, parts) in enumerate(zip(records, pieces)):
        caption, mask = [], []
        for text, trained in parts:
            piece = next(ids) if isinstance(text, str) else list(text)
            caption += piece
            mask += [int(trained)] * len(piece)
        s = Sample(caption, {k: v[r.id].tolist() for k, v in (inputs or {}).items()},
                   None if tags is None else tags[i], i, mask + [1] if "pieces" in r.extra else None)
        for name, got in s.inputs.items():
            if len(got) != len(caption) + 1:
                raise ValueError(f"{source}: record {r.id} has {len(got)} {name} scores for {len(caption) + 1} "
                                 f"tokens")
        out.append(s)
    return out


def global_batch(step, n, batch_size, seed):
    """Data-set indices of step `step`'s batch: a fresh permutation each epoch, walked in order.
    A pure function of (step, seed), so resume and every rank agree without sharing any state."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset:offset + batch_size - len(out)]
    return out
