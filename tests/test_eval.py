"""Tests for eval.py: choice log-likelihoods against plain single-sequence forward passes, accuracy definitions,
the image derangement, the grounding gap, bad rows and run-directory
resume (experiments/importance.py: test_importance.py).

Run: .venv/bin/python -m pytest tests/test_eval.py
"""
import dataclasses
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import eval as E
import scale  # noqa: F401 (plug-in feature_cache: --feature-cache)
from benchmarks import qa_eval as Q
from data import tokenizer as T
from utils import parse_config
from benchmarks import load as B
from data.packing import Sample, pack
from data.images import load_image, normalize
from data.record_types import DataError
from data.records import read_records
from loss import token_losses
from model import DecoderConfig, VLM, VLMConfig
from data.scores import save_scores
from data.tags import CATEGORIES
from utils import text_fingerprint

CAPTIONS = [  # (caption, per-word tags) for the held-out caption file
    ("a photo of a red circle . stock photo by maria lopez", "b b b b i i b b b b n n"),
    ("two blue squares at the top left | buy now", "i i i b b i i b b b"),
    ("maria lopez , a green star . royalty free image", "n n b b i i b b b b"),
    ("a photo of three stars and a red square", "b b b i i b b i i"),
    ("stock photo : a blue circle at the bottom", "b b b b i i b b i"),
]
TAG = {"i": "image", "b": "boiler", "n": "noise"}
PROMPTS = ["a photo of", "", "a photo of a red", "two blue", "stock photo : a"]
CHOICES = [["red circle", "two blue squares", "green star"], ["circle", "square"],
           ["circle at the top left", "star", "square", "star at the bottom"], ["squares", "circles"],
           ["blue circle", "green star at the top"]]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def save_ckpt(model, tok, path, step, arch, tok_path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg), "step": step,
                "config": {"arch": arch, "loss": "prior", "seed": 3, "lr": 2e-3, "tokenizer": tok_path},
                "tokenizer": T.fingerprint(tok), "data": "none"}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "img")
    for i in range(6):  # random pixels, so every image gives the model a very different context
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(root / "img" / f"{i}.png")
    tok = T.train_tokenizer([c for c, _ in CAPTIONS] + PROMPTS + [c for cs in CHOICES for c in cs], vocab_size=300)
    tok_path = str(root / "tok.json")
    tok.save(tok_path)
    test = write_jsonl(root / "test.jsonl", [{"id": f"t{i}", "image": f"img/{i}.png", "caption": c,
                                               "tags": [TAG[t] for t in tags.split()]}
                                              for i, (c, tags) in enumerate(CAPTIONS)])
    questions = write_jsonl(root / "questions.jsonl", [{"image": f"img/{i}.png", "prompt": p, "choices": c, "answer": 0}
                                                       for i, (p, c) in enumerate(zip(PROMPTS, CHOICES))])
    models, ckpts = {}, {}
    for arch in "hu":
        torch.manual_seed(1)
        model = VLM(VLMConfig(arch=arch, image_size=16, patch_size=8, vit_dim=32, vit_depth=1, vit_heads=2,
                              decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32,
                                                    max_seq_len=128)))
        with torch.no_grad():  # sharper than the 0.02-std init, so images and choices change the log-probs a lot
            for p in model.parameters():
                p.mul_(4)
        models[arch] = model.eval()
        ckpts[arch] = str(root / f"run_{arch}" / "ckpt_000010.pt")
        save_ckpt(model, tok, ckpts[arch], 10, arch, tok_path)
    return dict(root=root, tok=tok, tok_path=tok_path, test=test, questions=questions, models=models, ckpts=ckpts)


def hand_logprobs(model, image_path, context, target):
    """log p of each target token after [image, bos, context], from one plain, unpacked model() call."""
    seq = model.image_tokens() + [T.BOS] + context + target
    with torch.no_grad():
        logp = model(torch.tensor([seq]), normalize(load_image(image_path, 16)[None])).log_softmax(-1)[0]
    start = len(seq) - len(target)
    return torch.stack([logp[start - 1 + i, t] for i, t in enumerate(target)])


def enc(tok, text):
    return T.encode_captions(tok, [text])[0]


@pytest.mark.parametrize("arch", ["h", "u"])
def test_choice_loglik_is_single_sequence_forward(world, arch):
    """Choice tokens only: prompt in the context but not scored, <|eos|> not scored."""
    model, tok = world["models"][arch], world["tok"]
    logps, answers = E.mc_eval(model, tok, world["questions"])
    image = str(world["root"] / "img" / "0.png")
    for j, choice in enumerate(CHOICES[0]):
        expected = hand_logprobs(model, image, enc(tok, PROMPTS[0]), enc(tok, choice))
        assert len(logps[0][j]) == len(enc(tok, choice))
        # float32 forwards of other shapes (packed rows vs one sequence): log-probs of magnitude <= ~10 differ by
        # ~3e-6 relative (float32 sums in another order); atol + rtol x |logp| = 1e-4 + 1e-4 x |logp| leaves >10x
        torch.testing.assert_close(logps[0][j], expected, atol=1e-4, rtol=1e-4)
    # scoring the choice alone (no prompt) must give something else: the prompt really is context
    alone = hand_logprobs(model, image, [], enc(tok, CHOICES[0][0]))
    assert (alone - logps[0][0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["h", "u"])
@pytest.mark.parametrize("row_len,batch_rows", [(256, 4), (64, 1), (128, 2)])
def test_packed_equals_unbatched(world, arch, row_len, batch_rows):
    model, tok = world["models"][arch], world["tok"]
    logps, _ = E.mc_eval(model, tok, world["questions"], row_len=row_len, batch_rows=batch_rows)
    for i, (prompt, choices) in enumerate(zip(PROMPTS, CHOICES)):
        for j, choice in enumerate(choices):
            expected = hand_logprobs(model, str(world["root"] / "img" / f"{i}.png"), enc(tok, prompt), enc(tok, choice))
            # other shapes than one sequence: float32 noise, see test_choice_loglik_is_single_sequence_forward
            torch.testing.assert_close(logps[i][j], expected, atol=1e-4, rtol=1e-4)


def test_caption_scoring_matches_training_packing(world):
    """The caption path of the token analysis gives the training loss's per-token NLL (data/packing + loss.py)."""
    model, tok = world["models"]["h"], world["tok"]
    records = read_records(world["test"])
    captions = T.encode_captions(tok, [r.caption for r in records])
    images = torch.stack([load_image(r.image, 16) for r in records])
    batch = pack([Sample(c, index=i) for i, c in enumerate(captions)], 128, model.image_tokens())
    with torch.no_grad():
        logits = model(batch.input_ids, normalize(images[batch.indices]), batch.position_ids, batch.doc_ids)
    nll = token_losses(logits, batch.labels)[batch.labels != -100]
    embeds = E.image_embeds(model, images, "train-check", "cpu")
    docs = [(i, model.image_tokens() + [T.BOS], [c + [T.EOS]]) for i, c in enumerate(captions)]
    ours = torch.cat([-lp[0] for lp in E.score_docs(model, docs, embeds, row_len=100, batch_rows=2)])
    # per-token NLLs (<= ~10) from rows of other widths: float32 noise ~3e-6 relative, well inside 1e-4
    torch.testing.assert_close(ours, nll, atol=1e-4, rtol=1e-4)


def test_accuracy_one_and_zero(world, capsys):
    model, tok, root = world["models"]["h"], world["tok"], world["root"]
    rows = {"prefer": [], "avoid": []}
    for i, (prompt, choices) in enumerate(zip(PROMPTS, CHOICES)):
        two = choices[:2]
        sums = [float(hand_logprobs(model, str(root / "img" / f"{i}.png"), enc(tok, prompt), enc(tok, c)).sum())
                for c in two]
        best = max(range(2), key=lambda j: sums[j])
        rows["prefer"].append({"image": f"img/{i}.png", "prompt": prompt, "choices": two, "answer": best})
        rows["avoid"].append({"image": f"img/{i}.png", "prompt": prompt, "choices": two, "answer": 1 - best})
    prefer, avoid = (write_jsonl(root / f"{k}.jsonl", v) for k, v in rows.items())
    res = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], mc_files=[prefer, avoid])}
    assert res["prefer"] == 1.0 and res["avoid"] == 0.0
    assert res["prefer_norm"] + res["avoid_norm"] == pytest.approx(1.0)  # two choices: one of the two is right
    E.main(parse_config(E.EvalConfig, ["--ckpt", world["ckpts"]["h"], "--mc", prefer]))
    out = capsys.readouterr().out
    assert "prefer " in out and "1.0000" in out


def test_length_normalised_is_mean_per_token():
    logps = [[torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-2.0])],  # sums -3 vs -2, means -1 vs -2
             [torch.tensor([-0.5, -0.5]), torch.tensor([-3.0, -0.1, -0.1])]]  # sums -1 vs -3.2, means -0.5 vs -1.07
    assert E.accuracy(logps, [0, 0]) == 0.5
    assert E.accuracy(logps, [0, 0], normalise=True) == 1.0
    assert E.accuracy(logps, [1, 1]) == 0.5


def test_derangement():
    for n in range(2, 40):
        for seed in range(3):
            d = E.derangement(n, seed)
            assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))
            assert d == E.derangement(n, seed)
    assert E.derangement(50, 0) != E.derangement(50, 1)
    with pytest.raises(ValueError):
        E.derangement(1)


def test_grounding_gap(world, tmp_path):
    model, tok = world["models"]["u"], world["tok"]
    records = read_records(world["test"])
    p = [torch.tensor([0.1, 0.3, 0.6, 0.9])[torch.arange(len(enc(tok, r.caption)) + 1) % 4] for r in records]
    scores = str(tmp_path / "scores_test.pt")
    save_scores(scores, [r.id for r in records], p,
                {"tokenizer": T.fingerprint(tok), "data": text_fingerprint(records)})
    res = E.token_analysis(model, tok, world["test"], scores, seed=5)

    perm = E.derangement(len(records), 5)
    nll = {"": [], "_shuffled": []}
    cats, ws = [], []
    for i, r in enumerate(records):
        ids, words = enc(tok, r.caption), T.token_word_index(tok, [r.caption])[0]
        nll[""].append(-hand_logprobs(model, r.image, [], ids))
        nll["_shuffled"].append(-hand_logprobs(model, records[perm[i]].image, [], ids))
        cats += [r.extra["tags"][w] if w >= 0 else None for w in words]  # -1: a lone space token
        ws += (1 - p[i][:-1]).tolist()
    nll = {k: torch.cat(v) for k, v in nll.items()}
    groups = {c: [x == c for x in cats] for c in CATEGORIES if c in cats}  # (the test data has no glue words)
    assert not any(f"nll_{c}" in res for c in CATEGORIES if c not in cats)
    groups["all"] = [True] * len(cats)
    groups["w_gt_0.5"], groups["w_le_0.25"] = [w > 0.5 for w in ws], [w <= 0.25 for w in ws]
    for name, sel in groups.items():
        sel = torch.tensor(sel)
        true, shuffled = nll[""][sel].mean(), nll["_shuffled"][sel].mean()
        assert res[f"nll_{name}"] == pytest.approx(float(true), abs=1e-4)
        assert res[f"nll_{name}_shuffled"] == pytest.approx(float(shuffled), abs=1e-4)
        assert res[f"gap_{name}"] == pytest.approx(res[f"nll_{name}_shuffled"] - res[f"nll_{name}"], abs=1e-9)
    assert abs(res["gap_all"]) > 1e-3  # the image really was swapped
    assert {"nll_w_gt_0.75", "nll_w_le_0.75", "gap_w_gt_0.25"} <= set(res)


def test_bad_mc_rows_counted(world, tmp_path, capsys):
    root = world["root"]
    with open(tmp_path / "garbage.png", "wb") as f:
        f.write(b"not a png at all")
    good = {"image": str(root / "img" / "1.png"), "prompt": "a photo of",
            "choices": ["red circle", "star"], "answer": 1}
    rows = [good] * 5 + [
        {**good, "image": str(tmp_path / "garbage.png")},  # undecodable: dropped by load_images
        {**good, "answer": 2}, {**good, "answer": True}, {**good, "choices": ["star"]},
        {**good, "choices": ["star", " "]},
        {**good, "image": "nowhere.png"}, '{"image": broken json', "[1, 2]"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    questions, images = B.load_mc(path, 16, max_bad_fraction=1.0)
    assert len(questions) == len(images) == 5
    err = capsys.readouterr().err
    assert "skipped 7 of 13 questions" in err and "answer not a choice index x 2" in err
    assert "skipped 1 of 6 images" in err
    logps, answers = E.mc_eval(world["models"]["h"], world["tok"], path, max_bad_fraction=1.0)
    assert len(logps) == 5 and answers == [1] * 5
    with pytest.raises(DataError):
        B.read_mc(path, max_bad_fraction=0.1)


def test_run_dir_resumes(world, tmp_path, monkeypatch):
    model, tok, root = world["models"]["h"], world["tok"], world["root"]
    probes = tmp_path / "probes"
    os.makedirs(probes)
    for name in ("presence_a", "presence_b", "colour"):
        shutil.copy(world["questions"], probes / f"{name}.jsonl")
    for name in ("presence_a", "presence_b", "colour"):  # image paths are relative to the probe folder
        rows = [dict(json.loads(line), image=str(root / json.loads(line)["image"]))
                for line in open(probes / f"{name}.jsonl")]
        write_jsonl(probes / f"{name}.jsonl", rows)
    run = tmp_path / "run"
    for step in (10, 20):
        save_ckpt(model, tok, str(run / f"ckpt_{step:06d}.pt"), step, "h", world["tok_path"])
    calls = []
    real = E.evaluate_checkpoint
    monkeypatch.setattr(E, "evaluate_checkpoint", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    kw = dict(probes_dir=str(probes), test_path=world["test"], max_rows=4)
    rows = E.evaluate_run(str(run), **kw)
    assert len(calls) == 2 and sorted({r["step"] for r in rows}) == [10, 20]
    assert all(set(r) == {"arch", "loss", "seed", "lr", "step", "benchmark", "value", "ckpt", "source"} for r in rows)
    assert all((r["arch"], r["loss"], r["seed"], r["lr"]) == ("h", "prior", 3, 2e-3) for r in rows)
    at10 = {r["benchmark"]: r["value"] for r in rows if r["step"] == 10}
    assert {"presence_a", "presence_b_norm", "colour", "nll_image", "gap_all", "nll_noise_shuffled"} <= set(at10)
    assert at10["presence"] == pytest.approx((at10["presence_a"] + at10["presence_b"]) / 2)
    assert at10["probe_avg"] == pytest.approx((at10["presence"] + at10["colour"]) / 2)
    # chance-corrected: (acc - chance) / (1 - chance) per file, averaged within a group, then over groups
    questions = [json.loads(line) for line in open(probes / "colour.jsonl")][:4]
    chance = sum(1 / len(q["choices"]) for q in questions) / len(questions)
    cc = lambda acc: (acc - chance) / (1 - chance)  # noqa: E731 (every file here holds the same questions)
    assert at10["probe_cc_avg"] == pytest.approx(((cc(at10["presence_a"]) + cc(at10["presence_b"])) / 2
                                                  + cc(at10["colour"])) / 2)
    assert json.load(open(run / "eval.json")) == rows

    save_ckpt(model, tok, str(run / "ckpt_000030.pt"), 30, "h", world["tok_path"])
    calls.clear()
    rows = E.evaluate_run(str(run), **kw)
    assert [os.path.basename(c) for c in calls] == ["ckpt_000030.pt"]
    assert sorted({r["step"] for r in rows}) == [10, 20, 30] and len(rows) == 3 * len(at10)
    calls.clear()
    E.evaluate_run(str(run), **kw)
    assert calls == []


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit):
        parse_config(E.EvalConfig, ["--help"], description=E.__doc__)
    out = capsys.readouterr().out
    assert "--test-scores" in out and "--max-rows" in out and "grounding gap" in out


def test_items_longer_than_the_context_are_skipped_and_counted(world, tmp_path):
    """A test caption or question past the model's context (128 positions here) is left out and counted in the
    results, never an abort; the rest is scored exactly as without it."""
    long_text = " ".join(["a photo of a red circle"] * 40)  # ~200 tokens
    rows = [json.loads(line) for line in open(world["test"])]
    for r in rows:
        r["image"] = str(world["root"] / r["image"])
    long_row = {**rows[0], "id": "long", "caption": long_text, "tags": ["boiler"] * len(long_text.split())}
    test = write_jsonl(tmp_path / "test.jsonl", rows[:3] + [long_row] + rows[3:])
    qs = [json.loads(line) for line in open(world["questions"])]
    for q in qs:
        q["image"] = str(world["root"] / q["image"])
    mc = write_jsonl(tmp_path / "mc.jsonl", qs + [{**qs[0], "prompt": long_text}])
    got = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], test_path=test,
                                                                     mc_files=[mc])}
    B._data.clear()
    plain = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], test_path=world["test"],
                                                                      mc_files=[world["questions"]])}
    assert got["test_skipped"] == 1 and got["mc_skipped"] == 1
    assert got["nll_all"] == pytest.approx(plain["nll_all"], rel=1e-6) and got["mc"] == plain["questions"]


def test_test_file_honours_max_bad_fraction(world, tmp_path):
    rows = [json.loads(line) for line in open(world["test"])]
    for r in rows:
        r["image"] = str(world["root"] / r["image"])
    test = write_jsonl(tmp_path / "test.jsonl", [*rows, "{broken"])  # 1 bad of 6
    with pytest.raises(DataError, match="max_bad_fraction"):
        E.evaluate_checkpoint(world["ckpts"]["h"], test_path=test, max_bad_fraction=0.1)
    B._data.clear()
    out = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], test_path=test,
                                                                     max_bad_fraction=0.2)}
    assert "nll_all" in out


def test_generated_answers_skip_prompts_past_the_context(world, tmp_path, capsys):
    qs = [json.loads(line) for line in open(world["questions"])]
    for q in qs:
        q["image"] = str(world["root"] / q["image"])
    long_q = {**qs[1], "id": "long", "prompt": " ".join(["a photo of a red circle"] * 40)}
    mc = write_jsonl(tmp_path / "qa.jsonl", qs + [long_q])
    rows = Q.qa_generate(world["models"]["h"], world["tok"], mc, max_new_tokens=2)
    assert len(rows) == len(qs) and "long" not in {r["id"] for r in rows}
    assert "qa: 1 of 6 questions reach past the model's context" in capsys.readouterr().err


def test_feature_cache_gives_the_same_results(world, tmp_path):
    """--feature-cache: the H-LVLM's ViT features of each image file go to a folder (one file per image set)."""
    kw = dict(mc_files=[world["questions"]], test_path=world["test"])
    E._features.clear()
    plain = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], **kw)}
    for _ in range(2):  # the first call writes the files, the second (a fresh process, in effect) reads them
        E._features.clear()
        cached = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(world["ckpts"]["h"], **kw,
                                                                             feature_cache=str(tmp_path))}
        assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)
        # one file: the questions and the test captions show the same 5 images (keyed by pixels, not by file)
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".pt")]) == 1


def test_attribute_gaps_by_what_an_image_word_says(world):
    """gap_shape, gap_colour, gap_count, gap_position: the image words of each kind (data.tags.ATTRIBUTE_OF), each
    the hand-computed mean over exactly those tokens."""
    from data.tags import ATTRIBUTE_OF, ATTRIBUTES
    model, tok = world["models"]["h"], world["tok"]
    records = read_records(world["test"])
    res = E.token_analysis(model, tok, world["test"], seed=5)
    perm = E.derangement(len(records), 5)
    nll, shuffled, kinds = [], [], []
    for i, r in enumerate(records):
        ids, words = enc(tok, r.caption), T.token_word_index(tok, [r.caption])[0]
        nll.append(-hand_logprobs(model, r.image, [], ids))
        shuffled.append(-hand_logprobs(model, records[perm[i]].image, [], ids))
        split = r.caption.split(" ")
        kinds += [ATTRIBUTE_OF.get(split[w]) if w >= 0 and r.extra["tags"][w] == "image" else None for w in words]
    nll, shuffled = torch.cat(nll), torch.cat(shuffled)
    assert {"shape", "colour", "count", "position"} <= set(kinds)  # "stars", "red", "three", "left"
    for kind in ATTRIBUTES:
        sel = torch.tensor([k == kind for k in kinds])
        if not sel.any():
            assert f"gap_{kind}" not in res  # no size word in these captions
            continue
        assert res[f"gap_{kind}"] == pytest.approx(float(shuffled[sel].mean() - nll[sel].mean()), abs=1e-4)


def test_a_model_blind_to_the_image_has_exactly_zero_gap_and_one_that_sees_does_not(world):
    """The endpoint cancels the text prior by construction: the same caption, the same model, only the image
    differs. A model whose image input is a constant (the projector's output zeroed) gets exactly 0 on every gap,
    whatever its text prior; the same model seeing the images does not."""
    tok = world["tok"]
    blind = VLM(world["models"]["h"].cfg)
    blind.load_state_dict(world["models"]["h"].state_dict())
    with torch.no_grad():
        blind.projector[-1].weight.zero_()  # every image becomes the same embeddings (the bias)
    res = E.token_analysis(blind.eval(), tok, world["test"], seed=5)
    gaps = {k: v for k, v in res.items() if k.startswith("gap_")}
    assert {"gap_image", "gap_shape", "gap_colour", "gap_all"} <= set(gaps)
    assert all(v == 0.0 for v in gaps.values()), gaps
    seeing = E.token_analysis(world["models"]["h"], tok, world["test"], seed=5)
    assert abs(seeing["gap_image"]) > 1e-3 and abs(seeing["gap_colour"]) > 1e-3


def test_several_image_tokens_per_patch(world):
    """tokens_per_patch k: the projector gives k embeddings per patch, one <|image|> slot each, side by side; k = 1
    is the model as before (same parameters, same initialisation)."""
    cfg = world["models"]["h"].cfg
    torch.manual_seed(3)
    one = VLM(cfg)
    torch.manual_seed(3)
    same = VLM(dataclasses.replace(cfg, tokens_per_patch=1))
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), same.state_dict().values()))
    three = VLM(dataclasses.replace(cfg, tokens_per_patch=3))
    images = torch.randn(2, 3, 16, 16)
    assert len(three.image_tokens()) == 3 * len(one.image_tokens()) == 12
    emb = three.embed_images(images)
    flat = three.projector(three.encoder.forward_features(images))  # (2, 4 patches, 3 * d)
    assert emb.shape == (2, 12, 32) and torch.equal(emb[:, 3:6], flat[:, 1].view(2, 3, 32))  # patch 1's three
    ids = torch.tensor([three.image_tokens() + [T.BOS, 20, 21]])
    assert three(ids, images[:1]).shape == (1, 15, three.cfg.decoder.vocab_size)
    with pytest.raises(ValueError, match="tokens_per_patch"):
        VLM(dataclasses.replace(cfg, arch="u", tokens_per_patch=2))


def test_token_analysis_with_several_tokens_per_patch(world):
    """Evaluation's cached-feature path goes through the projector as training does: k tokens a patch."""
    cfg = world["models"]["h"].cfg
    torch.manual_seed(4)
    three = VLM(dataclasses.replace(cfg, tokens_per_patch=3)).eval()
    res = E.token_analysis(three, world["tok"], world["test"], seed=5)
    assert "gap_image" in res and all(v == v for v in res.values())  # scored, no NaN
