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
from benchmarks import join_repeated
from utils import UserError, parse_config
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
    # OCR's image lost its pair ("Maybe" is a bad row): its one right answer is no "both right" (acc+ 0, not 100)
    assert mme_metrics(recs, [0, 0, 0])["perception"] == (50 + 0) + (100 + 0)
    with open(tmp_path / "POPE.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "answer", "category", "image"],
                                                 [0, "Is there a car?", "yes", "adversarial", png_b64(7)],
                                                 [1, "Is there a bus?", "no", "random", "0"]])
    recs = B.read_bench(f"pope:{tmp_path / 'POPE.tsv'}")
    assert [(r.extra["split"], r.extra["answer"]) for r in recs] == [("adversarial", 0), ("random", 1)]


def test_generated_answers_matched_like_the_benchmarks():
    yn = ["yes", "no"]
    assert [S.match_answer(a, yn, "pope") for a in ("Yes, there is.", "No.", "there is not a dog", "a dog")] == \
        [0, 1, 1, 0]
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
    preds = [S.match_answer(a, ["yes", "no"], "pope") for a in answers]  # POPE's json-lines: POPE's own rule
    yes = sum(p == 0 for p in preds)
    assert out["pope_gen_random_yes_ratio"] == 100.0 * yes / len(recs)
    assert out["pope_gen_unmatched"] == 0.0  # POPE's rule places every answer (anything without no/not is yes)


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


# ----------------------------------------------------------------------------- issue 30: scored as the official code


def write_pope_tsv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "answer", "category", "image"]] + rows)
    return path


def test_pope_tsv_question_shared_by_splits_counts_in_each(tmp_path):
    """VLMEvalKit's POPE.tsv stores a question of several splits once; its scoring splits the category, and its
    "Overall" pools every (question, split) pair."""
    path = write_pope_tsv(tmp_path / "POPE.tsv", [[0, "Is there a car?", "Yes", "random,popular,adversarial",
                                                   png_b64(7)],
                                                  [1, "Is there a bus?", "No", "random", "0"],
                                                  [2, "Is there a cat?", "No", "popular,adversarial", "0"],
                                                  [3, "Is there a dog?", "Yes", "adversarial", png_b64(8)]])
    recs = B.read_bench(f"pope:{path}")
    assert [r.extra["splits"] for r in recs] == [["random", "popular", "adversarial"], ["random"],
                                                 ["popular", "adversarial"], ["adversarial"]]
    from benchmarks.metrics import bench_metrics
    out = bench_metrics("pope", recs, [0, 0, 0, 1])  # yes, yes, yes, no
    assert {k.rsplit("_", 1)[0] for k in out if k.endswith("_f1") and k != "mean_f1"} == \
        {"random", "popular", "adversarial"}  # no split named "random,popular,adversarial"
    # by hand: random tp 1 fp 1; popular tp 1 fp 1; adversarial tp 1 fp 1 fn 1; pooled tp 3 fp 3 fn 1 of 7 pairs
    assert out["random_f1"] == pytest.approx(200 / 3) and out["popular_acc"] == 50.0
    assert out["adversarial_f1"] == pytest.approx(50.0) and out["adversarial_acc"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(2 * 50 * 75 / 125) and out["acc"] == pytest.approx(300 / 7)
    assert out["precision"] == pytest.approx(50.0) and out["recall"] == pytest.approx(75.0)


def test_max_rows_keeps_whole_units(tmp_path):
    """--max-rows takes whole POPE images, MME images (both questions) and MMBench questions with every copy."""
    pope = write_pope(tmp_path, "random")  # 2 images x 2 questions
    mme = write_mme(tmp_path)              # 3 images x 2 questions
    img = png_b64(9)
    circ = [dict(index=0, question="Which?", A="a", B="b", C="c", answer="A", image=img),
            dict(index=1_000_000, question="Which?", A="b", B="c", C="a", answer="C", image="0"),
            dict(index=2_000_000, question="Which?", A="c", B="a", C="b", answer="B", image="0"),
            dict(index=1, question="Who?", A="x", B="y", answer="B", image="0"),
            dict(index=1_000_001, question="Who?", A="y", B="x", answer="A", image="0")]
    mmb = write_tsv(tmp_path / "circ.tsv", circ)
    for seed in range(4):
        recs = B.load_bench(f"pope:{pope}::{tmp_path / 'val2014'}", 16, max_rows=1, seed=seed)[0]
        assert len(recs) == 2 and recs[0].image == recs[1].image  # one row asked for: its image's two questions
        recs = B.load_bench(f"mme:{mme}", 16, max_rows=3, seed=seed)[0]
        keys = [r.extra["image_key"] for r in recs]
        assert len(recs) == 4 and all(keys.count(k) == 2 for k in keys)
        recs = B.load_bench(f"mmbench:{mmb}", 16, max_rows=1, seed=seed)[0]
        groups = {r.extra["group"] for r in recs}
        assert len(groups) == 1 and len(recs) == {0: 3, 1: 2}[groups.pop()]
    assert [r.id for r in B.load_bench(f"mme:{mme}", 16, max_rows=3, seed=5)[0]] == \
        [r.id for r in B.subsample_units(B.read_bench(f"mme:{mme}"), 3, 5)]  # the same subset every time


def test_yes_no_options_stay_multiple_choice(tmp_path):
    """Only POPE and MME are yes/no questions: a multiple-choice question whose options are yes and no is matched
    by its letter."""
    rows = [dict(index=0, question="Is it red?", A="yes", B="no", answer="B", category="c", image=png_b64(3))]
    spec = f"mmstar:{write_tsv(tmp_path / 'yn.tsv', rows)}"
    rec = B.read_bench(spec)[0]
    assert rec.caption == "question: Is it red? options: A. yes B. no answer:"
    assert S.answer_rule(spec) == "choice"
    assert [S.match_answer(a, rec.extra["choices"], S.answer_rule(spec)) for a in ("B", "A", "(B)", "no")] == \
        [1, 0, 1, 1]
    assert S.match_answer("B", ["yes", "no"]) == 1  # the default is the multiple-choice rule, not a yes/no one


TRICKY = ["Yes. There is no dog.", "NO", "Not sure", "No!", "yes", "Yes, there is.", "no.", "There is no dog."]


def test_each_benchmark_matches_answers_by_its_own_rule(tmp_path):
    """docs/benchmarks.md's table: 0 yes, 1 no, -1 neither (wrong)."""
    yn = ["yes", "no"]
    assert [S.match_answer(a, yn, "pope") for a in TRICKY] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert [S.match_answer(a, yn, "mme") for a in TRICKY] == [0, 1, 1, 1, 0, 0, 1, -1]
    assert [S.match_answer(a, yn, "vlmevalkit") for a in TRICKY] == [-1, 1, -1, 1, 0, 0, 1, 1]
    assert S.vlmevalkit_yes_no("yes-no - maybe") == -1 and S.vlmevalkit_yes_no("yes/no") == -1
    assert S.vlmevalkit_yes_no("(yes)") == 0 and S.vlmevalkit_yes_no("yes:") == -1  # ":" is not in its list
    pope = write_pope(tmp_path, "random")
    tsv = write_pope_tsv(tmp_path / "POPE.tsv", [[0, "Is there a car?", "Yes", "random", png_b64(7)]])
    assert [S.answer_rule(s) for s in (f"pope:{pope}", f"pope:{tsv}", f"mme:{write_mme(tmp_path)}",
                                       f"mme:{tsv}", f"mmbench:{tsv}", f"seed:{pope}")] == \
        ["pope", "vlmevalkit", "mme", "vlmevalkit", "choice", "choice"]


def test_two_pope_files_of_one_split_refused(small, tmp_path):
    _, tok, model = small
    a = write_pope(tmp_path, "random")
    b = tmp_path / "aokvqa_pope_random.json"
    b.write_text(a.read_text())
    specs = [f"pope:{a}::{tmp_path / 'val2014'}", f"pope:{b}::{tmp_path / 'val2014'}"]
    with pytest.raises(UserError, match="coco_pope_random.json.*aokvqa_pope_random.json.*split 'random'"):
        S.bench_results(specs, model, tok)
    tsv = write_pope_tsv(tmp_path / "POPE.tsv", [[0, "Is there a car?", "Yes", "popular,random", png_b64(7)]])
    with pytest.raises(UserError, match="POPE.tsv both hold POPE split 'random'"):
        S.check_pope_splits([specs[0], f"pope:{tsv}"], 16)
    c = tmp_path / "coco_pope_popular.json"
    c.write_text(a.read_text())
    S.check_pope_splits([specs[0], f"pope:{c}::{tmp_path / 'val2014'}"], 16)  # different splits: fine


def test_mme_image_missing_its_pair_is_not_both_right(tmp_path, capsys):
    mme = write_mme(tmp_path)
    (mme / "existence" / "000000000001.txt").write_text("Is there a dog?\tYes\nIs there a cat?\tPerhaps\n")
    recs = B.read_mme(str(mme), max_bad_fraction=0.5)
    from benchmarks.metrics import mme_metrics
    out = mme_metrics(recs, [r.extra["answer"] for r in recs])  # every answer right
    assert out["existence_acc"] == 100.0 and out["existence_acc_plus"] == 50.0 and out["artwork_acc_plus"] == 100.0


def test_tsv_duplicated_index_refused(tmp_path):
    rows = mmbench_rows() + [dict(mmbench_rows()[1], question="How many cats?")]  # index 1 twice
    path = write_tsv(tmp_path / "dup.tsv", rows)
    with pytest.raises(DataError, match=r"dup.tsv: duplicated index 1 \(lines 3 and 5\)"):
        B.read_bench(f"mmbench:{path}")


def test_yes_no_kind_given_a_multiple_choice_tsv_refused(tmp_path):
    path = write_tsv(tmp_path / "MMBench.tsv", mmbench_rows())
    for kind, name in (("pope", "POPE"), ("mme", "MME")):
        with pytest.raises(DataError) as e:
            B.read_bench(f"{kind}:{path}")
        msg = str(e.value)
        assert msg.startswith(f"--bench {kind}:{path}: looks like a multiple-choice TSV") and name in msg
        assert "\n" not in msg


def test_not_utf8_and_byte_order_marks(tmp_path):
    path = tmp_path / "latin1.tsv"
    write_tsv(path, mmbench_rows())
    path.write_bytes(path.read_bytes().replace(b"What colour", "Quelle couleur é".encode("latin-1")))
    with pytest.raises(DataError, match="latin1.tsv: not UTF-8 text") as e:
        B.read_bench(f"mmbench:{path}")
    assert "\n" not in str(e.value)
    bom = b"\xef\xbb\xbf"
    tsv = tmp_path / "bom.tsv"
    write_tsv(tsv, mmbench_rows())
    tsv.write_bytes(bom + tsv.read_bytes())
    assert len(B.read_bench(f"mmbench:{tsv}")) == 3
    pope = write_pope(tmp_path, "random")
    pope.write_bytes(bom + pope.read_bytes())
    assert len(B.read_pope(str(pope), str(tmp_path / "val2014"), max_bad_fraction=0.0)) == 4
    txt = write_mme(tmp_path) / "existence" / "000000000000.txt"
    txt.write_bytes(bom + txt.read_bytes())
    assert all(not r.extra["question"].startswith("\ufeff") for r in B.read_mme(str(txt.parent.parent)))
    seed = write_seed(tmp_path)
    seed.write_bytes(bom + seed.read_bytes())
    assert len(B.read_seed(str(seed), str(tmp_path / "SEED-Bench-image"))) == 2


def test_yes_no_answers_are_decided_by_their_first_token():
    """"yes" as 2 tokens against a 1-token "no": summed, the second token's cost decides; by the first token (the
    headline of yes/no benchmarks), the model's preference for starting "y" does."""
    lp = [torch.tensor([-0.5, -3.0]), torch.tensor([-1.0])]  # p(Ġy) > p(Ġno), but p(es | Ġy) small
    assert S.predictions([lp])[0] == 1 and S.predictions([lp], first=True)[0] == 0
    assert S.predictions([lp], normalise=True)[0] == 1  # per-token mean: -1.75 vs -1.0
