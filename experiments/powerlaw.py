"""Power-law fits for the scaling experiment (paper.py scaling): L(D) = (D / D_c)^alpha_D by least squares in
log space, with confidence intervals from Student's t (stats.t_quantile: no scipy in this project) and from a
bootstrap, and the held-out prediction of the largest size from the smaller ones.

    from experiments.powerlaw import fit_power_law, predict, bootstrap_alpha, holdout
    fit = fit_power_law(D, y)          # {"alpha", "D_c", "se_alpha", "ci", ...}
"""
import math

import numpy as np

from experiments.stats import t_quantile


def _line(x, y):
    """Least squares y = a + b x: (a, b, standard error of b, residual std)."""
    n = len(x)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    if sxx == 0:
        raise ValueError("a power-law fit needs at least two different data sizes")
    b = float(((x - xm) * (y - ym)).sum()) / sxx
    a = float(ym - b * xm)
    resid = y - (a + b * x)
    s = math.sqrt(float((resid ** 2).sum()) / (n - 2)) if n > 2 else float("nan")
    return a, b, s / math.sqrt(sxx) if n > 2 else float("nan"), s


def fit_power_law(D, y, level=0.95):
    """Fit y = (D / D_c)^alpha_D by least squares in log space: log y = alpha_D log D - alpha_D log D_c.

    Returns {"alpha", "D_c", "log_D_c", "se_alpha", "ci" (t interval of alpha_D at `level`, n - 2 degrees of
    freedom), "n", "resid_sd" (in log y)}. y must be positive. With alpha_D = 0 D_c is undefined (inf)."""
    D, y = np.asarray(D, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(D) != len(y) or len(D) < 2:
        raise ValueError(f"need at least 2 points, got {len(D)} sizes and {len(y)} values")
    if (D <= 0).any() or (y <= 0).any():
        raise ValueError("a power law in log space needs positive D and y")
    a, b, se, s = _line(np.log(D), np.log(y))
    log_dc = -a / b if b else float("inf")
    half = t_quantile(0.5 + level / 2, len(D) - 2) * se if len(D) > 2 else float("nan")
    return {"alpha": b, "D_c": math.exp(log_dc) if abs(log_dc) < 700 else float("inf"), "log_D_c": log_dc,
            "se_alpha": se, "ci": [b - half, b + half], "n": len(D), "resid_sd": s, "intercept": a}


def predict(fit, D):
    """y at D under a fit_power_law result."""
    return np.exp(fit["intercept"] + fit["alpha"] * np.log(np.asarray(D, dtype=np.float64)))


def bootstrap_alpha(D, y, n_boot=2000, seed=0, level=0.95):
    """Percentile interval of alpha_D over fits to runs resampled with replacement (resamples with a single
    data size are skipped); also returns the resampled slopes."""
    D, y = np.log(np.asarray(D, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(D), size=(n_boot, len(D)))
    x, v = D[idx], y[idx]
    xm = x.mean(1, keepdims=True)
    sxx = ((x - xm) ** 2).sum(1)
    ok = sxx > 1e-12
    slopes = (((x - xm) * (v - v.mean(1, keepdims=True))).sum(1)[ok]) / sxx[ok]
    lo, hi = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)], slopes


def holdout(D, y):
    """Fit on every point below the largest D, predict the mean y at the largest D (mean D of its points):
    {"fit", "D", "predicted", "observed", "rel_error" = |predicted - observed| / |observed|}."""
    D, y = np.asarray(D, dtype=np.float64), np.asarray(y, dtype=np.float64)
    top = D.max()
    big = np.isclose(D, top, rtol=0.05)  # the largest size's runs (their D differ a little across seeds)
    fit = fit_power_law(D[~big], y[~big])
    d, obs = float(D[big].mean()), float(y[big].mean())
    pred = float(predict(fit, d))
    return {"fit": fit, "D": d, "predicted": pred, "observed": obs, "rel_error": abs(pred - obs) / abs(obs)}


def log_sizes(n_max, k=6, span=10.0, minimum=1):
    """k sizes log-spaced from n_max / span to n_max (rounded, distinct, at least `minimum`)."""
    out = sorted({max(minimum, int(round(n_max * span ** (-1 + i / (k - 1))))) for i in range(k)})
    return out
