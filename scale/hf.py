"""Start from a pretrained Llama-family LM: a local Hugging Face checkpoint folder -> (Decoder, tokenizer).

    decoder, tok = load_hf_decoder("/models/Llama-3.2-3B")   # config.json, *.safetensors, tokenizer.json
    python train.py --tokenizer hf:/models/Llama-3.2-3B --init-decoder hf:/models/Llama-3.2-3B ...
    # check a folder, keep its tokenizer:
    python -m scale.hf /models/Llama-3.2-3B --tokenizer-out out/llama_tokenizer.json

The folder is read as written by `save_pretrained` of a LlamaForCausalLM: config.json, model.safetensors or
shards listed in model.safetensors.index.json, tokenizer.json (and tokenizer_config.json for BOS/EOS). Nothing
is downloaded and transformers is never imported; weights are read with the `safetensors` package.

Token ids. The project's code uses fixed ids for its special tokens (tokenizer.SPECIALS: pad, bos, eos, image,
vision, /vision, vrow at ids 0..6). The model's own tokens are therefore *relabelled*: the model's BOS and EOS
and four of its reserved special tokens (Llama-3's <|reserved_special_token_N|>; pad takes one too) swap ids with
whatever held ids 0..6, and take the project's names. The embedding and output rows are permuted the same way,
so the relabelled model computes exactly what the original does. A tokenizer with too few reserved tokens gets
new ones at the end of the vocabulary; their embedding (and output) rows start at the mean of the others.
The converted tokenizer has no post-processor: the project adds BOS/EOS itself (data/packing.py).
"""
import json
import os
from dataclasses import dataclass

import torch

import scale.hf_tokenizer as hf_tokenizer
from utils import UserError, flag, positional, register, run
from data import tokenizer as T
from scale.hf_tokenizer import read_json
from model import Decoder, DecoderConfig, rope_tables

def decoder_config(path, max_seq_len=None):
    """DecoderConfig for the folder's config.json, or a one-line error naming what the Decoder cannot express."""
    c = read_json(os.path.join(path, "config.json"), "config.json")
    name = os.path.join(path, "config.json")
    if c.get("model_type") != "llama":
        raise ValueError(f"{name}: model_type {c.get('model_type')!r}; only 'llama' (LlamaForCausalLM) is supported")
    need = ["vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"]
    if any(k not in c for k in need):
        raise ValueError(f"{name}: lacks {', '.join(k for k in need if k not in c)}")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (needs 'silu')")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (the Decoder has no biases)")
    if c.get("head_dim") not in (None, d // heads) or d % heads:
        problems.append(f"head_dim {c.get('head_dim')} (needs hidden_size / num_attention_heads = {d / heads:g})")
    # RoPE: rope_theta and rope_scaling (the Hub's Llama files), or transformers 5's rope_parameters (both in one)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings")} if kind == "llama3" else None
    if kind not in ("default", "llama3"):
        problems.append(f"rope_scaling {rope} (only rope_type 'llama3' or none)")
    if problems:
        raise ValueError(f"{name}: the Decoder cannot express " + "; ".join(problems))
    return DecoderConfig(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads, d_model=d,
                         max_seq_len=max_seq_len or c.get("max_position_embeddings", 2048),
                         rope_theta=theta,
                         n_kv_head=c.get("num_key_value_heads") or heads, mlp_hidden=c["intermediate_size"],
                         norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_scaling=scaling,
                         tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def convert_tokenizer(path):
    """hf_tokenizer.convert_tokenizer with the project's special tokens: (tokenizer, perm, n_new)."""
    return hf_tokenizer.convert_tokenizer(path, T.SPECIALS)


def read_weights(path):
    """name -> tensor from model.safetensors or the shards its index lists (memory-mapped by safetensors)."""
    from safetensors.torch import load_file
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if not os.path.isfile(index):
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pth", ".pt"))]
        hint = f" (found {', '.join(sorted(other)[:3])}: re-save with safe_serialization=True)" if other else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    shards = sorted(set(read_json(index, "index")["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(path, shard)))
    return state


def convert_weights(hf, cfg):
    """Our Decoder's state dict from a LlamaForCausalLM one (q,k,v and gate,up fused; same layouts otherwise)."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"embed.weight": hf.pop("embed_tokens.weight"), "norm.weight": hf.pop("norm.weight")}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        a, m = [hf.pop(p + f"self_attn.{x}_proj.weight") for x in "qkvo"], [hf.pop(p + f"mlp.{x}_proj.weight")
                                                                            for x in ("gate", "up", "down")]
        out[f"blocks.{i}.attn.qkv.weight"], out[f"blocks.{i}.attn.proj.weight"] = torch.cat(a[:3]), a[3]
        out[f"blocks.{i}.mlp.gate_up.weight"], out[f"blocks.{i}.mlp.down.weight"] = torch.cat(m[:2]), m[2]
        out[f"blocks.{i}.norm1.weight"] = hf.pop(p + "input_layernorm.weight")
        out[f"blocks.{i}.norm2.weight"] = hf.pop(p + "post_attention_layernorm.weight")
    head = hf.pop("lm_head.weight", None)
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old files keep the RoPE table
    if hf:
        raise ValueError(f"unexpected weights for a {cfg.n_layer}-layer Llama: {', '.join(sorted(hf)[:5])}")
    if not cfg.tie_embeddings:
        if head is None:
            raise ValueError("tie_word_embeddings is false but there is no lm_head.weight")
        out["head.weight"] = head
    return out


def load_hf_decoder(path, dtype=torch.float32, max_seq_len=None):
    """(Decoder, tokenizer) from a local Llama checkpoint folder; decoder(input_ids) gives logits (B, T, V) in the
    converted tokenizer's ids (see the module docstring). dtype: of the weights (float32 = what train.py trains;
    bfloat16 halves memory). max_seq_len: the RoPE tables' length (default: max_position_embeddings)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a folder; expected a Hugging Face checkpoint folder")
    cfg = decoder_config(path, max_seq_len)
    tok, perm, n_new = convert_tokenizer(path)
    try:
        state = convert_weights(read_weights(path), cfg)
    except KeyError as e:
        raise ValueError(f"{path}: weight {e.args[0]} is missing for a {cfg.n_layer}-layer Llama") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for key in ("embed.weight", "head.weight"):  # new special tokens, then the project's id order
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(n_new, -1)])[perm]
    cfg.vocab_size = len(perm)
    with torch.device("meta"):  # no random initialisation of billions of weights that are replaced at once
        decoder = Decoder(cfg)
    state = {k: v.to(dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    decoder.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        decoder.head.weight = decoder.embed.weight
    decoder.cos, decoder.sin = rope_tables(cfg)
    return decoder, tok


def export_hf(decoder, source, out):
    """Write `decoder` (loaded from the folder `source`, then trained) as a Hugging Face folder `out`: source's
    config and tokenizer files, the weights back in the model's own token order. New special tokens (a grown
    vocabulary) stay at the end, under the project's names; Llama's loaders read the folder as any other."""
    import shutil
    from safetensors.torch import save_file
    _, perm, n_new = convert_tokenizer(source)
    if decoder.cfg.vocab_size != len(perm):
        raise ValueError(f"the decoder has {decoder.cfg.vocab_size} tokens, {source}'s tokenizer {len(perm)}")
    order = perm.argsort()  # original id -> our row
    sd = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    state = {"model.embed_tokens.weight": sd["embed.weight"][order], "model.norm.weight": sd["norm.weight"]}
    if not decoder.cfg.tie_embeddings:
        state["lm_head.weight"] = sd["head.weight"][order]
    kv = decoder.blocks[0].attn.n_kv_head * decoder.blocks[0].attn.d_head if decoder.blocks else 0
    for i in range(decoder.cfg.n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split([decoder.cfg.d_model, kv, kv])
        gate, up = sd[b + "mlp.gate_up.weight"].chunk(2)
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": sd[b + "attn.proj.weight"],
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": sd[b + "mlp.down.weight"],
                      p + "input_layernorm.weight": sd[b + "norm1.weight"],
                      p + "post_attention_layernorm.weight": sd[b + "norm2.weight"]})
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out, name))
    config = read_json(os.path.join(source, "config.json"), "config.json")
    config["vocab_size"] = len(perm)
    if n_new:  # the grown vocabulary's tokens, as added special tokens at the ids the weights give them
        data = read_json(os.path.join(out, "tokenizer.json"), "tokenizer.json")
        names = {int(perm[i]): name for i, name in enumerate(T.SPECIALS) if perm[i] >= len(perm) - n_new}
        data["added_tokens"] += [{"id": i, "content": names[i], "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True} for i in sorted(names)]
        with open(os.path.join(out, "tokenizer.json"), "w") as f:
            json.dump(data, f, ensure_ascii=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_checkpoint(ckpt_path, source, out):
    """scale/hf.py --export: the decoder of a reference_lm.py or train.py checkpoint (started from `source`) ->
    `out`."""
    from model import VLMConfig
    from utils import load_checkpoint
    if not out:
        raise UserError("--export needs --out, the folder to write")
    try:
        ckpt = load_checkpoint(ckpt_path)
        if "decoder_config" in ckpt:  # reference_lm.py
            cfg, state = DecoderConfig(**ckpt["decoder_config"]), ckpt["model"]
        else:  # train.py: the VLM's decoder
            cfg = VLMConfig.from_dict(ckpt["model_config"]).decoder
            state = {k[len("decoder."):]: v for k, v in ckpt["model"].items() if k.startswith("decoder.")}
        decoder = Decoder(cfg)
        decoder.load_state_dict(state)
        export_hf(decoder, source, out)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{ckpt_path}: {type(e).__name__}: {e}") from None
    print(f"wrote {out} (the decoder of {ckpt_path}, config and tokenizer from {source})")


@register("hf_checkpoint")
def base_checkpoint(spec, kind=None, flag=""):
    """"hf:FOLDER" (what --init-decoder may name) as a reference_lm.py checkpoint dict (model, decoder_config,
    tokenizer fingerprint), the folder's weights converted to float32: what utils.load_checkpoint gives for it."""
    from dataclasses import asdict
    decoder, tok = load_hf_decoder(spec[3:])
    return {"model": decoder.state_dict(), "decoder_config": asdict(decoder.cfg), "tokenizer": T.fingerprint(tok)}


@dataclass
class HfConfig:
    path: str = positional("Hugging Face Llama checkpoint folder (config.json, safetensors, tokenizer.json)")
    tokenizer_out: str = flag("", "write the converted tokenizer.json here")
    export: str = flag("", "train.py or reference_lm.py checkpoint: write its decoder out")
    out: str = flag("", "--export: the folder to write (path = the folder the decoder came from)")


def check_folder(cfg):
    """`python -m scale.hf FOLDER`: load it, say what it holds, keep its converted tokenizer (or --export)."""
    if cfg.export:
        return export_checkpoint(cfg.export, cfg.path, cfg.out)
    try:
        decoder, tok = load_hf_decoder(cfg.path, dtype=torch.bfloat16, max_seq_len=1)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    n = sum(p.numel() for p in decoder.parameters())
    print(f"{cfg.path}: {n / 1e6:,.1f}M parameters, {decoder.cfg}; tokenizer {T.fingerprint(tok)}, "
          f"{tok.get_vocab_size()} tokens")
    if cfg.tokenizer_out:
        tok.save(cfg.tokenizer_out)
        print(f"saved {cfg.tokenizer_out}")


def main(argv=None):
    return run(check_folder, HfConfig, argv, description=__doc__)


if __name__ == "__main__":
    main()
