"""The attention-weighting baseline (--loss attn, the paper's Table 1): token weights from a small contrastive
model's text-to-image attention, standing in for CLIP's. This script trains one and writes the weights in the
score-file format (data/scores.py), which train.py --loss attn --attn-scores reads:

    python -m baselines.attention --data data/synth/train.jsonl --tokenizer out/tokenizer.json \
        --out out/attn_scores_train.pt

Flags in detail: the scorer's --n-layer defaults to 0 (each token's own embedding) because a contextual state
also carries the image words before it, and the weights then leak onto later tokens; with --init-decoder, its
first n_layer blocks are used.
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import tokenizer as T
from utils import (Checks, atomic_save, autocast, check_fingerprint, check_out, flag, load_checkpoint, lr_at,
                   make_optimizer, pick_device, run, seed_everything, text_fingerprint)
from data.packing import make_samples
from data.records import read_records
from data.images import load_images, normalize
from data.scores import quantise
from model import Decoder, DecoderConfig, VLMConfig, build_vit, init_weights


# ----------------------------------------------------------------------------- attention weighting (--loss attn)

class AttentionScorer(nn.Module):
    """A small image-caption contrastive model whose text-to-image cross-attention gives token weights
    (standing in for CLIP cross-attention scores, the paper's attention-weighting baseline).

    Text: the project's Decoder over <|bos|> caption <|eos|> (final states, normed); by default with no blocks
    (n_layer 0), i.e. each token's own embedding: with context (n_layer > 0) a token's state also carries the
    words before it, so the tokens after the image words match the image as well as they do (on the tests'
    tiny data, 1 layer: mean weight boilerplate 0.61 > image words 0.37; 0 layers: image 0.60, boilerplate
    0.29, noise 0.27, budget 0.3, 300 steps). Image: the built-in ViT's
    patch tokens, projected to the text width. One cross-attention layer: every text token's query attends
    over [a learned null key, the image's patch keys]; the null slot's value is 0, so a token can decline to
    look at the image. Token i's output o_i is read by its own projected state u_i; the caption-image score is
    the mean over tokens of <u_i, o_i> / sqrt(d), trained with symmetric InfoNCE over the batch (every caption
    against every image), plus a small price `budget` on the attention mass given to the image, so that only
    tokens that help matching look at it. A token's weight = 1 - attention on the null slot, with its own
    image: the share of its attention that goes to the image, in [0, 1]."""

    def __init__(self, vocab_size, d_model=128, n_layer=0, n_head=4, max_seq_len=128, image_size=48,
                 patch_size=8, vit_dim=96, vit_depth=2, vit_heads=3):
        super().__init__()
        self.text = Decoder(DecoderConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                                          max_seq_len=max_seq_len))
        self.vit_cfg = VLMConfig(image_size=image_size, patch_size=patch_size, vit_dim=vit_dim, vit_depth=vit_depth,
                                 vit_heads=vit_heads)
        self.vision = build_vit(self.vit_cfg)
        d = d_model
        self.image_proj = nn.Linear(vit_dim, d)
        self.q, self.k, self.v, self.u = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.null_key = nn.Parameter(torch.zeros(d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        for m in (self.image_proj, self.q, self.k, self.v, self.u):
            init_weights(m)

    def encode(self, ids, doc_ids, images):
        """(text states (B, T, d), image keys (B, P, d), image values (B, P, d))."""
        t = self.text.norm(self.text(ids, doc_ids=doc_ids, return_hidden=True))
        img = self.image_proj(self.vision.forward_features(images))
        return t, self.k(img), self.v(img)

    def attention(self, t, keys, values, pairs="all"):
        """pairs 'all': every caption b against every image m: (attention (B, M, T, 1 + P), token scores
        (B, M, T)); 'own': caption b with image b: (B, T, 1 + P), (B, T)."""
        d = t.shape[-1]
        q = self.q(t)
        null = (q @ self.null_key / math.sqrt(d)).unsqueeze(-1)                       # B, T, 1
        if pairs == "own":
            a = torch.cat([null, q @ keys.transpose(1, 2) / math.sqrt(d)], -1).softmax(-1)  # B, T, 1 + P
            o = a[..., 1:] @ values                                                 # B, T, d
            return a, (self.u(t) * o).sum(-1) / math.sqrt(d)
        logits = torch.einsum("btd,mpd->bmtp", q, keys) / math.sqrt(d)                # B, M, T, P
        a = torch.cat([null.unsqueeze(1).expand(-1, keys.shape[0], -1, -1), logits], -1).softmax(-1)
        o = torch.einsum("bmtp,mpd->bmtd", a[..., 1:], values)
        return a, torch.einsum("btd,bmtd->bmt", self.u(t), o) / math.sqrt(d)

    def loss(self, ids, doc_ids, mask, images, budget=0.3):
        """(InfoNCE + budget x mean image attention of matched pairs, accuracy of caption -> image)."""
        t, keys, values = self.encode(ids, doc_ids, images)
        a, s = self.attention(t, keys, values)
        m = mask.float()[:, None, :]
        scores = (s * m).sum(-1) / m.sum(-1).clamp(min=1)                              # B (captions), M (images)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * scores
        target = torch.arange(len(logits), device=logits.device)
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        own = 1 - a[target, target, :, 0]                                             # B, T: mass on the image
        spent = (own * mask).sum() / mask.sum().clamp(min=1)
        return nce + budget * spent, (logits.argmax(1) == target).float().mean()

    @torch.no_grad()
    def token_weights(self, ids, doc_ids, images):
        """(B, T) attention mass on each token's own image, 1 - a_null."""
        t, keys, values = self.encode(ids, doc_ids, images)
        a, _ = self.attention(t, keys, values, pairs="own")
        return 1 - a[..., 0]


def caption_rows(samples, max_len):
    """(ids, doc_ids, mask) for <|bos|> caption <|eos|> rows padded with <|pad|>; mask marks the label tokens
    (caption tokens and <|eos|>, i.e. positions 1..n+1): the tokens that get weights. Captions are cut to
    max_len - 2 tokens."""
    rows = [[T.BOS] + list(s.caption_ids[:max_len - 2]) + [T.EOS] for s in samples]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), T.PAD, dtype=torch.long)
    doc = torch.ones((len(rows), L), dtype=torch.long)  # padding: its own document
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        doc[i, :len(r)] = 0
        mask[i, 1:len(r)] = True
    return ids, doc, mask


@dataclass
class AttnConfig(Checks):
    OWN_RANGES = {"n_layer": 0}  # 0: each token's own embedding
    data: str = flag("data/synth/train.jsonl",
                     "image-caption pairs to train the scorer on and to score (train.py's --data)")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json (train.py's)")
    out: str = flag("out/attn_scores_train.pt",
                    "score file of per-token attention weights, read by train.py --loss attn "
                    "--attn-scores")
    init_decoder: str = flag("", "base-LM checkpoint (reference_lm.py) to start the text side from "
                             "('' = scratch)")
    init_encoder: str = flag("", "ViT checkpoint (tools/vision.py) to start the image side from "
                             "('' = scratch)")
    image_size: int = flag(48, "image size (scratch ViT; --init-encoder's otherwise)")
    patch_size: int = flag(8, "ViT patch size (scratch ViT)")
    vit_dim: int = flag(96, "ViT width (scratch ViT)")
    vit_depth: int = flag(2, "ViT depth (scratch ViT)")
    vit_heads: int = flag(3, "ViT heads (scratch ViT)")
    d_model: int = flag(128, "text width (scratch text model)")
    n_layer: int = flag(0, "text transformer blocks before the cross-attention (0 = each token's "
                        "own embedding)")
    n_head: int = flag(4, "text heads (scratch text model)")
    steps: int = flag(400, "training steps")
    batch_size: int = flag(64, "image-caption pairs per step (each caption is contrasted with "
                           "every image)")
    lr: float = flag(1e-3, "peak learning rate (warm-up 5%%, cosine to lr/10)")
    budget: float = flag(0.3, "price on the attention mass a token gives the image (pushes "
                         "image-unrelated tokens to the null slot)")
    seed: int = flag(0, "seed")
    device: str = flag("auto", "auto, cpu or cuda")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")
    workers: int = flag(0, "processes for decoding images at start-up")



def train_attention_scorer(cfg):
    """Train an AttentionScorer on cfg.data and write every record's per-label weights (caption tokens, then
    <|eos|>; the same layout and fingerprints as score.py's p_ref, so train.py --loss attn loads them with
    load_scores). Returns (scorer, {record id: weights}). Records share data/records.py's reader and
    its image decoding; images are used at the scorer's own size."""
    if cfg.out:
        check_out(cfg.out)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)
    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    data_fp = text_fingerprint(records)  # as train.py computes it: before undecodable images are dropped
    captions = T.encode_captions(tok, [r.caption for r in records])
    max_len = max(len(c) for c in captions) + 2
    kw = dict(d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, image_size=cfg.image_size,
              patch_size=cfg.patch_size, vit_dim=cfg.vit_dim, vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads)
    base = enc = None
    if cfg.init_decoder:
        base = load_checkpoint(cfg.init_decoder, "lm", "--init-decoder")
        check_fingerprint("tokenizer", base["tokenizer"], T.fingerprint(tok), cfg.init_decoder, cfg.tokenizer)
        dc = base["decoder_config"]
        kw.update(d_model=dc["d_model"], n_layer=min(cfg.n_layer, dc["n_layer"]), n_head=dc["n_head"])
        max_len = min(max_len, dc["max_seq_len"])
    if cfg.init_encoder:
        enc = load_checkpoint(cfg.init_encoder, "vit", "--init-encoder")
        kw.update({k: enc["vit_config"][k] for k in ("image_size", "patch_size", "vit_dim", "vit_depth", "vit_heads")})
    torch.manual_seed(cfg.seed)
    scorer = AttentionScorer(tok.get_vocab_size(), max_seq_len=max_len, **kw)
    if base is not None:
        blocks = [f"blocks.{i}." for i in range(kw["n_layer"], base["decoder_config"]["n_layer"])]
        scorer.text.load_state_dict({k: v for k, v in base["model"].items() if not k.startswith(tuple(blocks))})
    if enc is not None:
        scorer.vision.load_state_dict(enc["model"])
    scorer.to(device)
    records, images = load_images(records, kw["image_size"], cfg.max_bad_fraction, cfg.workers)
    samples = make_samples(tok, records)
    opt = make_optimizer(scorer.parameters(), cfg.lr, 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(samples)
    batch = min(cfg.batch_size, n)
    t0 = time.perf_counter()
    scorer.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
        idx = torch.randperm(n, generator=gen)[:batch].tolist()
        ids, doc, mask = caption_rows([samples[i] for i in idx], max_len)
        pixels = normalize(images[idx].to(device))
        with autocast(device):
            loss, acc = scorer.loss(ids.to(device), doc.to(device), mask.to(device), pixels, cfg.budget)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            print(f"attn scorer step {step + 1}/{cfg.steps}: loss {loss.item():.4f}, caption->image accuracy "
                  f"{acc.item():.2f} (batch {batch}), {time.perf_counter() - t0:.1f}s")
    scorer.eval()
    weights = {}
    for start in range(0, n, 256):
        part = samples[start:start + 256]
        ids, doc, mask = caption_rows(part, max_len)
        with autocast(device):
            w = scorer.token_weights(ids.to(device), doc.to(device), normalize(images[start:start + 256].to(device)))
        w = w.float().cpu()
        for s, row, m in zip(part, w, mask):
            got = row[m]  # labels kept by caption_rows; labels cut by max_len get 0, as score.py does past its context
            full = torch.zeros(len(s.caption_ids) + 1)
            full[:len(got) - 1] = got[:-1]
            full[-1] = got[-1]
            weights[records[s.index].id] = full
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        offsets, quantised = quantise([weights[r.id] for r in records])
        atomic_save({"ids": [r.id for r in records], "offsets": offsets, "p_ref": quantised,
                     "kind": "attention_weights", "config": asdict(cfg),
                     "fingerprint": {"tokenizer": T.fingerprint(tok), "data": data_fp,
                                     "data_path": os.path.abspath(cfg.data)}}, cfg.out)
        print(f"wrote attention weights of {len(records)} captions to {cfg.out}")
    return scorer, weights


if __name__ == "__main__":
    run(train_attention_scorer, AttnConfig, description=__doc__)
