"""How much of the caption loss each arm puts on image words: the question of "Which tokens matter"
(docs/experiment.md) is whether PRIOR's gain over NTP grows with the share of the loss on image tokens, so this
measures that share for every arm, on the main job's training captions, no model needed:

    python -m experiments.shares --from OUT --mix web --arms ntp,prior,prior_shuffled,anti_prior,oracle \
        --max-captions 3000 --json results/main/shares.json

OUT is a main job's folder (experiments/main.py; --stage prepare is enough): the captions, tokenizer and scores
train.py reads there (Experiment.train_config: data_MIX/train.jsonl, tokenizer.json, scores_MIX_train.pt).

What the numbers are. Every loss position (caption tokens and <|eos|>) of caption c gets the factor
f_i = k_c w_i / sum_j w_j that loss.weighted_loss multiplies its NLL by (Eq. 4; NTP: f = 1). A tag's share is the
sum of f over the labels of that ground-truth word tag (the generator's: image, glue, boiler, noise; "untagged":
<|eos|> and tokens of no word, e.g. a lone space) over all the captions, divided by the sum of all f: the tag's part
of the loss weight. NTP's image share is the fraction of labels that are image tokens. "cv" is the coefficient of
variation (std / mean) of f within a caption, averaged over captions: 0 for NTP, the spread of the reweighting.

The weights come from train.py's own path, so they are the ones training optimises: train.load_data (records,
scores, tags, the weighting's prepare, e.g. prior_shuffled's permutation), data.packing.pack, the registered
weights function (train.WEIGHTINGS) and loss.caption_factors, with TrainConfig's defaults (alpha 1, oracle_low 0.1,
the factor k: the main job's). The captions are packed without their image: no weighting reads it, and the image
tokens carry no loss (a caption longer than a training row, which train.py warns about, is counted whole here).
The first --max-captions captions (in file order) are counted, after prepare has run over all of them.
"""
import json
import os
import shlex
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import experiments  # noqa: F401 (registers the controls and the baselines in train.WEIGHTINGS)
import train
from data import tokenizer as T
from data.packing import IGNORE, pack
from data.tags import CATEGORIES
from loss import caption_factors
from model import VLMConfig
from train import WEIGHTINGS, TrainConfig
from utils import UserError, atomic_write, check_out, flag, option, run

TAGS = ("untagged",) + CATEGORIES  # index = tag id + 1


def arm_shares(cfg, max_captions=0):
    """{tag: share of the loss weight, "cv": mean within-caption CV of f, "captions": n} for the weighting
    cfg.loss on cfg.data's captions (module doc)."""
    if train.method_hook(cfg) is not None:
        raise UserError(f"--arms {cfg.loss}: weighs its tokens online, from the model being trained; no shares")
    tok = T.load_tokenizer(cfg.tokenizer)
    # load_data asks the model only for its image size and placeholder tokens: none here (module doc)
    no_model = SimpleNamespace(cfg=VLMConfig(image_size=cfg.image_size), image_tokens=lambda: [], encoder=None)
    _, data, _ = train.load_data(cfg, tok, no_model, None, "cpu", master=False, world=1)
    samples = data.samples[:max_captions or None]
    if any(s.tags is None for s in samples):
        raise UserError(f"{cfg.data} has no word tags (the generator's 'tags' field): no shares to measure")
    weight = torch.zeros(len(TAGS), dtype=torch.float64)
    cvs = []
    for start in range(0, len(samples), cfg.batch_size):
        batch = pack(samples[start:start + cfg.batch_size], cfg.row_len, data.prefix, tight=True)
        # as train_step: the labelled positions, caption ids unique over the batch, the weights, Eq. 4's factors
        keep = (batch.labels != IGNORE).flatten().nonzero().squeeze(1)
        rows, width = batch.input_ids.shape
        captions = (batch.doc_ids + torch.arange(rows)[:, None] * (width + 1)).flatten()[keep]
        weights = WEIGHTINGS[cfg.loss].weights(cfg, batch, data.state).flatten()[keep][None]
        labels = batch.labels.flatten()[keep][None]
        f = caption_factors(weights.detach(), labels != IGNORE, captions[None], scale_by_k=not cfg.no_k)[0].double()
        weight.index_add_(0, batch.tags.flatten()[keep] + 1, f)
        _, caption = torch.unique(captions, return_inverse=True)
        n = torch.zeros(int(caption.max()) + 1, dtype=torch.float64).index_add_(0, caption, torch.ones_like(f))
        mean = torch.zeros_like(n).index_add_(0, caption, f) / n
        var = torch.zeros_like(n).index_add_(0, caption, (f - mean[caption]) ** 2) / n
        cvs.append(var.sqrt() / mean)
    share = dict(zip(TAGS, (weight / weight.sum()).tolist()))
    return {**{t: share[t] for t in ("image", "glue", "boiler", "noise", "untagged")},
            "cv": float(torch.cat(cvs).mean()), "captions": len(samples)}


@dataclass
class SharesConfig:
    from_: str = flag("out", "the main job's folder (experiments/main.py --out): captions, tokenizer and scores")
    mix: str = flag("web", "which of its data sets: data_MIX/train.jsonl with scores_MIX_train.pt")
    arms: str = flag("ntp,prior,prior_shuffled,anti_prior,oracle", "token weightings (names in train.WEIGHTINGS)")
    max_captions: int = flag(3000, "count the first N training captions (0 = all)", min=0)
    json: str = flag("", "also write the shares here as JSON ('' = print only)")


def main(cfg):
    arms = [a for a in cfg.arms.split(",") if a]
    unknown = [a for a in arms if a not in WEIGHTINGS]
    if unknown or not arms:
        raise UserError(f"--arms {cfg.arms}: {', '.join(unknown) or 'no arm'} is not a registered weighting "
                        f"(train.WEIGHTINGS: {', '.join(WEIGHTINGS)})")
    if not os.path.isdir(cfg.from_):
        raise UserError(f"--from {cfg.from_}: no such folder (a main job's --out)")
    paths = {"data": os.path.join(cfg.from_, f"data_{cfg.mix}", "train.jsonl"),
             "tokenizer": os.path.join(cfg.from_, "tokenizer.json"),
             "scores": os.path.join(cfg.from_, f"scores_{cfg.mix}_train.pt")}
    configs = {arm: TrainConfig(**paths, loss=arm) for arm in arms}
    for arm, tc in configs.items():  # every file before any work
        for field in ("data", "tokenizer", *WEIGHTINGS[arm].inputs.values()):
            if not os.path.isfile(getattr(tc, field)):
                raise UserError(f"--from {cfg.from_} --mix {cfg.mix}: no {getattr(tc, field)} (the {option(field)} "
                                f"of --arms {arm}; python -m experiments.main --stage prepare makes them)")
    if cfg.json:
        check_out(cfg.json, "file", "--json")
    results = {arm: arm_shares(tc, cfg.max_captions) for arm, tc in configs.items()}
    n = [r.pop("captions") for r in results.values()][0]  # the same captions for every arm
    print(f"share of the caption loss weight per word tag, {n} training captions of {paths['data']}\n")
    print("| arm | image share | glue | boiler | noise | eos, untagged | CV of weights within a caption |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['image']:.3f} | {r['glue']:.3f} | {r['boiler']:.3f} | {r['noise']:.3f} | "
              f"{r['untagged']:.3f} | {r['cv']:.3f} |")
    command = ["python", "-m", "experiments.shares", "--from", cfg.from_, "--mix", cfg.mix, "--arms", cfg.arms,
               "--max-captions", str(cfg.max_captions)] + (["--json", cfg.json] if cfg.json else [])
    out = {**results, "captions": n, "command": shlex.join(command)}
    if cfg.json:
        atomic_write(cfg.json, json.dumps(out, indent=1) + "\n")
        print(f"\nwritten: {cfg.json}")
    return out


if __name__ == "__main__":
    run(main, SharesConfig, description=__doc__)
