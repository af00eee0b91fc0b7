"""The main job: PRIOR vs NTP, end to end, on the built-in data, following the paper's recipe.

    bash run.sh                               # = python experiment.py (CPU preset, 22.7 min on 2 cores)
    python experiment.py --preset smoke       # a 1-minute miniature of every stage (tests/test_experiment.py)
    python experiment.py --preset gpu --parallel 1 --nproc 8   # bigger data, models and steps (see PRESETS);
                                              # each train.py run under torchrun on 8 GPUs
    python experiment.py --stage prepare      # only data -> tokenizer -> reference LM -> scores -> report

Stages (each skipped when its output exists, so a re-run after an interruption resumes where it stopped):
  1. data        data/generate.py, one data set per caption mix (--mixes): "web" (mostly predictable
                 boilerplate) and "noisy" (much high-entropy noise that the reference LM cannot predict)
  2. tokenizer   byte-level BPE on the text-only and training captions of every mix
  3. in parallel, as chains of jobs (--parallel at a time):
     reference   reference_lm.py on each mix's ref.jsonl, disjoint from the captions it scores; then score.py
                 on train.jsonl (training weights) and test.jsonl (analysis), with the relevance report
     base LM     reference_lm.py on text.jsonl of all mixes (a separate, longer run): the pretrained LM both
                 VLM families start from; then the U-LVLM's stage 1 (image -> short label, the paper's 500
                 ImageNet steps)
     vision      vision.py: the pretrained ViT of the H-LVLM (stands in for CLIP)
  4. lr grid     NTP and PRIOR at three learning rates (seed 0), each loss's lr chosen by its probe average on
                 the validation probes (never the test probes)
  5. main        per mix x family x loss (ntp, prior, oracle) x seed, at each loss's best lr; H-LVLM trains
                 only its projector on the frozen ViT and LM; U-LVLM trains everything, captions mixed 1:1
                 with text-only data
  6. eval        every checkpoint: probes, token-level NLL, grounding gap (eval.py)
  7. report      results.json, results.md and the plots (report.py)
"""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from cli import parse_config

HERE = os.path.dirname(os.path.abspath(__file__))

# Sizes per preset. "cpu" is tuned to finish in about 20 minutes on a 2-core laptop CPU; "smoke" exercises
# every stage in about two minutes; "gpu" is a starting point for one GPU (use --parallel 1).
PRESETS = {
    "smoke": dict(
        data=dict(n_ref=600, n_text=600, n_label=200, n_train=400, n_val=50, n_test=60, n_probe=24, n_probe_val=12),
        vocab=512, lm=dict(n_layer=1, n_head=2, d_model=32, steps=30, batch_rows=4, row_len=128, lr=3e-3, warmup=5),
        base_lm=dict(steps=40),
        vit=dict(steps=20, batch_size=32, patch_size=16), seeds=2, lrs={"h": [3e-3], "u": [3e-3]},
        vlm=dict(steps=6, batch_size=8, save_every=3, warmup=2, row_len=128, patch_size=16), stage1_steps=4,
        eval_rows=24, mixes="web"),
    # 48 px scenes on a 3x3 grid, 16 px patches: one image token per grid cell (9 for the H-LVLM's ViT,
    # 14 with the U-LVLM's row markers), so a caption, not the image, is most of a sequence.
    "cpu": dict(
        data=dict(n_ref=10000, n_text=10000, n_label=3000, n_train=8000, n_val=300, n_test=600, n_probe=300,
                  n_probe_val=200),
        vocab=1024, lm=dict(n_layer=4, n_head=4, d_model=128, steps=300, batch_rows=8, row_len=256, lr=3e-3, warmup=30),
        base_lm=dict(steps=1200),
        vit=dict(steps=300, batch_size=64, patch_size=16), seeds=3,
        lrs={"h": [3e-3, 1e-2, 3e-2], "u": [3e-4, 1e-3, 3e-3]},
        vlm=dict(steps=200, batch_size=32, save_every=50, warmup=10, row_len=256, patch_size=16), stage1_steps=600,
        eval_rows=200, mixes="web,noisy",
        measured="measured: 22.7 min on a 2-core CPU (fresh clone, idle machine, 2026-11-22)"),
    "gpu": dict(
        data=dict(n_ref=100000, n_text=100000, n_label=20000, n_train=100000, n_val=1000, n_test=2000, n_probe=1000,
                  n_probe_val=500),
        vocab=2048, lm=dict(n_layer=8, n_head=8, d_model=512, steps=3000, batch_rows=64, row_len=512, lr=1e-3, warmup=200),
        base_lm=dict(steps=10000),
        vit=dict(steps=3000, batch_size=256, patch_size=16), seeds=3,
        lrs={"h": [3e-4, 1e-3, 3e-3], "u": [1e-4, 3e-4, 1e-3]},
        # row_len 128: the longest sample (14 image tokens + <= 72 caption tokens) fits; 1024 computed ~46x the
        # attention the captions need, 128 ~6x (docs/gpu.md)
        vlm=dict(steps=2000, batch_size=256, save_every=200, warmup=60, row_len=128, patch_size=16), stage1_steps=500,
        eval_rows=0, mixes="web,noisy"),
}


@dataclass
class ExperimentConfig:
    out: str = field(default="out", metadata={"help": "output folder: data, models, runs, results.md"})
    preset: str = field(default="cpu", metadata={"help": "sizes: smoke, cpu or gpu (see PRESETS)", "choices": list(PRESETS)})
    stage: str = field(default="all", metadata={"help": "prepare = data, tokenizer, reference LM, scores; all = everything", "choices": ["prepare", "all"]})
    mixes: str = field(default="", metadata={"help": "caption mixes to compare ('' = the preset's), e.g. web,noisy"})
    archs: str = field(default="h,u", metadata={"help": "model families on the first mix: h (ViT -> projector -> LM), u (encoder-free)"})
    other_mix_archs: str = field(default="h", metadata={"help": "model families on the other mixes (the CPU budget allows H only)"})
    losses: str = field(default="ntp,prior,oracle", metadata={"help": "arms of the main comparison"})
    seeds: int = field(default=0, metadata={"help": "seeds per arm (0 = the preset's)"})
    parallel: int = field(default=2, metadata={"help": "training runs at once (each with cpu_threads // parallel threads)"})
    nproc: int = field(default=1, metadata={"help": "processes per training run, launched with torchrun --standalone (e.g. the GPU count, with --parallel 1)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "data-generation seed"})


class Experiment:
    def __init__(self, cfg):
        self.cfg, self.p = cfg, PRESETS[cfg.preset]
        self.out = os.path.abspath(cfg.out)
        self.mixes = (cfg.mixes or self.p["mixes"]).split(",")
        self.threads = max(1, (os.cpu_count() or 2) // max(1, cfg.parallel))
        self.log = open(os.path.join(self._mk(self.out), "experiment.log"), "a")

    def _mk(self, path):
        os.makedirs(path, exist_ok=True)
        return path

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def run(self, args, log_name, threads=None):
        """Run one of the project's scripts in a subprocess; its output goes to a log file under out/logs."""
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or self.threads_per_process(args))}
        log_path = os.path.join(self._mk(self.path("logs")), log_name + ".log")
        cmd = [sys.executable, *self.launcher(args), *args]
        self.log.write(" ".join(cmd) + "\n")
        self.log.flush()
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = open(log_path).read()[-2500:]
            raise SystemExit(f"step failed: {' '.join(cmd)}\n--- last lines of {log_path} ---\n{tail}")
        return log_path

    def threads_per_process(self, args):
        """A run's share of the cores, split again over its torchrun processes: cores // parallel // nproc."""
        return max(1, self.threads // (self.cfg.nproc if self.launcher(args) else 1))

    def launcher(self, args):
        """train.py runs under torchrun when --nproc > 1 (DDP: NCCL on GPUs, gloo on CPU); the rest run plainly."""
        if args[0] == "train.py" and self.cfg.nproc > 1:
            return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.cfg.nproc}"]
        return []

    @staticmethod
    def flags(d):
        return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]

    # ---- stages 1-4: data and the pretrained pieces -------------------------------------------------------
    def prepare(self, with_pretrain=False):
        for mix in self.mixes:
            data = self.path(f"data_{mix}")
            if not os.path.exists(os.path.join(data, "meta.json")):
                step(f"data ({mix} mix)")
                self.run(["-m", "data.generate", "--out", data, "--mix", mix, "--seed", str(self.cfg.seed),
                          *self.flags(self.p["data"])], f"data_{mix}", threads=1)
        tok = self.path("tokenizer.json")
        if not os.path.exists(tok):
            step("tokenizer")
            files = ",".join(self.path(f"data_{m}", f) for m in self.mixes for f in ("text.jsonl", "train.jsonl"))
            self.run(["tokenizer.py", "--data", files, "--out", tok, "--vocab-size", str(self.p["vocab"])], "tokenizer")
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
                if line.startswith(("scored", "mean weight", "ROC-AUC")):
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
                                  "--out-dir", os.path.dirname(self.stage1_ckpt(mix)), "--lr", "1e-3",
                                  "--device", self.cfg.device, "--resume", *self.flags(v)], f"u_stage1_{mix}"))
        if "h" in self.archs and not os.path.exists(self.path("vit.pt")):
            vit_chain.append((["vision.py", "--data", self.path(f"data_{self.mixes[0]}", "label.jsonl"),
                               "--out", self.path("vit.pt"), "--device", self.cfg.device,
                               *self.flags(self.p["vit"])], "vit"))
        return [lm_chain, vit_chain]

    # ---- stages 5-8: the VLM runs ---------------------------------------------------------------------------
    @property
    def archs(self):
        return self.cfg.archs.split(",")

    def archs_for(self, mix):
        return self.archs if mix == self.mixes[0] else [a for a in self.cfg.other_mix_archs.split(",") if a in self.archs]

    def train_args(self, mix, arch, loss, lr, seed, out_dir):
        data = self.path(f"data_{mix}")
        v = self.p["vlm"]
        args = ["train.py", "--data", os.path.join(data, "train.jsonl"), "--tokenizer", self.path("tokenizer.json"),
                "--scores", self.path(f"scores_{mix}_train.pt"), "--out-dir", out_dir, "--arch", arch,
                "--loss", loss, "--lr", str(lr), "--seed", str(seed), "--device", self.cfg.device,
                "--init-decoder", self.path("base_lm.pt"), "--resume", *self.flags(v)]
        if arch == "h":  # the paper's H-LVLM: pretrained, frozen encoder and LM; only the projector trains
            args += ["--init-encoder", self.path("vit.pt"), "--train", "projector"]
        else:  # the paper's U-LVLM: starts from stage 1, all weights train, captions mixed 1:1 with text
            args += ["--init-from", self.stage1_ckpt(mix), "--text-data", os.path.join(data, "text.jsonl")]
        return args

    def stage1_ckpt(self, mix):
        return self.path("runs", mix, "u_stage1", f"ckpt_{self.p['stage1_steps']:06d}.pt")

    def estimate(self):
        """How many training runs this configuration makes, and how long the preset took where we measured it."""
        seeds, losses = self.cfg.seeds or self.p["seeds"], self.cfg.losses.split(",")
        grid = sum(2 * len(self.p["lrs"][a]) for a in self.archs_for(self.mixes[0]))
        main = sum(len(losses) * seeds - 2 for m in self.mixes for a in self.archs_for(m) if m == self.mixes[0]) + \
            sum(len(losses) * seeds for m in self.mixes[1:] for a in self.archs_for(m))
        measured = self.p.get("measured", "not measured yet")
        return (f"estimate: {grid} lr-grid runs + {main} more main runs of {self.p['vlm']['steps']} steps, each "
                f"evaluated at every checkpoint; {measured}. Re-running skips finished stages and runs.")

    def run_dir(self, mix, arch, loss, lr, seed):
        return self.path("runs", mix, arch, f"{loss}_lr{lr:g}_s{seed}")

    def finished(self, run_dir):
        return os.path.exists(os.path.join(run_dir, f"ckpt_{self.p['vlm']['steps']:06d}.pt"))

    def train_all(self, specs, title):
        jobs = [(self.train_args(*s, self.run_dir(*s)), "train_" + "_".join(map(str, s)))
                for s in specs if not self.finished(self.run_dir(*s))]
        step(f"{title}: {len(specs)} runs, {len(jobs)} to train")
        self.parallel(jobs)

    def evaluate(self, run_dirs, probes, test=None, test_scores=None, title="eval"):
        jobs = []
        for d in run_dirs:
            args = ["eval.py", "--run-dir", d, "--max-rows", str(self.p["eval_rows"]), "--device", self.cfg.device]
            if probes:
                args += ["--probes", probes]
            if test:
                args += ["--test", test]
            if test_scores:
                args += ["--test-scores", test_scores]
            jobs.append((args, "eval_" + os.path.relpath(d, self.path("runs")).replace(os.sep, "_")))
        step(f"{title}: {len(jobs)} runs")
        self.parallel(jobs)

    def parallel(self, jobs):
        """Run jobs --parallel at a time, each on cpu_threads // parallel threads (never more threads than
        cores: an oversubscribed OpenMP pool slows a run many times over). A job is (args, log name), or a
        list of them, run one after the other."""
        if not jobs:
            return
        from tqdm import tqdm
        chains = [j if isinstance(j, list) else [j] for j in jobs]
        with ThreadPoolExecutor(max(1, self.cfg.parallel)) as pool, \
                tqdm(total=sum(map(len, chains)), desc="  jobs", leave=False) as bar:
            def run_chain(chain):
                for args, name in chain:
                    self.run(args, name)
                    bar.update()
            for f in [pool.submit(run_chain, c) for c in chains]:
                f.result()

    def rows(self, run_dir, **extra):
        path = os.path.join(run_dir, "eval.json")
        return [{**r, **extra} for r in json.load(open(path))] if os.path.exists(path) else []

    def choose_lrs(self, mix, arch):
        """Best lr per loss (seed 0): the highest probe average on the *validation* probes (probes_val/, other
        scenes than the test probes), ties broken by the lower image-token NLL on the validation captions.
        Tuning on the test probes would flatter whichever method is tuned."""
        chosen, grid_rows = {}, []
        for loss in ("ntp", "prior"):
            scores = {}
            for lr in self.p["lrs"][arch]:
                rows = self.rows(self.run_dir(mix, arch, loss, lr, 0) + "_val")
                final = {r["benchmark"]: r["value"] for r in rows if r["step"] == max(x["step"] for x in rows)}
                if "probe_avg" in final:
                    scores[lr] = (round(final["probe_avg"], 6), -final.get("nll_image", 0.0))
                grid_rows += [{**r, "mix": mix, "phase": "grid", "lr": lr, "loss": loss, "seed": 0} for r in rows]
            chosen[loss] = max(scores, key=scores.get)
        for loss in self.cfg.losses.split(","):
            chosen.setdefault(loss, chosen["ntp"])  # the oracle (a control) and others: NTP's step size
        return chosen, grid_rows

    def experiment(self):
        seeds = self.cfg.seeds or self.p["seeds"]
        losses = self.cfg.losses.split(",")
        results, chosen_all = [], {}
        for mix in self.mixes:
            data = self.path(f"data_{mix}")
            for arch in self.archs_for(mix):
                # lr grid: NTP and PRIOR, seed 0, on the first mix; its choice serves every mix
                grid_mix = self.mixes[0]
                if mix == grid_mix:
                    specs = [(mix, arch, loss, lr, 0) for loss in ("ntp", "prior") for lr in self.p["lrs"][arch]]
                    self.train_all(specs, f"lr grid ({mix}, {arch.upper()}-LVLM)")
                    val_dirs = []
                    for s in specs:  # the final checkpoint of each grid run, evaluated on validation captions
                        d, last = self.run_dir(*s), f"ckpt_{self.p['vlm']['steps']:06d}.pt"
                        v = self._mk(d + "_val")
                        if not os.path.exists(os.path.join(v, last)):
                            os.link(os.path.join(d, last), os.path.join(v, last))
                        val_dirs.append(v)
                    self.evaluate(val_dirs, os.path.join(data, "probes_val"), os.path.join(data, "val.jsonl"),
                                  title="  eval lr grid on validation probes and captions")
                chosen, grid_rows = self.choose_lrs(grid_mix, arch)
                chosen_all[f"{mix}/{arch}"] = chosen
                results += [r for r in grid_rows if mix == grid_mix]
                print(f"  {arch.upper()}-LVLM learning rates: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()))
                specs = [(mix, arch, loss, chosen[loss], seed) for loss in losses for seed in range(seeds)]
                self.train_all(specs, f"main ({mix}, {arch.upper()}-LVLM)")
                dirs = [self.run_dir(*s) for s in specs]
                self.evaluate(dirs, os.path.join(data, "probes"), os.path.join(data, "test.jsonl"),
                              self.path(f"scores_{mix}_test.pt"), title="  eval every checkpoint")
                for s, d in zip(specs, dirs):
                    results += self.rows(d, mix=mix, phase="main")
        with open(self.path("results.json"), "w") as f:
            json.dump(results, f)
        with open(self.path("chosen_lrs.json"), "w") as f:
            json.dump(chosen_all, f, indent=1)
        return results

    def analyses(self):
        for mix in self.mixes:
            png = self.path(f"importance_{mix}.png")
            if not os.path.exists(png):
                self.run(["eval.py", "--importance", self.path(f"scores_{mix}_train.pt"), "--importance-data",
                          self.path(f"data_{mix}", "train.jsonl"), "--tokenizer", self.path("tokenizer.json"),
                          "--png", png], f"importance_{mix}")
            shutil.copy(self.path(f"scores_{mix}_train.png"), self.path(f"token_weights_{mix}.png"))


def step(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(cfg):
    t0 = time.time()
    exp = Experiment(cfg)
    print(f"PRIOR vs NTP, preset {cfg.preset}: mixes {exp.mixes}, families {cfg.archs}, losses {cfg.losses}, "
          f"{cfg.seeds or exp.p['seeds']} seeds, {cfg.parallel} runs at a time -> {exp.out}")
    print(exp.estimate())
    with open(exp.path("experiment_config.json"), "w") as f:
        json.dump({"config": asdict(cfg), "preset": exp.p}, f, indent=1)
    exp.prepare(with_pretrain=cfg.stage == "all")
    if cfg.stage == "prepare":
        print(f"prepared in {time.time() - t0:.0f}s: scores and relevance reports in {exp.out}")
        return
    rows = exp.experiment()
    exp.analyses()
    import report
    md = report.write_report(rows, exp.out)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {md}")


if __name__ == "__main__":
    main(parse_config(ExperimentConfig, description=__doc__))
