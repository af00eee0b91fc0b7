"""The models: one decoder LM, and two vision-language models built on it.

    Decoder  pre-norm transformer (RMSNorm, RoPE, SwiGLU, fused QKV, F.scaled_dot_product_attention).
             The text-only reference LM, the base LM and both VLMs all use this one module.
    VLM(arch="h")  H-LVLM, LLaVA-style: ViT encoder (timm blocks) -> MLP projector -> decoder.
    VLM(arch="u")  U-LVLM, SOLO-style, encoder-free: 8x8 pixel patches -> one bias-free Linear -> decoder,
                   framed as <|vision|> (patch x cols, <|vrow|>) x rows <|/vision|>; positions come only from
                   the decoder's RoPE over the flat sequence.

Both VLMs splice image embeddings into the token sequence at the <|image|> placeholders, so packing,
masks and the loss never need to know which family runs. Sequences may be packed: `doc_ids` keeps attention
inside each document and `position_ids` restart at each document.

    python -c "import model; print(model.VLM(model.VLMConfig()))"
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as T


@dataclass
class DecoderConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    max_seq_len: int = 1024  # longest position RoPE tables are built for
    rope_theta: float = 10000.0
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * d_model, as in Llama (same FLOPs as a 4x GELU MLP)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # one matmul instead of three
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if mask is None:  # one document per row: the fast causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def rotate(x, cos, sin):
    """Rotary position embedding on (B, H, T, D) with per-token (B, 1, T, D/2) angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = 64 * math.ceil(cfg.mlp_ratio * cfg.d_model / 64)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = nn.RMSNorm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied: fewer parameters, better small LMs
        d_head = cfg.d_model // cfg.n_head
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d_head, 2).float() / d_head)
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.apply(init_weights)
        for block in self.blocks:  # GPT-2's scaled init of residual projections keeps deep nets stable
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, input_ids=None, embeds=None, position_ids=None, doc_ids=None, mask=None, return_hidden=False,
                keep=None):
        """Logits (B, T, V). Give `input_ids` or ready `embeds` (B, T, d).

        position_ids (B, T): RoPE positions, default 0..T-1. doc_ids (B, T): tokens attend only to earlier
        tokens with the same doc id (packing); None means one document per row. mask (B, 1, T, T) bool: any
        other attention pattern (True = may attend), instead of doc_ids. return_hidden: the states before the
        final norm and head, for callers that need logits at a few positions only. keep (N,) long: flat
        indices into the B*T positions; logits (N, V) at those positions only. Training keeps the labelled
        positions: in a VLM batch most positions are image tokens, whose logits no loss reads, and the head
        plus its cross-entropy over a vocabulary-wide row is the most expensive per-position work there is.
        """
        x = self.embed(input_ids) if embeds is None else embeds
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        if position_ids.max() >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} >= max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :])).unsqueeze(1)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        if return_hidden:
            return x
        if keep is not None:
            x = x.flatten(0, 1).index_select(0, keep)
        return self.head(self.norm(x))


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

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["decoder"] = DecoderConfig(**d["decoder"])
        return VLMConfig(**d)


def build_vit(cfg):
    """The H-LVLM's vision encoder from timm's ViT blocks. Patch tokens only (no class token, no pooling):
    `forward_features` gives one embedding per patch, which is what reaches the LM."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_dim,
                             depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="",
                             class_token=False)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.arch not in ("h", "u"):
            raise ValueError(f"arch must be 'h' or 'u', got {cfg.arch!r}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        d = cfg.decoder.d_model
        if cfg.arch == "h":
            self.encoder = build_vit(cfg)
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
        """(N, 3, S, S) normalised pixels -> (N, grid*grid, d) embeddings in row-major patch order."""
        if self.cfg.arch == "h":
            return self.projector(self.encoder.forward_features(images))
        p = self.cfg.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p)                  # N, 3, g, g, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # N, g*g, 3*p*p
        return self.patch_embed(patches)

    def forward(self, input_ids, images=None, position_ids=None, doc_ids=None, image_embeds=None, **kw):
        """Logits (B, T, V). `images` holds one image per <|image|> block, in the order blocks appear in
        input_ids read row by row (the packer builds it that way); or pass ready `image_embeds` from
        embed_images. Other keywords (mask, return_hidden, keep) go to Decoder.forward."""
        embeds = self.decoder.embed(input_ids)
        slots = input_ids == T.IMAGE
        if slots.any():
            if image_embeds is None:
                image_embeds = self.embed_images(images)
            image_embeds = image_embeds.to(embeds.dtype)
            if image_embeds.shape[0] * image_embeds.shape[1] != int(slots.sum()):
                raise ValueError(f"{int(slots.sum())} <|image|> slots but {image_embeds.shape[0]} images "
                                 f"x {image_embeds.shape[1]} embeddings")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_embeds)
        return self.decoder(embeds=embeds, position_ids=position_ids, doc_ids=doc_ids, **kw)

    def parts(self):
        """Named parameter groups, for freezing: the paper trains only the projector of the H-LVLM."""
        if self.cfg.arch == "h":
            return {"encoder": self.encoder, "projector": self.projector, "decoder": self.decoder}
        return {"projector": self.patch_embed, "decoder": self.decoder}


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
