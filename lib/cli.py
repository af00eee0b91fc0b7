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
import dataclasses
import os
import sys
import typing


class UserError(ValueError):
    """A mistake of the user's (flag, file, resume), not a bug: run() prints it as one line. A ValueError, so
    code that catches ValueError keeps working."""


def flag(default, help, choices=None):
    """A config field with its --help text (and the values argparse accepts)."""
    return dataclasses.field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


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
    args = parser.parse_args(argv)
    return cls(**vars(args))


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
    """A script's entry point: parse `cls`'s flags, call main(cfg); a UserError becomes `error: ...` and exit 2."""
    cfg = parse_config(cls, argv, description)
    try:
        return main(cfg)
    except (UserError, FileNotFoundError) as e:  # a missing file is the user's too (the message names it)
        if os.environ.get("PRIOR_DEBUG") or getattr(cfg, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
