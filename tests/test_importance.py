"""Tests for experiments/importance.py: the importance analysis (mean w vs caption length and token position,
Pearson r).

Run: .venv/bin/python -m pytest tests/test_importance.py
"""
import os
import statistics

import pytest
import torch

from experiments import importance as I
from data import tokenizer as T
from data.records import read_records
from data.scores import save_scores
from test_eval import enc, world  # noqa: F401  (the tiny caption file and tokenizer of tests/test_eval.py)
from utils import text_fingerprint


def test_importance_pearson(world, tmp_path):
    tok = world["tok"]
    records = read_records(world["test"])
    p = [torch.linspace(0.05, 0.05 + 0.8 * i / len(records), len(enc(tok, r.caption)) + 1)
         for i, r in enumerate(records)]
    scores = str(tmp_path / "s.pt")
    save_scores(scores, [r.id for r in records], p,
                {"tokenizer": T.fingerprint(tok), "data": text_fingerprint(records)})
    png = str(tmp_path / "fig.png")
    rep = I.importance_analysis(scores, world["test"], world["tok_path"], png, n_bins=3)
    lengths = [len(enc(tok, r.caption)) for r in records]
    means = [float((1 - q[:-1]).mean()) for q in p]  # eos excluded
    assert rep["pearson_r"] == pytest.approx(statistics.correlation(lengths, means), abs=1e-3)
    assert rep["captions"] == len(records) and rep["tokens"] == sum(lengths)
    assert sum(b["captions"] for b in rep["length_bins"]) == len(records)
    assert rep["position"]["mean_w"][0] == pytest.approx(statistics.mean(1 - float(q[0]) for q in p), abs=1e-3)
    assert rep["position"]["captions"][max(lengths) - 1] == lengths.count(max(lengths))
    assert os.path.getsize(png) > 1000
