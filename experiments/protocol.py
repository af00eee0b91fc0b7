"""The main job's rules, declared before any result is read (docs/experiment.md gives the reasons), as small
pure functions that experiment.py applies while it runs and reporting.py applies again to results.json alone:

    PRIMARY       gap_image: the grounding gap on image words, in nats per token. The NLL of the captions'
                  image-tagged tokens with another caption's image (a fixed derangement) minus with their own
                  image, on a fixed set of captions (validation captions in the pilot, test captions for the
                  claims). A model that ignores its image scores exactly 0 whatever its text prior (both sides
                  read the same text), and the gap moves continuously with what the image adds: no threshold
                  turns a small effect into 0. The probes' probe_img_avg (accuracy - blind accuracy) is secondary:
                  a multiple-choice margin hides image effects smaller than the text prior's.
    pilot curves  validation PRIMARY at a checkpoint every pilot_save_every steps (cpu preset: 48, 5 points;
                  the test curves: every 24, 10 points): the pilot's rules need no finer curve, and evaluation
                  is half of a pilot run's time at 10 points. (Before: every 24 steps, TAIL 3, the same span.)
                  On eval_rows_val validation captions (cpu: 96; before: 160, the test's number), which made
                  the same choices on the recorded pilot (experiments/pilot_rows.py).
    lr choice     per arm: the mean over pilot seeds of the mean of the validation PRIMARY over the last
                  TAIL checkpoints; the best lr, and among lrs within TIE of the best the smallest (a float-noise
                  margin: a near-tie must not flip the choice between machines). At a grid edge: one more value.
    positive      the gate (below): the oracle beats NTP on validation when a one-sided 95% paired t interval of
    control       oracle - NTP over >= 5 pilot seeds (each arm at its lr) excludes 0. A setting that fails it is
                  reported as unable to judge PRIOR. (The old rule, "> 0 on every pilot seed", failed whenever one
                  NTP seed did well: simulated_power; docs/experiment.md.)
    co-primary    PRIOR - NTP and PRIOR - shuffled (CO_PRIMARY) on PRIMARY at the final step, each judged by a
                  CO_LEVEL paired interval (Bonferroni for the two), with its MDE at that level. Robustness: the
                  same differences on validation at every lr of the one grid all arms ran.
    converged     NTP's validation curve (pilot mean) rose by at most FLAT of its total rise over the last
                  third of the steps.
    claims        final: PRIMARY at the last checkpoint (test captions). Peak: PRIMARY at the step where the
                  arm's pilot validation curve peaks, read on the test captions. Stability: the largest drop from
                  the running best along the test curve (lower is better), per seed.
    statistics    paired differences over seeds with a t interval (stats.paired); the minimum detectable
                  effect at 80% power; PRIOR's share of the oracle's gain with a seeded bootstrap interval.
"""
import random
import statistics

from experiments.stats import t_quantile

PRIMARY = "gap_image"
CO_PRIMARY = (("prior", "ntp"), ("prior", "prior_shuffled"))  # (arm, reference)
CO_LEVEL = 0.975  # two-sided, each: 0.05 / 2 comparisons
TAIL = 2          # pilot checkpoints averaged for an lr choice (cpu preset: steps 192 and 240 of 240)
TIE = 0.005       # lr scores this close to the best count as tied (the smallest lr of them wins)
FLAT = 0.1        # converged: the last third of the steps added at most this share of the curve's rise


def tail_mean(curve, k=TAIL):
    """Mean of the last k values of a {step: value} curve."""
    steps = sorted(curve)[-k:]
    return sum(curve[s] for s in steps) / len(steps)


def lr_score(curves):
    """An lr's score in the pilot: the mean over its seeds' curves of each one's tail_mean (summed, then divided:
    the experiment, its report and pilot_rows compute it alike, so a near-tie falls the same way in each)."""
    return sum(tail_mean(c) for c in curves) / len(curves)


def mean_curve(curves):
    """{step: mean over curves} over the steps every curve has."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {s: sum(c[s] for c in curves) / len(curves) for s in steps}


def choose_lr(scores, tie=TIE):
    """(chosen lr, at_edge) from {lr: score}: the best, or the smallest lr within `tie` of it."""
    best = max(scores.values())
    chosen = min(lr for lr, s in scores.items() if s >= best - tie)
    grid = sorted(scores)
    return chosen, len(grid) > 1 and chosen in (grid[0], grid[-1])


def next_lr(grid, chosen):
    """The value beyond the edge `chosen` sits at, one grid factor further."""
    grid = sorted(grid)
    ratio = grid[1] / grid[0]
    return float(f"{(chosen / ratio if chosen == grid[0] else chosen * ratio):.3g}")


def settle(scores, base, extend):
    """One round of an arm's lr choice on {lr: score} (the lrs run so far): (chosen, at_edge, lr to add): the lr
    is one value past the edge the choice sits at, None once the choice stands (inside the grid, or the grid has
    grown `extend` values past that side of the preset's `base` grid)."""
    chosen, edge = choose_lr(scores)
    grid = sorted(scores)
    beyond = sum(lr < min(base) for lr in grid) if chosen == grid[0] else sum(lr > max(base) for lr in grid)
    return chosen, edge, next_lr(grid, chosen) if edge and beyond < extend else None


def peak_step(curve):
    """The step of a curve's maximum (the earliest of equal maxima)."""
    return max(sorted(curve), key=lambda s: curve[s])


def converged(curve, flat=FLAT):
    """(flat?, share of the rise in the last third of the steps) of a {step: value} curve."""
    steps = sorted(curve)
    last = steps[len(steps) - max(1, len(steps) // 3) - 1] if len(steps) > 1 else steps[0]
    rise = max(curve.values()) - curve[steps[0]]
    late = curve[steps[-1]] - curve[last]
    share = late / rise if rise > 0 else 0.0
    return share <= flat, share


def max_drop(curve):
    """The largest fall below the running best along a curve (0 for a curve that never falls)."""
    best, drop = float("-inf"), 0.0
    for s in sorted(curve):
        best = max(best, curve[s])
        drop = max(drop, best - curve[s])
    return drop


def mde(sd, n, level=0.95, power=0.8):
    """The smallest true mean difference a paired t test over n pairs with this sd finds with `power`:
    (t_{1-(1-level)/2, n-1} + t_{power, n-1}) x sd / sqrt(n). NaN below 2 pairs."""
    if n < 2:
        return float("nan")
    return (t_quantile(1 - (1 - level) / 2, n - 1) + t_quantile(power, n - 1)) * sd / n ** 0.5


def share_of_oracle(prior_d, oracle_d, resamples=2000, seed=0, level=0.95):
    """PRIOR's share of the oracle's gain, mean(PRIOR - NTP) / mean(oracle - NTP) over paired seeds, with a
    percentile bootstrap over seeds (seeded: the same numbers give the same interval). (share, lo, hi); the
    interval is NaN when a resample's oracle gain is 0 or fewer than 2 seeds are shared."""
    n = len(prior_d)
    if n != len(oracle_d) or n == 0 or sum(oracle_d) == 0:
        return float("nan"), float("nan"), float("nan")
    share = sum(prior_d) / sum(oracle_d)
    if n < 2:
        return share, float("nan"), float("nan")
    rng, draws = random.Random(seed), []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        denominator = sum(oracle_d[i] for i in idx)
        if denominator == 0:
            return share, float("nan"), float("nan")
        draws.append(sum(prior_d[i] for i in idx) / denominator)
    draws.sort()
    lo, hi = draws[int((1 - level) / 2 * resamples)], draws[int((1 + level) / 2 * resamples) - 1]
    return share, lo, hi


def sd(values):
    return statistics.stdev(values) if len(values) > 1 else float("nan")


# ---- the positive control's gate with power ------------------------------------------------------------------------
GATE_SEEDS = 5    # fewest pilot seeds the gate reads
GATE_LEVEL = 0.95  # one-sided


def gate(d, level=GATE_LEVEL, min_seeds=GATE_SEEDS):
    """The positive control passes when the one-sided paired t interval of oracle - NTP over the pilot seeds
    excludes 0: mean(d) - t_{level, n-1} x sd(d) / sqrt(n) > 0, with n >= min_seeds. Unlike "> 0 on every seed",
    one seed where NTP happens to do well does not fail it on its own. (passed, lower bound)."""
    n = len(d)
    if n < max(2, min_seeds):
        return False, float("nan")
    lower = statistics.mean(d) - t_quantile(level, n - 1) * statistics.stdev(d) / n ** 0.5
    return lower > 0, lower


def every_seed(d):
    """The old rule: oracle - NTP > 0 on every pilot seed."""
    return bool(d) and all(x > 0 for x in d)


def simulated_power(rule, draw, n, sims=4000, seed=0):
    """Share of `sims` simulated pilots of n seeds that `rule` passes (rule(d) -> passed, or (passed, ...) like
    gate), each seed's difference from draw(rng)."""
    rng, passed = random.Random(seed), 0
    for _ in range(sims):
        verdict = rule([draw(rng) for _ in range(n)])
        passed += bool(verdict[0] if isinstance(verdict, tuple) else verdict)
    return passed / sims


if __name__ == "__main__":  # the power numbers of docs/experiment.md: python -m experiments.protocol
    see = [-0.044, 0.161]  # oracle - NTP on validation gap_image, results/see (3 tokens per patch, seeds 0 and 1)
    m, s = statistics.mean(see), statistics.stdev(see)

    def switching(rng):  # NTP "switches on" the image in 15% of seeds, erasing the oracle's edge there
        return rng.gauss(m, s) if rng.random() > 0.15 else rng.gauss(-0.02, 0.05)
    for name, draw in ((f"normal(mean {m:.3f}, sd {s:.3f})", lambda rng: rng.gauss(m, s)),
                       ("15% switching", switching)):
        print(f"{name}: gate " + ", ".join(f"{n} seeds {simulated_power(gate, draw, n):.2f}" for n in (5, 10)) +
              "; every seed " + ", ".join(f"{n} seeds {simulated_power(every_seed, draw, n):.2f}" for n in (3, 5, 10)))
