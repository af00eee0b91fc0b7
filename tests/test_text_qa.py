"""experiments/text_qa.py: the base LM asked yes/no questions about a text description of a scene.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_text_qa.py
"""
import json
import random
import re

import pytest
import torch

import reference_lm
from data import tokenizer as T
from experiments import text_qa
from utils import UserError
from world.generate import GenConfig, generate

SHAPES, COLOURS = ["circle", "square", "star"], ["red", "blue"]


def test_documents_describe_the_scene_then_answer_its_questions_right():
    scene = [{"shape": "circle", "colour": "red", "size": "large", "row": "top", "col": "left"},
             {"shape": "star", "colour": "blue", "size": "small", "row": "bottom", "col": "right"}]
    docs = text_qa.qa_documents([scene] * 40, random.Random(0), SHAPES, COLOURS)
    assert all(d["caption"].startswith("a large red circle at the top left and a small blue star at the bottom "
                                       "right . question: ") for d in docs)
    asked = [m for d in docs for m in re.findall(r"is there a (\w+)\? answer: (\w+)", d["caption"])]
    assert asked and all(answer == ("yes" if shape in ("circle", "star") else "no") for shape, answer in asked)
    assert {a for _, a in asked} == {"yes", "no"}  # both answers occur


class ConstantLM(torch.nn.Module):
    """Next-token logits that ignore the context: the same for every input."""
    def __init__(self, vocab):
        super().__init__()
        self.logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


def test_a_model_that_ignores_its_context_gets_no_context_effect(tmp_path):
    tok = T.train_tokenizer(["a red circle . question: is there a star? answer: yes no"], vocab_size=280)
    scenes = [[{"shape": s, "colour": "red", "size": "large", "row": "top", "col": "left"}] for s in SHAPES * 20]
    d = text_qa.margins(ConstantLM(tok.get_vocab_size()), tok, scenes, random.Random(0), SHAPES, COLOURS)
    yes, no = [x for x, y in d if y], [x for x, y in d if not y]
    assert yes and no and len({round(x, 12) for x, _ in d}) == 1  # the same d for every question: adds exactly 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_qa")
    data = root / "data_web"
    generate(GenConfig(out=str(data), n_ref=10, n_text=40, n_label=4, n_train=30, n_val=6, n_test=4, n_probe=4,
                       n_probe_val=4, workers=1))
    T.main(["--data", f"{data}/train.jsonl,{data}/text.jsonl", "--out", f"{root}/tok.json", "--vocab-size", "300"])
    reference_lm.train_lm(reference_lm.RefConfig(data=f"{data}/text.jsonl", tokenizer=f"{root}/tok.json",
                                                 out=f"{root}/base.pt", n_layer=1, n_head=2, d_model=32, row_len=256,
                                                 batch_rows=4, steps=2, eval_every=2, device="cpu"))
    return root, data


def test_rows_json_and_one_line_errors(folder, capsys):
    root, data = folder
    out = root / "qa.json"
    rows = text_qa.main(text_qa.TextQAConfig(base=str(root / "base.pt"), data=str(data), steps="0,2", json=str(out)))
    assert [r["steps"] for r in rows] == [0, 2] and all(r["n"] == 6 and 0 <= r["yes_share"] <= 1 for r in rows)
    assert all(r["right"] in {k / 6 for k in range(7)} for r in rows)  # a share of the 6 questions
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and "--steps 0,2" in saved["command"]
    assert "what the context adds" in capsys.readouterr().out
    for bad, flag in (({"steps": "0,x"}, "--steps"), ({"base": str(root / "none.pt")}, "--base"),
                      ({"data": str(root)}, "--data")):
        with pytest.raises(UserError, match=flag):
            text_qa.main(text_qa.TextQAConfig(**{"base": str(root / "base.pt"), "data": str(data), **bad}))
