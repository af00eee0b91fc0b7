"""The probes measure the image: blind scores (each question with another question's image), the best constant
answer, chance, the primary endpoint probe_img_avg, and the generator's balanced probe files.
Run: .venv/bin/python -m pytest tests/test_probes.py
"""
import collections
import json
import os

import pytest
import torch
from PIL import Image

import eval as E
from data import tokenizer as T
from data.record_types import Record
from model import DecoderConfig, VLM, VLMConfig

QUESTIONS = [("a photo of", ["one", "two", "three"], i % 3) for i in range(6)]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "img")
    for i in range(6):  # random pixels: every image gives the model another context
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(root / "img" / f"{i}.png")
    os.makedirs(root / "probes")
    with open(root / "probes" / "count.jsonl", "w") as f:
        for i, (prompt, choices, answer) in enumerate(QUESTIONS):
            f.write(json.dumps({"image": f"../img/{i}.png", "prompt": prompt, "choices": choices, "answer": answer})
                    + "\n")
    tok = T.train_tokenizer(["a photo of one two three"] * 4, vocab_size=280)
    torch.manual_seed(0)
    model = VLM(VLMConfig(arch="h", image_size=16, patch_size=8, vit_dim=32, vit_depth=1, vit_heads=2,
                          decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32,
                                                max_seq_len=64)))
    with torch.no_grad():  # sharp weights: the image changes the choice log-probs a lot
        for p in model.parameters():
            p.mul_(4)
    return root, model.eval(), tok


def test_blind_equals_seeing_for_a_model_that_ignores_images(probes):
    """A projector that outputs zeros gives every image the same tokens: accuracy - blind accuracy is 0 exactly,
    while the same model with its projector on gets different choices with the swapped images."""
    root, model, tok = probes
    seeing = E.evaluate_model(model, tok, probes_dir=str(root / "probes"))
    logps = E.mc_eval(model, tok, str(root / "probes" / "count.jsonl"))[0]
    blind = E.mc_eval(model, tok, str(root / "probes" / "count.jsonl"), blind=True)[0]
    assert any((a - b).abs().max() > 1e-3 for x, y in zip(logps, blind) for a, b in zip(x, y))
    with torch.no_grad():
        for p in model.projector.parameters():
            p.zero_()
    ignoring = E.evaluate_model(model, tok, probes_dir=str(root / "probes"))
    assert ignoring["count"] == ignoring["count_blind"] and ignoring["probe_img_avg"] == 0.0
    assert {"count_chance", "count_const", "count_img"} <= set(seeing)
    assert seeing["probe_img_avg"] == seeing["count"] - seeing["count_blind"]


def test_chance_and_constant_answer():
    qs = [Record(str(i), "", "", {"choices": c, "answer": a}) for i, (c, a) in
          enumerate([(["x", "y"], 0), (["x", "y"], 0), (["x", "y"], 1), (["z", "y", "w"], 0)])]
    # "x": right twice, wrong once, a 1/3 guess where not offered: (2 + 1/3) / 4; "y": 1/4; "z": a 1/2 guess in
    # the three questions without it, right in the fourth: (3 / 2 + 1) / 4, the best
    assert E.constant_accuracy(qs) == pytest.approx((3 / 2 + 1) / 4)
    balanced = [Record(str(i), "", "", {"choices": ["one", "two", "three", "four"], "answer": i % 4}) for i in range(8)]
    assert E.constant_accuracy(balanced) == 0.25


def test_groups_and_primary_by_hand():
    out = {"presence_a": 0.8, "presence_a_blind": 0.5, "presence_b": 0.6, "presence_b_blind": 0.6,
           "colour": 0.9, "colour_blind": 0.3}
    chance = {"presence_a": 0.5, "presence_b": 0.5, "colour": 0.25}
    E.probe_groups(out, chance, ["presence_a", "presence_b", "colour"])
    assert out["presence_img"] == pytest.approx(0.15) and out["colour_img"] == pytest.approx(0.6)
    assert out["probe_img_avg"] == pytest.approx((0.15 + 0.6) / 2)
    assert out["presence_blind"] == pytest.approx(0.55)
    assert out["probe_cc_avg"] == pytest.approx(((0.6 + 0.2) / 2 + 0.65 / 0.75) / 2)


def test_generated_probes_are_balanced(tmp_path):
    from world.generate import GenConfig, generate
    generate(GenConfig(out=str(tmp_path), mix="hard", n_ref=40, n_text=40, n_label=20, n_train=300, n_val=10,
                       n_test=10, n_probe=40, n_probe_val=8))
    rows = {k: [json.loads(line) for line in open(tmp_path / "probes" / f"{k}.jsonl")]
            for k in ("count", "colour", "presence_random", "retrieval")}
    assert collections.Counter(r["choices"][r["answer"]] for r in rows["count"]) == \
        {"one": 10, "two": 10, "three": 10, "four": 10}
    assert all(len(c.split()) == 1 for r in rows["count"] for c in r["choices"])  # one form: the number word
    for kind, rs in rows.items():  # counts 1..4 uniform in every probe file; the answer position uniform-ish
        assert collections.Counter(len(r["scene"]) for r in rs) == {1: 10, 2: 10, 3: 10, 4: 10}, kind
    assert not os.path.exists(tmp_path / "probes" / "position.jsonl")
    # the hard mix's shape -> usual colour correlation is off in probe scenes: the usual colour answers near
    # chance, not the 70% of training scenes
    from world.scenes import COLOURS, SHAPES, usual_colour
    usual = sum(o["colour"] == usual_colour(o["shape"], list(COLOURS)) for r in rows["colour"] for o in r["scene"])
    assert usual / sum(len(r["scene"]) for r in rows["colour"]) < 0.35
    assert len(SHAPES) >= 8
