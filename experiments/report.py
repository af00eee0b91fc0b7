"""Regenerate results.md and its plots from a results.json (the tables, statistics and the primary endpoint are
experiments/reporting.py's; its docstring says what they mean):

    python -m experiments.report --results results/main/results.json --out results/main/
"""
import json
from dataclasses import dataclass

from experiments.reporting import parse_rows, write_report
from utils import UserError, flag, run


@dataclass
class ReportConfig:
    results: str = flag("out/results.json", "JSON list of evaluation rows (results.json)")
    out: str = flag("out", "folder for results.md and the PNG plots (created if missing)")
    no_plots: bool = flag(False, "write results.md only (same text), skip the PNGs")


def read_rows(path):
    """The rows of a results.json; a UserError naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            return parse_rows(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(f"--results {path}: {e}") from None


def report(cfg):
    print(write_report(read_rows(cfg.results), cfg.out, source=cfg.results, plots=not cfg.no_plots))


def main(argv=None):
    return run(report, ReportConfig, argv, description=__doc__)


if __name__ == "__main__":
    main()
