"""Auxiliary objectives for the paper's Table 1 baselines, each added to the caption loss (NTP or any --loss):

    itm    image-text matching: a binary matched / mismatched classifier on the decoder's final hidden state
           at each caption's last input token (the position whose label is <|eos|>: it has seen the image and
           the whole caption). Mismatched pairs: the same captions with the micro-batch's images rolled by one
           (caption i with image i-1), in a second forward with gradient. Cost: one more forward and backward
           of the image-caption rows (the H-LVLM's ViT runs again too): x2.25 a step, measured (notes below).
    itc    image-text contrastive: InfoNCE (both directions, learned temperature, init 0.07) between the
           pooled image (mean of the decoder's final hidden states at the image's <|image|> positions: the
           LVLM's visual outputs, which see only the image under causal attention) and the caption (final
           hidden state at its last input token in a text-only forward of <|bos|> caption, without the image:
           in the image-caption sequence the caption's states have seen their own image, and matching them
           would be trivial), each through a small learned projection (--itc-dim). Cost: one forward (and,
           when the decoder trains, backward) of the captions alone: x1.3 a step, measured; more with longer
           captions. With --train projector the text pass runs without gradient (the frozen decoder gives
           constants; only the text projection learns from them).
    recon  reconstructive tuning (ROSS-style pixel regression): a linear head on the final hidden state at
           every <|image|> position predicts that patch's pixels (ImageNet-normalised, as the model's input;
           per-patch normalisation as in MAE would erase each patch's mean colour, most of what the synthetic
           scenes hold), MSE. Slot j of an image is patch j in row-major order in both families (H: the ViT's
           patch grid; U: the pixel patches), so one head fits both. Cost: a linear head on the image
           positions of the same forward: x1.05, measured.

Measured: median step time over NTP's, train.train_step on the tests' tiny data (48 px images -> 36 image
tokens, ~10-token captions), decoder d 128 x 2 layers, batch 16, 1 CPU thread (shared machine). CAL (loss.py,
--loss cal) for comparison: x1.33, x1.6 with --train projector (the step it adds a forward to is cheaper
there: the frozen parts need no weight gradients).

All heads live in one module, `AuxHeads`, attached to the VLM as `model.aux` only when an objective is
chosen: it is saved in the checkpoints with the model (keys `aux.*`), restored by --resume, and dropped by
train.load_model (evaluation needs only the VLM). The heads always train, also with --train projector (they
are new and have nothing to preserve); the frozen encoder and decoder stay frozen, and the auxiliary
gradient reaches the projector through them, as the caption loss's does.

The attention-weighting baseline (--loss attn) needs token weights from a small contrastive model; this file
also trains one and writes them as a score file (train_attention_scorer, below; see its docstring):

    python objectives.py --data data/synth/train.jsonl --tokenizer out/tokenizer.json --out out/attn_scores_train.pt

Flags in detail: the scorer's --n-layer defaults to 0 (each token's own embedding) because a contextual state
also carries the image words before it, and the weights then leak onto later tokens; with --init-decoder, its
first n_layer blocks are used.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as T
from loss import cal_loss, rho1_loss, weighted_loss
from model import Decoder, DecoderConfig, VLMConfig, build_vit, init_weights
from utils import autocast

OBJECTIVES = ("none", "itm", "itc", "recon")


# ----------------------------------------------------------------------------- heads

class AuxHeads(nn.Module):
    """The chosen objective's heads: itm (Linear d -> 2), itc (two bias-free projections d -> itc_dim and a
    log inverse temperature), recon (Linear d -> 3 x patch x patch)."""

    def __init__(self, objective, d_model, patch_size, itc_dim=64):
        super().__init__()
        if objective not in OBJECTIVES or objective == "none":
            raise ValueError(f"objective must be one of {OBJECTIVES[1:]}, got {objective!r}")
        self.objective = objective
        if objective == "itm":
            self.itm = nn.Linear(d_model, 2)
        elif objective == "itc":
            self.itc_image = nn.Linear(d_model, itc_dim, bias=False)
            self.itc_text = nn.Linear(d_model, itc_dim, bias=False)
            self.itc_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.recon = nn.Linear(d_model, 3 * patch_size ** 2)
        self.apply(init_weights)


def attach_heads(model, objective, itc_dim=64):
    """model.aux = AuxHeads for `objective` (nothing for 'none'); returns the heads or None."""
    if objective == "none":
        return None
    model.aux = AuxHeads(objective, model.cfg.decoder.d_model, model.cfg.patch_size, itc_dim)
    return model.aux


def split_state(state):
    """(the VLM's own entries, the aux heads' entries without their 'aux.' prefix) of a model state dict."""
    vlm = {k: v for k, v in state.items() if not k.startswith("aux.")}
    aux = {k[4:]: v for k, v in state.items() if k.startswith("aux.")}
    return vlm, aux


def patchify(pixels, patch_size):
    """(N, 3, S, S) -> (N, g*g, 3*p*p): row-major patches, each flattened channel-first, as the U-LVLM's
    patch embedding reads them (and in the ViT's patch order)."""
    p = patch_size
    patches = pixels.unfold(2, p, p).unfold(3, p, p)                      # N, 3, g, g, p, p
    return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)     # N, g*g, 3*p*p


# ----------------------------------------------------------------------------- the auxiliary losses

def itm_loss(head, h_match, h_mismatch):
    """Mean 2-way cross-entropy of `head` on matched (class 1) and mismatched (class 0) states, (n, d) each."""
    logits = head(torch.cat([h_match, h_mismatch])).float()
    target = (torch.arange(len(logits), device=logits.device) < len(h_match)).long()  # made on the device
    return F.cross_entropy(logits, target)


def itc_logits(heads, image, text):
    """(n, n) similarity logits: scale x cos(image_i projected, text_j projected), scale = exp(learned) <= 100."""
    a = F.normalize(heads.itc_image(image).float(), dim=-1)
    b = F.normalize(heads.itc_text(text).float(), dim=-1)
    return heads.itc_logit_scale.clamp(max=math.log(100)).exp() * a @ b.T


def itc_loss(heads, image, text):
    """Symmetric InfoNCE: image i's positive is text i, the other texts of the batch its negatives, and back."""
    logits = itc_logits(heads, image, text)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def recon_loss(head, h_slots, target):
    """MSE between `head`(states at the image positions) (n, d) and the patches' pixels (n, 3 p p)."""
    return F.mse_loss(head(h_slots).float(), target.float())


# ----------------------------------------------------------------------------- one micro-batch

@dataclass
class MicroBatch:
    """What one micro-batch of train.train_step holds, on the device. Flat positions index the (R, L)
    batch read row by row; image-caption rows come first (image_rows of them), text-only rows after."""
    input_ids: torch.Tensor      # (R, L)
    position_ids: torch.Tensor   # (R, L)
    doc_ids: torch.Tensor        # (R, L)
    pixels: torch.Tensor         # (n_images, 3, S, S) normalised, in the order the images are placed
    keep: torch.Tensor           # (N,) flat positions with a label, ascending
    labels: torch.Tensor         # (1, N)
    captions: torch.Tensor       # (1, N) caption id of each label, unique over the micro-batch
    weights: torch.Tensor        # (1, N) --loss weights (ntp/prior/rare/oracle/attn), text rows 1
    p_ref: torch.Tensor          # (1, N) reference-LM probabilities (rho1)
    image_rows: int              # rows holding image-caption samples
    image_labels: int            # labels in those rows: keep[:image_labels] are theirs
    n_images: int
    eos: torch.Tensor = None     # (n_images,) flat position of each sample's last input token (label <|eos|>)
    slots: torch.Tensor = None   # (n_images * P,) flat positions of the <|image|> slots, image by image
    text: tuple = None           # itc: (input_ids, position_ids, doc_ids, eos) of the captions alone, same order


def host_positions(batch, image_rows, IGNORE=-100):
    """(eos, slots, image_labels) of a packed host Batch (see MicroBatch), computed before it moves to the device."""
    labels, ids = batch.labels[:image_rows], batch.input_ids[:image_rows]
    eos = (labels == T.EOS).flatten().nonzero().squeeze(1)
    slots = (ids == T.IMAGE).flatten().nonzero().squeeze(1)
    return eos, slots, int((labels != IGNORE).sum())


def needs_hidden(objective):
    return objective in ("itm", "itc", "recon")


def micro_batch_loss(cfg, model, train_model, mb, device):
    """(logits (1, N, V), caption loss, auxiliary loss or None) of one micro-batch, for the losses and
    objectives that need more than train.py's plain path: --loss rho1 / cal, and any --objective.

    model: the bare VLM (its decoder's norm and head, its aux heads); train_model: what runs the forward
    (the VLM, or its DDP / compiled wrapper). The caption loss follows cfg.loss; text-only rows always train
    with NTP (factor 1). Both losses are means over this micro-batch (tokens, resp. samples)."""
    decoder = model.decoder
    # The extra forwards (CAL's, ITM's, ITC's) run on the bare model, not through DDP: DDP supports one forward
    # per backward, and a second one through the wrapper re-arms its reducer mid-step (in CI a gloo rank then
    # aborted at exit, about one run in thirty). Their gradients still reach the same parameters, and DDP's
    # hooks all-reduce each parameter's summed gradient once, in the backward.
    wrapped = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    extra_model = model if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else train_model
    R_img = mb.image_rows
    image_part = slice(0, R_img)
    with autocast(device):
        if needs_hidden(cfg.objective):
            # the hidden states of every position, then logits only at the labelled ones, exactly as
            # Decoder.forward(keep=...) computes them
            x = train_model(mb.input_ids, mb.pixels, mb.position_ids, mb.doc_ids, return_hidden=True)
            flat = x.flatten(0, 1)
            logits = decoder.head(decoder.norm(flat.index_select(0, mb.keep)))[None]
        else:
            logits = train_model(mb.input_ids, mb.pixels, mb.position_ids, mb.doc_ids, keep=mb.keep)[None]
    N = mb.keep.numel()
    select = (torch.arange(N, device=logits.device) < mb.image_labels)[None]  # image-caption labels
    if cfg.loss == "rho1":
        loss = rho1_loss(logits, mb.labels, mb.p_ref, cfg.rho1_keep, select)
    elif cfg.loss == "cal":
        # "Without the image" = each caption with another sample's image (the micro-batch's images rolled by
        # one), not with zeroed image embeddings: zeros are an input the decoder never saw at those positions,
        # so the logit change would mix "no information" with "unusual input"; another image is in
        # distribution, keeps every shape and position, and its difference isolates what is specific to this
        # image (tokens any image predicts equally, e.g. boilerplate, get ~0 and the floor weight 1). With one
        # image (or identical images) the difference is 0: NTP. Costs one more forward without gradient of the
        # image-caption rows (~+1/3 of a step when everything trains, more with --train projector).
        with torch.no_grad():
            if mb.n_images >= 2:
                with autocast(device):
                    null = extra_model(mb.input_ids[image_part], mb.pixels.roll(1, 0), mb.position_ids[image_part],
                                       mb.doc_ids[image_part], keep=mb.keep[:mb.image_labels])
                without = torch.cat([null.float()[None], logits[:, mb.image_labels:].float()], 1)
            else:
                without = logits.float()
        loss = cal_loss(logits, mb.labels, without, mb.captions, select)
    else:
        loss = weighted_loss(logits, mb.labels, mb.weights, mb.captions, scale_by_k=not cfg.no_k)

    aux = None
    heads = getattr(model, "aux", None)
    if cfg.objective == "itm":
        h = decoder.norm(flat.index_select(0, mb.eos))
        if mb.n_images >= 2:
            with autocast(device):
                xm = extra_model(mb.input_ids[image_part], mb.pixels.roll(1, 0), mb.position_ids[image_part],
                                 mb.doc_ids[image_part], return_hidden=True)
            hm = decoder.norm(xm.flatten(0, 1).index_select(0, mb.eos))
            aux = itm_loss(heads.itm, h, hm)
        else:  # no other image to mismatch with: 0, with every head parameter in the graph (DDP expects it)
            aux = 0 * heads.itm(h).float().sum()
    elif cfg.objective == "itc":
        P = mb.slots.numel() // max(mb.n_images, 1)
        image = decoder.norm(flat.index_select(0, mb.slots)).view(mb.n_images, P, -1).mean(1)
        t_ids, t_pos, t_doc, t_eos = mb.text
        trains = any(p.requires_grad for p in decoder.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()), autocast(device):
            xt = extra_model(t_ids, None, t_pos, t_doc, return_hidden=True)
            text = decoder.norm(xt.flatten(0, 1).index_select(0, t_eos))
        if mb.n_images >= 2:
            aux = itc_loss(heads, image, text)
        else:
            aux = 0 * itc_logits(heads, image, text).sum() + 0 * heads.itc_logit_scale
    elif cfg.objective == "recon":
        h = decoder.norm(flat.index_select(0, mb.slots))
        target = patchify(mb.pixels, model.cfg.patch_size).flatten(0, 1)
        aux = recon_loss(heads.recon, h, target)
    return logits, loss, aux


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
class AttnConfig:
    data: str = field(default="data/synth/train.jsonl",
                      metadata={"help": "image-caption pairs to train the scorer on and to score (train.py's --data)"})
    tokenizer: str = field(default="out/tokenizer.json", metadata={"help": "tokenizer.json (train.py's)"})
    out: str = field(default="out/attn_scores_train.pt",
                     metadata={"help": "score file of per-token attention weights, read by train.py --loss attn "
                                       "--attn-scores"})
    init_decoder: str = field(default="",
                              metadata={"help": "base-LM checkpoint (reference_lm.py) to start the text side from "
                                                "('' = scratch)"})
    init_encoder: str = field(default="",
                              metadata={"help": "ViT checkpoint (vision.py) to start the image side from "
                                                "('' = scratch)"})
    image_size: int = field(default=48, metadata={"help": "image size (scratch ViT; --init-encoder's otherwise)"})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size (scratch ViT)"})
    vit_dim: int = field(default=96, metadata={"help": "ViT width (scratch ViT)"})
    vit_depth: int = field(default=2, metadata={"help": "ViT depth (scratch ViT)"})
    vit_heads: int = field(default=3, metadata={"help": "ViT heads (scratch ViT)"})
    d_model: int = field(default=128, metadata={"help": "text width (scratch text model)"})
    n_layer: int = field(default=0,
                         metadata={"help": "text transformer blocks before the cross-attention (0 = each token's "
                                           "own embedding)"})
    n_head: int = field(default=4, metadata={"help": "text heads (scratch text model)"})
    steps: int = field(default=400, metadata={"help": "training steps"})
    batch_size: int = field(default=64,
                            metadata={"help": "image-caption pairs per step (each caption is contrasted with "
                                              "every image)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (warm-up 5%%, cosine to lr/10)"})
    budget: float = field(default=0.3,
                          metadata={"help": "price on the attention mass a token gives the image (pushes "
                                            "image-unrelated tokens to the null slot)"})
    seed: int = field(default=0, metadata={"help": "seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more than this share of records is bad"})
    workers: int = field(default=0, metadata={"help": "processes for decoding images at start-up"})


def train_attention_scorer(cfg):
    """Train an AttentionScorer on cfg.data and write every record's per-label weights (caption tokens, then
    <|eos|>; the same layout and fingerprints as score.py's p_ref, so train.py --loss attn loads them with
    score.load_scores). Returns (scorer, {record id: weights}). Records share data/records.py's reader and
    data/images.py's image decoding; images are used at the scorer's own size."""
    from data.images import load_images, normalize
    from data.records import read_records
    from reference_lm import make_optimizer
    from score import quantise
    from utils import (atomic_save, check_fingerprint, load_checkpoint, lr_at, pick_device, seed_everything,
                       text_fingerprint)

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
    from train import make_samples
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
    from cli import parse_config
    train_attention_scorer(parse_config(AttnConfig, description=__doc__))
