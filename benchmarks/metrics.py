"""The benchmarks' official metrics, as pure functions of (records, predicted choice index per record), the
records as benchmarks/load.py reads them (extra: "answer", "choices" and the keys a metric groups by).
Percentages are in %, as the benchmarks report them; every function returns {name: value}.

    pope_metrics     per split: acc, precision, recall, f1 (positive = "yes"), yes_ratio; with several splits the
                     plain names pool every (question, split) pair: VLMEvalKit's "Overall" (and mean_f1)
    mme_metrics      per subtask: acc, acc_plus (images with both questions right, over all images), score =
                     acc + acc_plus (200 max); perception = sum over its 10 subtasks, cognition = sum over its 4
    circular_metrics MMBench: circular (a group counts only if every rotation is right), vanilla (the
                     unrotated row of each group), both per category
    category_metrics accuracy per category (MMStar's category, SEED's question type) and overall
    rotations        the circular copies of each question, for files that have none (MMBench test/dev_en.tsv
                     as many users have it: each question once)

    from benchmarks.metrics import pope_metrics
    pope_metrics(records, preds)   # {"random_f1": 85.3, ..., "f1": 85.3}

A prediction of -1 (a generated answer the benchmark's rule cannot place) is wrong everywhere; POPE counts it as
not "yes", as VLMEvalKit does.
"""
from dataclasses import replace

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "ocr")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
OFFSET = 1_000_000  # VLMEvalKit's circular copies of MMBench question g: rows g + k * OFFSET


def _pct(num, den):
    return 100.0 * num / den if den else float("nan")


def pope_counts(records, preds):
    """(tp, fp, tn, fn) with "yes" (choice 0) the positive class; an answer that is neither (-1) is a negative
    prediction, so it is an fn on a "yes" question and counted nowhere (but wrong) on a "no" one."""
    tp = fp = tn = fn = 0
    for r, p in zip(records, preds):
        truth, said = r.extra["answer"] == 0, p == 0
        tp += truth and said
        fp += said and not truth
        tn += not truth and p == 1
        fn += truth and not said
    return tp, fp, tn, fn


def pope_scores(tp, fp, tn, fn, n=None):
    """acc, precision, recall, f1, yes_ratio in % of n questions (default tp + fp + tn + fn; more when some
    answers were neither yes nor no)."""
    precision = _pct(tp, tp + fp) if tp + fp else 0.0
    recall = _pct(tp, tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = tp + fp + tn + fn if n is None else n
    return {"acc": _pct(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": _pct(tp + fp, n)}


def _splits(record):
    e = record.extra
    return e.get("splits") or [e.get("split", "all")]


def pope_metrics(records, preds):
    """Per split: <split>_acc/_precision/_recall/_f1/_yes_ratio; a record counts in every split of its "splits"
    (VLMEvalKit's POPE.tsv stores a question shared by splits once). With several splits the plain names are
    the same numbers over all (question, split) pairs pooled, which is what VLMEvalKit reports as "Overall"
    (its F1) and "acc"; mean_f1 is the unweighted mean of the splits' F1 (as LLaVA's tables average them)."""
    pairs = [(s, r, p) for r, p in zip(records, preds) for s in _splits(r)]
    splits = {}
    for s, r, p in pairs:
        splits.setdefault(s, ([], []))
        splits[s][0].append(r)
        splits[s][1].append(p)
    out, f1s = {}, []
    for split, (rs, ps) in splits.items():
        s = pope_scores(*pope_counts(rs, ps), n=len(rs))
        f1s.append(s["f1"])
        out.update({f"{split}_{k}": v for k, v in s.items()})
    if len(splits) > 1:
        out.update(pope_scores(*pope_counts([r for _, r, _ in pairs], [p for _, _, p in pairs]), n=len(pairs)))
        out["mean_f1"] = sum(f1s) / len(f1s)
    return out


def subtask_name(folder):
    """MME's folder names to the metric's: lower case, spaces to "_" ("OCR" -> "ocr")."""
    return folder.strip().lower().replace(" ", "_")


def mme_metrics(records, preds):
    """Per subtask: <t>_acc, <t>_acc_plus, <t> (their sum); perception and cognition: sums of <t> over the
    subtasks of each that are present (all 10 and 4 in the full benchmark). acc_plus, as MME's calculation.py:
    the share of images whose two questions are both right; an image left with one question (its pair a bad
    row, or not scored) counts as an image but never as both right."""
    tasks = {}
    for r, p in zip(records, preds):
        right = p == r.extra["answer"]
        images = tasks.setdefault(subtask_name(r.extra["subtask"]), {})
        images.setdefault(r.extra["image_key"], []).append(right)
    out = {}
    for t, images in tasks.items():
        answers = [a for v in images.values() for a in v]
        both = sum(len(v) >= 2 and all(v) for v in images.values())
        acc, plus = _pct(sum(answers), len(answers)), _pct(both, len(images))
        out.update({f"{t}_acc": acc, f"{t}_acc_plus": plus, t: acc + plus})
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [t for t in group if t in tasks]
        if present:
            out[name] = sum(out[t] for t in present)
    return out


def _offset(record):
    """k of a row with index g + k * 1e6 (VLMEvalKit's k-th circular copy of question g); 0 without an index."""
    return record.extra.get("index", record.extra["group"]) // OFFSET


def rotations(records, prompt=None):
    """Every question once per circular shift of its options (k options: k rows), answer moved along; the
    copies share the question's extra["group"] and get id "<id>@<shift>"; prompt(extra, options), if given,
    rewrites each copy's caption (a prompt that lists the options). A file that carries its own copies (a row
    with index g + k * 1e6, k >= 1, as VLMEvalKit's circular MMBench TSVs) is returned as it is. Two rows of one
    index are an error (the readers refuse such a file): they are no rotation of each other."""
    seen = {}
    for r in records:
        key = r.extra.get("index", r.extra["group"])
        if key in seen:
            raise ValueError(f"rows {seen[key]} and {r.id} have the same index {key}: not circular copies")
        seen[key] = r.id
    if any(_offset(r) > 0 for r in records):
        return list(records)
    out = []
    for r in records:
        k, choices = len(r.extra["choices"]), r.extra["choices"]
        for s in range(k):
            rolled = choices[s:] + choices[:s]
            extra = dict(r.extra, choices=rolled, answer=(r.extra["answer"] - s) % k, shift=s)
            out.append(replace(r, id=f"{r.id}@{s}", caption=prompt(extra, rolled) if prompt else r.caption,
                               extra=extra))
    return out


def circular_metrics(records, preds, by="category"):
    """circular: share of groups whose every row is right; vanilla: share of groups whose unrotated row (offset
    0, shift 0; else the first) is right; circular_<category> per extra[by] (absent categories are skipped)."""
    groups = {}
    for r, p in zip(records, preds):
        groups.setdefault(r.extra["group"], []).append((r, p == r.extra["answer"]))
    first = [min(g, key=lambda rp: (_offset(rp[0]), rp[0].extra.get("shift", 0)))[1] for g in groups.values()]
    out = {"circular": _pct(sum(all(ok for _, ok in g) for g in groups.values()), len(groups)),
           "vanilla": _pct(sum(first), len(groups))}
    cats = {}
    for g in groups.values():
        cats.setdefault(g[0][0].extra.get(by) or "", []).append(all(ok for _, ok in g))
    out.update({f"circular_{c}": _pct(sum(v), len(v)) for c, v in cats.items() if c})
    return out


def category_metrics(records, preds, by="category"):
    """acc over all questions, acc_<category> per extra[by]; mean_category: their unweighted mean."""
    cats = {}
    for r, p in zip(records, preds):
        cats.setdefault(r.extra.get(by) or "", []).append(p == r.extra["answer"])
    right = [ok for v in cats.values() for ok in v]
    out = {"acc": _pct(sum(right), len(right))}
    named = {c: _pct(sum(v), len(v)) for c, v in cats.items() if c}
    out.update({f"acc_{c}": v for c, v in named.items()})
    if named:
        out["mean_category"] = sum(named.values()) / len(named)
    return out


def bench_metrics(kind, records, preds):
    """The official metrics of a benchmark kind (data/benchmarks.KINDS)."""
    if kind == "pope":
        return pope_metrics(records, preds)
    if kind == "mme":
        return mme_metrics(records, preds)
    if kind == "mmbench":
        return circular_metrics(records, preds)
    by = "question_type" if kind == "seed" else "category"
    return category_metrics(records, preds, by)
