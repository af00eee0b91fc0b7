"""Where the main job's evaluation time goes: each part a worker evaluates, timed again on one finished run's
last checkpoint, against that run's own training time (docs/performance.md, "The main job, stage by stage").

    python -m experiments.eval_split --out out --run runs/web/h/ntp_lr0.03_s0 --json results/main/eval_split.json

Parts (experiments.experiment.eval_spec; the median of --reps timings each, one thread): the test captions' gaps
(a main run evaluates them at every checkpoint), the probes (last checkpoint), the instruction-tuned copy (last
checkpoint: its tuning, then the benchmark-format files), and the validation gaps a pilot run evaluates at each
of its checkpoints. From them, the evaluation of one main run and of one pilot run, each over the training seconds
of this run (its log.jsonl; a pilot run trains the same steps). Nothing of the run is changed: the tuned copy is
made in a temporary folder.
"""
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import eval as E
import train
from data import tokenizer as T
from experiments.bench_instruct import tuned_bench
from experiments.experiment import PRESETS, Experiment, ExperimentConfig
from experiments.worker import steps_seconds
from model import load_model
from utils import UserError, atomic_write, check_out, flag, from_dict, run


@dataclass
class EvalSplitConfig:
    out: str = flag("out", "the main job's output folder (experiments.main --out)")
    run: str = flag("runs/web/h/ntp_lr0.03_s0", "a finished main run, relative to --out")
    preset: str = flag("cpu", "the preset the main job ran", list(PRESETS))
    reps: int = flag(3, "timings per part (the median is reported)", min=1)
    json: str = flag("", "also write the numbers and the command here")


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(cfg):
    run_dir = os.path.join(cfg.out, cfg.run)
    config = os.path.join(run_dir, "config.json")
    ckpts = sorted(f for f in os.listdir(run_dir) if f.startswith("ckpt_")) if os.path.isdir(run_dir) else []
    if not os.path.exists(config) or not ckpts:
        raise UserError(f"--run {cfg.run}: no config.json and ckpt_*.pt in {run_dir} (a finished main run)")
    if cfg.json:
        check_out(cfg.json, "file", "--json")
    run_cfg = from_dict(train.TrainConfig, json.load(open(config))["config"])
    exp = Experiment(ExperimentConfig(out=cfg.out, preset=cfg.preset, settings="web:h"))
    spec, val = exp.eval_spec("web", run_cfg.arch, "test"), exp.eval_spec("web", run_cfg.arch, "val")
    tok = T.load_tokenizer(run_cfg.tokenizer)
    model, ckpt = load_model(os.path.join(run_dir, ckpts[-1]))
    model, step = model.eval(), ckpt["step"]
    kw = dict(feature_cache=spec["feature_cache"], max_rows=spec["max_rows"])
    parts = {"test_gaps_s": lambda: E.evaluate_model(model, tok, test_path=spec["test"], **kw),
             "probes_s": lambda: E.evaluate_model(model, tok, probes_dir=spec["probes"], **kw),
             "val_gaps_s": lambda: E.evaluate_model(model, tok, test_path=val["test"], max_rows=val["max_rows"],
                                                    feature_cache=kw["feature_cache"])}
    out = {name: timed(fn, cfg.reps) for name, fn in parts.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the copy is tuned here, never in the run's folder
        shutil.copy(os.path.join(run_dir, ckpts[-1]), tmp)
        copy_cfg, tuning = replace(run_cfg, out_dir=tmp), []
        tune_main = train.main

        def tune(c):  # the tuning's share of the copy's time
            t0 = time.perf_counter()
            model = tune_main(c)
            tuning.append(time.perf_counter() - t0)
            return model
        train.main = tune
        try:
            out["tuned_copy_s"] = timed(lambda: tuned_bench(copy_cfg, step, spec["instruct"], spec["bench"], tok, **kw),
                                        cfg.reps)
        finally:
            train.main = tune_main
        out["tuning_s"] = statistics.median(tuning)
    checkpoints = step // run_cfg.save_every
    pilot_checkpoints = step // exp.p.get("pilot_save_every", run_cfg.save_every)
    train_s = steps_seconds(os.path.join(run_dir, "log.jsonl"), 0)
    out.update(run=cfg.run, checkpoints=checkpoints, pilot_checkpoints=pilot_checkpoints, train_s=train_s,
               main_run_eval_s=checkpoints * out["test_gaps_s"] + out["probes_s"] + out["tuned_copy_s"],
               pilot_run_eval_s=pilot_checkpoints * out["val_gaps_s"])
    out["main_run_eval_over_train"] = out["main_run_eval_s"] / train_s
    out["pilot_run_eval_over_train"] = out["pilot_run_eval_s"] / train_s
    for k, v in out.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if cfg.json:
        command = ["python", "-m", "experiments.eval_split", "--out", cfg.out, "--run", cfg.run, "--preset",
                   cfg.preset, "--reps", str(cfg.reps), "--json", cfg.json]
        atomic_write(cfg.json, json.dumps({"command": shlex.join(command), **out}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    run(main, EvalSplitConfig, description=__doc__)
