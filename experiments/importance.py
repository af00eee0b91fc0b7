"""What PRIOR's weights w = 1 - p_ref pick out, read from a score file (no model needed):

    python -m experiments.importance --scores out/scores_test.pt --data data/synth/test.jsonl \
        --tokenizer out/tokenizer.json [--png FIGURE]

- against caption length and token position (the paper's Fig. 8): --png;
- with the generator's word tags, how well w finds image words (mean w, share predicted and ROC-AUC by tag): the
  "relevance" key of the score file's report (score.py's .json beside it), and printed;
- the paper's Fig. 1 in miniature, the first captions' tokens shaded by w: a .png beside the score file.
"""
import json
import os
from dataclasses import dataclass

import torch

from data import tokenizer as T
from data.records import read_records
from data.scores import load_scores
from data.tags import CATEGORIES, token_tags
from utils import atomic_write, flag, run, text_fingerprint


def pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def read_scored(scores_path, data_path=None, tokenizer_path="out/tokenizer.json"):
    """(tokenizer, records, {record id: p_ref}); data_path defaults to the caption file score.py recorded."""
    tok = T.load_tokenizer(tokenizer_path)
    data_path = data_path or torch.load(scores_path, weights_only=True)["fingerprint"]["data_path"]
    records = read_records(data_path, require_image=False, check_files=False)
    return tok, records, load_scores(scores_path, T.fingerprint(tok), text_fingerprint(records), data_path)


def importance_analysis(scored, png_path=None, n_bins=8):
    """Mean PRIOR weight w = 1 - p_ref (caption tokens, eos excluded) against caption length in tokens (binned,
    and Pearson r between a caption's length and its mean w) and against token position; scored: read_scored's."""
    _, records, p_ref = scored
    ws = [1 - p_ref[r.id][:-1].double() for r in records if len(p_ref[r.id]) > 1]
    lengths = torch.tensor([len(w) for w in ws], dtype=torch.float64)
    means = torch.stack([w.mean() for w in ws])
    lo, hi = int(lengths.min()), int(lengths.max()) + 1
    edges = sorted({round(lo + (hi - lo) * k / n_bins) for k in range(n_bins + 1)})
    bins = []
    for a, b in zip(edges, edges[1:]):
        sel = (lengths >= a) & (lengths < b)
        if sel.any():
            bins.append({"min_len": a, "max_len": b - 1, "captions": int(sel.sum()),
                         "mean_w": float(means[sel].mean())})
    grid = torch.full((len(ws), hi - 1), float("nan"), dtype=torch.float64)
    for i, w in enumerate(ws):
        grid[i, :len(w)] = w
    counts = (~grid.isnan()).sum(0)
    report = {"captions": len(ws), "tokens": int(lengths.sum()), "mean_w": float(torch.cat(ws).mean()),
              "pearson_r": pearson(lengths, means), "length_bins": bins,
              "position": {"mean_w": grid.nanmean(0).tolist(), "captions": counts.tolist()}}
    if png_path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.plot([(x["min_len"] + x["max_len"]) / 2 for x in bins], [x["mean_w"] for x in bins], "o-")
        a.set(xlabel="caption length (tokens)", ylabel="mean w = 1 - p_ref",
              title=f"Pearson r = {report['pearson_r']:.3f}")
        shown = int((counts >= max(1, len(ws) // 100)).sum())  # positions that at least 1% of captions reach
        b.plot(range(shown), report["position"]["mean_w"][:shown], ".-")
        b.set(xlabel="token position", ylabel="mean w", title=f"{report['captions']} captions")
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    return report


def roc_auc(pos, neg):
    """P(a random positive scores above a random negative), ties count half (Mann-Whitney U)."""
    _, inverse, counts = torch.unique(torch.cat([pos, neg]).double(), return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0).double() - (counts.double() - 1) / 2)[inverse]  # average rank of tied values, 1-based
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def relevance_report(p_ref, tags):
    """Per word tag: mean w, share of tokens, share the reference LM predicts (w < 0.5); ROC-AUC of w for image
    words against the rest. p_ref and tags: one list per caption (its labels, <|eos|> included)."""
    w = 1 - torch.cat(p_ref).clamp(0, 1)  # alpha = 1, the paper's default
    t = torch.tensor([c for row in tags for c in row])
    by = {name: w[t == i] for i, name in enumerate(CATEGORIES)}
    report = {"mean_w": {k: float(v.mean()) if len(v) else None for k, v in by.items()},
              "share": {k: len(v) / max(1, int((t >= 0).sum())) for k, v in by.items()},
              # tokens the reference LM predicts well (p_ref > 0.5, w < 0.5): for image words, PRIOR's risk
              "predicted": {k: float((v < 0.5).float().mean()) if len(v) else None for k, v in by.items()}, "auc": {}}
    for name, neg in (("image_vs_boiler", by["boiler"]), ("image_vs_noise", by["noise"]),
                      ("image_vs_rest", torch.cat([by["boiler"], by["noise"]]))):
        report["auc"][name] = roc_auc(by["image"], neg) if len(by["image"]) and len(neg) else None
    return report


def draw_weights(path, tok, captions, p_ref, n=6):
    """The paper's Fig. 1 in miniature: tokens (captions: token ids) shaded by w = 1 - p_ref (darker = more)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(captions))
    fig = plt.figure(figsize=(14, 0.75 * n + 0.6))
    cmap = plt.get_cmap("Reds")
    for row in range(n):
        x, y = 0.005, 1 - (row + 0.8) / (n + 0.3)
        for token_id, p in zip(captions[row], p_ref[row].tolist()):
            text, w = tok.decode([token_id]).replace(" ", ""), 1 - p
            fig.text(x, y, text, family="monospace", fontsize=9, color="white" if w > 0.6 else "black",
                     bbox=dict(boxstyle="square,pad=0.15", fc=cmap(w), ec="none"))
            x += 0.0072 * (len(text) + 1)
            if x > 0.97:
                x, y = 0.005, y - 0.3 / (n + 0.3)
    fig.text(0.005, 0.01, "token weight w = 1 - p_ref (white = 0, dark red = 1)", fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def relevance(scored, scores_path):
    """The relevance report (None without word tags) into the report .json beside scores_path, and the Fig. 1
    picture beside it; scored: read_scored(scores_path, ...)."""
    tok, records, p_ref = scored
    base = os.path.splitext(scores_path)[0]
    shown = records[:6]
    draw_weights(base + ".png", tok, T.encode_captions(tok, [r.caption for r in shown]), [p_ref[r.id] for r in shown])
    tags = token_tags(tok, records)
    if tags is None:
        return None
    rel = relevance_report([p_ref[r.id] for r in records], tags)
    report = json.load(open(base + ".json")) if os.path.exists(base + ".json") else {}
    atomic_write(base + ".json", json.dumps({**report, "relevance": rel}, indent=1))
    print("mean weight w = 1 - p_ref by ground-truth category: " +
          ", ".join(f"{k} {v:.3f} ({rel['share'][k]:.0%} of tokens)"
                    for k, v in rel["mean_w"].items() if v is not None))
    for key, title in (("auc", "ROC-AUC of w for image-related tokens"),
                       ("predicted", "share predicted by the reference LM (p_ref > 0.5)")):
        print(f"{title}: " + ", ".join(f"{k} {v:.3f}" for k, v in rel[key].items() if v is not None))
    return rel


@dataclass
class ImportanceConfig:
    scores: str = flag("out/scores_test.pt", "score.py output to analyse")
    data: str = flag("", "the caption file --scores was scored on ('' = the path recorded in it)")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json the scores were made with")
    png: str = flag("", "the Fig. 8 figure ('' = beside the score file, *_importance.png)")


def main(cfg):
    png = cfg.png or os.path.splitext(cfg.scores)[0] + "_importance.png"
    scored = read_scored(cfg.scores, cfg.data or None, cfg.tokenizer)  # read once for both analyses
    relevance(scored, cfg.scores)
    rep = importance_analysis(scored, png)
    print(f"{rep['captions']} captions, mean w {rep['mean_w']:.3f}, Pearson r(length, mean w) = "
          f"{rep['pearson_r']:.3f}")
    for b in rep["length_bins"]:
        print(f"  length {b['min_len']:3d}-{b['max_len']:3d}: mean w {b['mean_w']:.3f} ({b['captions']} captions)")
    print(f"figure: {png}")
    return rep


if __name__ == "__main__":
    run(main, ImportanceConfig, description=__doc__)
