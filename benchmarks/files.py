"""The built-in data in the benchmarks' own formats, so every reader and official metric of eval.py --bench runs
end to end on every generated data set: the presence probes as POPE files, scene questions as a VLMEvalKit-style
multiple-choice TSV (base64 PNGs; a second question about an image refers to the first one's row).

    python -m world.generate --out data/synth ...
    python -m benchmarks.files --data data/synth         # write_bench_files: data/synth/bench/
    python -m benchmarks eval --ckpt runs/x/ckpt_000300.pt \
        --bench pope:data/synth/bench/synth_pope_random.json::data/synth \\
        --bench pope:data/synth/bench/synth_pope_popular.json::data/synth \\
        --bench pope:data/synth/bench/synth_pope_adversarial.json::data/synth \\
        --bench mmbench:data/synth/bench/synth_mcq.tsv

write_bench_files returns those --bench specs (the main job evaluates them at the last step of its main runs:
experiments/experiment.py's bench_specs).
"""
import base64
import csv
import json
import os
import random
from dataclasses import dataclass

from benchmarks import qa
from world.scenes import SHAPES, plural
from utils import UserError, flag, run

POPE_SPLITS = ("random", "popular", "adversarial")
TSV_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "E", "F", "G", "H", "answer", "category",
               "l2-category", "image"]


def _shape_of(choice):
    """The shape a presence choice names ("circles" -> "circle")."""
    hits = [s for s in SHAPES if choice in (plural(s, 1), plural(s, 2))]
    if len(hits) != 1:
        raise ValueError(f"presence choice {choice!r} names no single shape")
    return hits[0]


def presence_to_pope(probe_rows, image_prefix=""):
    """POPE lines of presence probe rows: per probe, "Is there a <present shape> in the image?" (yes) and the
    same of the probe's absent shape (no); image paths are image_prefix + the probe image's path under the data
    folder (the probes' own are relative to probes/)."""
    out = []
    for r in probe_rows:
        image = image_prefix + r["image"].removeprefix("../")
        for j, choice in enumerate(r["choices"]):
            text = f"Is there a {_shape_of(choice)} in the image?"
            out.append({"question_id": len(out), "image": image, "text": text,
                        "label": "yes" if j == r["answer"] else "no"})
    return out


def scene_mcq_rows(test_rows, data_dir, n=200, seed=0, kinds=("count", "colour", "shape")):
    """VLMEvalKit-style MCQ rows (dicts of TSV_COLUMNS) from the test split's scenes: up to n questions of
    benchmarks/qa.py
    kinds with at most 8 options (A..H), two per scene; a scene's second question refers to its first's image."""
    rng = random.Random(f"{seed}/bench_mcq")
    meta_path = os.path.join(data_dir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    shapes, colours, max_objects = qa.vocabulary([r["scene"] for r in test_rows], meta)
    rows = []
    for r in test_rows:
        qs = [q for q in qa.scene_questions(r["scene"], rng, shapes, colours, max_objects, kinds)
              if len(q["choices"]) <= 8]
        rng.shuffle(qs)
        first = None
        for q in qs[:2]:
            if len(rows) >= n:
                return rows
            if first is None:
                with open(os.path.join(data_dir, r["image"]), "rb") as f:
                    image = base64.b64encode(f.read()).decode()
                first = len(rows)
            else:
                image = str(first)
            row = {"index": len(rows), "question": q["question"], "hint": "", "answer": "ABCDEFGH"[
                q["choices"].index(q["target"])], "category": q["kind"], "l2-category": "scene", "image": image}
            row.update({"ABCDEFGH"[j]: c for j, c in enumerate(q["choices"])})
            rows.append(row)
    return rows


def write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(TSV_COLUMNS)
        w.writerows([r.get(c, "") for c in TSV_COLUMNS] for r in rows)


def write_bench_files(data_dir, out_dir=None, n_mcq=200, seed=0):
    """Write data_dir/bench/ (or out_dir): synth_pope_<split>.json from probes/presence_<split>.jsonl and
    synth_mcq.tsv from test.jsonl's scenes; returns the eval.py --bench specs. Missing inputs are skipped."""
    out_dir = out_dir or os.path.join(data_dir, "bench")
    os.makedirs(out_dir, exist_ok=True)
    specs = []
    for split in POPE_SPLITS:
        src = os.path.join(data_dir, "probes", f"presence_{split}.jsonl")
        if not os.path.exists(src):
            continue
        with open(src) as f:
            lines = presence_to_pope([json.loads(x) for x in f if x.strip()])
        dst = os.path.join(out_dir, f"synth_pope_{split}.json")
        with open(dst, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
        specs.append(f"pope:{dst}::{data_dir}")
    test = os.path.join(data_dir, "test.jsonl")
    if os.path.exists(test):
        with open(test) as f:
            rows = scene_mcq_rows([json.loads(x) for x in f if x.strip()], data_dir, n_mcq, seed)
        if rows:
            write_tsv(os.path.join(out_dir, "synth_mcq.tsv"), rows)
            specs.append(f"mmbench:{os.path.join(out_dir, 'synth_mcq.tsv')}")
    return specs


@dataclass
class FilesConfig:
    data: str = flag("data/synth", "a folder world.generate wrote (probes/, test.jsonl); the files go into its bench/")
    n_mcq: int = flag(200, "scene questions in synth_mcq.tsv", min=0)
    seed: int = flag(0, "seed of the questions")


def main(cfg):
    if not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data}: no such folder (python -m world.generate --out {cfg.data} makes one)")
    for spec in write_bench_files(cfg.data, n_mcq=cfg.n_mcq, seed=cfg.seed):
        print(f"--bench {spec}")


if __name__ == "__main__":
    run(main, FilesConfig, description=__doc__)
