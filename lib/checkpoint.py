"""train.py's checkpoints: what --resume may change, restoring a run bit for bit, and writing ckpt_<step>.pt
(weights, for eval.py) and last.pt (weights, optimizer, step and RNG); one writer per run folder (run.lock)."""
import atexit
import glob
import json
import os
import socket
from dataclasses import asdict

import torch

from model import VLMConfig
from lib.cli import UserError
from lib.utils import atomic_save, check_fingerprint, load_checkpoint


# Flags that --resume lets differ from the run's own: where and how it runs, never what it computes. --steps may not
# grow: it sets the cosine schedule of every step.
RESUME_MAY_DIFFER = {"out_dir", "resume", "stop_at", "threads", "workers", "device", "image_cache", "compile", "fsdp",
                     "save_every", "max_bad_fraction", "overwrite"}
RESUME_MAY_DIFFER |= {"grad_checkpoint", "wandb"}  # memory use and where the log also goes: same numbers
# Files may move (a copied artefacts folder): a path may change, but not from '' to a file or back. What the run read
# is checked instead: data, tokenizer, scores and text data by fingerprint, the --init-* weights by the model's shape
# (last.pt holds every weight).
RESUME_PATHS = {"data", "tokenizer", "scores", "attn_scores", "text_data", "init_decoder", "init_encoder", "init_from",
                "vision_weights"}


LOCK = "run.lock"  # in --out-dir while a run writes there: {"pid", "host"} of the writer


def run_files(out_dir):
    """The files a train.py run leaves in out_dir (what eval.py --run-dir and --resume read)."""
    names = [os.path.join(out_dir, n) for n in ("config.json", "log.jsonl", "last.pt")]
    return [p for p in names if os.path.exists(p)] + sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def check_run_dir(cfg):
    """Before anything is built: --resume needs a last.pt, and a fresh run needs a folder without another run's
    files (their log and checkpoints would mix with its own in eval.py --run-dir); --overwrite allows both (a new
    run replaces the old one's files; with --resume, only where there is no last.pt to continue)."""
    last, old = os.path.join(cfg.out_dir, "last.pt"), run_files(cfg.out_dir)
    if cfg.resume and not os.path.exists(last) and not cfg.overwrite:
        raise UserError(f"--resume: no last.pt in {cfg.out_dir} to continue from (leave out --resume for a new run, "
                        f"or add --overwrite to start one there when there is nothing to resume)")
    if not cfg.resume and old and not cfg.overwrite:
        raise UserError(f"--out-dir {cfg.out_dir} holds another run ({', '.join(map(os.path.basename, old[:3]))}"
                        f"{', ...' if len(old) > 3 else ''}): add --resume to continue it, --overwrite to replace it, "
                        f"or give a new --out-dir")


def resume_state(cfg, per_micro_batch=False):
    """train.py's start: check_run_dir, then (--resume) last.pt, loaded and checked against the flags (check_resume);
    None for a new run."""
    check_run_dir(cfg)
    path = os.path.join(cfg.out_dir, "last.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = load_checkpoint(path, "vlm")
    check_resume(cfg, state, path, per_micro_batch)
    return state


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def take_lock(out_dir):
    """One writer per run folder: create out_dir/run.lock naming this process (pid, host), atomically (O_EXCL).
    Refused while another live process holds it; a lock left by a process that is gone (killed: it never ran its
    exit handler) on this host is stale and taken over; on another host its state is unknown, so it is refused
    with the file to delete. This process's own lock (a second run in one process) is its own."""
    path, me = os.path.join(out_dir, LOCK), {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):  # half-written by a writer killed at once
                holder, pid, host = None, None, me["host"]
            if holder == me:
                return path
            if host != me["host"]:
                raise UserError(f"--out-dir {out_dir} is in use by process {pid} on {host} ({path}); if no run "
                                f"writes there any more, delete {path}")
            if pid is not None and _alive(pid):
                raise UserError(f"--out-dir {out_dir} is in use by process {pid} on {host} (its lock {path}): one "
                                f"run writes to a folder at a time; wait for it, or give another --out-dir")
            print(f"note: {path} was left by process {pid}, which is gone: taking it over")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, path)
        return path
    raise UserError(f"--out-dir {out_dir}: cannot take its lock {path} (another process keeps taking it)")


def release_lock(path):
    """Remove the lock if it is still this process's (at the end of a run, and at exit after a failure)."""
    if not path:
        return
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (OSError, ValueError):
        pass


def claim_run_dir(cfg, master):
    """train.py's folder, once the model is built: made, locked by the writer (rank 0), and with --overwrite and
    no run to resume, cleared of the old run's files. Returns the lock's path (None on other ranks)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not master:
        return None
    lock = take_lock(cfg.out_dir)
    try:
        check_run_dir(cfg)  # again, now that no other writer can come between: one may have finished since
    except UserError:
        release_lock(lock)
        raise
    if cfg.overwrite and not (cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "last.pt"))):
        for path in run_files(cfg.out_dir):
            os.remove(path)
    return lock


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
        raise UserError(f"--resume: {path} is a run with other flags ({flags}); a resumed run keeps the flags that "
                         f"define it (see its config.json): give the old values, or a new --out-dir")


def _step_of(line):
    """A log line's step, or None for a line that is not a whole JSON object (half a line: a full disk or a kill
    while logging)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value.get("step", 0) if isinstance(value, dict) else None


def trim_log(path, step):
    """Drop log lines after `step` (the resumed checkpoint's), which the resumed run writes again, and torn lines
    (never a JSONDecodeError: every complete line up to the last is kept)."""
    if not os.path.exists(path):
        return
    with open(path, errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        n = _step_of(line)
        if isinstance(n, int) and n <= step:
            kept.append(line.rstrip("\n") + "\n")
    if kept != lines:
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
            raise UserError(f"--resume: --{key.replace('_', '-')} {getattr(cfg, key)} is not the file the run in "
                             f"{path} read (fingerprint {fp}, the run's {state['inputs'][key]})")
    if VLMConfig.from_dict(state["model_config"]) != model.cfg:  # e.g. an --init-* file that changed since
        raise UserError(f"--resume: {path} holds another model than these flags build "
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
