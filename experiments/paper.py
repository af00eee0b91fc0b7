"""The paper's ablation, scaling and instruction-tuning experiments on the built-in data: one command each,
reusing what the main job (main.py) left in its output folder.

    python -m experiments.paper ablation [--from out] [--arch h] [--seeds 3]  # Fig. 5: alpha in {0.5, 1, 2, 4}, no k
    python -m experiments.paper baselines [--from out] [--arch h]     # Table 1: ITM, ITC, recon, attn, rare, Rho-1, CAL
    python -m experiments.paper scaling  [--from out] [--sizes 800,1600,...]  # Figs. 6-7: L(D) = (D / D_c)^alpha_D
    python -m experiments.paper instruct [--from out]                 # instruction tuning, generated answers
    python -m experiments.paper <command> --plan                      # what it would run, and an estimate
    python -m experiments.paper <command> --quick                     # seconds: a check on smoke artefacts

Each writes <from>/paper/<command>/results.md (paper/<command>_u/ for --arch u, _<mix> for another mix than
the main job's first), results.json, a PNG and its runs (train.py / eval.py
outputs) and logs; a re-run skips the finished runs, as main.py does. What it reads from --from:
experiment_config.json (the preset the artefacts were made with), data_<mix>/, tokenizer.json,
scores_<mix>_{train,test}.pt, ref_lm_<mix>.pt (scaling), base_lm.pt and vit.pt (H-LVLM),
runs/<mix>/u_stage1 (U-LVLM), chosen_lrs.json (each loss's learning rate, chosen by the main job's grid on
validation captions), and the main runs runs/<mix>/<arch>/<loss>_lr<lr>_s<seed> where they exist.

ablation   PRIOR with alpha in --alphas and PRIOR without the factor k (train.py --no-k), next to NTP, at the
           chosen lrs (PRIOR's lr for every PRIOR variant), --seeds seeds, --steps steps; the final checkpoint
           evaluated by eval.py exactly as the main job evaluates (probes, token NLL, grounding gap). The
           main job's NTP and PRIOR (alpha 1) runs are reused when their settings match (--no-reuse: never).
baselines  Table 1: rare-word weighting, attention weighting (token weights from a small contrastive model on
           the same captions, objectives.py, standing in for CLIP), NTP + ITM / ITC / reconstruction, and Rho-1
           and CAL (not in the paper), each in the main job's recipe. Each gets its own lr: the preset's grid
           at seed 0, chosen by the validation probes (as the main job chooses NTP's and PRIOR's), then the
           other seeds there; next to the main job's NTP, PRIOR and oracle runs (reused), evaluated as they
           were. Also: how well PRIOR's and the attention scorer's weights find the image words.
scaling    NTP and PRIOR trained for --epochs epochs on nested subsets of train.jsonl (its first n records;
           default 6 sizes, log-spaced over 10x up to all of it), each with its own cosine schedule. D = the
           caption tokens (with <|eos|>) the run's batches hold, counted exactly with global_batch.
           PRIOR needs p_ref for each subset: score.py is run on every subset file with the main job's
           reference LM (same model, same tokenizer; the subset gets its own data fingerprint), and the
           largest difference to the full file's scores is reported. Per method and --targets benchmark,
           log y = alpha_D log D - alpha_D log D_c is fitted by least squares over every run (seeds as
           separate points); alpha_D gets a 95% interval from the regression's standard error (t, n - 2 dof)
           and from a bootstrap over runs; the fit on all but the largest size predicts the largest, and the
           relative error of that prediction is reported.
instruct   Question-answer pairs from the training scenes (data/qa.py; never from test or probe images), a
           short instruction-tuning run (train.py --init-from) from each pre-trained NTP and PRIOR checkpoint,
           then, on questions about the test scenes, exact match of the greedily generated answer
           (qa_eval.qa_generate, KV-cached model.generate) next to the likelihood evaluation of the same
           checkpoints (the same questions as multiple choice; probes and token NLL with eval.py). The loss
           is on the answer tokens only (--it-loss answer, the default: a score file with p_ref = 1 on the
           question and 0 on the answer makes --loss prior a masked loss, data/qa.answer_only_scores) or on
           the whole "question: ... answer: ..." text (--it-loss all: plain NTP).
"""
import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from experiments.powerlaw import (bootstrap_alpha, fit_power_law, holdout, log_sizes, predict,  # noqa: F401
                                  t_quantile)  # t_quantile: the tests
from data.packing import global_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_BENCHES = ["probe_avg", "presence", "colour", "count", "position", "retrieval", "nll_image", "nll_boiler",
                "nll_noise", "nll_all", "gap_image", "gap_all"]


# ============================================================================= the main job's artefacts
class Setup:
    """What the main job left in --from, and a runner for train.py / eval.py / score.py jobs."""

    def __init__(self, args, command):
        from cli import from_dict
        from experiments.main import Experiment, ExperimentConfig
        self.args = args
        self.src = os.path.abspath(args.from_dir)
        cfg_path = os.path.join(self.src, "experiment_config.json")
        if not os.path.exists(cfg_path):
            raise SystemExit(f"paper.py: {cfg_path} is missing: run the main job first (python -m experiments.main "
                             f"--out {args.from_dir}, or --preset smoke for a miniature)")
        saved = json.load(open(cfg_path))
        exp_cfg = from_dict(ExperimentConfig, {**saved["config"], "out": self.src,
                                               **({"device": args.device} if args.device else {})})
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            self.exp = Experiment(exp_cfg)
        self.exp.p = saved["preset"]  # the preset the artefacts were made with, whatever main.py says now
        self.p = self.exp.p
        self.mix = args.mix or self.exp.mixes[0]
        self.arch = args.arch
        self.device = exp_cfg.device
        self.parallel = args.parallel or (1 if args.quick else max(1, exp_cfg.parallel))
        # one folder per command, family and mix, so that `--arch u` does not overwrite the H-LVLM's report
        folder = (command + ("" if self.arch == "h" else f"_{self.arch}")
                  + ("" if self.mix == self.exp.mixes[0] else f"_{self.mix}"))
        self.out = os.path.abspath(args.out or os.path.join(self.src, "paper", folder))
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        self.data = self.path(f"data_{self.mix}")
        self.eval_rows = args.eval_rows if args.eval_rows is not None else (8 if args.quick else self.p["eval_rows"])
        for need in (self.data, self.path("tokenizer.json"), self.path(f"scores_{self.mix}_train.pt")):
            if not os.path.exists(need):
                raise SystemExit(f"paper.py: {need} is missing (the main job's output in {self.src} is incomplete)")

    def path(self, *parts):
        return os.path.join(self.src, *parts)

    def lrs(self):
        """{loss: lr} chosen by the main job's grid for this mix and family (--lr overrides)."""
        if self.args.lr:
            return {"ntp": self.args.lr, "prior": self.args.lr}
        path = self.path("chosen_lrs.json")
        key = f"{self.mix}/{self.arch}"
        chosen = json.load(open(path)).get(key) if os.path.exists(path) else None
        if not chosen:
            raise SystemExit(f"paper.py: no learning rates for {key} in {path}: run the main job's lr grid "
                             f"(python -m experiments.main --out {self.args.from_dir}) or give --lr")
        return chosen

    def steps(self):
        return self.args.steps or (2 if self.args.quick else self.p["vlm"]["steps"])

    def batch(self):
        return self.args.batch_size or self.p["vlm"]["batch_size"]

    def train_args(self, loss, lr, seed, out_dir, steps=None, extra=()):
        """main.py's arguments for this run (same data, initialisation, recipe), with our changes last
        (argparse keeps the last value of a flag)."""
        steps = steps or self.steps()
        args = self.exp.train_args(self.mix, self.arch, loss, lr, seed, out_dir)
        return args + ["--steps", str(steps), "--save-every", str(steps), "--batch-size", str(self.batch()),
                       "--warmup", str(self.warmup(steps)), *map(str, extra)]

    def warmup(self, steps):
        """The preset's warm-up share of the run (its exact warm-up at its own number of steps)."""
        v = self.p["vlm"]
        return max(1, round(v["warmup"] * steps / v["steps"]))

    def same_run(self, run_dir, args):
        """Whether run_dir's train.py config equals what `args` would train (all but where it is written,
        how it runs and how often it saves): then its results can stand for this run."""
        import train
        from cli import parse_config
        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            return False
        have = json.load(open(path))["config"]
        # the artefacts folder may have moved since (copied, renamed): read its old paths as the new ones
        rel = os.path.relpath(os.path.abspath(run_dir), self.src)
        old_root = have.get("out_dir", "")[:-len(rel)].rstrip(os.sep) if have.get("out_dir", "").endswith(rel) else ""
        if old_root and old_root != self.src:
            have = {k: self.src + v[len(old_root):] if isinstance(v, str) and v.startswith(old_root + os.sep) else v
                    for k, v in have.items()}
        want = vars(parse_config(train.TrainConfig, [str(a) for a in args[1:]]))
        default = vars(parse_config(train.TrainConfig, []))  # a flag newer than the run: its default is what ran
        skip = {"out_dir", "resume", "device", "threads", "workers", "image_cache", "feature_cache", "stop_at",
                "save_every", "compile", "fsdp", "micro_batch"}
        return all(have.get(k, default[k]) == v for k, v in want.items() if k not in skip)

    def eval_args(self, run_dir, rows=None, test_scores=True, probes=None, test=None):
        """eval.py on the test probes and captions (or the given ones: the validation split for an lr grid)."""
        args = ["eval.py", "--run-dir", run_dir, "--max-rows", str(self.eval_rows if rows is None else rows),
                "--device", self.device, "--probes", probes or os.path.join(self.data, "probes"),
                "--test", test or os.path.join(self.data, "test.jsonl")]
        if test_scores and os.path.exists(self.path(f"scores_{self.mix}_test.pt")):
            args += ["--test-scores", self.path(f"scores_{self.mix}_test.pt")]
        return args

    def main_run(self, loss, lr, seed):
        """The main job's run of this loss/lr/seed if it finished, else None."""
        d = self.exp.run_dir(self.mix, self.arch, loss, lr, seed)
        last = os.path.join(d, f"ckpt_{self.p['vlm']['steps']:06d}.pt")
        return d if os.path.exists(last) else None

    # ---- measured speed of the main job, for estimates
    def seconds_per_step(self):
        lrs = json.load(open(self.path("chosen_lrs.json"))).get(f"{self.mix}/{self.arch}", {}) \
            if os.path.exists(self.path("chosen_lrs.json")) else {}
        d = self.main_run("ntp", lrs["ntp"], 0) if "ntp" in lrs else None
        if d and os.path.exists(os.path.join(d, "log.jsonl")):
            s = [json.loads(x)["seconds"] for x in open(os.path.join(d, "log.jsonl")) if x.strip()]
            if s:
                return sum(s) / len(s), f"{os.path.relpath(d, self.src)}/log.jsonl"
        return 0.5, "a guess (no main run log found)"

    def seconds_per_eval(self):
        times = []
        for name in sorted(os.listdir(self.path("logs"))) if os.path.isdir(self.path("logs")) else []:
            if name.startswith(f"eval_{self.mix}_{self.arch}_") and not name.endswith("_val.log"):
                times += [float(t) for t in re.findall(r"benchmarks in ([\d.]+)s",
                                                       open(self.path("logs", name)).read())]
        return (sum(times) / len(times), "the main job's eval logs") if times else (15.0, "a guess")

    def estimate(self, train_steps, n_train_jobs, n_evals, other_jobs=0, extra_s=0.0, note=""):
        """A rough time estimate from the main job's measured speed (train_steps: in units of the main
        job's steps)."""
        sps, src = self.seconds_per_step()
        spe, esrc = self.seconds_per_eval()
        # a subprocess's start-up (torch import, data, images): ~4-7 s per job in the smoke run on the 2-core CPU;
        # in this process (--parallel 1) only the data and images are loaded again
        startup = 6.0 if self.parallel > 1 else 1.0
        total = (train_steps * sps + n_evals * (spe + startup) + (n_train_jobs + other_jobs) * startup) \
            / self.parallel + extra_s
        return (f"estimate: {n_train_jobs} training runs ({train_steps} optimizer steps), {n_evals} evaluations, "
                f"{self.parallel} at a time: about {total / 60:.1f} min (from {sps:.2f} s/step measured in {src}"
                f"{note}, {spe:.1f} s per checkpoint "
                f"evaluation from {esrc}, ~{startup:.0f} s start-up per job; a rough guide, not a measurement)")

    # ---- jobs
    def run_jobs(self, jobs, title):
        """Run [(args, log name)] --parallel at a time: subprocesses with cpu_count // parallel threads each,
        or, with --parallel 1, in this process (no start-up cost; what --quick does)."""
        if not jobs:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {title}: {len(jobs)} jobs", flush=True)
        if self.parallel == 1:
            for args, name in jobs:
                self._in_process(args, name)
            return
        # fewer jobs than --parallel (e.g. one scorer to train): each gets a larger share of the cores
        threads = max(1, (os.cpu_count() or 2) // min(self.parallel, len(jobs)))
        with ThreadPoolExecutor(self.parallel) as pool:
            for f in [pool.submit(self._subprocess, a, n, threads) for a, n in jobs]:
                f.result()

    def _log(self, name):
        return os.path.join(self.out, "logs", name + ".log")

    def _fail(self, args, log):
        tail = open(log).read()[-2500:] if os.path.exists(log) else ""
        raise SystemExit(f"step failed: {' '.join(args)}\n--- last lines of {log} ---\n{tail}")

    def _subprocess(self, args, name, threads):
        log = self._log(name)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            self._fail(args, log)

    def _in_process(self, args, name):
        from cli import parse_config
        script, argv = args[0], args[1:]
        if script == "train.py":
            import train as mod
            cfg = parse_config(mod.TrainConfig, argv)
        elif script == "eval.py":
            import eval as mod
            cfg = parse_config(mod.EvalConfig, argv)
        elif script == "score.py":
            import score as mod
            cfg = parse_config(mod.ScoreConfig, argv)
        elif script == "objectives.py":
            import objectives
            mod = argparse.Namespace(main=objectives.train_attention_scorer)
            cfg = parse_config(objectives.AttnConfig, argv)
        else:
            raise ValueError(script)
        log = self._log(name)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                mod.main(cfg)
            except (Exception, SystemExit) as e:
                import traceback
                traceback.print_exc(file=f)
                failed = e
            else:
                failed = None
        if failed is not None:
            self._fail(args, log)

    def check_own(self, planned):
        """Refuse to reuse a run folder of ours that holds a run with other settings (e.g. after a change of
        the preset or of this script): its checkpoint would be taken as finished."""
        for run_dir, args in planned:
            if os.path.exists(os.path.join(run_dir, "config.json")) and not self.same_run(run_dir, args):
                raise SystemExit(f"paper.py: {run_dir} holds a run with other settings than this command asks for; "
                                 f"remove it (or give another --out)")

    def final_rows(self, run_dir, step):
        """eval.json rows of one run at `step`: {benchmark: value}."""
        path = os.path.join(run_dir, "eval.json")
        if not os.path.exists(path):
            return {}
        return {r["benchmark"]: r["value"] for r in json.load(open(path)) if r["step"] == step}

    def header(self, title, what, t0=None):
        lines = [f"# {title}", "", what, "",
                 f"- command: `python -m experiments.paper "
                 f"{' '.join(getattr(self.args, 'argv', None) or [self.args.command])}`",
                 f"- artefacts: `{self.src}` (preset `{self.exp.cfg.preset}`), caption mix `{self.mix}`, "
                 f"{ {'h': 'H-LVLM', 'u': 'U-LVLM'}[self.arch]}"]
        if self.args.quick:
            lines.append("- **--quick**: a check that the command runs end to end, not a result")
        return lines


def table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bar_plot(st, keys, labels, show, colors, default_color, title, png):
    """One panel per benchmark in `show`: each arm's seed mean ± std as a bar, its seeds as dots, NTP's mean as
    a dashed line; the y range fits the data (differences of a few percent stay visible)."""
    from experiments.report import lower_better
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(show)), figsize=(max(4.2, 0.55 * len(keys) + 1.5) * max(1, len(show)), 3.8))
    for ax, b in zip(np.atleast_1d(axes), show):
        m = [st[k][b]["mean"] for k in keys]
        e = [st[k][b]["std"] for k in keys]
        ax.bar(range(len(keys)), m, yerr=e, capsize=4, color=[colors.get(k, default_color) for k in keys], alpha=0.8)
        for i, k in enumerate(keys):
            pts = list(st[k][b]["by_seed"].values())
            ax.plot([i] * len(pts), pts, "k.", ms=4)
        lo = min(min(mi - ei for mi, ei in zip(m, e)), min(v for k in keys for v in st[k][b]["by_seed"].values()))
        hi = max(max(mi + ei for mi, ei in zip(m, e)), max(v for k in keys for v in st[k][b]["by_seed"].values()))
        pad = (hi - lo) * 0.3 or abs(hi) * 0.05 or 0.01
        ax.set_ylim(lo - pad, hi + pad)
        ax.axhline(st["ntp"][b]["mean"], color="tab:gray", ls="--", lw=0.8)
        ax.set_xticks(range(len(keys)), [labels[k] for k in keys], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{b} {'↓' if lower_better(b) else '↑'}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


# ============================================================================= ablation (Fig. 5)
def ablation_arms(alphas):
    arms = [("ntp", "NTP", "ntp", 1.0, False)]
    arms += [(f"prior_a{a:g}", f"PRIOR α={a:g}", "prior", a, False) for a in alphas]
    arms.append(("prior_nok", "PRIOR α=1 w/o k", "prior", 1.0, True))
    return arms  # (key, label, loss, alpha, no_k)


def ablation(args):
    from experiments import report
    t0 = time.time()
    s = Setup(args, "ablation")
    lrs, steps, seeds = s.lrs(), s.steps(), args.seeds or (1 if args.quick else s.p["seeds"])
    alphas = [float(a) for a in args.alphas.split(",")]
    arms = ablation_arms(alphas)
    plan, reused = [], {}
    for key, label, loss, alpha, no_k in arms:
        lr = lrs[loss]
        for seed in range(seeds):
            d = os.path.join(s.out, "runs", s.mix, s.arch, f"{key}_lr{lr:g}_s{seed}_steps{steps}")
            targs = s.train_args(loss, lr, seed, d, extra=["--alpha", alpha, "--no-k", str(no_k).lower()])
            main = None if args.no_reuse or args.quick else s.main_run(loss, lr, seed)
            if main and s.final_rows(main, steps) and s.same_run(main, targs):
                reused[key, seed] = main
                continue
            plan.append((key, seed, d, targs))
    print(f"ablation ({s.mix}, {s.arch.upper()}-LVLM): {len(arms)} arms x {seeds} seeds, {steps} steps at lr "
          f"NTP {lrs['ntp']:g} / PRIOR {lrs['prior']:g}; {len(reused)} main-job runs reused, {len(plan)} to run")
    print(s.estimate(steps * len(plan), len(plan), len(plan)))
    if args.plan:
        return None
    s.check_own([(d, a) for k, seed, d, a in plan])
    todo = [(a, f"train_{k}_s{seed}") for k, seed, d, a in plan
            if not os.path.exists(os.path.join(d, f"ckpt_{steps:06d}.pt"))]
    s.run_jobs(todo, "train")
    s.run_jobs([(s.eval_args(d), f"eval_{k}_s{seed}") for k, seed, d, _ in plan
                if not s.final_rows(d, steps)], "evaluate")
    values = {}  # key -> bench -> {seed: value}
    for k, seed, d, _ in plan:
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[seed] = v
    for (k, seed), d in reused.items():
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[seed] = v
    st = {k: {b: report.stats(v) for b, v in bs.items()} for k, bs in values.items()}
    benches = [b for b in MAIN_BENCHES if b in st.get("ntp", {})]
    every = sorted({b for bs in st.values() for b in bs if "_shuffled" not in b}, key=report.bench_key)
    vs = {k: {b: report.compare(st[k][b], st["ntp"][b], b, "prior") for b in st[k] if b in st["ntp"]}
          for k in st if k != "ntp"}

    md = s.header("Ablation: PRIOR's exponent alpha and the factor k (the paper's Fig. 5)",
                  "PRIOR with w = (1 - p_ref)^alpha for each alpha, and PRIOR (alpha 1) without the factor k in "
                  "its per-caption normalisation (`train.py --no-k`: f_i = w_i / sum_j w_j), next to NTP. Every "
                  "arm: the main job's recipe, data and initialisation, the final checkpoint, evaluated as the "
                  "main job evaluates.")
    md += [f"- {steps} steps of batch {s.batch()}, lr NTP {lrs['ntp']:g}, every PRIOR arm {lrs['prior']:g} "
           "(chosen_lrs.json: chosen for NTP and PRIOR alpha 1 by their probe average on the validation probes; "
           "the other arms "
           f"were not tuned), seeds 0-{seeds - 1}; eval rows per probe file / test captions: {s.eval_rows or 'all'}",
           "- reused main-job runs (same settings): "
           f"{', '.join(sorted({os.path.relpath(d, s.src) for d in reused.values()})) or 'none'}",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", "",
           "## Mean ± sample std over seeds (final step)", ""]
    md += table(["benchmark"] + [f"{lab} (n={st[k][benches[0]]['n'] if benches else 0})"
                                 for k, lab, *_ in arms if k in st],
                [[f"`{b}` {'↓' if report.lower_better(b) else '↑'}"]
                 + [report.pm(st[k].get(b)) for k, *_ in arms if k in st]
                 for b in benches])
    md += ["",
           "## Change vs NTP (relative; positive = better than NTP; * = |difference| > 2 Welch standard errors)", ""]
    md += table(["benchmark"] + [lab for k, lab, *_ in arms if k in vs],
                [[f"`{b}`"] + [(report.fmt(vs[k][b]["rel"], pct=True) + (" *" if vs[k][b]["clear"] else ""))
                               if b in vs[k] else "–" for k, *_ in arms if k in vs] for b in benches])
    md += ["", "Every benchmark of eval.py (mean ± std) is in results.json. `probe_avg`: mean accuracy over the probe "
           "groups (chance: 0.5 for presence, 0.25 for each other group, with the generator's defaults); `nll_image`: "
           "NLL of image-related caption words with the true image; "
           "`gap_image`: NLL with another image minus with the true one (how much the image helps).", ""]

    keys = [k for k, *_ in arms if k in st]
    labels = {k: lab for k, lab, *_ in arms}
    png = os.path.join(s.out, "ablation.png")
    bar_plot(st, keys, labels, [b for b in ("probe_avg", "nll_image", "gap_image") if b in st.get("ntp", {})],
             {"ntp": "tab:gray"}, "tab:orange", f"PRIOR ablation ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over "
             f"{seeds} seeds)", png)
    md += ["![ablation](ablation.png)", ""]
    md += ["## Every benchmark", ""] + table(
        ["benchmark"] + [labels[k] for k in keys],
        [[f"`{b}`"] + [report.pm(st[k].get(b)) for k in keys] for b in every])
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "arms": [{"key": k, "label": lab, "loss": l, "alpha": a,
                  "no_k": nk, "lr": lrs[l]} for k, lab, l, a, nk in arms],
        "steps": steps, "seeds": seeds, "stats": st, "vs_ntp": vs,
        "reused": {f"{k}/s{sd}": d for (k, sd), d in reused.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out


# ============================================================================= scaling (Figs. 6-7)
def write_subset(src, out, n):
    """The first n records of a JSONL caption file, same ids, captions and fields; image paths rewritten to be
    relative to the new file's folder."""
    src_dir, out_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    with open(src) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise ValueError(f"{src} has only {len(rows)} records, asked for {n}")
    for r in rows:
        if r.get("image") and not os.path.isabs(r["image"]):
            r["image"] = os.path.relpath(os.path.join(src_dir, r["image"]), out_dir)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)
    return out


def tokens_seen(lengths, steps, batch, seed):
    """Caption tokens (labels: caption + <|eos|>) in the batches train.py draws in `steps` steps."""
    from data.packing import global_batch
    return sum(lengths[i] for step in range(steps) for i in global_batch(step, len(lengths), batch, seed))


def scaling(args):
    from experiments import report
    import tokenizer as T
    t0 = time.time()
    s = Setup(args, "scaling")
    lrs, seeds = s.lrs(), args.seeds or (1 if args.quick else 2)
    methods = args.methods.split(",")
    targets = args.targets.split(",")
    train_path = os.path.join(s.data, "train.jsonl")
    n_all = sum(1 for line in open(train_path) if line.strip())
    batch = s.batch() if not args.quick or args.batch_size else min(s.batch(), 16)
    if args.sizes:
        sizes = sorted(int(x) for x in args.sizes.split(","))
    else:
        sizes = log_sizes(min(n_all, 200) if args.quick else n_all, k=5 if args.quick else 6, minimum=batch)
    if sizes[-1] > n_all:
        raise SystemExit(f"paper.py: --sizes up to {sizes[-1]}, but {train_path} has {n_all} records")
    if len(sizes) < 2:
        raise SystemExit("paper.py: scaling needs at least two sizes")
    steps_of = {n: max(1, math.ceil(args.epochs * n / batch)) for n in sizes}
    ref = s.path(f"ref_lm_{s.mix}.pt")
    data_dir = os.path.join(s.out, "data")
    subset, scores = {}, {}
    for n in sizes:
        if n == n_all:
            subset[n], scores[n] = train_path, s.path(f"scores_{s.mix}_train.pt")
        else:
            subset[n] = os.path.join(data_dir, f"train_{n}.jsonl")
            scores[n] = os.path.join(data_dir, f"scores_train_{n}.pt")
    need_scores = [n for n in sizes if "prior" in methods and not os.path.exists(scores[n])]
    if need_scores and not os.path.exists(ref):
        raise SystemExit(f"paper.py: {ref} (the reference LM) is missing: it scores the subsets")
    runs = []
    for m in methods:
        for n in sizes:
            for seed in range(seeds):
                d = os.path.join(s.out, "runs", s.mix, s.arch, f"{m}_n{n}_s{seed}_ep{args.epochs:g}_b{batch}")
                extra = ["--data", subset[n], "--batch-size", batch]
                if m == "prior":
                    extra += ["--scores", scores[n]]
                runs.append((m, n, seed, d, s.train_args(m, lrs[m], seed, d, steps=steps_of[n], extra=extra)))
    total_steps = sum(steps_of[n] for m, n, *_ in runs)
    print(f"scaling ({s.mix}, {s.arch.upper()}-LVLM): {', '.join(methods)} on {len(sizes)} subsets of {train_path} "
          f"({', '.join(map(str, sizes))} records; {args.epochs:g} epoch(s) of batch {batch}: "
          f"{', '.join(str(steps_of[n]) for n in sizes)} steps), {seeds} seed(s); lr "
          f"{', '.join(f'{m} {lrs[m]:g}' for m in methods)}")
    report_path = s.path(f"scores_{s.mix}_train.json")  # the main job's scoring report: its measured speed
    measured = json.load(open(report_path)).get("score_tokens_per_s") if os.path.exists(report_path) else None
    score_speed = measured or 6500
    print(s.estimate(total_steps, len(runs), len(runs), other_jobs=len(need_scores),
                     extra_s=sum(need_scores) * 28 / score_speed / s.parallel,
                     note=f"; scoring the subsets at ~{score_speed:,.0f} tokens/s of ~28 per caption ("
                          f"{'measured in ' + os.path.basename(report_path) if measured else 'a guess'})"))
    if args.plan:
        return None
    for n in sizes:
        if subset[n] != train_path and not os.path.exists(subset[n]):
            write_subset(train_path, subset[n], n)
    s.run_jobs([(["score.py", "--ref", ref, "--tokenizer", s.path("tokenizer.json"), "--data", subset[n],
                  "--out", scores[n], "--device", s.device], f"score_{n}") for n in need_scores], "score the subsets")
    score_check = {}
    if "prior" in methods:
        from data.records import read_records
        from data.scores import load_scores
        from utils import text_fingerprint
        tok = T.load_tokenizer(s.path("tokenizer.json"))
        full_records = read_records(train_path, require_image=False, check_files=False)
        full = load_scores(s.path(f"scores_{s.mix}_train.pt"), T.fingerprint(tok), text_fingerprint(full_records))
        for n in sizes:
            if subset[n] == train_path:
                continue
            recs = read_records(subset[n], require_image=False, check_files=False)
            part = load_scores(scores[n], T.fingerprint(tok), text_fingerprint(recs), subset[n])
            score_check[n] = max(float((part[r.id] - full[r.id]).abs().max()) for r in recs)
    s.check_own([(d, a) for m, n, seed, d, a in runs])
    s.run_jobs([(a, f"train_{m}_n{n}_s{seed}") for m, n, seed, d, a in runs
                if not os.path.exists(os.path.join(d, f"ckpt_{steps_of[n]:06d}.pt"))], "train")
    s.run_jobs([(s.eval_args(d), f"eval_{m}_n{n}_s{seed}") for m, n, seed, d, a in runs
                if not s.final_rows(d, steps_of[n])], "evaluate")

    tok = T.load_tokenizer(s.path("tokenizer.json"))
    with open(train_path) as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    lengths = [len(c) + 1 for c in T.encode_captions(tok, captions)]
    points = []  # {"method", "n", "seed", "steps", "D", bench: value}
    for m, n, seed, d, a in runs:
        rows = s.final_rows(d, steps_of[n])
        points.append({"method": m, "n": n, "seed": seed, "steps": steps_of[n],
                       "D": tokens_seen(lengths[:n], steps_of[n], batch, seed), **rows})
    fits = {}
    for tgt in targets:
        for m in methods:
            pts = [p for p in points if p["method"] == m and p.get(tgt) is not None]
            D = [p["D"] for p in pts]
            y = [p[tgt] for p in pts]
            if len({p["n"] for p in pts}) < 2 or min(y, default=0) <= 0:
                fits[tgt, m] = {"error": "fewer than two sizes or a non-positive value: no power law in log space"}
                continue
            f = fit_power_law(D, y)
            f["bootstrap_ci"], slopes = bootstrap_alpha(D, y, seed=methods.index(m))
            f["slopes"] = slopes
            try:
                f["holdout"] = holdout(D, y) if len({p["n"] for p in pts}) >= 3 else None
            except ValueError:
                f["holdout"] = None
            fits[tgt, m] = f
    diffs = {}
    for tgt in targets:
        if ({"ntp", "prior"} <= set(methods) and "alpha" in fits.get((tgt, "prior"), {})
                and "alpha" in fits.get((tgt, "ntp"), {})):
            a, b = fits[tgt, "prior"]["slopes"], fits[tgt, "ntp"]["slopes"]  # independent resamples (seeds 0, 1)
            k = min(len(a), len(b))
            diff = a[:k] - b[:k]
            diffs[tgt] = {"diff": fits[tgt, "prior"]["alpha"] - fits[tgt, "ntp"]["alpha"],
                          "ci": [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]}

    md = s.header("Scaling with data: L(D) = (D / D_c)^alpha_D (the paper's Figs. 6-7)",
                  f"NTP and PRIOR trained on nested subsets of the training captions (the first n records of "
                  f"train.jsonl), {args.epochs:g} epoch(s) each with its own warm-up and cosine schedule, so D, the "
                  f"caption tokens seen, grows with the data. Fitted per method: log y = alpha_D log D - alpha_D "
                  f"log D_c by least squares over every run (each seed one point), for y = "
                  f"{', '.join(f'`{t}`' for t in targets)} of the final checkpoint. For a score (↑) a larger alpha_D "
                  f"means faster gains with data; for a loss (↓) alpha_D is negative and a more negative one "
                  f"means faster gains.")
    md += [f"- sizes (records): {', '.join(map(str, sizes))} of {n_all}; steps: "
           f"{', '.join(str(steps_of[n]) for n in sizes)} (batch {batch}); warm-up: the preset's share of the steps "
           f"({', '.join(str(s.warmup(steps_of[n])) for n in sizes)}); "
           f"lr {', '.join(f'{m} {lrs[m]:g}' for m in methods)} (chosen_lrs.json: the main job's grid at "
           f"{s.p['vlm']['steps']} steps); seeds 0-{seeds - 1}; eval rows: {s.eval_rows or 'all'}",
           "- D: caption tokens incl. <|eos|> in the run's batches (global_batch), before any truncation "
           "to the row (train.py's log warns if any caption was truncated)",
           f"- PRIOR's p_ref for each subset: score.py run on the subset file with the main job's reference LM "
           f"(`{os.path.relpath(ref, s.src)}`, same tokenizer), so each score file carries its subset's data "
           f"fingerprint; largest |p_ref(subset) - p_ref(full file)| over all tokens: "
           f"{max(score_check.values()):.2e}" if score_check else "- PRIOR's p_ref: the full file's scores (no "
                                                                  "subset scored)",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", ""]
    md += ["## Fits", "", "95% intervals of alpha_D: from the regression's standard error (t, n − 2 dof) and from "
           "a bootstrap over runs (2,000 resamples). D_c = exp(−intercept / alpha_D) is only meaningful when alpha_D "
           "is clearly away from 0. Held-out: the fit on all but the largest size predicts the largest size's mean; "
           "relative error = |predicted − observed| / observed.", ""]
    rows = []
    for tgt in targets:
        for m in methods:
            f = fits.get((tgt, m), {})
            if "alpha" not in f:
                rows.append([f"`{tgt}`", m.upper(), f.get("error", "–"), "", "", "", "", "", ""])
                continue
            h = f.get("holdout")
            rows.append([f"`{tgt}`", m.upper(), f"{f['alpha']:+.4g}", f"[{f['ci'][0]:+.4g}, {f['ci'][1]:+.4g}]",
                         f"[{f['bootstrap_ci'][0]:+.4g}, {f['bootstrap_ci'][1]:+.4g}]", f"{f['D_c']:.3g}",
                         f"{f['n']}", f"{h['predicted']:.4f} vs {h['observed']:.4f}" if h else "–",
                         f"{100 * h['rel_error']:.2f}%" if h else "–"])
    md += table(["y", "method", "alpha_D", "95% CI (SE)", "95% CI (bootstrap)", "D_c", "runs",
                 "held-out: predicted vs observed", "rel. error"], rows)
    for tgt, d in diffs.items():
        md += ["", f"alpha_D(PRIOR) − alpha_D(NTP) on `{tgt}`: {d['diff']:+.4g}, 95% interval from the two "
               f"bootstraps (independent resamples) [{d['ci'][0]:+.4g}, {d['ci'][1]:+.4g}]"
               + (" (excludes 0)" if d['ci'][0] > 0 or d['ci'][1] < 0 else " (includes 0)")]
    md += ["", "## Runs (final checkpoint)", ""]
    md += table(["method", "records", "seed", "steps", "D (tokens)", *[f"`{t}`" for t in targets]],
                [[p["method"].upper(), str(p["n"]), str(p["seed"]), str(p["steps"]), str(p["D"]),
                  *[report.fmt(p.get(t)) for t in targets]] for p in points])

    plt = _plt()
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4))
    colours = {"ntp": "tab:gray", "prior": "tab:orange"}
    for ax, tgt in zip(np.atleast_1d(axes), targets):
        for m in methods:
            pts = [p for p in points if p["method"] == m and p.get(tgt) is not None]
            c = colours.get(m, None)
            ax.plot([p["D"] for p in pts], [p[tgt] for p in pts], "o", color=c, ms=4, alpha=0.7)
            f = fits.get((tgt, m), {})
            if "alpha" in f:
                xs = np.geomspace(min(p["D"] for p in pts), max(p["D"] for p in pts), 50)
                ax.plot(xs, predict(f, xs), "-", color=c, label=f"{m.upper()}: alpha_D = {f['alpha']:+.3f}")
                h = f.get("holdout")
                if h:
                    ax.plot(xs, predict(h["fit"], xs), ":", color=c, lw=1)
                    ax.plot([h["D"]], [h["predicted"]], "x", color=c, ms=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter
        for fmt_ in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            fmt_(ScalarFormatter())
        ax.set_xlabel("D: caption tokens seen")
        ax.set_ylabel(f"{tgt} {'↓' if report.lower_better(tgt) else '↑'}")
        ax.set_title(f"{tgt}: dots = runs, line = fit; x = held-out prediction", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(s.out, "scaling.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md += ["", "![scaling](scaling.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "sizes": sizes, "steps": steps_of, "batch": batch, "epochs": args.epochs, "seeds": seeds, "lrs": lrs,
        "points": points, "score_max_abs_diff": score_check, "alpha_diff": diffs,
        "fits": {f"{t}/{m}": {k: v for k, v in f.items() if k != "slopes"} for (t, m), f in fits.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out


# ============================================================================= instruction tuning (item 4)
def instruct(args):
    from experiments import report
    import tokenizer as T
    from data import qa
    t0 = time.time()
    s = Setup(args, "instruct")
    lrs, seeds = s.lrs(), args.seeds or (1 if args.quick else s.p["seeds"])
    methods = args.methods.split(",")
    kinds = qa.KINDS
    it_steps = args.it_steps or (3 if args.quick else 100)
    qa_rows = args.qa_rows or (8 if args.quick else 100)
    qdir = os.path.join(s.out, "qa")
    qa_train, mask = os.path.join(qdir, "qa_train.jsonl"), os.path.join(qdir, "qa_train_answer_mask.pt")
    qa_test = {k: os.path.join(qdir, f"qa_{k}.jsonl") for k in kinds}
    # pre-trained checkpoints: the main job's runs where they exist, else trained here with its recipe
    pre, pre_jobs = {}, []  # (method, seed) -> (checkpoint, run dir, its step)
    for m in methods:
        for seed in range(seeds):
            main = None if args.quick else s.main_run(m, lrs[m], seed)
            if main:
                step = s.p["vlm"]["steps"]
                pre[m, seed] = (os.path.join(main, f"ckpt_{step:06d}.pt"), main, step)
            else:
                step = s.steps()
                d = os.path.join(s.out, "pretrain", f"{m}_lr{lrs[m]:g}_s{seed}_steps{step}")
                pre[m, seed] = (os.path.join(d, f"ckpt_{step:06d}.pt"), d, step)
                pre_jobs.append((s.train_args(m, lrs[m], seed, d), f"pretrain_{m}_s{seed}", pre[m, seed][0]))
    runs = {}
    for m in methods:
        for seed in range(seeds):
            d = os.path.join(s.out, "runs", f"{m}_s{seed}_it{it_steps}_{args.it_loss}")
            targs = ["train.py", "--data", qa_train, "--tokenizer", s.path("tokenizer.json"), "--arch", s.arch,
                     "--out-dir", d,
                     "--init-from", pre[m, seed][0], "--train", args.it_train, "--steps", str(it_steps),
                     "--save-every", str(it_steps), "--lr", str(args.it_lr), "--warmup",
                     str(min(10, max(1, it_steps // 10))),
                     "--batch-size", str(s.batch()), "--row-len", str(s.p["vlm"]["row_len"]), "--seed", str(seed),
                     "--device", s.device, "--resume"]
            targs += (["--loss", "prior", "--alpha", "1", "--scores", mask] if args.it_loss == "answer"
                      else ["--loss", "ntp"])
            runs[m, seed] = (d, targs)
    print(f"instruct ({s.mix}, {s.arch.upper()}-LVLM): {', '.join(methods)} x {seeds} seed(s); pre-trained "
          f"checkpoints: {len(pre) - len(pre_jobs)} from the "
          f"main job, {len(pre_jobs)} to train; instruction tuning {it_steps} steps of batch {s.batch()} at lr "
          f"{args.it_lr:g} ({args.it_train}, loss on "
          f"{'the answer' if args.it_loss == 'answer' else 'the whole text'}); "
          f"{qa_rows} test questions per kind")
    factor = 3 if args.it_train == "all" else 1  # a guess: every weight's gradient, not only the projector's
    print(s.estimate(it_steps * len(runs) * factor + s.steps() * len(pre_jobs), len(runs) + len(pre_jobs),
                     len(runs) + len(pre_jobs), extra_s=len(runs) * 2 * (1 if args.quick else 15),
                     note=f"; tuning steps counted x{factor}" + (" (all weights train)" if factor > 1 else "")
                     + "; ~15 s per checkpoint for the QA evaluation in this process"))
    if args.plan:
        return None
    # QA data: training scenes for tuning, test scenes for evaluation
    if not os.path.exists(qa_train):
        rows = qa.build_qa(os.path.join(s.data, "train.jsonl"), qa_train, per_scene=args.per_scene, seed=0,
                           max_scenes=64 if args.quick else 0)
        print(f"  {len(rows)} training questions from the scenes of train.jsonl")
    for k in kinds:
        if not os.path.exists(qa_test[k]):
            qa.build_qa(os.path.join(s.data, "test.jsonl"), qa_test[k], per_scene=0, seed=1, kinds=(k,))
    if args.it_loss == "answer" and not os.path.exists(mask):
        qa.answer_only_scores(qa_train, s.path("tokenizer.json"), mask)
    s.check_own([(os.path.dirname(ckpt), a) for a, name, ckpt in pre_jobs] + list(runs.values()))
    s.run_jobs([(a, name) for a, name, ckpt in pre_jobs if not os.path.exists(ckpt)],
               "pre-train (no main-job checkpoint)")
    s.run_jobs([(a, f"it_{m}_s{seed}") for (m, seed), (d, a) in runs.items()
                if not os.path.exists(os.path.join(d, f"ckpt_{it_steps:06d}.pt"))], "instruction tuning")
    s.run_jobs([(s.eval_args(d), f"eval_it_{m}_s{seed}") for (m, seed), (d, a) in runs.items()
                if not s.final_rows(d, it_steps)], "likelihood evaluation (probes, token NLL) after tuning")
    # pre-trained checkpoints of this command (not the main job's, which have eval.json already)
    s.run_jobs([(s.eval_args(d), f"eval_pre_{m}_s{seed}") for (m, seed), (c, d, step) in pre.items()
                if not s.final_rows(d, step)],
               "likelihood evaluation of the pre-trained checkpoints")

    # generated answers and the same questions by likelihood, before and after tuning
    import eval as E
    import qa_eval
    from caption import load
    from utils import pick_device
    device = pick_device(s.device)
    kind_of = {}
    for k in kinds:
        with open(qa_test[k]) as f:
            kind_of.update({json.loads(line)["id"]: k for line in f if line.strip()})
    results = {}  # (method, stage) -> bench -> {seed: value}
    print(f"[{time.strftime('%H:%M:%S')}] generated answers and multiple choice on {len(kinds)} x {qa_rows} "
          "test questions")
    for (m, seed), (d, _) in runs.items():
        for stage, ckpt in (("pre", pre[m, seed][0]), ("it", os.path.join(d, f"ckpt_{it_steps:06d}.pt"))):
            model, tok = load(ckpt, s.path("tokenizer.json"), device)
            res = results.setdefault((m, stage), {})
            preds = []
            for k in kinds:
                rows = qa_eval.qa_generate(model, tok, qa_test[k], device, max_rows=qa_rows, seed=0)
                preds += rows
                res.setdefault(f"em_{k}", {})[seed] = sum(r["correct"] for r in rows) / len(rows)
            res.setdefault("em_avg", {})[seed] = sum(res[f"em_{k}"][seed] for k in kinds) / len(kinds)
            mc = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(
                ckpt, mc_files=[qa_test[k] for k in kinds], device=device, max_rows=qa_rows, seed=0,
                tokenizer=s.path("tokenizer.json"))}
            for k in kinds:
                res.setdefault(f"mc_{k}", {})[seed] = mc[f"qa_{k}"]
            res.setdefault("mc_avg", {})[seed] = sum(mc[f"qa_{k}"] for k in kinds) / len(kinds)
            like = s.final_rows(d, it_steps) if stage == "it" else s.final_rows(*pre[m, seed][1:])
            for b in ("probe_avg", "nll_image", "gap_image"):
                if b in like:
                    res.setdefault(b, {})[seed] = like[b]
            with open(os.path.join(s.out, f"answers_{m}_s{seed}_{stage}.jsonl"), "w") as f:
                f.writelines(json.dumps({**r, "kind": kind_of.get(r["id"], "")}) + "\n" for r in preds)
    st = {key: {b: report.stats(v) for b, v in bs.items()} for key, bs in results.items()}
    benches = ([f"em_{k}" for k in kinds] + ["em_avg"] + [f"mc_{k}" for k in kinds]
               + ["mc_avg", "probe_avg", "nll_image", "gap_image"])
    cols = [(m, stage) for m in methods for stage in ("pre", "it") if (m, stage) in st]
    vs = {}
    if {"ntp", "prior"} <= set(methods):
        for stage in ("pre", "it"):
            vs[stage] = {b: report.compare(st["prior", stage][b], st["ntp", stage][b], b, "prior")
                         for b in benches if b in st.get(("prior", stage), {}) and b in st.get(("ntp", stage), {})}

    md = s.header("Instruction tuning and generated answers (issue 7, item 4)",
                  "A short instruction-tuning stage (the paper: 20 steps before its benchmarks) from each pre-trained "
                  "NTP and PRIOR checkpoint, on question-answer pairs made from the ground truth of the *training* "
                  "scenes (data/qa.py), then questions about the *test* scenes: exact match of the greedily "
                  "generated answer (KV-cached `model.generate`; `em_*`), and the same questions scored by "
                  "likelihood as multiple choice (`mc_*`), with eval.py's probes and token NLL of the same "
                  "checkpoints. \"pre\" = the pre-trained checkpoint before tuning, \"it\" = after.")
    n_train_q = sum(1 for _ in open(qa_train))
    chance = {}
    for k in kinds:
        with open(qa_test[k]) as f:
            inv = [1 / len(json.loads(line)["choices"]) for line in f if line.strip()]
        chance[k] = sum(inv) / len(inv)
    md += [f"- pre-trained: {', '.join(sorted({os.path.relpath(d, s.src) for c, d, _ in pre.values()}))}",
           f"- tuning: {n_train_q} questions from train.jsonl's scenes ({args.per_scene} per scene), {it_steps} "
           f"steps of batch {s.batch()}, lr {args.it_lr:g} (warm-up, then cosine), `--train {args.it_train}`, loss on "
           + ("the answer tokens and <|eos|> only (`--loss prior` with p_ref 1 on the question, 0 on the answer: "
              "data/qa.answer_only_scores)" if args.it_loss == "answer"
              else "the whole question-and-answer text (NTP)"),
           f"- test: {qa_rows} questions per kind ({', '.join(kinds)}) from test.jsonl's scenes (a fixed random "
           f"subset of each kind's file), the same for generation and multiple choice; chance for `mc_*` (1 / "
           f"choices): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()),
           f"- exact match: after lower-casing, collapsing spaces and stripping end punctuation; greedy decoding, "
           f"at most 8 new tokens, stops at <|eos|>",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", "",
           "## Mean ± sample std over seeds", ""]
    head = ["benchmark"] + [f"{m.upper()} {stage} (n={st[m, stage]['em_avg']['n']})" for m, stage in cols]
    if "it" in vs:
        head += ["PRIOR − NTP after tuning", "relative"]
    rows = []
    for b in benches:
        if not any(b in st[c] for c in cols):
            continue
        r = [f"`{b}` {'↓' if report.lower_better(b) else '↑'}"] + [report.pm(st[c].get(b)) for c in cols]
        if "it" in vs:
            c = vs["it"].get(b)
            r += [report.fmt(c["diff"], sign=True) + (" *" if c["clear"] else ""),
                  report.fmt(c["rel"], pct=True)] if c else ["–", "–"]
        rows.append(r)
    md += table(head, rows)
    md += ["",
           "* = |difference| > 2 Welch standard errors. Every answer is in answers_<method>_s<seed>_<pre|it>.jsonl.",
           ""]

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(kinds) + 1)
    for ax, pre_b in zip(axes, ("em", "mc")):
        names = [f"{pre_b}_{k}" for k in kinds] + [f"{pre_b}_avg"]
        w = 0.8 / max(1, len(cols))
        for i, c in enumerate(cols):
            mean = [st[c][b]["mean"] for b in names]
            std = [st[c][b]["std"] for b in names]
            ax.bar(x + (i - (len(cols) - 1) / 2) * w, mean, w, yerr=std, capsize=3,
                   color={"ntp": "tab:gray", "prior": "tab:orange"}.get(c[0]), alpha=0.45 if c[1] == "pre" else 0.9,
                   label=f"{c[0].upper()} {'before' if c[1] == 'pre' else 'after'} tuning")
        ax.set_xticks(x, list(kinds) + ["average"])
        ax.set_ylim(0, 1)
        ax.set_title("exact match of the generated answer" if pre_b == "em" else "multiple choice by likelihood")
        ax.legend(fontsize=7)
    fig.suptitle(f"questions about test scenes ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over {seeds} seeds)",
                 fontsize=10)
    fig.tight_layout()
    png = os.path.join(s.out, "instruct.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md += ["![instruct](instruct.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "stats": {f"{m}/{stage}": v for (m, stage), v in st.items()}, "prior_vs_ntp": vs, "it_steps": it_steps,
        "it_lr": args.it_lr, "it_loss": args.it_loss, "it_train": args.it_train, "qa_rows": qa_rows, "seeds": seeds,
        "pretrained": {f"{m}/s{sd}": c for (m, sd), (c, d, _) in pre.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out


# ============================================================================= baselines (Table 1)
def baseline_arms(attn_scores):
    """(key, label, train.py flags) of each baseline; each replaces --loss (and adds an --objective) in the main
    job's recipe. ITM, ITC and reconstruction are added to NTP, as the paper combines them."""
    return [("rare", "rare-word weighting", ["--loss", "rare"]),
            ("attn", "attention weighting", ["--loss", "attn", "--attn-scores", attn_scores]),
            ("itm", "NTP + ITM", ["--loss", "ntp", "--objective", "itm"]),
            ("itc", "NTP + ITC", ["--loss", "ntp", "--objective", "itc"]),
            ("recon", "NTP + reconstruction", ["--loss", "ntp", "--objective", "recon", "--feature-cache", ""]),
            ("rho1", "Rho-1 (not in the paper)", ["--loss", "rho1"]),
            ("cal", "CAL (not in the paper)", ["--loss", "cal"])]


def weight_relevance(s, score_file, attention):
    """Mean token weight by ground-truth word kind and image-vs-rest ROC-AUC of a score file on the training
    captions: w = 1 - p_ref for PRIOR's file, the stored weight for the attention scorer's."""
    import tokenizer as T
    from data.records import read_records
    from score import relevance_report
    from data.scores import load_scores
    from data.tags import token_tags
    from utils import text_fingerprint
    data = os.path.join(s.data, "train.jsonl")
    tok = T.load_tokenizer(s.path("tokenizer.json"))
    records = read_records(data, check_files=False)
    stored = load_scores(score_file, T.fingerprint(tok), text_fingerprint(records), data)
    tags = token_tags(tok, records)
    if tags is None:
        return None
    values = [1 - stored[r.id].float() if attention else stored[r.id].float() for r in records]
    return relevance_report(values, tags)  # it takes p_ref: 1 - attention weight gives w = attention weight


def baselines(args):
    from experiments import report
    t0 = time.time()
    s = Setup(args, "baselines")
    chosen, steps, seeds = s.lrs(), s.steps(), args.seeds or (1 if args.quick else s.p["seeds"])
    attn_scores = os.path.join(s.out, "attn_scores_train.pt")
    wanted = [k for k in args.arms.split(",") if k]
    arms = [a for a in baseline_arms(attn_scores) if a[0] in wanted]
    unknown = set(wanted) - {a[0] for a in baseline_arms("")}
    if unknown:
        raise SystemExit(f"paper.py baselines: unknown --arms {sorted(unknown)}; choose from "
                         f"{[a[0] for a in baseline_arms('')]}")
    grid = [float(x) for x in args.lrs.split(",")] if args.lrs else \
        ([chosen["ntp"]] if args.quick or args.lr else list(s.p["lrs"][s.arch]))
    if args.lr:
        grid = [args.lr]

    def run_dir(key, lr, seed):
        return os.path.join(s.out, "runs", s.mix, s.arch, f"{key}_lr{lr:g}_s{seed}_steps{steps}")

    # the main job's NTP, PRIOR and oracle runs are the reference rows; trained here only when missing
    refs = [(loss, {"ntp": "NTP", "prior": "PRIOR", "oracle": "oracle (ground-truth weights)"}[loss])
            for loss in ("ntp", "prior", "oracle") if loss in chosen]
    ref_plan, reused = [], {}
    for loss, _ in refs:
        for seed in range(seeds):
            d = run_dir(loss, chosen[loss], seed)
            targs = s.train_args(loss, chosen[loss], seed, d)
            main = None if args.quick else s.main_run(loss, chosen[loss], seed)
            if main and s.final_rows(main, steps) and s.same_run(main, targs):
                reused[loss, seed] = main
            else:
                ref_plan.append((loss, seed, d, targs))
    grid_plan = [(k, lr, run_dir(k, lr, 0), s.train_args("ntp", lr, 0, run_dir(k, lr, 0), extra=flags))
                 for k, _, flags in arms for lr in grid]
    n_more = len(arms) * (seeds - 1)
    print(f"baselines ({s.mix}, {s.arch.upper()}-LVLM): {len(arms)} baselines; lr grid {grid} at seed 0 "
          f"({len(grid_plan)} runs, chosen on the validation probes), then seeds 1-{seeds - 1} at each one's "
          f"chosen lr ({n_more} runs); NTP/PRIOR/oracle: {len(reused)} main-job runs reused, {len(ref_plan)} to run")
    print(s.estimate(steps * (len(grid_plan) + n_more + len(ref_plan)) * 1.4, len(grid_plan) + n_more + len(ref_plan),
                     2 * len(grid_plan) + n_more + len(ref_plan),
                     extra_s=0 if "attn" not in wanted or os.path.exists(attn_scores) else 540 / (os.cpu_count() or 1),
                     note=" x1.4 for the baselines' extra forwards (objectives.py's measured costs); the attention "
                          "scorer: 535 s on one thread of our 2-core CPU at the cpu preset (measured), here "
                          "on every core"))
    if args.plan:
        return None
    s.check_own([(d, a) for *_, d, a in grid_plan] + [(d, a) for *_, d, a in ref_plan])

    # 1. the attention-weighting baseline's scorer (the paper: CLIP's attention; ours: a small contrastive model
    #    on the same captions, its image side the main job's ViT)
    if "attn" in wanted and not os.path.exists(attn_scores):
        s.run_jobs([(["objectives.py", "--data", os.path.join(s.data, "train.jsonl"), "--tokenizer",
                      s.path("tokenizer.json"), "--init-encoder", s.path("vit.pt"), "--device", s.device,
                      "--out", attn_scores, *(["--steps", "3", "--batch-size", "8"] if args.quick else [])],
                     "attn_scorer")], "attention scorer")
    # 2. the lr grid at seed 0, each final checkpoint evaluated on the validation probes and captions
    last = f"ckpt_{steps:06d}.pt"
    s.run_jobs([(a, f"train_{k}_lr{lr:g}_s0") for k, lr, d, a in grid_plan
                if not os.path.exists(os.path.join(d, last))], "lr grid")
    val_jobs = []
    for k, lr, d, _ in grid_plan:
        v = d + "_val"
        os.makedirs(v, exist_ok=True)
        if not os.path.exists(os.path.join(v, last)):
            os.link(os.path.join(d, last), os.path.join(v, last))
        if not s.final_rows(v, steps):
            val_jobs.append((s.eval_args(v, probes=os.path.join(s.data, "probes_val"),
                                         test=os.path.join(s.data, "val.jsonl"), test_scores=False),
                             f"eval_{k}_lr{lr:g}_val"))
    s.run_jobs(val_jobs, "evaluate the lr grid on validation probes")
    val, lr_of = {}, {}
    for k, lr, d, _ in grid_plan:
        f = s.final_rows(d + "_val", steps)
        val.setdefault(k, {})[lr] = f
    for k in val:  # best validation probe average, ties to the lower image NLL (one seed; main.py's
        # protocol scores probe_cc_avg over 2 seeds and extends the grid at its edges: docs/experiment.md)
        lr_of[k] = max(val[k],
                       key=lambda lr: (round(val[k][lr].get("probe_avg", -1), 6), -val[k][lr].get("nll_image", 0)))
    # 3. the other seeds at each baseline's chosen lr, and any missing reference run
    flags_of = {k: f for k, _, f in arms}
    seed_plan = [(k, sd, run_dir(k, lr_of[k], sd), s.train_args("ntp", lr_of[k], sd, run_dir(k, lr_of[k], sd),
                                                               extra=flags_of[k]))
                 for k, _, _ in arms for sd in range(1, seeds)]
    s.check_own([(d, a) for *_, d, a in seed_plan])
    s.run_jobs([(a, f"train_{k}_s{sd}") for k, sd, d, a in seed_plan + ref_plan
                if not os.path.exists(os.path.join(d, last))], "train the other seeds")
    runs = {(k, 0): run_dir(k, lr_of[k], 0) for k, _, _ in arms}
    runs.update({(k, sd): d for k, sd, d, _ in seed_plan + ref_plan})
    runs.update(reused)
    s.run_jobs([(s.eval_args(d), f"eval_{k}_s{sd}") for (k, sd), d in sorted(runs.items())
                if not s.final_rows(d, steps)], "evaluate on the test probes")

    values = {}
    for (k, sd), d in runs.items():
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[sd] = v
    st = {k: {b: report.stats(v) for b, v in bs.items()} for k, bs in values.items()}
    vs = {k: {b: report.compare(st[k][b], st["ntp"][b], b, "prior") for b in st[k] if b in st["ntp"]}
          for k in st if k != "ntp"}
    labels = {**dict(refs), **{k: lab for k, lab, _ in arms}}
    keys = [k for k in [r for r, _ in refs] + [a[0] for a in arms] if k in st]
    lr_used = {**{k: chosen[k] for k, _ in refs}, **lr_of}
    relevance = {}
    if not args.quick or os.path.exists(attn_scores):
        relevance["PRIOR: w = 1 - p_ref"] = weight_relevance(s, s.path(f"scores_{s.mix}_train.pt"), False)
        if os.path.exists(attn_scores):
            relevance["attention weighting"] = weight_relevance(s, attn_scores, True)

    md = s.header("Baselines (the paper's Table 1) and two related token-selection methods",
                  "Each baseline in the main job's recipe (same data, initialisation, steps and batch; H-LVLM: "
                  "only the projector trains), next to the main job's NTP, PRIOR and oracle runs. Every baseline "
                  "gets its own learning rate from the main job's lr grid, chosen at seed 0 by the validation "
                  "probes as the main job chooses NTP's and PRIOR's; the final checkpoint is evaluated on the "
                  "test probes and captions as the main job evaluates.")
    md += [f"- {steps} steps of batch {s.batch()}, seeds 0-{seeds - 1}; eval rows per probe file / test captions: "
           f"{s.eval_rows or 'all'}; wall time of this command: {(time.time() - t0) / 60:.1f} min",
           "- reused main-job runs: "
           f"{', '.join(sorted({os.path.relpath(d, s.src) for d in reused.values()})) or 'none'}",
           "", "## Mean ± sample std over seeds (final step); change vs NTP", "",
           "Relative change vs NTP, positive = better; * = |difference| > 2 Welch standard errors (clear).", ""]
    show = [b for b in ("probe_avg", "presence", "colour", "count", "position", "retrieval", "nll_image",
                        "gap_image", "nll_boiler") if b in st.get("ntp", {})]
    head = (["method", "lr", "n"] + [f"`{b}` {'↓' if report.lower_better(b) else '↑'}" for b in show]
            + ["`probe_avg` vs NTP", "`nll_image` vs NTP"])
    rows = []
    for k in keys:
        row = [labels[k], f"{lr_used[k]:g}", str(st[k][show[0]]["n"]) if show else "0"]
        row += [report.pm(st[k].get(b)) for b in show]
        for b in ("probe_avg", "nll_image"):
            c = vs.get(k, {}).get(b)
            row.append("–" if c is None else report.fmt(c["rel"], pct=True) + (" *" if c["clear"] else ""))
        rows.append(row)
    md += table(head, rows)
    md += ["", "## Learning-rate grid (seed 0, validation probes and captions, final step)", ""]
    md += table(["method"] + [f"lr {lr:g}: `probe_avg` / `nll_image`" for lr in grid] + ["chosen"],
                [[labels[k]] + [f"{val[k][lr].get('probe_avg', float('nan')):.3f} / "
                                f"{val[k][lr].get('nll_image', float('nan')):.3f}"
                                for lr in grid] + [f"{lr_of[k]:g}"] for k in val])
    if relevance:
        md += ["", "## How well each weighting finds the image words (training captions, ground-truth tags)", ""]
        md += table(["weights", "mean w: image", "boiler", "noise", "AUC image vs boiler", "image vs noise",
                     "image vs rest"],
                    [[name, *(report.fmt(r["mean_w"][c]) for c in ("image", "boiler", "noise")),
                      *(report.fmt(r["auc"][a]) for a in ("image_vs_boiler", "image_vs_noise", "image_vs_rest"))]
                     for name, r in relevance.items() if r])
    md += ["", "`probe_avg`: mean accuracy over the probe groups (chance 0.5 for presence, 0.25 for the others); "
           "`nll_image` / `nll_boiler`: NLL of image-related / boilerplate caption words with the true image; "
           "`gap_image`: NLL with another image minus with the true one. Every benchmark is in results.json.", ""]
    png = os.path.join(s.out, "baselines.png")
    bar_plot(st, keys, labels, [b for b in ("probe_avg", "nll_image", "gap_image") if b in st.get("ntp", {})],
             {"ntp": "tab:gray", "prior": "tab:orange", "oracle": "tab:green"}, "tab:blue",
             f"Baselines ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over {seeds} seeds)", png)
    md += ["![baselines](baselines.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "arms": [{"key": k, "label": labels[k], "lr": lr_used[k],
                  "flags": flags_of.get(k, ["--loss", k])} for k in keys],
        "steps": steps, "seeds": seeds, "stats": st, "vs_ntp": vs, "lr_grid": {k: {f"{lr:g}": v for lr, v in g.items()}
                                                                              for k, g in val.items()},
        "chosen_lr": lr_of, "relevance": relevance, "reused": {f"{k}/s{sd}": d for (k, sd), d in reused.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out


# ============================================================================= command line
def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--from", dest="from_dir", default="out", help="the main job's output folder (default: out)")
        sp.add_argument("--out", default="", help="where to write (default: <from>/paper/<command>)")
        sp.add_argument("--mix", default="", help="caption mix (default: the main job's first)")
        sp.add_argument("--arch", default="h", choices=["h", "u"], help="model family (default: h)")
        sp.add_argument("--seeds", type=int, default=0, help="seeds per arm (0 = the command's default)")
        sp.add_argument("--steps", type=int, default=0, help="training steps (0 = the preset's; --quick: 2)")
        sp.add_argument("--batch-size", type=int, default=0, help="samples per step (0 = the preset's)")
        sp.add_argument("--lr", type=float, default=0, help="one learning rate for every arm (0 = chosen_lrs.json)")
        sp.add_argument("--eval-rows", type=int, default=None,
                        help="rows per probe file and test captions (default: the preset's; --quick: 8)")
        sp.add_argument("--parallel", type=int, default=0,
                        help="runs at once (0 = the main job's; 1 = in this process, what --quick uses)")
        sp.add_argument("--device", default="", help="auto, cpu or cuda (default: the main job's)")
        sp.add_argument("--quick", action="store_true",
                        help="a seconds-long end-to-end check with tiny settings (tests)")
        sp.add_argument("--plan", action="store_true", help="print what would run and the time estimate, then stop")
        return sp

    a = common(sub.add_parser("ablation", help="Fig. 5: PRIOR's alpha and the factor k, next to NTP"))
    a.add_argument("--alphas", default="0.5,1,2,4", help="PRIOR exponents (default: the paper's 0.5,1,2,4)")
    a.add_argument("--no-reuse", action="store_true",
                   help="train NTP and PRIOR alpha 1 here too, not reuse the main job's runs")
    sc = common(sub.add_parser("scaling", help="Figs. 6-7: power-law fits over data size"))
    sc.add_argument("--sizes", default="",
                    help="subset sizes in records, comma-separated (default: 6 log-spaced over 10x up to all)")
    sc.add_argument("--epochs", type=float, default=1.0, help="passes over each subset (default 1: D = data size)")
    sc.add_argument("--methods", default="ntp,prior")
    sc.add_argument("--targets", default="probe_avg,nll_image",
                    help="benchmarks to fit (positive values; default: probe_avg,nll_image)")
    bl = common(sub.add_parser("baselines", help="Table 1: the paper's baselines, Rho-1 and CAL, each at its best lr"))
    bl.add_argument("--arms", default="rare,attn,itm,itc,recon,rho1,cal", help="baselines to run (default: all)")
    bl.add_argument("--lrs", default="",
                    help="lr grid for the baselines, comma-separated (default: the preset's, the main job's grid)")
    it = common(sub.add_parser("instruct", help="instruction tuning on scene QA, generated-answer exact match"))
    it.add_argument("--methods", default="ntp,prior")
    it.add_argument("--it-steps", type=int, default=0,
                    help="instruction-tuning steps (0 = 100; the paper: 20; --quick: 3)")
    it.add_argument("--it-lr", type=float, default=1e-3, help="instruction-tuning peak lr")
    it.add_argument("--it-train", default="all", choices=["all", "projector"], help="what tunes (default: all weights)")
    it.add_argument("--it-loss", default="answer", choices=["answer", "all"],
                    help="loss on the answer only (default) or the whole text")
    it.add_argument("--per-scene", type=int, default=2, help="training questions per training scene")
    it.add_argument("--qa-rows", type=int, default=0, help="test questions per kind (0 = 100; --quick: 8)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    return {"ablation": ablation, "baselines": baselines, "scaling": scaling, "instruct": instruct}[args.command](args)


if __name__ == "__main__":
    main()
