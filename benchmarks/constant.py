"""Constant-answer baselines of an MMBench-style multiple-choice TSV under CircularEval, computed exactly.

A constant model with answer text T picks, in every question, the first choice whose text equals T (exact string
equality, after the reader's whitespace strip) when T is offered, else the fallback position (--fallback: the first
choice by default). Scoring is the benchmark's own: the TSV is read by benchmarks/formats.read_tsv (kind mmbench),
given its circular copies by benchmarks/metrics.rotations (a file with its own copies is kept as it is) and scored
by benchmarks/metrics.circular_metrics (a question counts only if every rotation of its choices is right).

    python -m benchmarks.constant --tsv data_web/bench/synth_mcq.tsv --json constant_baselines.json

Two baselines, each maximised over T exactly (every choice text of the file, and "no T": the fallback alone,
which is what any T never offered gives):
    single         one T for the whole file: its circular accuracy (%)
    per_category   one T per category (the TSV's category column): each category's best, and the circular
                   accuracy of that rule over the whole file
Ties are broken by the T that sorts first (the fallback alone, null, before any text). A T is offered in every
rotation of a question or in none (rotations keep the set of choices), so it is right on every rotation exactly
when it is the answer (and not a repeated text); the fallback picks the same position in every rotation while the
answer's position moves through all of them, so it never gets a question right. The numbers therefore do not
depend on the fallback rule (for a file with its own copies: as long as they are true rotations).
"""
import hashlib
import json
import os
from dataclasses import dataclass

from benchmarks.formats import read_tsv
from benchmarks.metrics import circular_metrics, rotations
from utils import UserError, atomic_write, check_out, flag, run

FALLBACKS = ("first", "last", "none")


def constant_pred(choices, text, fallback="first"):
    """The choice index a constant model with answer `text` gives (None: no text, the fallback alone)."""
    if text is not None and text in choices:
        return choices.index(text)
    return {"first": 0, "last": len(choices) - 1, "none": -1}[fallback]


def candidates(records):
    """Every T worth trying: None (the fallback alone; any T never offered scores the same) and each choice text."""
    return [None] + sorted({c for r in records for c in r.extra["choices"]})


def _key(text):
    return (text is not None, text or "")  # None first, then texts in sorted order


def _category(record):
    return record.extra.get("category") or ""


def circular(rotated, rule, fallback="first"):
    """The circular accuracy (%) of the constant model whose T is rule(record) on each (rotated) record."""
    preds = [constant_pred(r.extra["choices"], rule(r), fallback) for r in rotated]
    return circular_metrics(rotated, preds)["circular"]


def best_constant(rotated, fallback="first"):
    """{"text", "circular", "tied", "questions"}: the T with the highest circular accuracy on these rows."""
    scores = {t: circular(rotated, lambda r, t=t: t, fallback) for t in candidates(rotated)}
    top = max(scores.values())
    tied = sorted((t for t, v in scores.items() if v == top), key=_key)
    return {"text": tied[0], "circular": top, "tied": tied, "questions": len({r.extra["group"] for r in rotated})}


def constant_baselines(records, fallback="first"):
    """{"questions", "rows_scored", "fallback", "single": best_constant, "per_category": {"circular": the
    per-category rule's over all rows, "categories": {category: best_constant of its rows}}} for records as
    read_tsv returns them (given their rotations here). Rows without a category form the category ""."""
    rotated = rotations(records)
    cats = {}
    for r in rotated:
        cats.setdefault(_category(r), []).append(r)
    per_cat = {c: best_constant(rows, fallback) for c, rows in sorted(cats.items())}
    overall = circular(rotated, lambda r: per_cat[_category(r)]["text"], fallback)
    single = best_constant(rotated, fallback)
    return {"questions": single.pop("questions"), "rows_scored": len(rotated), "fallback": fallback,
            "single": single, "per_category": {"circular": overall, "categories": per_cat}}


@dataclass
class ConstantConfig:
    tsv: str = flag("", "the MMBench-style TSV (VLMEvalKit's columns index, question, A, B, ..., answer, category, "
                    "image)")
    json: str = flag("", "also write the results to this JSON file (atomically)")
    fallback: str = flag("first", "the choice picked where T is not offered: first or last choice, or none "
                         "(no answer, always wrong)", choices=FALLBACKS)
    max_bad_fraction: float = flag(0.05, "refuse the file when more than this share of its rows is malformed",
                                   min=0.0, max=1.0)


def main(cfg):
    if not cfg.tsv:
        raise UserError("give --tsv (an MMBench-style TSV, e.g. data_web/bench/synth_mcq.tsv)")
    if not os.path.isfile(cfg.tsv):
        raise UserError(f"--tsv {cfg.tsv}: no such file")
    if cfg.json:
        check_out(cfg.json, flag="--json")
    with open(cfg.tsv, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    records = read_tsv(cfg.tsv, "mmbench", cfg.max_bad_fraction)
    out = {"tsv": cfg.tsv, "tsv_sha256": digest} | constant_baselines(records, cfg.fallback)
    s, pc = out["single"], out["per_category"]
    print(f"{out['questions']} questions ({out['rows_scored']} rotated rows), fallback {cfg.fallback}")
    print(f"best single constant: {s['text']!r} circular {s['circular']:.2f}%"
          + (f" (tied: {', '.join(map(repr, s['tied']))})" if len(s["tied"]) > 1 else ""))
    print(f"best constant per category: circular {pc['circular']:.2f}%")
    for c, v in pc["categories"].items():
        print(f"  {c or '(none)'}: {v['text']!r} circular {v['circular']:.2f}% of {v['questions']} questions"
              + (f" (tied: {', '.join(map(repr, v['tied']))})" if len(v["tied"]) > 1 else ""))
    if cfg.json:
        atomic_write(cfg.json, json.dumps(out, indent=1) + "\n")
        print(f"wrote {cfg.json}")
    return out


if __name__ == "__main__":
    run(main, ConstantConfig, description=__doc__)
