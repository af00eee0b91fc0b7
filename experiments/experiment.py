"""The main job's machinery: its presets and config, and Experiment, which runs every stage (data -> tokenizer ->
reference LM -> scores -> pretrained LM and ViT -> lr grids -> main runs -> evaluation) through experiments/jobs.py.
The command and the design are in main.py's docstring; docs/experiment.md explains each choice.
"""
import json
import os
import shutil
import time
from dataclasses import dataclass

from experiments.jobs import Jobs
from lib.cli import flag

# Sizes per preset. "cpu" is sized for a 2-core laptop CPU (docs/performance.md has its measured time); "smoke"
# exercises every stage in miniature; "gpu" is a starting point for GPUs.
PRESETS = {
    "smoke": dict(
        data=dict(n_ref=600, n_text=600, n_label=200, n_train=400, n_val=50, n_test=60, n_probe=24, n_probe_val=12),
        vocab=512, lm=dict(n_layer=1, n_head=2, d_model=32, steps=30, batch_rows=4, row_len=128, lr=3e-3, warmup=5),
        base_lm=dict(steps=40),
        vit=dict(steps=20, batch_size=32, patch_size=16), seeds=2, lrs={"h": [3e-3], "u": [3e-3]},
        vlm=dict(steps=6, batch_size=8, save_every=3, warmup=2, row_len=128, patch_size=16), stage1_steps=4,
        eval_rows=24, settings="web:h,web:u", grid_seeds=1, extend=0, oracle_lows=[0.1]),
    # 48 px scenes on a 3x3 grid, 16 px patches: one image token per grid cell (9 for the H-LVLM's ViT,
    # 14 with the U-LVLM's row markers), so a caption, not the image, is most of a sequence.
    "cpu": dict(
        data=dict(n_ref=10000, n_text=10000, n_label=3000, n_train=8000, n_val=300, n_test=600, n_probe=300,
                  n_probe_val=200),
        vocab=1024, lm=dict(n_layer=4, n_head=4, d_model=128, steps=300, batch_rows=8, row_len=256, lr=3e-3, warmup=30),
        base_lm=dict(steps=1200),
        vit=dict(steps=300, batch_size=64, patch_size=16), seeds=5,
        lrs={"h": [1e-3, 3e-3, 1e-2], "u": [3e-4, 1e-3, 3e-3]},
        vlm=dict(steps=200, batch_size=32, save_every=100, warmup=10, row_len=256, patch_size=16), stage1_steps=600,
        eval_rows=200, settings="web:h,hard:h", grid_seeds=2, extend=2, oracle_lows=[0.1, 0.3]),
    "gpu": dict(
        data=dict(n_ref=100000, n_text=100000, n_label=20000, n_train=100000, n_val=1000, n_test=2000, n_probe=1000,
                  n_probe_val=500),
        vocab=2048,
        lm=dict(n_layer=8, n_head=8, d_model=512, steps=3000, batch_rows=64, row_len=512, lr=1e-3, warmup=200),
        base_lm=dict(steps=10000),
        vit=dict(steps=3000, batch_size=256, patch_size=16), seeds=3,
        lrs={"h": [3e-4, 1e-3, 3e-3], "u": [1e-4, 3e-4, 1e-3]},
        # row_len 192: the longest web sample is 14 image tokens + <= 72 caption tokens, the hard mix's captions
        # (with titles) run longer; 1024 computed ~46x the attention the captions need (docs/gpu.md)
        vlm=dict(steps=2000, batch_size=256, save_every=200, warmup=60, row_len=192, patch_size=16), stage1_steps=500,
        eval_rows=0, settings="web:h,hard:h,noisy:h,web:u,hard:u", grid_seeds=2, extend=2, oracle_lows=[0.1, 0.3]),
}


@dataclass
class ExperimentConfig:
    out: str = flag("out", "output folder: data, models, runs, results.md")
    preset: str = flag("cpu", "sizes: smoke, cpu or gpu (see PRESETS)", list(PRESETS))
    stage: str = flag("all", "prepare = data, tokenizer, reference LM, scores; all = everything", ["prepare", "all"])
    settings: str = flag("", "mix:family pairs to compare ('' = the preset's), e.g. web:h,hard:u")
    arms: str = flag("ntp,prior,prior_shuffled,oracle", "arms of the comparison (train.py losses)")
    tune: str = flag("ntp,prior,oracle", "arms whose lr is chosen on validation; others borrow")
    seeds: int = flag(0, "paired seeds per arm (0 = the preset's)")
    parallel: int = flag(2, "jobs at once (each with cpu_threads // parallel threads)")
    nproc: int = flag(1, "processes per training run, under torchrun (e.g. the GPU count)")
    device: str = flag("auto", "auto, cpu or cuda")
    seed: int = flag(0, "data-generation seed")


class Experiment:
    def __init__(self, cfg):
        self.cfg, self.p = cfg, PRESETS[cfg.preset]
        self.out = os.path.abspath(cfg.out)
        self.settings = [tuple(x.split(":")) for x in (cfg.settings or self.p["settings"]).split(",")]
        bad = [x for x in self.settings if len(x) != 2 or x[1] not in ("h", "u")]
        if bad:
            raise SystemExit(f"--settings: expected mix:family pairs like web:h,hard:u (family h or u), got {bad}")
        self.mixes = list(dict.fromkeys(m for m, _ in self.settings))  # in order, once each
        self.log = open(os.path.join(self._mk(self.out), "experiment.log"), "a")
        self.jobs = Jobs(self.path("logs"), cfg.parallel, cfg.nproc, record=self.log)

    def _mk(self, path):
        os.makedirs(path, exist_ok=True)
        return path

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    @staticmethod
    def flags(d):
        return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]

    # ---- stages 1-4: data and the pretrained pieces -------------------------------------------------------
    def prepare(self, with_pretrain=False):
        for mix in self.mixes:
            data = self.path(f"data_{mix}")
            if not os.path.exists(os.path.join(data, "meta.json")):
                step(f"data ({mix} mix)")
                self.jobs.run(["-m", "data.generate", "--out", data, "--mix", mix, "--seed", str(self.cfg.seed),
                               *self.flags(self.p["data"])], f"data_{mix}", threads=1)
        tok = self.path("tokenizer.json")
        if not os.path.exists(tok):
            step("tokenizer")
            files = ",".join(self.path(f"data_{m}", f) for m in self.mixes for f in ("text.jsonl", "train.jsonl"))
            self.jobs.run(["-m", "data.tokenizer", "--data", files, "--out", tok, "--vocab-size", str(self.p["vocab"])],
                          "tokenizer")
        # Everything after the tokenizer runs as chains of jobs in one pool (a chain's jobs in order):
        # per mix, the reference LM and then its scores; with --stage all also the base LM and then the
        # U-LVLM's stage 1, and the ViT. The base-LM chain is the longest, so it starts first.
        lm = self.flags(self.p["lm"]) + ["--tokenizer", tok, "--device", self.cfg.device]
        chains, reports = [], []
        for mix in self.mixes:
            chain = []
            if not os.path.exists(self.path(f"ref_lm_{mix}.pt")):
                chain.append((["reference_lm.py", "--data", self.path(f"data_{mix}", "ref.jsonl"),
                               "--out", self.path(f"ref_lm_{mix}.pt"), *lm], f"ref_lm_{mix}"))
            for split in ("train", "test"):
                out = self.path(f"scores_{mix}_{split}.pt")
                if not os.path.exists(out):
                    chain.append((["score.py", "--ref", self.path(f"ref_lm_{mix}.pt"), "--tokenizer", tok,
                                   "--data", self.path(f"data_{mix}", f"{split}.jsonl"), "--out", out,
                                   "--device", self.cfg.device], f"score_{mix}_{split}"))
                    if split == "train":
                        reports.append((mix, f"score_{mix}_{split}"))
            chains.append(chain)
        names = ["reference LM and scores per mix"]
        if with_pretrain:
            chains = self.pretrain_chains() + chains
            names += ["base LM", "vision encoder"] + (["U-LVLM stage 1"] if "u" in self.archs else [])
        chains = [c for c in chains if c]
        step(", ".join(names) + (" (done)" if not chains else ""))
        self.parallel(chains)
        for mix, name in reports:
            print(f"  relevance report ({mix} mix, weights of the training captions):")
            for line in open(self.path("logs", name + ".log")):
                if line.startswith(("scored", "mean weight", "ROC-AUC", "share predicted")):
                    print("   ", line.rstrip())

    def pretrain_chains(self):
        """[base LM, then the U-LVLM's stage 1] and [ViT]. The base LM (text-only documents of every mix; a
        separate run from the reference LM) trains longer than the reference LM: the frozen LM of the H-LVLM
        has to have learned to use what its context says about a scene, or no projector can make it read an
        image. Stage 1 (the paper's 500 ImageNet steps) teaches the encoder-free U-LVLM to see, on short labels."""
        lm_chain, vit_chain = [], []
        if not os.path.exists(self.path("base_lm.pt")):
            text = ",".join(self.path(f"data_{m}", "text.jsonl") for m in self.mixes)
            base = {**self.p["lm"], **self.p["base_lm"]}
            lm_chain.append((["reference_lm.py", "--data", text, "--out", self.path("base_lm.pt"), "--seed", "1",
                              *self.flags(base), "--tokenizer", self.path("tokenizer.json"),
                              "--device", self.cfg.device], "base_lm"))
        for mix in self.mixes:
            if "u" in self.archs_for(mix) and not os.path.exists(self.stage1_ckpt(mix)):
                v = {**self.p["vlm"], "steps": self.p["stage1_steps"], "save_every": self.p["stage1_steps"]}
                lm_chain.append((["train.py", "--data", self.path(f"data_{mix}", "label.jsonl"), "--arch", "u",
                                  "--tokenizer", self.path("tokenizer.json"), "--init-decoder", self.path("base_lm.pt"),
                                  "--out-dir", os.path.dirname(self.stage1_ckpt(mix)), "--lr", "1e-3", "--device",
                                  self.cfg.device, "--resume", "--overwrite", *self.flags(v)], f"u_stage1_{mix}"))
        if "h" in self.archs and not os.path.exists(self.path("vit.pt")):
            vit_chain.append((["-m", "tools.vision", "--data", self.path(f"data_{self.mixes[0]}", "label.jsonl"),
                               "--out", self.path("vit.pt"), "--device", self.cfg.device,
                               *self.flags(self.p["vit"])], "vit"))
        return [lm_chain, vit_chain]

    # ---- stages 5-8: the VLM runs ---------------------------------------------------------------------------
    @property
    def archs(self):
        return list(dict.fromkeys(a for _, a in self.settings))

    def archs_for(self, mix):
        return [a for m, a in self.settings if m == mix]

    def train_args(self, mix, arch, loss, lr, seed, out_dir, low=None):
        data = self.path(f"data_{mix}")
        v = self.p["vlm"]
        args = ["train.py", "--data", os.path.join(data, "train.jsonl"), "--tokenizer", self.path("tokenizer.json"),
                "--scores", self.path(f"scores_{mix}_train.pt"), "--out-dir", out_dir, "--arch", arch,
                "--loss", loss, "--lr", str(lr), "--seed", str(seed), "--device", self.cfg.device,
                "--init-decoder", self.path("base_lm.pt"), "--resume", "--overwrite", *self.flags(v)]
        if low is not None:
            args += ["--oracle-low", str(low)]
        if arch == "h":  # the paper's H-LVLM: pretrained, frozen encoder and LM; only the projector trains (its
            # frozen ViT's features are computed once per image set and shared by every run: --feature-cache)
            args += ["--init-encoder", self.path("vit.pt"), "--train", "projector",
                     "--feature-cache", self.path("features")]
        else:  # the paper's U-LVLM: starts from stage 1, all weights train, captions mixed 1:1 with text
            args += ["--init-from", self.stage1_ckpt(mix), "--text-data", os.path.join(data, "text.jsonl")]
        return args

    def stage1_ckpt(self, mix):
        return self.path("runs", mix, "u_stage1", f"ckpt_{self.p['stage1_steps']:06d}.pt")

    def estimate(self):
        """How many training runs the design makes before any grid extension."""
        arms, tune = self.arms(), [a for a in self.cfg.tune.split(",") if a in self.arms()]
        seeds, g = self.cfg.seeds or self.p["seeds"], self.p["grid_seeds"]
        grid = sum(len(self.p["lrs"][a]) * g * len(tune) for _, a in self.settings)
        lows = g * (len(self.p["oracle_lows"]) - 1) * len(self.settings) if "oracle" in tune else 0
        main = len(self.settings) * (len(arms) * seeds - len(tune) * min(g, seeds))
        return (f"estimate: {grid} lr-grid runs + {lows} oracle low-weight runs + {main} more main runs (grid "
                f"extensions add 2 runs each), {self.p['vlm']['steps']} steps each; the time per run is printed "
                f"as runs finish. Re-running skips finished stages and runs.")

    def arms(self):
        return self.cfg.arms.split(",")

    def run_dir(self, mix, arch, loss, lr, seed, low=None):
        suffix = "" if low is None or low == self.p["oracle_lows"][0] else f"_low{low:g}"
        return self.path("runs", mix, arch, f"{loss}_lr{lr:g}_s{seed}{suffix}")

    def finished(self, run_dir):
        return os.path.exists(os.path.join(run_dir, f"ckpt_{self.p['vlm']['steps']:06d}.pt"))

    def eval_args(self, run_dir, mix, split, arch):
        """eval.py on the validation probes and captions (final checkpoint, into <run>_val/) or on the test
        probes and captions (every checkpoint, into <run>/eval.json)."""
        data = self.path(f"data_{mix}")
        args = ["eval.py", "--run-dir", run_dir, "--max-rows", str(self.p["eval_rows"]), "--device", self.cfg.device]
        if arch == "h":
            args += ["--feature-cache", self.path("features")]
        if split == "val":
            return args + ["--probes", os.path.join(data, "probes_val"), "--test", os.path.join(data, "val.jsonl")]
        return args + ["--probes", os.path.join(data, "probes"), "--test", os.path.join(data, "test.jsonl"),
                       "--test-scores", self.path(f"scores_{mix}_test.pt")]

    def run_chain(self, spec, split):
        """[train (unless finished), eval on `split`] for spec = (mix, arch, loss, lr, seed, low): one chain, so
        that a pool of chains keeps every core busy to the end."""
        mix, arch, loss, lr, seed, low = spec
        d = self.run_dir(*spec)
        name = f"{mix}_{arch}_{os.path.basename(d)}"
        chain = [] if self.finished(d) else [(self.train_args(mix, arch, loss, lr, seed, d, low), "train_" + name)]
        target = d
        if split == "val":  # the final checkpoint alone, in a folder of its own, scored on the validation split
            target = self._mk(d + "_val")
            last = f"ckpt_{self.p['vlm']['steps']:06d}.pt"
            chain.append((["link", os.path.join(d, last), os.path.join(target, last)], None))
        chain.append((self.eval_args(target, mix, split, arch), f"eval_{split}_{name}"))
        return chain

    def parallel(self, jobs):
        """Run chains of jobs (jobs.Jobs.run_chains) and print how long they took."""
        if not jobs:
            return
        t0 = time.time()
        self.jobs.run_chains(jobs)
        print(f"  {len(jobs)} chains in {(time.time() - t0) / 60:.1f} min "
              f"({(time.time() - t0) * max(1, self.cfg.parallel) / len(jobs):.0f} s per chain per slot)", flush=True)

    def rows(self, run_dir, **extra):
        path = os.path.join(run_dir, "eval.json")
        return [{**r, **extra} for r in json.load(open(path))] if os.path.exists(path) else []

    # ---- learning rates, chosen on validation -------------------------------------------------------------
    def val_score(self, mix, arch, loss, lr, low):
        """(primary endpoint, -image NLL) on the validation split at the last step, averaged over the grid seeds;
        None while a seed is missing."""
        scores = []
        for seed in range(self.p["grid_seeds"]):
            rows = self.rows(self.run_dir(mix, arch, loss, lr, seed, low) + "_val")
            final = {r["benchmark"]: r["value"] for r in rows if r["step"] == max(x["step"] for x in rows)}
            if "probe_cc_avg" not in final:
                return None
            scores.append((final["probe_cc_avg"], -final.get("nll_image", 0.0)))
        return tuple(round(sum(x) / len(x), 6) for x in zip(*scores))

    def grid_points(self, choice, mix, arch, loss):
        """The (lr, low) points tried so far for one arm, starting from the preset's grid; each choice at an
        edge of the lr grid adds the next value beyond it (a factor of the grid's step), up to `extend` times
        per side."""
        lows = self.p["oracle_lows"] if loss == "oracle" else [None]
        c = choice.setdefault(f"{mix}/{arch}", {}).setdefault(loss, {
            "grid": list(self.p["lrs"][arch]), "low": lows[0], "lows": lows, "extended": 0, "capped": False})
        return c

    def choose(self, c, mix, arch, loss):
        """Update c (one arm's record) from the validation scores; return the runs still needed (or [])."""
        low0 = c["lows"][0]  # the lr grid runs at the first low weight (the oracle's; None for other arms)
        scores = {lr: self.val_score(mix, arch, loss, lr, low0) for lr in c["grid"]}  # read each eval.json once
        need = [(lr, low0) for lr in c["grid"] if scores[lr] is None]
        if need:
            return need
        grid = sorted(c["grid"])
        best = max(grid, key=lambda lr: scores[lr])
        c.update(chosen=best, scores={f"{lr:g}": scores[lr][0] for lr in grid},
                 edge=len(grid) > 1 and best in (grid[0], grid[-1]))
        if c["edge"]:
            if c["extended"] < self.p["extend"]:
                ratio = grid[1] / grid[0]
                new = best / ratio if best == grid[0] else best * ratio
                c["grid"].append(float(f"{new:.3g}"))
                c["extended"] += 1
                return [(c["grid"][-1], low0)]
            c["capped"] = True
        if loss == "oracle" and len(c["lows"]) > 1:  # then its low weight, at the chosen lr
            need = [(best, low) for low in c["lows"] if self.val_score(mix, arch, loss, best, low) is None]
            if need:
                return need
            low_scores = {low: self.val_score(mix, arch, loss, best, low) for low in c["lows"]}
            c["low"] = max(c["lows"], key=lambda low: low_scores[low])
            c["low_scores"] = {f"{low:g}": v[0] for low, v in low_scores.items()}
        return []

    def tune_lrs(self):
        """Grid runs for every tuned arm of every setting, in one pool per round, until no choice needs more."""
        path = self.path("lr_choice.json")
        choice = {}
        tune = [a for a in self.cfg.tune.split(",") if a in self.arms()]
        for round_ in range(1, 2 * self.p["extend"] + 3):
            jobs = []
            for mix, arch in self.settings:
                for loss in tune:
                    c = self.grid_points(choice, mix, arch, loss)
                    for lr, low in self.choose(c, mix, arch, loss):
                        jobs += [self.run_chain((mix, arch, loss, lr, seed, low), "val")
                                 for seed in range(self.p["grid_seeds"])]
            if not jobs:
                break
            step(f"lr grid, round {round_}: {len(jobs)} runs (train + validation eval)")
            self.parallel(jobs)
        for mix, arch in self.settings:
            arms = choice[f"{mix}/{arch}"]
            for loss in self.arms():
                if loss not in arms:  # not tuned: PRIOR's shuffle control takes PRIOR's lr, others NTP's
                    src = "prior" if loss == "prior_shuffled" and "prior" in arms else "ntp"
                    lows = self.p["oracle_lows"] if loss == "oracle" else [None]
                    arms[loss] = {"chosen": arms[src]["chosen"], "low": lows[0], "borrowed_from": src}
            print(f"  {mix}:{arch} learning rates: " + ", ".join(
                f"{k} {v['chosen']:g}" + (" (edge, capped)" if v.get("capped") else "") +
                (f" low {v['low']:g}" if k == "oracle" else "") for k, v in arms.items()))
        with open(path, "w") as f:
            json.dump(choice, f, indent=1)
        with open(self.path("chosen_lrs.json"), "w") as f:  # the short form paper.py reads
            json.dump({k: {loss: c["chosen"] for loss, c in v.items()} for k, v in choice.items()}, f, indent=1)
        return choice

    def experiment(self):
        seeds = self.cfg.seeds or self.p["seeds"]
        choice = self.tune_lrs()
        jobs, specs = [], []
        for mix, arch in self.settings:
            for loss in self.arms():
                c = choice[f"{mix}/{arch}"][loss]
                for seed in range(seeds):
                    specs.append((mix, arch, loss, c["chosen"], seed, c["low"] if loss == "oracle" else None))
        for spec in specs:
            if (not os.path.exists(os.path.join(self.run_dir(*spec), "eval.json"))
                    or not self.finished(self.run_dir(*spec))):
                jobs.append(self.run_chain(spec, "test"))
        step(f"main runs: {len(specs)} ({len(jobs)} to train or evaluate), every checkpoint on the test split")
        self.parallel(jobs)
        results = []
        for mix, arch in self.settings:  # validation rows of every grid run, then the main runs' test rows
            for loss, c in choice[f"{mix}/{arch}"].items():
                if "grid" not in c:
                    continue  # a borrowed lr: no grid runs
                points = ([(lr, c["lows"][0]) for lr in sorted(c["grid"])]
                          + [(c["chosen"], low) for low in c["lows"][1:]])
                for lr, low in points:
                    for seed in range(self.p["grid_seeds"]):
                        d = self.run_dir(mix, arch, loss, lr, seed, low) + "_val"
                        results += self.rows(d, mix=mix, phase="grid", **({"oracle_low": low} if low else {}))
        for spec in specs:
            results += self.rows(self.run_dir(*spec), mix=spec[0], phase="main",
                                 **({"oracle_low": spec[5]} if spec[5] is not None else {}))
        for mix in self.mixes:  # the data's side of the story: what the reference LM predicts, per word tag
            rel = json.load(open(self.path(f"scores_{mix}_test.json"))).get("relevance", {})
            for key, short in (("predicted", "predicted"), ("mean_w", "mean"), ("share", "share")):
                results += [{"mix": mix, "phase": "data", "arch": "", "loss": "", "seed": 0, "lr": 0, "step": 0,
                             "benchmark": f"{short}_{tag}", "value": v} for tag, v in rel.get(key, {}).items()
                            if v is not None]
        with open(self.path("results.json"), "w") as f:
            json.dump(results, f)
        return results

    def analyses(self):
        for mix in self.mixes:
            png = self.path(f"importance_{mix}.png")
            if not os.path.exists(png):
                self.jobs.run(["eval.py", "--importance", self.path(f"scores_{mix}_train.pt"), "--importance-data",
                               self.path(f"data_{mix}", "train.jsonl"), "--tokenizer", self.path("tokenizer.json"),
                               "--png", png], f"importance_{mix}")
            shutil.copy(self.path(f"scores_{mix}_train.png"), self.path(f"token_weights_{mix}.png"))


def step(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
