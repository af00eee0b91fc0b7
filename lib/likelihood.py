"""Log-likelihoods of continuations given an image, for evaluation (eval.py, and what builds on it): the
H-LVLM's frozen-encoder features cached per process, the image derangement of blind and shuffled-image scores,
and score_docs, which scores every choice of many questions in packed rows, reading the shared image and prompt
once per question."""
import hashlib
import sys

import torch
from tqdm import tqdm

from data import tokenizer as T
from data.features import encoder_features
from data.images import normalize
from lib.utils import autocast

_features = {}  # (hash of ViT weights, data_key) -> ViT patch features


def weights_hash(module):
    h = hashlib.sha1()
    for t in module.state_dict().values():
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def image_embeds(model, images, key, device, chunk=256, feature_cache=""):
    """(N, grid*grid, d) embeddings of uint8 images. The paper trains only the H-LVLM's projector, so its ViT is
    the same in every checkpoint: its features are cached by a hash of its weights and the ViT runs once per file
    and process; with feature_cache (a folder, data/features.py) once per file and encoder, across processes."""
    def run(fn):
        return torch.cat([fn(normalize(images[i:i + chunk].to(device))) for i in range(0, len(images), chunk)])
    with autocast(device):
        if model.cfg.arch != "h":
            return run(model.embed_images)
        h = weights_hash(model.encoder)
        if (h, key) not in _features:
            for k in [k for k in _features if k[0] != h]:  # another encoder: its features are stale
                del _features[k]
            _features[h, key] = (encoder_features(model.encoder, images, feature_cache, device) if feature_cache
                                 else run(model.encoder.forward_features))
        return model.projector(_features[h, key])


def derangement(n, seed=0):
    """A fixed permutation without fixed points: one random cycle through all n items."""
    if n < 2:
        raise ValueError("shuffling images needs at least 2 records")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        out[a] = b
    return out


@torch.inference_mode()
def score_docs(model, docs, embeds, row_len=256, batch_rows=8, device="cpu", desc="score"):
    """log p of every branch token of every doc -> per doc, per branch, a float tensor.

    A doc is (image index into embeds, shared ids, branches). The shared ids (image, bos, prompt) are read once
    and each branch (a choice) continues them, attending to the shared part and to itself only, with positions
    as if it were alone: k choices cost one image + prompt instead of k (~2.5x fewer tokens on the probes). The
    LM head runs only where a token is scored. Docs are packed next-fit into rows of row_len (grown to fit the
    longest doc); short rows run faster on CPU than long ones, as attention is quadratic and caches are small.
    A doc that reaches past the model's context (a prompt or caption longer than it was trained on) is not
    scored: its entry is None, and the caller counts it."""
    limit = model.decoder.cfg.max_seq_len  # the last input of a branch sits at len(shared) + len(b) - 2
    fits = [len(shared) + max(len(b) - 1 for b in branches) <= limit for _, shared, branches in docs]
    # a branch's last token is no input
    sizes = [len(shared) + sum(len(b) - 1 for b in branches) for _, shared, branches in docs]
    row_len = max(row_len, *(n for n, ok in zip(sizes, fits) if ok), 1)
    rows, used = [[]], 0
    for d, n in enumerate(sizes):
        if not fits[d]:
            continue
        if used + n > row_len:
            rows.append([])
            used = 0
        rows[-1].append(d)
        used += n
    out = [[None] * len(b) if ok else None for (_, _, b), ok in zip(docs, fits)]
    causal = torch.ones(row_len, row_len, dtype=torch.bool, device=device).tril()
    rows = [row for row in rows if row]  # none at all when no doc fits
    for start in tqdm(range(0, len(rows), batch_rows), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        cells, pred, target, owner, images = [], [], [], [], []  # cells: (token, position, doc, branch)
        for r, row in enumerate(rows[start:start + batch_rows]):
            here = []
            for k, d in enumerate(row):
                image, shared, branches = docs[d]
                images.append(image)
                here += [(t, p, k, 0) for p, t in enumerate(shared)]
                last = r * row_len + len(here) - 1  # flat index of the hidden state that predicts each first token
                for j, b in enumerate(branches):
                    at = r * row_len + len(here)
                    pred += [last, *range(at, at + len(b) - 1)]
                    target += b
                    owner.append((d, j, len(b)))
                    here += [(t, len(shared) + p, k, j + 1) for p, t in enumerate(b[:-1])]
            cells.append(here + [(T.PAD, 0, len(row), 0)] * (row_len - len(here)))  # padding: its own doc
        ids, pos, doc, branch = torch.tensor(cells, device=device).unbind(-1)
        if int(pos.max()) >= model.decoder.cfg.max_seq_len:
            raise ValueError(f"a document reaches position {int(pos.max())}; the model has "
                             f"{model.decoder.cfg.max_seq_len}")
        visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (causal & (doc[:, :, None] == doc[:, None, :]) & visible).unsqueeze(1)
        with autocast(device):
            x = model(ids, position_ids=pos, mask=mask, image_embeds=embeds[torch.tensor(images, device=device)],
                      return_hidden=True)
            logits = model.decoder.head(model.decoder.norm(x.flatten(0, 1)[torch.tensor(pred, device=device)]))
        logits, tgt = logits.float(), torch.tensor(target, device=device)
        logp = (logits.gather(1, tgt[:, None]).squeeze(1) - logits.logsumexp(-1)).cpu()
        for (d, j, _), piece in zip(owner, logp.split([n for _, _, n in owner])):
            out[d][j] = piece
    return out


def accuracy(logps, answers, normalise=False):
    """Share of questions whose answer has the highest summed (or per-token mean) log-likelihood; questions
    score_docs did not score (None: longer than the model's context) are left out, NaN if none is left."""
    hits = [max(range(len(lp)), key=lambda j: float(lp[j].sum()) / (len(lp[j]) if normalise else 1)) == a
            for lp, a in zip(logps, answers) if lp is not None]
    return sum(hits) / len(hits) if hits else float("nan")
