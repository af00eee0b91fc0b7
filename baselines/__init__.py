"""Baselines and related methods: every caption loss other than NTP, PRIOR and the tag oracle, and the auxiliary
objectives. train.py reaches all of them through one hook, `Baseline` (hook(cfg) is None for the core losses).

    losses.py     rare (the paper's rare-word weighting), rho1 (Rho-1), cal (CAL): caption losses
    heads.py      itm, itc, recon (the paper's auxiliary-objective baselines) and the micro-batch loss of all
    attention.py  the attention-weighting baseline's scorer: `python -m baselines.attention` writes the weights
                  that `train.py --loss attn --attn-scores FILE` reads

A new method: its name in LOSSES (a caption weighting) or heads.OBJECTIVES (a loss added to the caption loss),
its flags in train.TrainConfig, its per-token weights in Baseline.weights or its loss in heads.micro_batch_loss.
"""
import torch

from data import tokenizer as T
from baselines.heads import MicroBatch, attach_heads, host_positions, micro_batch_loss
from baselines.losses import inverse_frequency_table
from data.packing import pack, to_device
from data.scores import load_scores
from lib.utils import file_fingerprint

LOSSES = ("rare", "attn", "rho1", "cal")


def hook(cfg, world=1):
    """The Baseline for cfg's --loss and --objective (in `world` processes), or None for NTP, PRIOR and the oracle
    without an objective."""
    return Baseline(cfg, world) if cfg.loss in LOSSES or cfg.objective != "none" else None


class Baseline:
    """What train.py asks of a method that is not in the core: its inputs, heads, weights and micro-batch loss."""

    def __init__(self, cfg, world=1):
        if not 0 < cfg.rho1_keep <= 1:
            raise ValueError(f"--rho1-keep must be in (0, 1], got {cfg.rho1_keep}")
        if cfg.fsdp and world > 1 and (cfg.loss == "cal" or cfg.objective != "none"):
            raise ValueError("--fsdp with several processes does not support --loss cal or an --objective (their "
                             "extra forwards and heads run outside the sharded forward); use DDP (drop --fsdp)")
        self.cfg, self.rare_table = cfg, None

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

    def token_inputs(self, tok, data_fp, inputs):
        """(p_ref, weights): {record id: tensor} from --scores (rho1) or --attn-scores (attn), else None; their
        fingerprints go into `inputs` (checked by --resume)."""
        cfg = self.cfg
        if cfg.loss == "rho1":
            inputs["scores"] = file_fingerprint(cfg.scores)
            return load_scores(cfg.scores, T.fingerprint(tok), data_fp, cfg.data), None
        if cfg.loss == "attn":
            inputs["attn_scores"] = file_fingerprint(cfg.attn_scores)
            return None, load_scores(cfg.attn_scores, T.fingerprint(tok), data_fp, cfg.data)
        return None, None

    def prepare(self, samples, vocab_size, device):
        if self.cfg.loss == "rare":  # inverse token frequency over the training captions (with <|eos|>)
            table = inverse_frequency_table([s.caption_ids + [T.EOS] for s in samples], vocab_size)
            self.rare_table = table.to(device)

    def weights(self, batch):
        """Per-position weights (R, L) of a baseline --loss; rho1 and cal make theirs online (micro_batch_loss)."""
        if self.cfg.loss == "rare":
            return self.rare_table[batch.labels.clamp(min=0)]
        if self.cfg.loss == "attn":
            return batch.weights.float()
        return torch.ones_like(batch.p_ref)

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
        mb = MicroBatch(batch.input_ids, batch.position_ids, batch.doc_ids, pixels, keep, labels, captions[None],
                        weights.flatten()[keep][None], batch.p_ref.flatten()[keep][None], image_rows, image_labels,
                        n_images, eos, slots, text)
        return micro_batch_loss(self.cfg, model, train_model, mb, device)
