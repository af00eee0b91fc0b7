"""Turning captions (and image placeholders) into packed training rows.

One sample = prefix + <|bos|> + caption + <|eos|>, where prefix is the image's placeholder tokens (empty for
the text-only LMs). Inputs are the sequence without its last token, labels the sequence shifted by one, so
labels are the caption tokens and <|eos|>; everything before (image, separators, bos) gets -100, no loss.

Samples are packed back to back into rows of `row_len` tokens. `doc_ids` numbers the samples inside a
row (padding gets its own id) so attention never crosses samples, and `position_ids` restart at 0 for each
sample, so a packed sample sees exactly what it would see alone.
"""
from dataclasses import dataclass

import torch

import tokenizer as T

IGNORE = -100


@dataclass
class Sample:
    caption_ids: list        # caption tokens, without bos/eos
    p_ref: list = None       # reference-LM probability of each label (caption tokens, then eos)
    tags: list = None        # ground-truth category id per label (-1: unknown)
    index: int = -1          # position in the data set (its image, its record)


@dataclass
class Batch:
    input_ids: torch.Tensor     # (R, L)
    labels: torch.Tensor        # (R, L) -100 where no loss
    position_ids: torch.Tensor  # (R, L)
    doc_ids: torch.Tensor       # (R, L) sample number within the row; padding has its own
    p_ref: torch.Tensor         # (R, L) float, 0 where unknown
    tags: torch.Tensor          # (R, L) long, -1 where unknown
    indices: list               # data-set index of each packed sample, in the order their images are needed

    def to(self, device):
        for name in ("input_ids", "labels", "position_ids", "doc_ids", "p_ref", "tags"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def pack(samples, row_len, prefix=(), truncate=True):
    """Pack samples in order (next-fit) into rows of row_len; the last row is padded."""
    prefix = list(prefix)
    rows, row = [], []
    used = 0
    for s in samples:
        caption = s.caption_ids
        n = len(prefix) + len(caption) + 1
        if n > row_len:
            if not truncate:
                raise ValueError(f"sample {s.index} needs {n} positions, more than row_len {row_len}")
            keep = row_len - len(prefix) - 1
            s = Sample(caption[:keep], s.p_ref and s.p_ref[:keep] + [s.p_ref[-1]],
                       s.tags and s.tags[:keep] + [s.tags[-1]], s.index)
            n = row_len
        if used + n > row_len:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += n
    if row:
        rows.append(row)

    R = len(rows)
    input_ids = torch.full((R, row_len), T.PAD, dtype=torch.long)
    labels = torch.full((R, row_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((R, row_len), dtype=torch.long)
    doc_ids = torch.zeros((R, row_len), dtype=torch.long)
    p_ref = torch.zeros((R, row_len))
    tags = torch.full((R, row_len), -1, dtype=torch.long)
    indices = []
    for r, row in enumerate(rows):
        at = 0
        for d, s in enumerate(row):
            seq = prefix + [T.BOS] + list(s.caption_ids) + [T.EOS]
            n = len(seq) - 1
            input_ids[r, at:at + n] = torch.tensor(seq[:-1])
            labels[r, at + len(prefix):at + n] = torch.tensor(seq[len(prefix) + 1:])
            position_ids[r, at:at + n] = torch.arange(n)
            doc_ids[r, at:at + n] = d
            if s.p_ref is not None:
                p_ref[r, at + len(prefix):at + n] = torch.tensor(s.p_ref, dtype=torch.float)
            if s.tags is not None:
                tags[r, at + len(prefix):at + n] = torch.tensor(s.tags)
            indices.append(s.index)
            at += n
        doc_ids[r, at:] = len(row)  # padding: its own document at position 0, attends only to padding
    return Batch(input_ids, labels, position_ids, doc_ids, p_ref, tags, indices)
