"""
Faults of issue 22 ("nothing lost, nothing silently wrong"), one test per case; each fails on the code before it:
scores at the context edge, 16-bit images, one writer per run folder, checked files, a torn log line, broken tar
shards counted by what they lost, flag ranges, one-line errors, and the training alarm's rule.

    .venv/bin/python -m pytest -q tests/test_faults2.py
"""
import io
import json
import os
import types

import pytest
import torch
from PIL import Image

from data import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- 1. scores at the context edge

def test_every_caption_length_up_to_and_past_the_context_gets_one_score_per_label(tiny):
    import score
    from model import load_lm
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    model, _ = load_lm(str(tiny["ref_lm"]), tok)
    ctx = 8
    lengths = list(range(1, ctx + 4))
    samples = [types.SimpleNamespace(caption_ids=[5 + (k % 50) for k in range(n)]) for n in lengths]
    p_ref, _ = score.label_probs(model, samples, ctx, 4, "cpu", progress=False)
    for n, s, p in zip(lengths, samples, p_ref):
        assert len(p) == n + 1, n  # caption tokens, then <|eos|>: exactly ctx tokens too
        seq = [T.BOS] + s.caption_ids + [T.EOS]
        fit = min(n + 1, ctx)  # labels the context holds; the rest are 0 (weight 1, as in NTP)
        with torch.no_grad():
            probs = model.eval()(torch.tensor([seq[:fit]])).softmax(-1)
        probs = probs[0, torch.arange(fit), torch.tensor(seq[1:fit + 1])]
        torch.testing.assert_close(p[:fit], probs, atol=2e-5, rtol=0)
        assert (p[fit:] == 0).all() and (p[:fit] > 0).all()


# ----------------------------------------------------------------------------- 2. 16-bit images

def test_16_bit_greyscale_png_is_converted_by_value():
    import numpy as np
    from data.images import decode_image_bytes
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 25700, dtype=np.uint16)).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert (decode_image_bytes(buf.getvalue(), 6) == 100).all()  # 25700 / 65535 x 255 = 100, not white
    buf = io.BytesIO()
    Image.new("I", (6, 6), 65535).save(buf, format="TIFF")  # 32-bit integer mode, 16-bit values
    assert (decode_image_bytes(buf.getvalue(), 6) == 255).all()
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 0.4, dtype=np.float32)).save(buf, format="TIFF")  # float 0..1
    assert (decode_image_bytes(buf.getvalue(), 6) == 102).all()
