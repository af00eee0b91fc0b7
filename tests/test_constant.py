"""Tests for the constant-answer baselines under CircularEval (benchmarks/constant.py) on a tiny hand-made TSV whose
answers are counted by hand: the best single constant and its ties, the best constant per category and the
whole-file accuracy of that rule, the fallback alone never right circularly (though it is on the unrotated rows),
a file with its own circular copies, and the command: its JSON, and one-line errors for a missing or malformed file.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_constant.py
"""
import csv
import json

import pytest
from pytest import approx

from benchmarks import constant as C
from benchmarks.formats import read_tsv
from benchmarks.metrics import circular_metrics, rotations
from utils import run

COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
# (options, answer letter, category); the answers' texts: red red blue | two one two | circle star
ROWS = [(["red", "green", "blue"], "A", "colour"), (["green", "red"], "B", "colour"),
        (["blue", "green", "red"], "A", "colour"), (["one", "two", "three"], "B", "count"),
        (["one", "two"], "A", "count"), (["two", "three", "four"], "A", "count"),
        (["circle", "square"], "A", "shape"), (["square", "star", "circle"], "B", "shape")]


def write(path, rows, indices=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(COLS)
        for i, (opts, ans, cat) in enumerate(rows):
            index = i if indices is None else indices[i]
            w.writerow([index, f"question {i}?", ""] + (opts + [""] * 4)[:4]
                       + [ans, cat, "scene", "iVBORw0KGgo" if i == 0 else "0"])  # later rows borrow row 0's image
    return path


@pytest.fixture
def tsv(tmp_path):
    return write(tmp_path / "mcq.tsv", ROWS)


def test_by_hand(tsv):
    out = C.constant_baselines(read_tsv(str(tsv), "mmbench"))
    assert out["questions"] == 8 and out["rows_scored"] == 3 + 2 + 3 + 3 + 2 + 3 + 2 + 3
    # "red" and "two" are each the answer of 2 of the 8 questions: 25%; the tie goes to the one that sorts first
    assert out["single"] == {"text": "red", "circular": approx(25.0), "tied": ["red", "two"]}
    cats = out["per_category"]["categories"]
    assert {c: (v["text"], v["questions"]) for c, v in cats.items()} == {
        "colour": ("red", 3), "count": ("two", 3), "shape": ("circle", 2)}
    assert cats["colour"]["circular"] == approx(200 / 3) and cats["count"]["circular"] == approx(200 / 3)
    assert cats["shape"]["circular"] == approx(50.0) and cats["shape"]["tied"] == ["circle", "star"]
    assert out["per_category"]["circular"] == approx(100 * 5 / 8)  # 2 + 2 + 1 questions right


def test_fallback_alone_is_never_right_circularly(tsv):
    rotated = rotations(read_tsv(str(tsv), "mmbench"))
    for fallback in C.FALLBACKS:
        assert C.circular(rotated, lambda r: None, fallback) == 0.0
    preds = [C.constant_pred(r.extra["choices"], None) for r in rotated]
    assert circular_metrics(rotated, preds)["vanilla"] == approx(100 * 5 / 8)  # answer A unrotated: 5 of 8
    # a T that is offered is picked in every rotation, wherever it moved to
    assert [C.constant_pred(r.extra["choices"], "red") for r in rotated[:3]] == [0, 2, 1]
    out = C.constant_baselines(read_tsv(str(tsv), "mmbench"), fallback="last")
    assert out["single"]["circular"] == approx(25.0) and out["per_category"]["circular"] == approx(62.5)


def test_file_with_its_own_circular_copies(tmp_path):
    rows = [(["red", "blue"], "A", "colour"), (["blue", "red"], "B", "colour"),  # question 0 and its copy
            (["red", "blue"], "B", "colour"), (["blue", "red"], "B", "colour")]  # question 1: copy disagrees
    path = write(tmp_path / "circ.tsv", rows, indices=[0, 1_000_000, 1, 1_000_001])
    out = C.constant_baselines(read_tsv(str(path), "mmbench"))
    assert out["questions"] == 2 and out["rows_scored"] == 4
    assert out["single"]["text"] == "red" and out["single"]["circular"] == approx(50.0)


def test_command_writes_json(tsv, tmp_path, capsys):
    dst = tmp_path / "sub" / "constant.json"
    out = run(C.main, C.ConstantConfig, ["--tsv", str(tsv), "--json", str(dst)])
    assert json.loads(dst.read_text()) == json.loads(json.dumps(out))
    assert out["per_category"]["circular"] == approx(62.5)
    assert "best single constant: 'red' circular 25.00%" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "just some text\nno columns\n", b"\xff\xfe\x00binary"])
def test_command_refuses_bad_files_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.tsv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        run(C.main, C.ConstantConfig, ["--tsv", str(path), "--json", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "bad.tsv" in err
    assert not (tmp_path / "out.json").exists()
