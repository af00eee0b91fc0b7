"""Project style limits: no source line over 120 characters, and every --help text a one-liner of at most 100.

Config dataclasses are checked on their imported field metadata (so f-string help texts count at their real
length); argparse scripts are checked by parsing their source for `help=` string constants. cli.parse_config
appends " (default: X)" itself, which is not counted.
"""
import ast
import dataclasses
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINE = 120
MAX_HELP = 100
# Modules whose config dataclasses become command-line flags through cli.parse_config.
CONFIG_MODULES = ["train", "eval", "score", "reference_lm", "experiments.experiment", "bench.bench",
                  "tools.vision", "baselines.attention", "tools.caption", "data.tokenizer", "world.generate",
                  "experiments.paper", "experiments.report", "scale.hf", "scale.shards", "benchmarks.qa"]
# Scripts that build their flags with argparse directly.
ARGPARSE_SCRIPTS = []


def project_files():
    files = []
    folders = ("data", "tests", "experiments", "baselines", "tools", "benchmarks", "scale", "bench")
    for folder in (ROOT, *(ROOT / d for d in folders)):
        files += sorted(folder.glob("*.py"))
    return files


def test_no_line_over_120_characters():
    files = project_files()
    assert len(files) > 20 and ROOT / "train.py" in files
    long = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if len(line) > MAX_LINE:
                long.append(f"{path.relative_to(ROOT)}:{n} ({len(line)} chars)")
    assert not long, f"{len(long)} lines over {MAX_LINE} characters:\n" + "\n".join(long)


def config_classes():
    found = []
    for name in CONFIG_MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == module.__name__
                    and any("help" in f.metadata for f in dataclasses.fields(value))):
                found.append(value)
    return found


def test_config_help_texts_are_short():
    classes = config_classes()
    names = {f"{c.__module__}.{c.__name__}" for c in classes}
    assert {"train.TrainConfig", "score.ScoreConfig", "reference_lm.RefConfig", "tools.vision.Config",
            "eval.EvalConfig", "experiments.experiment.ExperimentConfig", "world.generate.GenConfig",
            "experiments.paper.AblationConfig", "experiments.paper.ScalingConfig", "experiments.paper.BaselinesConfig",
            "experiments.paper.InstructConfig", "experiments.report.ReportConfig", "scale.hf.HfConfig",
            "scale.shards.ShardsConfig"} <= names, names
    long = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            if len(text) > MAX_HELP or "\n" in text:
                long.append(f"{cls.__module__}.{cls.__name__}.{f.name} ({len(text)} chars): {text}")
    assert not long, f"help texts over {MAX_HELP} characters or not one line:\n" + "\n".join(long)


def help_constants(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "help" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    yield kw.value.lineno, kw.value.value


def test_argparse_help_texts_are_short():
    long, count = [], 0
    for name in ARGPARSE_SCRIPTS:
        path = ROOT / name
        for line, text in help_constants(ast.parse(path.read_text(encoding="utf-8"))):
            count += 1
            if len(text) > MAX_HELP or "\n" in text:
                long.append(f"{name}:{line} ({len(text)} chars): {text}")
    assert count >= len(ARGPARSE_SCRIPTS)
    assert not long, f"help texts over {MAX_HELP} characters or not one line:\n" + "\n".join(long)


def test_help_scan_finds_argparse_help_texts():
    """The argparse scan sees help= constants inside nested calls (so a long one would be reported)."""
    src = 'def main():\n    p = make()\n    p.sub().add_argument("--x", type=int, help="' + "y" * 101 + '")\n'
    assert [(line, len(text)) for line, text in help_constants(ast.parse(src))] == [(3, 101)]


def test_flags_come_from_config_dataclasses():
    """One config style: utils.py builds every script's ArgumentParser from its dataclass (ARGPARSE_SCRIPTS:
    the scripts not yet converted)."""
    by_hand = [str(p.relative_to(ROOT)) for p in project_files()
               if p.parent.name != "tests" and "ArgumentParser(" in p.read_text(encoding="utf-8")]
    assert set(by_hand) == {"utils.py", *ARGPARSE_SCRIPTS}, by_hand


def test_positional_and_keyword_named_fields():
    """utils: a positional() field is given by position (scale/hf.py's folder), and a field named with a trailing
    underscore is the flag without it (experiments/paper.py's from_ is --from)."""
    from utils import parse_config
    from scale.hf import HfConfig
    from experiments.paper import AblationConfig
    assert parse_config(HfConfig, ["some/folder", "--out", "o"]) == HfConfig(path="some/folder", out="o")
    assert parse_config(AblationConfig, ["--from", "x"]).from_ == "x"
