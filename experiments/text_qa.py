"""Can the H-LVLM's frozen base LM answer a yes/no question about what its context says, with no image at all? The
text-only half of the diagnostic behind the POPE-style rows (docs/experiment.md, "The benchmark-format files"):

    python -m experiments.text_qa --base OUT/base_lm.pt --data OUT/data_web --steps 0,400 --json qa.json

For each STEPS of --steps, a copy of the base LM trained STEPS more steps (reference_lm.train_lm, lr 1e-3; 0 = the
base LM as it is) on its own text documents plus documents that describe a training scene and then ask and answer
three questions about it, in the instruction data's words ("a small yellow circle at the left . question: is there
a cross? answer: no question: ..."; benchmarks/qa.py), is asked presence questions about the validation scenes
after their description ("<description> . question: is there a star? answer:", half yes, half no). As
experiments/yes_no.py, d = log p(" y") - log p(" no") from the answer's first token; what the context adds is mean
d (answer yes) - mean d (answer no), 0 for a model that ignores its context. If the LM cannot read the answer from
a text description, no projector can make it read the answer from an image.
"""
import json
import os
import random
import shlex
import tempfile
from dataclasses import dataclass

import torch

from benchmarks.qa import PROMPT, read_scenes, scene_questions, vocabulary
from data import tokenizer as T
from model import load_lm
from reference_lm import RefConfig, train_lm
from utils import UserError, atomic_write, check_out, flag, run
from world.scenes import answered_questions, describe, groups_of, text_of


@dataclass
class TextQAConfig:
    base: str = flag("", "the base LM (reference_lm.py checkpoint) the H-LVLM's decoder starts from")
    data: str = flag("", "its data folder (world.generate: train.jsonl's scenes for the documents, val.jsonl's asked)")
    tokenizer: str = flag("", "tokenizer.json ('' = the one the base LM was trained with)")
    steps: str = flag("0,400", "comma-separated further training steps on the question documents (0 = as it is)")
    max_rows: int = flag(160, "presence questions asked (one per validation scene)")
    seed: int = flag(0, "seed of the questions and of the training")
    json: str = flag("", "also write the rows here ('' = print only)")


def description(scene):
    return text_of(describe(groups_of(scene, True)))


def qa_documents(scenes, rng, shapes, colours, per_doc=3):
    """One text document per scene: its description, then `per_doc` of its questions with their answers."""
    return [{"id": f"qa-{i:06d}",
             "caption": f"{description(scene)} {text_of(answered_questions(scene, rng, shapes, colours, n=per_doc))}"}
            for i, scene in enumerate(scenes)]


@torch.no_grad()
def margins(model, tok, scenes, rng, shapes, colours):
    """[(d, answer is yes)]: each scene's description, then one presence question (yes or no at 50:50)."""
    model.eval()
    yes, no = T.encode_captions(tok, ["yes", "no"])
    out = []
    for scene in scenes:
        q = scene_questions(scene, rng, shapes, colours, kinds=("presence",))[0]
        ids = [T.BOS] + T.encode_captions(tok, [f"{description(scene)} . {PROMPT.format(q['question'])}"])[0]
        logp = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        out.append((float(logp[yes[0]] - logp[no[0]]), q["target"] == "yes"))
    return out


def main(cfg):
    for name in ("train.jsonl", "val.jsonl", "text.jsonl"):
        if not os.path.exists(os.path.join(cfg.data, name)):
            raise UserError(f"--data {cfg.data}: no {name} there (a world.generate folder)")
    if not os.path.isfile(cfg.base):
        raise UserError(f"--base {cfg.base}: no such file (a reference_lm.py checkpoint)")
    steps = [s.strip() for s in cfg.steps.split(",")]
    if not all(s.isdigit() for s in steps):
        raise UserError(f"--steps {cfg.steps}: expected comma-separated step counts, e.g. 0,400")
    if cfg.json:  # before minutes of training, not after
        check_out(cfg.json, "file", "--json")
    tok_path = cfg.tokenizer or torch.load(cfg.base, weights_only=True, map_location="cpu")["config"]["tokenizer"]
    tok = T.load_tokenizer(tok_path)
    meta = os.path.join(cfg.data, "meta.json")
    train_scenes = [scene for _, _, scene in read_scenes(os.path.join(cfg.data, "train.jsonl"))]
    shapes, colours, _ = vocabulary(train_scenes, json.load(open(meta)) if os.path.exists(meta) else None)
    asked = [scene for _, _, scene in read_scenes(os.path.join(cfg.data, "val.jsonl"))][:cfg.max_rows]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        docs = os.path.join(tmp, "qa_text.jsonl")
        atomic_write(docs, "".join(json.dumps(d) + "\n"
                                   for d in qa_documents(train_scenes, random.Random(cfg.seed), shapes, colours)))
        for n in map(int, steps):
            path = cfg.base
            if n:
                path = os.path.join(tmp, f"base_qa_{n}.pt")
                train_lm(RefConfig(data=f"{docs},{os.path.join(cfg.data, 'text.jsonl')}", tokenizer=tok_path,
                                   out=path, init_decoder=cfg.base, steps=n, lr=1e-3, warmup=max(1, n // 10),
                                   eval_every=n, patience=0, batch_rows=8, row_len=256, seed=cfg.seed, device="cpu"))
            d = margins(load_lm(path, tok)[0], tok, asked, random.Random(cfg.seed + 1), shapes, colours)
            yes, no = [x for x, y in d if y], [x for x, y in d if not y]
            rows.append({"steps": n, "mean_d_yes": sum(yes) / len(yes), "mean_d_no": sum(no) / len(no),
                         "yes_share": sum(x > 0 for x, _ in d) / len(d),
                         "right": sum((x > 0) == y for x, y in d) / len(d), "n": len(d)})
    print("| further steps on question documents | mean d, answer yes | mean d, answer no | what the context adds "
          "| answered yes | answered right (d > 0 iff yes) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['mean_d_yes']:+.3f} | {r['mean_d_no']:+.3f} | "
              f"{r['mean_d_yes'] - r['mean_d_no']:+.3f} | {r['yes_share']:.1%} of {r['n']} | {r['right']:.1%} |")
    if cfg.json:
        command = ["python", "-m", "experiments.text_qa", "--base", cfg.base, "--data", cfg.data, "--steps",
                   cfg.steps, "--max-rows", str(cfg.max_rows), "--seed", str(cfg.seed), "--json", cfg.json]
        atomic_write(cfg.json, json.dumps({"command": shlex.join(command), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run(main, TextQAConfig, description=__doc__)
