"""baselines/: the weightings and the hook they register in train.py, the auxiliary heads (ITM, ITC,
reconstruction), the attention-weight scorer."""
import json
from dataclasses import replace

import pytest
import torch

from data import tokenizer as T
import baselines
import train
from data.packing import IGNORE, pack
from data.records import read_records
from data.images import load_images, normalize
from baselines import attention
from baselines.heads import AuxHeads, MicroBatch, host_positions, micro_batch_loss, patchify
from data.scores import load_scores
from data.tags import token_tags
from utils import text_fingerprint
from data.packing import make_samples
from model import build_model as build_vlm


def build_model(cfg, tok):
    """The VLM with the heads of cfg's --objective, as train.py builds it (the baselines' hook attaches them)."""
    return build_vlm(cfg, tok, train.method_hook(cfg))


def config(tiny, **kw):
    base = dict(data=str(tiny["train"]), tokenizer=str(tiny["tokenizer"]), scores=str(tiny["scores"]), out_dir="unused",
                image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2, n_layer=1, n_head=2, d_model=32,
                batch_size=8, row_len=64, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.fixture(scope="module")
def pairs(tiny):
    """(tokenizer, samples, uint8 images) of the tiny training set."""
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    records, images = load_images(read_records(str(tiny["train"])), 16)
    return tok, make_samples(tok, records), images


def distinct(samples, n):
    """The first n samples whose captions' image words (colour, shape) differ: no accidental positives."""
    seen, out = set(), []
    for s in samples:
        key = tuple(s.caption_ids[4:6])
        if key not in seen:
            seen.add(key)
            out.append(s)
        if len(out) == n:
            return out
    raise AssertionError("not enough distinct samples")


def micro_batch(cfg, model, samples, images):
    """A MicroBatch built as train.train_step builds one (no text-only rows)."""
    batch = pack(samples, cfg.row_len, model.image_tokens(), tight=True)
    R, L = batch.input_ids.shape
    keep = (batch.labels != IGNORE).flatten().nonzero().squeeze(1)
    captions = (batch.doc_ids + torch.arange(R)[:, None] * (L + 1)).flatten()[keep]
    eos, slots, image_labels = host_positions(batch, R)
    text = None
    if cfg.objective == "itc":
        by_index = {s.index: s for s in samples}
        tb = pack([by_index[i] for i in batch.indices], cfg.row_len)  # the captions alone, in the images' order
        text = (tb.input_ids, tb.position_ids, tb.doc_ids, (tb.labels == T.EOS).flatten().nonzero().squeeze(1))
    weights = train.WEIGHTINGS[cfg.loss].weights(cfg, batch, None)
    return MicroBatch(batch.input_ids, batch.position_ids, batch.doc_ids, normalize(images[batch.indices]), keep,
                      batch.labels.flatten()[keep][None], captions[None], weights.flatten()[keep][None],
                      batch.inputs.get("p_ref", torch.zeros(R, L)).flatten()[keep][None], R,
                      image_labels, len(batch.indices), eos, slots, text)


def test_heads_exist_only_for_their_objective(pairs, tiny):
    tok = pairs[0]
    torch.manual_seed(0)
    plain = build_model(config(tiny), tok)
    assert not hasattr(plain, "aux") and not any(k.startswith("aux.") for k in plain.state_dict())
    expected = {"itm": {"itm.weight", "itm.bias"}, "itc": {"itc_image.weight", "itc_text.weight", "itc_logit_scale"},
                "recon": {"recon.weight", "recon.bias"}}
    for objective, keys in expected.items():
        torch.manual_seed(0)
        model = build_model(config(tiny, objective=objective), tok)
        assert set(model.aux.state_dict()) == keys
        # the VLM's own initialisation is the same with or without heads
        vlm = {k: v for k, v in model.state_dict().items() if not k.startswith("aux.")}
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in vlm.items())
    assert model.aux.recon.out_features == 3 * 4 * 4
    with pytest.raises(ValueError):
        AuxHeads("none", 8, 4)


def test_patchify_is_the_u_lvlms_patch_order():
    from model import VLM, VLMConfig, DecoderConfig
    model = VLM(VLMConfig(arch="u", image_size=16, patch_size=4,
                          decoder=DecoderConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16)))
    pixels = torch.randn(2, 3, 16, 16)
    patches = patchify(pixels, 4)
    assert patches.shape == (2, 16, 48)
    torch.testing.assert_close(model.patch_embed(patches), model.embed_images(pixels))
    # patch 5 = row 1, column 1: pixels [4:8, 4:8], channel first
    torch.testing.assert_close(patches[1, 5], pixels[1, :, 4:8, 4:8].flatten())


@pytest.mark.parametrize("arch", ["h", "u"])
@pytest.mark.parametrize("objective", ["itm", "itc", "recon"])
def test_aux_losses_shapes_and_gradients_with_projector_only(pairs, tiny, arch, objective):
    """--train projector: the heads and the projector get gradients from the auxiliary loss alone; the
    encoder and the decoder stay frozen (no gradient at all)."""
    tok, samples, images = pairs
    cfg = config(tiny, arch=arch, objective=objective, train="projector")
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    mb = micro_batch(cfg, model, distinct(samples, 4), images)
    logits, loss, aux = micro_batch_loss(cfg, model, model, mb, "cpu")
    assert logits.shape == (1, mb.keep.numel(), tok.get_vocab_size())
    assert loss.shape == () and aux.shape == () and torch.isfinite(aux)
    assert mb.eos.numel() == 4 and mb.slots.numel() == 4 * len([t for t in model.image_tokens() if t == T.IMAGE])
    if objective == "itm":
        assert aux.item() == pytest.approx(0.693, abs=0.05)  # untrained 2-way classifier: ~ln 2
    aux.backward()
    for p in model.aux.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for name, part in model.parts().items():
        grads = [p.grad for p in part.parameters()]
        if name == "projector":
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        else:
            assert all(g is None for g in grads), name


@pytest.mark.parametrize("arch", ["h", "u"])
@pytest.mark.parametrize("objective", ["itm", "itc", "recon"])
def test_aux_losses_decrease_on_a_tiny_batch(pairs, tiny, arch, objective):
    tok, samples, images = pairs
    cfg = config(tiny, arch=arch, objective=objective)
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    mb = micro_batch(cfg, model, distinct(samples, 4), images)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(80):  # ITM starts learning after ~40 steps (the head first has to find the image)
        _, loss, aux = micro_batch_loss(cfg, model, model, mb, "cpu")
        (loss + aux).backward()
        opt.step()
        opt.zero_grad()
        history.append(aux.item())
    assert history[-1] < 0.5 * history[0], history


def test_cal_and_rho1_micro_batch_losses(pairs, tiny):
    tok, samples, images = pairs
    torch.manual_seed(0)
    model = build_model(config(tiny), tok)
    cfg = config(tiny, loss="rho1", rho1_keep=1.0)
    mb = micro_batch(cfg, model, samples[:6], images)
    mb.p_ref = torch.rand(mb.labels.shape)
    ntp = micro_batch_loss(config(tiny), model, model, mb, "cpu")[1]
    assert torch.equal(micro_batch_loss(cfg, model, model, mb, "cpu")[1], ntp)
    assert micro_batch_loss(replace(cfg, rho1_keep=0.5), model, model, mb, "cpu")[1] > ntp  # the harder half
    # CAL's second forward sees another image: with identical images the contrast is 0 and CAL is NTP
    cal = config(tiny, loss="cal")
    same = micro_batch(cal, model, [samples[0]] * 3, images)
    torch.testing.assert_close(micro_batch_loss(cal, model, model, same, "cpu")[1],
                               micro_batch_loss(config(tiny), model, model, same, "cpu")[1], rtol=0, atol=1e-6)
    logits, loss, _ = micro_batch_loss(cal, model, model, mb, "cpu")
    assert torch.isfinite(loss) and logits.requires_grad


@pytest.fixture(scope="module")
def attn_scores(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("attn") / "attn.pt"
    cfg = attention.AttnConfig(data=str(tiny["train"]), tokenizer=str(tiny["tokenizer"]), out=str(out), image_size=16,
                                patch_size=4, vit_dim=32, vit_depth=1, vit_heads=2, d_model=32, n_head=2, steps=300,
                                batch_size=16, lr=3e-3, device="cpu")
    scorer, weights = attention.train_attention_scorer(cfg)
    return out, weights


def test_attention_scorer_writes_a_score_file_that_favours_image_words(tiny, attn_scores):
    out, weights = attn_scores
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    records = read_records(str(tiny["train"]))
    loaded = load_scores(str(out), T.fingerprint(tok), text_fingerprint(records))
    assert set(loaded) == {r.id for r in records}
    captions = T.encode_captions(tok, [r.caption for r in records])
    by_tag = {0: [], 1: [], 2: []}
    for r, c, tags in zip(records, captions, token_tags(tok, records)):
        w = loaded[r.id]
        assert len(w) == len(c) + 1 and w.min() >= 0 and w.max() <= 1
        torch.testing.assert_close(w, weights[r.id], rtol=0, atol=1 / 65535)  # uint16 quantisation
        for x, t in zip(w.tolist(), tags):
            if t >= 0:
                by_tag[t].append(x)
    mean = {t: sum(v) / len(v) for t, v in by_tag.items()}
    # ground truth of the tiny data: colour and shape are image words, the rest boilerplate or names
    assert mean[0] > mean[1] + 0.1 and mean[0] > mean[2] + 0.1, mean


def test_attn_loss_trains_from_the_scorer_file(tiny, attn_scores, tmp_path):
    out, _ = attn_scores
    train.main(config(tiny, out_dir=str(tmp_path), loss="attn", attn_scores=str(out), steps=2, save_every=2, warmup=1))
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert len(lines) == 2 and lines[-1]["loss"] != pytest.approx(lines[-1]["ntp"], rel=1e-6)
    # a weight file made for other captions is refused, as a p_ref file is
    other = tmp_path / "other.jsonl"
    lines = open(tiny["train"]).readlines()[:-1]
    other.write_text("".join(l.replace('"images/', f'"{tiny["root"]}/images/') for l in lines))
    with pytest.raises(ValueError, match="caption data mismatch"):
        train.main(config(tiny, out_dir=str(tmp_path / "b"), loss="attn", attn_scores=str(out), data=str(other)))


def test_scorer_help():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "baselines.attention", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--budget", "--n-layer", "--out", "--init-encoder", "warm-up 5%"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("objective", ["itm", "itc"])
def test_itm_itc_pairs_are_drawn_per_micro_batch(tiny, tmp_path, objective):
    """What README documents: ITM's mismatched pairs and ITC's negatives come from each micro-batch of each
    process, so --micro-batch (and, the same way, N processes) changes the auxiliary loss, unlike the caption
    loss. With lr 0 (weights fixed): a batch of 8 in micro-batches of 4 gives exactly the mean of the two
    batches of 4 run alone, and not the loss of the 8 drawn together."""
    import json

    def aux(name, **kw):
        train.main(config(tiny, out_dir=str(tmp_path / name), objective=objective, lr=0.0, warmup=1, **kw))
        return [json.loads(line) for line in open(tmp_path / name / "log.jsonl")]
    split = aux("split", batch_size=8, micro_batch=4, steps=1, save_every=1)[0]
    halves = aux("halves", batch_size=4, steps=2, save_every=2)  # steps 1 and 2: the same 8 samples, 4 at a time
    whole = aux("whole", batch_size=8, steps=1, save_every=1)[0]
    assert split["aux"] == pytest.approx((halves[0]["aux"] + halves[1]["aux"]) / 2, rel=1e-5)
    assert split["ntp"] == pytest.approx(whole["ntp"], rel=1e-5)  # the caption loss does not depend on the split
    assert split["aux"] != pytest.approx(whole["aux"], rel=1e-5)  # other pairs: 5e-4 apart for ITM here


def test_hook_is_none_for_a_weighting_and_a_baseline_otherwise(tiny):
    """rare and attn are token weightings alone (registered like PRIOR's); rho1, cal and the objectives need the
    hook, which importing baselines registers as train.py's plug-in "method"."""
    for loss in ("ntp", "prior", "prior_shuffled", "oracle", "rare", "attn"):
        assert baselines.hook(config(tiny, loss=loss)) is None, loss
        assert loss in train.WEIGHTINGS
    for loss in ("rho1", "cal"):
        assert isinstance(baselines.hook(config(tiny, loss=loss)), baselines.Baseline), loss
        assert train.method_hook(config(tiny, loss=loss)) is not None
    assert isinstance(baselines.hook(config(tiny, objective="itm")), baselines.Baseline)
    with pytest.raises(ValueError, match="--fsdp"):
        baselines.hook(config(tiny, loss="cal", fsdp=True), world=2)


def test_attn_weights_ride_in_their_own_input_not_p_ref(tiny):
    """--loss attn's weights reach the loss as the per-token input "attn" (Sample.inputs / Batch.inputs); no p_ref."""
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    records = read_records(str(tiny["train"]))[:4]
    captions = T.encode_captions(tok, [r.caption for r in records])
    given = {r.id: torch.linspace(0.1, 0.9, len(c) + 1) for r, c in zip(records, captions)}
    samples = make_samples(tok, records, {"attn": given})
    assert all(s.inputs == {"attn": given[r.id].tolist()} for s, r in zip(samples, records))
    batch = pack(samples, 64, [T.IMAGE] * 4)
    labelled = batch.labels != IGNORE
    got = train.WEIGHTINGS["attn"].weights(config(tiny, loss="attn"), batch, None)
    assert torch.equal(got[labelled], torch.cat([given[r.id] for r in records]))
    assert set(batch.inputs) == {"attn"}
    with pytest.raises(ValueError, match="scores for"):
        make_samples(tok, records, {"attn": {r.id: torch.ones(2) for r in records}}, source="w.pt")
