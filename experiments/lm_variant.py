"""What another base LM does to the H-LVLM: the main job's data, models and one NTP run, with the frozen LM
pre-trained on differently written text documents (docs/experiment.md, "A frozen LM that answers").

    python -m experiments.lm_variant --out out_grid --text-grid 1 --text-questions 0.5 \
        --json results/main/lm_grid.json                                  # grid descriptions, answered questions
    python -m experiments.lm_variant --out out_qa --text-questions 0.5 --base-steps 4500

The cpu preset's prepare stage (data, tokenizer, reference LM and scores, ViT, base LM: experiments.main --stage
all does the same first) with world.generate's --text-grid and --text-questions and the base LM's steps changed,
then experiments.text_qa on the base LM alone (--steps 0: what a text description adds to a presence question's
answer, and the share answered right) and one NTP run (the main job's recipe, seed and lr given; its evaluation
spec: test captions at every checkpoint, probes and the instruction-tuned copy's benchmark files at the last).
NTP only: a diagnostic of the instrument, never a comparison of arms. About 10 minutes on 2 cores. --out must be
a new folder or one this command made (a re-run reuses what is there).
"""
import copy
import json
import os
import shlex
from dataclasses import dataclass

from experiments import experiment as X
from experiments.text_qa import TextQAConfig
from experiments.text_qa import main as text_qa
from utils import FRACTION, Checks, UserError, atomic_write, check_out, flag, run

READ = ("gap_image", "gap_shape", "gap_colour", "gap_count", "gap_size", "gap_position", "probe_img_avg", "pope_acc",
        "pope_f1", "pope_yes_ratio", "mmbench_circular")  # what the table reports, at the last step


@dataclass
class VariantConfig(Checks):
    OWN_RANGES = {"text_grid": FRACTION, "text_questions": FRACTION, "pope_wording": FRACTION, "base_steps": 1,
                  "seed": 0, "lr": 0.0}
    out: str = flag("", "output folder (data, tokenizer, base LM, the run)")
    preset: str = flag("cpu", "experiments.main's preset the rest comes from", list(X.PRESETS))
    text_grid: float = flag(0.0, "world.generate --text-grid: share of text documents described cell by cell")
    text_questions: float = flag(0.0, "world.generate --text-questions: share ending with answered questions")
    pope_wording: float = flag(0.0, "world.generate --pope-wording: share of presence questions in POPE's words")
    base_steps: int = flag(3000, "base LM training steps (the cpu preset's: 3000)")
    seed: int = flag(1, "the NTP run's seed")
    lr: float = flag(0.03, "the NTP run's lr (the main job's choice for NTP)")
    json: str = flag("", "also write the row and the command here")


def main(cfg):
    cfg.check()
    if not cfg.out:
        raise UserError("--out: give an output folder for the data, the base LM and the run")
    made = os.path.join(cfg.out, "variant.json")
    if os.path.exists(cfg.out) and os.listdir(cfg.out) and not os.path.exists(made):
        raise UserError(f"--out {cfg.out}: not empty and not made by this command (no variant.json); give a new folder")
    if cfg.json:
        check_out(cfg.json, "file", "--json")
    asked = {k: getattr(cfg, k) for k in ("preset", "text_grid", "text_questions", "base_steps")}
    if cfg.pope_wording:  # only when given: the folders made before the flag stay valid
        asked["pope_wording"] = cfg.pope_wording
    if os.path.exists(made) and json.load(open(made)) != asked:
        raise UserError(f"--out {cfg.out}: made with {json.load(open(made))}, not {asked}; give a new folder")
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write(made, json.dumps(asked))
    saved = X.PRESETS[cfg.preset]
    X.PRESETS[cfg.preset] = preset = copy.deepcopy(saved)  # this process only: the workers get whole configs
    preset["data"].update(text_grid=cfg.text_grid, text_questions=cfg.text_questions, pope_wording=cfg.pope_wording)
    preset["base_lm"]["steps"] = cfg.base_steps
    preset["it_scenes"] = 0  # the tuned copy's questions about every training scene, as its rows in results/ were made
    try:
        exp = X.Experiment(X.ExperimentConfig(out=cfg.out, preset=cfg.preset, settings="web:h"))
        exp.prepare(with_pretrain=True)
        d = exp.run_dir("web", "h", "ntp", cfg.lr, cfg.seed)
        exp.parallel([exp.vlm_job(("web", "h", "ntp", cfg.lr, cfg.seed), "test")])
    finally:
        X.PRESETS[cfg.preset] = saved
    # the base LM alone: what a presence question's answer gains from the scene's (sentence) description before it
    qa = text_qa(TextQAConfig(base=exp.path("base_lm.pt"), data=exp.path("data_web"), steps="0"))[0]
    rows = json.load(open(os.path.join(d, "eval.json")))
    last = max(r["step"] for r in rows)
    row = {**asked, "seed": cfg.seed, "lr": cfg.lr, "step": last,
           "text_context_adds": qa["mean_d_yes"] - qa["mean_d_no"], "text_right": qa["right"],
           **{r["benchmark"]: r["value"] for r in rows if r["step"] == last and r["benchmark"] in READ}}
    print(json.dumps(row, indent=1))
    if cfg.json:
        command = ["python", "-m", "experiments.lm_variant", "--out", cfg.out, "--preset", cfg.preset,
                   "--text-grid", f"{cfg.text_grid:g}", "--text-questions", f"{cfg.text_questions:g}",
                   *(["--pope-wording", f"{cfg.pope_wording:g}"] if cfg.pope_wording else []),
                   "--base-steps", str(cfg.base_steps), "--seed", str(cfg.seed), "--lr", f"{cfg.lr:g}",
                   "--json", cfg.json]
        atomic_write(cfg.json, json.dumps({"command": shlex.join(command), "row": row}, indent=1) + "\n")
    return row


if __name__ == "__main__":
    run(main, VariantConfig, description=__doc__)
