"""
Issue 22, continued (tests/test_faults2.py has the first cases): nonsense flags refused in the config layer
(utils.py: ranges, --warmup vs --steps, heads vs width, finite alpha, the tokenizer's smallest vocabulary), one-line
errors through utils.run for every script (--debug for the traceback), and the training alarm's rule on
synthetic curves.

    .venv/bin/python -m pytest -q tests/test_faults3.py
"""
import importlib
import os
import subprocess
import sys

import pytest

from utils import UserError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (module, config class, argv, the one line it must give): every case of the issue, and each script's ranges
NONSENSE = [
    ("train", "TrainConfig", ["--steps", "0"], "--steps 0: allowed values are an integer >= 1 (optimizer steps)"),
    ("train", "TrainConfig", ["--steps", "-5"], "--steps -5: allowed values are an integer >= 1"),
    ("train", "TrainConfig", ["--batch-size", "0"], "--batch-size 0: allowed values are an integer >= 1"),
    ("train", "TrainConfig", ["--row-len", "0"], "--row-len 0: allowed values are an integer >= 1"),
    ("train", "TrainConfig", ["--alpha", "-1"], "--alpha -1.0: allowed values are a finite number >= 0.0"),
    ("train", "TrainConfig", ["--alpha", "inf"], "--alpha inf: allowed values are a finite number >= 0.0"),
    ("train", "TrainConfig", ["--alpha", "nan"], "--alpha nan: allowed values are a finite number >= 0.0"),
    ("train", "TrainConfig", ["--steps", "3", "--warmup", "10"],
     "--warmup 10: allowed values are 0 to --steps - 1 = 2 (a warm-up of --steps 3 or more never reaches --lr)"),
    ("train", "TrainConfig", ["--d-model", "30", "--n-head", "4"], "--d-model 30 is not divisible by --n-head 4"),
    ("train", "TrainConfig", ["--max-bad-fraction", "2"], "--max-bad-fraction 2.0: allowed values are a finite "
                                                           "number >= 0.0 and <= 1.0"),
    ("reference_lm", "RefConfig", ["--steps", "-3"], "--steps -3: allowed values are an integer >= 0"),
    ("reference_lm", "RefConfig", ["--d-model", "30", "--n-head", "4"], "--d-model 30 is not divisible by --n-head 4"),
    ("reference_lm", "RefConfig", ["--steps", "10", "--warmup", "40"], "--warmup 40: allowed values are 0 to"),
    ("score", "ScoreConfig", ["--row-len", "0"], "--row-len 0: allowed values are an integer >= 1"),
    ("eval", "EvalConfig", ["--batch-rows", "0"], "--batch-rows 0: allowed values are an integer >= 1"),
    ("tools.vision", "Config", ["--batch-size", "0"], "--batch-size 0: allowed values are an integer >= 1"),
    ("tools.vision", "Config", ["--vit-dim", "100", "--vit-heads", "3"], "--vit-dim 100 is not divisible by "
                                                                         "--vit-heads 3"),
    ("data.tokenizer", "TokenizerConfig", ["--vocab-size", "5"], "--vocab-size 5: allowed values are an integer "
                                                                 ">= 263"),
    ("baselines.attention", "AttnConfig", ["--batch-size", "0"], "--batch-size 0: allowed values are an integer >= 1"),
    ("scale.shards", "ShardsConfig", ["--per-shard", "0"], "--per-shard 0: allowed values are an integer >= 1"),
]


@pytest.mark.parametrize("module, cls, argv, message", NONSENSE, ids=[f"{m} {' '.join(a)}" for m, _, a, _ in NONSENSE])
def test_nonsense_flags_are_refused_in_one_line_naming_the_flag(module, cls, argv, message):
    config = getattr(importlib.import_module(module), cls)
    with pytest.raises(UserError) as err:
        parse_config(config, argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    parse_config(config, [])  # the defaults themselves pass


def test_sensible_edges_pass():
    import train
    cfg = parse_config(train.TrainConfig, ["--steps", "1", "--warmup", "0", "--alpha", "0", "--batch-size", "1"])
    assert (cfg.steps, cfg.warmup, cfg.alpha) == (1, 0, 0.0)
    assert parse_config(train.TrainConfig, ["--steps", "3", "--warmup", "2"]).warmup == 2
    from data import tokenizer as T
    assert parse_config(T.TokenizerConfig, ["--vocab-size", "263"]).vocab_size == 263
    assert T.TokenizerConfig.SMALLEST_VOCAB == len(T.SPECIALS) + 256  # the specials and every byte


def script(args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_users_mistake_is_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "tok.json").write_text("garbage")
    done = script(["score.py", "--tokenizer", str(tmp_path / "tok.json"), "--ref", str(tmp_path / "none.pt")])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'tok.json'}: not a tokenizer.json")
    assert len(done.stderr.strip().splitlines()) == 1
    debug = script(["score.py", "--tokenizer", str(tmp_path / "tok.json"), "--debug"])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr
    done = script(["-m", "tools.vision", "--batch-size", "0"])
    assert done.returncode == 2 and done.stderr.startswith("error: --batch-size 0") and "Traceback" not in done.stderr


def test_every_script_enters_through_lib_cli_run():
    scripts = ["train.py", "eval.py", "score.py", "reference_lm.py", "tools/vision.py", "tools/caption.py",
               "data/tokenizer.py", "baselines/attention.py", "experiments/main.py", "bench/bench.py"]
    for path in scripts:
        text = open(os.path.join(ROOT, path)).read()
        main_block = text[text.index('if __name__ == "__main__":'):]
        assert "run(" in main_block and "parse_config(" not in main_block, path


def test_file_mistakes_are_user_errors(tmp_path):
    from data.record_types import DataError
    from utils import load_checkpoint
    assert issubclass(DataError, UserError)
    (tmp_path / "config.json").write_text('{"model_config": {}}')
    with pytest.raises(UserError, match=r"--init-from: .*config.json: cannot read it as a checkpoint \(not a file "
                                        r"torch.save wrote") as err:
        load_checkpoint(str(tmp_path / "config.json"), "vlm", "--init-from")
    assert "pickle" not in str(err.value) and "run code" not in str(err.value)


def test_the_default_warmup_over_a_short_run_gets_a_note_not_a_refusal(capsys):
    import train
    assert parse_config(train.TrainConfig, ["--steps", "3"]).warmup == 20  # a quick try with the defaults
    assert "note: the default --warmup 20 is not below --steps 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 9. the training alarm's rule

def curve(points, steps, wiggle=0.03):
    """ntp per step 1..steps through (step, value) points, linear between them, with an alternating wiggle."""
    out = []
    for t in range(1, steps + 1):
        (a, va), (b, vb) = next((p, q) for p, q in zip(points, points[1:]) if p[0] <= t <= q[0])
        out.append(va + (vb - va) * (t - a) / (b - a) + (wiggle if t % 2 else -wiggle))
    return out


def alarm_step(ntp, warmup=10):
    """The step at which train.py's alarm (scale/alarm.py's Alarm, as train.py drives it) fires, or None."""
    import types
    from scale.alarm import Alarm
    alarm = Alarm(types.SimpleNamespace(loss="prior", warmup=warmup), "no-such-log.jsonl", 0, True)
    for step, value in enumerate(ntp):
        line = {"ntp": value}
        alarm.watch(line, step)
        if "alarm" in line:
            return step + 1
    return None


def test_a_brief_rise_after_warm_up_is_no_alarm(capsys):
    # the healthy runs (docs/own_data.md's commands, --warmup 10): H PRIOR 2.35 (step 1) -> 2.65 (step 50)
    # -> 0.79 (step 300), alarm at step 40 before; U PRIOR 2.26 -> 1.31 by step 150, alarm at step 49 before
    h = curve([(1, 2.35), (10, 2.30), (50, 2.65), (300, 0.79)], 300)
    u = curve([(1, 2.26), (10, 2.22), (45, 2.55), (150, 1.31)], 150)
    for ntp in (h, u):
        assert alarm_step(ntp) is None
    assert "ALARM" not in capsys.readouterr().err


def test_a_sustained_climb_still_raises_the_alarm(capsys):
    climb = curve([(1, 2.35), (10, 2.30), (300, 4.0)], 300)             # unlearning: up and up
    plateau = curve([(1, 2.35), (10, 2.30), (60, 3.5), (300, 3.45)], 300)  # up, and staying there
    # the baseline: the mean of the warm-up's 10 steps; the threshold: baseline + max(0.2, 10%)
    base = sum(climb[:10]) / 10
    first = next(t for t in range(20, 300) if sum(climb[t - 10:t]) / 10 > base + max(0.2, 0.1 * base))
    step = alarm_step(climb)
    assert step == first + 20 - 1  # above the threshold for hold = 2 x window = 20 steps
    assert alarm_step(plateau) is not None and "ALARM" in capsys.readouterr().err


def test_train_refusals_are_one_line_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    for extra, message in (([], f"error: --out-dir {run} holds another run (config.json, log.jsonl)"),
                           (["--resume"], f"error: --resume: no last.pt in {run} to continue from")):
        done = script(["train.py", "--out-dir", str(run), "--device", "cpu", *extra])
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(message)
