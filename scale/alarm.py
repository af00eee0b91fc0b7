"""train.py's unlearning alarm: a weighted loss (PRIOR, a baseline's, the oracle) whose plain caption NLL climbs
and stays up while it trains is unlearning the caption language (docs/own_data.md, "The training alarm"). A lab
plug-in ("alarm"): `python -m scale|experiments|baselines train ...` watch every run; plain `python train.py` does
not. It writes "alarm" once into that step's line of log.jsonl, which eval.py --run-dir repeats (eval.run_alarm).
"""
import json
import os
import sys

from tqdm import tqdm

from utils import register


def nll_rise(ntp, warmup, window=20, margin=0.1, min_rise=0.2):
    """(baseline, current) when the plain caption NLL (ntp: per-step values, step 1 first) has risen clearly and
    lastingly above its level at the end of warm-up, else None. Levels are running means over `window` steps (one
    bad batch does not count); the threshold is baseline + max(min_rise, margin x baseline). A healthy run often
    climbs for a while after warm-up (the lr at its peak) and then falls; unlearning keeps climbing. So it takes
    both: the level above the threshold for the last 2 x window steps (longer than that bump), and the level now at
    least half way from the threshold to the highest of those (not a bump on its way down)."""
    hold = 2 * window
    end = max(warmup, window)  # without warm-up, the first `window` steps are the baseline
    if len(ntp) < end + window + hold - 1:
        return None
    base = ntp[max(0, end - window):end]
    baseline = sum(base) / len(base)
    threshold = baseline + max(min_rise, margin * baseline)
    levels = [sum(ntp[t - window:t]) / window for t in range(len(ntp) - hold + 1, len(ntp) + 1)]
    if min(levels) > threshold and levels[-1] - threshold >= (max(levels) - threshold) / 2:
        return baseline, levels[-1]
    return None


def past_ntp(log_path, upto):
    """(ntp values of steps 1..upto, the alarm already raised or None) from a run's log.jsonl, for --resume."""
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


@register("run_alarm")
def run_alarm(run_dir):
    """(step, message) of the alarm train.py recorded in run_dir/log.jsonl, or None; eval.py --run-dir says it."""
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if '"alarm"' in line:
                    line = json.loads(line)
                    print(f"{run_dir}: training raised an alarm at step {line.get('step')}: {line.get('alarm')}",
                          file=sys.stderr)
                    return line.get("step"), line.get("alarm")
    return None


@register("alarm")
class Alarm:
    """train.py's unlearning alarm (nll_rise) over a weighted run's plain caption NLL; a resumed run reads the log."""
    def __init__(self, cfg, log_path, step, master):
        self.cfg, self.on = cfg, master and cfg.loss != "ntp"
        self.ntp, self.message = past_ntp(log_path, step) if self.on else ([], None)

    def watch(self, line, step):
        if not self.on:
            return
        self.ntp.append(line["ntp"])
        rise = None if self.message else nll_rise(self.ntp, self.cfg.warmup, window=max(5, min(20, self.cfg.warmup)))
        if rise:
            baseline, current = rise
            self.message = line["alarm"] = (
                f"ALARM: the plain caption NLL (ntp) rose from {baseline:.3f} at the end of warm-up to {current:.3f} "
                f"(mean of the last steps, step {step + 1}) while --loss {self.cfg.loss} trains: the model is "
                f"unlearning the caption language. Likely causes: an overfit reference LM (p_ref near 1, weights near "
                f"0: check reference_lm.py's kept step and score.py's report), the whole decoder training without a "
                f"text mix (use --train projector for the H-LVLM, --text-data for the U-LVLM), or --alpha too high. "
                f"See docs/own_data.md")
            tqdm.write(self.message, file=sys.stderr)

    def summary(self):
        if self.on and self.ntp:
            print(f"caption NLL (ntp): {self.ntp[0]:.3f} at step 1, {self.ntp[-1]:.3f} at step {len(self.ntp)}"
                  + (f"\n{self.message}" if self.message else ""), file=sys.stderr if self.message else sys.stdout)
