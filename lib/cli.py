"""Command-line flags from a config dataclass, so each script has one source of truth.

Every script keeps its settings in one `@dataclass` whose fields carry a help text:

    @dataclass
    class Config:
        steps: int = field(default=300, metadata={"help": "optimizer steps"})

    cfg = parse_config(Config, description=__doc__)   # python script.py --steps=500

(`steps: int = flag(300, "optimizer steps")` is the same field, shorter.) A `positional("help")` field is given
by position (`python -m lib.hf FOLDER`); a name with a trailing underscore drops it (`from_` is `--from`).

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
    """A required config field given by position, not as a --flag (`python -m lib.hf FOLDER`); it has no default,
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
