"""What every script shares: flags from a config dataclass and what each may be, checked saves and loads, the
plug-in registry, torchrun helpers, the own-data health warnings and the run's log.

A script's settings are one dataclass (`steps: int = flag(300, "optimizer steps")`), saved in every checkpoint
(from_dict rebuilds it). Its entry point, run(main, Config), ends a user's mistake (UserError) as one line
`error: ...`, exit code 2 (--debug or PRIOR_DEBUG=1: the traceback too); any other exception is a bug of ours.
"""
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import importlib
import json
import math
import os
import pathlib
import pickle
import random
import re
import shutil
import sys
import time
import typing
import zipfile

import torch
import torch.distributed as dist


class UserError(ValueError):
    """A mistake of the user's (flag, file, resume), not a bug. A ValueError, so code catching ValueError works."""


def flag(default, help, choices=None, min=None, max=None):
    """A config field with its --help text and the values it takes: choices, or min..max (inclusive)."""
    extra = {k: v for k, v in (("choices", choices), ("min", min), ("max", max)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def positional(help, choices=None):
    """A required field given by position (`python -m scale.hf FOLDER`): no default, so before those with one."""
    return dataclasses.field(metadata={"help": help, "positional": True, **({"choices": choices} if choices else {})})


def option(name):
    """--some-name for some_name; from_ (a Python keyword + _) is --from."""
    return "--" + name.rstrip("_").replace("_", "-")


def check_range(cfg, name, lo=None, hi=None):
    """UserError unless lo <= value <= hi; a float must also be finite (NaN and inf pass no comparison)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi) or (
            isinstance(value, float) and not math.isfinite(value)):
        help = next(f.metadata.get("help", "") for f in dataclasses.fields(cfg) if f.name == name)
        number = "an integer" if isinstance(value, int) else "a finite number"
        allowed = " and ".join(f"{op} {bound}" for op, bound in ((">=", lo), ("<=", hi)) if bound is not None)
        raise UserError(f"{option(name)} {value}: allowed values are {number}{' ' + allowed if allowed else ''}"
                        f"{' (' + help + ')' if help else ''}")


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(cls, argv=None, description=None):
    """`cls` from argv (`--some-name` for `some_name`), refused (UserError) where a value is out of its field's
    min..max or fails the config's check() (a config built in code, as in tests, is not checked)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, choices=f.metadata.get("choices"), help=f.metadata["help"])
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if kind is bool:  # `--flag` alone turns it on; `--flag=false` turns it off
            how = {"type": _bool, "nargs": "?", "const": True}
        else:  # Optional[int] is int
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            how = {"type": base, "choices": f.metadata.get("choices")}
        parser.add_argument(option(f.name), dest=f.name, default=default, help=help_text, **how)
    names = {f.name for f in dataclasses.fields(cls)}
    if "debug" not in names:
        parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    args = vars(parser.parse_args(argv))
    if args.pop("debug", False) and "debug" not in names:
        os.environ["PRIOR_DEBUG"] = "1"
    return validate(cls(**args), {k for k, v in args.items() if v != parser.get_default(k)})


def validate(cfg, given):
    """cfg with its flag ranges and check() run; `given`: the flags set, for which some checks are stricter (a slots
    dataclass has no room for them: all strict)."""
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(cfg, "_given", set(given))
    for f in dataclasses.fields(cfg):
        if "min" in f.metadata or "max" in f.metadata:
            check_range(cfg, f.name, f.metadata.get("min"), f.metadata.get("max"))
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def from_dict(cls, values):
    """Rebuild a config saved with dataclasses.asdict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


# OSErrors that run() says in one line: a write refused (read-only, full disk, a file for a folder or back) and a
# missing file (None: a FileNotFoundError(message) of ours)
WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENOENT, None}
IO_ERROR = re.compile(r"(No space left|Disk quota|unexpected pos)|iostream error|write failed|File too large|os error")


def run(main, cls, argv=None, description=None):
    """A script's entry point: main(parse_config(...)); a user's mistake or a refused file (WRITE_ERRORS) is one line
    `error: ...` (naming the file) and exit code 2."""
    try:
        return main(parse_config(cls, argv, description))
    except (UserError, OSError) as e:  # a missing file is the user's too (the message names it)
        if os.environ.get("PRIOR_DEBUG") or isinstance(e, OSError) and e.errno not in WRITE_ERRORS:
            raise
        print(f"error: {e.filename}: {e.strerror}" if getattr(e, "filename", None) else f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- plug-ins: the core never imports the lab (scale/, baselines/, benchmarks/, experiments/). A lab folder registers
# functions here when imported, under the names the core looks up, and its __main__.py runs a core script with them
# (run_script: `python -m scale train --stream ...`; `python -m experiments SCRIPT` has them all).
PLUGINS = {}
SCRIPTS = {"train": ("TrainConfig", "main"), "eval": ("EvalConfig", "main"), "score": ("ScoreConfig", "main"),
           "reference_lm": ("RefConfig", "train_lm"),
           "data.tokenizer": ("TokenizerConfig", "build")}  # a core script: (its config dataclass, its function)


def register(name):
    """Decorator: the function becomes plug-in `name`."""
    def add(fn):
        PLUGINS[name] = fn
        return fn
    return add


def plugin(name, flag):
    """Plug-in `name`, which `flag` needs; when no lab folder registered it, one line saying how to get it."""
    if name not in PLUGINS:
        raise UserError(f"{flag} is a lab feature (plug-in {name!r}), not the core's: run the script through the lab, "
                        f"e.g. python -m experiments train|eval|score|reference_lm ... (docs/scale.md)")
    return PLUGINS[name]


def run_script(folder, argv=None):
    """`python -m FOLDER SCRIPT [flags]`: `python SCRIPT.py [flags]` with FOLDER's plug-ins registered."""
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0].removesuffix(".py") if argv else ""
    if name not in SCRIPTS:
        print(f"usage: python -m {folder} {{{','.join(SCRIPTS)}}} [flags] (--help: the script's flags)",
              file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(name)
    config, function = SCRIPTS[name]
    sys.argv[0] = f"python -m {folder} {name}"
    run(getattr(module, function), getattr(module, config), argv[1:], description=module.__doc__)
    exit_distributed()


def exit_distributed():
    """Under torchrun, after a clean finish: skip the interpreter's teardown, where a leftover gloo thread can still
    abort the process ("terminate called without an active exception"; about once in thirty 2-process CI runs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---- device, schedule, fingerprints, and the checked save and load paths
def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device torch can use; give --device cpu or auto")
    return name


def autocast(device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on CPU, where bf16 is slower."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step, max_steps, lr, warmup):
    """Linear warm-up to `lr`, then cosine decay to lr/10 at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def text_fingerprint(records):
    """Fingerprint of a caption set: ids and captions, so a score file can be matched to its data."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.id}\t{r.caption}\n".encode())
    return h.hexdigest()[:16]


def file_fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def check_fingerprint(what, expected, found, expected_from, found_from):
    if expected != found:
        raise UserError(f"{what} mismatch: {expected_from} was made with {expected}, "
                        f"but {found_from} is {found}. Re-run the step that made {expected_from}.")


def atomic_save(obj, path):
    """torch.save through atomic_write: never a broken checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write(path, write):
    """write(temporary path) (`write` a str: that text), then rename to `path`: a crash mid-write never leaves a
    broken file. A failed write (a full disk: one line) removes the temporary file and leaves the old one as it was."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        write(tmp) if callable(write) else pathlib.Path(tmp).write_text(write)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        text = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0][:200]
        failed = IO_ERROR.search(text)  # an OSError, or a library saying one stopped it (torch, tokenizers, ...)
        if not isinstance(e, OSError) and not (isinstance(e, Exception) and failed):
            raise
        if failed and failed.group(1):  # ENOSPC, or torch's short write
            text = f"no space left on the device ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder})"
        old = "the previous file is intact" if os.path.exists(path) else "no file was left"
        raise UserError(f"{path}: {text} while saving; {old}, and no {os.path.basename(tmp)}") from None


def check_out(path, kind="file", flag="--out"):
    """Before any long work: one line naming `flag` and `path` unless a `kind` ("file" or "dir") can be written
    there: not the other kind, in a folder (or the nearest above it that exists) one may write to."""
    folder = os.path.abspath(path if kind == "dir" else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    want, other = ("file", "folder") if kind == "file" else ("folder", "file")
    if os.path.exists(path) and os.path.isdir(path) == (kind == "file"):
        raise UserError(f"{flag} {path} is a {other}, not a {want}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        what = "read-only" if os.path.isdir(folder) else "a file"
        raise UserError(f"{flag} {path} cannot be written: {folder} is {what}")


def safe_load(source, name, what="a checkpoint", error=UserError, mmap=None):
    """torch.load with weights_only=True (a file from an untrusted source cannot run code); every failure is one
    `error` naming the file, never torch's advice to retry with weights_only=False."""
    # torch.save writes a zip whose members carry CRC-32s that torch.load never checks (a flipped byte loads as a
    # wrong weight); testzip checks them, cheaper than a stored sha256 (docs/formats.md). Not a zip: left to torch.
    if isinstance(source, (str, os.PathLike)) and zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as z:
                bad = z.testzip()
        except Exception as e:  # a damaged member header: zipfile cannot even walk the members
            bad = f"? ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
        if bad is not None:
            raise error(f"{name}: damaged: its member {bad} fails the zip CRC check (bytes changed since it was "
                        f"saved); it is not {what} as it was written: make it again, or copy it again") from None
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # objects a weights-only load refuses (not any file pickle cannot read:
        if "global" not in str(e).lower():  # a JSON or text file is not a pickle at all: "Unsupported operand")
            detail = next((": " + x.strip() for x in str(e).splitlines() if x.strip().startswith("Unsupported")), "")
            raise error(f"{name}: cannot read it as {what} (not a file torch.save wrote{detail}); is it the right "
                        f"file?") from None
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise error(f"{name}: holds Python objects that a safe (weights-only) load refuses"
                    f"{' (' + culprit + ')' if culprit else ''}; it is not {what} made by this project, and "
                    f"loading it unsafely could run code: not loaded") from None
    except Exception as e:  # a file cut short, or not a torch file at all
        first_line = (str(e).splitlines() or [""])[0][:300]
        raise error(f"{name}: cannot read it as {what} ({type(e).__name__}: {first_line}); it may be cut short "
                    f"or made by something else") from None


KINDS = {"vlm": "a train.py checkpoint (a VLM)", "lm": "a reference_lm.py checkpoint (a language model)",
         "vit": "a tools/vision.py checkpoint (a ViT encoder)", "scores": "a score file (score.py or baselines/)",
         "score-index": "a sharded score file's index (score.py)", "state-dict": "a bare state dict (no config)",
         "unknown": "no checkpoint this project writes"}
KIND_KEYS = {"model_config": "vlm", "decoder_config": "lm", "vit_config": "vit", "p_ref": "scores",
             "shards": "score-index"}  # the key each script writes


def load_checkpoint(path, kind=None, flag=""):
    """A checkpoint, loaded safely; with `kind` (a KINDS key), one line naming the file, what it is and what was
    expected when it is another kind (never a KeyError further on). flag: the option that named it."""
    if str(path).startswith("hf:"):  # a Hugging Face Llama folder, converted on the fly by scale/hf.py
        return plugin("hf_checkpoint", flag or path)(path, kind, flag)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}no checkpoint at {path}")
    ckpt = safe_load(path, f"{flag}: {path}" if flag else path)
    found = "unknown"
    if isinstance(ckpt, dict):
        bare = ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        found = next((k for key, k in KIND_KEYS.items() if key in ckpt), "state-dict" if bare else "unknown")
    if kind is not None and found != kind:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is {KINDS[found]}, not {KINDS[kind]} as expected")
    return ckpt


def make_optimizer(params, lr, weight_decay):
    """AdamW with decay on matrices only (norms, biases and 1-d gains are not decayed)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


# ---- several processes (torchrun). Alone, setup_distributed returns rank 0 of 1 and the scripts train the bare
# model; sharding (--fsdp) is scale/fsdp.py's.
def setup_distributed(device, bf16=True):
    """(rank, world size, this process's device). bf16: refuse GPUs without it (V100, T4), whose fp16 would need a
    GradScaler this project does not have; bf16=False: a float32 job (score.py's) on any GPU."""
    if bf16 and str(device).startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16, which training on a GPU needs (fp16 "
                         f"with loss scaling is not implemented): use --device cpu or a GPU with bf16 (A100 or newer)")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):  # bind the process to its GPU before NCCL starts, and tell NCCL which one
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(module):
    """The bare model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def wrap(model, opt, cfg, world, device, master):
    """(train_model, opt): the model as the step runs it: sharded in place (--fsdp), inside DDP, compiled."""
    train_model = model
    if cfg.fsdp and world == 1 and master:
        print("--fsdp: one process, nothing to shard; training unsharded")
    if cfg.fsdp and world > 1:
        opt = plugin("fsdp", "--fsdp")(model, opt, cfg, device)
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None)
    if getattr(cfg, "compile", False):
        train_model = torch.compile(train_model, dynamic=True)  # batch shapes change every step (tight packing)
    return train_model, opt


def full_state(model, opt, sharded):
    """Weights and optimizer state unsharded (sharded: gathered onto rank 0, a collective every rank joins)."""
    if sharded:
        return PLUGINS["fsdp_full_state"](model, opt)
    return model.state_dict(), opt.state_dict()


def full_weights(model, sharded):
    """The weights as CPU copies that outlive training (sharded: as full_state; ranks other than 0 get {})."""
    if sharded:
        return PLUGINS["fsdp_full_weights"](model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def wait_until(ready):
    """Poll ready() each second: for files another rank writes. Not a barrier: decoding a large image set can outlast
    a collective's timeout (if that rank fails, torchrun stops the others)."""
    while not ready():
        time.sleep(1.0)


def reduce_stats(stats, nll_by_tag, world, device):
    """Sum every figure over the processes, so the log covers the global batch."""
    if world > 1:
        keys = ("loss", "ntp", "aux", "tokens", "positions", "padding", "images", "context", "attended")
        packed = torch.tensor([stats.get(k, 0) for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU only
        dist.all_reduce(packed)
        stats.update(zip(keys, packed.tolist()))
        dist.all_reduce(nll_by_tag)
    return stats, nll_by_tag.cpu()


def global_mean(x, world):
    """The mean of a scalar tensor over the processes (a detached copy; x itself when alone): for logs."""
    if world == 1:
        return x.detach()
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


# ---- health: warnings for the ways PRIOR goes wrong on a user's own data, as pure functions (tests feed them made-up
# numbers); docs/own_data.md explains each and what to do about it (train.py's alarm: scale/alarm.py).
def val_split_size(n, fraction=0.05, minimum=64):
    """Captions to hold out for validation: fraction x n, but at least `minimum` (a smaller split's NLL is too
    noisy to pick a checkpoint by), at most a quarter (the rest must train the LM), and 1 when n >= 2."""
    if n < 2:
        return 0
    return max(1, min(max(int(n * fraction), minimum), n // 4))


def memorising(history):
    """A warning when validation NLL rose while the training loss fell (the LM learns its captions by heart)."""
    for a, b in zip(history, history[1:]):
        if b["val_nll"] > a["val_nll"] and b["train_loss"] < a["train_loss"]:
            return (f"validation NLL rose from {a['val_nll']:.3f} (step {a['step']}) to {b['val_nll']:.3f} "
                    f"(step {b['step']}) while the training loss fell ({a['train_loss']:.3f} -> "
                    f"{b['train_loss']:.3f}): the LM is memorising its captions (too few captions for --steps; "
                    f"fewer --steps, more captions or a smaller model fit better)")
    return None


def weight_collapse(p_ref, near_zero=0.05, caption_share=0.9, max_token_share=0.75, max_caption_share=0.1):
    """(stats, warning or None): do PRIOR's weights w = 1 - p_ref collapse to zero (the reference LM has memorised
    the captions it scores)? p_ref: per-caption scores of caption tokens then <|eos|> (left out here)."""
    n_tok = n_low = n_cap = n_cap_low = 0
    for p in p_ref:
        w = 1 - p[:-1].float().clamp(0, 1)
        if len(w) == 0:
            continue
        low = int((w < near_zero).sum())
        n_tok, n_low, n_cap = n_tok + len(w), n_low + low, n_cap + 1
        n_cap_low += low > caption_share * len(w)
    stats = {"near_zero": near_zero, "tokens_near_zero": n_low / max(n_tok, 1),
             "captions_near_zero": n_cap_low / max(n_cap, 1)}
    if stats["tokens_near_zero"] <= max_token_share and stats["captions_near_zero"] <= max_caption_share:
        return stats, None
    return stats, (f"WARNING: the weights collapse: {stats['tokens_near_zero']:.0%} of caption tokens have "
                   f"w < {near_zero} (limit {max_token_share:.0%}) and {stats['captions_near_zero']:.0%} of captions "
                   f"({n_cap_low} of {n_cap}) have more than {caption_share:.0%} of their tokens there "
                   f"(limit {max_caption_share:.0%}). The reference LM predicts these captions almost perfectly: "
                   f"has it memorised them (are REF and TRAIN disjoint? did it overfit?). PRIOR would then barely "
                   f"train on them; see docs/own_data.md")


class RunLog:
    """log.jsonl, one flushed JSON line per write (a killed run keeps its lines), and with --wandb PROJECT the same
    dicts in a Weights & Biases run (scale/wandb_log.py)."""
    def __init__(self, path, project="", config=None):
        self.file = open(path, "a")
        out_dir = os.path.dirname(path) or "."
        self.run = None
        if project:
            self.run = plugin("wandb", "--wandb")(project, config or {}, out_dir,
                                                  id_path=os.path.join(out_dir, "wandb_id"))

    def write(self, line):
        try:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: the lines before are whole (a torn last one is skipped on --resume)
            raise UserError(f"{self.file.name}: {e.strerror} while logging; its earlier lines are kept") from None
        if self.run is not None:
            self.run.log(line, step=int(line["step"]))

    def close(self):
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---- what each script's flags may be: a mixin of its config dataclass (`class TrainConfig(TrainChecks)`), so the
# script keeps its fields and this file the rules. A flag's range is the same in every script that has it:
#     python train.py --steps 0      # error: --steps 0: allowed values are an integer >= 1 (optimizer steps)
FRACTION = (0.0, 1.0)
RANGES = {  # flag name: min, or (min, max)
    **dict.fromkeys(("steps", "batch_size", "row_len", "batch_rows", "chunk", "save_every", "image_size", "patch_size",
                     "vit_dim", "vit_depth", "vit_heads", "n_layer", "n_head", "d_model", "itc_dim"), 1),
    **dict.fromkeys(("micro_batch", "warmup", "stop_at", "eval_every", "patience", "max_rows", "report_captions",
                     "workers", "threads", "bench_generate"), 0),
    **dict.fromkeys(("lr", "alpha", "weight_decay", "grad_clip", "text_ratio", "aux_weight", "pixel_noise", "budget",
                     "peak_tflops"), 0.0),
    **dict.fromkeys(("val_fraction", "rho1_keep", "oracle_low", "max_bad_fraction"), FRACTION),
    "max_epochs": 1e-9}


class Checks:
    """check(): each field's range (RANGES, then the script's OWN_RANGES), a --warmup below --steps, attention
    heads that split their width evenly (DIVISIBLE: --d-model 30 --n-head 4 cannot; RoPE: into even widths)."""
    OWN_RANGES = {}
    DIVISIBLE = (("d_model", "n_head"), ("vit_dim", "vit_heads"), ("image_size", "patch_size"))

    def check(self):
        ranges = {**RANGES, **self.OWN_RANGES}
        for f in dataclasses.fields(self):
            if f.name in ranges:
                bound = ranges[f.name]
                check_range(self, f.name, *(bound if isinstance(bound, tuple) else (bound, None)))
        steps, warmup = getattr(self, "steps", 0), getattr(self, "warmup", 0)  # --steps 0: sized to the data
        if steps and warmup and warmup >= steps:
            if "warmup" not in getattr(self, "_given", {"warmup"}):  # the default, with a short --steps: a quick try
                print(f"note: the default --warmup {warmup} is not below --steps {steps}: the lr never reaches "
                      f"--lr {getattr(self, 'lr', '')}; give a shorter --warmup", file=sys.stderr)
            else:
                raise UserError(f"--warmup {warmup}: allowed values are 0 to --steps - 1 = {steps - 1} (a warm-up "
                                f"of --steps {steps} or more never reaches --lr)")
        for width, heads in self.DIVISIBLE:
            if hasattr(self, heads) and getattr(self, width) % getattr(self, heads):
                raise UserError(f"{option(width)} {getattr(self, width)} is not divisible by {option(heads)} "
                                f"{getattr(self, heads)}: allowed are multiples of {option(heads)}")
        if hasattr(self, "d_model") and self.d_model // self.n_head % 2:
            raise UserError(f"--d-model {self.d_model} / --n-head {self.n_head} = {self.d_model // self.n_head} per "
                            f"head: allowed are even head widths (RoPE rotates pairs of channels)")


TrainChecks = ScoreChecks = EvalChecks = Checks


class RefChecks(Checks):
    OWN_RANGES = {"steps": 0, "row_len": 2}  # --steps 0: sized to the data (reference_lm.size_steps)


class TokenizerChecks(Checks):
    SMALLEST_VOCAB = 7 + 256  # byte-level BPE starts from the 7 specials (data/tokenizer.SPECIALS) and all 256 bytes
    OWN_RANGES = {"vocab_size": SMALLEST_VOCAB}
