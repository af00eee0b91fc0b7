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
    head, tail = recs[0].caption.split(" <|eos|> ")
    assert s.caption_ids == T.encode_captions(tok, [head])[0] + [T.EOS] + T.encode_captions(tok, [tail])[0]
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


def conversations(tmp_path, *convs, **kw):
    """read_instruct of text-only LLaVA entries with these conversations."""
    path = tmp_path / "convs.json"
    path.write_text(json.dumps([{"id": f"c{i}", "conversations": c} for i, c in enumerate(convs)]))
    return read_instruct(str(path), **kw)


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_eos_ends_every_answer(tmp_path, tok):
    """Issue 30.5a: the <|eos|> token closes each answer, trained, and what follows it (a question) is not."""
    rec, = conversations(tmp_path, turns("Name a colour.", "red", "Another?", "blue", "And one more?", "green"))
    s = make_samples(tok, [rec])[0]
    answers = [T.encode_captions(tok, [a])[0] for a in ("red", "blue", "green")]
    labels = pack([s], 128).labels[0].tolist()
    assert [t for t in labels if t != IGNORE] == answers[0] + [T.EOS] + answers[1] + [T.EOS] + answers[2] + [T.EOS]
    inner = [i for i, t in enumerate(s.caption_ids) if t == T.EOS]
    assert len(inner) == 2 and all(s.loss_mask[i] == 1 and s.loss_mask[i + 1] == 0 for i in inner)
    assert n_labels(s) == sum(t != IGNORE for t in labels)


def test_one_turn_conversation_as_before(tmp_path, tok):
    """Issue 30.5a: a one-turn conversation is the same tokens and mask as before: question, answer, eos trained."""
    rec, = conversations(tmp_path, turns("<image>\nWhat colour is the circle?", "It is red."))
    s = make_samples(tok, [rec])[0]
    question = T.encode_captions(tok, ["question: What colour is the circle? answer:"])[0]
    answer = T.encode_captions(tok, ["It is red."])[0]
    assert s.caption_ids == question + answer and T.EOS not in s.caption_ids
    assert s.loss_mask == [0] * len(question) + [1] * len(answer) + [1]
    # a record without pieces: the plain sample it always was, no mask, eos trained even when cut
    plain = make_samples(tok, [Record("p", "It is red.", None)])[0]
    assert plain == Sample(answer, {}, None, 0, None)
    assert pack([plain], 3).labels[0].tolist() == answer[:2] + [T.EOS]


def test_leading_gpt_turn_dropped(tmp_path, tok):
    """Issue 30.5b: a first turn from gpt is dropped, not the entry (LLaVA's preprocessing does the same)."""
    lead = [{"from": "gpt", "value": "Hello, ask me."}] + turns("Name a colour.", "green")
    rec, = conversations(tmp_path, lead)  # the default max_bad_fraction: no entry is bad
    assert rec.extra["pieces"] == [("question: Name a colour. answer:", False), ("green", True)]
    assert make_samples(tok, [rec])[0].caption_ids == T.encode_captions(tok, ["question: Name a colour. answer:"])[0] \
        + T.encode_captions(tok, ["green"])[0]
    # nothing trainable left: a bad entry, as before
    with pytest.raises(DataError, match="1 of 2 instruction entries are bad"):
        conversations(tmp_path, lead, [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi."}])


def test_newlines_kept_image_markers_removed(tmp_path, tok):
    """Issue 30.5c: a turn keeps its newlines (lists, code); "<image>" goes, with the newline after a leading one."""
    rec, = conversations(tmp_path, turns("<image>\nList the colours:\n- red\n- blue", "Colours:\n1. red\n2. blue",
                                         "Code?\n<image>", "```\nx = 1\n```"))
    assert [p for p, _ in rec.extra["pieces"]] == ["question: List the colours:\n- red\n- blue answer:",
                                                   "Colours:\n1. red\n2. blue", [T.EOS], "question: Code? answer:",
                                                   "```\nx = 1\n```"]
    text = tok.decode(make_samples(tok, [rec])[0].caption_ids)
    assert "1. red\n2. blue" in text and "```\nx = 1\n```" in text and "<image>" not in text


def test_cut_question_trains_no_eos(tmp_path, tok):
    """Issue 30.5d: a row cut inside a question (or right after an answer's eos) trains no closing eos there."""
    s = make_samples(tok, read_instruct(str(llava(tmp_path))))[0]
    end = s.caption_ids.index(T.EOS)  # the first answer's end
    first = [t for t, m in zip(s.caption_ids[:end], s.loss_mask) if m]  # the first answer's tokens
    question = len(T.encode_captions(tok, ["question: And the square? answer:"])[0])
    for keep in (end + 1, end + 2, end + question):  # right after the eos, then inside the second question
        labels = pack([s], keep + 1).labels[0].tolist()
        assert [t for t in labels if t != IGNORE] == first + [T.EOS] and labels[-1] == IGNORE
    # cut inside the second answer: its start is trained and the closing eos after it, as before
    labels = pack([s], end + question + 3).labels[0].tolist()
    assert [t for t in labels if t != IGNORE] == first + [T.EOS] + s.caption_ids[end + question + 1:][:1] + [T.EOS]


def test_unanswered_counted_and_train_nothing(tmp_path, tok, capsys):
    """Issue 30.5e: a conversation whose answers the row length cuts away keeps no trained label and is counted."""
    recs = conversations(tmp_path, turns("What colour is the circle? " * 6, "red"), turns("Name a colour.", "green"))
    samples = make_samples(tok, recs)
    room = samples[0].loss_mask.index(1)  # a row of bos + the first one's question; the second one fits whole
    assert len(samples[1].caption_ids) < room
    batch = pack(samples, room + 1)
    assert batch.labels[0].eq(IGNORE).all()  # not even its eos: never "answer nothing"
    assert warn_unanswered(room + 1, (samples, 0), ([Sample([9] * 99)], 0)) == 1  # a plain sample is not counted
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: 1 of 2 instruction conversations have no answer token" in err
    assert warn_unanswered(room + 1, (samples[1:], 0)) == 0 and capsys.readouterr().err == ""


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


def test_train_instruct_runs(tiny, tmp_path, capsys):
    """train.py --instruct on a LLaVA-format file: masked samples, text-only conversations as text rows; one whose
    question fills the row is reported at start-up (issue 30.5e) and trains nothing."""
    import train
    from model import build_model
    rows = [json.loads(line) for line in open(tiny["train"])][:8]
    items = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": r["caption"]},
        {"from": "human", "value": "and again?"}, {"from": "gpt", "value": r["caption"]}]} for r in rows]
    items.append({"id": "text", "conversations": TEXT})
    items.append({"id": "long", "conversations": turns("what is it? " * 60, "red")})
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
    assert len(data.text_samples) == 2 and all(s.loss_mask is not None for s in data.text_samples)
    assert "warning: 1 of 10 instruction conversations have no answer token within --row-len 128" in \
        capsys.readouterr().err
    question = T.encode_captions(tok, ["question: what is it? answer:"])[0]
    assert data.samples[0].loss_mask[:len(question)] == [0] * len(question)
    train.main(cfg)
    assert os.path.exists(tmp_path / "run" / "ckpt_000002.pt")
