"""The main job: PRIOR vs NTP and its controls, end to end, on the built-in data, following the paper's recipe.

    bash run.sh                               # = python -m experiments.main (the CPU preset; prints its estimate)
    python -m experiments.main --preset smoke       # a 2-minute miniature of every stage (tests/test_experiment.py)
    python -m experiments.main --settings web:u     # another setting (mix:family) with the same protocol
    python -m experiments.main --arms ntp,prior_alpha0.5,prior,prior_alpha2 --tune ntp,prior_alpha0.5,prior,prior_alpha2
                                                    # the dose-response in the same --out: finished runs are reused
    python -m experiments.main --preset gpu --parallel 1 --nproc 8  # bigger data, models, steps (experiment.PRESETS)
    python -m experiments.main --stage prepare      # only data -> tokenizer -> reference LM -> scores

The design, fixed before any result was read (docs/experiment.md explains each choice; experiments/protocol.py
holds the rules, which the report applies again to results.json alone):
  settings   mix:family pairs (--settings; the cpu preset: web:h, the primary). Mixes: "web", "hard" (image words
             that the text predicts: PRIOR's risk), "noisy" (noise is most of the non-image words).
  arms       ntp, prior, prior_shuffled (PRIOR's weights permuted within each caption), anti_prior (w = p_ref:
             the same spread on the opposite tokens), oracle (the generator's tags: the positive control; a
             reference point, not a bound). --arms takes any registered weighting (experiments/controls.py).
  pilot      5 seeds the test never uses: every arm at every lr of one grid, validation captions at a checkpoint
             every 48 steps (nothing else); lr = best mean of the last 2 (near-ties: the smaller lr); a grid edge
             adds one value. The oracle must beat NTP there (the gate: a one-sided 95% paired interval above 0), or
             the setting cannot judge PRIOR.
  main       seed s gives every arm the same initialisation and data order; test captions at every checkpoint
             (every 24 steps); probes and the benchmark-format files at the last, the latter after 20 steps of
             instruction tuning of a copy.
  primary    gap_image on the test captions: the NLL of their image words with another caption's image minus
             with their own (nats per token; 0 for a model that ignores the image, whatever its text prior), what
             the image adds; co-primary PRIOR - NTP and PRIOR - shuffled at the final step (97.5% each).
             Also peak (step chosen on the pilot's validation curve) and stability (largest drop), with MDEs.
Stages (each skipped when its output exists, so a re-run resumes): data, tokenizer, then in parallel the
reference LM + scores per mix and the ViT, then the base LM (+ the U-LVLM's stage 1) alone on every core (on a
GPU beside them); the pilot; the main runs (each
run trains and evaluates its checkpoints in one worker process: experiments/worker.py); report (results.json,
results.md, plots: reporting.py), timing.json (where the time went).
"""
import json
import time
from dataclasses import asdict

from utils import atomic_write, check_out, run
from experiments.experiment import Experiment, ExperimentConfig
from experiments.reporting import write_report


def time_split(exp, phases, wall):
    """Where the main job's time went, from the job runner's own timers: timing.json beside results.json.
    compute_share = (training steps + checkpoint evaluations + pretraining jobs) / (slots x wall)."""
    jobs = {"train_s": 0.0, "eval_s": 0.0, "run_other_s": 0.0, "pretrain_s": 0.0}
    for name, kind, seconds, split in exp.jobs.timings:
        if split:  # a VLM run: its steps, its evaluations, the rest (start, data, model, checkpoints)
            jobs["train_s"] += split["train_s"]
            jobs["eval_s"] += split["eval_s"]
            jobs["run_other_s"] += split["other_s"]
        else:
            jobs["pretrain_s"] += seconds
    slots = max(1, exp.cfg.parallel)
    compute = jobs["train_s"] + jobs["eval_s"] + jobs["pretrain_s"]
    out = {"wall_s": wall, "slots": slots, "phases_s": phases, "jobs_s": jobs,
           "compute_share": compute / (slots * wall), "eval_over_train": jobs["eval_s"] / max(jobs["train_s"], 1e-9)}
    atomic_write(exp.path("timing.json"), json.dumps(out, indent=1))
    print("time split: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items()) +
          f"; in the runs: training {jobs['train_s'] / 60:.1f}, evaluation {jobs['eval_s'] / 60:.1f}, start/data/"
          f"saving {jobs['run_other_s'] / 60:.1f} slot-min; pretraining jobs {jobs['pretrain_s'] / 60:.1f} slot-min; "
          f"compute share {out['compute_share']:.0%} of {slots} slots x {wall / 60:.1f} min (timing.json)")
    return out


def main(cfg):
    t0 = time.time()
    check_out(cfg.out, "dir")
    exp = Experiment(cfg)
    print(f"PRIOR vs NTP, preset {cfg.preset}: settings {','.join(':'.join(x) for x in exp.settings)}, arms "
          f"{cfg.arms}, {cfg.seeds or exp.p['seeds']} paired seeds, {cfg.parallel} jobs at a time -> {exp.out}")
    print(exp.estimate())
    atomic_write(exp.path("experiment_config.json"), json.dumps({"config": asdict(cfg), "preset": exp.p}, indent=1))
    phases, t = {}, time.time()
    exp.prepare(with_pretrain=cfg.stage == "all")
    phases["prepare"], t = time.time() - t, time.time()
    if cfg.stage == "prepare":
        exp.jobs.close()
        print(f"prepared in {time.time() - t0:.0f}s: scores and relevance reports in {exp.out}")
        return
    rows = exp.experiment()
    phases["runs"], t = time.time() - t, time.time()
    exp.analyses()
    exp.jobs.close()
    md = write_report(rows, exp.out)
    phases["report"] = time.time() - t
    time_split(exp, phases, time.time() - t0)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {md}")


if __name__ == "__main__":
    run(main, ExperimentConfig, description=__doc__)
