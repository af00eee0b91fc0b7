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
    rep = I.importance_analysis(I.read_scored(scores, world["test"], world["tok_path"]), png, n_bins=3)
    lengths = [len(enc(tok, r.caption)) for r in records]
    means = [float((1 - q[:-1]).mean()) for q in p]  # eos excluded
    assert rep["pearson_r"] == pytest.approx(statistics.correlation(lengths, means), abs=1e-3)
    assert rep["captions"] == len(records) and rep["tokens"] == sum(lengths)
    assert sum(b["captions"] for b in rep["length_bins"]) == len(records)
    assert rep["position"]["mean_w"][0] == pytest.approx(statistics.mean(1 - float(q[0]) for q in p), abs=1e-3)
    assert rep["position"]["captions"][max(lengths) - 1] == lengths.count(max(lengths))
    assert os.path.getsize(png) > 1000


def test_roc_auc_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=g).float()
    neg = torch.randint(0, 5, (30,), generator=g).float()
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert I.roc_auc(pos, neg) == pytest.approx(float(brute))


def test_relevance_from_the_score_file(world, tmp_path):
    """Weights that are 1 exactly on image words and 0 elsewhere: mean w 1 and 0 by tag, ROC-AUC 1; the report
    lands in the score file's .json beside what score.py wrote, and the Fig. 1 picture beside it."""
    import json
    from data.tags import CATEGORIES, token_tags
    tok = world["tok"]
    records = read_records(world["test"])
    tags = token_tags(tok, records)
    image = CATEGORIES.index("image")
    p = [torch.tensor([0.0 if c == image else 1.0 for c in row]) for row in tags]
    scores = str(tmp_path / "s.pt")
    save_scores(scores, [r.id for r in records], p,
                {"tokenizer": T.fingerprint(tok), "data": text_fingerprint(records)})
    (tmp_path / "s.json").write_text(json.dumps({"captions": len(records)}))
    rel = I.relevance(I.read_scored(scores, world["test"], world["tok_path"]), scores)
    assert rel["mean_w"]["image"] == 1.0 and rel["mean_w"]["boiler"] == 0.0 and rel["auc"]["image_vs_rest"] == 1.0
    assert rel["predicted"]["image"] == 0.0 and rel["predicted"]["noise"] == 1.0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["captions"] == len(records) and report["relevance"] == json.loads(json.dumps(rel))
    assert os.path.getsize(tmp_path / "s.png") > 1000
