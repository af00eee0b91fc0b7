"""Does an instruction-tuned checkpoint answer yes/no from its image? The diagnostic behind the POPE-style rows
(docs/experiment.md, "The benchmark-format files"):

    python -m experiments.yes_no --run OUT/runs/web/h/ntp_lr0.003_s0 --data OUT/data_web --tune all:20,all:100
    python -m experiments.yes_no ... --tune projector:20:0.01,all:60:3e-4       # other tuning lrs

For each PART:STEPS[:LR] of --tune, a copy of the run's last checkpoint is instruction-tuned as the main job's
evaluation does (STEPS 0: asked untuned; experiments/bench_instruct.instruct_config: QA about the training scenes,
all of them, where the main job reads its first it_scenes: pairs of the same kind; at LR, default the main job's
1e-3; PART = projector, all, or '' for the run's own), then asked presence
questions about the validation scenes, which no tuning saw ("question: is there a star? answer:", half yes, half
no; benchmarks/qa.py). Each is decided, as the POPE rows are, by the answer's first token: d = log p(" y" | image,
question) - log p(" no" | image, question). Printed per row: the mean d on questions whose answer is yes and on
those whose answer is no (their difference is what the image adds: 0 for a model that ignores it), and the share
answered yes (d > 0). POPE's yes ratio is far from 50% when the mean d is far from 0 whatever the image; its
accuracy is above chance only when the two means differ.
"""
import json
import os
import shlex
import tempfile
from dataclasses import dataclass

import eval as E
import train
from benchmarks.qa import build_qa
from data import tokenizer as T
from experiments.bench_instruct import IT_LR, instruct_config, qa_train_file
from experiments.experiment import Experiment
from model import load_model
from utils import UserError, atomic_write, check_out, flag, from_dict, run


@dataclass
class YesNoConfig:
    run: str = flag("", "a main-job run folder (config.json and its last ckpt_*.pt)")
    data: str = flag("", "the run's data folder (OUT/data_MIX: train.jsonl for the tuning, val.jsonl asked)")
    tune: str = flag("projector:20,all:20",
                     "comma-separated PART:STEPS[:LR] of instruction tuning (PART '' = the run's; STEPS 0 = untuned; "
                     "LR: default the main job's tuning lr)")
    max_rows: int = flag(160, "presence questions asked (one per validation scene)")
    pope: bool = flag(False, "also ask each copy the main job's POPE-style files (test scenes, POPE's wording)")
    json: str = flag("", "also write the rows here ('' = print only)")


def first_token_margins(model, tok, path, feature_cache, max_rows):
    """[(d, answer is yes)] of a presence QA file (choices ["yes", "no"]), d from the first tokens."""
    logps, answers = E.mc_eval(model, tok, path, feature_cache=feature_cache, max_rows=max_rows)
    return [(float(lp[0][0] - lp[1][0]), a == 0) for lp, a in zip(logps, answers)]


def parse_tune(item):
    """"PART:STEPS[:LR]" -> (part, steps, lr); a mistake names the flag."""
    part, steps, lr = (item.split(":") + [""])[:3] if item.count(":") in (1, 2) else (item, "", "")
    try:
        lr = float(lr) if lr else IT_LR
    except ValueError:
        lr = -1.0
    if not steps.isdigit() or not lr > 0:
        raise UserError(f"--tune {item}: expected PART:STEPS or PART:STEPS:LR, e.g. all:20 or projector:20:0.01")
    return part, int(steps), lr


def main(cfg):
    config = os.path.join(cfg.run, "config.json")
    ckpts = sorted(f for f in os.listdir(cfg.run) if f.startswith("ckpt_")) if os.path.isdir(cfg.run) else []
    if not os.path.exists(config) or not ckpts:
        raise UserError(f"--run {cfg.run}: no config.json and ckpt_*.pt there (a train.py run folder)")
    if not os.path.exists(os.path.join(cfg.data, "val.jsonl")):
        raise UserError(f"--data {cfg.data}: no val.jsonl there (a world.generate folder)")
    if cfg.json:  # before minutes of tuning, not after
        check_out(cfg.json, "file", "--json")
    run_cfg = from_dict(train.TrainConfig, json.load(open(config))["config"])
    tok = T.load_tokenizer(run_cfg.tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        asked = os.path.join(tmp, "presence_val.jsonl")  # its image paths are relative to it (build_qa)
        build_qa(os.path.join(cfg.data, "val.jsonl"), asked, per_scene=0, kinds=("presence",))
        for item in cfg.tune.split(","):
            part, steps, lr = parse_tune(item)
            if steps:
                it = {"data": qa_train_file(cfg.data), "steps": steps, "lr": lr, "train": part}
                tuned = instruct_config(run_cfg, os.path.join(cfg.run, ckpts[-1]), it, os.path.join(tmp, "tuned"))
                model, cache = train.main(tuned).eval(), tuned.feature_cache
            else:  # the checkpoint as it is: it has never seen a question
                model, cache = load_model(os.path.join(cfg.run, ckpts[-1]))[0], run_cfg.feature_cache
            d = first_token_margins(model, tok, asked, cache, cfg.max_rows)
            yes, no = [x for x, y in d if y], [x for x, y in d if not y]
            rows.append({"part": part or run_cfg.train, "steps": steps, "lr": lr if steps else 0.0,
                         "mean_d_yes": sum(yes) / len(yes), "mean_d_no": sum(no) / len(no),
                         "yes_share": sum(x > 0 for x, _ in d) / len(d), "n": len(d)})
            if cfg.pope:  # as the main job asks them (experiment.bench_specs), POPE's metrics only
                pope = [b for b in Experiment.bench_specs(cfg.data) if b.startswith("pope:")]
                got = E.evaluate_model(model, tok, bench=pope, feature_cache=cache, max_rows=cfg.max_rows)
                rows[-1].update({k: got[k] for k in ("pope_acc", "pope_f1", "pope_yes_ratio")})
    print("| tuned part | steps | lr | mean d, answer yes | mean d, answer no | what the image adds | answered yes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pope = (f" POPE acc {r['pope_acc']:.1f}, F1 {r['pope_f1']:.1f}, yes {r['pope_yes_ratio']:.1f}%"
                if cfg.pope else "")
        print(f"| {r['part']} | {r['steps']} | {r['lr']:g} | {r['mean_d_yes']:+.3f} | {r['mean_d_no']:+.3f} | "
              f"{r['mean_d_yes'] - r['mean_d_no']:+.3f} | {r['yes_share']:.1%} of {r['n']} |{pope}")
    if cfg.json:  # the rows and the command that regenerates them
        command = ["python", "-m", "experiments.yes_no", "--run", cfg.run, "--data", cfg.data, "--tune", cfg.tune,
                   "--max-rows", str(cfg.max_rows), *(["--pope"] if cfg.pope else []), "--json", cfg.json]
        atomic_write(cfg.json, json.dumps({"command": shlex.join(command), "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run(main, YesNoConfig, description=__doc__)
