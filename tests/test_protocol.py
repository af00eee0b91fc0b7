"""experiments/protocol.py's declared rules against hand computations and synthetic curves, and
experiments/worker.py: in-process checkpoint evaluation equals eval.py's, changes no training, and repeats
bit for bit on one machine.
Run: .venv/bin/python -m pytest tests/test_protocol.py
"""
import json
import math

import pytest

from experiments import protocol as P
from experiments.stats import t_quantile


def test_lr_choice_takes_the_smallest_of_near_ties():
    assert P.choose_lr({1e-3: 0.30, 3e-3: 0.40, 1e-2: 0.35}) == (3e-3, False)
    assert P.choose_lr({1e-3: 0.398, 3e-3: 0.40, 1e-2: 0.35}) == (1e-3, True)  # within TIE of the best: smaller
    assert P.choose_lr({1e-3: 0.30, 3e-3: 0.40, 1e-2: 0.41}) == (1e-2, True)
    assert P.next_lr([1e-3, 3e-3, 1e-2], 1e-2) == 3e-2 and P.next_lr([1e-3, 3e-3, 1e-2], 1e-3) == 3.33e-4


def test_settle_extends_a_grid_once_past_its_edge():
    base = [1e-3, 3e-3, 1e-2]
    assert P.settle({1e-3: 0.3, 3e-3: 0.4, 1e-2: 0.35}, base, 1) == (3e-3, False, None)  # inside: stands
    assert P.settle({1e-3: 0.3, 3e-3: 0.4, 1e-2: 0.45}, base, 1) == (1e-2, True, 3e-2)   # edge: one more
    assert P.settle({1e-3: 0.3, 3e-3: 0.4, 1e-2: 0.45, 3e-2: 0.5}, base, 1) == (3e-2, True, None)  # grown: capped
    assert P.settle({1e-3: 0.5, 3e-3: 0.4, 1e-2: 0.45}, base, 1) == (1e-3, True, 3.33e-4)  # the other side
    assert P.settle({1e-3: 0.3, 3e-3: 0.4, 1e-2: 0.45}, base, 0) == (1e-2, True, None)     # extend 0: never


def test_curve_rules_on_synthetic_curves():
    rising = {s: 1 - math.exp(-s / 20) for s in range(10, 110, 10)}  # saturating: flat by the end
    linear = {s: s / 100 for s in range(10, 110, 10)}                 # still climbing
    assert P.converged(rising)[0] and not P.converged(linear)[0]
    assert P.converged(linear)[1] == pytest.approx(0.3 / 0.9)  # steps 70 -> 100 of a 0.1 -> 1.0 rise
    peaked = {10: 0.1, 20: 0.5, 30: 0.4, 40: 0.45, 50: 0.2}
    assert P.peak_step(peaked) == 20 and P.max_drop(peaked) == pytest.approx(0.3) and P.max_drop(rising) == 0
    assert P.tail_mean(peaked) == pytest.approx((0.45 + 0.2) / 2) and P.tail_mean(peaked, 3) == pytest.approx(1.05 / 3)
    assert P.mean_curve([{1: 1.0, 2: 2.0}, {1: 3.0, 2: 4.0, 3: 9.0}]) == {1: 2.0, 2: 3.0}


def test_mde_and_share_of_the_oracle_by_hand():
    n, sd = 5, 0.04
    assert P.mde(sd, n) == pytest.approx((t_quantile(0.975, 4) + t_quantile(0.8, 4)) * sd / math.sqrt(n))
    assert P.mde(sd, n) == pytest.approx((2.776 + 0.941) * 0.04 / math.sqrt(5), rel=1e-3)
    share, lo, hi = P.share_of_oracle([0.1, 0.2, 0.3], [0.2, 0.4, 0.6])
    assert share == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # a fixed ratio
    share, lo, hi = P.share_of_oracle([0.0, 0.2, 0.1, 0.3], [0.2, 0.2, 0.3, 0.3])
    assert share == pytest.approx(0.6 / 1.0) and lo < share < hi
    assert (share, lo, hi) == P.share_of_oracle([0.0, 0.2, 0.1, 0.3], [0.2, 0.2, 0.3, 0.3])  # seeded
    assert math.isnan(P.share_of_oracle([0.1], [0.0])[0])


@pytest.fixture(scope="module")
def run_args(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    with open(root / "count.jsonl", "w") as f:
        for i in range(8):  # questions on the tiny set's own images
            f.write(json.dumps({"image": f"{tiny['root']}/images/train-{i}.png", "prompt": "stock photo : a",
                                "choices": ["red", "blue", "green"], "answer": i % 3}) + "\n")
    (root / "probes").mkdir()
    (root / "count.jsonl").rename(root / "probes" / "count.jsonl")

    def args(out, *extra):
        return ["--data", str(tiny["train"]), "--tokenizer", str(tiny["tokenizer"]), "--scores", str(tiny["scores"]),
                "--arch", "h", "--loss", "prior", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
                "--vit-dim", "32", "--vit-depth", "1", "--vit-heads", "2", "--image-size", "16", "--patch-size", "8",
                "--batch-size", "8", "--row-len", "64", "--steps", "4", "--save-every", "2", "--device", "cpu",
                "--out-dir", str(root / out), *extra]
    return root, args


def test_in_process_evaluation_equals_eval_py_and_repeats_bit_for_bit(run_args):
    import eval as E
    import train
    from experiments.worker import train_eval
    from utils import parse_config
    root, args = run_args
    config = lambda argv: parse_config(train.TrainConfig, argv)  # noqa: E731
    captions = args("a")[1]  # the captions' gaps at every checkpoint, the probes at the last (worker.FINAL_ONLY)
    spec = [{"out": "eval.json", "probes": str(root / "probes"), "test": captions}]
    timing = train_eval(config(args("a")), spec)
    assert timing["train_s"] > 0 and timing["eval_s"] > 0
    rows = json.loads((root / "a" / "eval.json").read_text())
    assert sorted({r["step"] for r in rows}) == [2, 4]
    for step in (2, 4):  # the same numbers as eval.py on the saved checkpoint
        mine = {r["benchmark"]: r["value"] for r in rows if r["step"] == step}
        probes = str(root / "probes") if step == 4 else None
        theirs = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(
            str(root / "a" / f"ckpt_{step:06d}.pt"), probes_dir=probes, test_path=captions)}
        assert mine == theirs and ("count" in mine) == (step == 4) and "gap_image" in mine
    train_eval(config(args("b")), spec)  # the same run again, on this machine: every number identical
    assert (root / "b" / "eval.json").read_text() == (root / "a" / "eval.json").read_text()
    log = lambda d: [json.loads(x)["loss"] for x in open(root / d / "log.jsonl")]  # noqa: E731
    assert log("a") == log("b")
    before = (root / "a" / "eval.json").read_text()
    (root / "a" / "eval.json").unlink()  # a finished run without its evaluations: they come from its checkpoints
    assert train_eval(config(args("a")), spec)["train_s"] == 0 and (root / "a" / "eval.json").read_text() == before


def test_evaluation_changes_no_training(run_args):
    """Training with the checkpoint evaluations in the loop gives the weights of training without them."""
    import torch

    import train
    from utils import parse_config
    root, args = run_args
    seen = []
    a = train.main(parse_config(train.TrainConfig, args("c")), on_checkpoint=lambda s, m: seen.append(
        __import__("eval").evaluate_model(m, __import__("data.tokenizer", fromlist=["x"]).load_tokenizer(
            args("c")[3]), probes_dir=str(root / "probes"))))
    b = train.main(parse_config(train.TrainConfig, args("d")))
    assert len(seen) == 2
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
