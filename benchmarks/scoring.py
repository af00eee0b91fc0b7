"""Scoring the paper's benchmarks (eval.py --bench) with the project's multiple-choice scorer, by likelihood:
each choice's log p(choice | image, prompt), summed over its tokens, and per-token mean (`<name>_norm_<metric>`);
the highest is the model's answer, a yes/no question a two-choice one. Yes/no benchmarks (POPE, MME) are decided
by each answer's first token instead (the summed score: `<name>_sum_<metric>`): "yes" is 2 BPE tokens and "no" 1
in a small vocabulary, and a greedy decoder, whose answer the official parsers read, decides by the first token.
The metrics are benchmarks/metrics.py's; the files are read by benchmarks/load.py. See docs/benchmarks.md.

    python -m benchmarks eval --ckpt runs/x/ckpt_000300.pt --bench pope:coco_pope_random.json::coco/val2014 \\
        --bench pope:coco_pope_popular.json::coco/val2014 --bench mme:MME_Benchmark_release_version \\
        --bench mmbench:MMBench_DEV_EN.tsv --bench mmstar:MMStar.tsv --bench seed:SEED-Bench.json::SEED-Bench-image

With --bench-generate N each question is also answered by greedy decoding (KV cache) and matched by the rule of
the benchmark's own scoring code (answer_rule, match_answer): <bench>_gen_<metric>, and <bench>_gen_unmatched, the
% of answers that rule cannot place. Results are named <bench>_<metric> (pope_random_f1, mme_perception,
mmbench_circular, mmstar_acc, seed_acc, ...); POPE's splits are scored together, so pope_f1 pools them, as
VLMEvalKit's "Overall". Registered as eval.py's plug-ins "bench" and "bench_table" (utils.register): the core never
imports this folder. Yes/no benchmarks also give <bench>_tail_logp: the mean log p of a choice's tokens after its
first, in nats (the "es" of "yes"): how far the summed score holds a 2-token "yes" back (docs/benchmarks.md).
"""
import math
import os
import re

import torch

from data import tokenizer as T
from benchmarks.metrics import bench_metrics, rotations
from benchmarks.load import load_bench, mc_prompt, parse_bench, report_skipped
from eval import image_embeds, score_docs
from utils import UserError, register

# the few numbers of each benchmark the table shows (eval.json has them all)
HEADLINE = {"pope": ("f1", "acc", "yes_ratio", "precision", "recall"), "mme": ("perception", "cognition"),
            "mmbench": ("circular", "vanilla"), "seed": ("acc",), "mmstar": ("acc",), "seed_tsv": ("acc",),
            "tsv": ("acc",)}


def bench_names(specs):
    """{name: [specs]}: every POPE file under "pope", every other kind under its kind (a kind given twice:
    "<kind>_<file stem>")."""
    kinds = [parse_bench(s)[0] for s in specs]
    out = {}
    for spec, kind in zip(specs, kinds):
        name = kind
        if kind != "pope" and kinds.count(kind) > 1:
            name = f"{kind}_{os.path.splitext(os.path.basename(os.path.normpath(parse_bench(spec)[1])))[0]}"
        out.setdefault(name, []).append(spec)
    return out


def _prompt(extra, options):
    return mc_prompt(extra["question"], options, extra.get("hint", ""))


def predictions(logps, normalise=False, first=False):
    """The choice with the highest summed (or per-token mean, or first-token) log-likelihood; None where not
    scored."""
    def score(c):
        return float(c[0]) if first else float(c.sum()) / (len(c) if normalise else 1)
    return [None if lp is None else max(range(len(lp)), key=lambda j: score(lp[j])) for lp in logps]


def score_spec(spec, model, tok, device="cpu", max_rows=None, seed=0,
               max_bad_fraction=0.05, feature_cache="", **kw):
    """(records, per record the choices' log p tensors or None) of one --bench spec; MMBench files without
    circular copies get them here (bench_metrics.rotations)."""
    size = model.cfg.image_size
    records, images, index = load_bench(spec, size, max_rows, seed, max_bad_fraction)
    pairs = list(zip(records, index))
    if parse_bench(spec)[0] == "mmbench":
        at = {r.id: i for r, i in pairs}
        rotated = rotations(records, _prompt)
        pairs = [(r, at[r.id.split("@")[0]] if r.id not in at else at[r.id]) for r in rotated]
    prefix = model.image_tokens() + [T.BOS]
    prompts = T.encode_captions(tok, [r.caption for r, _ in pairs])
    choices = iter(T.encode_captions(tok, [c for r, _ in pairs for c in r.extra["choices"]]))
    docs = [(i, prefix + p, [next(choices) for _ in r.extra["choices"]]) for (r, i), p in zip(pairs, prompts)]
    embeds = image_embeds(model, images, ("bench", spec, size, max_rows, seed), device, feature_cache=feature_cache)
    name = os.path.basename(os.path.normpath(parse_bench(spec)[1]))
    return [r for r, _ in pairs], score_docs(model, docs, embeds, device=device, desc=name, **kw)


# ----------------------------------------------------------------------------- matching generated answers
# Each yes/no benchmark is scored by its own code's rule (docs/benchmarks.md has a table of what each gives on tricky
# answers); they disagree often enough ("NO", "Not sure", "There is no dog.") that only the benchmark's own rule
# gives numbers comparable with published ones. Each returns 0 (yes), 1 (no) or -1 (neither: wrong).

def pope_yes_no(text):
    """POPE's evaluate.py: the text before the first ".", commas dropped, split on spaces; "no" if a word is
    exactly No, no or not (case-sensitive: "NO" and "No!" are yes), else "yes". Never -1."""
    words = str(text).split(".")[0].replace(",", "").split(" ")
    return 1 if {"No", "no", "not"} & set(words) else 0


def mme_yes_no(text):
    """MME's calculation.py: lower-cased, exactly "yes" / "no", else "yes" anywhere in the first four characters,
    else "no" there ("not sure" is no), else neither (-1, wrong)."""
    t = str(text).lower()
    if t in ("yes", "no"):
        return ("yes", "no").index(t)
    return 0 if "yes" in t[:4] else 1 if "no" in t[:4] else -1


_VLMEVALKIT_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # exactly its list: others (":", "'") stay


def vlmevalkit_yes_no(text):
    """VLMEvalKit's yes/no extraction: lower-cased, its punctuation cleaning (each of ; / [ ] " { } ( ) = + \\ _ - >
    < @ ` , ? ! deleted everywhere if it touches a space somewhere in the answer or the answer has a comma between
    two digits, else made a space; a "." not beside a digit deleted), split into words; "yes" if the words hold
    yes and not no, "no" if no and not yes, else -1 (its "Unknown", wrong: no LLM judge here)."""
    low = str(text).lower()
    glue = re.search(r"\d,\d", low) is not None
    t = low
    for p in _VLMEVALKIT_PUNCT:
        t = t.replace(p, "" if glue or p + " " in low or " " + p in low else " ")
    words = set(re.sub(r"(?<!\d)\.(?!\d)", "", t).split())
    if ("yes" in words) != ("no" in words):
        return 0 if "yes" in words else 1
    return -1


YES_NO_RULES = {"pope": pope_yes_no, "mme": mme_yes_no, "vlmevalkit": vlmevalkit_yes_no}


def answer_rule(spec):
    """The matching rule of a --bench spec: "pope" (POPE's json-lines), "mme" (MME's folders), "vlmevalkit"
    (VLMEvalKit's POPE.tsv / MME.tsv), "choice" for every multiple-choice kind, even one whose options are yes/no."""
    kind, path, _ = parse_bench(spec)
    if kind in ("pope", "mme"):
        return "vlmevalkit" if path.endswith(".tsv") else kind
    return "choice"


def match_answer(text, choices, rule="choice"):
    """The choice a generated answer names, or -1. rule "pope", "mme", "vlmevalkit": a yes/no question (choices
    yes, no) read by that benchmark's rule (YES_NO_RULES); "choice": a leading option letter ("B", "B.", "(B)",
    "B:"; capital), else the one choice whose text the answer contains (VLMEvalKit's exact matching, no judge)."""
    from benchmarks.qa_eval import normalise_answer
    if rule != "choice":
        return YES_NO_RULES[rule](text)
    head = str(text).strip().lstrip("(")
    letters = [chr(65 + j) for j in range(len(choices))]
    if head[:1] in letters and (len(head) == 1 or head[1] in ".):,"):  # "A dog" is no letter, "A." is
        return letters.index(head[0])
    said = " ".join(normalise_answer(text).replace(",", " ").split())
    hits = [j for j, c in enumerate(choices) if normalise_answer(c) and f" {normalise_answer(c)} " in f" {said} "]
    return hits[0] if len(hits) == 1 else -1


def generated_predictions(spec, records, model, tok, device="cpu", max_new_tokens=16, max_rows=None, seed=0,
                          max_bad_fraction=0.05, **_):
    """Each record's greedy answer (KV-cached, benchmarks/qa_eval.generate_answers) matched to a choice index by the
    spec's rule (answer_rule, match_answer; -1: none), None where the prompt leaves no room in the context."""
    from benchmarks.qa_eval import generate_answers
    loaded, images, index = load_bench(spec, model.cfg.image_size, max_rows, seed, max_bad_fraction)
    at = {r.id: i for r, i in zip(loaded, index)}
    which = torch.tensor([at[r.id.rsplit("@", 1)[0] if r.id not in at else r.id] for r in records], dtype=torch.long)
    answers = generate_answers(model, tok, [r.caption for r in records], images[which], device, max_new_tokens)
    rule = answer_rule(spec)
    return [None if a is None else match_answer(a, r.extra["choices"], rule) for a, r in zip(answers, records)]


def check_pope_splits(specs, size, max_rows=None, seed=0, max_bad_fraction=0.05, **_):
    """Refuse two POPE files that hold the same split (e.g. COCO's and A-OKVQA's coco_pope_random.json /
    aokvqa_pope_random.json): pooled into one pope_random_* they would give a number neither paper reports."""
    holder = {}
    for spec in specs:
        for split in dict.fromkeys(s for r in load_bench(spec, size, max_rows, seed, max_bad_fraction)[0]
                                   for s in r.extra["splits"]):
            if split in holder:
                raise UserError(f"--bench {holder[split]} and --bench {spec} both hold POPE split {split!r}: give "
                                f"each split once (score another POPE set in a separate command)")
            holder[split] = spec


@register("bench")
def bench_results(specs, model, tok, device="cpu", generate=0, **kw):
    """{<bench>_<metric>: value} of every --bench spec (kw: max_rows, seed, max_bad_fraction, feature_cache,
    row_len, batch_rows); questions longer than the model's context are counted as <bench>_skipped. generate=N:
    also answer by greedy decoding of up to N tokens, matched like the benchmarks (<bench>_gen_<metric>)."""
    out = {}
    for name, group in bench_names(specs).items():
        if name == "pope" and len(group) > 1:  # before any scoring: the files are read (and cached) here
            check_pope_splits(group, model.cfg.image_size, **kw)
        records, logps, gen = [], [], []
        for spec in group:
            r, lp = score_spec(spec, model, tok, device, **kw)
            records += r
            logps += lp
            if generate:
                gen += generated_predictions(spec, r, model, tok, device, generate, **kw)
        kind = parse_bench(group[0])[0]
        scored = [i for i, lp in enumerate(logps) if lp is not None]
        if not scored:
            out[f"{name}_skipped"] = len(records)
            continue
        # yes/no: decided by each answer's first token ("yes" is 2 BPE tokens, "no" 1: summed, the 2-token answer
        # pays for its second token as well), which is also what a greedy decoder decides first and what the
        # benchmarks' own parsers read of a generated answer; the summed score stays as <bench>_sum_<metric>
        yes_no = kind in ("pope", "mme")
        for suffix, norm, first in ((("", False, True), ("_sum", False, False)) if yes_no else (("", False, False),)) \
                + (("_norm", True, False),):
            preds = predictions(logps, norm, first)
            metrics = bench_metrics(kind, [records[i] for i in scored], [preds[i] for i in scored])
            out.update({f"{name}{suffix}_{k}": v for k, v in metrics.items()})
        tails = [float(c[1:].sum()) for i in scored for c in logps[i] if len(c) > 1]
        if kind in ("pope", "mme") and tails:  # "yes" is often 2 BPE tokens, "no" 1: is its 2nd token learnt?
            out[f"{name}_tail_logp"] = sum(tails) / len(tails)
        answered = [i for i, p in enumerate(gen) if p is not None]
        if answered:  # generation-based, as VLMEvalKit scores (exact matching, no LLM judge)
            metrics = bench_metrics(kind, [records[i] for i in answered], [gen[i] for i in answered])
            out.update({f"{name}_gen_{k}": v for k, v in metrics.items()})
            out[f"{name}_gen_unmatched"] = 100.0 * sum(gen[i] == -1 for i in answered) / len(answered)
        report_skipped(out, name, len(records) - len(scored), len(records), "questions")
    return out


@register("bench_table")
def bench_table(results, specs):
    """A small Markdown table of each benchmark's headline numbers from {benchmark: value} (summed / mean); POPE
    shows its splits pooled (VLMEvalKit's "Overall") when there are several, else its one split."""
    gen = any("_gen_" in k for k in results)
    lines = ["| benchmark | metric | summed | per-token |" + (" generated |" if gen else ""),
             "|---|---|---|---|" + ("---|" if gen else "")]
    for name, group in bench_names(specs).items():
        kind = parse_bench(group[0])[0]
        for metric in HEADLINE[kind]:
            keys = [f"{name}_{metric}"]
            if kind == "pope" and keys[0] not in results:  # one split: its own numbers
                keys = [k for k in results if k.endswith("_" + metric) and "_norm_" not in k and k.count("_") >= 2
                        and k.startswith(name + "_")]
            for k in (k for k in keys if k in results):
                v, w = results[k], results.get(k.replace(name + "_", name + "_norm_", 1), math.nan)
                g = f" {results.get(k.replace(name + '_', name + '_gen_', 1), math.nan):.2f} |" if gen else ""
                lines.append(f"| {name} | {k[len(name) + 1:]} | {v:.2f} | {w:.2f} |{g}")
    return "\n".join(lines)
