"""The baselines' caption losses: the paper's rare-word weighting (Table 1), and two related online
weightings not in the paper, for comparison.

  * rare (`inverse_frequency_table`): a weight per vocabulary id, 1 / (count + 1), rescaled to mean 1 over the
    training tokens; passed to loss.weighted_loss like PRIOR's weights.
  * Rho-1 (`rho1_loss`): hard selection, keep the top k% tokens of the batch by excess loss
    l_i - (-log p_ref_i) and average over them; depends on the model, changes every step.
  * CAL (`cal_loss`): w_i = clamp(logit with the image - logit without it, 1, 5) from the model itself,
    3-token moving average inside each caption, normalised over the batch (mean 1); needs a second,
    gradient-free forward without the image.

Conventions as in loss.py (logits (B, T, V), shifted labels, ignore_index -100, caption_ids).
"""
import torch

from loss import _mean_over_valid, token_losses


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
