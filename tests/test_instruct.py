"""Tests for instruction data (benchmarks/instruct.py, train.py --instruct): LLaVA's multi-turn conversations and
benchmarks/qa.py's questions read with their bad entries counted, and loss masks that cover exactly the assistant
turns (and the <|eos|> ending each) once packed (data/packing.py), whatever the row's truncation, as LLaVA's own
preprocessing trains them: a first gpt turn dropped, newlines kept, <|eos|> after every answer.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_instruct.py
"""
import json
import os

import pytest
from PIL import Image

from data import tokenizer as T
from benchmarks.instruct import read_instruct
from data.packing import make_samples
from data.packing import IGNORE, Sample, n_labels, pack, warn_unanswered
from data.record_types import Record
from data.record_types import DataError

CONV = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "The square is\nblue."}]
TEXT = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "green"}]


def llava(tmp_path, extra=()):
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "coco" / "1.png")
    items = [{"id": "a", "image": "coco/1.png", "conversations": CONV}, {"id": "t", "conversations": TEXT}]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(items + list(extra)))
    return path


@pytest.fixture(scope="module")
def tok():
    words = [t["value"] for t in CONV + TEXT] + ["question: answer: how many shapes are there? three"]
    return T.train_tokenizer(words, vocab_size=300)


def test_llava_multi_turn_read(tmp_path):
    recs = read_instruct(str(llava(tmp_path)))
    assert recs[0].caption == ("question: What colour is the circle? answer: It is red. <|eos|> question: And the "
                               "square? answer: The square is\nblue.")
    assert [t for _, t in recs[0].extra["pieces"]] == [False, True, True, False, True]
    assert recs[0].extra["pieces"][2] == ([T.EOS], True)  # token ids: the end of the first answer
    assert recs[0].image == str(tmp_path / "coco" / "1.png") and recs[1].image is None  # a text-only entry
    with_image, text_only = [r for r in recs if r.image], [r for r in recs if r.image is None]
    assert [r.id for r in with_image] == ["a"] and [r.id for r in text_only] == ["t"]


def test_images_root(tmp_path):
    path = llava(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "coco").rename(tmp_path / "elsewhere" / "coco")
    assert read_instruct(f"{path}::{tmp_path / 'elsewhere'}")[0].image == str(tmp_path / "elsewhere/coco/1.png")


def test_bad_entries_counted(tmp_path, capsys):
    bad = [{"id": "b1", "conversations": [{"from": "gpt", "value": "x"}]},
           {"id": "b2", "image": "coco/none.png", "conversations": CONV},
           {"id": "b3"},
           {"id": "b4", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}]
    path = llava(tmp_path, bad)
    with pytest.raises(DataError, match="4 of 6 instruction entries are bad"):
        read_instruct(str(path))
    assert len(read_instruct(str(path), max_bad_fraction=0.7)) == 2
    err = capsys.readouterr().err
    for reason in ("no gpt turn x 1", "missing image file x 1", "no conversations list x 1",
                   "unknown role x 1"):
        assert reason in err
    assert f"{path} entry 3: missing image file" in err


def test_masks_cover_exactly_the_assistant_turns(tmp_path, tok):
    recs = read_instruct(str(llava(tmp_path)))
    samples = make_samples(tok, recs)
    s = samples[0]
    first, second = (recs[0].caption.split(" <|eos|> "))
    assert s.caption_ids == T.encode_captions(tok, [first])[0] + [T.EOS] + T.encode_captions(tok, [second])[0]
    answers = [T.encode_captions(tok, [p])[0] for p, trained in recs[0].extra["pieces"]
               if trained and isinstance(p, str)]
    prefix = [5, 5, 5]  # three image placeholders
    batch = pack([s], 128, prefix)
    labels = batch.labels[0].tolist()
    trained = [t for t in labels if t != IGNORE]
    assert trained == answers[0] + [T.EOS] + answers[1] + [T.EOS]  # each answer and its eos, in order, nothing else
    assert n_labels(s) == len(trained)
    # the question pieces and the image get no loss: every label before the first answer is masked
    first = len(prefix) + len(T.encode_captions(tok, [recs[0].extra["pieces"][0][0]])[0])
    assert all(t == IGNORE for t in labels[:first]) and labels[first] == answers[0][0]
    assert pack(make_samples(tok, recs[1:]), 64).labels[0].tolist().count(IGNORE) < 64  # text-only too


def test_truncated_sample_keeps_its_mask(tmp_path, tok):
    s = make_samples(tok, read_instruct(str(llava(tmp_path))))[0]
    n_q = s.loss_mask.index(1)
    batch = pack([s], n_q + 2, truncate=True)  # bos + question + 1 answer token: eos takes the last label
    labels = batch.labels[0].tolist()
    assert [t for t in labels if t != IGNORE] == [s.caption_ids[n_q], T.EOS]


def test_qa_jsonl_one_turn(tmp_path, tok):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    rows = [{"id": "q1", "image": "x.png", "prompt": "question: how many shapes are there? answer:",
             "caption": "question: how many shapes are there? answer: three", "target": "three"},
            {"id": "q2", "image": "x.png", "prompt": "question: how many shapes are there? answer:",
             "caption": "question: how many shapes are there? answer: three"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = read_instruct(str(tmp_path / "qa.jsonl"))
    assert [r.extra["pieces"] for r in recs] == [[("question: how many shapes are there? answer:", False),
                                                  ("three", True)]] * 2
    s = make_samples(tok, recs)[0]
    assert [t for t, m in zip(s.caption_ids + [T.EOS], s.loss_mask) if m] == \
        T.encode_captions(tok, ["three"])[0] + [T.EOS]


def test_train_instruct_runs(tiny, tmp_path):
    """train.py --instruct on a LLaVA-format file: masked samples, text-only conversations as text rows."""
    import train
    from model import build_model
    rows = [json.loads(line) for line in open(tiny["train"])][:8]
    items = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": r["caption"]},
        {"from": "human", "value": "and again?"}, {"from": "gpt", "value": r["caption"]}]} for r in rows]
    items.append({"id": "text", "conversations": TEXT})
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(items))
    cfg = train.TrainConfig(data=f"{path}::{tiny['root']}", tokenizer=str(tiny["tokenizer"]), instruct=True,
                            out_dir=str(tmp_path / "run"), image_size=16, patch_size=4, vit_dim=16, vit_depth=1,
                            vit_heads=2, n_layer=1, n_head=2, d_model=32, batch_size=4, row_len=128, steps=2,
                            warmup=1, save_every=2, device="cpu", lr=1e-3, loss="ntp")
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    model = build_model(cfg, tok)
    _, data, _ = train.load_data(cfg, tok, model, None, "cpu", True, 1)
    assert len(data.samples) == 8 and all(s.loss_mask is not None for s in data.samples)
    assert len(data.text_samples) == 1 and data.text_samples[0].loss_mask is not None
    question = T.encode_captions(tok, ["question: what is it? answer:"])[0]
    assert data.samples[0].loss_mask[:len(question)] == [0] * len(question)
    train.main(cfg)
    assert os.path.exists(tmp_path / "run" / "ckpt_000002.pt")
