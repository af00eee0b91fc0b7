"""Tests for the benchmarks' official metrics (benchmarks/metrics.py) against hand computations on a few items:
POPE accuracy / precision / recall / F1 / yes-ratio per split (and an always-"yes" model), MME accuracy, acc+ and
the perception / cognition sums, MMBench circular evaluation with the evaluator's own rotations, and accuracy
per category. Values are percentages; approx(rel=1e-12) only absorbs the rounding of a few float divisions.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bench_metrics.py
"""
import pytest
from pytest import approx

from benchmarks import metrics as M
from data.record_types import Record

YES, NO = 0, 1


def pope(labels, split="random"):
    return [Record(f"{split}{i}", "q", None, {"split": split, "answer": a, "choices": ["yes", "no"]})
            for i, a in enumerate(labels)]


def test_pope_by_hand():
    recs = pope([YES, YES, NO, NO, YES])
    preds = [YES, NO, YES, NO, YES]  # tp 2, fn 1, fp 1, tn 1
    assert M.pope_counts(recs, preds) == (2, 1, 1, 1)
    out = M.pope_metrics(recs, preds)
    assert out["random_acc"] == approx(60.0, rel=1e-12)
    assert out["random_precision"] == approx(200 / 3, rel=1e-12)
    assert out["random_recall"] == approx(200 / 3, rel=1e-12)
    assert out["random_f1"] == approx(200 / 3, rel=1e-12)
    assert out["random_yes_ratio"] == approx(60.0, rel=1e-12)
    assert "f1" not in out  # one split: no mean


def test_always_yes_model():
    recs = pope([YES, NO, YES, NO, YES, NO, NO, NO], "popular")  # 3 yes, 5 no
    out = M.pope_metrics(recs, [YES] * len(recs))
    precision, recall = 100 * 3 / 8, 100.0
    assert out["popular_yes_ratio"] == 100.0
    assert out["popular_recall"] == recall and out["popular_precision"] == approx(precision, rel=1e-12)
    assert out["popular_f1"] == approx(2 * precision * recall / (precision + recall), rel=1e-12)  # 54.5...
    assert out["popular_acc"] == approx(37.5, rel=1e-12)
    never = M.pope_metrics(recs, [NO] * len(recs))
    assert never["popular_yes_ratio"] == 0 and never["popular_f1"] == 0 and never["popular_precision"] == 0


def test_pope_splits_pooled():
    recs = pope([YES, NO], "random") + pope([YES, NO], "adversarial")
    out = M.pope_metrics(recs, [YES, NO, YES, YES])  # random perfect; adversarial: tp 1, fp 1
    assert out["random_f1"] == 100.0 and out["adversarial_f1"] == approx(2 * 50 * 100 / 150, rel=1e-12)
    # the plain names pool the splits' questions (VLMEvalKit's "Overall": tp 2, fp 1, fn 0), not the mean of F1s
    assert out["f1"] == approx(2 * (200 / 3) * 100 / (200 / 3 + 100), rel=1e-12) == approx(80.0)
    assert out["mean_f1"] == approx((100 + 2 * 50 * 100 / 150) / 2, rel=1e-12)
    assert out["yes_ratio"] == 75.0 and out["acc"] == 75.0


def mme(subtask, image, answers):
    return [Record(f"{subtask}/{image}:{i}", "q", None, {"subtask": subtask, "image_key": f"{subtask}/{image}",
                                                          "answer": a}) for i, a in enumerate(answers)]


def test_mme_acc_plus_and_sums():
    recs = (mme("existence", "a", [YES, NO]) + mme("existence", "b", [YES, NO]) + mme("count", "c", [YES, NO])
            + mme("OCR", "e", [YES, NO]) + mme("commonsense_reasoning", "d", [YES, NO])
            + mme("code_reasoning", "f", [YES, NO]))
    preds = [YES, NO, YES, YES,   # existence: 3 of 4 right, 1 of 2 images both right
             NO, YES,             # count: none right
             YES, YES,            # OCR: 1 of 2, no image both right
             YES, NO,             # commonsense: all right
             NO, NO]              # code: 1 of 2
    out = M.mme_metrics(recs, preds)
    assert (out["existence_acc"], out["existence_acc_plus"], out["existence"]) == (75.0, 50.0, 125.0)
    assert (out["count_acc"], out["count_acc_plus"], out["count"]) == (0.0, 0.0, 0.0)
    assert out["ocr"] == 50.0  # the folder "OCR" under its metric name
    assert out["commonsense_reasoning"] == 200.0 and out["code_reasoning"] == 50.0
    assert out["perception"] == 125.0 + 0.0 + 50.0
    assert out["cognition"] == 200.0 + 50.0


def mc(group, choices, answer, category="c", index=None):
    index = group if index is None else index
    return Record(f"q{index}", f"prompt {group}", None, {"group": group, "choices": choices, "answer": answer,
                                                          "category": category, "question": f"Q{group}",
                                                          "index": index})


def test_rotations_made_by_the_evaluator():
    rows = M.rotations([mc(0, ["a", "b", "c"], 1), mc(1, ["x", "y"], 0)],
                       prompt=lambda extra, options: " / ".join(options))
    assert [r.id for r in rows] == ["q0@0", "q0@1", "q0@2", "q1@0", "q1@1"]
    assert [r.extra["choices"] for r in rows[:3]] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [r.extra["choices"][r.extra["answer"]] for r in rows] == ["b", "b", "b", "x", "x"]
    assert rows[1].caption == "b / c / a" and {r.extra["group"] for r in rows[:3]} == {0}
    has_copies = [mc(0, ["a", "b"], 0), mc(0, ["b", "a"], 1, index=1_000_000)]  # index g + k * 1e6
    assert M.rotations(has_copies) == has_copies  # the file's own circular copies are kept as they are


def test_circular_by_hand():
    rows = M.rotations([mc(0, ["a", "b", "c"], 1, "color"), mc(1, ["x", "y"], 0, "color"),
                        mc(2, ["p", "q"], 1, "count")])
    # q0: right in every rotation (answer "b" at 1, 0, 2); q1: right, then wrong; q2: wrong first, right after
    preds = [1, 0, 2, 0, 0, 0, 0]
    out = M.circular_metrics(rows, preds)
    assert out["circular"] == approx(100 / 3, rel=1e-12)
    assert out["vanilla"] == approx(200 / 3, rel=1e-12)
    assert out["circular_color"] == 50.0 and out["circular_count"] == 0.0


def test_category_accuracy_by_hand():
    recs = [mc(0, ["a", "b"], 0, "A"), mc(1, ["a", "b"], 1, "A"), mc(2, ["a", "b"], 0, "B")]
    out = M.category_metrics(recs, [0, 0, 0])
    assert out["acc"] == approx(200 / 3, rel=1e-12)
    assert out["acc_A"] == 50.0 and out["acc_B"] == 100.0 and out["mean_category"] == 75.0
    seed = [Record("s", "q", None, {"answer": 2, "question_type": "Scene Understanding"})]
    assert M.bench_metrics("seed", seed, [2]) == {"acc": 100.0, "acc_Scene Understanding": 100.0,
                                                   "mean_category": 100.0}


def test_pope_answer_neither_yes_nor_no_is_wrong():
    """A generated answer the rule cannot place (-1) is a negative prediction for F1, as VLMEvalKit's "Unknown",
    and wrong for accuracy (not a correct "no")."""
    out = M.pope_metrics(pope([YES, NO, NO]), [-1, -1, NO])
    assert out["random_acc"] == approx(100 / 3, rel=1e-12) and out["random_yes_ratio"] == 0.0
    assert out["random_recall"] == 0.0 and out["random_f1"] == 0.0


def test_mme_acc_plus_needs_both_questions():
    recs = mme("existence", "a", [YES, NO]) + mme("existence", "b", [YES])  # b: its pair missing
    out = M.mme_metrics(recs, [YES, NO, YES])  # every answer right
    assert out["existence_acc"] == 100.0 and out["existence_acc_plus"] == 50.0 and out["existence"] == 150.0


def test_rotations_follow_the_index_structure():
    """Copies are rows g + k * 1e6; a row duplicated under one index is no copy and does not switch the
    evaluator's own rotations off."""
    plain = [mc(0, ["a", "b"], 0), mc(1, ["x", "y"], 1)]
    assert len(M.rotations(plain)) == 4
    with pytest.raises(ValueError, match="same index 1"):  # not taken for circular copies
        M.rotations(plain + [mc(1, ["x", "y"], 1)])
    copies = [mc(0, ["a", "b"], 0), mc(0, ["b", "a"], 1, index=1_000_000), mc(1, ["x", "y"], 1)]
    assert M.rotations(copies) == copies
    out = M.circular_metrics(list(reversed(copies[:2])), [1, 1])  # vanilla: the offset-0 row, wherever it is
    assert out["vanilla"] == 0.0 and out["circular"] == 0.0
