import json

import reference_lm
from data.packing import make_samples
from model import load_lm


def test_loss_falls_and_checkpoint_records_its_inputs(tiny):
    history = json.load(open(str(tiny["ref_lm"]).replace(".pt", ".json")))["history"]
    assert history[-1]["val_nll"] < 5.0  # log(300) = 5.7 at initialisation
    cfg = reference_lm.RefConfig(data=str(tiny["ref"]), tokenizer=str(tiny["tokenizer"]), out="unused",
                                 n_layer=1, n_head=2, d_model=32, row_len=64, device="cpu")
    from data import tokenizer as T
    from data.records import read_records
    tok = T.load_tokenizer(cfg.tokenizer)
    model, ckpt = load_lm(str(tiny["ref_lm"]), tok)
    samples = make_samples(tok, read_records(cfg.data, require_image=False))
    trained = reference_lm.evaluate(model, samples, 64, "cpu")
    import torch
    torch.manual_seed(0)  # the untrained baseline must not depend on which tests ran before
    fresh = reference_lm.evaluate(reference_lm.Decoder(model.cfg), samples, 64, "cpu")
    assert trained < fresh - 1.0
    assert ckpt["tokenizer"] == T.fingerprint(tok) and len(ckpt["data"]) == 16
    assert ckpt["decoder_config"]["d_model"] == 32


def test_max_bad_fraction_is_a_flag(tiny, tmp_path):
    """A caption file 1.5% bad (3 of 203 lines) stops at the default 1% and trains with --max-bad-fraction 0.02."""
    import pytest
    from data.record_types import DataError
    lines = open(tiny["ref"]).read().splitlines()[:204] + ["{broken"] * 3
    data = tmp_path / "dirty.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kw = dict(data=str(data), tokenizer=str(tiny["tokenizer"]), out=str(tmp_path / "lm.pt"), n_layer=1, n_head=2,
              d_model=32, row_len=64, batch_rows=4, steps=1, eval_every=1, device="cpu")
    with pytest.raises(DataError, match="max_bad_fraction"):
        reference_lm.train_lm(reference_lm.RefConfig(**kw))
    reference_lm.train_lm(reference_lm.RefConfig(**kw, max_bad_fraction=0.02))
    assert load_lm(str(tmp_path / "lm.pt"))[1]["config"]["max_bad_fraction"] == 0.02


def test_steps_sized_to_the_data_unless_given():
    from dataclasses import replace
    cfg = reference_lm.RefConfig()
    assert cfg.steps == 0 and cfg.eval_every == 0 and cfg.patience == 3  # sized, with patience, by default
    small = reference_lm.size_steps(cfg, epoch_rows=12)  # 150 captions: 12 rows, fewer than a step's 16
    assert small.steps == reference_lm.MAX_EPOCHS and small.eval_every == small.steps // 10
    assert small.warmup == small.steps // 10
    many = reference_lm.size_steps(replace(cfg, batch_rows=8), epoch_rows=80)  # 10 steps a pass
    assert many.steps == min(reference_lm.MAX_STEPS, 10 * reference_lm.MAX_EPOCHS)
    assert reference_lm.size_steps(cfg, epoch_rows=10 ** 6).steps == reference_lm.MAX_STEPS
    # The main job passes --steps (its cpu preset's LMs: 300, warm-up 30; the base LM 1200): all kept as before,
    # validation every 200 as the old default
    for steps in (300, 1200):
        given = reference_lm.size_steps(replace(cfg, steps=steps, warmup=30, batch_rows=8), epoch_rows=12)
        assert (given.steps, given.warmup, given.eval_every) == (steps, 30, 200)
    assert reference_lm.size_steps(replace(cfg, eval_every=7), 12).eval_every == 7


def test_sized_run_trains_the_sized_steps(tiny, tmp_path):
    out = tmp_path / "lm.pt"
    kw = dict(data=str(tiny["ref"]), tokenizer=str(tiny["tokenizer"]), out=str(out), n_layer=1, n_head=2,
              d_model=32, row_len=64, batch_rows=64, device="cpu", max_epochs=3, patience=0)
    reference_lm.train_lm(reference_lm.RefConfig(**kw))
    ckpt = load_lm(str(out))[1]
    assert ckpt["config"]["steps"] == 3 and ckpt["history"][-1]["step"] == 3  # rows < batch: a step is a pass
