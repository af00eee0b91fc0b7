"""Would the pilot choose the same with fewer validation captions? Every pilot checkpoint of a finished main job
is scored again on --rows validation captions (the same fixed random subset eval.subsample gives any size: the
first N of the recorded run's order), and the pilot's rules are applied to those curves and to the recorded
ones: each tuned arm's lr (protocol.settle, round by round, as experiment.pilot runs them) and the positive
control's gate (oracle - NTP, protocol.gate). One checkpoint's evaluation is timed at each size.

    python -m experiments.pilot_rows --out out --rows 96,64 --json results/main/pilot_rows.json

Why: the pilot's validation curves are about a third of the main job's evaluation time (docs/performance.md),
and the pilot only chooses; fewer captions are cheaper, and this says whether they choose the same. A choice
that needs an lr the job never ran is reported as such ("needs"), not guessed.
"""
import glob
import json
import os
import shlex
import statistics
import time
from dataclasses import dataclass

import eval as E
from data import tokenizer as T
from experiments.experiment import Experiment, ExperimentConfig
from experiments.protocol import PRIMARY, gate, lr_score, settle, tail_mean
from model import load_model
from utils import UserError, atomic_write, check_out, flag, run


@dataclass
class PilotRowsConfig:
    out: str = flag("out", "a finished main job's folder (experiments.main --out)")
    rows: str = flag("96", "comma-separated numbers of validation captions to score the pilot on")
    json: str = flag("", "also write the result and the command here")


def pilot_rules(curves, base, extend, seeds):
    """{arm: choice} and the gate from curves[arm][lr][seed] = {step: PRIMARY}: each arm's lr as the pilot
    chooses it, round by round from the preset's grid; "needs" names an lr past an edge that no run has."""
    out = {}
    for arm, by_lr in sorted(curves.items()):
        grid = [lr for lr in base if lr in by_lr]
        while True:
            scores = {lr: lr_score([by_lr[lr][s] for s in seeds]) for lr in grid}
            chosen, edge, more = settle(scores, base, extend)
            if more and more in by_lr:
                grid.append(more)
                continue
            out[arm] = {"chosen": chosen, "edge": edge, "needs": more,
                        "scores": {f"{lr:g}": v for lr, v in sorted(scores.items())}}
            break
    if "oracle" in out and "ntp" in out:
        d = [tail_mean(curves["oracle"][out["oracle"]["chosen"]][s]) - tail_mean(curves["ntp"][out["ntp"]["chosen"]][s])
             for s in seeds]
        passed, lower = gate(d)
        out["gate"] = {"d": d, "lower": lower, "passed": passed}
    return out


def main(cfg):
    sizes = [int(x) for x in cfg.rows.split(",") if x.strip().isdigit() and int(x) > 0]
    if not sizes or len(sizes) != len(cfg.rows.split(",")):
        raise UserError(f"--rows {cfg.rows}: expected comma-separated positive numbers, e.g. 96,64")
    choice_file, saved = (os.path.join(cfg.out, f) for f in ("lr_choice.json", "experiment_config.json"))
    if not (os.path.exists(choice_file) and os.path.exists(saved)):
        raise UserError(f"--out {cfg.out}: no lr_choice.json and experiment_config.json there (a main job past its "
                        f"pilot)")
    if cfg.json:
        check_out(cfg.json, "file", "--json")
    saved = json.load(open(saved))
    exp = Experiment(ExperimentConfig(out=cfg.out, preset=saved["config"]["preset"]))
    exp.p = saved["preset"]  # the sizes the job ran with (its rows, grids, seeds), not today's preset
    seeds, result = exp.p["pilot_seeds"], {}
    tok = T.load_tokenizer(exp.path("tokenizer.json"))
    for setting, arms in json.load(open(choice_file)).items():
        mix, arch = setting.split("/")
        spec = exp.eval_spec(mix, arch, "val")
        tuned = {loss: c["grid"] for loss, c in arms.items() if "grid" in c}
        dirs = {(loss, lr, s): exp.run_dir(mix, arch, loss, lr, s) for loss, grid in tuned.items() for lr in grid
                for s in seeds}
        ckpts = {k: sorted(glob.glob(os.path.join(d, "ckpt_*.pt"))) for k, d in dirs.items()}
        recorded = {}
        for (loss, lr, s), d in dirs.items():
            recorded.setdefault(loss, {}).setdefault(lr, {})[s] = curve = exp.curve(mix, arch, loss, lr, s)
            if not ckpts[loss, lr, s] or not curve:
                raise UserError(f"--out {cfg.out}: no ckpt_*.pt or no {PRIMARY} rows in {d}/eval.json (the pilot's "
                                f"checkpoints and curves are needed)")
        base, extend = exp.p["lrs"][arch], exp.p["extend"]
        out = {"recorded": {"rows": spec["max_rows"], **pilot_rules(recorded, base, extend, seeds)}}
        for n in sizes:
            curves, times = {}, []
            for (loss, lr, s), paths in ckpts.items():
                curve = curves.setdefault(loss, {}).setdefault(lr, {}).setdefault(s, {})
                for path in paths:
                    model, ckpt = load_model(path)
                    t0 = time.perf_counter()
                    got = E.evaluate_model(model.eval(), tok, test_path=spec["test"], max_rows=n,
                                           feature_cache=spec["feature_cache"])
                    times.append(time.perf_counter() - t0)
                    curve[ckpt["step"]] = got[PRIMARY]
            rules = pilot_rules(curves, base, extend, seeds)
            same = all(rules[a]["chosen"] == out["recorded"][a]["chosen"] and not rules[a]["needs"] for a in tuned)
            out[str(n)] = {"rows": n, "eval_s_median": statistics.median(times), "same_choices": same, **rules}
            g = rules.get("gate")
            gate_says = "" if g is None else f"; gate not read ({len(g['d'])} seeds)" if g["lower"] != g["lower"] \
                else f"; gate lower bound {g['lower']:+.3f} ({'passed' if g['passed'] else 'FAILED'})"
            print(f"{setting} at {n} rows: " + ", ".join(f"{a} {rules[a]['chosen']:g}" for a in tuned) + gate_says +
                  f"; {'the same lrs' if same else 'OTHER LRS'} as the recorded pilot "
                  f"({out['recorded']['rows']} rows); {statistics.median(times):.2f} s per checkpoint")
        result[setting] = out
    if cfg.json:
        command = ["python", "-m", "experiments.pilot_rows", "--out", cfg.out, "--rows", cfg.rows, "--json",
                   cfg.json]
        atomic_write(cfg.json, json.dumps({"command": shlex.join(command), **result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    run(main, PilotRowsConfig, description=__doc__)
