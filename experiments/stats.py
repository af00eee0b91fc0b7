"""Small statistics for report.py, written out so they can be checked by hand (no scipy).

- summary({seed: value}): mean, sample std (n − 1 in the denominator; 0 with one seed) and n.
- t_quantile(p, df): Student's t quantile, the exact inverse of the t CDF. The CDF comes from the regularized
  incomplete beta function, F(t) = 1 − I_x(df/2, 1/2)/2 with x = df/(df + t²) for t ≥ 0, evaluated by its
  continued fraction (modified Lentz); the inverse is found by bisection. Checked against printed tables:
  t_{0.975,1} = 12.706, t_{0.975,4} = 2.776, t_{0.975,9} = 2.262, t_{0.975,30} = 2.042.
- paired(x, ref, lower_is_better): arm vs reference over the seeds both have. Seed s gives every arm the same
  initialisation and data order, so d_s = x_s − ref_s (negated when lower is better: positive always means
  "better than the reference"); mean d ± t_{0.975,n−1} · sd(d)/√n is the 95% confidence interval.
- welch(): the older unpaired test (|difference| > 2 Welch standard errors), still used by paper.py.
- series / still_rising: a metric's curve per seed, and how many seeds peak at the last checkpoint.
- fmt / pm / ci / lr_str / md_table: fixed formatting (no "-0.000"), so results.md is the same on every machine.
"""
import functools
import math

NAN = float("nan")


def seed_key(seed):
    """Sort key for seeds of any JSON type (ints numerically, then strings)."""
    return (isinstance(seed, str), seed if isinstance(seed, (int, float, str)) else str(seed))


def summary(by_seed):
    """{seed: value} -> {"mean", "std", "n", "by_seed"}; NaN propagates (a diverged run stays visible)."""
    v = [by_seed[s] for s in sorted(by_seed, key=seed_key)]
    n = len(v)
    mean = sum(v) / n if n else NAN
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "by_seed": dict(by_seed)}


def _beta_cf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The t with P(T <= t) = p (0 < p < 1), by bisection on the exact CDF."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def paired(x, ref, lower_is_better=False, level=0.95):
    """Arm x vs reference over shared seeds ({seed: value} each). Returns n, seeds, mean_d, sd_d, t, lo, hi
    (the CI of mean d), ref_mean (over the shared seeds), rel = mean_d/|ref_mean|, effect = mean_d/sd_d and
    verdict: "better" / "worse" (CI excludes 0), "no clear difference", "1 seed", "no shared seeds" or
    "not computable (NaN)". Positive d always means x is better than the reference."""
    seeds = sorted(set(x) & set(ref), key=seed_key)
    sign = -1.0 if lower_is_better else 1.0
    d = [sign * (x[s] - ref[s]) for s in seeds]
    n = len(d)
    out = {"n": n, "seeds": seeds, "mean_d": NAN, "sd_d": NAN, "t": NAN, "lo": NAN, "hi": NAN,
           "ref_mean": NAN, "rel": NAN, "effect": NAN}
    if n == 0:
        return {**out, "verdict": "no shared seeds"}
    mean = sum(d) / n
    ref_mean = sum(ref[s] for s in seeds) / n
    out.update(mean_d=mean, ref_mean=ref_mean, rel=mean / abs(ref_mean) if ref_mean else NAN)
    if math.isnan(mean):
        return {**out, "verdict": "not computable (NaN)"}
    if n < 2:
        return {**out, "verdict": "1 seed"}
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    t = t_quantile(0.5 + level / 2.0, n - 1)
    lo, hi = mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)
    effect = mean / sd if sd > 0 else (math.copysign(math.inf, mean) if mean else NAN)
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return {**out, "sd_d": sd, "t": t, "lo": lo, "hi": hi, "effect": effect, "verdict": verdict}


def welch(x, ref, lower_is_better=False, z=2.0):
    """UNPAIRED comparison of two summaries (paper.py's tables): clear when |diff| > z Welch standard errors."""
    diff = x["mean"] - ref["mean"]
    se = math.sqrt(x["std"] ** 2 / x["n"] + ref["std"] ** 2 / ref["n"])
    sign = -1 if lower_is_better else 1
    rel = sign * diff / abs(ref["mean"]) if ref["mean"] else NAN
    clear = min(x["n"], ref["n"]) > 1 and abs(diff) > z * se  # NaN compares False: never clear
    better = (1 if sign * diff > 0 else -1) if clear else 0
    return {"diff": diff, "se": se, "rel": rel, "clear": clear, "better": better}


def series(steps, bench):
    """{seed: [value at each step, in step order]}."""
    out = {}
    for s in sorted(steps):
        for sd, v in steps[s].get(bench, {}).items():
            out.setdefault(sd, []).append(v)
    return out


def still_rising(steps, bench):
    """(k, n): k of the n seeds with 2+ checkpoints whose last checkpoint is the maximum of their curve."""
    ser = [v for v in series(steps, bench).values() if len(v) > 1]
    return sum(v[-1] >= max(v) for v in ser), len(ser)


def fmt(x, sign=False, pct=False):
    if x is None or math.isnan(x):
        return "–"
    x = 0.0 if round(x, 3) == 0 else x  # no "-0.000": a rounded zero has no sign
    return f"{100 * x:+.1f}%" if pct else f"{x:+.3f}" if sign else f"{x:.3f}"


def pm(s):
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s else "–"


def ci(c):
    """'+0.030 [+0.010, +0.050]', or the mean alone when there is no interval."""
    if not c or not c["n"]:
        return "–"
    if math.isnan(c["lo"]):
        return fmt(c["mean_d"], sign=True)
    return f"{fmt(c['mean_d'], sign=True)} [{fmt(c['lo'], sign=True)}, {fmt(c['hi'], sign=True)}]"


def lr_str(lr):
    return "?" if lr is None else f"{lr:g}"


def lr_key(lr):
    return (lr is None, lr or 0)


def md_table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
