"""Importance scores against caption length and token position (the paper's Fig. 8), no model needed:

    python -m experiments.importance --scores out/scores_test.pt --data data/synth/test.jsonl \
        --tokenizer out/tokenizer.json [--png FIGURE]
"""
import os
from dataclasses import dataclass

import torch

from data import tokenizer as T
from data.records import read_records
from data.scores import load_scores
from utils import flag, run, text_fingerprint


def pearson(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def importance_analysis(scores_path, data_path=None, tokenizer_path="out/tokenizer.json", png_path=None, n_bins=8):
    """Mean PRIOR weight w = 1 - p_ref (caption tokens, eos excluded) against caption length in tokens (binned,
    and Pearson r between a caption's length and its mean w) and against token position. data_path defaults to
    the caption file that score.py recorded in the score file."""
    tok = T.load_tokenizer(tokenizer_path)
    data_path = data_path or torch.load(scores_path, weights_only=True)["fingerprint"]["data_path"]
    records = read_records(data_path, require_image=False, check_files=False)
    p_ref = load_scores(scores_path, T.fingerprint(tok), text_fingerprint(records), data_path)
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


@dataclass
class ImportanceConfig:
    scores: str = flag("out/scores_test.pt", "score.py output to analyse")
    data: str = flag("", "the caption file --scores was scored on ('' = the path recorded in it)")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json the scores were made with")
    png: str = flag("", "figure ('' = beside the score file)")


def main(cfg):
    png = cfg.png or os.path.splitext(cfg.scores)[0] + "_importance.png"
    rep = importance_analysis(cfg.scores, cfg.data or None, cfg.tokenizer, png)
    print(f"{rep['captions']} captions, mean w {rep['mean_w']:.3f}, Pearson r(length, mean w) = "
          f"{rep['pearson_r']:.3f}")
    for b in rep["length_bins"]:
        print(f"  length {b['min_len']:3d}-{b['max_len']:3d}: mean w {b['mean_w']:.3f} ({b['captions']} captions)")
    print(f"figure: {png}")
    return rep


if __name__ == "__main__":
    run(main, ImportanceConfig, description=__doc__)
