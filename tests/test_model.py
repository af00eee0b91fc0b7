import pytest
import torch

import tokenizer as T
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
    with pytest.raises(ValueError, match="slots"):
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
