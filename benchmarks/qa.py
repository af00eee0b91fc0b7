"""Question-answer pairs about the built-in scenes, for a short instruction-tuning stage and its evaluation.

    python -m benchmarks.qa --data out/data_web/train.jsonl --out out/paper/instruct/qa_train.jsonl --per-scene 2
    python -m benchmarks.qa --data out/data_web/test.jsonl --out out/paper/instruct/qa_test.jsonl --per-scene 0

Every question is read off the generator's ground truth, the "scene" field of the given split's records
(1-4 objects with shape, colour, size, grid row and column), never from another split: the tuning set comes
from train.jsonl's scenes, the evaluation set from test.jsonl's (neither from the probes). Kinds:

    count      how many shapes are there?          -> three            (choices: the counts one..max)
    colour     what colour is the circle?          -> red              (asked only of a shape seen once)
    shape      what shape is at the top left?      -> circle           (the object in that grid cell)
    position   where is the red circle?            -> at the top left  (asked only of a unique shape+colour)
    presence   is there a star?                    -> yes / no         (present or absent shape, 50:50)

Position phrases are the generator's own (`world.scenes.pos_words`): "at the top left", "at the left"
(middle row), "at the top" (centre column), "at the center".

One output line per question, in both formats the project reads:
    {"id": "train-000012/colour", "image": "<relative to the output file>", "caption": "question: what colour
     is the circle? answer: red", "prompt": "question: what colour is the circle? answer:", "target": "red",
     "choices": [...], "answer": <index of target in choices>, "kind": "colour", "source": "train-000012"}
train.py trains on "caption" (image, caption); eval.py --mc scores "choices" by likelihood after "prompt";
qa_qa_eval.qa_generate compares the greedy continuation of "prompt" with the correct choice (exact match).

`train.py --instruct --data <qa file>` trains on the answers only (benchmarks/instruct.py: a loss mask of its own,
Sample.loss_mask). The older route, `answer_only_scores`, writes a score file that train.py's --loss prior turns
into a loss on the answer tokens only (see its docstring); experiments/paper_instruct.py still uses it.
"""
import json
import os
import random
from dataclasses import dataclass

from world.scenes import (COLOURS, KINDS, PROMPT, SHAPES, all_positions, position_phrase,  # noqa: F401 (API)
                          scene_questions)
from utils import UserError, atomic_write, check_out, flag, run

def vocabulary(scenes, meta=None):
    """(shapes, colours, max objects) of a data set: from its meta.json when given, else from its scenes."""
    if meta:
        cfg = meta.get("config", {})
        return list(meta["shapes"]), list(meta["colours"]), int(cfg.get("max_objects", 4))
    shapes = sorted({o["shape"] for s in scenes for o in s}, key=lambda x: SHAPES.index(x) if x in SHAPES else 99)
    colours = sorted({o["colour"] for s in scenes for o in s},
                     key=lambda x: list(COLOURS).index(x) if x in COLOURS else 99)
    return shapes, colours, max(4, max((len(s) for s in scenes), default=4))


def read_scenes(path):
    """[(record id, image path relative to the file's folder, scene)] of a generator JSONL file."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if not isinstance(r.get("scene"), list) or "image" not in r:
                raise UserError(f"{path}:{n}: no 'scene' or 'image' field: QA needs the generator's ground truth "
                                 f"(python -m world.generate)")
            rows.append((str(r.get("id", f"{os.path.basename(path)}:{n}")), r["image"], r["scene"]))
    return rows


def build_qa(src, out, per_scene=2, seed=0, kinds=KINDS, max_scenes=0):
    """Questions about the scenes of `src` (a generator JSONL file), written to `out`; returns the records.
    per_scene: questions per scene, of different kinds drawn at random (0 = one of every kind that applies).
    max_scenes: use only the first N scenes (0 = all)."""
    scenes = read_scenes(src)
    if max_scenes:
        scenes = scenes[:max_scenes]
    meta_path = os.path.join(os.path.dirname(os.path.abspath(src)), "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    shapes, colours, max_objects = vocabulary([s for _, _, s in scenes], meta)
    rng = random.Random(f"{seed}/qa/{os.path.basename(src)}")
    src_dir, out_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(out))
    records = []
    for sid, image, scene in scenes:
        qs = scene_questions(scene, rng, shapes, colours, max_objects, kinds)
        if per_scene:
            rng.shuffle(qs)
            qs = qs[:per_scene]
        rel = os.path.relpath(os.path.join(src_dir, image), out_dir)
        for q in qs:  # at most one question of a kind per scene: "<scene id>/<kind>" is unique
            prompt = PROMPT.format(q["question"])
            records.append(dict(id=f"{sid}/{q['kind']}", image=rel, caption=f"{prompt} {q['target']}", prompt=prompt,
                                target=q["target"], choices=q["choices"], answer=q["choices"].index(q["target"]),
                                kind=q["kind"], source=sid))
    atomic_write(out, "".join(json.dumps(r) + "\n" for r in records))
    return records


def answer_only_scores(qa_path, tokenizer_path, out):
    """A score file for a QA file that makes train.py's `--loss prior` a loss on the answers only.

    p_ref = 1 on the prompt's tokens ("question: ... answer:") and 0 on the answer's tokens and <|eos|>, so
    PRIOR's weights w = (1 - p_ref)^alpha are 0 on the question and 1 on the answer: with the per-caption
    normalisation each answer token gets the factor k / (answer tokens + 1), k the QA text's length, i.e.
    exactly the masked loss of instruction tuning, rescaled so each sample weighs what it weighs under
    NTP. The file carries the tokenizer's and the QA captions' fingerprints, as score.py's files do; its
    "reference" says that no reference LM made it. Refuses a file whose prompt does not tokenise as a
    prefix of its caption (the mask would be off by a token)."""
    import torch

    from data import tokenizer as T
    from data.records import read_records
    from data.scores import save_scores
    from utils import text_fingerprint

    tok = T.load_tokenizer(tokenizer_path)
    records = read_records(qa_path, require_image=False, check_files=False)
    full = T.encode_captions(tok, [r.caption for r in records])
    prompts = T.encode_captions(tok, [r.extra["prompt"] for r in records])
    p_ref = []
    for r, c, p in zip(records, full, prompts):
        if c[:len(p)] != p or len(c) == len(p):
            raise ValueError(f"{qa_path}: record {r.id}: the prompt's tokens are not a proper prefix of the caption's")
        p_ref.append(torch.tensor([1.0] * len(p) + [0.0] * (len(c) - len(p) + 1)))
    fp = {"tokenizer": T.fingerprint(tok), "data": text_fingerprint(records), "data_path": os.path.abspath(qa_path),
          "reference": "answer-mask",
          "reference_path": "benchmarks/qa.py answer_only_scores (p_ref 1 = question, 0 = answer)"}
    save_scores(out, [r.id for r in records], p_ref, fp)
    return out


@dataclass
class QAConfig:
    data: str = flag("", "a generator JSONL split with 'scene' fields (train.jsonl, test.jsonl)")
    out: str = flag("", "QA JSONL to write (image paths relative to its folder)")
    per_scene: int = flag(2, "questions per scene (0 = one of every kind that applies)")
    kinds: str = flag(",".join(KINDS), "question kinds, comma-separated")
    max_scenes: int = flag(0, "use only the first N scenes (0 = all)")
    seed: int = flag(0, "seed of the questions drawn per scene")


def main(cfg):
    if not cfg.data or not cfg.out:
        raise UserError("give --data (a generator split with scenes) and --out (the QA file to write)")
    if not os.path.isfile(cfg.data):
        raise UserError(f"--data {cfg.data}: no such file")
    check_out(cfg.out)
    kinds = tuple(k for k in cfg.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds: unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from {KINDS}")
    rows = build_qa(cfg.data, cfg.out, cfg.per_scene, cfg.seed, kinds, cfg.max_scenes)
    counts = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(f"wrote {len(rows)} questions to {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return rows


if __name__ == "__main__":
    run(main, QAConfig, description=__doc__)
