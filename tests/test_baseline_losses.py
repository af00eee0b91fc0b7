"""Tests for baselines/losses.py: the rare-word table, Rho-1's selection and CAL's weights."""
import math

import pytest
import torch

from baselines.losses import (batch_factors, cal_loss, cal_weights, inverse_frequency_table, label_logits,
                              moving_average, reference_losses, rho1_factors, rho1_loss)
from loss import ntp_loss, token_losses, weighted_loss
from test_loss import IGN, random_batch



# -----------------------------------------------------------------------------
# rare-word baseline

def test_inverse_frequency_table():
    V = 6
    captions = [[0, 1, 1, 2], torch.tensor([1, 1, 3, IGN]), [1, 0]]  # 4 never appears
    table = inverse_frequency_table(captions, V)
    assert table.shape == (V,) and table.dtype == torch.float32
    counts = torch.bincount(torch.tensor([0, 1, 1, 2, 1, 1, 3, 1, 0]), minlength=V).float()
    torch.testing.assert_close((counts * table).sum() / counts.sum(), torch.tensor(1.0))
    # rarer -> heavier: 1 (x5) < 0 (x2) < 2 = 3 (x1) < 4 = 5 (never seen)
    assert table[1] < table[0] < table[2] < table[4]
    assert table[2] == table[3] and table[4] == table[5]
    # proportional to 1 / (count + smoothing)
    torch.testing.assert_close(table[0] / table[1], torch.tensor(6.0 / 3.0))
    with pytest.raises(ValueError):
        inverse_frequency_table([[0, V]], V)
    # drop-in use as weights
    logits = torch.randn(1, 4, V)
    labels = torch.tensor([[0, 1, IGN, 3]])
    loss = weighted_loss(logits, labels, table[labels.clamp(min=0)])
    tl = token_losses(logits, labels)[0]
    w = table[[0, 1, 3]]
    torch.testing.assert_close(loss, (3 * w / w.sum() * tl[[0, 1, 3]]).sum() / 3)
    assert math.isfinite(loss.item())


# -----------------------------------------------------------------------------
# Rho-1 selection

@pytest.mark.parametrize("keep", [0.6, 0.25, 0.999])
def test_rho1_keeps_exactly_the_top_fraction_by_excess_loss(keep):
    logits, labels, p_ref, _ = random_batch(B=4, T=25, seed=10)
    valid = labels != IGN
    tl = token_losses(logits, labels)
    f = rho1_factors(tl, p_ref, valid, keep)
    excess = (tl + torch.log(p_ref))[valid].tolist()  # model loss - (-log p_ref), naive
    n = len(excess)
    k = max(1, math.floor(keep * n + 0.5))
    top = sorted(range(n), key=lambda i: -excess[i])[:k]
    kept = (f[valid] > 0).nonzero().squeeze(1).tolist()
    assert sorted(kept) == sorted(top) and len(kept) == k
    assert torch.all(f[~valid] == 0)
    torch.testing.assert_close(f[valid][kept], torch.full((k,), n / k))
    # the loss is the mean token loss over the kept tokens
    expected = torch.tensor([tl[valid][i] for i in top]).mean()
    torch.testing.assert_close(rho1_loss(logits, labels, p_ref, keep), expected, rtol=1e-6, atol=1e-6)


def test_rho1_keep_one_is_ntp_and_constant_p_ref_ranks_by_model_loss():
    logits, labels, _, caption_ids = random_batch(B=3, T=30, seed=11)
    const = torch.full(labels.shape, 0.3)
    assert torch.equal(rho1_loss(logits, labels, const, keep_fraction=1.0), ntp_loss(logits, labels))
    # with a constant reference the excess is the model loss shifted: the kept tokens are the hardest ones
    valid = labels != IGN
    tl = token_losses(logits, labels)
    f = rho1_factors(tl, const, valid, 0.5)
    kept, dropped = tl[valid][f[valid] > 0], tl[valid][f[valid] == 0]
    assert kept.min() >= dropped.max()
    # and a selection that drops tokens is not NTP
    assert not torch.allclose(rho1_loss(logits, labels, const, 0.5), ntp_loss(logits, labels))


def test_rho1_select_leaves_other_tokens_at_one_and_gradients_only_reach_kept_tokens():
    logits, labels, p_ref, _ = random_batch(B=2, T=20, p_ignore=0.0, seed=12)
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[0] = True  # row 1 plays a text-only row: always kept, factor 1
    valid = labels != IGN
    f = rho1_factors(token_losses(logits, labels), p_ref, valid, 0.5, select)
    assert torch.all(f[1] == 1.0)
    assert int((f[0] > 0).sum()) == 10 and torch.all(f[0][f[0] > 0] == 2.0)
    logits.requires_grad_(True)
    rho1_loss(logits, labels, p_ref, 0.5, select).backward()
    dropped = f == 0
    assert torch.all(logits.grad[dropped] == 0) and torch.all(logits.grad[~dropped].abs().sum(-1) > 0)
    # p_ref == 0 (quantised, or past the reference LM's context) gives a finite reference loss
    assert torch.isfinite(reference_losses(torch.zeros(3))).all()
    with pytest.raises(ValueError):
        rho1_factors(token_losses(logits, labels), p_ref, valid, 0.0)


# -----------------------------------------------------------------------------
# CAL weights

def test_moving_average_stays_inside_captions():
    w = torch.tensor([[1.0, 4.0, 1.0, 5.0, 2.0, 9.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = moving_average(w, valid, ids)
    torch.testing.assert_close(out, torch.tensor([[2.5, 2.0, 2.5, 3.5, 3.5, 0.0]]))
    # a one-token caption keeps its value; no ids: the row is one caption
    torch.testing.assert_close(moving_average(torch.tensor([[3.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool),
                                              torch.tensor([[0, 1]])), torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(moving_average(torch.tensor([[3.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool)),
                               torch.tensor([[2.0, 2.0]]))


def test_cal_weights_in_range_mean_one_and_no_gradient_through_them():
    logits, labels, _, caption_ids = random_batch(B=3, T=24, seed=13)
    g = torch.Generator().manual_seed(14)
    without = logits + torch.randn(logits.shape, generator=g) * 3  # another image: logits move both ways
    valid = labels != IGN
    w = cal_weights(label_logits(logits, labels), label_logits(without, labels), valid, caption_ids)
    assert w[valid].min() >= 1.0 and w[valid].max() <= 5.0 and torch.all(w[~valid] == 0)
    assert w[valid].min() < w[valid].max()  # not all clamped to one value
    f = batch_factors(w, valid)
    torch.testing.assert_close(f[valid].mean(), torch.tensor(1.0))
    torch.testing.assert_close(f[valid] / w[valid], torch.full_like(w[valid], float(f[valid][0] / w[valid][0])))
    # rows outside `select` (text-only) get 1, the selected ones mean 1
    select = torch.zeros_like(valid)
    select[:2] = True
    fs = batch_factors(w, valid, select)
    assert torch.all(fs[2][valid[2]] == 1.0)
    torch.testing.assert_close(fs[valid & select].mean(), torch.tensor(1.0))
    # zero gradient flows through the weights: the gradient equals that of sum(f l) / n with f a constant,
    # and the logits without the image get none at all
    a = logits.clone().requires_grad_(True)
    b = without.clone().requires_grad_(True)
    cal_loss(a, labels, b, caption_ids).backward()
    assert b.grad is None or torch.all(b.grad == 0)
    c = logits.clone().requires_grad_(True)
    ((f * token_losses(c, labels)).sum() / valid.sum()).backward()
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-7)


def test_cal_without_a_contrast_is_ntp():
    logits, labels, _, caption_ids = random_batch(seed=15)
    # same logits with and without the image: every weight is the floor 1, normalised to 1: NTP
    torch.testing.assert_close(cal_loss(logits, labels, logits, caption_ids), ntp_loss(logits, labels),
                               rtol=0, atol=1e-6)
