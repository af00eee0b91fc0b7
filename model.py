"""The models: one decoder LM, and two vision-language models built on it.

    Decoder  pre-norm transformer (RMSNorm, RoPE, SwiGLU, fused QKV, F.scaled_dot_product_attention).
             The text-only reference LM, the base LM and both VLMs all use this one module.
    VLM(arch="h")  H-LVLM, LLaVA-style: ViT encoder (timm blocks) -> MLP projector -> decoder.
    VLM(arch="u")  U-LVLM, SOLO-style, encoder-free: 8x8 pixel patches -> one bias-free Linear -> decoder,
                   framed as <|vision|> (patch x cols, <|vrow|>) x rows <|/vision|>; positions come only from
                   the decoder's RoPE over the flat sequence.
    VLMConfig(vision="timm:<name>")  the H-LVLM with a ViT-style timm model as encoder (model.py), e.g. CLIP.
    load_model, load_lm  a train.py / reference_lm.py checkpoint back as a model (the config is inside).
    KVCache, generate  inference: decoding with cached keys/values, greedy or sampled (tools/caption.py).

Both VLMs splice image embeddings into the token sequence at the <|image|> placeholders, so packing,
masks and the loss never need to know which family runs. Sequences may be packed: `doc_ids` keeps attention
inside each document and `position_ids` restart at each document.
"""
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import tokenizer as T
from utils import UserError, check_fingerprint, load_checkpoint, pick_device, plugin


@dataclass
class DecoderConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    max_seq_len: int = 1024  # longest position RoPE tables are built for
    rope_theta: float = 10000.0
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * d_model, as in Llama (same FLOPs as a 4x GELU MLP)
    # The rest of the Llama family (scale/hf.py loads its checkpoints). The defaults are the project's own models.
    n_kv_head: int = 0        # grouped-query attention: key/value heads (each serves n_head / n_kv_head); 0 = n_head
    mlp_hidden: int = 0       # SwiGLU hidden width; 0 = mlp_ratio * d_model rounded up to a multiple of 64
    norm_eps: float = None    # RMSNorm epsilon (Llama: 1e-5 or 1e-6); None = the dtype's machine epsilon
    rope_scaling: dict = None  # Llama-3.1/3.2 RoPE frequency scaling: {"rope_type": "llama3", "factor", ...}
    tie_embeddings: bool = True  # the output head shares the embedding matrix


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_model // cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        if cfg.n_head % self.n_kv_head:
            raise ValueError(f"n_head {cfg.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        # q, k, v in one matmul instead of three: rows [q (n_head) | k (n_kv_head) | v (n_kv_head)] x d_head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * self.n_kv_head) * self.d_head, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, C = x.shape
        kv = self.n_kv_head * self.d_head
        q, k, v = self.qkv(x).split([C, kv, kv], dim=-1)
        q, k, v = (t.view(B, T, -1, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d_head)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:  # inference: the new tokens also attend to every cached earlier one
            k, v = cache.update(layer, k, v)
        gqa = self.n_kv_head != self.n_head  # grouped-query: each key/value head serves n_head / n_kv_head queries
        if mask is None and q.shape[2] == k.shape[2]:  # one document per row: the fast causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # mask None here: one new token after the cached ones, which may see all of them
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def rotate(x, cos, sin):
    """RoPE on (B, H, T, D), two passes: x * [cos, cos] + [x2, x1] * [-sin, sin] (rope_tables' rows), in float32."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.mlp_hidden or 64 * math.ceil(cfg.mlp_ratio * cfg.d_model / 64)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model, eps=cfg.norm_eps), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model, eps=cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg, self.grad_checkpoint = cfg, False  # grad_checkpoint: keep block inputs only, recompute in backward
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight  # tied: fewer parameters, better small LMs
        for name, table in zip(("cos", "sin"), rope_tables(cfg)):  # (max_seq_len, d_head) each
            self.register_buffer(name, table, persistent=False)
        self.apply(init_weights)
        for block in self.blocks:  # GPT-2's scaled init of residual projections keeps deep nets stable
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, input_ids=None, embeds=None, position_ids=None, doc_ids=None, mask=None, return_hidden=False,
                keep=None, cache=None):
        """Logits (B, T, V). Give `input_ids` or ready `embeds` (B, T, d). position_ids (B, T): RoPE positions, default
        0..T-1. doc_ids (B, T): tokens attend only to earlier tokens with the same doc id (packing); None means one
        document per row. mask (B, 1, T, T) bool: any other attention pattern (True = may attend), instead of doc_ids.
        return_hidden: the states before the final norm and head, for callers that need logits at a few positions only.
        keep (N,) long: flat indices into the B*T positions; logits (N, V) at those positions only. Training keeps the
        labelled positions: in a VLM batch most positions are image tokens, whose logits no loss reads, and the head
        plus its cross-entropy over a vocabulary-wide row is the most expensive per-position work there is. cache
        (KVCache, inference only): the tokens continue the ones already in the cache, at positions cache.pos.. (one
        document per row, so no doc_ids or mask); their keys and values are appended. With
        self.grad_checkpoint (--grad-checkpoint), training recomputes each block in backward instead of keeping it."""
        x = self.embed(input_ids) if embeds is None else embeds
        B, T, _ = x.shape
        start = 0
        if cache is not None:
            if doc_ids is not None or mask is not None:
                raise ValueError("the KV cache decodes one document per row: no doc_ids or mask")
            start = cache.pos
            if start and T > 1:  # several new tokens after cached ones: causal with the offset (True = may attend)
                mask = (torch.arange(start + T, device=x.device)
                        <= torch.arange(start, start + T, device=x.device)[:, None])
        if position_ids is None:  # checked on the host: no device sync
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"position {start + T - 1} >= max_seq_len {self.cfg.max_seq_len}")
            position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
        else:  # asserted on the device, without making the host wait (on a CPU it fails at once)
            torch._assert_async((position_ids < self.cfg.max_seq_len).all(),
                                f"a position >= max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)
        cp = self.grad_checkpoint and torch.is_grad_enabled() and cache is None  # same numbers, less memory
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, cos, sin, mask, use_reentrant=False) if cp else block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        if return_hidden:
            return x
        if keep is not None:
            x = x.flatten(0, 1).index_select(0, keep)
        return self.head(self.norm(x))


def rope_tables(cfg):
    """rotate's (max_seq_len, d_head) [cos, cos], [-sin, sin] of angles position x theta^(-2i/d_head)."""
    d_head = cfg.d_model // cfg.n_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d_head, 2).float() / d_head)
    if cfg.rope_scaling:
        inv_freq = llama3_rope_scaling(inv_freq, cfg.rope_scaling)
    angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
    return angles.cos().repeat(1, 2), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def llama3_rope_scaling(inv_freq, s):
    """Llama-3.1/3.2's longer context: frequencies whose wavelength exceeds the original context / low_freq_factor
    are divided by `factor`, those shorter than context / high_freq_factor are kept, and in between the two are
    blended linearly in (context / wavelength)."""
    if s.get("rope_type", s.get("type")) != "llama3":
        raise ValueError(f"rope_scaling {s}: only rope_type 'llama3' is supported")
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


@dataclass
class VLMConfig:
    arch: str = "h"           # "h": ViT -> projector -> decoder; "u": pixel patches -> Linear -> decoder
    image_size: int = 48
    patch_size: int = 8
    vit_dim: int = 192         # H-LVLM vision encoder (timm ViT blocks)
    vit_depth: int = 4
    vit_heads: int = 3
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # "" = the built-in ViT (build_vit); "timm:<name>" = that timm model (TimmEncoder). With a timm model,
    # image_size, patch_size and vit_* are read from it, so the config saved in a checkpoint describes it.
    vision: str = ""
    vision_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments, e.g. {"img_size": 336}

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["decoder"] = DecoderConfig(**d["decoder"])
        return VLMConfig(**d)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.arch not in ("h", "u"):
            raise ValueError(f"arch must be 'h' or 'u', got {cfg.arch!r}")
        if cfg.vision and cfg.arch != "h":
            raise ValueError(f"vision {cfg.vision!r} needs arch 'h' (the encoder-free U-LVLM has no encoder)")
        if cfg.arch == "h":
            self.encoder = build_encoder(cfg)
            if cfg.vision:  # image size, patches and width come from the timm model
                e = self.encoder
                cfg = replace(cfg, image_size=e.image_size, patch_size=e.patch_size, vit_dim=e.dim,
                              vit_depth=e.depth, vit_heads=e.heads)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        d = cfg.decoder.d_model
        if cfg.arch == "h":
            # LLaVA's "mlp2x_gelu" projector.
            self.projector = nn.Sequential(nn.Linear(cfg.vit_dim, d), nn.GELU(), nn.Linear(d, d))
        else:
            self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, d, bias=False)
            init_weights(self.patch_embed)
        self.decoder = Decoder(cfg.decoder)

    def image_tokens(self):
        """The token ids one image occupies in a sequence; each <|image|> receives one image embedding."""
        if self.cfg.arch == "h":
            return [T.IMAGE] * self.grid ** 2
        return [T.VISION] + ([T.IMAGE] * self.grid + [T.VROW]) * self.grid + [T.VISION_END]

    def embed_images(self, images):
        """(N, 3, S, S) normalised pixels -> (N, grid*grid, d) embeddings in row-major patch order. H-LVLM: or
        (N, grid*grid, vit_dim) encoder features computed beforehand (scale.features: the frozen encoder's)."""
        if self.cfg.arch == "h":
            if images.dim() == 4 and any(p.requires_grad for p in self.encoder.parameters()):
                images = self.encoder.forward_features(images)
            elif images.dim() == 4:
                with torch.no_grad():  # frozen encoder (--train projector): no autograd state for it
                    images = self.encoder.forward_features(images)
            return self.projector(images)
        p = self.cfg.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)                  # N, 3, g, g, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # N, g*g, 3*p*p
        return self.patch_embed(patches)

    def forward(self, input_ids, images=None, position_ids=None, doc_ids=None, image_embeds=None, **kw):
        """Logits (B, T, V). `images` holds one image per <|image|> block, in the order blocks appear in
        input_ids read row by row (the packer builds it that way); or pass ready `image_embeds` from
        embed_images. Other keywords (mask, return_hidden, keep, cache) go to Decoder.forward."""
        embeds = self.decoder.embed(input_ids)
        # Whether there are images is read from the inputs (shapes the host knows), not from input_ids on the
        # device: no device sync, and one graph under torch.compile. Given images must fill the slots exactly.
        if image_embeds is None and images is not None and images.shape[0] > 0:
            image_embeds = self.embed_images(images)
        if image_embeds is not None and image_embeds.shape[0] > 0:
            slots = input_ids == T.IMAGE
            n = image_embeds.shape[0] * image_embeds.shape[1]
            torch._assert_async(slots.sum() == n, f"the <|image|> slots do not match {image_embeds.shape[0]} "
                                                  f"images x {image_embeds.shape[1]} embeddings")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return self.decoder(embeds=embeds, position_ids=position_ids, doc_ids=doc_ids, **kw)

    def parts(self):
        """Named parameter groups, for freezing: the paper trains only the projector of the H-LVLM."""
        if self.cfg.arch == "h":
            return {"encoder": self.encoder, "projector": self.projector, "decoder": self.decoder}
        return {"projector": self.patch_embed, "decoder": self.decoder}


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def load_model(path, device="cpu"):
    """A VLM rebuilt from a train.py checkpoint alone (config inside), plus the checkpoint dict. Auxiliary
    heads (--objective: itm, itc, recon) are left out; they stay in ckpt["model"] under aux.*."""
    ckpt = load_checkpoint(path, "vlm")
    model = VLM(VLMConfig.from_dict(ckpt["model_config"]))
    # Heads of an --objective run (keys aux.*) are training-only: evaluation and captioning use the VLM alone.
    model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("aux.")})
    return model.to(device).eval(), ckpt


def load_lm(path, tok=None):
    """Decoder from a reference_lm.py checkpoint; checks the tokenizer fingerprint when `tok` is given."""
    ckpt = load_checkpoint(path, "lm")
    if tok is not None:
        check_fingerprint("tokenizer", ckpt["tokenizer"], T.fingerprint(tok), path, "the tokenizer in use")
    model = Decoder(DecoderConfig(**ckpt["decoder_config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


SPECIAL_NOT_EOS = (T.PAD, T.BOS, T.IMAGE, T.VISION, T.VISION_END, T.VROW)


class KVCache:
    """Keys and values of every decoder layer for the positions decoded so far (inference only): each new
    token then costs one position's work instead of re-reading the whole sequence. All rows of a batch are
    at the same position (no padding). Allocated at the first write, in the dtype attention produces (bf16
    under autocast), for at most max_len positions."""

    def __init__(self, max_len):
        self.max_len, self.pos, self.k, self.v = max_len, 0, [], []

    def update(self, layer, k, v):
        """Write (B, H, T, D) keys and values at positions pos..pos+T-1 of `layer`; return those of 0..pos+T-1.
        Decoder.forward advances pos once all layers have written."""
        if layer == len(self.k):
            B, H, _, D = k.shape
            self.k.append(k.new_empty(B, H, self.max_len, D))
            self.v.append(v.new_empty(B, H, self.max_len, D))
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions, room for {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sample_next(logits, temperature=0.0, top_k=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V): argmax for temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (None or 0: all)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, input_ids, images=None, max_new_tokens=40, temperature=0.0, top_k=None, eos_id=T.EOS,
             generator=None, use_cache=True, return_logits=False, banned=SPECIAL_NOT_EOS):
    """Continue input_ids (B, T) with a VLM (images: one per image block, as in VLM.forward) or a Decoder.

    Greedy for temperature 0, else sampled (sample_next; `generator` makes draws reproducible). A row stops
    at eos_id (None: never); decoding stops when every row has, after max_new_tokens, or at the model's
    max_seq_len. `banned` ids are never chosen: by default the special tokens other than eos, which training
    never labels (an <|image|> drawn by chance would ask for an image that is not there). Returns a list of B
    lists of new token ids, without the eos; with return_logits also the
    (B, steps, V) float logits each step was drawn from. use_cache=False re-runs the whole sequence every step:
    the slow reference the cache is tested against."""
    model.eval()
    decoder = model.decoder if isinstance(model, VLM) else model
    B, n = input_ids.shape
    steps = min(max_new_tokens, decoder.cfg.max_seq_len - n)
    if steps < 0 or n == 0:
        raise ValueError(f"{n} input tokens; the model takes 1 to {decoder.cfg.max_seq_len}")

    def run(ids, images=None, **kw):  # logits at each row's last position
        keep = torch.arange(1, ids.shape[0] + 1, device=ids.device) * ids.shape[1] - 1
        if isinstance(model, VLM):
            return model(ids, images, keep=keep, **kw).float()
        return model(ids, keep=keep, **kw).float()

    cache = KVCache(n + steps) if use_cache else None
    ban = torch.tensor(list(banned or ()), dtype=torch.long, device=input_ids.device)
    seq, new, all_logits = input_ids, [], []
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = run(input_ids, images, cache=cache)  # the prompt (image included) in one pass
    for step in range(steps):
        allowed = logits.index_fill(1, ban, float("-inf")) if len(ban) else logits
        token = sample_next(allowed, temperature, top_k, generator)
        if eos_id is not None:
            token = torch.where(done, eos_id, token)  # finished rows keep emitting eos, ignored below
            done |= token == eos_id
        new.append(token)
        all_logits.append(logits)
        if bool(done.all()) or step == steps - 1:
            break
        if use_cache:  # images are in the cache already: only the new token runs
            logits = run(token[:, None], cache=cache)
        else:
            seq = torch.cat([seq, token[:, None]], dim=1)
            logits = run(seq, images)
    out = torch.stack(new, 1).tolist() if new else [[] for _ in range(B)]
    if eos_id is not None:
        out = [row[:row.index(eos_id)] if eos_id in row else row for row in out]
    if return_logits:
        return out, torch.stack(all_logits, 1) if all_logits else torch.empty(B, 0, decoder.cfg.vocab_size)
    return out


# ---- norm ----------------------------------------------------------------------------------------------------------
# RMSNorm with a hand-written backward for the CPU (model.Decoder's norms).
#
# torch's rms_norm on the CPU is not a kernel but a chain of elementwise ops (pow, mean, rsqrt, mul, mul), and its
# autograd backward walks that chain again op by op. RMSNormFn does the same arithmetic in fewer passes over the
# activations: the sum of squares as one dot product, the normalised x kept for the backward, and the backward's
# three terms in two fused ops. On CUDA (where torch's fused kernel is real) and in other dtypes nn.RMSNorm runs
# unchanged. tests/test_model.py checks outputs and gradients against nn.RMSNorm; docs/performance.md has the timing.


class RMSNormFn(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1] + eps)
        xhat = x * r
        ctx.save_for_backward(xhat, w, r)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, w, r = ctx.saved_tensors
        gw = (g * xhat).reshape(-1, g.shape[-1]).sum(0)
        gxhat = g * w
        # d/dx of x * r: r * (g' - xhat * mean(g' * xhat)), with g' = g * w the gradient reaching xhat
        m = torch.linalg.vecdot(gxhat, xhat).unsqueeze(-1) / g.shape[-1]
        return torch.addcmul(gxhat, xhat, m, value=-1).mul_(r), gw, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict); float32 on the CPU goes through RMSNormFn."""

    def forward(self, x):
        if x.is_cuda or x.dtype != torch.float32 or self.weight is None:
            return super().forward(x)
        return RMSNormFn.apply(x, self.weight, torch.finfo(x.dtype).eps if self.eps is None else self.eps)


# ---- encoders ------------------------------------------------------------------------------------------------------
# The H-LVLM's vision encoder: the built-in ViT from timm's blocks; a pretrained ViT-style timm model (CLIP), with
# its weights from a local file, comes from scale/timm_encoder.py (plug-ins "timm_encoder", "vision_weights").


def build_vit(cfg):
    """The H-LVLM's vision encoder from timm's ViT blocks. Patch tokens only (no class token, no pooling):
    `forward_features` gives one embedding per patch, which is what reaches the LM."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_dim,
                             depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="",
                             class_token=False)


def build_encoder(cfg):
    """The H-LVLM encoder cfg asks for: build_vit, or a TimmEncoder for vision='timm:<name>'."""
    if not cfg.vision:
        return build_vit(cfg)
    if not cfg.vision.startswith("timm:") or not cfg.vision[5:]:
        raise ValueError(f"vision must be '' (the built-in ViT) or 'timm:<model name>', got {cfg.vision!r}")
    return plugin("timm_encoder", "--vision timm:<name>")(cfg.vision[5:], cfg.vision_kwargs)


# ---- build ---------------------------------------------------------------------------------------------------------
# The VLM a training config asks for, built and initialised: from scratch, from a base LM (reference_lm.py or
# hf:FOLDER), a tools/vision.py ViT or a timm model with local weights, or a whole train.py checkpoint or exported
# folder (--init-from; scale/export.py). train.py, bench.py and the tests build their models here.
#
#     read_vlm(path), load_vlm(path)  a train.py checkpoint or an exported folder: the checkpoint dict / (model, dict)
#     frozen_to_bf16(model, device)   --train projector on CUDA: the frozen encoder and decoder held in bf16


def read_vlm(path, flag=""):
    """A train.py checkpoint's dict (model, model_config, config, tokenizer, ...); a folder is an exported VLM, which
    scale/export.py reads (plug-in vlm_folder)."""
    if os.path.isdir(path):
        return plugin("vlm_folder", flag or path)(path, flag)
    return load_checkpoint(path, "vlm", flag)


def load_vlm(path, device="cpu"):
    """(model, checkpoint dict) like model.load_model, for a .pt checkpoint or an exported folder (eval.py)."""
    if not os.path.isdir(path):
        return load_model(path, device)
    ckpt = read_vlm(path)
    model = VLM(VLMConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def frozen_to_bf16(model, device):
    """Cast the frozen parameters (requires_grad False: the encoder and decoder under --train projector) to bf16 on
    CUDA, halving their memory; under bf16 autocast their matmuls ran in bf16 anyway, and the frozen decoder's
    residual stream now does too (as LLaVA runs it). Trainable ones stay fp32 for AdamW. Nothing on a CPU, where
    training runs in fp32. Returns the names cast."""
    if not str(device).startswith("cuda"):
        return []
    names = [n for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()]
    for n, p in model.named_parameters():
        if n in names:
            p.data = p.data.to(torch.bfloat16)
    return names


def build_model(cfg, tok, extra=None):
    """The VLM described by cfg, with the decoder/encoder/whole model initialised as cfg asks; `extra`, a lab
    method's hook (train.py), attaches its heads."""
    dcfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         d_model=cfg.d_model, max_seq_len=cfg.row_len)
    base = enc = start = None
    if cfg.init_decoder:
        base = load_checkpoint(cfg.init_decoder, "lm", "--init-decoder")  # hf:FOLDER: scale/hf.py
        check_fingerprint("tokenizer", base["tokenizer"], T.fingerprint(tok), cfg.init_decoder, cfg.tokenizer)
        dcfg = DecoderConfig(**{**base["decoder_config"],
                                "max_seq_len": max(cfg.row_len, base["decoder_config"]["max_seq_len"])})
    if cfg.vision and cfg.init_encoder:
        raise UserError("--vision (a timm encoder) and --init-encoder (a tools/vision.py ViT) are two encoders: "
                         "give one")
    if cfg.vision_weights and not cfg.vision:
        raise UserError("--vision-weights needs --vision timm:<name>, the model the weights belong to")
    if getattr(cfg, "vision_layer", 0) and not cfg.vision:
        raise UserError("--vision-layer needs --vision timm:<name> (the built-in ViT gives its last layer)")
    if cfg.vision_weights and cfg.init_from:
        raise UserError("--init-from already holds the encoder's weights: drop --vision-weights")
    try:
        vision_kwargs = json.loads(cfg.vision_kwargs) if cfg.vision_kwargs else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--vision-kwargs is not JSON ({e}): {cfg.vision_kwargs!r}") from None
    if getattr(cfg, "vision_layer", 0):  # kept with the kwargs, so the checkpoint's model_config rebuilds it
        vision_kwargs["vision_layer"] = cfg.vision_layer
    vcfg = VLMConfig(arch=cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size, vit_dim=cfg.vit_dim,
                     vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads, decoder=dcfg, vision=cfg.vision,
                     vision_kwargs=vision_kwargs)
    if cfg.init_encoder:
        enc = load_checkpoint(cfg.init_encoder, "vit", "--init-encoder")
        e = enc["vit_config"]
        vcfg.image_size, vcfg.patch_size = e["image_size"], e["patch_size"]
        vcfg.vit_dim, vcfg.vit_depth, vcfg.vit_heads = e["vit_dim"], e["vit_depth"], e["vit_heads"]
    if cfg.init_from:
        start = read_vlm(cfg.init_from, "--init-from")
        check_fingerprint("tokenizer", start["tokenizer"], T.fingerprint(tok), cfg.init_from, cfg.tokenizer)
        vcfg = VLMConfig.from_dict(start["model_config"])
        if vcfg.arch != cfg.arch:  # the run would train one family and label it the other
            raise UserError(f"--init-from {cfg.init_from} is a {vcfg.arch.upper()}-LVLM, but --arch is {cfg.arch}: "
                             f"give --arch {vcfg.arch}, or another --init-from")
    model = VLM(vcfg)
    if base is not None:
        model.decoder.load_state_dict(base["model"])
    if enc is not None:
        model.encoder.load_state_dict(enc["model"])
    if cfg.vision_weights:
        plugin("vision_weights", "--vision-weights")(model.encoder, cfg.vision_weights)
    elif cfg.vision and not cfg.init_from:
        print(f"warning: no --vision-weights: the {cfg.vision} encoder starts from random weights", file=sys.stderr)
    if start is not None:  # heads of an --objective run (aux.*) are not part of the VLM
        model.load_state_dict({k: v for k, v in start["model"].items() if not k.startswith("aux.")})
    if cfg.train == "projector":
        for name, part in model.parts().items():
            part.requires_grad_(name == "projector")
    if extra is not None:  # after everything else, and trained even with --train projector
        extra.attach(model, start)
    model.decoder.grad_checkpoint = getattr(cfg, "grad_checkpoint", False)
    if cfg.train == "projector" and not cfg.fsdp:  # FSDP2 wants one dtype per sharding unit: fp32 there
        frozen_to_bf16(model, pick_device(cfg.device))
    return model
