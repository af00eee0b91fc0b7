"""The main job's machinery: its presets and config, and Experiment, which runs every stage (data -> tokenizer ->
reference LM -> scores -> pretrained LM and ViT -> lr grids -> main runs -> evaluation) through experiments/jobs.py.
The command and the design are in main.py's docstring; docs/experiment.md explains each choice.
"""
import json
import os
import shutil
import time
from dataclasses import dataclass, replace

from experiments.importance import ImportanceConfig
from experiments.jobs import Jobs
from experiments.protocol import PRIMARY, lr_score, settle
from world.generate import MIXES, GenConfig
from data.tokenizer import TokenizerConfig
from eval import EvalConfig
from reference_lm import RefConfig
from score import ScoreConfig
from tools.vision import Config as VisionConfig
from train import WEIGHTINGS, TrainConfig
from utils import UserError, flag, pick_device

# Sizes per preset. "cpu" is sized for a 2-core laptop CPU (docs/performance.md has its measured time); "smoke"
# exercises every stage in miniature; "gpu" is a starting point for GPUs.
PRESETS = {
    "smoke": dict(
        data=dict(n_ref=600, n_text=600, n_label=200, n_train=400, n_val=50, n_test=60, n_probe=24, n_probe_val=12),
        vocab=512, lm=dict(n_layer=1, n_head=2, d_model=32, steps=30, batch_rows=4, row_len=128, lr=3e-3, warmup=5),
        base_lm=dict(steps=40),
        vit=dict(steps=20, batch_size=32, patch_size=16), seeds=2, lrs={"h": [3e-3], "u": [3e-3]},
        tokens_per_patch=3,
        vlm=dict(steps=6, batch_size=8, save_every=3, warmup=2, row_len=128, patch_size=16), stage1_steps=4,
        eval_rows=24, eval_rows_val=12, settings="web:h,web:u", pilot_seeds=[100], extend=0, oracle_low=0.1),
    # 48 px scenes on a 3x3 grid, 16 px patches: one patch per grid cell. The H-LVLM's projector makes 3 image
    # tokens of each (27): with one, a cell's colour, shape and size had to share one token and the frozen LM read
    # almost nothing of them (gap_image 0.02 nats vs 0.28 with 3: docs/experiment.md). The U-LVLM: 14 tokens.
    "cpu": dict(
        data=dict(n_ref=10000, n_text=10000, n_label=3000, n_train=8000, n_val=300, n_test=600, n_probe=160,
                  n_probe_val=64),
        vocab=1024, lm=dict(n_layer=4, n_head=4, d_model=128, steps=300, batch_rows=8, row_len=256, lr=3e-3, warmup=30),
        # 3,000 steps: at 1,200 the base LM copied a shape from its context but not a colour (context gap 0.006
        # nats per colour token; 4.9 at 3,000), and a frozen LM that cannot read a colour from its context cannot
        # read it from image tokens either (docs/experiment.md, "Does the H-LVLM see?")
        base_lm=dict(steps=3000),
        vit=dict(steps=300, batch_size=64, patch_size=16), seeds=10, tokens_per_patch=3,
        lrs={"h": [1e-3, 3e-3, 1e-2], "u": [3e-4, 1e-3, 3e-3]},
        # 240 steps (~1 epoch of the 8,000 pairs), a checkpoint every 24: test curves of 10 points; the pilot's
        # validation curves every 48 (5 points: what its rules read, at half the evaluation). In the pilot of
        # docs/experiment.md NTP's validation curve was flat from about step 120 of 300.
        vlm=dict(steps=240, batch_size=32, save_every=24, warmup=10, row_len=256, patch_size=16), stage1_steps=600,
        pilot_save_every=48,
        # 5 pilot seeds: the positive control's gate (protocol.gate) reads a paired t interval over >= 5. The
        # pilot reads 96 validation captions, the test 160: on the pilot of results/main at 160, 96 makes the same
        # lr choices and passes the gate (80 fails it, 64 moves NTP's lr: pilot_rows.json), for less evaluation.
        # The tuned copy reads 640 question pairs (20 steps x 32): it_scenes 2,000 loads 4,000, not all 16,000.
        eval_rows=160, eval_rows_val=96, settings="web:h", pilot_seeds=[100, 101, 102, 103, 104], extend=1,
        oracle_low=0.1, it_scenes=2000),
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
        eval_rows=0, eval_rows_val=0, settings="web:h,hard:h,noisy:h,web:u,hard:u", pilot_seeds=[100, 101], extend=2,
        oracle_low=0.1),
}


@dataclass
class ExperimentConfig:
    out: str = flag("out", "output folder: data, models, runs, results.md")
    preset: str = flag("cpu", "sizes: smoke, cpu or gpu (see PRESETS)", list(PRESETS))
    stage: str = flag("all", "prepare = data, tokenizer, reference LM, scores; all = everything", ["prepare", "all"])
    settings: str = flag("", "mix:family pairs to compare ('' = the preset's), e.g. web:h,hard:u")
    arms: str = flag("ntp,prior,prior_shuffled,anti_prior,oracle", "arms of the comparison (registered weightings)")
    tune: str = flag("ntp,prior,prior_shuffled,anti_prior,oracle",
                     "arms whose lr is chosen on validation (one grid for all); others borrow PRIOR's or NTP's")
    seeds: int = flag(0, "paired seeds per arm (0 = the preset's)")
    parallel: int = flag(2, "jobs at once (each with cpu_threads // parallel threads)")
    nproc: int = flag(1, "processes per training run, under torchrun (e.g. the GPU count)")
    device: str = flag("auto", "auto, cpu or cuda")
    seed: int = flag(0, "data-generation seed")
    wandb: str = flag("", "pass --wandb PROJECT to every VLM run: each logs its config and log.jsonl there")


class Experiment:
    def __init__(self, cfg):
        self.cfg, self.p = cfg, PRESETS[cfg.preset]
        self.out = os.path.abspath(cfg.out)
        self.settings = [tuple(x.split(":")) for x in (cfg.settings or self.p["settings"]).split(",")]
        bad = [x for x in self.settings if len(x) != 2 or x[1] not in ("h", "u") or x[0] not in MIXES]
        if bad:  # every flag is checked here, before any work (not in a worker after the pilot)
            raise UserError(f"--settings: expected mix:family pairs like web:h,hard:u (mix one of {', '.join(MIXES)}; "
                            f"family h or u), got {', '.join(':'.join(x) for x in bad)}")
        unknown = [a for a in cfg.arms.split(",") + cfg.tune.split(",") if a not in WEIGHTINGS]
        if unknown:
            raise UserError(f"--arms/--tune: {', '.join(unknown)} is not a registered weighting (train.WEIGHTINGS: "
                            f"{', '.join(WEIGHTINGS)})")
        self.mixes = list(dict.fromkeys(m for m, _ in self.settings))  # in order, once each
        self.log = open(os.path.join(self._mk(self.out), "experiment.log"), "a")
        self.jobs = Jobs(self.path("logs"), cfg.parallel, cfg.nproc, record=self.log, workers=True)

    def _mk(self, path):
        os.makedirs(path, exist_ok=True)
        return path

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    # ---- stages 1-4: data and the pretrained pieces -------------------------------------------------------
    def prepare(self, with_pretrain=False):
        for mix in self.mixes:
            data = self.path(f"data_{mix}")
            if not os.path.exists(os.path.join(data, "meta.json")):
                step(f"data ({mix} mix)")
                gen = GenConfig(**{"out": data, "mix": mix, "seed": self.cfg.seed, **self.p["data"]})
                self.jobs.run((gen, "world.generate"), f"data_{mix}", threads=1)
        tok = self.path("tokenizer.json")
        if not os.path.exists(tok):
            step("tokenizer")
            files = ",".join(self.path(f"data_{m}", f) for m in self.mixes for f in ("text.jsonl", "train.jsonl"))
            self.jobs.run((TokenizerConfig(data=files, out=tok, vocab_size=self.p["vocab"]), "data.tokenizer"),
                          "tokenizer")
        # Everything after the tokenizer runs as chains of jobs in one pool (a chain's jobs in order):
        # per mix, the reference LM and then its scores; with --stage all also the base LM and then the
        # U-LVLM's stage 1, and the ViT (the base-LM chain, the longest, alone afterwards on CPUs: below).
        lm = {**self.p["lm"], "tokenizer": tok, "device": self.cfg.device}
        chains, reports = [], []
        for mix in self.mixes:
            chain = []
            if not os.path.exists(self.path(f"ref_lm_{mix}.pt")):
                ref = RefConfig(**{"data": self.path(f"data_{mix}", "ref.jsonl"), "out": self.path(f"ref_lm_{mix}.pt"),
                                   **lm})
                chain.append(((ref, "reference_lm"), f"ref_lm_{mix}"))
            for split in ("train", "test"):
                out, data = self.path(f"scores_{mix}_{split}.pt"), self.path(f"data_{mix}", f"{split}.jsonl")
                if not os.path.exists(out):
                    cfg = ScoreConfig(ref=self.path(f"ref_lm_{mix}.pt"), tokenizer=tok, data=data, out=out,
                                      device=self.cfg.device)
                    chain.append(((cfg, "score"), f"score_{mix}_{split}"))
                # what the weights pick out: the relevance report (into scores_*.json), Fig. 1 and Fig. 8 pictures
                png = self.path(f"importance_{mix}.png" if split == "train" else f"scores_{mix}_{split}_importance.png")
                if not os.path.exists(png):
                    cfg = ImportanceConfig(scores=out, data=data, tokenizer=tok, png=png)
                    chain.append(((cfg, "experiments.importance"), f"importance_{mix}_{split}"))
                    if split == "train":
                        reports.append((mix, f"importance_{mix}_{split}"))
            chains.append(chain)
        names, lm_chain = ["reference LM and scores per mix"], []
        if with_pretrain:
            lm_chain, vit_chain = self.pretrain_chains()
            chains.append(vit_chain)
            names += ["base LM", "vision encoder"] + (["U-LVLM stage 1"] if "u" in self.archs else [])
        chains = [c for c in chains if c]
        step(", ".join(names) + (" (done)" if not chains and not lm_chain else ""))
        cores = os.cpu_count() or 1
        if lm_chain and self.jobs.threads < cores and not pick_device(self.cfg.device).startswith("cuda"):
            # On CPUs the base LM is the one long job (minutes; the others take about one together): the short
            # ones run side by side first, then the base LM alone on every core (on 2 cores 1.6x as fast as on
            # one, docs/performance.md), instead of one core idling while it trains
            self.parallel(chains)
            self.parallel([lm_chain], threads=cores)
        else:
            self.parallel([lm_chain] + chains if lm_chain else chains)
        for mix, name in reports:
            print(f"  relevance report ({mix} mix, weights of the training captions):")
            for line in open(self.path("logs", name + ".log")):
                if line.startswith(("mean weight", "ROC-AUC", "share predicted")):
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
            cfg = RefConfig(**{"data": text, "out": self.path("base_lm.pt"), "seed": 1, **base,
                               "tokenizer": self.path("tokenizer.json"), "device": self.cfg.device})
            lm_chain.append(((cfg, "reference_lm"), "base_lm"))
        for mix in self.mixes:
            if "u" in self.archs_for(mix) and not os.path.exists(self.stage1_ckpt(mix)):
                v = {**self.p["vlm"], "steps": self.p["stage1_steps"], "save_every": self.p["stage1_steps"]}
                cfg = TrainConfig(**{"data": self.path(f"data_{mix}", "label.jsonl"), "arch": "u",
                                     "tokenizer": self.path("tokenizer.json"), "init_decoder": self.path("base_lm.pt"),
                                     "out_dir": os.path.dirname(self.stage1_ckpt(mix)), "lr": 1e-3,
                                     "device": self.cfg.device, "resume": True, "overwrite": True, **v})
                lm_chain.append(((cfg, "train"), f"u_stage1_{mix}"))
        if "h" in self.archs and not os.path.exists(self.path("vit.pt")):
            cfg = VisionConfig(**{"data": self.path(f"data_{self.mixes[0]}", "label.jsonl"), "out": self.path("vit.pt"),
                                  "device": self.cfg.device, **self.p["vit"]})
            vit_chain.append(((cfg, "tools.vision"), "vit"))
        return [lm_chain, vit_chain]

    # ---- stages 5-8: the VLM runs ---------------------------------------------------------------------------
    @property
    def archs(self):
        return list(dict.fromkeys(a for _, a in self.settings))

    def archs_for(self, mix):
        return [a for m, a in self.settings if m == mix]

    def train_config(self, mix, arch, loss, lr, seed, out_dir, low=None):
        """train.TrainConfig of a VLM run in the main job's recipe."""
        data = self.path(f"data_{mix}")
        cfg = {"data": os.path.join(data, "train.jsonl"), "tokenizer": self.path("tokenizer.json"),
               "scores": self.path(f"scores_{mix}_train.pt"), "out_dir": out_dir, "arch": arch, "loss": loss,
               "lr": lr, "seed": seed, "device": self.cfg.device, "init_decoder": self.path("base_lm.pt"),
               "resume": True, "overwrite": True, **self.p["vlm"]}
        if low is not None:
            cfg["oracle_low"] = low
        if getattr(self.cfg, "wandb", ""):  # paper.py's Setup builds these too, from a config without it
            cfg["wandb"] = self.cfg.wandb
        if arch == "h":  # the paper's H-LVLM: pretrained, frozen encoder and LM; only the projector trains (its
            # frozen ViT's features are computed once per image set and shared by every run: --feature-cache)
            cfg.update(init_encoder=self.path("vit.pt"), train="projector", feature_cache=self.path("features"),
                       tokens_per_patch=self.p.get("tokens_per_patch", 1))  # image tokens per 16-px cell
        else:  # the paper's U-LVLM: starts from stage 1, all weights train, captions mixed 1:1 with text
            cfg.update(init_from=self.stage1_ckpt(mix), init_decoder="", text_data=os.path.join(data, "text.jsonl"))
        return TrainConfig(**cfg)

    def stage1_ckpt(self, mix):
        return self.path("runs", mix, "u_stage1", f"ckpt_{self.p['stage1_steps']:06d}.pt")

    def estimate(self):
        """How many training runs the design makes before any grid extension, and their steps."""
        tune = [a for a in self.cfg.tune.split(",") if a in self.arms()]
        grid = sum(len(self.p["lrs"][a]) * len(self.p["pilot_seeds"]) * len(tune) for _, a in self.settings)
        main = len(self.settings) * len(self.arms()) * (self.cfg.seeds or self.p["seeds"])
        v = self.p["vlm"]
        return (f"estimate: {grid} pilot runs (lr grid, validation) + {main} main runs (test), {v['steps']} steps "
                f"each, {v['steps'] // self.p.get('pilot_save_every', v['save_every'])} evaluated checkpoints a pilot "
                f"run and {v['steps'] // v['save_every']} a main run; grid edges add "
                f"{len(self.p['pilot_seeds'])} runs each. Re-running skips finished runs and evaluations.")

    def arms(self):
        return self.cfg.arms.split(",")

    def run_dir(self, mix, arch, loss, lr, seed, low=None):
        suffix = "" if low is None or low == self.p["oracle_low"] else f"_low{low:g}"
        return self.path("runs", mix, arch, f"{loss}_lr{lr:g}_s{seed}{suffix}")

    def finished(self, run_dir):
        return os.path.exists(os.path.join(run_dir, f"ckpt_{self.p['vlm']['steps']:06d}.pt"))

    def eval_config(self, run_dir, mix, split, arch):
        """eval.EvalConfig on the validation captions (a pilot run) or on the test probes and captions (every
        checkpoint of the run, into <run>/eval.json): the evaluation of a run trained under torchrun."""
        data = self.path(f"data_{mix}")
        cfg = EvalConfig(run_dir=run_dir, max_rows=self.p["eval_rows"], device=self.cfg.device,
                         feature_cache=self.path("features") if arch == "h" else "")
        if split == "val":
            return replace(cfg, max_rows=self.p["eval_rows_val"], test=os.path.join(data, "val.jsonl"))
        return replace(cfg, probes=os.path.join(data, "probes"), test=os.path.join(data, "test.jsonl"),
                       test_scores=self.path(f"scores_{mix}_test.pt"))

    def eval_spec(self, mix, arch, split):
        """What experiments/worker.py evaluates at each checkpoint of a run: the captions' grounding gaps (the
        primary endpoint, protocol.PRIMARY), on validation (pilot runs) or test (main runs); at the last step also
        the probes, and in main runs the NLL by reference weight and the benchmark-format files. The files are
        asked of a copy of the checkpoint instruction-tuned for the preset's it_steps (default 20; 0 = of the raw
        checkpoint) at its it_lr, training its it_train part ('' = the run's), on questions about its first
        it_scenes training scenes (0 = all): the paper's protocol, experiments/bench_instruct.py."""
        from experiments.bench_instruct import IT_LR, IT_STEPS, qa_train_file
        data = self.path(f"data_{mix}")
        spec = {"out": "eval.json", "feature_cache": self.path("features") if arch == "h" else ""}
        if split == "val":  # what the pilot's rules read, nothing else: the validation captions' gaps
            return {**spec, "max_rows": self.p["eval_rows_val"], "test": os.path.join(data, "val.jsonl")}
        spec.update(probes=os.path.join(data, "probes"), max_rows=self.p["eval_rows"],
                    test=os.path.join(data, "test.jsonl"), test_scores=self.path(f"scores_{mix}_test.pt"),
                    bench=self.bench_specs(data))  # before qa_train_file: it writes bench/ only where none exists
        steps = self.p.get("it_steps", IT_STEPS)
        if steps and spec["bench"]:
            scenes = self.p.get("it_scenes", 0)  # 0: questions about every training scene
            spec["instruct"] = {"data": qa_train_file(data, scenes=scenes), "steps": steps,
                                "lr": self.p.get("it_lr", IT_LR), "train": self.p.get("it_train", ""),
                                "image_cache": self.path(f"images_{mix}_qa{scenes or ''}.u8")}
        return spec

    @staticmethod
    def bench_specs(data):
        """eval.py --bench specs of the generator's files in the benchmarks' formats (benchmarks/files.py, written on
        first use): its presence probes as POPE files, scene questions as a VLMEvalKit TSV; read at the last step of
        main runs, after a short instruction tuning (eval_spec)."""
        from benchmarks.files import POPE_SPLITS, write_bench_files
        if not os.path.isdir(os.path.join(data, "bench")):
            write_bench_files(data)
        pope = [os.path.join(data, "bench", f"synth_pope_{s}.json") for s in POPE_SPLITS]
        tsv = os.path.join(data, "bench", "synth_mcq.tsv")
        return [f"pope:{f}::{data}" for f in pope if os.path.exists(f)] + \
            ([f"mmbench:{tsv}"] if os.path.exists(tsv) else [])

    def vlm_job(self, spec, split):
        """One run as one worker job: train with every checkpoint evaluated in the same process."""
        mix, arch, loss, lr, seed = spec
        d = self.run_dir(mix, arch, loss, lr, seed)
        low = self.p["oracle_low"] if loss == "oracle" else None
        name = f"{split}_{mix}_{arch}_{os.path.basename(d)}"
        cfg = self.train_config(mix, arch, loss, lr, seed, d, low)
        if split == "val":  # the pilot's curves: a checkpoint every pilot_save_every steps (protocol.TAIL)
            cfg = replace(cfg, save_every=self.p.get("pilot_save_every", cfg.save_every))
        if arch == "h":  # decoded once per image set, then memory-mapped by every run
            cfg = replace(cfg, image_cache=self.path(f"images_{mix}.u8"))
        if not self.jobs.workers:  # torchrun (--nproc > 1): train.py, then eval.py over every checkpoint
            return [((cfg, "train"), "train_" + name),
                    ((self.eval_config(d, mix, split, arch), "eval"), "eval_" + name)]
        return [(("call", "experiments.worker:train_eval", (cfg, [self.eval_spec(mix, arch, split)])), name)]

    def parallel(self, jobs, threads=None):
        """Run chains of jobs (jobs.Jobs.run_chains, each job on `threads` threads if given) and print how long they
        took."""
        if not jobs:
            return
        t0 = time.time()
        self.jobs.run_chains(jobs, threads)
        print(f"  {len(jobs)} chains in {(time.time() - t0) / 60:.1f} min "
              f"({(time.time() - t0) * max(1, self.cfg.parallel) / len(jobs):.0f} s per chain per slot)", flush=True)

    def rows(self, run_dir, **extra):
        path = os.path.join(run_dir, "eval.json")
        return [{**r, **extra} for r in json.load(open(path))] if os.path.exists(path) else []

    def curve(self, mix, arch, loss, lr, seed, bench=PRIMARY):
        rows = self.rows(self.run_dir(mix, arch, loss, lr, seed))
        return {r["step"]: r["value"] for r in rows if r["benchmark"] == bench}

    # ---- the pilot: learning rates and the positive control, on validation, on seeds the test never uses ----
    def pilot(self):
        """Grid runs (pilot seeds, validation captions at every checkpoint) for every tuned arm, until each arm's
        choice (protocol.choose_lr) is inside its grid or the grid has grown `extend` values per side."""
        tune = [a for a in self.cfg.tune.split(",") if a in self.arms()]
        grids = {(m, a, loss): list(self.p["lrs"][a]) for m, a in self.settings for loss in tune}
        choice = {}
        for round_ in range(1, 2 * self.p["extend"] + 2):
            jobs = [self.vlm_job((m, a, loss, lr, seed), "val") for (m, a, loss), grid in grids.items()
                    for lr in grid for seed in self.p["pilot_seeds"] if (m, a, loss) not in choice
                    and not (self.finished(self.run_dir(m, a, loss, lr, seed))
                             and self.rows(self.run_dir(m, a, loss, lr, seed)))]
            if jobs:
                step(f"pilot, round {round_}: {len(jobs)} runs (train + validation captions at each checkpoint)")
                self.parallel(jobs)
            for key, grid in grids.items():
                if key in choice:
                    continue
                scores = {lr: lr_score([self.curve(*key, lr, s) for s in self.p["pilot_seeds"]]) for lr in grid}
                chosen, edge, more = settle(scores, self.p["lrs"][key[1]], self.p["extend"])
                if more:  # one more value past that edge, then choose again
                    grid.append(more)
                    continue
                choice[key] = {"chosen": chosen, "edge": edge, "capped": edge,
                               "scores": {f"{lr:g}": v for lr, v in sorted(scores.items())}, "grid": sorted(grid)}
            if len(choice) == len(grids):
                break
        out = {}
        for m, a in self.settings:
            arms = out.setdefault(f"{m}/{a}", {})
            for loss in self.arms():
                if (m, a, loss) in choice:
                    arms[loss] = choice[m, a, loss]
                else:  # not tuned: PRIOR's shuffle control takes PRIOR's lr (it differs in the token order only)
                    src = "prior" if loss == "prior_shuffled" and (m, a, "prior") in choice else "ntp"
                    arms[loss] = {"chosen": choice[m, a, src]["chosen"], "borrowed_from": src}
            print(f"  {m}:{a} learning rates: " + ", ".join(
                f"{k} {v['chosen']:g}" + (" (edge, capped)" if v.get("capped") else "") for k, v in arms.items()))
        with open(self.path("lr_choice.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(self.path("chosen_lrs.json"), "w") as f:  # the short form paper.py reads
            json.dump({k: {loss: c["chosen"] for loss, c in v.items()} for k, v in out.items()}, f, indent=1)
        return out

    def experiment(self):
        seeds = range(self.cfg.seeds or self.p["seeds"])
        if set(seeds) & set(self.p["pilot_seeds"]):
            raise SystemExit(f"--seeds: test seeds {list(seeds)} overlap the pilot seeds {self.p['pilot_seeds']}")
        choice = self.pilot()
        specs = [(m, a, loss, choice[f"{m}/{a}"][loss]["chosen"], s) for m, a in self.settings for loss in self.arms()
                 for s in seeds]
        jobs = [self.vlm_job(spec, "test") for spec in specs
                if not (self.finished(self.run_dir(*spec)) and self.rows(self.run_dir(*spec)))]
        step(f"main runs: {len(specs)} ({len(jobs)} to train or evaluate), test captions at every checkpoint")
        self.parallel(jobs)
        results = []
        for m, a in self.settings:  # every pilot run's validation curve, then the main runs' test curves
            for loss, c in choice[f"{m}/{a}"].items():
                for lr in c.get("grid", []):
                    for s in self.p["pilot_seeds"]:
                        results += self.rows(self.run_dir(m, a, loss, lr, s), mix=m, phase="grid")
        for spec in specs:
            results += self.rows(self.run_dir(*spec), mix=spec[0], phase="main")
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
            shutil.copy(self.path(f"scores_{mix}_train.png"), self.path(f"token_weights_{mix}.png"))


def step(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
