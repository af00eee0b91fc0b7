"""scale/hf.py against transformers' LlamaForCausalLM (a test-only reference): tiny random Llama folders written by
save_pretrained, loaded by our loader, same logits, same greedy continuation, same tokens."""
import json

import pytest
import torch

from data import tokenizer as T

transformers = pytest.importorskip("transformers")

from scale import hf  # noqa: E402
from benchmarks.generate import generate  # noqa: E402
from model import build_model

TEXT = ["a red circle by ann", "the blue square left of a green circle", "stock photo: a yellow square by bob"] * 5
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}  # d_head 16, theta 5e5: kept, blended and divided frequencies


def write_tokenizer(folder, n_reserved):
    """A byte-level BPE tokenizer.json laid out like Llama-3's: specials after the merges, bos/eos named in
    tokenizer_config.json, `n_reserved` <|reserved_special_token_N|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"]
                           + [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                              "eos_token": "<|end_of_text|>"}))
    return tok


def make_llama(folder, tied=False, kv_heads=2, scaling=SCALING, n_reserved=8, shard=None, legacy=False):
    """A random LlamaForCausalLM saved as a HF folder; returns (model, original tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(folder, n_reserved)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
                                   rope_scaling=scaling, tie_word_embeddings=tied, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a wrong epsilon or norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, max_shard_size=shard or "1GB")
    if legacy:  # the Hub's Llama files: rope_theta and rope_scaling, not transformers 5's rope_parameters
        c = json.loads((folder / "config.json").read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        (folder / "config.json").write_text(json.dumps(c))
    return model, tok


def ids_both(ours, orig, text):
    """The same text in the original tokenizer's ids and in the converted one's."""
    a, b = orig.encode(text).ids, ours.encode(text, add_special_tokens=False).ids
    return torch.tensor([a]), torch.tensor([b])


@pytest.mark.parametrize("tied,kv_heads,scaling,shard,legacy", [(False, 2, SCALING, "60KB", False),
                                                                (True, 4, None, None, True),
                                                                (True, 1, SCALING, None, True)])
def test_logits_match_transformers(tmp_path, tied, kv_heads, scaling, shard, legacy):
    ref, orig = make_llama(tmp_path, tied, kv_heads, scaling, shard=shard, legacy=legacy)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    decoder, tok = hf.load_hf_decoder(str(tmp_path))
    assert decoder.cfg.n_kv_head == kv_heads and (decoder.head.weight is decoder.embed.weight) == tied
    _, perm, _ = hf.convert_tokenizer(str(tmp_path))
    hf_ids, our_ids = ids_both(tok, orig, TEXT[1] + " " + TEXT[2])
    assert torch.equal(perm[our_ids], hf_ids)  # the same tokens, relabelled
    with torch.no_grad():
        want = ref(hf_ids).logits
        got = decoder(our_ids)
    assert got.shape == (1, hf_ids.shape[1], len(perm))
    torch.testing.assert_close(got[..., perm.argsort()], want, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_kv_cache(tmp_path):
    ref, orig = make_llama(tmp_path)
    decoder, tok = hf.load_hf_decoder(str(tmp_path))
    _, perm, _ = hf.convert_tokenizer(str(tmp_path))
    hf_ids, our_ids = ids_both(tok, orig, TEXT[0])
    want = ref.generate(hf_ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                        attention_mask=torch.ones_like(hf_ids))[0, hf_ids.shape[1]:]
    got = generate(decoder, our_ids, max_new_tokens=12, eos_id=None, banned=())
    assert perm[torch.tensor(got[0])].tolist() == want.tolist() and len(set(want.tolist())) > 2


def test_tokenizer_round_trip_and_fingerprint(tmp_path):
    _, orig = make_llama(tmp_path)
    tok = T.load_tokenizer(f"hf:{tmp_path}")
    assert [tok.token_to_id(s) for s in T.SPECIALS] == list(range(len(T.SPECIALS)))
    _, perm, n_new = hf.convert_tokenizer(str(tmp_path))
    assert n_new == 0 and tok.get_vocab_size() == orig.get_vocab_size()
    assert perm[T.BOS] == orig.token_to_id("<|begin_of_text|>") and perm[T.EOS] == orig.token_to_id("<|end_of_text|>")
    assert perm[T.IMAGE] == orig.token_to_id("<|reserved_special_token_1|>")  # pad took reserved 0
    for text in TEXT[:3] + ["unseen wörds <|image|> too"]:
        ids = T.encode_captions(tok, [text])[0]
        assert perm[torch.tensor(ids)].tolist() == orig.encode(text).ids
        assert tok.decode(ids) == text and T.IMAGE not in ids  # caption text is never a placeholder
    saved = tmp_path / "converted.json"
    tok.save(str(saved))
    assert T.fingerprint(T.load_tokenizer(str(saved))) == T.fingerprint(tok)
    assert T.fingerprint(T.load_tokenizer(f"hf:{tmp_path}")) == T.fingerprint(tok)


def test_too_few_reserved_tokens_grow_the_vocabulary(tmp_path):
    ref, orig = make_llama(tmp_path, n_reserved=2)
    decoder, tok = hf.load_hf_decoder(str(tmp_path))
    _, perm, n_new = hf.convert_tokenizer(str(tmp_path))
    V = orig.get_vocab_size()
    assert n_new == 3 and tok.get_vocab_size() == V + 3 == decoder.cfg.vocab_size
    assert sorted(perm[[T.IMAGE, T.VISION, T.VISION_END, T.VROW]].tolist())[1:] == [V, V + 1, V + 2]
    hf_ids, our_ids = ids_both(tok, orig, TEXT[2])
    with torch.no_grad():
        got, want = decoder(our_ids), ref(hf_ids).logits
    torch.testing.assert_close(got[..., perm.argsort()[:V]], want, atol=1e-5, rtol=1e-5)
    rows = decoder.embed.weight[perm.argsort()[V:]]
    torch.testing.assert_close(rows, ref.model.embed_tokens.weight.mean(0).expand(3, -1))


def test_features_matter(tmp_path):
    """The comparison above would catch a loader that ignored the epsilon or the RoPE scaling."""
    ref, orig = make_llama(tmp_path)
    decoder, tok = hf.load_hf_decoder(str(tmp_path))
    hf_ids, our_ids = ids_both(tok, orig, TEXT[1] * 3)
    for change in ({"norm_eps": None}, {"rope_scaling": None}):
        cfg = dict(vars(decoder.cfg), **change)
        other = type(decoder)(type(decoder.cfg)(**cfg))
        other.load_state_dict(decoder.state_dict())
        with torch.no_grad():
            assert (other(our_ids) - decoder(our_ids)).abs().max() > 1e-3, change


def test_clear_errors(tmp_path):
    make_llama(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def folder(name, **changes):
        d = tmp_path / name
        d.mkdir()
        for f in (tmp_path / "ok").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d

    with pytest.raises(ValueError, match="model_type 'mistral'"):
        hf.load_hf_decoder(str(folder("mistral", model_type="mistral")))
    with pytest.raises(ValueError, match="cannot express rope_scaling"):
        hf.load_hf_decoder(str(folder("yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})))
    d = folder("nohidden")
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="lacks hidden_size"):
        hf.load_hf_decoder(str(d))
    d = folder("sameboseos")
    same = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(same))
    with pytest.raises(ValueError, match="bos and eos are the same token"):
        hf.load_hf_decoder(str(d))
    with pytest.raises(ValueError, match="cannot express attention_bias"):
        hf.load_hf_decoder(str(folder("bias", attention_bias=True)))
    d = folder("notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        hf.load_hf_decoder(str(d))
    d = folder("noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_hf_decoder(str(d))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hf.load_hf_decoder(str(tmp_path / "nothing"))


def test_recipe_end_to_end_tiny(tmp_path, tiny):
    """The paper's recipe on a tiny Llama: reference LM from it trained on captions, scores, then an H-LVLM with
    frozen decoder and PRIOR loss; the decoder really is the folder's, and the U-LVLM starts from it too."""
    import reference_lm
    import score
    import train
    from utils import load_checkpoint
    make_llama(tmp_path / "llama")
    spec = f"hf:{tmp_path / 'llama'}"
    reference_lm.train_lm(reference_lm.RefConfig(data=str(tiny["ref"]), tokenizer=spec, init_decoder=spec,
                                                 out=str(tmp_path / "ref.pt"), row_len=64, batch_rows=4, steps=2,
                                                 eval_every=2, lr=1e-4, device="cpu"))
    score.main(score.ScoreConfig(ref=str(tmp_path / "ref.pt"), tokenizer=spec, data=str(tiny["train"]),
                                 out=str(tmp_path / "scores.pt"), row_len=128, device="cpu"))
    for arch, part in (("h", "projector"), ("u", "all")):
        out = tmp_path / f"run_{arch}"
        train.main(train.TrainConfig(data=str(tiny["train"]), tokenizer=spec, scores=str(tmp_path / "scores.pt"),
                                     out_dir=str(out), arch=arch, loss="prior", train=part, init_decoder=spec,
                                     image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2,
                                     batch_size=4, row_len=128, steps=1, save_every=1, device="cpu", lr=1e-4))
        state = load_checkpoint(out / "last.pt")["model"]
        decoder, _ = hf.load_hf_decoder(str(tmp_path / "llama"))
        same = torch.equal(state["decoder.blocks.0.attn.qkv.weight"], decoder.blocks[0].attn.qkv.weight)
        assert same == (part == "projector")  # frozen: exactly the folder's weights
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        build_model(train.TrainConfig(init_decoder=spec), T.load_tokenizer(str(tiny["tokenizer"])))


@pytest.mark.parametrize("n_reserved", [8, 2])
def test_export_round_trip(tmp_path, n_reserved):
    """A trained decoder written back as a HF folder: transformers reads it and computes the same logits."""
    from tokenizers import Tokenizer
    make_llama(tmp_path / "src", n_reserved=n_reserved)
    decoder, tok = hf.load_hf_decoder(str(tmp_path / "src"))
    _, perm, n_new = hf.convert_tokenizer(str(tmp_path / "src"))
    with torch.no_grad():  # "training": every weight moves, the new tokens' rows too
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    hf.export_hf(decoder, str(tmp_path / "src"), str(tmp_path / "out"))
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tok.encode(TEXT[1]).ids + [T.IMAGE, T.EOS]])
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids)[..., perm.argsort()], ref(perm[ids]).logits, atol=1e-5, rtol=1e-5)
    exported = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert exported.get_vocab_size() == len(perm)
    for i, name in enumerate(T.SPECIALS):  # grown: the new tokens are in the folder, under the project's names
        assert perm[i] < len(perm) - n_new or exported.token_to_id(name) == perm[i]
    _, perm2, n_new2 = hf.convert_tokenizer(str(tmp_path / "out"))
    assert torch.equal(perm2, perm) and n_new2 == 0  # loading the export again grows nothing
