"""Offline token scoring: p_ref(t_i | t_<i) from the text-only reference LM for every caption token.

    python score.py --ref out/ref_lm.pt --data data/synth/train.jsonl --out out/scores_train.pt

Stored per caption, aligned with the training tokenisation (the labels: caption tokens, then <|eos|>), as
uint16 (p * 65535, so 2 bytes a token and error < 1e-5), with a fingerprint of the tokenizer, the reference
model and the caption file. Training derives w = (1 - p_ref)^alpha itself, so alpha stays a training flag.

When the captions carry the generator's ground-truth word tags ("image", "boiler", "noise"), it reports how
well the weights find image-related tokens (ROC-AUC, mean weight per category) and draws a picture like the
paper's Fig. 1: a few captions with each token shaded by its weight.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import tokenizer as T
from cli import parse_config
from data.packing import pack
from data.records import read_records
from reference_lm import caption_samples, load_lm
from utils import (autocast, check_fingerprint, file_fingerprint, pick_device, text_fingerprint)

CATEGORIES = ("image", "boiler", "noise")


@dataclass
class ScoreConfig:
    ref: str = field(default="out/ref_lm.pt", metadata={"help": "reference LM checkpoint from reference_lm.py"})
    tokenizer: str = field(default="out/tokenizer.json", metadata={"help": "tokenizer.json the reference LM was trained with"})
    data: str = field(default="data/synth/train.jsonl", metadata={"help": "caption file to score (the VLM's training data)"})
    out: str = field(default="out/scores_train.pt", metadata={"help": "score file to write; a .json report and .png figure go beside it"})
    row_len: int = field(default=512, metadata={"help": "tokens per packed row"})
    batch_rows: int = field(default=16, metadata={"help": "rows per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


@torch.inference_mode()
def label_probs(model, samples, row_len, batch_rows, device):
    """p_ref of every label of every sample, as one list per sample (packed, forward only)."""
    model.eval().to(device)
    batch = pack(samples, row_len, truncate=False)
    flat = []
    for start in tqdm(range(0, batch.input_ids.shape[0], batch_rows), desc="score", dynamic_ncols=True):
        rows = slice(start, start + batch_rows)
        labels = batch.labels[rows].to(device)
        with autocast(device):
            logits = model(batch.input_ids[rows].to(device), position_ids=batch.position_ids[rows].to(device),
                           doc_ids=batch.doc_ids[rows].to(device))
        keep = labels != -100
        logits = logits[keep].float()  # only positions with a label: no work on padding
        logp = logits.gather(1, labels[keep][:, None]).squeeze(1) - logits.logsumexp(-1)
        flat.append(logp.exp().cpu())
    flat = torch.cat(flat)
    # Labels come out row by row, sample by sample: split back by each sample's label count.
    sizes = [len(s.caption_ids) + 1 for s in samples]
    return list(torch.split(flat, sizes)), batch.input_ids.numel()


def save_scores(path, ids, p_ref, fingerprints):
    offsets = torch.tensor([0] + [len(p) for p in p_ref]).cumsum(0)
    quantised = (torch.cat(p_ref).clamp(0, 1) * 65535).round().to(torch.int32).to(torch.uint16)
    torch.save({"ids": list(ids), "offsets": offsets, "p_ref": quantised, "fingerprint": fingerprints}, path)


def load_scores(path, tokenizer_fp, data_fp, data_from="the training captions"):
    """{record id: p_ref float tensor}; refuses a score file made with another tokenizer or other captions."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no score file at {path}: make one with `python score.py --out {path}`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    fp = blob["fingerprint"]
    check_fingerprint("tokenizer", fp["tokenizer"], tokenizer_fp, path, "the tokenizer in use")
    check_fingerprint("caption data", fp["data"], data_fp, path, data_from)
    p_ref = blob["p_ref"].to(torch.int32).float() / 65535
    if not torch.isfinite(p_ref).all():
        raise ValueError(f"{path} holds non-finite scores")
    off = blob["offsets"].tolist()
    return {i: p_ref[a:b] for i, a, b in zip(blob["ids"], off[:-1], off[1:])}


def roc_auc(pos, neg):
    """P(a random positive scores above a random negative), ties count half (Mann-Whitney U)."""
    scores = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(scores)
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank of tied values, 1-based
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def token_tags(tok, records):
    """Category id (index into CATEGORIES) of each label, -1 for <|eos|> or untagged words."""
    word_index = T.token_word_index(tok, [r.caption for r in records])
    out = []
    for r, index in zip(records, word_index):
        words = r.extra.get("tags")
        if words is None:
            return None
        out.append([CATEGORIES.index(words[w]) if w >= 0 else -1 for w in index] + [-1])
    return out


def relevance_report(p_ref, tags):
    w = torch.cat(p_ref).clamp(0, 1)
    w = 1 - w  # alpha = 1, the paper's default
    t = torch.tensor([c for row in tags for c in row])
    by = {name: w[t == i] for i, name in enumerate(CATEGORIES)}
    other = torch.cat([by["boiler"], by["noise"]])
    report = {"mean_w": {k: float(v.mean()) if len(v) else None for k, v in by.items()},
              "share": {k: len(v) / max(1, int((t >= 0).sum())) for k, v in by.items()}}
    report["auc"] = {}
    for name, neg in (("image_vs_boiler", by["boiler"]), ("image_vs_noise", by["noise"]), ("image_vs_rest", other)):
        report["auc"][name] = roc_auc(by["image"], neg) if len(by["image"]) and len(neg) else None
    return report


def draw_weights(path, tok, records, samples, p_ref, n=6):
    """The paper's Fig. 1 in miniature: tokens shaded by w = 1 - p_ref (darker = more weight)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(14, 0.75 * n + 0.6))
    cmap = plt.get_cmap("Reds")
    for row in range(n):
        y = 1 - (row + 0.8) / (n + 0.3)
        x = 0.005
        for token_id, p in zip(samples[row].caption_ids, p_ref[row].tolist()):
            text = tok.decode([token_id]).replace(" ", "")
            w = 1 - p
            fig.text(x, y, text, family="monospace", fontsize=9, color="white" if w > 0.6 else "black",
                     bbox=dict(boxstyle="square,pad=0.15", fc=cmap(w), ec="none"))
            x += 0.0072 * (len(text) + 1)
            if x > 0.97:
                x, y = 0.005, y - 0.3 / (n + 0.3)
    fig.text(0.005, 0.01, "token weight w = 1 - p_ref (white = 0, dark red = 1)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg):
    device = pick_device(cfg.device)
    tok = T.load_tokenizer(cfg.tokenizer)
    model, ckpt = load_lm(cfg.ref, tok)
    records = read_records(cfg.data)
    data_fp = text_fingerprint(records)
    if ckpt["data"] == data_fp:
        print(f"WARNING: {cfg.ref} was trained on these very captions; its scores will be inflated "
              "(the paper scores captions disjoint from the reference LM's training set)")
    samples = caption_samples(tok, records)
    t0 = time.perf_counter()
    p_ref, positions = label_probs(model, samples, cfg.row_len, cfg.batch_rows, device)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(p) for p in p_ref)
    fingerprints = {"tokenizer": T.fingerprint(tok), "reference": file_fingerprint(cfg.ref), "data": data_fp,
                    "data_path": os.path.abspath(cfg.data), "reference_path": os.path.abspath(cfg.ref)}
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    save_scores(cfg.out, [r.id for r in records], p_ref, fingerprints)

    report = {"config": asdict(cfg), "captions": len(records), "tokens": n_tokens,
              "pad_fraction": 1 - n_tokens / positions, "score_tokens_per_s": positions / seconds,
              "ref_train_tokens_per_s": ckpt.get("train_tokens_per_s")}
    print(f"scored {len(records)} captions, {n_tokens} tokens in {seconds:.1f}s: "
          f"{report['score_tokens_per_s']:,.0f} tokens/s scoring vs "
          f"{report['ref_train_tokens_per_s'] or float('nan'):,.0f} tokens/s reference-LM training "
          f"({report['score_tokens_per_s'] / (report['ref_train_tokens_per_s'] or float('nan')):.1f}x)")
    tags = token_tags(tok, records)
    if tags is not None:
        report["relevance"] = rel = relevance_report(p_ref, tags)
        print("mean weight w = 1 - p_ref by ground-truth category: " +
              ", ".join(f"{k} {v:.3f} ({rel['share'][k]:.0%} of tokens)" for k, v in rel["mean_w"].items() if v is not None))
        print("ROC-AUC of w for image-related tokens: " +
              ", ".join(f"{k} {v:.3f}" for k, v in rel["auc"].items() if v is not None))
    base = os.path.splitext(cfg.out)[0]
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    draw_weights(base + ".png", tok, records, samples, p_ref)
    print(f"saved {cfg.out}, {base}.json, {base}.png")
    return report


if __name__ == "__main__":
    main(parse_config(ScoreConfig, description=__doc__))
