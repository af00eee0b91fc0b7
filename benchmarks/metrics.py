"""The benchmarks' official metrics, as pure functions of (records, predicted choice index per record), the
records as benchmarks/load.py reads them (extra: "answer", "choices" and the keys a metric groups by).
Percentages are in %, as the benchmarks report them; every function returns {name: value}.

    pope_metrics     per split: acc, precision, recall, f1 (positive = "yes"), yes_ratio; "f1" etc. averaged
    mme_metrics      per subtask: acc, acc_plus (both questions of an image right), score = acc + acc_plus
                     (200 max); perception = sum over its 10 subtasks, cognition = sum over its 4
    circular_metrics MMBench: circular (a group counts only if every rotation is right), vanilla (the
                     first row of each group), both per category
    category_metrics accuracy per category (MMStar's category, SEED's question type) and overall
    rotations        the circular copies of each question, for files that have none (MMBench test/dev_en.tsv
                     as many users have it: each question once)

    from benchmarks.metrics import pope_metrics
    pope_metrics(records, preds)   # {"random_f1": 85.3, ..., "f1": 85.3}
"""
from dataclasses import replace

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "ocr")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _pct(num, den):
    return 100.0 * num / den if den else float("nan")


def pope_counts(records, preds):
    """(tp, fp, tn, fn) with "yes" (choice 0) the positive class."""
    tp = fp = tn = fn = 0
    for r, p in zip(records, preds):
        truth, said = r.extra["answer"] == 0, p == 0
        tp += truth and said
        fp += said and not truth
        tn += not truth and not said
        fn += truth and not said
    return tp, fp, tn, fn


def pope_scores(tp, fp, tn, fn):
    precision = _pct(tp, tp + fp) if tp + fp else 0.0
    recall = _pct(tp, tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = tp + fp + tn + fn
    return {"acc": _pct(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": _pct(tp + fp, n)}


def pope_metrics(records, preds):
    """Per split (records' extra["split"]): <split>_acc/_precision/_recall/_f1/_yes_ratio; with several splits
    the plain names are their mean (VLMEvalKit's "Overall" is F1)."""
    splits = {}
    for r, p in zip(records, preds):
        splits.setdefault(r.extra.get("split", "all"), ([], []))
        splits[r.extra.get("split", "all")][0].append(r)
        splits[r.extra.get("split", "all")][1].append(p)
    out, per = {}, []
    for split, (rs, ps) in splits.items():
        s = pope_scores(*pope_counts(rs, ps))
        per.append(s)
        out.update({f"{split}_{k}": v for k, v in s.items()})
    if len(per) > 1:
        out.update({k: sum(s[k] for s in per) / len(per) for k in per[0]})
    return out


def subtask_name(folder):
    """MME's folder names to the metric's: lower case, spaces to "_" ("OCR" -> "ocr")."""
    return folder.strip().lower().replace(" ", "_")


def mme_metrics(records, preds):
    """Per subtask: <t>_acc, <t>_acc_plus, <t> (their sum); perception and cognition: sums of <t> over the
    subtasks of each that are present (all 10 and 4 in the full benchmark)."""
    tasks = {}
    for r, p in zip(records, preds):
        right = p == r.extra["answer"]
        images = tasks.setdefault(subtask_name(r.extra["subtask"]), {})
        images.setdefault(r.extra["image_key"], []).append(right)
    out = {}
    for t, images in tasks.items():
        answers = [a for v in images.values() for a in v]
        acc, plus = _pct(sum(answers), len(answers)), _pct(sum(all(v) for v in images.values()), len(images))
        out.update({f"{t}_acc": acc, f"{t}_acc_plus": plus, t: acc + plus})
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [t for t in group if t in tasks]
        if present:
            out[name] = sum(out[t] for t in present)
    return out


def rotations(records, prompt=None):
    """Every question once per circular shift of its options (k options: k rows), answer moved along; the
    copies share the question's extra["group"] and get id "<id>@<shift>"; prompt(extra, options), if given,
    rewrites each copy's caption (a prompt that lists the options). Rows already grouped (a group with more
    than one row: the file has its rotations) are returned as they are."""
    sizes = {}
    for r in records:
        sizes[r.extra["group"]] = sizes.get(r.extra["group"], 0) + 1
    if any(n > 1 for n in sizes.values()):
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
    """circular: share of groups whose every row is right; vanilla: share of groups whose first row is right;
    circular_<category> per extra[by] (absent categories are skipped)."""
    groups = {}
    for r, p in zip(records, preds):
        groups.setdefault(r.extra["group"], []).append((r, p == r.extra["answer"]))
    out = {"circular": _pct(sum(all(ok for _, ok in g) for g in groups.values()), len(groups)),
           "vanilla": _pct(sum(g[0][1] for g in groups.values()), len(groups))}
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
