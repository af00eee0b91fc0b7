"""Controls that separate "which tokens" from "any reweighting" (docs/experiment.md, "Which tokens matter"), each a
token weighting registered like PRIOR (train.weighting), so every driver and `--loss NAME` reaches it:

    python -m experiments train --loss anti_prior ...              # w = p_ref^alpha: PRIOR's spread, opposite tokens
    python -m experiments train --loss prior_shuffled_tag ...      # PRIOR's weights permuted within each word tag
    python -m experiments train --loss prior --alpha 2 ...         # the dose: w = (1 - p_ref)^alpha (paper Fig. 5)
    python -m experiments.main --arms ntp,prior_alpha0.5,prior,prior_alpha2 --tune ntp,prior_alpha0.5,prior,prior_alpha2

Beside train.py's prior_shuffled (PRIOR's weights permuted within a caption: the same weights on random tokens):
- anti_prior puts a spread of the same kind on the opposite tokens, the ones the reference LM finds easy
  (boilerplate), normalised per caption like PRIOR (loss.weighted_loss). If the choice of tokens is what helps,
  PRIOR > shuffled > anti-PRIOR.
- prior_shuffled_tag keeps PRIOR's allocation across the generator's word tags (image, glue, boiler, noise: how
  much of a caption's loss each tag gets) and randomises it inside them: if it matches PRIOR, what PRIOR gets right
  is the share per kind of word, not the token within a kind.
Both permutations depend on the record id alone (not on the training seed), as prior_shuffled's. prior_alpha0.5 and
prior_alpha2 are PRIOR at a fixed alpha, so a dose-response is a list of arms of one main job.
"""
import hashlib

import torch

from loss import prior_weights
from train import prior, weighting


@weighting("anti_prior", inputs={"p_ref": "scores"})
def anti_prior(cfg, batch, state):
    # p_ref^alpha = (1 - (1 - p_ref))^alpha: PRIOR's formula on the complement, clamped the same way
    return prior_weights(1.0 - batch.inputs["p_ref"], cfg.alpha)


def record_generator(record_id):
    """A torch.Generator seeded by the record id only: the same control on every training seed."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(str(record_id).encode()).digest()[:8], "little"))


def shuffle_within_tags(p_ref, tags, generator):
    """p_ref (a list, one per label) with the values of each tag's positions permuted among themselves; positions
    of unknown tag (-1) form a group of their own."""
    out = list(p_ref)
    for tag in sorted(set(tags)):
        where = [i for i, t in enumerate(tags) if t == tag]
        order = torch.randperm(len(where), generator=generator).tolist()
        for i, j in zip(where, order):
            out[i] = p_ref[where[j]]
    return out


def shuffle_p_ref_by_tag(cfg, samples, records, tok, device):
    if any(s.tags is None for s in samples):
        from utils import UserError
        raise UserError("--loss prior_shuffled_tag needs the generator's word tags in --data (a 'tags' field)")
    for s in samples:
        s.inputs["p_ref"] = shuffle_within_tags(s.inputs["p_ref"], s.tags, record_generator(records[s.index].id))


weighting("prior_shuffled_tag", inputs={"p_ref": "scores"}, prepare=shuffle_p_ref_by_tag)(prior)


def prior_at(alpha):
    def weights(cfg, batch, state):
        return prior_weights(batch.inputs["p_ref"], alpha)
    return weights


for _alpha in (0.5, 2.0):  # the paper's Fig. 5 doses beside alpha = 1 (prior)
    weighting(f"prior_alpha{_alpha:g}", inputs={"p_ref": "scores"})(prior_at(_alpha))
