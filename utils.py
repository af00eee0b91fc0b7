"""Command-line flags from a config dataclass, so each script has one source of truth.

Every script keeps its settings in one `@dataclass` whose fields carry a help text:

    @dataclass
    class Config:
        steps: int = field(default=300, metadata={"help": "optimizer steps"})

    cfg = parse_config(Config, description=__doc__)   # python script.py --steps=500

(`steps: int = flag(300, "optimizer steps")` is the same field, shorter.) A `positional("help")` field is given
by position (`python -m scale.hf FOLDER`); a name with a trailing underscore drops it (`from_` is `--from`).

The same dataclass is saved (as a plain dict) inside every checkpoint and rebuilt with
`from_dict`, so a checkpoint alone says how it was made.

Every script's entry point is `run(main, Config, description=__doc__)`: a user's mistake (a bad flag, a bad
file, a refused resume) raises UserError and ends as one line `error: ...` with exit code 2, no traceback;
PRIOR_DEBUG=1 shows the traceback too. Any other exception is the project's own bug and keeps its traceback.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import typing
import errno
import hashlib
import pickle
import random
import shutil
import zipfile
import time
import json

import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(ValueError):
    """A mistake of the user's (flag, file, resume), not a bug: run() prints it as one line. A ValueError, so
    code that catches ValueError keeps working."""


def flag(default, help, choices=None, min=None, max=None):
    """A config field with its --help text (and the values argparse accepts: choices, or a range min..max,
    inclusive, checked by validate; a float with a bound must also be finite)."""
    extra = {k: v for k, v in (("choices", choices), ("min", min), ("max", max)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def option(name):
    """The flag of a field name: --some-name for some_name (from_, a Python keyword + _, is --from)."""
    return "--" + name.rstrip("_").replace("_", "-")


def check_range(name, value, lo=None, hi=None, help=""):
    """UserError unless lo <= value <= hi (either bound may be None); a float must also be finite (NaN and inf
    pass no comparison a weight or a rate needs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi) or (
            isinstance(value, float) and not math.isfinite(value)):
        number = "an integer" if isinstance(value, int) else "a finite number"
        allowed = " and ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "")
                               if x)
        raise UserError(f"{option(name)} {value}: allowed values are {number}{' ' + allowed if allowed else ''}"
                        f"{' (' + help + ')' if help else ''}")


def check_ranges(cfg, **bounds):
    """check_range for each name=min or name=(min, max) of cfg (a script's check() method)."""
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)}
    for name, bound in bounds.items():
        lo, hi = bound if isinstance(bound, tuple) else (bound, None)
        check_range(name, getattr(cfg, name), lo, hi, helps.get(name, ""))


def check_divisible(cfg, width, heads):
    """The attention heads must split the width evenly: --d-model 30 --n-head 4 cannot."""
    if getattr(cfg, width) % getattr(cfg, heads):
        raise UserError(f"{option(width)} {getattr(cfg, width)} is not divisible by {option(heads)} "
                        f"{getattr(cfg, heads)}: allowed are widths that are a multiple of the number of heads")


def check_warmup(cfg):
    """--warmup below --steps (or 0): a warm-up as long as the run never reaches --lr. Refused when --warmup was
    given; the default --warmup with a short --steps (a quick try) gets a note instead."""
    if cfg.warmup and cfg.warmup >= cfg.steps:
        if "warmup" not in getattr(cfg, "_given", {"warmup"}):
            print(f"note: the default --warmup {cfg.warmup} is not below --steps {cfg.steps}: the lr never reaches "
                  f"--lr {getattr(cfg, 'lr', '')}; give a shorter --warmup", file=sys.stderr)
            return
        raise UserError(f"--warmup {cfg.warmup}: allowed values are 0 to --steps - 1 = {cfg.steps - 1} (a warm-up "
                        f"of --steps {cfg.steps} or more never reaches --lr)")


def validate(cfg):
    """Refuse a config whose values the flags do not allow: each field's min/max (flag()), then the script's own
    checks (the config's check() method, if it has one). One UserError naming the flag and the values it takes."""
    for f in dataclasses.fields(cfg):
        if "min" in f.metadata or "max" in f.metadata:
            check_range(f.name, getattr(cfg, f.name), f.metadata.get("min"), f.metadata.get("max"),
                        f.metadata.get("help", ""))
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(cls, argv=None, description=None):
    """Build an ArgumentParser from `cls`'s fields (`--some-name` for `some_name`) and parse argv."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.metadata.get("positional"):
            add_positional(parser, f, kind)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        flag = "--" + f.name.rstrip("_").replace("_", "-")  # from_ (a Python keyword + _) is --from
        if kind is bool:
            # `--flag` alone turns it on; `--flag=false` turns it off.
            parser.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=default, help=help_text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            choices = f.metadata.get("choices")
            parser.add_argument(flag, dest=f.name, type=base, default=default, choices=choices, help=help_text)
    names = {f.name for f in dataclasses.fields(cls)}
    if "debug" not in names:  # every script: show the traceback of a user's mistake too
        parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    args = vars(parser.parse_args(argv))
    if args.pop("debug", False) and "debug" not in names:
        os.environ["PRIOR_DEBUG"] = "1"
    cfg = cls(**args)
    # the flags the command line set (differs from the default): some checks are stricter for those
    with contextlib.suppress(AttributeError, TypeError):  # a slots dataclass has no room for it: all are strict
        object.__setattr__(cfg, "_given", {k for k, v in args.items() if v != parser.get_default(k)})
    return validate(cfg)


def positional(help, choices=None):
    """A required config field given by position, not as a --flag (`python -m scale.hf FOLDER`); it has no default,
    so it stands before the fields that have one."""
    return dataclasses.field(metadata={"help": help, "positional": True, **({"choices": choices} if choices else {})})


def add_positional(parser, f, kind):
    """parse_config's argument for a positional() field."""
    parser.add_argument(f.name, type=kind, choices=f.metadata.get("choices"), help=f.metadata["help"])


def from_dict(cls, values):
    """Rebuild a config saved with dataclasses.asdict, ignoring keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def run(main, cls, argv=None, description=None):
    """A script's entry point: parse `cls`'s flags, call main(cfg); a UserError becomes `error: ...` and exit 2
    (--debug or PRIOR_DEBUG=1: the traceback too)."""
    try:
        return main(parse_config(cls, argv, description))
    except (UserError, FileNotFoundError) as e:  # a missing file is the user's too (the message names it)
        if os.environ.get("PRIOR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None



def join_repeated(argv, name="--bench"):
    """argv with every `--bench X` / `--bench=X` joined into one `--bench X,Y,...` (utils.py keeps the last
    value of a repeated flag; the specs are comma-separated after this)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == name and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(name + "="):
            values.append(a[len(name) + 1:])
        else:
            rest.append(a)
        i += 1
    return rest + ([name, ",".join(values)] if values else [])


# ---- plug-ins: where the lab extends the core ------------------------------------------------------------------------
# The core never imports the lab (scale/, baselines/, benchmarks/, experiments/). A lab folder that adds to a core
# script registers functions here when it is imported, under the names the core looks up; its __main__.py runs a core
# script with them: `python -m scale train --stream ...` (run_script). `python -m experiments SCRIPT` has them all.
PLUGINS = {}


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


# a core script: (its config dataclass, the function that takes it)
SCRIPTS = {"train": ("TrainConfig", "main"), "eval": ("EvalConfig", "main"), "score": ("ScoreConfig", "main"),
           "reference_lm": ("RefConfig", "train_lm")}


def run_script(folder, argv=None):
    """`python -m FOLDER SCRIPT [flags]`: the core SCRIPT (SCRIPTS) run as `python SCRIPT.py [flags]` would run it,
    with the plug-ins FOLDER registered."""
    import importlib
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].removesuffix(".py") not in SCRIPTS:
        print(f"usage: python -m {folder} {{{','.join(SCRIPTS)}}} [flags] (--help: the script's flags)",
              file=sys.stderr)
        raise SystemExit(2)
    name = argv[0].removesuffix(".py")
    module = importlib.import_module(name)
    config, function = SCRIPTS[name]
    sys.argv[0] = f"python -m {folder} {name}"
    run(getattr(module, function), getattr(module, config), argv[1:], description=module.__doc__)
    exit_distributed()


def exit_distributed():
    """Under torchrun, after a clean finish (process group destroyed, files closed): skip the interpreter's teardown,
    where a leftover gloo thread can still abort the process ("terminate called without an active exception"; seen
    in CI about once in thirty 2-process runs) and turn a finished run into a failed one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

# ---- utils ---------------------------------------------------------------------------------------------------------
# Small pieces the scripts share: device and precision, the lr schedule and optimizer, fingerprints, atomic saves,
# and the one checked load path (safe_load: no code runs, damaged bytes are refused; load_checkpoint: and the kind).


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_fingerprint(what, expected, found, expected_from, found_from):
    if expected != found:
        raise UserError(f"{what} mismatch: {expected_from} was made with {expected}, "
                         f"but {found_from} is {found}. Re-run the step that made {expected_from}.")


def _disk_full(e):
    """Is `e` what a full disk raises during torch.save? OSError ENOSPC, or torch's zip writer's RuntimeError
    ("unexpected pos ...", its only words for a short write)."""
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e)))


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint. A write
    that fails (a full disk: one line saying so) removes the temporary file and leaves the old one as it was."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _disk_full(e):
            free = shutil.disk_usage(folder).free
            old = "the previous file is intact" if os.path.exists(path) else "no file was left"
            raise UserError(f"{path}: no space left on the device ({free / 2**20:.1f} MiB free in {folder}) while "
                            f"saving; {old}, and no {os.path.basename(tmp)}: free some space and run again") from None
        raise


def check_zip(path, name, what="a checkpoint", error=UserError):
    """Refuse a damaged file: torch.save writes a zip whose every member carries a CRC-32, which torch.load never
    checks (a flipped byte loads as a wrong weight). zipfile.testzip reads each member and checks it: cheaper than
    a stored sha256 (measured in docs/formats.md), and old files carry the CRCs too. Not a zip: left to torch.load."""
    if not isinstance(path, (str, os.PathLike)) or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # a damaged member header: zipfile cannot even walk the members
        bad = f"? ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
    if bad is not None:
        raise error(f"{name}: damaged: its member {bad} fails the zip CRC check (bytes changed since it was saved); "
                    f"it is not {what} as it was written: make it again, or copy it again") from None


def safe_load(source, name, what="a checkpoint", error=UserError, mmap=False):
    """torch.load with weights_only=True, so a file from an untrusted source cannot run code when loaded, after
    check_zip (a damaged file is refused); every failure becomes one `error` that names the file (never torch's
    advice to retry with weights_only=False). mmap: map the tensors from the file (a path) instead of reading them."""
    check_zip(source, name, what, error)
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as e:  # objects a weights-only load refuses (not any file pickle cannot read:
        if "global" not in str(e).lower():  # a JSON or text file is not a pickle at all: "Unsupported operand")
            detail = next((x.strip() for x in str(e).splitlines() if x.strip().startswith("Unsupported")), "")
            detail = ": " + detail if detail else ""
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


def checkpoint_kind(ckpt):
    """Which of KINDS a loaded file is, told by the keys each script writes."""
    if isinstance(ckpt, dict):
        for key, kind in (("model_config", "vlm"), ("decoder_config", "lm"), ("vit_config", "vit"),
                          ("p_ref", "scores"), ("shards", "score-index")):
            if key in ckpt:
                return kind
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return "state-dict"
    return "unknown"


def load_checkpoint(path, kind=None, flag=""):
    """A checkpoint, loaded safely; with `kind` (a KINDS key), one line naming the file, what it is and what was
    expected when it is another kind (never a KeyError further on). flag: the option that named it, for the message."""
    if str(path).startswith("hf:"):  # a Hugging Face Llama folder, converted on the fly by scale/hf.py
        return plugin("hf_checkpoint", flag or path)(path, kind, flag)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}no checkpoint at {path}")
    ckpt = safe_load(path, f"{flag}: {path}" if flag else path)
    found = checkpoint_kind(ckpt)
    if kind is not None and found != kind:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is {KINDS[found]}, not {KINDS[kind]} as expected")
    return ckpt


def make_optimizer(params, lr, weight_decay):
    """AdamW with decay on matrices only (norms, biases and 1-d gains are not decayed)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


# ---- distributed ---------------------------------------------------------------------------------------------------
# Several processes (torchrun): set-up, DDP or FSDP2 wrapping, and unsharded state for checkpoints.
#
# One process needs none of it: setup_distributed returns rank 0 of 1 and train.py (and reference_lm.py) trains the
# bare model. Sharding (--fsdp) is scale/fsdp.py's.


def check_bf16(device):
    """Training on a GPU runs under bf16 autocast (utils.autocast); refuse GPUs without bf16 (V100, T4), whose
    fp16 would need a GradScaler this project does not have."""
    if str(device).startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16, which training on a GPU needs (fp16 "
                         f"with loss scaling is not implemented): use --device cpu or a GPU with bf16 (A100 or newer)")


def setup_distributed(device, bf16=True):
    """(rank, world size, this process's device) under torchrun, or (0, 1, device) alone; GPUs must have bf16
    (bf16=False: a float32 job, score.py's)."""
    if bf16:
        check_bf16(device)
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


def full_state(model, opt, sharded):
    """Weights and optimizer state as one unsharded process holds them (sharded: scale/fsdp.py gathers them onto
    rank 0, a collective every rank joins), so a checkpoint of a sharded run loads anywhere."""
    if sharded:
        return PLUGINS["fsdp_full_state"](model, opt)
    return model.state_dict(), opt.state_dict()


def wait_until(ready, poll=1.0):
    """Poll ready() until it holds: for files another rank writes (not a barrier: decoding a large image set can
    outlast a collective's timeout; if that rank fails, torchrun stops the others)."""
    while not ready():
        time.sleep(poll)


def wrap(model, opt, cfg, world, device, master):
    """(train_model, opt): the model as the step runs it: sharded in place (--fsdp), inside DDP, compiled."""
    train_model = model
    if cfg.fsdp and world == 1 and master:
        print("--fsdp: one process, nothing to shard; training unsharded")
    if cfg.fsdp and world > 1:  # FSDP2: scale/fsdp.py
        opt = plugin("fsdp", "--fsdp")(model, opt, cfg, device)
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None)
    if getattr(cfg, "compile", False):
        train_model = torch.compile(train_model, dynamic=True)  # batch shapes change every step (tight packing)
    return train_model, opt


def reduce_stats(stats, nll_by_tag, world, device):
    """Sum every figure over the processes, so the log covers the global batch."""
    if world > 1:
        keys = ("loss", "ntp", "aux", "tokens", "positions", "padding", "images", "context", "attended")
        packed = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU only
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


def full_weights(model, sharded):
    """The model's weights as CPU copies that outlive training (sharded: gathered onto rank 0 by scale/fsdp.py, a
    collective every rank joins; the others get {})."""
    if sharded:
        return PLUGINS["fsdp_full_weights"](model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---- health --------------------------------------------------------------------------------------------------------
# Alarms for the ways PRIOR goes wrong on a user's own data, as small pure functions (tests feed them made-up
# numbers). Used by reference_lm.py (validation split, memorising), train.py (the caption language being
# unlearned) and score.py (collapsed weights). docs/own_data.md explains each alarm and what to do about it.


VAL_MIN = 64  # captions: below this a validation NLL is too noisy to pick a checkpoint by


def val_split_size(n, fraction=0.05, minimum=VAL_MIN):
    """Captions to hold out for validation out of n: the larger of fraction x n and `minimum`, but never more
    than a quarter of the captions (the rest must still train the LM), and at least 1 (when n >= 2)."""
    if n < 2:
        return 0
    return max(1, min(max(int(n * fraction), minimum), n // 4))


def memorising(history):
    """A warning (str) when validation NLL rose between two evaluations while the training loss fell (the LM
    is learning its training captions by heart), else None. history: [{"step", "train_loss", "val_nll"}]."""
    for a, b in zip(history, history[1:]):
        if b["val_nll"] > a["val_nll"] and b["train_loss"] < a["train_loss"]:
            return (f"validation NLL rose from {a['val_nll']:.3f} (step {a['step']}) to {b['val_nll']:.3f} "
                    f"(step {b['step']}) while the training loss fell ({a['train_loss']:.3f} -> "
                    f"{b['train_loss']:.3f}): the LM is memorising its captions (too few captions for --steps; "
                    f"fewer --steps, more captions or a smaller model fit better)")
    return None


def nll_rise(ntp, warmup, window=20, margin=0.1, min_rise=0.2, hold=None):
    """Has the plain caption NLL risen clearly and lastingly above its level at the end of warm-up? ntp: the
    per-step values so far (log.jsonl's "ntp", step 1 first). The baseline is the mean of the `window` values ending
    at warm-up's end; the level at a step is the mean of the `window` values ending there (a running mean, so one
    bad batch does not count); the threshold is baseline + max(min_rise, margin x baseline).

    A healthy run often climbs for a while right after warm-up (the lr at its peak) and then falls far below its
    start; unlearning climbs and keeps climbing. So it takes both: the level above the threshold at each of the
    last `hold` steps (2 x window unless given: longer than the bump after warm-up takes to turn), and the level now
    no less than half way from the threshold to the highest of those (still up: not a bump on its way down).
    Returns (baseline, current) then, else
    None; never before warm-up + window + hold steps (without warm-up, the first `window` steps are the baseline)."""
    hold = 2 * window if hold is None else hold
    end = max(warmup, window)
    if len(ntp) < end + window + hold - 1:
        return None
    base = ntp[max(0, end - window):end]
    baseline = sum(base) / len(base)
    threshold = baseline + max(min_rise, margin * baseline)
    levels = [sum(ntp[t - window:t]) / window for t in range(len(ntp) - hold + 1, len(ntp) + 1)]
    if min(levels) > threshold and levels[-1] - threshold >= (max(levels) - threshold) / 2:
        return baseline, levels[-1]
    return None


def nll_alarm_message(loss, baseline, current, step):
    return (f"ALARM: the plain caption NLL (ntp) rose from {baseline:.3f} at the end of warm-up to {current:.3f} "
            f"(mean of the last steps, step {step}) while --loss {loss} trains: the model is unlearning the caption "
            f"language. Likely causes: an overfit reference LM (p_ref near 1, weights near 0: check reference_lm.py's "
            f"kept step and score.py's report), the whole decoder training without a text mix (use --train projector "
            f"for the H-LVLM, --text-data for the U-LVLM), or --alpha too high. See docs/own_data.md")


def weight_collapse(p_ref, near_zero=0.05, caption_share=0.9, max_token_share=0.75, max_caption_share=0.1):
    """Do PRIOR's weights w = 1 - p_ref collapse to zero? p_ref: per-caption 1-d tensors (scores of caption tokens
    then <|eos|>; eos is left out here). Returns (stats, warning or None): stats = {"tokens_near_zero": share of
    tokens with w < near_zero, "captions_near_zero": share of captions with more than caption_share of their tokens
    near zero}. A warning when either share is above its limit (the reference LM predicts the captions it scores
    almost perfectly: it has memorised them, or saw them in training)."""
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


def past_ntp(log_path, upto):
    """(ntp values of steps 1..upto, the alarm already raised or None) from a run's log.jsonl, for --resume."""
    import json
    import os
    if not upto or not os.path.exists(log_path):
        return [], None
    values, alarm = {}, None
    with open(log_path, errors="replace") as f:  # a torn line (a full disk while logging) is skipped, never fatal
        for text in f:
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and isinstance(line.get("step"), int) and line["step"] <= upto:
                values[line["step"]] = line.get("ntp", float("nan"))
                alarm = alarm or line.get("alarm")
    return [values[k] for k in sorted(values)], alarm


class Alarm:
    """The unlearning alarm (health.nll_rise) over a weighted run's plain caption NLL; resumed runs read the log."""
    def __init__(self, cfg, log_path, step, master):
        self.cfg, self.on = cfg, master and cfg.loss != "ntp"
        self.ntp, self.message = past_ntp(log_path, step) if self.on else ([], None)

    def watch(self, line, step):
        if not self.on:
            return
        self.ntp.append(line["ntp"])
        rise = None if self.message else nll_rise(self.ntp, self.cfg.warmup, window=max(5, min(20, self.cfg.warmup)))
        if rise:
            self.message = line["alarm"] = nll_alarm_message(self.cfg.loss, *rise, step + 1)
            tqdm.write(self.message, file=sys.stderr)

    def summary(self):
        if self.on and self.ntp:
            print(f"caption NLL (ntp): {self.ntp[0]:.3f} at step 1, {self.ntp[-1]:.3f} at step {len(self.ntp)}"
                  + (f"\n{self.message}" if self.message else ""), file=sys.stderr if self.message else sys.stdout)


# ---- the run's log ---------------------------------------------------------------------------------------------------


class RunLog:
    """log.jsonl opened for appending, and, with --wandb PROJECT, a Weights & Biases run (scale/wandb_log.py).
    write(line) writes one JSON line (flushed, so a killed run keeps its lines) and logs the same dict to wandb."""

    def __init__(self, path, project="", config=None, out_dir=None):
        self.file = open(path, "a")
        out_dir = out_dir or os.path.dirname(path) or "."
        self.run = plugin("wandb", "--wandb")(project, config or {}, out_dir, id_path=os.path.join(out_dir, "wandb_id")) \
            if project else None

    def write(self, line):
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(line, step=int(line["step"]))

    def close(self):
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---- flag_checks ---------------------------------------------------------------------------------------------------
# What each script's flags may be: ranges and cross-checks, as mixins of the scripts' config dataclasses
# (`class TrainConfig(TrainChecks)`), so a script keeps its fields and this file the rules. utils.validate calls
# check() on the command line's values (parse_config, run); a config built in code (tests) is not checked.
#
#     python train.py --steps 0      # error: --steps 0: allowed values are an integer >= 1 (optimizer steps)
#
# Each rule is one line here: check_ranges(name=min or (min, max)), check_warmup (--warmup below --steps),
# check_divisible (attention heads split the width). A float with a bound must be finite (no nan, no inf).


FRACTION = (0.0, 1.0)


class TrainChecks:
    def check(self):
        check_ranges(self, steps=1, batch_size=1, micro_batch=0, row_len=1, warmup=0, lr=0.0, alpha=0.0, save_every=1,
                     image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1, n_layer=1, n_head=1, d_model=1,
                     weight_decay=0.0, grad_clip=0.0, text_ratio=0.0, aux_weight=0.0, rho1_keep=FRACTION,
                     oracle_low=FRACTION, itc_dim=1, stop_at=0, max_bad_fraction=FRACTION, workers=0, threads=0,
                     peak_tflops=0.0)
        check_warmup(self)
        check_divisible(self, "d_model", "n_head")
        check_divisible(self, "vit_dim", "vit_heads")


class RefChecks:
    def check(self):
        check_ranges(self, val_fraction=FRACTION, n_layer=1, n_head=1, d_model=1, row_len=2, batch_rows=1, steps=0,
                     lr=0.0, warmup=0, weight_decay=0.0, eval_every=0, patience=0, max_bad_fraction=FRACTION,
                     max_epochs=1e-9)
        if self.steps:  # --steps 0: sized to the data, and the warm-up with it (reference_lm.size_steps)
            check_warmup(self)
        check_divisible(self, "d_model", "n_head")


class ScoreChecks:
    def check(self):
        check_ranges(self, row_len=1, batch_rows=1, chunk=1, report_captions=0, max_bad_fraction=FRACTION)


class EvalChecks:
    def check(self):
        check_ranges(self, max_rows=0, row_len=1, batch_rows=1, max_bad_fraction=FRACTION, threads=0)


class VisionChecks:
    def check(self):
        check_ranges(self, val_fraction=FRACTION, image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1,
                     steps=1, batch_size=1, lr=0.0, warmup=0, weight_decay=0.0, grad_clip=0.0, pixel_noise=0.0,
                     eval_every=0, max_bad_fraction=FRACTION, workers=0, threads=0)
        check_warmup(self)
        check_divisible(self, "vit_dim", "vit_heads")
        check_divisible(self, "image_size", "patch_size")


class TokenizerChecks:
    SMALLEST_VOCAB = 7 + 256  # byte-level BPE starts from the 7 specials (data/tokenizer.SPECIALS) and all 256 bytes

    def check(self):
        check_ranges(self, vocab_size=self.SMALLEST_VOCAB, max_bad_fraction=FRACTION)


class AttnChecks:
    def check(self):
        check_ranges(self, image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1, d_model=1, n_layer=0,
                     n_head=1, steps=1, batch_size=1, lr=0.0, budget=0.0, threads=0, max_bad_fraction=FRACTION,
                     workers=0)
        check_divisible(self, "d_model", "n_head")
        check_divisible(self, "vit_dim", "vit_heads")
