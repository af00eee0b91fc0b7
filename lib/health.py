"""Alarms for the ways PRIOR goes wrong on a user's own data, as small pure functions (tests feed them made-up
numbers). Used by reference_lm.py (validation split, memorising), train.py (the caption language being
unlearned) and score.py (collapsed weights). docs/own_data.md explains each alarm and what to do about it.
"""
import sys

from tqdm import tqdm

VAL_MIN = 64  # captions: below this a validation NLL is too noisy to pick a checkpoint by


def val_split_size(n, fraction=0.05, minimum=VAL_MIN):
    """Captions to hold out for validation out of n: the larger of fraction x n and `minimum`, but never more
    than a quarter of the captions (the rest must still train the LM), and at least 1 (when n >= 2)."""
    if n < 2:
        return 0
    return max(1, min(max(int(n * fraction), minimum), n // 4))


def memorising(history):
    """A warning (str) when validation NLL rose between two evaluations while the training loss fell (the LM
    is learning its training captions by heart), else None. history: [{"step", "train_loss", "val_nll"}]."""
    for a, b in zip(history, history[1:]):
        if b["val_nll"] > a["val_nll"] and b["train_loss"] < a["train_loss"]:
            return (f"validation NLL rose from {a['val_nll']:.3f} (step {a['step']}) to {b['val_nll']:.3f} "
                    f"(step {b['step']}) while the training loss fell ({a['train_loss']:.3f} -> "
                    f"{b['train_loss']:.3f}): the LM is memorising its captions (too few captions for --steps; "
                    f"fewer --steps, more captions or a smaller model fit better)")
    return None


def nll_rise(ntp, warmup, window=20, margin=0.1, min_rise=0.2, hold=None):
    """Has the plain caption NLL risen clearly and lastingly above its level at the end of warm-up? ntp: the
    per-step values so far (log.jsonl's "ntp", step 1 first). The baseline is the mean of the `window` values ending
    at warm-up's end; the level at a step is the mean of the `window` values ending there (a running mean, so one
    bad batch does not count); the threshold is baseline + max(min_rise, margin x baseline).

    A healthy run often climbs for a while right after warm-up (the lr at its peak) and then falls far below its
    start; unlearning climbs and keeps climbing. So it takes both: the level above the threshold at each of the
    last `hold` steps (2 x window unless given: longer than the bump after warm-up takes to turn), and the level now
    no less than half way from the threshold to the highest of those (still up: not a bump on its way down).
    Returns (baseline, current) then, else
    None; never before warm-up + window + hold steps (without warm-up, the first `window` steps are the baseline)."""
    hold = 2 * window if hold is None else hold
    end = max(warmup, window)
    if len(ntp) < end + window + hold - 1:
        return None
    base = ntp[max(0, end - window):end]
    baseline = sum(base) / len(base)
    threshold = baseline + max(min_rise, margin * baseline)
    levels = [sum(ntp[t - window:t]) / window for t in range(len(ntp) - hold + 1, len(ntp) + 1)]
    if min(levels) > threshold and levels[-1] - threshold >= (max(levels) - threshold) / 2:
        return baseline, levels[-1]
    return None


def nll_alarm_message(loss, baseline, current, step):
    return (f"ALARM: the plain caption NLL (ntp) rose from {baseline:.3f} at the end of warm-up to {current:.3f} "
            f"(mean of the last steps, step {step}) while --loss {loss} trains: the model is unlearning the caption "
            f"language. Likely causes: an overfit reference LM (p_ref near 1, weights near 0: check reference_lm.py's "
            f"kept step and score.py's report), the whole decoder training without a text mix (use --train projector "
            f"for the H-LVLM, --text-data for the U-LVLM), or --alpha too high. See docs/own_data.md")


def weight_collapse(p_ref, near_zero=0.05, caption_share=0.9, max_token_share=0.75, max_caption_share=0.1):
    """Do PRIOR's weights w = 1 - p_ref collapse to zero? p_ref: per-caption 1-d tensors (scores of caption tokens
    then <|eos|>; eos is left out here). Returns (stats, warning or None): stats = {"tokens_near_zero": share of
    tokens with w < near_zero, "captions_near_zero": share of captions with more than caption_share of their tokens
    near zero}. A warning when either share is above its limit (the reference LM predicts the captions it scores
    almost perfectly: it has memorised them, or saw them in training)."""
    n_tok = n_low = n_cap = n_cap_low = 0
    for p in p_ref:
        w = 1 - p[:-1].float().clamp(0, 1)
        if len(w) == 0:
            continue
        low = int((w < near_zero).sum())
        n_tok, n_low, n_cap = n_tok + len(w), n_low + low, n_cap + 1
        n_cap_low += low > caption_share * len(w)
    stats = {"near_zero": near_zero, "tokens_near_zero": n_low / max(n_tok, 1),
             "captions_near_zero": n_cap_low / max(n_cap, 1)}
    if stats["tokens_near_zero"] <= max_token_share and stats["captions_near_zero"] <= max_caption_share:
        return stats, None
    return stats, (f"WARNING: the weights collapse: {stats['tokens_near_zero']:.0%} of caption tokens have "
                   f"w < {near_zero} (limit {max_token_share:.0%}) and {stats['captions_near_zero']:.0%} of captions "
                   f"({n_cap_low} of {n_cap}) have more than {caption_share:.0%} of their tokens there "
                   f"(limit {max_caption_share:.0%}). The reference LM predicts these captions almost perfectly: "
                   f"has it memorised them (are REF and TRAIN disjoint? did it overfit?). PRIOR would then barely "
                   f"train on them; see docs/own_data.md")


def past_ntp(log_path, upto):
    """(ntp values of steps 1..upto, the alarm already raised or None) from a run's log.jsonl, for --resume."""
    import json
    import os
    if not upto or not os.path.exists(log_path):
        return [], None
    values, alarm = {}, None
    with open(log_path, errors="replace") as f:  # a torn line (a full disk while logging) is skipped, never fatal
        for text in f:
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and isinstance(line.get("step"), int) and line["step"] <= upto:
                values[line["step"]] = line.get("ntp", float("nan"))
                alarm = alarm or line.get("alarm")
    return [values[k] for k in sorted(values)], alarm


class Alarm:
    """The unlearning alarm (health.nll_rise) over a weighted run's plain caption NLL; resumed runs read the log."""
    def __init__(self, cfg, log_path, step, master):
        self.cfg, self.on = cfg, master and cfg.loss != "ntp"
        self.ntp, self.message = past_ntp(log_path, step) if self.on else ([], None)

    def watch(self, line, step):
        if not self.on:
            return
        self.ntp.append(line["ntp"])
        rise = None if self.message else nll_rise(self.ntp, self.cfg.warmup, window=max(5, min(20, self.cfg.warmup)))
        if rise:
            self.message = line["alarm"] = nll_alarm_message(self.cfg.loss, *rise, step + 1)
            tqdm.write(self.message, file=sys.stderr)

    def summary(self):
        if self.on and self.ntp:
            print(f"caption NLL (ntp): {self.ntp[0]:.3f} at step 1, {self.ntp[-1]:.3f} at step {len(self.ntp)}"
                  + (f"\n{self.message}" if self.message else ""), file=sys.stderr if self.message else sys.stdout)
