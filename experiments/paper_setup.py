"""The main job's artefacts for experiments/paper.py's commands: Setup reads what the main job (experiments/main.py)
left in --from, builds train.py / eval.py configs in its recipe and runs them as jobs (experiments/jobs.py); and
the report helpers every command shares (tables, bar plots, JSON).
"""
import contextlib
import json
import os
import re
import time
from dataclasses import asdict, replace

import numpy as np

from eval import EvalConfig
from experiments.jobs import Jobs, checked


# ============================================================================= the main job's artefacts
class Setup:
    """What the main job left in --from, and a runner for train.py / eval.py / score.py jobs."""

    def __init__(self, args, command):
        from utils import from_dict
        from experiments.experiment import Experiment, ExperimentConfig
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
        self.jobs = Jobs(os.path.join(self.out, "logs"), self.parallel, in_process=self.parallel == 1)
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

    def train_config(self, loss, lr, seed, out_dir, steps=None, changes=None):
        """The main job's train.TrainConfig for this run (same data, initialisation, recipe) at this command's
        steps and batch, with `changes` ({field: value} of train.py's, e.g. another loss) last."""
        steps = steps or self.steps()
        cfg = self.exp.train_config(self.mix, self.arch, loss, lr, seed, out_dir)
        return replace(cfg, **{"steps": steps, "save_every": steps, "batch_size": self.batch(),
                               "warmup": self.warmup(steps), **(changes or {})})

    def warmup(self, steps):
        """The preset's warm-up share of the run (its exact warm-up at its own number of steps)."""
        v = self.p["vlm"]
        return max(1, round(v["warmup"] * steps / v["steps"]))

    def same_run(self, run_dir, cfg):
        """Whether run_dir's train.py config equals the train.TrainConfig cfg (all but where it is written,
        how it runs and how often it saves): then its results can stand for this run."""
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
        want = asdict(checked(cfg))  # the fields, as config.json holds them
        default = asdict(type(cfg)())  # a flag newer than the run: its default is what ran
        skip = {"out_dir", "resume", "overwrite", "device", "threads", "workers", "image_cache", "feature_cache",
                "stop_at", "save_every", "compile", "fsdp", "micro_batch"}
        return all(have.get(k, default[k]) == v for k, v in want.items() if k not in skip)

    def eval_config(self, run_dir, rows=None, test_scores=True, probes=None, test=None):
        """eval.EvalConfig on the test probes and captions (or the given ones: the validation split for an lr
        grid)."""
        scores = self.path(f"scores_{self.mix}_test.pt")
        return EvalConfig(run_dir=run_dir, max_rows=self.eval_rows if rows is None else rows, device=self.device,
                          probes=probes or os.path.join(self.data, "probes"),
                          test=test or os.path.join(self.data, "test.jsonl"),
                          test_scores=scores if test_scores and os.path.exists(scores) else "")

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
        """Run [((config, module), log name)] --parallel at a time: subprocesses with cpu_count // parallel threads
        each, or, with --parallel 1, in this process (no start-up cost; what --quick does)."""
        if not jobs:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {title}: {len(jobs)} jobs", flush=True)
        # fewer jobs than --parallel (e.g. one scorer to train): each gets a larger share of the cores
        threads = max(1, (os.cpu_count() or 2) // min(self.parallel, len(jobs)))
        self.jobs.run_chains(jobs, threads)

    def check_own(self, planned):
        """Refuse to reuse a run folder of ours that holds a run with other settings (e.g. after a change of
        the preset or of this script): its checkpoint would be taken as finished."""
        for run_dir, cfg in planned:
            if os.path.exists(os.path.join(run_dir, "config.json")) and not self.same_run(run_dir, cfg):
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
    from experiments.reporting import lower_better
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
