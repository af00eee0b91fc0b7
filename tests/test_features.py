"""The frozen encoder's feature cache (scale/features.py) and gradient-free frozen parts (--train projector)."""
import json
import os
import threading

import pytest
import torch

from data import tokenizer as T
import train
from scale.features import encoder_features, feature_key
from data.images import load_images, normalize
from data.records import read_records
from model import VLM, VLMConfig, DecoderConfig
from utils import load_checkpoint

from test_train import config
from data.packing import make_samples
from model import build_model

# Tolerance: features cached in chunks of 256 images vs the step's own batch differ by fp32 rounding of
# the matmul blocking (~1e-7 relative on values of order 1); over a few AdamW steps of a tiny model the
# losses (~5) and weights (~0.1) stay within 1e-5 relative / 1e-6 absolute. A real difference (wrong
# features, wrong images) moves them by 1e-2 or more.
RTOL, ATOL = 1e-5, 1e-6


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "log.jsonl"))]


def frozen(tiny, out_dir, **kw):
    return config(tiny, out_dir, arch="h", train="projector", loss="prior", steps=4, **kw)


def test_training_from_the_cache_equals_training_from_pixels(tiny, tmp_path):
    train.main(frozen(tiny, tmp_path / "pixels"))
    cache = tmp_path / "features"
    train.main(frozen(tiny, tmp_path / "cached", feature_cache=str(cache)))
    assert len([f for f in os.listdir(cache) if f.endswith(".pt")]) == 1
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "pixels"), rel=RTOL)
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in ("pixels", "cached"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)
    # A second run reads the file (no new one), with the same result.
    train.main(frozen(tiny, tmp_path / "again", feature_cache=str(cache)))
    assert len([f for f in os.listdir(cache) if f.endswith(".pt")]) == 1
    assert losses(tmp_path / "again") == losses(tmp_path / "cached")


def test_training_reads_its_features_from_the_file(tiny, tmp_path):
    """Overwrite the cached features (same key) with zeros: training must change, so it reads the file."""
    cache = tmp_path / "features"
    train.main(frozen(tiny, tmp_path / "a", feature_cache=str(cache)))
    (path,) = [cache / f for f in os.listdir(cache) if f.endswith(".pt")]
    obj = torch.load(path, weights_only=True)
    torch.save({**obj, "features": torch.zeros_like(obj["features"])}, path)
    train.main(frozen(tiny, tmp_path / "b", feature_cache=str(cache)))
    assert losses(tmp_path / "b")[0] != pytest.approx(losses(tmp_path / "a")[0], rel=10 * RTOL)


def small_encoder(seed=0):
    torch.manual_seed(seed)
    cfg = VLMConfig(image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                    decoder=DecoderConfig(vocab_size=50, n_layer=1, n_head=2, d_model=32))
    return VLM(cfg).encoder


def images(n=5, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_features_match_the_encoder_and_key_follows_weights_and_images(tmp_path):
    enc, x = small_encoder(), images()
    feats = encoder_features(enc, x, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(feats, enc.forward_features(normalize(x)), rtol=RTOL, atol=ATOL)
    assert feature_key(small_encoder(0), x, "cpu") == feature_key(enc, x, "cpu")
    assert feature_key(small_encoder(1), x, "cpu") != feature_key(enc, x, "cpu")   # other weights
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    assert feature_key(enc, y, "cpu") != feature_key(enc, x, "cpu")                 # one pixel differs
    assert feature_key(enc, x, "cuda") != feature_key(enc, x, "cpu")                # bf16 autocast differs
    other = encoder_features(small_encoder(1), x, str(tmp_path))                    # a new file, not the old one
    assert not torch.allclose(other, feats)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".pt")]) == 2


def test_a_broken_file_is_computed_again(tmp_path):
    enc, x = small_encoder(), images()
    feats = encoder_features(enc, x, str(tmp_path)).clone()
    path = tmp_path / f"{feature_key(enc, x, 'cpu')}.pt"
    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    messages = []
    assert torch.equal(encoder_features(enc, x, str(tmp_path), log=messages.append), feats)
    assert "computing it again" in messages[0]


def test_concurrent_builders_leave_one_good_file(tmp_path):
    enc, x = small_encoder(), images(40)
    results, errors = [], []

    def build():
        try:
            results.append(encoder_features(enc, x, str(tmp_path), log=lambda m: None).clone())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(torch.equal(r, results[0]) for r in results)
    assert os.listdir(tmp_path) == [f"{feature_key(enc, x, 'cpu')}.pt"]  # no temporary files left


def test_refused_where_the_encoder_is_not_frozen_or_random(tiny, tmp_path):
    for kw in (dict(arch="u"), dict(arch="h", train="all"), dict(arch="h", train="projector", objective="recon")):
        with pytest.raises(ValueError, match="--feature-cache needs --arch h"):
            train.main(config(tiny, tmp_path, feature_cache=str(tmp_path / "f"), **kw))
    enc = small_encoder()
    enc.blocks[0].attn.attn_drop.p = 0.1
    with pytest.raises(ValueError, match="draws random numbers"):
        encoder_features(enc, images(), str(tmp_path / "g"))


def test_projector_only_step_gives_gradients_to_the_projector_alone(tiny, tmp_path):
    cfg = config(tiny, tmp_path, arch="h", train="projector", loss="ntp", steps=4)  # samples below carry no p_ref
    tok = T.load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tok)
    records, imgs = load_images(read_records(cfg.data), cfg.image_size)
    data = train.Data(make_samples(tok, records), imgs, model.image_tokens())
    built = []
    hook = lambda m, i, out: built.append(out.grad_fn is not None or out.requires_grad)  # noqa: E731
    model.encoder.norm.register_forward_hook(hook)
    train.train_step(cfg, 0, model, data, "cpu")
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"projector"}
    assert all(p.grad is not None for p in model.projector.parameters())
    assert built == [False]  # the encoder's forward recorded no autograd graph
