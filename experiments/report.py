"""Regenerate results.md and its plots from a results.json (the tables, statistics and the primary endpoint are
experiments/reporting.py's; its docstring says what they mean):

    python -m experiments.report --results results/main/results.json --out results/main/
"""
import argparse
import json
import sys

from experiments.reporting import parse_rows, write_report


def read_rows(path):
    """The rows of a results.json, or exit with one line naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            return parse_rows(json.load(f))
    except (OSError, ValueError) as e:
        sys.exit(f"report.py: --results {path}: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="out/results.json", help="JSON list of evaluation rows (results.json)")
    p.add_argument("--out", default="out", help="folder for results.md and the PNG plots (created if missing)")
    p.add_argument("--no-plots", action="store_true", help="write results.md only (same text), skip the PNGs")
    args = p.parse_args(argv)
    print(write_report(read_rows(args.results), args.out, source=args.results, plots=not args.no_plots))


if __name__ == "__main__":
    main()
