"""Auxiliary objectives for the paper's Table 1 baselines, each added to the caption loss (NTP or any --loss):

    itm    image-text matching: a binary matched / mismatched classifier on the decoder's final hidden state
           at each caption's last input token (the position whose label is <|eos|>: it has seen the image and
           the whole caption). Mismatched pairs: the same captions with the micro-batch's images rolled by one
           (caption i with image i-1), in a second forward with gradient. Cost: one more forward and backward
           of the image-caption rows (the H-LVLM's ViT runs again too).
    itc    image-text contrastive: InfoNCE (both directions, learned temperature, init 0.07) between the
           pooled image (mean of the decoder's final hidden states at the image's <|image|> positions: the
           LVLM's visual outputs, which see only the image under causal attention) and the caption (final
           hidden state at its last input token in a text-only forward of <|bos|> caption, without the image:
           in the image-caption sequence the caption's states have seen their own image, and matching them
           would be trivial), each through a small learned projection (--itc-dim). Cost: one forward (and,
           when the decoder trains, backward) of the captions alone. With --train projector the text pass runs
           without gradient (the frozen decoder gives constants; only the text projection learns from them).
    recon  reconstructive tuning (ROSS-style pixel regression): a linear head on the final hidden state at
           every <|image|> position predicts that patch's pixels (ImageNet-normalised, as the model's input;
           per-patch normalisation as in MAE would erase each patch's mean colour, most of what the synthetic
           scenes hold), MSE. Slot j of an image is patch j in row-major order in both families (H: the ViT's
           patch grid; U: the pixel patches), so one head fits both. Cost: a linear head on the image
           positions of the same forward.

Their step-time costs over NTP's, measured: docs/performance.md.

All heads live in one module, `AuxHeads`, attached to the VLM as `model.aux` only when an objective is
chosen: it is saved in the checkpoints with the model (keys `aux.*`), restored by --resume, and dropped by
load_model (evaluation needs only the VLM). The heads always train, also with --train projector (they
are new and have nothing to preserve); the frozen encoder and decoder stay frozen, and the auxiliary
gradient reaches the projector through them, as the caption loss's does.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import tokenizer as T
from baselines.losses import cal_loss, rho1_loss
from loss import weighted_loss
from model import init_weights
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
