"""Baselines and related methods: every caption loss other than NTP, PRIOR and the tag oracle, and the auxiliary
objectives, plugged into train.py when this package is imported (the core never imports it):

    python -m baselines train --loss rare ...     # train.py with the baselines registered

    losses.py     rare (the paper's rare-word weighting), rho1 (Rho-1), cal (CAL): caption losses
    heads.py      itm, itc, recon (the paper's auxiliary-objective baselines) and the micro-batch loss of all
    attention.py  the attention-weighting baseline's scorer: `python -m baselines.attention` writes the weights
                  that `--loss attn --attn-scores FILE` reads

A token weighting is a function registered with train.weighting (rare, attn below; rho1 and cal too, with NTP's
weights, because they make theirs online). A method that needs more (its own micro-batch loss: rho1, cal, the
--objective heads) is the Baseline hook, registered as the plug-in "method"; its flags are in train.TrainConfig.
"""
import torch

from data import tokenizer as T
from baselines.heads import MicroBatch, attach_heads, host_positions, micro_batch_loss
from baselines.losses import inverse_frequency_table
from data.packing import pack, to_device
from train import ntp_weights, weighting
from utils import register
import scale.alarm  # noqa: F401,E402 (the training alarm, for the weighted losses too)

LOSSES = ("rare", "attn", "rho1", "cal")


def rare_table(cfg, samples, records, tok, device):
    """Inverse token frequency over the training captions (with <|eos|>): the rare-word weighting's table."""
    return inverse_frequency_table([s.caption_ids + [T.EOS] for s in samples], tok.get_vocab_size()).to(device)


@weighting("rare", prepare=rare_table)
def rare(cfg, batch, table):
    return table[batch.labels.clamp(min=0)]


@weighting("attn", inputs={"attn": "attn_scores"})
def attn(cfg, batch, state):
    """Per-token weights from python -m baselines.attention (CLIP-style cross-attention scores)."""
    return batch.inputs["attn"].float()


weighting("rho1", inputs={"p_ref": "scores"})(ntp_weights)  # Rho-1 selects its tokens online (heads.py)
weighting("cal")(ntp_weights)  # CAL weighs its tokens online, from the model itself (heads.py)


@register("method")
def hook(cfg, world=1):
    """The Baseline for cfg's --loss and --objective (in `world` processes), or None for a weighting alone."""
    return Baseline(cfg, world) if cfg.loss in ("rho1", "cal") or cfg.objective != "none" else None


class Baseline:
    """What train.py asks of a method that is not in the core: its inputs, heads, weights and micro-batch loss."""

    def __init__(self, cfg, world=1):
        if not 0 < cfg.rho1_keep <= 1:
            raise ValueError(f"--rho1-keep must be in (0, 1], got {cfg.rho1_keep}")
        if cfg.fsdp and world > 1 and (cfg.loss == "cal" or cfg.objective != "none"):
            raise ValueError("--fsdp with several processes does not support --loss cal or an --objective (their "
                             "extra forwards and heads run outside the sharded forward); use DDP (drop --fsdp)")
        self.cfg = cfg

    def per_micro_batch(self):
        """Whether the loss depends on how a batch is split (rho1 selects and cal normalises per micro-batch, the
        objectives draw their pairs per micro-batch): then --resume must keep --micro-batch (docs/scale.md)."""
        return self.cfg.loss in ("rho1", "cal") or self.cfg.objective != "none"

    def attach(self, model, start=None):
        """The --objective's heads on model.aux, after the VLM's own initialisation (the VLM draws the same random
        numbers with or without them); kept from an --init-from checkpoint `start` of the same objective."""
        heads = attach_heads(model, self.cfg.objective, self.cfg.itc_dim)
        saved = {k[4:]: v for k, v in start["model"].items() if k.startswith("aux.")} if start else {}
        if heads is not None and saved and start.get("config", {}).get("objective") == self.cfg.objective:
            heads.load_state_dict(saved)

    def host(self, batch, image_rows, image_indices, samples, device):
        """Positions the objectives need, computed on the host before the batch moves (no device sync)."""
        eos, slots, image_labels = host_positions(batch, image_rows)
        text = None
        if self.cfg.objective == "itc":  # the same captions without their images, in the images' order
            tb = pack([samples[i] for i in image_indices], self.cfg.row_len)
            text = tuple(to_device(t, device) for t in (tb.input_ids, tb.position_ids, tb.doc_ids,
                                                        (tb.labels == T.EOS).flatten().nonzero().squeeze(1)))
        return to_device(eos, device), to_device(slots, device), image_labels, len(image_indices), text

    def loss(self, model, train_model, batch, pixels, keep, labels, captions, weights, image_rows, host, device):
        """(logits, caption loss, auxiliary loss or None) of one micro-batch (heads.micro_batch_loss)."""
        eos, slots, image_labels, n_images, text = host
        p_ref = batch.inputs["p_ref"].flatten()[keep][None] if "p_ref" in batch.inputs else None  # rho1's
        mb = MicroBatch(batch.input_ids, batch.position_ids, batch.doc_ids, pixels, keep, labels, captions[None],
                        weights.flatten()[keep][None], p_ref, image_rows, image_labels, n_images, eos, slots, text)
        return micro_batch_loss(self.cfg, model, train_model, mb, device)
