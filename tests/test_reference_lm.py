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
