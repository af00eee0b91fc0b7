"""benchmarks/qa.py (questions about the generator's scenes) and benchmarks/qa_eval.py's generated-answer scoring."""
import json
import random
import re

import pytest
import torch

from benchmarks import qa_eval as Q
from data import tokenizer as T
from benchmarks import qa
from benchmarks.load import read_mc
from world.generate import GenConfig, generate, resolve
from world.scenes import NUMS, sample_scene
from data.scores import load_scores


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny generator data set (train and test splits with scenes and images) and a tokenizer."""
    root = tmp_path_factory.mktemp("qa")
    generate(GenConfig(out=str(root / "data"), n_ref=40, n_text=40, n_label=8, n_train=60, n_val=4, n_test=30,
                       n_probe=2, workers=1))
    qa.build_qa(str(root / "data" / "train.jsonl"), str(root / "qa" / "train.jsonl"), per_scene=2)
    T.main(["--data", f"{root}/data/train.jsonl,{root}/qa/train.jsonl", "--out", f"{root}/tok.json",
            "--vocab-size", "400"])
    return root


def obj_at(scene, phrase):
    """The object whose cell the position phrase names."""
    hits = [o for o in scene if qa.position_phrase(o["row"], o["col"]) == phrase]
    assert len(hits) == 1, (phrase, scene)
    return hits[0]


def check(scene, q):
    """Parse the question back and check its answer against the scene, independently of qa.py's logic."""
    assert q["target"] in q["choices"]
    text, target = q["question"], q["target"]
    if q["kind"] == "count":
        assert text == "how many shapes are there?" and target == NUMS[len(scene)]
    elif q["kind"] == "colour":
        shape = re.fullmatch(r"what colour is the (\w+)\?", text).group(1)
        same = [o for o in scene if o["shape"] == shape]
        assert len(same) == 1 and same[0]["colour"] == target
    elif q["kind"] == "shape":
        phrase = re.fullmatch(r"what shape is (at the [\w ]+)\?", text).group(1)
        assert obj_at(scene, phrase)["shape"] == target
    elif q["kind"] == "position":
        colour, shape = re.fullmatch(r"where is the (\w+) (\w+)\?", text).groups()
        same = [o for o in scene if (o["shape"], o["colour"]) == (shape, colour)]
        assert len(same) == 1 and qa.position_phrase(same[0]["row"], same[0]["col"]) == target
    elif q["kind"] == "presence":
        shape = re.fullmatch(r"is there a (\w+)\?", text).group(1)
        assert target == ("yes" if any(o["shape"] == shape for o in scene) else "no")
    else:
        raise AssertionError(q["kind"])


def test_answers_match_the_scene():
    cfg = resolve(GenConfig())
    rng = random.Random(0)
    shapes, colours = ["circle", "square", "triangle", "star", "cross", "diamond"], ["red", "green", "blue", "yellow",
                                                                                     "purple", "orange", "cyan", "pink"]
    seen, answers = set(), set()
    for _ in range(400):
        scene = sample_scene(rng, cfg)
        for q in qa.scene_questions(scene, rng, shapes, colours):
            check(scene, q)
            seen.add(q["kind"])
            answers.add((q["kind"], q["target"]))
    assert seen == set(qa.KINDS)
    assert ("presence", "yes") in answers and ("presence", "no") in answers
    assert len({a for k, a in answers if k == "position"}) == 9  # every cell, with the generator's wording
    assert {a for k, a in answers if k == "position"} == set(qa.all_positions())


def test_ambiguous_questions_are_not_asked():
    twins = [dict(shape="circle", colour="red", size="large", row="top", col="left"),
             dict(shape="circle", colour="red", size="small", row="bottom", col="right")]
    qs = qa.scene_questions(twins, random.Random(0), ["circle", "square"], ["red", "blue"])
    kinds = {q["kind"] for q in qs}
    assert "colour" not in kinds and "position" not in kinds  # "the circle" / "the red circle" is not one object
    assert {"count", "shape", "presence"} <= kinds
    assert next(q for q in qs if q["kind"] == "count")["target"] == "two"


def test_build_uses_only_the_given_split(synth):
    root = synth
    scenes = {}
    for split in ("train", "test"):
        for line in open(root / "data" / f"{split}.jsonl"):
            r = json.loads(line)
            scenes[r["id"]] = (split, r["image"], r["scene"])
    train = [json.loads(x) for x in open(root / "qa" / "train.jsonl")]
    test = qa.build_qa(str(root / "data" / "test.jsonl"), str(root / "qa" / "test.jsonl"), per_scene=0)
    assert len(train) == 2 * 60  # two questions per scene (every scene has count, shape and presence)
    for rows, split in ((train, "train"), (test, "test")):
        assert {r["source"] for r in rows} <= {k for k, v in scenes.items() if v[0] == split}
        for r in rows:
            s, image, scene = scenes[r["source"]]
            # the image is the source record's, seen from the QA file's folder
            assert (root / "qa" / r["image"]).resolve() == (root / "data" / image).resolve()
            check(scene, {"kind": r["kind"], "question": r["prompt"][len("question: "):-len(" answer:")],
                          "target": r["target"], "choices": r["choices"]})
            assert r["choices"][r["answer"]] == r["target"]
            assert r["caption"] == f"{r['prompt']} {r['target']}"
    assert len({r["id"] for r in test}) == len(test)
    assert {r["kind"] for r in test} == set(qa.KINDS)
    # deterministic
    again = qa.build_qa(str(root / "data" / "test.jsonl"), str(root / "qa" / "test2.jsonl"), per_scene=0)
    assert again == test


def test_answer_only_scores_mask_the_question(synth):
    from data.records import read_records
    from loss import caption_factors, prior_weights
    from utils import text_fingerprint
    root = synth
    path = qa.answer_only_scores(str(root / "qa" / "train.jsonl"), str(root / "tok.json"), str(root / "mask.pt"))
    tok = T.load_tokenizer(str(root / "tok.json"))
    records = read_records(str(root / "qa" / "train.jsonl"), require_image=False, check_files=False)
    p_ref = load_scores(path, T.fingerprint(tok), text_fingerprint(records))
    for r in records[:20]:
        n_prompt = len(T.encode_captions(tok, [r.extra["prompt"]])[0])
        n_answer = len(T.encode_captions(tok, [r.caption])[0]) - n_prompt
        p = p_ref[r.id]
        assert p.tolist() == [1.0] * n_prompt + [0.0] * (n_answer + 1)  # + <|eos|>
        w = prior_weights(p[None])
        f = caption_factors(w, torch.ones_like(w, dtype=torch.bool))[0]
        assert f[:n_prompt].abs().sum() == 0  # no loss on the question
        assert torch.allclose(f[n_prompt:], torch.full((n_answer + 1,), len(p) / (n_answer + 1)))


def exact_match(predictions, targets):
    """Share of predictions equal to their target after normalise_answer."""
    return sum(Q.normalise_answer(p) == Q.normalise_answer(t) for p, t in zip(predictions, targets)) / len(targets)


def test_normalise_and_exact_match():
    assert Q.normalise_answer("  At the  top LEFT. ") == "at the top left"
    assert Q.normalise_answer("red!") == "red"
    cases = [("red", "red", True), ("Red", "red", True), (" red\n", "red", True), ("red circle", "red", False),
             ("", "red", False), ("at the top", "at the top left", False), ("at the top left", "at the top left", True),
             ("two", "three", False), ("yes.", "yes", True), ("no", "yes", False)]
    for pred, target, ok in cases:
        assert exact_match([pred], [target]) == float(ok), (pred, target)
    assert exact_match([p for p, _, _ in cases], [t for _, t, _ in cases]) == pytest.approx(5 / 10)


def tiny_vlm(tok):
    from model import DecoderConfig, VLM, VLMConfig
    torch.manual_seed(0)
    cfg = VLMConfig(arch="h", image_size=48, patch_size=16, vit_dim=32, vit_depth=1, vit_heads=2,
                    decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32,
                                          max_seq_len=128))
    return VLM(cfg).eval()


def test_qa_generate_scores_generated_text(synth, monkeypatch):
    """With a stand-in for model.generate that answers a known text per prompt, qa_generate must give back
    each row's own answer (rows grouped by prompt length and batched) and score it by exact match."""
    import benchmarks.generate as M
    root = synth
    tok = T.load_tokenizer(str(root / "tok.json"))
    vlm = tiny_vlm(tok)
    rows, prompts = [], set()
    for line in open(root / "qa" / "test.jsonl"):  # one question per prompt text, so the stand-in can tell them apart
        r = json.loads(line)
        if r["prompt"] not in prompts:
            prompts.add(r["prompt"])
            rows.append(r)
    path = str(root / "qa" / "unique.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(rows) >= 6 and len({len(T.encode_captions(tok, [r["prompt"]])[0]) for r in rows}) > 1
    wrong = {r["prompt"] for r in rows[::3]}  # every third question answered wrongly
    by_prompt = {tuple(vlm.image_tokens() + [T.BOS] + T.encode_captions(tok, [r["prompt"]])[0]): r for r in rows}

    def fake_generate(model, input_ids, images, max_new_tokens=40, temperature=0.0, **kw):
        out = []
        for row in input_ids.tolist():
            r = by_prompt[tuple(row)]
            text = "something else" if r["prompt"] in wrong else r["target"].upper() + "."
            out.append(T.encode_captions(tok, [text])[0])
        return out

    monkeypatch.setattr(M, "generate", fake_generate)
    got = Q.qa_generate(vlm, tok, path)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    for g, r in zip(got, rows):
        assert g["target"] == r["target"]
        assert g["correct"] == (r["prompt"] not in wrong)
        assert g["prediction"] == ("something else" if r["prompt"] in wrong else r["target"].upper() + ".")
    expected = sum(r["prompt"] not in wrong for r in rows) / len(rows)
    assert exact_match([g["prediction"] for g in got], [g["target"] for g in got]) == pytest.approx(expected)


def test_generate_answers_batching_matches_one_by_one(synth):
    """Real greedy decoding: batching rows of equal length gives each row what decoding it alone gives."""
    from data.images import load_images
    root = synth
    tok = T.load_tokenizer(str(root / "tok.json"))
    vlm = tiny_vlm(tok)
    questions, images = load_images(read_mc(str(root / "qa" / "test.jsonl"))[:12], 48)
    prompts = [q.caption for q in questions]
    together = Q.generate_answers(vlm, tok, prompts, images, max_new_tokens=5, batch=8)
    alone = [Q.generate_answers(vlm, tok, [p], images[i:i + 1], max_new_tokens=5)[0] for i, p in enumerate(prompts)]
    assert together == alone
    assert all(isinstance(a, str) for a in together)


def test_cli_flags_from_the_config_dataclass(synth, tmp_path, capsys):
    """python -m benchmarks.qa: flags from QAConfig (utils.run); a user's mistake is one line and exit code 2."""
    from utils import run
    out = tmp_path / "qa.jsonl"
    rows = run(qa.main, qa.QAConfig, ["--data", str(synth / "data" / "test.jsonl"), "--out", str(out),
                                      "--per-scene", "0", "--kinds", "count,presence", "--max-scenes", "5"])
    assert [r["kind"] for r in rows] == ["count", "presence"] * 5
    assert len(out.read_text().splitlines()) == 10 and "wrote 10 questions" in capsys.readouterr().out
    for argv, message in ((["--data", str(synth / "data" / "test.jsonl"), "--out", str(out), "--kinds", "size"],
                           "unknown kind(s) size"), (["--out", str(out)], "give --data")):
        with pytest.raises(SystemExit) as e:
            run(qa.main, qa.QAConfig, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
