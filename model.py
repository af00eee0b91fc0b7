"""The models: one decoder (RMSNorm, RoPE, SwiGLU, fused QKV, SDPA) for the reference LM, the base LM and both
vision-language models: the H-LVLM (LLaVA-style: ViT encoder -> MLP projector -> decoder) and the encoder-free U-LVLM
(SOLO-style: pixel patches -> one bias-free Linear -> decoder, positions only from the decoder's RoPE).

Both VLMs splice image embeddings into the token sequence at the <|image|> placeholders, so packing, masks and the
loss never need to know which family runs. Text generation with a KV cache: benchmarks/generate.py.
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
        # No mask: one document per row, the fast causal kernel; or, after cached keys, one new token that sees them all
        causal = mask is None and q.shape[2] == k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
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
        """Logits (B, T, V) of `input_ids` or `embeds` (B, T, d). position_ids (B, T): default 0..T-1, restarting at
        each document when packed. doc_ids (B, T): tokens attend only to earlier ones of the same document (packing);
        None: one document per row. mask (B, 1, T, T) bool (True = may attend): any other pattern. return_hidden: the
        states before the final norm. keep (N,): flat indices into B*T, logits (N, V) there only: most positions of a
        VLM batch are image tokens no loss reads, and the vocabulary-wide head is the costliest per-position work.
        cache (benchmarks/generate.py): the tokens continue the cached ones, whose keys and values it keeps."""
        x = self.embed(input_ids) if embeds is None else embeds
        B, T, _ = x.shape
        if cache is not None and (doc_ids is not None or mask is not None):
            raise ValueError("the KV cache decodes one document per row: no doc_ids or mask")
        start = cache.pos if cache is not None else 0
        if start and T > 1:  # several new tokens after cached ones: causal with the offset (True = may attend)
            mask = torch.arange(start + T, device=x.device) <= torch.arange(start, start + T, device=x.device)[:, None]
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
    if s := cfg.rope_scaling:  # Llama 3.1/3.2's longer context: wavelengths over context / low_freq_factor are
        # divided by `factor`, those under context / high_freq_factor kept, in between blended in context / wavelength
        if s.get("rope_type", s.get("type")) != "llama3":
            raise ValueError(f"rope_scaling {s}: only rope_type 'llama3' is supported")
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        blend = ((s["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - blend) * inv_freq / factor + blend * inv_freq
    angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
    return angles.cos().repeat(1, 2), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


# Why a hand-written backward: on the CPU torch's rms_norm is a chain of elementwise ops whose autograd backward walks
# it again op by op; RMSNormFn needs fewer passes (the sum of squares as one dot product, the normalised x kept, the
# backward's three terms in two fused ops). CUDA (a real fused kernel) and other dtypes keep nn.RMSNorm.
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


@dataclass
class VLMConfig:
    arch: str = "h"           # "h": ViT -> projector -> decoder; "u": pixel patches -> Linear -> decoder
    image_size: int = 48
    patch_size: int = 8
    vit_dim: int = 192         # H-LVLM vision encoder (timm ViT blocks)
    vit_depth: int = 4
    vit_heads: int = 3
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # "" = the built-in ViT (build_vit); "timm:<name>" = that timm model (scale/timm_encoder.py, local weights).
    # With a timm model, image_size, patch_size and vit_* are read from it, so a checkpoint's config describes it.
    vision: str = ""
    vision_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments, e.g. {"img_size": 336}
    # H-LVLM: image tokens the projector makes from each patch. 1 is LLaVA's; k > 1 gives the frozen LM k slots per
    # patch, so one need not carry an object's colour, shape and size at once (docs/experiment.md)
    tokens_per_patch: int = 1

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["decoder"] = DecoderConfig(**d["decoder"])
        return VLMConfig(**d)


def build_vit(cfg):
    """The H-LVLM's encoder of timm's ViT blocks: no class token, no pooling; one embedding per patch reaches the LM."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_dim,
                             depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="",
                             class_token=False)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.arch not in ("h", "u"):
            raise ValueError(f"arch must be 'h' or 'u', got {cfg.arch!r}")
        if cfg.vision and cfg.arch != "h":
            raise ValueError(f"vision {cfg.vision!r} needs arch 'h' (the encoder-free U-LVLM has no encoder)")
        if cfg.vision:
            if not cfg.vision.startswith("timm:") or not cfg.vision[5:]:
                raise ValueError(f"vision must be '' (the built-in ViT) or 'timm:<model name>', got {cfg.vision!r}")
            e = self.encoder = plugin("timm_encoder", "--vision timm:<name>")(cfg.vision[5:], cfg.vision_kwargs)
            cfg = replace(cfg, image_size=e.image_size, patch_size=e.patch_size, vit_dim=e.dim,
                          vit_depth=e.depth, vit_heads=e.heads)
        elif cfg.arch == "h":
            self.encoder = build_vit(cfg)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.tokens_per_patch < 1 or (cfg.tokens_per_patch > 1 and cfg.arch != "h"):
            raise ValueError(f"tokens_per_patch {cfg.tokens_per_patch}: 1, or more with arch 'h'")
        self.cfg, self.grid = cfg, cfg.image_size // cfg.patch_size
        d = cfg.decoder.d_model
        if cfg.arch == "h":  # LLaVA's "mlp2x_gelu" projector, k embeddings out per patch
            self.projector = nn.Sequential(nn.Linear(cfg.vit_dim, d), nn.GELU(),
                                           nn.Linear(d, d * cfg.tokens_per_patch))
        else:
            self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, d, bias=False)
            init_weights(self.patch_embed)
        self.decoder = Decoder(cfg.decoder)

    def image_tokens(self):
        """The token ids one image occupies in a sequence; each <|image|> receives one image embedding."""
        if self.cfg.arch == "h":
            return [T.IMAGE] * self.grid ** 2 * self.cfg.tokens_per_patch
        return [T.VISION] + ([T.IMAGE] * self.grid + [T.VROW]) * self.grid + [T.VISION_END]

    def embed_images(self, images):
        """(N, 3, S, S) normalised pixels -> (N, grid*grid, d) embeddings in row-major patch order. H-LVLM: or
        (N, grid*grid, vit_dim) encoder features computed beforehand (scale.features: the frozen encoder's)."""
        if self.cfg.arch == "h":
            if images.dim() == 4:  # a frozen encoder (--train projector) runs without autograd state
                trainable = any(p.requires_grad for p in self.encoder.parameters())
                with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                    images = self.encoder.forward_features(images)
            out = self.projector(images)  # (N, P, k * d) -> (N, P * k, d): a patch's k tokens side by side
            return out.view(out.shape[0], -1, self.cfg.decoder.d_model)
        p = self.cfg.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)                  # N, 3, g, g, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # N, g*g, 3*p*p
        return self.patch_embed(patches)

    def forward(self, input_ids, images=None, position_ids=None, doc_ids=None, image_embeds=None, **kw):
        """Logits (B, T, V). `images` holds one image per <|image|> block, in the order blocks appear in
        input_ids read row by row (the packer builds it that way); or pass ready `image_embeds` from
        embed_images. Other keywords (mask, return_hidden, keep, cache) go to Decoder.forward."""
        embeds = self.decoder.embed(input_ids)
        # Images are told by the inputs' shapes, not by input_ids on the device: no sync, one graph under torch.compile
        if image_embeds is None and images is not None and images.shape[0] > 0:
            image_embeds = self.embed_images(images)
        if image_embeds is not None and image_embeds.shape[0] > 0:
            slots = input_ids == T.IMAGE
            n, k = image_embeds.shape[:2]
            torch._assert_async(slots.sum() == n * k, f"the <|image|> slots do not match {n} images x {k} embeddings")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return self.decoder(embeds=embeds, position_ids=position_ids, doc_ids=doc_ids, **kw)

    def parts(self):
        """Named parameter groups, for freezing: the paper trains only the projector of the H-LVLM."""
        if self.cfg.arch == "h":
            return {"encoder": self.encoder, "projector": self.projector, "decoder": self.decoder}
        return {"projector": self.patch_embed, "decoder": self.decoder}


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def read_vlm(path, flag=""):
    """A train.py checkpoint's dict; or an exported VLM's folder, which scale/export.py reads (plug-in vlm_folder)."""
    if os.path.isdir(path):
        return plugin("vlm_folder", flag or path)(path, flag)
    return load_checkpoint(path, "vlm", flag)


def load_model(path, device="cpu"):
    """(VLM, checkpoint dict) from a train.py checkpoint or an exported folder (read_vlm). Heads of an --objective
    run (keys aux.*) are training-only: left out of the model (evaluation and captioning), kept in ckpt["model"]."""
    ckpt = read_vlm(path)
    model = VLM(VLMConfig.from_dict(ckpt["model_config"]))
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


def frozen_to_bf16(model, device):
    """The frozen parameters (--train projector) cast to bf16 on CUDA, at half the memory: their matmuls ran in bf16
    under autocast anyway. Trainable ones stay fp32 for AdamW; a CPU trains in fp32. Returns the names cast."""
    if not str(device).startswith("cuda"):
        return []
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    for p in frozen.values():
        p.data = p.data.to(torch.bfloat16)
    return list(frozen)


def build_model(cfg, tok, extra=None):
    """The VLM cfg asks for, from scratch or from a base LM, a tools/vision.py ViT, timm weights or a whole checkpoint
    or exported folder (--init-from); `extra`, a lab method's hook (train.py), attaches its heads."""
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
    if cfg.vision_layer and not cfg.vision:
        raise UserError("--vision-layer needs --vision timm:<name> (the built-in ViT gives its last layer)")
    if cfg.vision_weights and cfg.init_from:
        raise UserError("--init-from already holds the encoder's weights: drop --vision-weights")
    try:
        vision_kwargs = json.loads(cfg.vision_kwargs) if cfg.vision_kwargs else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--vision-kwargs is not JSON ({e}): {cfg.vision_kwargs!r}") from None
    if cfg.vision_layer:  # kept with the kwargs, so the checkpoint's model_config rebuilds it
        vision_kwargs["vision_layer"] = cfg.vision_layer
    vcfg = VLMConfig(arch=cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size, vit_dim=cfg.vit_dim,
                     vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads, decoder=dcfg, vision=cfg.vision,
                     vision_kwargs=vision_kwargs, tokens_per_patch=cfg.tokens_per_patch)
    if cfg.init_encoder:
        enc = load_checkpoint(cfg.init_encoder, "vit", "--init-encoder")
        fields = ("image_size", "patch_size", "vit_dim", "vit_depth", "vit_heads")
        vcfg = replace(vcfg, **{k: enc["vit_config"][k] for k in fields})
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
    model.decoder.grad_checkpoint = cfg.grad_checkpoint
    if cfg.train == "projector" and not cfg.fsdp:  # FSDP2 wants one dtype per sharding unit: fp32 there
        frozen_to_bf16(model, pick_device(cfg.device))
    return model
