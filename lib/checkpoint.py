"""train.py's checkpoints: what --resume may change, restoring a run bit for bit, and writing ckpt_<step>.pt
(weights, for eval.py) and last.pt (weights, optimizer, step and RNG)."""
import json
import os
from dataclasses import asdict

import torch

from model import VLMConfig
from lib.utils import atomic_save, check_fingerprint


# Flags that --resume lets differ from the run's own: where and how it runs, never what it computes. --steps may not
# grow: it sets the cosine schedule of every step.
RESUME_MAY_DIFFER = {"out_dir", "resume", "stop_at", "threads", "workers", "device", "image_cache", "compile", "fsdp",
                     "save_every", "max_bad_fraction"}
RESUME_MAY_DIFFER |= {"grad_checkpoint", "wandb"}  # memory use and where the log also goes: same numbers
# Files may move (a copied artefacts folder): a path may change, but not from '' to a file or back. What the run read
# is checked instead: data, tokenizer, scores and text data by fingerprint, the --init-* weights by the model's shape
# (last.pt holds every weight).
RESUME_PATHS = {"data", "tokenizer", "scores", "attn_scores", "text_data", "init_decoder", "init_encoder", "init_from",
                "vision_weights"}


def check_resume(cfg, state, path, per_micro_batch=False):
    """Refuse to resume `state` (last.pt) under flags that would change the run: one line naming them.
    per_micro_batch: the loss depends on how the batch is split (baselines.Baseline.per_micro_batch)."""
    old = state.get("config", {})
    may_differ = set(RESUME_MAY_DIFFER)
    if not per_micro_batch:
        may_differ.add("micro_batch")
    changed = [(k, old[k], v) for k, v in asdict(cfg).items() if k not in may_differ and k in old and
               old[k] != v and (k not in RESUME_PATHS or bool(old[k]) != bool(v))]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, a, b in changed)
        raise ValueError(f"--resume: {path} is a run with other flags ({flags}); a resumed run keeps the flags that "
                         f"define it (see its config.json): give the old values, or a new --out-dir")


def trim_log(path, step):
    """Drop log lines after `step` (the resumed checkpoint's), which the resumed run writes again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def restore(state, path, model, opt, cfg, meta, master=True):
    """Put a run's last.pt (`state`, from `path`) back into model and opt; returns its step. meta: this run's
    config.json dict; what it read (data, tokenizer, the files in "inputs") must be what the run read. The log's
    lines after that step go (the resumed run writes them again)."""
    check_fingerprint("caption data", state["data"], meta["data"], path, cfg.data)
    check_fingerprint("tokenizer", state["tokenizer"], meta["tokenizer"], path, cfg.tokenizer)
    for key, fp in meta["inputs"].items():  # checkpoints older than this record have no "inputs"
        if state.get("inputs", {}).get(key, fp) != fp:
            raise ValueError(f"--resume: --{key.replace('_', '-')} {getattr(cfg, key)} is not the file the run in "
                             f"{path} read (fingerprint {fp}, the run's {state['inputs'][key]})")
    if VLMConfig.from_dict(state["model_config"]) != model.cfg:  # e.g. an --init-* file that changed since
        raise ValueError(f"--resume: {path} holds another model than these flags build "
                         f"({state['model_config']} vs {asdict(model.cfg)})")
    model.load_state_dict(state["model"])
    if state.get("optimizer_format") == "fqn":  # from an --fsdp run: keyed by parameter name
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if master:
        trim_log(os.path.join(cfg.out_dir, "log.jsonl"), state["step"])
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


def save(out_dir, done, model_state, opt_state, meta, cfg, scheduled, sharded):
    """ckpt_<done>.pt (weights, when `scheduled`: every --save-every steps and the last) and last.pt (weights,
    optimizer, step, schedule and RNG: what --resume needs to continue bit for bit)."""
    weights_only = {"model": model_state, "step": done, **meta}
    if scheduled:
        atomic_save(weights_only, os.path.join(out_dir, f"ckpt_{done:06d}.pt"))
    atomic_save({**weights_only, "optimizer": opt_state, **({"optimizer_format": "fqn"} if sharded else {}),
                 "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps},
                 "rng": {"torch": torch.get_rng_state()}}, os.path.join(out_dir, "last.pt"))
