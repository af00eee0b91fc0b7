"""Tests for loss.py: PRIOR's per-caption weighted NTP loss and its helpers."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import (caption_factors, ntp_loss, prior_loss, prior_weights, token_losses,  # noqa: E402
                  weighted_loss)

IGN = -100


def random_batch(B=3, T=17, V=11, p_ignore=0.3, n_ids=3, seed=0):
    """Random logits / labels / p_ref / caption_ids with some ignored positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < p_ignore] = IGN
    p_ref = torch.rand(B, T, generator=g)
    caption_ids = torch.randint(0, n_ids, (B, T), generator=g)
    return logits, labels, p_ref, caption_ids


def reference_prior_loss(logits, labels, p_ref, caption_ids, alpha=1.0, scale_by_k=True):
    """Naive PRIOR loss: explicit loop over rows and captions, own cross-entropy."""
    logp = logits.float().log_softmax(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    n_valid = 0
    B, T = labels.shape
    for b in range(B):
        for c in sorted({int(caption_ids[b, t]) for t in range(T) if labels[b, t] != IGN}):
            pos = [t for t in range(T) if labels[b, t] != IGN and int(caption_ids[b, t]) == c]
            k = len(pos)
            w = [(1.0 - min(max(float(p_ref[b, t]), 0.0), 1.0)) ** alpha for t in pos]
            s = sum(w)
            if s == 0:
                w, s = [1.0] * k, float(k)
            for t, wi in zip(pos, w):
                f = wi / s * (k if scale_by_k else 1)
                total = total - f * logp[b, t, labels[b, t]]
            n_valid += k
    return total / n_valid


def factors_by_caption(f, valid, caption_ids):
    """{(row, id): tensor of factors} for inspection."""
    out = {}
    for b, t in valid.nonzero().tolist():
        out.setdefault((b, int(caption_ids[b, t])), []).append(f[b, t])
    return {key: torch.stack(v) for key, v in out.items()}


# -----------------------------------------------------------------------------
# plain NTP

def test_token_losses_match_cross_entropy_and_zero_at_ignored():
    logits, labels, _, _ = random_batch()
    tl = token_losses(logits, labels)
    assert tl.shape == labels.shape and tl.dtype == torch.float32
    valid = labels != IGN
    assert torch.all(tl[~valid] == 0)
    ref = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tl[valid], ref[valid], rtol=0, atol=1e-5)


def test_ntp_loss_matches_torch_mean_cross_entropy():
    logits, labels, _, _ = random_batch()
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGN)
    torch.testing.assert_close(ntp_loss(logits, labels), expected, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# reduction to NTP

@pytest.mark.parametrize("use_ids", [False, True])
def test_uniform_weights_equal_ntp_exactly(use_ids):
    # caption lengths 41 and 47 (60 per row without ids): for these k, k * (1 / k) != 1
    # in float32, so the factor must be computed as (k * w) / sum(w) to be exact
    logits, labels, _, _ = random_batch(B=2, T=60, p_ignore=0.0)
    labels[0, 41:] = IGN
    caption_ids = torch.ones_like(labels)
    caption_ids[1, :47] = 0
    ids = caption_ids if use_ids else None
    ntp = ntp_loss(logits, labels)
    ones = torch.ones(labels.shape)
    assert torch.equal(weighted_loss(logits, labels, ones, ids), ntp)
    # any other constant: equal up to the rounding of sum(w) (k * 0.37 != sum of 0.37s)
    w = torch.full(labels.shape, 0.37)
    torch.testing.assert_close(weighted_loss(logits, labels, w, ids), ntp, rtol=0, atol=1e-6)


def test_alpha_zero_is_ntp():
    logits, labels, p_ref, caption_ids = random_batch()
    p_ref[0, :5] = 1.0  # 0 ** 0: must still be weight 1, not a degenerate caption
    assert torch.all(prior_weights(p_ref, alpha=0) == 1)
    for ids in (None, caption_ids):
        torch.testing.assert_close(prior_loss(logits, labels, p_ref, alpha=0, caption_ids=ids),
                                   ntp_loss(logits, labels), rtol=0, atol=1e-6)


def test_prior_weights_clamp_and_power():
    p = torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.5])
    torch.testing.assert_close(prior_weights(p), torch.tensor([1.0, 1.0, 0.75, 0.0, 0.0]))
    torch.testing.assert_close(prior_weights(p, alpha=2.0), torch.tensor([1.0, 1.0, 0.5625, 0.0, 0.0]))


# -----------------------------------------------------------------------------
# caption factors

def test_mean_factor_per_caption_is_one():
    _, labels, p_ref, caption_ids = random_batch(B=4, T=40, n_ids=5, seed=1)
    valid = labels != IGN
    f = caption_factors(prior_weights(p_ref, 2.0), valid, caption_ids)
    assert torch.all(f[~valid] == 0)
    groups = factors_by_caption(f, valid, caption_ids)
    assert len(groups) > 4  # really several captions per row
    for fs in groups.values():
        torch.testing.assert_close(fs.mean(), torch.tensor(1.0), rtol=0, atol=1e-6)
    # without k each caption's factors sum to 1
    f1 = caption_factors(prior_weights(p_ref, 2.0), valid, caption_ids, scale_by_k=False)
    for fs in factors_by_caption(f1, valid, caption_ids).values():
        torch.testing.assert_close(fs.sum(), torch.tensor(1.0), rtol=0, atol=1e-6)


def test_rows_never_share_captions_and_ids_are_arbitrary():
    _, labels, p_ref, caption_ids = random_batch(B=3, T=20, n_ids=3, seed=2)
    valid = labels != IGN
    w = prior_weights(p_ref)
    # the same id in every row == one caption per row
    torch.testing.assert_close(caption_factors(w, valid, torch.zeros_like(caption_ids)),
                               caption_factors(w, valid, None), rtol=0, atol=1e-6)
    # ids are only labels: huge, sparse values give the same captions
    big = caption_ids * 10**15 + 7
    torch.testing.assert_close(caption_factors(w, valid, big),
                               caption_factors(w, valid, caption_ids), rtol=0, atol=0)


def test_one_token_caption():
    valid = torch.tensor([[True, True, True, True]])
    ids = torch.tensor([[0, 0, 0, 1]])  # caption 1 is a single token
    w = torch.tensor([[0.2, 0.5, 0.9, 0.3]])
    assert caption_factors(w, valid, ids)[0, 3] == 1.0
    assert caption_factors(w, valid, ids, scale_by_k=False)[0, 3] == 1.0
    # ... also when its only weight is zero (p_ref == 1)
    w[0, 3] = 0.0
    assert caption_factors(w, valid, ids)[0, 3] == 1.0


def test_all_zero_weights_give_uniform_caption():
    valid = torch.tensor([[True, True, True, False, True, True]])
    ids = torch.tensor([[0, 0, 0, 0, 1, 1]])
    w = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.2, 0.6]])  # caption 0: all zero (padding ignored)
    f = caption_factors(w, valid, ids)
    torch.testing.assert_close(f, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.5, 1.5]]))
    f1 = caption_factors(w, valid, ids, scale_by_k=False)
    torch.testing.assert_close(f1, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0, 0.25, 0.75]]))
    # through prior_loss: p_ref == 1 on a whole caption is NTP on that caption
    logits = torch.randn(1, 6, 7)
    labels = torch.tensor([[1, 2, 3, IGN, IGN, IGN]])
    p_ref = torch.ones(1, 6)
    torch.testing.assert_close(prior_loss(logits, labels, p_ref), ntp_loss(logits, labels))


def test_scale_by_k_false_divides_by_total_valid_tokens():
    logits, labels, p_ref, caption_ids = random_batch(B=2, T=30, seed=3)
    valid = labels != IGN
    w = prior_weights(p_ref)
    tl = token_losses(logits, labels)
    caption_means = 0.0
    for b, c in {(b, int(caption_ids[b, t])) for b, t in valid.nonzero().tolist()}:
        m = valid[b] & (caption_ids[b] == c)
        caption_means = caption_means + (w[b][m] * tl[b][m]).sum() / w[b][m].sum()
    expected = caption_means / valid.sum()
    got = prior_loss(logits, labels, p_ref, scale_by_k=False, caption_ids=caption_ids)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and it is smaller than the k-scaled loss by roughly the mean caption length
    assert got < prior_loss(logits, labels, p_ref, caption_ids=caption_ids)


def test_paper_worked_example():
    # Figure: losses 0.68, 0.47, 0.71 with p_ref 0.01, 0.11, 0.47 -> 1.01, 0.63, 0.56.
    # The figure shows 3 tokens of a longer caption whose mean weight is 2/3 (factor
    # 1.5 * (1 - p_ref)); complete it with three more tokens at p_ref 0.47:
    # sum w = 0.99 + 0.89 + 0.53 + 3 * 0.53 = 4.0, k = 6, k / sum w = 1.5.
    losses = torch.tensor([0.68, 0.47, 0.71, 0.30, 0.40, 0.50])
    p_ref = torch.tensor([[0.01, 0.11, 0.47, 0.47, 0.47, 0.47]])
    # two-class logits whose cross-entropy on class 0 is exactly `losses`
    logits = torch.stack([torch.zeros(6), torch.log(torch.expm1(losses))], -1).unsqueeze(0)
    labels = torch.zeros(1, 6, dtype=torch.long)
    tl = token_losses(logits, labels)
    torch.testing.assert_close(tl[0], losses)
    f = caption_factors(prior_weights(p_ref), labels != IGN)
    torch.testing.assert_close(f[0, :3], 1.5 * (1 - p_ref[0, :3]))
    weighted = (f * tl)[0, :3]
    assert [round(x, 2) for x in weighted.tolist()] == [1.01, 0.63, 0.56]
    torch.testing.assert_close(prior_loss(logits, labels, p_ref), (f * tl).sum() / 6)


# -----------------------------------------------------------------------------
# packing, gradients, robustness

def test_packed_equals_unpacked():
    g = torch.Generator().manual_seed(4)
    V, la, lb = 13, 5, 7
    la_logits, lb_logits = torch.randn(la, V, generator=g), torch.randn(lb, V, generator=g)
    a_lab, b_lab = torch.randint(0, V, (la,), generator=g), torch.randint(0, V, (lb,), generator=g)
    a_p, b_p = torch.rand(la, generator=g), torch.rand(lb, generator=g)

    # unpacked: one caption per row, right padding
    T = 8
    u_logits = torch.randn(2, T, V, generator=g)
    u_logits[0, :la], u_logits[1, :lb] = la_logits, lb_logits
    u_labels = torch.full((2, T), IGN)
    u_labels[0, :la], u_labels[1, :lb] = a_lab, b_lab
    u_p = torch.full((2, T), float("nan"))  # p_ref is irrelevant where ignored
    u_p[0, :la], u_p[1, :lb] = a_p, b_p

    # packed: [A, pad, pad, B, pad] in one row; the padding's id collides with A's
    a, b = slice(0, la), slice(la + 2, la + 2 + lb)
    P = la + 2 + lb + 1
    p_logits = torch.randn(1, P, V, generator=g)
    p_logits[0, a], p_logits[0, b] = la_logits, lb_logits
    p_labels = torch.full((1, P), IGN)
    p_labels[0, a], p_labels[0, b] = a_lab, b_lab
    p_p = torch.rand(1, P, generator=g)
    p_p[0, a], p_p[0, b] = a_p, b_p
    p_ids = torch.zeros(1, P, dtype=torch.long)
    p_ids[0, b] = 3

    for scale_by_k in (True, False):
        u_logits.grad = p_logits.grad = None
        u_logits.requires_grad_(True)
        p_logits.requires_grad_(True)
        lu = prior_loss(u_logits, u_labels, u_p, scale_by_k=scale_by_k)
        lp = prior_loss(p_logits, p_labels, p_p, scale_by_k=scale_by_k, caption_ids=p_ids)
        torch.testing.assert_close(lp, lu, rtol=0, atol=1e-6)
        lu.backward()
        lp.backward()
        torch.testing.assert_close(p_logits.grad[0, a], u_logits.grad[0, :la], rtol=0, atol=1e-7)
        torch.testing.assert_close(p_logits.grad[0, b], u_logits.grad[1, :lb], rtol=0, atol=1e-7)
        # pure NTP would weigh each token equally in both layouts too, but PRIOR's
        # per-caption sums would break if A and B were merged:
    merged = prior_loss(p_logits, p_labels, p_p, caption_ids=torch.zeros_like(p_ids))
    assert not torch.allclose(merged, prior_loss(u_logits, u_labels, u_p))


def test_ignored_positions_zero_grad_and_finite():
    logits, labels, p_ref, caption_ids = random_batch(B=3, T=16, seed=5)
    labels[2] = IGN  # a fully ignored row
    ign = labels == IGN
    logits[ign] = logits[ign] * 1e4  # extreme (but finite) garbage where ignored
    p_ref[ign] = float("nan")
    logits.requires_grad_(True)
    for ids in (None, caption_ids):
        logits.grad = None
        loss = prior_loss(logits, labels, p_ref, caption_ids=ids)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        assert torch.all(logits.grad[ign] == 0)
        assert logits.grad[~ign].abs().sum() > 0
    # a batch without any valid token gives 0, not NaN
    logits.grad = None
    empty = torch.full_like(labels, IGN)
    loss = prior_loss(logits, empty, p_ref, caption_ids=caption_ids)
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)
    assert ntp_loss(logits, empty).item() == 0


@pytest.mark.parametrize("alpha,scale_by_k", [(1.0, True), (2.5, True), (0.5, False)])
def test_gradient_matches_naive_reference(alpha, scale_by_k):
    logits, labels, p_ref, caption_ids = random_batch(B=3, T=24, V=9, n_ids=4, seed=6)
    p_ref[0, :3] = 1.0  # some zero weights
    p_ref[1, 0] = 1.3  # out of range, must be clamped
    logits_a = logits.clone().requires_grad_(True)
    logits_b = logits.clone().requires_grad_(True)
    la = prior_loss(logits_a, labels, p_ref, alpha, scale_by_k, caption_ids)
    lb = reference_prior_loss(logits_b, labels, p_ref, caption_ids, alpha, scale_by_k)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    la.backward()
    lb.backward()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-5, atol=1e-7)


def test_weights_are_constants():
    logits, labels, p_ref, caption_ids = random_batch(seed=7)
    w = prior_weights(p_ref).requires_grad_(True)
    weighted_loss(logits.requires_grad_(True), labels, w, caption_ids).backward()
    assert w.grad is None and logits.grad is not None


def test_bf16_logits():
    logits, labels, p_ref, caption_ids = random_batch(seed=8)
    lo16 = logits.bfloat16().requires_grad_(True)
    lo32 = lo16.detach().float().requires_grad_(True)
    l16 = prior_loss(lo16, labels, p_ref, caption_ids=caption_ids)
    l32 = prior_loss(lo32, labels, p_ref, caption_ids=caption_ids)
    assert l16.dtype == torch.float32  # cross-entropy computed in float32
    assert torch.equal(l16, l32)
    assert token_losses(lo16, labels).dtype == torch.float32
    l16.backward()
    l32.backward()
    assert lo16.grad.dtype == torch.bfloat16 and torch.isfinite(lo16.grad).all()
    torch.testing.assert_close(lo16.grad.float(), lo32.grad, rtol=1e-2, atol=1e-3)
    assert torch.equal(ntp_loss(lo16, labels), ntp_loss(lo32, labels))
