"""Tests for the readers of the paper's benchmarks as distributed (benchmarks/load.py) and their scoring through
eval.py --bench (benchmarks/scoring.py): each reader on a tiny file of its exact format made here (POPE lines, an
MME folder of both layouts, a VLMEvalKit TSV with base64 PNGs and rows that borrow another row's image, SEED-Bench
JSON), bad rows counted by reason, and the scored predictions against plain single-sequence forward passes.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_benchmarks.py
"""
import base64
import csv
import io
import json
import os

import pytest
import torch
from PIL import Image

from benchmarks import load as B
from benchmarks import scoring as S
from data import tokenizer as T
from data.record_types import DataError
from data.images import load_image, normalize
from utils import UserError, join_repeated, parse_config
from model import DecoderConfig, VLM, VLMConfig


def png(path, seed):
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(path)


def png_b64(seed):
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_pope(root, split="random", extra_lines=()):
    os.makedirs(root / "val2014", exist_ok=True)
    for i in range(2):
        png(root / "val2014" / f"COCO_val2014_{i:012d}.jpg".replace(".jpg", ".png"), i)
    lines = [json.dumps({"question_id": q, "image": f"COCO_val2014_{q // 2:012d}.png", "image_id": q // 2,
                         "text": f"Is there a {obj} in the image?", "label": lab})
             for q, (obj, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "no"), ("bus", "yes")])]
    path = root / f"coco_pope_{split}.json"
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def write_mme(root):
    """existence/ in the image-beside-txt layout, artwork/ in the images/ + questions_answers_YN/ layout."""
    mme = root / "MME"
    (mme / "existence").mkdir(parents=True)
    (mme / "artwork" / "images").mkdir(parents=True)
    (mme / "artwork" / "questions_answers_YN").mkdir()
    for i in range(2):
        png(mme / "existence" / f"{i:012d}.png", 10 + i)
        (mme / "existence" / f"{i:012d}.txt").write_text(
            f"Is there a dog in this image? Please answer yes or no.\tYes\n"
            f"Is there a cat in this image? Please answer yes or no.\tNo\n")
    png(mme / "artwork" / "images" / "10002.png", 20)
    (mme / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Monet? Please answer yes or no.\tYes \r\n"
        "Is this artwork created by Dali? Please answer yes or no.\tNo\r\n")
    return mme


TSV_COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def write_tsv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(TSV_COLS)
        for r in rows:
            w.writerow([r.get(c, "") for c in TSV_COLS])
    return path


def mmbench_rows():
    return [dict(index=0, question="What colour is the sky?", hint="Look up.", A="blue", B="green", C="red", D="",
                 answer="A", category="color", **{"l2-category": "attribute"}, image=png_b64(1)),
            dict(index=1, question="How many dogs?", hint="nan", A="one", B="two", C="", D="", answer="B",
                 category="count", **{"l2-category": "attribute"}, image="0"),  # borrows row 0's image
            dict(index=2, question="Which shape?", A="circle", B="square", C="star", D="heart", answer="D",
                 category="shape", **{"l2-category": "object"}, image=png_b64(2))]


def write_seed(root):
    os.makedirs(root / "SEED-Bench-image", exist_ok=True)
    png(root / "SEED-Bench-image" / "1454426_2591111986.png", 30)
    qs = [{"question": "What is in the image?", "choice_a": "a dog", "choice_b": "a cat", "choice_c": "a car",
           "choice_d": "a bus", "answer": "B", "question_type_id": 1, "data_id": "1454426_2591111986.png",
           "data_type": "image", "question_id": "101"},
          {"question": "How many?", "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
           "answer": "A", "question_type_id": 2, "data_id": "1454426_2591111986", "data_type": "image",
           "question_id": "102"},  # no extension: found as .png
          {"question": "What happens next?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
           "answer": "C", "question_type_id": 10, "data_id": "v.mp4", "data_type": "video", "question_id": "103"}]
    path = root / "SEED-Bench.json"
    path.write_text(json.dumps({"questions": qs, "question_type": {"Scene Understanding": 1,
                                                                    "Instances Counting": 2}}))
    return path


def test_pope_reader(tmp_path):
    path = write_pope(tmp_path, "adversarial")
    recs = B.read_pope(str(path), str(tmp_path / "val2014"))
    assert [r.extra["answer"] for r in recs] == [0, 1, 1, 0]  # yes = choice 0 of ["yes", "no"]
    assert {r.extra["split"] for r in recs} == {"adversarial"}
    assert recs[1].caption == "question: Is there a cat in the image? answer:"
    assert recs[0].image == recs[1].image != recs[2].image
    recs2, images, index = B.load_bench(f"pope:{path}::{tmp_path / 'val2014'}", 16)
    assert len(images) == 2 and index == [0, 0, 1, 1]  # each image decoded once
    assert torch.equal(images[1], load_image(recs[2].image, 16))


def test_pope_bad_rows(tmp_path, capsys):
    bad = ['{"question_id": 9, "image": "gone.png", "text": "Is there a cow?", "label": "yes"}',
           '{"question_id": 10, "image": "COCO_val2014_000000000000.png", "text": "Is there a cow?", "label": "maybe"}',
           '{broken']
    path = write_pope(tmp_path, "random", bad)
    with pytest.raises(DataError, match="3 of 7 POPE questions are bad"):
        B.read_pope(str(path), str(tmp_path / "val2014"))
    recs = B.read_pope(str(path), str(tmp_path / "val2014"), max_bad_fraction=0.5)
    assert len(recs) == 4
    err = capsys.readouterr().err
    assert "missing image file x 1" in err and "answer not yes/no x 1" in err and "broken JSON x 1" in err
    assert f"{path} line 7: broken JSON" in err  # file and row named


def test_mme_reader_both_layouts(tmp_path):
    recs = B.read_mme(str(write_mme(tmp_path)))
    assert [(r.extra["subtask"], r.extra["answer"]) for r in recs] == \
        [("artwork", 0), ("artwork", 1), ("existence", 0), ("existence", 1), ("existence", 0), ("existence", 1)]
    assert recs[0].image.endswith(os.path.join("artwork", "images", "10002.png"))  # "Yes \r\n" read as yes
    assert recs[2].extra["image_key"] == recs[3].extra["image_key"] != recs[4].extra["image_key"]
    assert recs[2].image.endswith(os.path.join("existence", "000000000000.png"))


def test_mme_bad_rows(tmp_path, capsys):
    mme = write_mme(tmp_path)
    (mme / "existence" / "000000000009.txt").write_text("Is there a cow?\tYes\n")  # no image of that name
    with open(mme / "existence" / "000000000000.txt", "a") as f:
        f.write("no tab here\nIs it?\tPerhaps\n")
    with pytest.raises(DataError, match="3 of 9 MME questions are bad"):
        B.read_mme(str(mme))
    assert len(B.read_mme(str(mme), max_bad_fraction=0.5)) == 6
    err = capsys.readouterr().err
    for reason in ("no tab between question and answer x 1", "answer not yes/no x 1", "missing image file x 1"):
        assert reason in err
    assert "000000000000.txt line 3: no tab" in err


def test_tsv_reader_base64_and_image_references(tmp_path):
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    recs = B.read_tsv(str(path), "mmbench")
    assert [r.extra["choices"] for r in recs] == [["blue", "green", "red"], ["one", "two"],
                                                  ["circle", "square", "star", "heart"]]
    assert [r.extra["answer"] for r in recs] == [0, 1, 3]
    assert recs[0].caption == "question: Look up. What colour is the sky? options: A. blue B. green C. red answer:"
    assert recs[1].caption == "question: How many dogs? options: A. one B. two answer:"  # "nan" hint: none
    assert recs[1].extra["image_b64"] == recs[0].extra["image_b64"]
    assert recs[0].extra["l2_category"] == "attribute"
    _, images, index = B.load_bench(f"mmbench:{path}", 16)
    assert index == [0, 0, 1] and len(images) == 2
    want = load_image(io.BytesIO(base64.b64decode(mmbench_rows()[2]["image"])), 16)
    assert torch.equal(images[1], want)


def test_tsv_bad_rows(tmp_path, capsys):
    rows = mmbench_rows() + [dict(index=3, question="Q?", A="x", B="y", answer="E", image=png_b64(3)),
                             dict(index=4, question="Q?", A="x", answer="A", image=png_b64(3)),
                             dict(index=5, question="Q?", A="x", B="y", answer="A", image="77")]
    path = write_tsv(tmp_path / "mm.tsv", rows)
    with pytest.raises(DataError, match="3 of 6 mmstar questions are bad"):
        B.read_tsv(str(path), "mmstar")
    assert len(B.read_tsv(str(path), "mmstar", max_bad_fraction=0.5)) == 3
    err = capsys.readouterr().err
    for reason in ("answer not an option letter x 1", "fewer than 2 options x 1", "image refers to a row"):
        assert reason in err
    assert f"{path} line 5: answer not an option letter" in err  # line 1 is the header
    (tmp_path / "x.tsv").write_text("index\tquestion\n0\tq\n")
    with pytest.raises(DataError, match="not a VLMEvalKit multiple-choice TSV"):
        B.read_tsv(str(tmp_path / "x.tsv"))


def test_tsv_undecodable_image_counted(tmp_path):
    rows = mmbench_rows()
    rows[2]["image"] = base64.b64encode(b"not an image").decode()
    path = write_tsv(tmp_path / "mm.tsv", rows)
    with pytest.raises(DataError, match="1 of 2 images are bad"):
        B.load_bench(f"mmbench:{path}", 16)


def test_seed_reader(tmp_path, capsys):
    path = write_seed(tmp_path)
    recs = B.read_seed(str(path), str(tmp_path / "SEED-Bench-image"))
    assert [r.extra["answer"] for r in recs] == [1, 0]
    assert [r.extra["question_type"] for r in recs] == ["Scene Understanding", "Instances Counting"]
    assert recs[0].image == recs[1].image
    assert "1 video questions left out" in capsys.readouterr().err
    bad = json.loads(path.read_text())
    bad["questions"][1]["answer"] = "E"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="1 of 2 SEED-Bench questions are bad"):
        B.read_seed(str(path), str(tmp_path / "SEED-Bench-image"))


def test_bench_specs():
    with pytest.raises(UserError, match="KIND one of"):
        B.parse_bench("popex:file")
    with pytest.raises(UserError, match="does not exist"):
        B.parse_bench("pope:/no/such/file.json")
    argv = ["--ckpt", "c.pt", "--bench", "pope:a.json::img", "--bench=mme:M", "--max-rows", "3"]
    assert join_repeated(argv) == ["--ckpt", "c.pt", "--max-rows", "3", "--bench", "pope:a.json::img,mme:M"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    words = ["question: is there a dog in the image? answer: yes no", "blue green red one two circle square star",
             "options: A. B. C. D. heart what colour how many which shape look up sky"]
    tok = T.train_tokenizer(words, vocab_size=300)
    torch.manual_seed(1)
    model = VLM(VLMConfig(arch="u", image_size=16, patch_size=8, vit_dim=32, vit_depth=1, vit_heads=2,
                          decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32,
                                                max_seq_len=128))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return root, tok, model


def hand_choice(model, tok, image, prompt, choices, normalise=False):
    """The choice with the highest log p after [image, bos, prompt], one plain forward per choice."""
    best = []
    for c in choices:
        ctx, tgt = T.encode_captions(tok, [prompt])[0], T.encode_captions(tok, [c])[0]
        seq = model.image_tokens() + [T.BOS] + ctx + tgt
        with torch.no_grad():
            logp = model(torch.tensor([seq]), normalize(image[None])).log_softmax(-1)[0]
        s = sum(float(logp[len(seq) - len(tgt) - 1 + i, t]) for i, t in enumerate(tgt))
        best.append(s / len(tgt) if normalise else s)
    return max(range(len(choices)), key=best.__getitem__)


def test_scoring_matches_plain_forward_and_rotations(small):
    import eval as E
    root, tok, model = small
    spec = f"mmbench:{write_tsv(root / 'MMBench.tsv', mmbench_rows())}"
    recs, logps = S.score_spec(spec, model, tok)
    assert [r.id for r in recs] == [f"mmbench:{i}@{s}" for i, k in ((0, 3), (1, 2), (2, 4)) for s in range(k)]
    _, images, index = B.load_bench(spec, 16)
    at = {0: 0, 1: 0, 2: 1}
    for r, lp in zip(recs, logps):
        img = images[at[r.extra["group"]]]
        for norm in (False, True):
            assert S.predictions([lp], norm)[0] == hand_choice(model, tok, img, r.caption, r.extra["choices"], norm)
    out = S.bench_results([spec], model, tok)
    assert {"mmbench_circular", "mmbench_vanilla", "mmbench_norm_circular", "mmbench_circular_color"} <= set(out)


def test_eval_command_writes_bench_rows(small, tmp_path, capsys):
    import dataclasses
    import eval as E
    root, tok, model = small
    tok.save(str(tmp_path / "tok.json"))
    ckpt = tmp_path / "ckpt_000010.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg), "step": 10,
                "config": {"arch": "u", "loss": "ntp", "seed": 0, "lr": 1e-3, "tokenizer": str(tmp_path / "tok.json")},
                "tokenizer": T.fingerprint(tok), "data": "none"}, ckpt)
    pope = write_pope(tmp_path, "random")
    specs = [f"pope:{pope}::{tmp_path / 'val2014'}", f"mme:{write_mme(tmp_path)}", f"seed:{write_seed(tmp_path)}"
             f"::{tmp_path / 'SEED-Bench-image'}"]
    cfg = parse_config(E.EvalConfig, join_repeated(["--ckpt", str(ckpt)] + [a for s in specs
                                                                                 for a in ("--bench", s)]))
    E.main(cfg)
    out = capsys.readouterr().out
    assert "| pope | random_f1 |" in out and "| mme | perception |" in out and "| seed | acc |" in out
    rows = E.evaluate_checkpoint(str(ckpt), bench=specs)
    got = {r["benchmark"]: r["value"] for r in rows}
    assert got["mme_perception"] == got["mme_existence"] + got["mme_artwork"] and "mme_cognition" not in got
    assert 0 <= got["pope_random_yes_ratio"] <= 100 and "seed_acc_Scene Understanding" in got


def test_yes_no_tsvs_mme_and_pope(tmp_path):
    """VLMEvalKit's MME.tsv / POPE.tsv: yes/no questions; MME's two questions of an image share its image_key."""
    cols = ["index", "category", "image_path", "question", "answer", "image"]
    rows = [[0, "existence", "existence/1.png", "Is there a dog?", "Yes", png_b64(5)],
            [1, "existence", "existence/1.png", "Is there a cat?", "No", "0"],
            [2, "OCR", "OCR/2.png", "Does it say stop?", "yes", png_b64(6)],
            [3, "OCR", "OCR/2.png", "Does it say go?", "Maybe", "2"]]
    with open(tmp_path / "MME.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([cols] + rows)
    recs = B.read_bench(f"mme:{tmp_path / 'MME.tsv'}", max_bad_fraction=0.3)
    assert [(r.extra["subtask"], r.extra["answer"], r.extra["choices"]) for r in recs] == \
        [("existence", 0, ["yes", "no"]), ("existence", 1, ["yes", "no"]), ("OCR", 0, ["yes", "no"])]
    assert recs[0].extra["image_key"] == recs[1].extra["image_key"] != recs[2].extra["image_key"]
    assert recs[1].caption == "question: Is there a cat? answer:"
    from benchmarks.metrics import mme_metrics
    assert mme_metrics(recs, [0, 0, 0])["perception"] == (50 + 0) + (100 + 100)
    with open(tmp_path / "POPE.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "answer", "category", "image"],
                                                 [0, "Is there a car?", "yes", "adversarial", png_b64(7)],
                                                 [1, "Is there a bus?", "no", "random", "0"]])
    recs = B.read_bench(f"pope:{tmp_path / 'POPE.tsv'}")
    assert [(r.extra["split"], r.extra["answer"]) for r in recs] == [("adversarial", 0), ("random", 1)]


def test_generated_answers_matched_like_the_benchmarks():
    yn = ["yes", "no"]
    assert [S.match_answer(a, yn) for a in ("Yes, there is.", "No.", "there is not a dog", "a dog")] == [0, 1, 1, 0]
    opts = ["red circle", "blue", "green"]
    assert [S.match_answer(a, opts) for a in ("B", "(C) green", "A. red circle", "it is blue", "blue or green",
                                              "purple", "Blue", "a red circle", "A green one")] == \
        [1, 2, 0, 1, -1, -1, 1, 0, 2]


def test_generation_scoring(small, tmp_path):
    import eval as E
    from benchmarks.qa_eval import generate_answers
    root, tok, model = small
    pope = write_pope(tmp_path, "random")
    spec = f"pope:{pope}::{tmp_path / 'val2014'}"
    out = S.bench_results([spec], model, tok, generate=4)
    recs, images, index = B.load_bench(spec, 16)
    answers = generate_answers(model, tok, [r.caption for r in recs], images[torch.tensor(index)], max_new_tokens=4)
    preds = [S.match_answer(a, ["yes", "no"]) for a in answers]
    yes = sum(p == 0 for p in preds)
    assert out["pope_gen_random_yes_ratio"] == 100.0 * yes / len(recs)
    assert out["pope_gen_unmatched"] == 0.0  # a yes/no answer always maps to one of the two


def test_file_circular_copies_kept_and_max_rows(small, tmp_path):
    import eval as E
    _, tok, model = small
    img = png_b64(9)
    rows = [dict(index=0, question="Which?", A="blue", B="red", answer="A", category="c", image=img),
            dict(index=1000000, question="Which?", A="red", B="blue", answer="B", category="c", image="0")]
    spec = f"mmbench:{write_tsv(tmp_path / 'circ.tsv', rows)}"
    recs, logps = S.score_spec(spec, model, tok)
    assert [r.id for r in recs] == ["mmbench:0", "mmbench:1000000"] and {r.extra["group"] for r in recs} == {0}
    out = S.bench_results([spec], model, tok)
    right = [p == r.extra["answer"] for p, r in zip(S.predictions(logps), recs)]
    assert out["mmbench_circular"] == 100.0 * all(right) and out["mmbench_vanilla"] == 100.0 * right[0]
    three = f"mmbench:{write_tsv(tmp_path / 'three.tsv', mmbench_rows())}"
    assert len(B.load_bench(three, 16, max_rows=2)[0]) == 2
