"""The main job: PRIOR vs NTP and its controls, end to end, on the built-in data, following the paper's recipe.

    bash run.sh                               # = python -m experiments.main (the CPU preset; prints its estimate)
    python -m experiments.main --preset smoke       # a 1-minute miniature of every stage (tests/test_experiment.py)
    python -m experiments.main --settings web:u     # another setting (mix:family) with the same protocol
    python -m experiments.main --preset gpu --parallel 1 --nproc 8  # bigger data, models, steps (experiment.PRESETS)
    python -m experiments.main --stage prepare      # only data -> tokenizer -> reference LM -> scores

The design, fixed before any result was read (docs/experiment.md explains each choice):
  settings   mix:family pairs (--settings). Mixes: "web" (mostly predictable boilerplate), "hard" (image words
             that the text predicts: PRIOR's risk), "noisy" (noise is most of the non-image words).
  arms       ntp, prior, prior_shuffled (PRIOR's weights permuted within each caption: does the choice of tokens
             matter, or any reweighting?), oracle (the generator's tags: a reference point, not a bound).
  seeds      seed s gives every arm the same initialisation and data order: differences are paired.
  lr         per arm, setting: a grid run with --grid-seeds seeds, scored on the VALIDATION probes (probes_val/)
             by the primary endpoint, averaged over those seeds; a choice at the grid's edge adds the next value
             beyond it (up to the preset's "extend" times per side, then reported as capped). The oracle's low
             weight is chosen the same way at its chosen lr. Arms not in --tune borrow (prior_shuffled: PRIOR's).
  primary    probe_cc_avg on the TEST probes at the last step: the chance-corrected probe average (eval.py).
Stages (each skipped when its output exists, so a re-run resumes): data, tokenizer, then in parallel the
reference LM + scores per mix, the base LM (+ the U-LVLM's stage 1) and the ViT; lr grids; main runs; eval of
every checkpoint; report (results.json, results.md, plots: reporting.py).
"""
import json
import time
from dataclasses import asdict

from lib.cli import parse_config
from experiments.experiment import Experiment, ExperimentConfig
from experiments.reporting import write_report


def main(cfg):
    t0 = time.time()
    exp = Experiment(cfg)
    print(f"PRIOR vs NTP, preset {cfg.preset}: settings {','.join(':'.join(x) for x in exp.settings)}, arms "
          f"{cfg.arms}, {cfg.seeds or exp.p['seeds']} paired seeds, {cfg.parallel} jobs at a time -> {exp.out}")
    print(exp.estimate())
    with open(exp.path("experiment_config.json"), "w") as f:
        json.dump({"config": asdict(cfg), "preset": exp.p}, f, indent=1)
    exp.prepare(with_pretrain=cfg.stage == "all")
    if cfg.stage == "prepare":
        print(f"prepared in {time.time() - t0:.0f}s: scores and relevance reports in {exp.out}")
        return
    rows = exp.experiment()
    exp.analyses()
    md = write_report(rows, exp.out)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {md}")


if __name__ == "__main__":
    main(parse_config(ExperimentConfig, description=__doc__))
