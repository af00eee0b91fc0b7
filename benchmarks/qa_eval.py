"""Generated-answer evaluation of multiple-choice files (the format of eval.py --mc; benchmarks/qa.py writes one):
greedy answers compared with the correct choice by exact match. Used by paper.py's instruction-tuning experiment."""
import os

import torch

from data import tokenizer as T
from benchmarks.load import load_mc, report_skipped
from data.images import normalize
from utils import autocast


def normalise_answer(text):
    """The form two answers are compared in: lower case, single spaces, no punctuation or space at either
    end ('At the  top left.' -> 'at the top left')."""
    return " ".join(str(text).lower().split()).strip(" .,;:!?'\"")


@torch.inference_mode()
def generate_answers(model, tok, prompts, images, device="cpu", max_new_tokens=8, batch=32):
    """Greedy continuation (benchmarks.generate, KV-cached) of each prompt after its image and <|bos|>, decoded to
    text, until <|eos|> or max_new_tokens. images: uint8 (N, 3, S, S), one per prompt. Prompts of equal
    token length are decoded together (generate takes rows of equal length), so no row is padded. A prompt
    that leaves no room in the model's context gets None (not answered; the caller counts it)."""
    from benchmarks.generate import generate
    prefix = model.image_tokens() + [T.BOS]
    ids = T.encode_captions(tok, [p.strip() for p in prompts])
    by_len = {}
    for i, p in enumerate(ids):
        if len(prefix) + len(p) < model.decoder.cfg.max_seq_len:
            by_len.setdefault(len(p), []).append(i)
    out = [None] * len(prompts)
    for group in by_len.values():
        for start in range(0, len(group), batch):
            idx = group[start:start + batch]
            x = torch.tensor([prefix + ids[i] for i in idx], device=device)
            pixels = normalize(images[torch.tensor(idx)].to(device))
            with autocast(device):
                new = generate(model, x, pixels, max_new_tokens, temperature=0.0)
            for i, n in zip(idx, new):
                out[i] = tok.decode(n).strip()
    return out


def qa_generate(model, tok, path, device="cpu", max_rows=None, seed=0, max_new_tokens=8, max_bad_fraction=0.05):
    """Generated-answer evaluation of a multiple-choice file (the format of --mc; benchmarks/qa.py writes one): the
    model answers each prompt by greedy decoding, and is right when its answer equals the correct choice
    (normalise_answer). The same rows as the likelihood evaluation (same --max-rows subset and seed).
    Returns [{"id", "prompt", "target", "prediction", "correct"}] in file order; a question whose prompt
    leaves no room in the model's context is left out, with a warning that counts them."""
    questions, images = load_mc(path, model.cfg.image_size, max_rows, seed, max_bad_fraction)
    preds = generate_answers(model, tok, [q.caption for q in questions], images, device, max_new_tokens)
    report_skipped({}, os.path.splitext(os.path.basename(path))[0], preds.count(None), len(preds), "questions")
    rows = []
    for q, p in ((q, p) for q, p in zip(questions, preds) if p is not None):
        target = q.extra["choices"][q.extra["answer"]]
        rows.append({"id": q.id, "prompt": q.caption, "target": target,
                     "prediction": p, "correct": normalise_answer(p) == normalise_answer(target)})
    return rows
