"""
Token-weighted next-token-prediction losses for PRIOR.

PRIOR (Chen et al. 2025, "Prioritizing Image-Related Tokens Enhances
Vision-Language Pre-Training") trains a vision-language model with the usual
next-token prediction (NTP) loss, but re-weights every caption token by how
*unpredictable* it is for a text-only reference LM. Tokens the reference LM
already predicts well from the text alone (function words, boilerplate) are
mostly noise for learning to see; tokens it cannot predict (the object, its
colour, the count) are the ones that need the image.

Notation, for one caption c with k_c valid (non-ignored) tokens, model loss
l_i = -log p_model(y_i | image, y_<i) and reference probability
p_ref_i = p_ref(y_i | y_<i):

    w_i = (1 - p_ref_i) ** alpha                                  (weights)

    f_i = k_c * w_i / sum_{j in c} w_j                            (factor)

    L   = sum_c sum_{i in c} f_i * l_i  /  sum_c k_c              (Eq. 4)

Why this shape:
  * Per-caption normalisation (dividing by sum_{j in c} w_j) turns the weights
    into an importance distribution over the caption's tokens, so only their
    *relative* sizes matter: a caption whose tokens are all easy is not
    silenced, it simply spreads its weight evenly.
  * The factor k_c rescales that distribution so that the mean factor in every
    caption is exactly 1. The loss therefore stays on NTP's scale (same
    learning rate, same loss curves to compare) and a caption keeps the share
    of the batch loss it has under NTP.
  * Uniform weights give f_i = 1 everywhere and L is *exactly* NTP.
  * A caption whose weights sum to 0 (every token has p_ref = 1) falls back to
    uniform weights instead of dividing by zero.

Worked example (the authors' figure): three tokens of one caption with model
losses 0.68, 0.47, 0.71 and reference probabilities 0.01, 0.11, 0.47. In that
caption sum_j w_j / k_c = 2/3, so f_i = 1.5 * (1 - p_ref_i) and the weighted
losses become 0.68*1.5*0.99 = 1.01, 0.47*1.5*0.89 = 0.63, 0.71*1.5*0.53 = 0.56:
the image-dependent, hard-to-guess token gains weight, the guessable one loses.

Conventions (all functions): `logits` (B, T, V) in any float dtype, the
cross-entropy is always computed in float32; `labels` (B, T) long, already
shifted (logits[b, t] predicts labels[b, t]); positions whose label equals
`ignore_index` (-100) carry no loss and no gradient. Several captions may be
packed into one row; `caption_ids` (B, T) tells them apart (None: one caption
per row). Weights are constants: no gradient flows into them.

Where they run: train.py's registered weightings make w (`prior_weights` for --loss prior) and `weighted_loss`
applies Eq. 4 to a packed micro-batch, whatever the weighting (oracle, shuffled, the baselines'); `token_losses`
gives its per-tag NLL. `prior_loss` is the two in one call, for a training loop of your own; tests/test_loss.py
checks it against the worked example and against NTP. `shuffle_within_captions` is PRIOR's control.
"""

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# plain next-token prediction (the per-token losses every weighting multiplies)

def token_losses(logits, labels, ignore_index=-100):
    """Per-position cross-entropy, (B, T) float32, exactly 0 where ignored.

    F.cross_entropy with reduction='none' already writes 0 (and back-props 0)
    at ignored positions, whatever garbage the logits hold there, so no extra
    masking is needed. Upcasting to float32 costs one (B, T, V) copy for
    half-precision logits; it is a no-op for float32 logits.
    """
    V = logits.size(-1)
    loss = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1),
                           ignore_index=ignore_index, reduction='none')
    return loss.view(labels.shape)


def _mean_over_valid(total, valid):
    # Dividing by max(n, 1) makes an all-ignored batch give loss 0 (with zero
    # gradient) rather than 0/0 = NaN, which would poison the optimizer state.
    return total / valid.sum().clamp(min=1)


def ntp_loss(logits, labels, ignore_index=-100):
    """Mean cross-entropy over the positions whose label is not ignore_index.

    Reduced through the same path as `weighted_loss`, so that uniform weights
    give bit-identical results (F.cross_entropy's built-in mean sums in a
    different order and can differ in the last bit).
    """
    valid = labels != ignore_index
    return _mean_over_valid(token_losses(logits, labels, ignore_index).sum(), valid)


# -----------------------------------------------------------------------------
# per-caption re-weighting: Eq. 4 for any token weights (PRIOR's, the oracle's, the baselines')

def _caption_index(caption_ids):
    """Map every position to a flat caption index in [0, B*T), (B, T) long.

    Captions are (row, id) pairs. Ids may be any numbers (large, sparse,
    repeated across rows), so instead of `row * (max_id + 1) + id`, which needs
    max_id on the host (a device sync, a graph break under torch.compile) and
    can overflow, we rank the ids inside each row: sort the row, mark where the
    sorted value changes, cumsum -> dense rank < T. All on the device.
    Invalid positions may land in a real caption's bucket; harmless, since the
    caller gives them weight 0 and count 0.
    """
    B, T = caption_ids.shape
    sorted_ids, order = caption_ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids)
    starts[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()
    rank_sorted = starts.cumsum(dim=1) - 1
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    row = torch.arange(B, device=caption_ids.device).unsqueeze(1)
    return row * T + rank


def caption_factors(weights, valid, caption_ids=None, scale_by_k=True):
    """Per-token loss multiplier f, (B, T) float32 (see the module docstring).

    weights: (B, T) non-negative float, values at invalid positions are ignored
        (they may be NaN or inf).
    valid: (B, T) bool, positions that carry a loss.
    caption_ids: (B, T) long or None. A caption is the set of valid positions
        of one row sharing an id; rows never share captions. None: each row is
        one caption.
    scale_by_k: f_i = k_c w_i / sum_c w (mean 1 per caption); if False,
        f_i = w_i / sum_c w (sum 1 per caption).

    A caption whose weights sum to 0 gets uniform weights. f = 0 where invalid.
    """
    w = torch.where(valid, weights.float(), 0.0)
    v = valid.float()
    if caption_ids is None:
        # one caption per row: the sums are plain row reductions
        w_sum = w.sum(dim=1, keepdim=True).expand_as(w)
        k = v.sum(dim=1, keepdim=True).expand_as(w)
    else:
        # scatter every token into its caption's bucket, then gather back
        idx = _caption_index(caption_ids).view(-1)
        n = valid.numel()
        w_sum = torch.zeros(n, device=w.device).index_add_(0, idx, w.view(-1))[idx].view_as(w)
        k = torch.zeros(n, device=w.device).index_add_(0, idx, v.view(-1))[idx].view_as(w)

    degenerate = w_sum <= 0  # all-zero caption (or an invalid position)
    num = torch.where(degenerate, 1.0, w)
    den = torch.where(degenerate, k, w_sum)
    if scale_by_k:
        # multiply before dividing: uniform weights then give k/k == 1.0 exactly
        num = num * k
    den = torch.where(valid, den, 1.0)  # keep 0/0 out of the graph at padding
    return torch.where(valid, num / den, 0.0)


def weighted_loss(logits, labels, weights, caption_ids=None, scale_by_k=True,
                  ignore_index=-100):
    """sum_i f_i * l_i / (number of valid tokens), f from `caption_factors`.

    The denominator is sum_c k_c, the number of valid tokens, for both values
    of scale_by_k: with scale_by_k=False each caption contributes its weighted
    *mean* loss, so the result is (sum of caption means) / (token count).
    Weights are detached: they are importance scores, not something to learn.
    """
    valid = labels != ignore_index
    f = caption_factors(weights.detach(), valid, caption_ids, scale_by_k)
    tl = token_losses(logits, labels, ignore_index)
    return _mean_over_valid((f * tl).sum(), valid)


# -----------------------------------------------------------------------------
# PRIOR: weights from a text-only reference LM (prior_weights: what training calls; prior_loss: the one-call form)

def prior_weights(p_ref, alpha=1.0):
    """w = (1 - p_ref) ** alpha, float32, p_ref clamped to [0, 1] first.

    alpha sharpens (alpha > 1) or flattens (alpha < 1) the preference for
    tokens the reference LM finds hard; alpha = 0 is NTP (all ones, also where
    p_ref == 1, where 0 ** 0 would be a matter of convention).
    """
    p = p_ref.float().clamp(0.0, 1.0)
    if alpha == 0:
        return torch.ones_like(p)
    return (1.0 - p) ** alpha


def prior_loss(logits, labels, p_ref, alpha=1.0, scale_by_k=True,
               caption_ids=None, ignore_index=-100):
    """PRIOR's loss (Eq. 4): `weighted_loss` with w = (1 - p_ref) ** alpha.

    p_ref: (B, T) float aligned with labels, the reference LM's probability of
    labels[b, t]; values at ignored positions are irrelevant.
    """
    return weighted_loss(logits, labels, prior_weights(p_ref, alpha), caption_ids,
                         scale_by_k, ignore_index)


# -----------------------------------------------------------------------------
# PRIOR's control: the same weights on the wrong tokens (--loss prior_shuffled)

def shuffle_within_captions(p_ref):
    """The control for PRIOR: each caption's scores permuted among its own tokens (eos included). The same
    multiset of weights per caption, so the same loss scale and the same spread, but on the wrong tokens:
    if PRIOR beats this, it is the choice of tokens that helps, not reweighting as such. The permutation
    depends only on the record id (not on the training seed), so every seed trains on the same control.
    p_ref: {record id: (k + 1,) tensor} as score.py writes it."""
    import hashlib
    out = {}
    for rid, p in p_ref.items():
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(str(rid).encode()).digest()[:8], "little"))
        out[rid] = p[torch.randperm(len(p), generator=g)]
    return out
