import pytest
import torch

from data import tokenizer as T
from data.packing import Sample, pack
from model import VLM, Decoder, DecoderConfig, VLMConfig


def tiny_vlm(arch, **kw):
    torch.manual_seed(0)
    cfg = VLMConfig(arch=arch, image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                    decoder=DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=128), **kw)
    return VLM(cfg)


def batch_for(model, captions):
    return pack([Sample(c, index=i) for i, c in enumerate(captions)], 128, model.image_tokens())


@pytest.mark.parametrize("arch", ["h", "u"])
def test_shapes_and_image_tokens(arch):
    model = tiny_vlm(arch)
    tokens = model.image_tokens()
    grid = 16 // 4
    if arch == "h":
        assert tokens == [T.IMAGE] * grid * grid
    else:  # SOLO framing: <vision> (patches, row separator) x rows </vision>
        assert tokens[0] == T.VISION and tokens[-1] == T.VISION_END
        assert tokens.count(T.VROW) == grid and tokens.count(T.IMAGE) == grid * grid
    b = batch_for(model, [[10, 11, 12], [13, 14]])
    logits = model(b.input_ids, torch.randn(2, 3, 16, 16), b.position_ids, b.doc_ids)
    assert logits.shape == (1, 128, 64)
    with pytest.raises(RuntimeError, match="slots"):  # asserted on the device (torch._assert_async)
        model(b.input_ids, torch.randn(1, 3, 16, 16), b.position_ids, b.doc_ids)


def test_causal_decoder():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)).eval()
    a = torch.randint(10, 64, (1, 10))
    b = a.clone()
    b[0, 6:] = torch.randint(10, 64, (4,))
    torch.testing.assert_close(model(a)[0, :6], model(b)[0, :6])
    assert not torch.allclose(model(a)[0, 6:], model(b)[0, 6:])


@pytest.mark.parametrize("arch", ["h", "u"])
def test_image_prefix_reaches_only_its_own_caption(arch):
    model = tiny_vlm(arch).eval()
    b = batch_for(model, [[10, 11, 12], [13, 14]])
    images = torch.randn(2, 3, 16, 16)
    base = model(b.input_ids, images, b.position_ids, b.doc_ids)
    changed = images.clone()
    changed[1] = torch.randn(3, 16, 16)
    out = model(b.input_ids, changed, b.position_ids, b.doc_ids)
    n0 = len(model.image_tokens()) + 4  # first sample: image + bos + 3 caption tokens
    torch.testing.assert_close(out[0, :n0], base[0, :n0])  # caption 1 cannot see image 2
    assert not torch.allclose(out[0, n0:n0 + 5], base[0, n0:n0 + 5])  # caption 2 sees its image


@pytest.mark.parametrize("arch", ["h", "u"])
def test_gradients_reach_every_part_or_only_the_projector(arch):
    model = tiny_vlm(arch)
    b = batch_for(model, [[10, 11, 12]])
    logits = model(b.input_ids, torch.randn(1, 3, 16, 16), b.position_ids, b.doc_ids)
    logits[b.labels != -100].logsumexp(-1).sum().backward()
    for name, part in model.parts().items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name
    model.zero_grad(set_to_none=True)
    for name, part in model.parts().items():
        part.requires_grad_(name == "projector")
    logits = model(b.input_ids, torch.randn(1, 3, 16, 16), b.position_ids, b.doc_ids)
    logits[b.labels != -100].logsumexp(-1).sum().backward()
    for name, part in model.parts().items():
        grads = [p.grad for p in part.parameters()]
        if name == "projector":
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads), name


def test_config_round_trip():
    from dataclasses import asdict
    cfg = tiny_vlm("u").cfg
    assert VLMConfig.from_dict(asdict(cfg)) == cfg


# ----------------------------------------------------------------------------- KV cache and generation
from benchmarks.generate import KVCache, generate  # noqa: E402


def spread(model, std=0.5):
    """Larger random weights, so a tiny untrained model does not repeat one token forever (a weak test)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("arch", ["h", "u"])
def test_cached_decoding_equals_full_recompute(arch):
    # float64: the cached and the full pass multiply matrices of other shapes, so float32 sums differ in the last
    # bits (2.9e-5 on logits of ~10 on an AVX-512 CPU); in float64 they agree to ~1e-15, and generate's final cast
    # to float32 leaves them at most one float32 rounding (relative 1.2e-7) apart.
    model = spread(tiny_vlm(arch)).double()
    prompt = [model.image_tokens() + [T.BOS, 10, 11], model.image_tokens() + [T.BOS, 12, 13]]
    ids, images = torch.tensor(prompt), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fast, fast_logits = generate(model, ids, images, 12, eos_id=None, return_logits=True)
    slow, slow_logits = generate(model, ids, images, 12, eos_id=None, return_logits=True, use_cache=False)
    assert fast == slow and len(fast[0]) == 12
    assert len(set(fast[0])) > 2 and fast[0] != fast[1]  # the rows really decode different things
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-12, rtol=2.5e-7)
    # the same with the other row's image: the cache carries the image, not just the text
    other = generate(model, ids, images.flip(0), 12, eos_id=None)
    assert other != fast


def test_cache_fed_in_chunks_equals_one_pass():
    """Several new tokens after cached ones (causal with an offset), then single tokens."""
    torch.manual_seed(0)
    model = spread(Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))).double()
    ids = torch.randint(10, 64, (2, 10))
    full = model(ids)
    cache = KVCache(10)
    parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 8), (8, 9), (9, 10))]
    # float64 (other matmul shapes per chunk): logits of ~10 agree to ~1e-15; 1e-10 leaves a wide margin
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=1e-10)
    assert cache.pos == 10
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :1], cache=cache)


def test_sampling_is_reproducible_and_stops_at_eos():
    model = spread(tiny_vlm("h"))
    ids, images = torch.tensor([model.image_tokens() + [T.BOS, 10]]), torch.randn(1, 3, 16, 16)

    def sample(seed, **kw):
        return generate(model, ids, images, 15, temperature=1.0, top_k=20, eos_id=None,
                        generator=torch.Generator().manual_seed(seed), **kw)
    assert sample(0) == sample(0) != sample(1)
    assert sample(0) == sample(0, use_cache=False)
    greedy = generate(model, ids, images, 15, eos_id=None)
    assert generate(model, ids, images, 15, temperature=1.0, top_k=1, eos_id=None) == greedy
    stop = next(i for i in range(1, 15) if greedy[0][i] not in greedy[0][:i])
    assert generate(model, ids, images, 15, eos_id=greedy[0][stop]) == [greedy[0][:stop]]
    # special tokens other than eos are never drawn, even at a high temperature
    assert not any(t in (T.PAD, T.BOS, T.IMAGE, T.VISION, T.VISION_END, T.VROW) for t in sum(
        (generate(model, ids, images, 15, temperature=3.0, eos_id=None, generator=torch.Generator().manual_seed(s))[0]
         for s in range(5)), []))


# ----------------------------------------------------------------------------- timm encoders
import timm  # noqa: E402

from scale.timm_encoder import TimmEncoder, load_vision_weights

SMALL_VIT = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


def small_timm_vlm():
    torch.manual_seed(0)
    return VLM(VLMConfig(arch="h", vision="timm:vit_tiny_patch16_224", vision_kwargs=SMALL_VIT,
                         decoder=DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=64)))


def test_timm_encoder_gives_patch_tokens_with_its_own_normalisation():
    from data.images import normalize
    model = small_timm_vlm()
    assert model.cfg.image_size == 32 and model.cfg.patch_size == 8 and model.cfg.vit_dim == 32
    assert model.image_tokens() == [T.IMAGE] * 16  # 4 x 4 patches; the class token does not reach the LM
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    vit = model.encoder.model  # vit_tiny's own statistics are mean = std = 0.5, not ImageNet's
    expected = vit.forward_features((pixels.float() / 255 - 0.5) / 0.5)[:, vit.num_prefix_tokens:]
    torch.testing.assert_close(model.encoder.forward_features(normalize(pixels)), expected, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([model.image_tokens() + [T.BOS, 10]] * 2)
    assert model(ids, normalize(pixels)).shape == (2, 18, 64)


def test_timm_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no model 'vit_tiny_patch16_22'.*close matches: .*vit_tiny_patch16_224"):
        VLM(VLMConfig(vision="timm:vit_tiny_patch16_22"))
    with pytest.raises(ValueError, match="'timm:<model name>'"):
        VLM(VLMConfig(vision="vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="needs arch 'h'"):
        VLM(VLMConfig(arch="u", vision="timm:vit_tiny_patch16_224"))
    model = small_timm_vlm()
    with pytest.raises(FileNotFoundError, match="no vision weights file at .*nope.pt"):
        load_vision_weights(model.encoder, str(tmp_path / "nope.pt"))
    state = model.encoder.model.state_dict()
    bad = {k: v for k, v in state.items() if k != "pos_embed"}
    bad["extra.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"1 missing keys: pos_embed; 1 unexpected keys: extra.weight"):
        load_vision_weights(model.encoder, str(tmp_path / "bad.pt"))
    other = TimmEncoder("vit_tiny_patch16_224", {**SMALL_VIT, "img_size": 16})  # 2 x 2 patches
    torch.save(other.model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"wrong shapes: pos_embed \(file \(1, 5, 32\), model \(1, 17, 32\)\)"):
        load_vision_weights(model.encoder, str(tmp_path / "other.pt"))


def test_timm_weights_load_from_torch_save_and_safetensors(tmp_path):
    model, source = small_timm_vlm(), TimmEncoder("vit_tiny_patch16_224", SMALL_VIT)
    state = {**source.model.state_dict(), "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "w.pt")
    assert load_vision_weights(model.encoder, str(tmp_path / "w.pt")) == ["head.bias", "head.weight"]
    for k, v in source.model.state_dict().items():
        assert torch.equal(model.encoder.model.state_dict()[k], v), k
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    fresh = TimmEncoder("vit_tiny_patch16_224", SMALL_VIT)
    save_file({k: v.contiguous() for k, v in fresh.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    load_vision_weights(model.encoder, str(tmp_path / "w.safetensors"))
    assert torch.equal(model.encoder.model.pos_embed, fresh.model.pos_embed)


def test_rmsnorm_with_its_own_backward_equals_torch():
    from model import RMSNorm, RMSNormFn
    torch.manual_seed(0)
    for eps in (None, 1e-5):
        ours, ref = RMSNorm(32, eps=eps), torch.nn.RMSNorm(32, eps=eps)
        with torch.no_grad():
            ref.weight.normal_()
            ours.weight.copy_(ref.weight)
        x, g = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 5, 32)
        y = ours(x)
        assert y.grad_fn.name() == "RMSNormFnBackward"  # the hand-written backward is the one that runs
        got, want = torch.autograd.grad(y, (x, ours.weight), g), torch.autograd.grad(ref(x), (x, ref.weight), g)
        # float32, unit-scale values, sums of 32 terms: a few ulps of 1 (1.2e-7 each)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    x, w = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64,
                                                                                      requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6), (x, w))  # against finite differences


def test_rope_rotates_each_pair_and_depends_on_relative_position():
    from model import rope_tables, rotate
    cfg = DecoderConfig(d_model=32, n_head=2, max_seq_len=64)
    cos, sin = rope_tables(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)
    angles = torch.atan2(sin[:, 8:], cos[:, :8]).double()  # the angle of pair i at each position
    x1, x2 = q[..., :8], q[..., 8:]  # pair i is (x[i], x[i + 8]), as in Llama's rotate_half
    for p in (0, 5, 40):
        c, s = angles[p].cos(), angles[p].sin()
        want = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
        got = rotate(q.float(), cos[p].view(1, 1, 1, 16), sin[p].view(1, 1, 1, 16))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)  # float32 products of unit values
    dot = lambda m, n: (rotate(q.float(), cos[m], sin[m]) * rotate(k.float(), cos[n], sin[n])).sum().item()
    assert abs(dot(3, 1) - dot(12, 10)) < 1e-5 and abs(dot(3, 1) - dot(1, 3)) > 1e-3
