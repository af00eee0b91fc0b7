"""
Tests for the synthetic data generator (CPU, a few seconds):

    python -m pytest tests/test_generate.py -q
"""
import filecmp
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from world.generate import MIXES, GenConfig, generate, parse_args  # noqa
from world.scenes import COLOURS, COLS, NUMS, PROBES, ROWS, SHAPES, position_phrase  # noqa

TINY = dict(n_ref=300, n_text=40, n_label=20, n_train=300, n_val=20, n_test=20, n_probe=40, n_probe_val=20, workers=1)


def make(out, **kw):
    return generate(GenConfig(out=str(out), **{**TINY, **kw}))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    make(out, image_size=40)
    return out


# ----------------------------------------------------------------------------- a small parser of the caption language
def singular(word):
    for s in SHAPES:
        if word in (s, s + "s", s + "es"):
            return s


def parse(text):
    """Object phrases in a caption fragment -> [(n, colour, shape, (row, col) or None)]."""
    t, out, i = text.split(), [], 0
    while i < len(t):
        if t[i] not in ("a", "an") and t[i] not in NUMS[2:]:
            i += 1
            continue
        n, j = (1 if t[i] in ("a", "an") else NUMS.index(t[i])), i + 1
        if j < len(t) and t[j] in ("small", "large"):
            j += 1
        colour = t[j] if j < len(t) and t[j] in COLOURS else None
        j += colour is not None
        if j >= len(t) or not singular(t[j]):
            i += 1  # "a photo of": not an object
            continue
        shape, j, pos = singular(t[j]), j + 1, None
        if t[j:j + 2] in (["at", "the"], ["on", "the"], ["in", "the"]):
            where, j = [], j + 2
            while j < len(t) and t[j] in ROWS + COLS:
                where.append(t[j])
                j += 1
            row = next((w for w in where if w in ("top", "bottom")), "middle")
            pos = (row, next((w for w in where if w in ("left", "right")), "center"))
        out.append((n, colour, shape, pos))
        i = j
    return out


def n_of(scene, shape, colour=None, pos=None):
    return sum(o["shape"] == shape and colour in (None, o["colour"]) and pos in (None, (o["row"], o["col"]))
               for o in scene)


def true_of(kind, scene, prompt, choice):
    """Is prompt + choice a true statement about the scene?"""
    if kind == "count":
        return NUMS.index(choice.split()[0]) == len(scene)
    phrases = parse(f"{prompt} {choice}")
    if kind == "retrieval":
        if phrases[0][3]:  # one phrase per object, with its position
            return Counter((c, s, p) for _, c, s, p in phrases) == Counter(
                (o["colour"], o["shape"], (o["row"], o["col"])) for o in scene)
        return Counter({(c, s): n for n, c, s, _ in phrases}) == Counter((o["colour"], o["shape"]) for o in scene)
    (n, colour, shape, pos), = phrases
    if kind.startswith("presence"):
        return n_of(scene, shape) > 0
    return n_of(scene, shape, colour) == n  # colour


# ----------------------------------------------------------------------------- tests
def test_deterministic(tmp_path):
    kw = dict(n_ref=50, n_text=10, n_label=5, n_train=30, n_val=5, n_test=5, n_probe=5)
    make(tmp_path / "a", **kw)
    make(tmp_path / "b", **{**kw, "workers": 2})  # the worker count must not matter either
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert a == b and len(a) > 50
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(p) for p in a], shallow=False)
    assert not mismatch and not errors


def test_tags_align(web):
    for name in ("train", "val", "test", "ref", "text", "label"):
        for r in read(web / f"{name}.jsonl"):
            words = r["caption"].split(" ")
            assert len(words) == len(r["tags"]) and all(words), r
            assert set(r["tags"]) <= {"image", "glue", "boiler", "noise"}
            assert r["caption"] == r["caption"].lower()
            assert ("image" in r) == (name not in ("ref", "text"))


def test_ids_unique_and_ref_disjoint(web):
    rows = {n: read(web / f"{n}.jsonl") for n in ("train", "val", "test", "ref", "text", "label")}
    rows.update({f"{d}/{k}": read(web / d / f"{k}.jsonl") for d in ("probes", "probes_val") for k in PROBES})
    ids = [r["id"] for rs in rows.values() for r in rs]
    assert len(ids) == len(set(ids))
    seen = {r["caption"] for n in ("train", "val", "test") for r in rows[n]}
    assert not seen & {r["caption"] for r in rows["ref"]}


def key(scene):
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in scene))


def test_no_evaluation_scene_or_caption_in_training(web):
    """Val, test and probe scenes never equal a training scene; no training-side text (reference LM, base
    LM) or label image holds an evaluation scene or caption."""
    rows = {n: read(web / f"{n}.jsonl") for n in ("train", "val", "test", "text", "ref", "label")}
    probes = [r for d in ("probes", "probes_val") for k in PROBES for r in read(web / d / f"{k}.jsonl")]
    train = {key(r["scene"]) for r in rows["train"]}
    evaluation = [key(r["scene"]) for r in rows["val"] + rows["test"] + probes]
    assert len(evaluation) > 100 and not train & set(evaluation)
    assert not {key(r["scene"]) for r in rows["label"]} & set(evaluation)
    eval_captions = {r["caption"] for r in rows["val"] + rows["test"]}
    assert not eval_captions & {r["caption"] for r in rows["train"]}
    for r in rows["text"] + rows["ref"]:
        caption = r["caption"].split(" . question: ")[0]  # a text document's questions come after its caption
        assert caption not in eval_captions and caption.partition(" . ")[2] not in eval_captions
    meta = json.loads((web / "meta.json").read_text())
    assert sum(meta["dropped_as_duplicates"].values()) > 0  # at these sizes some draws repeat: they were dropped


def test_text_documents_end_with_true_answers(web, tmp_path):
    """With --text-questions 0.5 about half the text documents end with 3 questions about their scene, answered
    as the scene's full description at their start says, tags aligned; at the default 0 none does, and every
    other file is byte for byte what it was without the flag."""
    make(tmp_path, image_size=40, text_questions=0.5)
    for name in ("train.jsonl", "ref.jsonl", "test.jsonl", "probes/colour.jsonl"):
        assert filecmp.cmp(web / name, tmp_path / name, shallow=False), name
    assert not any(" . question: " in d["caption"] for d in read(web / "text.jsonl"))
    docs = read(tmp_path / "text.jsonl")
    assert all(len(d["caption"].split(" ")) == len(d["tags"]) for d in docs)
    asked = [d for d in docs if " . question: " in d["caption"]]
    assert 0.25 < len(asked) / len(docs) < 0.75
    for d in asked:
        description, _, rest = d["caption"].partition(" . ")
        qa = rest.split(" . question: ", 1)[1].split(" question: ")
        assert len(qa) == 3
        for q in qa:
            question, answer = q.split("? answer: ")
            if question.startswith("is there a "):
                shape = question.removeprefix("is there a ")
                assert answer == ("yes" if shape in description.split() else "no"), d["caption"]
            elif question == "how many shapes are there":
                assert answer == NUMS[description.count(" and ") + 1], d["caption"]


def test_pope_wording_asks_presence_in_popes_words_with_true_answers(tmp_path):
    """--pope-wording 1: every presence question of a text document is asked as POPE asks it ("Is there a star in
    the image?"), answered as the description says; no other question changes its words."""
    make(tmp_path, image_size=40, text_questions=0.5, pope_wording=1.0)
    asked = [d["caption"] for d in read(tmp_path / "text.jsonl") if " . question: " in d["caption"]]
    assert asked and not any("question: is there a " in c for c in asked)
    pope = [(c.partition(" . ")[0], q) for c in asked for q in c.split("question: ")[1:] if q.startswith("Is there")]
    assert len(pope) > 10
    for description, q in pope:
        shape, answer = q.removeprefix("Is there a ").split(" in the image? answer: ")
        assert answer.strip() == ("yes" if shape in description.split() else "no"), (description, q)


def test_grid_descriptions_follow_the_image_tokens_order(web, tmp_path):
    """With --text-grid 1 every described text document starts with its scene cell by cell, row-major like the
    H-LVLM's image tokens: 'size colour shape' where an object is, 'empty empty empty' elsewhere, 27 words, tags
    aligned; the caption after it and every other file are byte for byte what they are without the flag."""
    make(tmp_path, image_size=40, text_grid=1.0)
    for name in ("train.jsonl", "ref.jsonl", "test.jsonl", "probes/colour.jsonl"):
        assert filecmp.cmp(web / name, tmp_path / name, shallow=False), name
    cells = [(r, c) for r in ("top", "middle", "bottom") for c in ("left", "center", "right")]
    docs = read(tmp_path / "text.jsonl")
    assert all(len(d["caption"].split(" ")) == len(d["tags"]) for d in docs)
    for plain, d in zip(read(web / "text.jsonl"), docs):
        grid, _, caption = d["caption"].partition(" . ")
        assert caption == plain["caption"].partition(" . ")[2]  # the same caption; only its description differs
        words = grid.split(" ")
        assert len(words) == 27
        objects = [tuple(words[3 * i:3 * i + 3]) for i in range(9)]
        assert sum(o != ("empty",) * 3 for o in objects) == plain["caption"].partition(" . ")[0].count(" and ") + 1
        for (r, c), o in zip(cells, objects):
            if o != ("empty",) * 3:
                assert o[0] in ("small", "large") and f"{o[0]} {o[1]} {o[2]} {position_phrase(r, c)}" in \
                    plain["caption"].partition(" . ")[0], (o, r, c, plain["caption"])


def test_glue_is_what_depends_on_the_image(web):
    """'a' before an object, 'and' between objects, 'shape(s)' after a count and the separator after the
    description are tagged glue (their presence depends on the image); nothing else is."""
    for r in read(web / "train.jsonl") + read(web / "label.jsonl"):
        words, tags = r["caption"].split(), r["tags"]
        for i, (w, t) in enumerate(zip(words, tags)):
            if t == "glue":
                assert w in ("a", "and", "shape", "shapes") or not w.isalnum(), (w, r["caption"])
            if w == "and" and 0 < i < len(words) - 1 and tags[i - 1] == "image":
                assert t == "glue", r["caption"]
            if w in ("shape", "shapes") and tags[i - 1] == "image":
                assert t == "glue", r["caption"]
        n_and = sum(w == "and" and t == "glue" for w, t in zip(words, tags))
        if "label" in r:  # captions of image-caption pairs: groups in the description = 'and's + 1
            assert n_and >= len({(o["shape"], o["colour"]) for o in r["scene"]}) - 1 or n_and >= len(r["scene"]) - 1


def test_hard_mix_lets_text_predict_image_words(tmp_path):
    """In the hard mix a shape usually comes in its own colour, sites favour their shapes, some captions
    repeat a title, and stock phrases leave their site's template: the web mix has none of this."""
    def colour_given_shape(rows):
        pairs = Counter((o["shape"], o["colour"]) for r in rows for o in r["scene"])
        top = Counter()
        for (s, c), n in pairs.items():
            top[s] = max(top[s], n)
        return sum(top.values()) / sum(pairs.values())
    kw = dict(n_ref=20, n_text=10, n_label=5, n_train=400, n_val=5, n_test=5, n_probe=5, n_probe_val=5)
    make(tmp_path / "web", **kw)
    make(tmp_path / "hard", mix="hard", **kw)
    web, hard = read(tmp_path / "web" / "train.jsonl"), read(tmp_path / "hard" / "train.jsonl")
    assert colour_given_shape(hard) > 0.6 > 0.3 > colour_given_shape(web)
    titled = lambda rows: sum(r["caption"].startswith(r["label"] + " ") or r["caption"].endswith(" " + r["label"])
                              for r in rows) / len(rows)  # noqa: E731
    assert titled(hard) > titled(web) + 0.15  # (a web caption can end with its label by chance: ~6%)


def test_images(web):
    for name in ("train", "label"):
        for r in read(web / f"{name}.jsonl")[:10]:
            im = Image.open(web / r["image"])
            assert im.size == (40, 40) and im.mode == "RGB"


def test_label_matches_scene(web):
    for r in read(web / "train.jsonl"):
        assert true_of("retrieval", r["scene"], "", r["label"])


@pytest.mark.parametrize("folder", ["probes", "probes_val"])
def test_probes_valid(web, folder):
    for kind in PROBES:
        rows = read(web / folder / f"{kind}.jsonl")
        assert len(rows) == TINY["n_probe" if folder == "probes" else "n_probe_val"]
        assert len({r["answer"] for r in rows}) > 1  # the answer position varies
        for r in rows:
            assert r["kind"] == kind and 0 <= r["answer"] < len(r["choices"]) and len(r["choices"]) >= 2
            assert len(set(r["choices"])) == len(r["choices"])
            assert os.path.isfile(web / folder / r["image"])
            for i, c in enumerate(r["choices"]):
                assert true_of(kind, r["scene"], r["prompt"], c) == (i == r["answer"]), (r, c)


def test_answer_position_uniform(web):
    answers = Counter(r["answer"] for k in ("colour", "count", "retrieval")
                      for r in read(web / "probes" / f"{k}.jsonl"))
    assert all(answers[i] > 10 for i in range(4)), answers


def test_shares(web, tmp_path):
    small = dict(n_label=0, n_val=0, n_test=0, n_probe=2, n_text=0, n_train=50)
    meta = json.loads((web / "meta.json").read_text())
    assert abs(meta["shares"]["ref"]["image"] - MIXES["web"]["image_share"]) < 0.03
    boiler = make(tmp_path / "boiler", mix="boiler", **small)["shares"]["ref"]
    noisy = make(tmp_path / "noisy", mix="noisy", **small)["shares"]["ref"]
    assert boiler["noise_of_nonimage"] < 0.05 < 0.15 < noisy["noise_of_nonimage"]
    assert abs(noisy["image"] - boiler["image"]) < 0.03  # the presets differ in filler only


def test_presets_and_cli():
    assert {"web", "boiler", "noisy"} <= set(MIXES)
    cfg = parse_args(["--mix", "noisy", "--noise-vocab", "7", "--image-size", "32"])
    assert (cfg.mix, cfg.noise_vocab, cfg.image_size, cfg.noise_share) == ("noisy", 7, 32, None)
    assert all(f.metadata.get("help") for f in fields(GenConfig))
    help_text = subprocess.run([sys.executable, "-m", "world.generate", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert all("--" + f.name.replace("_", "-") in help_text for f in fields(GenConfig))


def test_glue_words_do_not_depend_on_the_image(web):
    """A boilerplate word inside a description must be predictable from text: the glue between two image
    words is only "a", "at the", "and" (no "an", no "in the center" / "on the left", no "," vs "and")."""
    allowed = {"a", "and", "and a", "at the", "at the", "shape :", "shapes :", "shape : a", "shapes : a"}
    for r in read(web / "train.jsonl"):
        words, tags = r["caption"].split(), r["tags"]
        image_at = [i for i, t in enumerate(tags) if t == "image"]
        for a, b in zip(image_at, image_at[1:]):
            glue = " ".join(words[a + 1:b])
            if glue and all(t == "boiler" for t in tags[a + 1:b]):
                assert glue in allowed, (glue, r["caption"])


def test_sites_repeat_their_boilerplate(web):
    """Each caption's stock phrases come from its site's fixed list, so the same phrase sequences recur."""
    runs = Counter()
    for r in read(web / "ref.jsonl"):
        words, tags = r["caption"].split(), r["tags"]
        runs[" ".join(w for w, t in zip(words, tags) if t == "boiler")[-30:]] += 1
    assert runs.most_common(1)[0][1] >= 5  # site templates recur (random phrase draws would not)


def test_text_documents_describe_their_scene_first(web):
    """Text-only documents open with a full description (every object with colour and position), then a
    caption of the same scene: the base LM learns to use its context."""
    for r in read(web / "text.jsonl"):
        context, _, rest = r["caption"].partition(" . ")
        objects = parse(context)
        assert objects and all(c is not None and p is not None for _, c, _, p in objects), context
        described = Counter((c, s) for _, c, s, _ in objects)
        for n, c, s, _ in parse(rest):  # every object the caption names is in the context
            assert described[(c, s) if c else next(k for k in described if k[1] == s)] >= 1, r["caption"]
