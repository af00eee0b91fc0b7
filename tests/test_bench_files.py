"""Tests for benchmarks/files.py: the generator's presence probes written as POPE files and test-scene questions
as a VLMEvalKit-style TSV, read back by benchmarks/load.py's readers.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_bench_files.py
"""
import base64
import json

import pytest

from benchmarks import files as F
from benchmarks import load as B
from world.generate import GenConfig, generate
from world.scenes import plural


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_files") / "data"
    generate(GenConfig(out=str(root), n_ref=20, n_text=20, n_label=4, n_train=30, n_val=4, n_test=12, n_probe=5,
                       workers=1))
    return root


def test_generator_writes_pope_files(synth):
    specs = F.write_bench_files(str(synth))
    assert [s.split(":")[0] for s in specs] == ["pope"] * 3 + ["mmbench"]
    for split, spec in zip(F.POPE_SPLITS, specs):
        probes = [json.loads(x) for x in open(synth / "probes" / f"presence_{split}.jsonl")]
        recs = B.read_bench(spec)
        assert len(recs) == 2 * len(probes) and {r.extra["split"] for r in recs} == {split}
        for p, (yes, no) in zip(probes, zip(recs[::2], recs[1::2])):
            present = {o["shape"] for o in p["scene"]}
            pair = sorted([yes, no], key=lambda r: r.extra["answer"])  # the "yes" question first
            shapes = [r.extra["question"].removeprefix("Is there a ").removesuffix(" in the image?") for r in pair]
            assert shapes[0] in present and shapes[1] not in present
            assert plural(shapes[1], 1) in p["choices"] or plural(shapes[1], 2) in p["choices"]
            assert yes.image == no.image == str(synth / p["image"].removeprefix("../"))


def test_generator_pope_files_are_three_distinct_splits(synth):
    """The three files are one split each, so eval.py --bench takes them together (two files of one split are
    refused: scoring.check_pope_splits), and their questions pool into pope_f1."""
    from benchmarks import scoring as S
    specs = F.write_bench_files(str(synth))[:3]
    S.check_pope_splits(specs, 16)
    assert [S.answer_rule(s) for s in specs] == ["pope"] * 3  # generated answers: POPE's own rule


def test_generator_writes_an_mcq_tsv(synth):
    spec = F.write_bench_files(str(synth))[-1]
    recs = B.read_bench(spec)
    test = [json.loads(x) for x in open(synth / "test.jsonl")]
    assert len(recs) == 2 * len(test)  # two questions a scene (count, colour, shape: at least two always apply)
    assert {r.extra["category"] for r in recs} <= {"count", "colour", "shape"}
    for k, r in enumerate(recs[::2]):  # the first question of a scene carries its PNG, the second refers to it
        assert base64.b64decode(r.extra["image_b64"]) == open(synth / test[k]["image"], "rb").read()
        assert recs[2 * k + 1].extra["image_b64"] == r.extra["image_b64"]
    _, images, index = B.load_bench(spec, 16)
    assert len(images) == len(test) and index == [i // 2 for i in range(len(recs))]

