import pytest
import torch

import score
import tokenizer as T
from data.records import read_records
from reference_lm import load_lm
from utils import text_fingerprint


def test_scores_align_with_single_caption_forward(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    records = read_records(str(tiny["train"]))
    p_ref = score.load_scores(str(tiny["scores"]), T.fingerprint(tok), text_fingerprint(records))
    model, _ = load_lm(str(tiny["ref_lm"]), tok)
    model.eval()
    for r in records[:5]:
        ids = T.encode_captions(tok, [r.caption])[0]
        seq = torch.tensor([[T.BOS] + ids + [T.EOS]])
        with torch.no_grad():
            probs = model(seq[:, :-1]).softmax(-1)[0]
        expected = probs[torch.arange(len(ids) + 1), seq[0, 1:]]
        assert len(p_ref[r.id]) == len(ids) + 1  # one score per label: caption tokens, then eos
        torch.testing.assert_close(p_ref[r.id], expected, atol=2e-5, rtol=0)  # uint16 quantisation


def test_fingerprint_mismatch_names_both_sides(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    with pytest.raises(ValueError) as err:
        score.load_scores(str(tiny["scores"]), T.fingerprint(tok), "0123456789abcdef", "my_captions.jsonl")
    message = str(err.value)
    assert "0123456789abcdef" in message and "my_captions.jsonl" in message and str(tiny["scores"]) in message
    with pytest.raises(ValueError, match="tokenizer"):
        score.load_scores(str(tiny["scores"]), "ffffffffffffffff", "x")


def test_two_bytes_per_token(tiny):
    blob = torch.load(str(tiny["scores"]), weights_only=True)
    assert blob["p_ref"].dtype == torch.uint16
    assert blob["offsets"][-1] == len(blob["p_ref"])


def test_roc_auc_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=g).float()
    neg = torch.randint(0, 5, (30,), generator=g).float()
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert score.roc_auc(pos, neg) == pytest.approx(float(brute))


def test_report_written(tiny):
    import json
    report = json.load(open(str(tiny["scores"]).replace(".pt", ".json")))
    assert set(report["relevance"]["auc"]) == {"image_vs_boiler", "image_vs_noise", "image_vs_rest"}
    assert report["score_tokens_per_s"] > 0
