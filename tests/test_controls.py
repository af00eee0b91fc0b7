"""experiments/controls.py (anti-PRIOR, PRIOR shuffled within word tags) and protocol's gate with its simulated power:
weights by hand on a tiny caption, every arm's weights unlike ones, the gate's rule and power."""
import json
import statistics
from types import SimpleNamespace

import pytest
import torch

import train
from experiments import controls, protocol  # noqa: F401 (registers the controls)
from test_train import config, log_losses


def batch_of(p_ref, tags):
    p = torch.tensor([p_ref])
    return SimpleNamespace(inputs={"p_ref": p}, labels=torch.zeros_like(p, dtype=torch.long),
                           tags=torch.tensor([tags]))


def test_anti_prior_by_hand():
    b = batch_of([0.9, 0.2, 0.5, 1.3], [0, 2, 2, 3])  # 1.3: clamped to 1 like PRIOR's
    w = train.WEIGHTINGS["anti_prior"].weights
    assert w(SimpleNamespace(alpha=1.0), b, None).flatten().tolist() == pytest.approx([0.9, 0.2, 0.5, 1.0])
    assert w(SimpleNamespace(alpha=2.0), b, None).flatten().tolist() == pytest.approx([0.81, 0.04, 0.25, 1.0])
    prior = train.WEIGHTINGS["prior"].weights(SimpleNamespace(alpha=1.0), b, None)
    assert prior.flatten().tolist() == pytest.approx([0.1, 0.8, 0.5, 0.0])  # the opposite tokens up-weighted


def test_shuffle_within_tags_by_hand():
    p_ref, tags = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 1, 2, -1]
    seen = set()
    for rid in range(60):
        out = controls.shuffle_within_tags(p_ref, tags, controls.record_generator(f"train-{rid}"))
        for tag in set(tags):  # each tag keeps its own values: PRIOR's allocation across tags
            mine = sorted(o for o, t in zip(out, tags) if t == tag)
            assert mine == sorted(p for p, t in zip(p_ref, tags) if t == tag)
        assert out[4:] == [0.5, 0.6]  # a tag of one token (and the unknown tag) cannot move
        seen.add(tuple(out))
        again = controls.shuffle_within_tags(p_ref, tags, controls.record_generator(f"train-{rid}"))
        assert again == out  # the record id alone decides the permutation
    assert len(seen) == 4  # 2 x 2 orders of the two 2-token tags, all reached


def test_every_arm_weights_are_not_ones():
    """A weighting replaced by ones (NTP) turns this red: on a caption whose p_ref and tags vary, each arm's weights
    vary (the shuffles after their prepare step)."""
    p_ref, tags = [0.1, 0.9, 0.3, 0.7, 0.5], [0, 2, 0, 2, 1]
    cfg = SimpleNamespace(alpha=1.0, oracle_low=0.1)
    for name in ("prior", "anti_prior", "prior_shuffled", "prior_shuffled_tag", "oracle", "prior_alpha0.5",
                 "prior_alpha2"):
        arm = train.WEIGHTINGS[name]
        sample = SimpleNamespace(inputs={"p_ref": list(p_ref)}, tags=list(tags), index=0)
        if arm.prepare:
            arm.prepare(cfg, [sample], [SimpleNamespace(id="train-000003")], None, "cpu")
        w = arm.weights(cfg, batch_of(sample.inputs["p_ref"], tags), None)
        assert len(set(w.flatten().tolist())) > 1, name
    assert set(train.WEIGHTINGS["ntp"].weights(cfg, batch_of(p_ref, tags), None).flatten().tolist()) == {1.0}
    # the doses are (1 - p_ref)^alpha at their own alpha, whatever --alpha says
    for name, alpha in (("prior_alpha0.5", 0.5), ("prior_alpha2", 2.0)):
        w = train.WEIGHTINGS[name].weights(cfg, batch_of(p_ref, tags), None).flatten().tolist()
        assert w == pytest.approx([(1 - p) ** alpha for p in p_ref], abs=1e-6), name


@pytest.mark.parametrize("loss", ["anti_prior", "prior_shuffled_tag"])
def test_controls_train_and_differ_from_prior(tiny, tmp_path, loss):
    train.main(config(tiny, tmp_path / loss, loss=loss, steps=2, save_every=2))
    train.main(config(tiny, tmp_path / "prior", loss="prior", steps=2, save_every=2))
    assert json.load(open(tmp_path / loss / "config.json"))["config"]["loss"] == loss
    assert log_losses(tmp_path / loss / "log.jsonl") != log_losses(tmp_path / "prior" / "log.jsonl")


def test_gate_rule():
    assert protocol.gate([0.1, 0.12, 0.09, 0.11])[0] is False  # 4 seeds: too few, whatever they say
    passed, lower = protocol.gate([0.1, 0.12, 0.09, 0.11, 0.10])
    mean, sd = statistics.mean([0.1, 0.12, 0.09, 0.11, 0.10]), statistics.stdev([0.1, 0.12, 0.09, 0.11, 0.10])
    assert passed and lower == pytest.approx(mean - 2.131847 * sd / 5 ** 0.5, rel=1e-5)  # t_{0.95, 4}
    one_bad = [0.4, 0.5, 0.45, 0.5, -0.01]  # one seed where NTP did well: "every seed" fails, the gate does not
    assert protocol.gate(one_bad)[0] and not protocol.every_seed(one_bad)
    assert not protocol.gate([0.1, -0.1, 0.05, -0.05, 0.0])[0]


def test_gate_power_by_simulation():
    """At no effect the one-sided rule passes about 5% of pilots; at a clear effect nearly all."""
    null = protocol.simulated_power(protocol.gate, lambda rng: rng.gauss(0, 1), 5)
    assert 0.03 < null < 0.07
    strong = protocol.simulated_power(protocol.gate, lambda rng: rng.gauss(1.0, 0.5), 5)
    assert strong > 0.95
    # NTP "switches on" the image in 15% of seeds, erasing the oracle's edge there: the old rule loses power with
    # more seeds, the gate gains it
    mixed = lambda rng: rng.gauss(0.3, 0.1) if rng.random() > 0.15 else rng.gauss(-0.02, 0.05)  # noqa: E731
    old = [protocol.simulated_power(protocol.every_seed, mixed, n) for n in (3, 5, 10)]
    new = [protocol.simulated_power(protocol.gate, mixed, n) for n in (5, 10)]
    assert old[0] > old[1] > old[2] and new[1] > new[0] > old[1]
    assert protocol.simulated_power(protocol.gate, mixed, 5) == new[0]  # seeded: the same numbers again
