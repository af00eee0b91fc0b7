import json

import reference_lm


def test_loss_falls_and_checkpoint_records_its_inputs(tiny):
    history = json.load(open(str(tiny["ref_lm"]).replace(".pt", ".json")))["history"]
    assert history[-1]["val_nll"] < 5.0  # log(300) = 5.7 at initialisation
    cfg = reference_lm.RefConfig(data=str(tiny["ref"]), tokenizer=str(tiny["tokenizer"]), out="unused",
                                 n_layer=1, n_head=2, d_model=32, row_len=64, device="cpu")
    import tokenizer as T
    from data.records import read_records
    tok = T.load_tokenizer(cfg.tokenizer)
    model, ckpt = reference_lm.load_lm(str(tiny["ref_lm"]), tok)
    samples = reference_lm.caption_samples(tok, read_records(cfg.data, require_image=False))
    trained = reference_lm.evaluate(model, samples, 64, "cpu")
    import torch
    torch.manual_seed(0)  # the untrained baseline must not depend on which tests ran before
    fresh = reference_lm.evaluate(reference_lm.Decoder(model.cfg), samples, 64, "cpu")
    assert trained < fresh - 1.0
    assert ckpt["tokenizer"] == T.fingerprint(tok) and len(ckpt["data"]) == 16
    assert ckpt["decoder_config"]["d_model"] == 32
