"""One VLM run of the main job, inside a worker process of experiments/jobs.py: train.py's main with every
checkpoint evaluated in the same process on the model in hand (eval.evaluate_model), so a run is one job with
no process start, no re-read probes and no reloaded weights per checkpoint.

    from experiments.worker import train_eval
    specs = [dict(out="eval.json", probes="data/probes", max_rows=150, test="data/test.jsonl")]
    timing = train_eval(train.TrainConfig(...), specs)

Each evaluation spec writes rows {"arch", "loss", "seed", "lr", "step", "benchmark", "value"} to RUN/<out>;
its FINAL_ONLY keys (the probes, the NLL by reference weight, benchmark files: secondary) are evaluated at the
last step alone; the captions' grounding gaps (the primary endpoint) at every checkpoint. A spec with "instruct"
asks its "bench" files of an instruction-tuned copy of that last checkpoint (experiments/bench_instruct.py), the
paper's protocol; its rows are written with the step's other rows, so a step that has rows is done. A re-run skips
what is done: a finished run only evaluates the checkpoints its files lack (from ckpt_*.pt). Returns the job's time
split (the copy's tuning counts as evaluation).
"""
import glob
import json
import os
import re
import time

import eval as E
import train
from data import tokenizer as T
from experiments.bench_instruct import tuned_bench
from experiments.jobs import checked
from utils import pick_device
from model import load_model

FINAL_ONLY = ("probes", "test_scores", "bench", "instruct")  # read at the last step alone


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def evaluate_into(cfg, specs, tok, step, model, timing):
    """Evaluate `model` (at `step`) for every spec that lacks that step; rows appended to its file."""
    for spec in specs:
        path = os.path.join(cfg.out_dir, spec["out"])
        rows = read_rows(path)
        if any(r["step"] == step for r in rows):
            continue
        t0 = time.perf_counter()
        kw = {k: v for k, v in spec.items() if k != "out" and (k not in FINAL_ONLY or step == cfg.steps)}
        it = kw.pop("instruct", None)
        tuned = kw.pop("bench", None) if it else None  # asked of the tuned copy, below
        out = E.evaluate_model(model, tok, probes_dir=kw.pop("probes", None), test_path=kw.pop("test", None),
                               test_scores=kw.pop("test_scores", None), device=model_device(model), **kw)
        if tuned:  # the model in hand stays as it is: the copy starts from its checkpoint file
            out.update(tuned_bench(cfg, step, it, tuned, tok, device=model_device(model), **kw))
        rows += [{"arch": cfg.arch, "loss": cfg.loss, "seed": cfg.seed, "lr": cfg.lr, "step": step,
                  "benchmark": k, "value": v} for k, v in out.items()]
        E.write_rows(path, rows)
        timing["eval_s"] += time.perf_counter() - t0


def model_device(model):
    return str(next(model.parameters()).device)


def steps_seconds(log_path, after):
    """Seconds the training steps after step `after` took, from log.jsonl (train.py's own timer per step)."""
    if not os.path.exists(log_path):
        return 0.0
    with open(log_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return sum(x["seconds"] for x in lines if x["step"] > after)


def train_eval(cfg, specs):
    """Train (or resume) the run of train.TrainConfig cfg, evaluating each checkpoint by `specs`; returns
    {"wall_s", "train_s", "eval_s", "other_s"}: other = start-up, data, model building, checkpoint writing."""
    t0 = time.perf_counter()
    cfg = checked(cfg)  # as train.py would read it from its flags
    tok = T.load_tokenizer(cfg.tokenizer)
    timing = {"train_s": 0.0, "eval_s": 0.0}
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    final = os.path.join(cfg.out_dir, f"ckpt_{cfg.steps:06d}.pt")
    start = 0
    if not os.path.exists(final):
        if os.path.exists(log_path):
            start = max((json.loads(line)["step"] for line in open(log_path) if line.strip()), default=0)
        train.main(cfg, on_checkpoint=lambda step, model: evaluate_into(cfg, specs, tok, step, model, timing))
        timing["train_s"] = steps_seconds(log_path, start)
    for path in sorted(glob.glob(os.path.join(cfg.out_dir, "ckpt_*.pt"))):  # a finished run, or an interrupted
        step = int(re.search(r"ckpt_(\d+)\.pt$", path).group(1))       # one's checkpoints before its restart
        if any(not any(r["step"] == step for r in read_rows(os.path.join(cfg.out_dir, s["out"]))) for s in specs):
            evaluate_into(cfg, specs, tok, step, load_model(path, pick_device(cfg.device))[0], timing)
    timing["wall_s"] = time.perf_counter() - t0
    timing["other_s"] = timing["wall_s"] - timing["train_s"] - timing["eval_s"]
    return timing
