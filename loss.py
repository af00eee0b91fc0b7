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

The same machinery serves the rare-word baseline of the paper (Table 1):
build `inverse_frequency_table` once from the training captions and pass
`table[labels.clamp(min=0)]` as the weights of `weighted_loss`.

Two related online weightings, not in the paper, for comparison (see the sections at the end):
  * Rho-1 (`rho1_loss`): hard selection, keep the top k% tokens of the batch by excess loss
    l_i - (-log p_ref_i) and average over them; depends on the model, changes every step.
  * CAL (`cal_loss`): w_i = clamp(logit with the image - logit without it, 1, 5) from the model itself,
    3-token moving average inside each caption, normalised over the batch (mean 1); needs a second,
    gradient-free forward without the image.
PRIOR differs from both: soft, static, offline weights from a text-only reference model.
"""

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# plain next-token prediction

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
# per-caption re-weighting

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
# PRIOR: weights from a text-only reference LM

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
# rare-word baseline (paper, Table 1)

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


def inverse_frequency_table(token_id_lists, vocab_size, smoothing=1.0):
    """Per-vocabulary weight favouring rare tokens, (V,) float32.

    Raw weight of token v: 1 / (count_v + smoothing), count_v being its number
    of occurrences in `token_id_lists` (an iterable of token-id sequences:
    lists or 1-D tensors, e.g. the tokenised training captions). smoothing > 0
    keeps unseen tokens finite and tempers the weight of very rare ones.

    The table is then rescaled so that its count-weighted mean is 1, i.e. the
    average weight of a training token is 1:
        sum_v count_v * table_v / sum_v count_v == 1.
    Inside `weighted_loss` the per-caption normalisation makes any global scale
    irrelevant; the rescaling just makes the numbers readable (>1: rarer than
    average) and usable by code that does not normalise.
    Negative ids (padding, ignore_index) are skipped.
    """
    assert smoothing > 0, "smoothing must be > 0 (unseen tokens would get 1/0)"
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in token_id_lists:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size {vocab_size}")
        counts += torch.bincount(ids, minlength=vocab_size).double()
    table = 1.0 / (counts + smoothing)
    n = counts.sum()
    if n > 0:  # no tokens at all: nothing to normalise against, keep 1/smoothing
        table = table * (n / (counts * table).sum())
    return table.float()


# -----------------------------------------------------------------------------
# Rho-1 (selective language modelling; Lin et al. 2024): not in the PRIOR paper

def reference_losses(p_ref, eps=1e-6):
    """-log p_ref, float32: the reference LM's token loss. p_ref is clamped to [eps, 1] first, so a
    probability stored as 0 (uint16 quantisation, or a label past the reference LM's context) gives a
    large finite loss, not inf."""
    return -p_ref.float().clamp(eps, 1.0).log()


def rho1_factors(token_loss, p_ref, valid, keep_fraction, select=None):
    """Rho-1's hard token selection as loss factors, (B, T) float32 (any shape works: it is flattened).

    Excess loss x_i = l_i - (-log p_ref_i), with l_i the model's own token loss (detached: selection is
    a hard, non-differentiable choice). Among the `select`ed valid positions (None: all valid ones) the
    k = round(keep_fraction * n_sel) (at least 1) with the largest excess are kept; ties go to the earlier
    position. Kept tokens get the factor n_sel / k, dropped ones 0, so that sum(f * l) / n_sel is the
    mean loss over the kept tokens (Rho-1's "average over the selected tokens"); valid positions outside
    `select` (e.g. text-only rows, which train with NTP in every arm) get 1; invalid ones 0.
    keep_fraction = 1 keeps everything with factor n/n == 1.0 exactly: NTP, bit for bit.

    Everything stays on the device (k is a tensor, ranks come from one sort): no host sync.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    shape = valid.shape
    valid = valid.reshape(-1)
    sel = valid if select is None else valid & select.reshape(-1)
    excess = token_loss.detach().float().reshape(-1) - reference_losses(p_ref.reshape(-1))
    score = torch.where(sel, excess, float("-inf"))
    n = score.numel()
    n_sel = sel.sum()
    k = torch.floor(n_sel.float() * keep_fraction + 0.5).clamp(min=1)
    order = score.argsort(descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    kept = sel & (rank < k)
    f = torch.where(kept, n_sel.float() / k, 0.0)
    f = torch.where(valid & ~sel, 1.0, f)
    return f.view(shape)


def rho1_loss(logits, labels, p_ref, keep_fraction=0.6, select=None, ignore_index=-100):
    """Rho-1: mean token loss over the top keep_fraction of the (selected) tokens by excess loss
    (see rho1_factors), divided like every loss here by the number of valid tokens."""
    valid = labels != ignore_index
    tl = token_losses(logits, labels, ignore_index)
    f = rho1_factors(tl, p_ref, valid, keep_fraction, select)
    return _mean_over_valid((f * tl).sum(), valid)


# -----------------------------------------------------------------------------
# CAL-style weighting (contrast with / without the image; Xiao et al. 2024): not in the PRIOR paper

def label_logits(logits, labels):
    """The logit of each position's label, float32, shape of labels (0 where the label is ignored)."""
    idx = labels.clamp(min=0).unsqueeze(-1)
    return torch.where(labels >= 0, logits.float().gather(-1, idx).squeeze(-1), 0.0)


def moving_average(w, valid, caption_ids=None):
    """3-token moving average of w (B, T) along T, within each caption: a token averages itself with its
    valid left and right neighbours of the same caption (caption_ids None: one caption per row), so the
    ends of a caption average over 2 tokens and a 1-token caption keeps its value. 0 where invalid."""
    ids = torch.zeros_like(w, dtype=torch.long) if caption_ids is None else caption_ids
    w = torch.where(valid, w, 0.0)
    pair = valid[:, 1:] & valid[:, :-1] & (ids[:, 1:] == ids[:, :-1])  # t-1 and t are neighbours
    total, count = w.clone(), valid.float()
    total[:, 1:] += torch.where(pair, w[:, :-1], 0.0)   # left neighbour
    count[:, 1:] += pair.float()
    total[:, :-1] += torch.where(pair, w[:, 1:], 0.0)   # right neighbour
    count[:, :-1] += pair.float()
    return torch.where(valid, total / count.clamp(min=1), 0.0)


def cal_weights(logit_with, logit_without, valid, caption_ids=None, low=1.0, high=5.0):
    """CAL's raw token weights, (B, T) float32, no gradient: clamp(logit of the label with the image -
    logit without it, low, high), then smoothed by `moving_average` (which keeps them in [low, high]).
    0 where invalid."""
    diff = (logit_with.detach().float() - logit_without.detach().float()).clamp(low, high)
    return moving_average(diff, valid, caption_ids)


def batch_factors(weights, valid, select=None):
    """Weights normalised over the whole batch instead of per caption: f = w / mean(w) over the selected
    valid positions (None: all valid), so their mean factor is 1; valid positions outside `select` get 1
    (text-only rows: NTP), invalid ones 0. Weights are detached."""
    w = weights.detach().float()
    sel = valid if select is None else valid & select
    mean = torch.where(sel, w, 0.0).sum() / sel.sum().clamp(min=1)
    f = torch.where(sel, w / mean.clamp(min=1e-12), 0.0)
    return torch.where(valid & ~sel, 1.0, f)


def cal_loss(logits, labels, logits_without, caption_ids=None, select=None, ignore_index=-100):
    """CAL-style loss: sum_i f_i l_i / n_valid with f = batch-normalised `cal_weights` of the label logits
    with the image (`logits`, which carry the gradient) and without it (`logits_without`, a second
    forward; only read, never differentiated)."""
    valid = labels != ignore_index
    w = cal_weights(label_logits(logits, labels), label_logits(logits_without, labels), valid, caption_ids)
    f = batch_factors(w, valid, select)
    return _mean_over_valid((f * token_losses(logits, labels, ignore_index)).sum(), valid)
