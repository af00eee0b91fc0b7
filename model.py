"""The models: one decoder LM, and two vision-language models built on it.

    Decoder  pre-norm transformer (RMSNorm, RoPE, SwiGLU, fused QKV, F.scaled_dot_product_attention).
             The text-only reference LM, the base LM and both VLMs all use this one module.
    VLM(arch="h")  H-LVLM, LLaVA-style: ViT encoder (timm blocks) -> MLP projector -> decoder.
    VLM(arch="u")  U-LVLM, SOLO-style, encoder-free: 8x8 pixel patches -> one bias-free Linear -> decoder,
                   framed as <|vision|> (patch x cols, <|vrow|>) x rows <|/vision|>; positions come only from
                   the decoder's RoPE over the flat sequence.
    VLMConfig(vision="timm:<name>")  the H-LVLM with any ViT-style timm model as encoder (TimmEncoder), e.g. a
                   pretrained CLIP ViT whose weights train.py reads from a local file (load_vision_weights).
    KVCache, generate  inference: decoding with cached keys/values, greedy or sampled (caption.py).

Both VLMs splice image embeddings into the token sequence at the <|image|> placeholders, so packing,
masks and the loss never need to know which family runs. Sequences may be packed: `doc_ids` keeps attention
inside each document and `position_ids` restart at each document.

    python -c "import model; print(model.VLM(model.VLMConfig()))"
"""
import difflib
import math
import os
from dataclasses import dataclass, field, replace

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
    # The rest of the Llama family (hf.py loads its checkpoints). The defaults are the project's own models.
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
    """Rotary position embedding on (B, H, T, D) with per-token (B, 1, T, D/2) angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


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
        self.norm1, self.attn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), Attention(cfg)
        self.norm2, self.mlp = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight  # tied: fewer parameters, better small LMs
        angles = rope_angles(cfg)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.apply(init_weights)
        for block in self.blocks:  # GPT-2's scaled init of residual projections keeps deep nets stable
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, input_ids=None, embeds=None, position_ids=None, doc_ids=None, mask=None, return_hidden=False,
                keep=None, cache=None):
        """Logits (B, T, V). Give `input_ids` or ready `embeds` (B, T, d).

        position_ids (B, T): RoPE positions, default 0..T-1. doc_ids (B, T): tokens attend only to earlier
        tokens with the same doc id (packing); None means one document per row. mask (B, 1, T, T) bool: any
        other attention pattern (True = may attend), instead of doc_ids. return_hidden: the states before the
        final norm and head, for callers that need logits at a few positions only. keep (N,) long: flat
        indices into the B*T positions; logits (N, V) at those positions only. Training keeps the labelled
        positions: in a VLM batch most positions are image tokens, whose logits no loss reads, and the head
        plus its cross-entropy over a vocabulary-wide row is the most expensive per-position work there is.
        cache (KVCache, inference only): the tokens continue the ones already in the cache, at positions
        cache.pos.. (one document per row, so no doc_ids or mask); their keys and values are appended.
        """
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
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        if return_hidden:
            return x
        if keep is not None:
            x = x.flatten(0, 1).index_select(0, keep)
        return self.head(self.norm(x))


def rope_angles(cfg):
    """RoPE angles (max_seq_len, d_head/2): position x frequency, frequencies theta^(-2i/d_head)."""
    d_head = cfg.d_model // cfg.n_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d_head, 2).float() / d_head)
    if cfg.rope_scaling:
        inv_freq = llama3_rope_scaling(inv_freq, cfg.rope_scaling)
    return torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)


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


def build_vit(cfg):
    """The H-LVLM's vision encoder from timm's ViT blocks. Patch tokens only (no class token, no pooling):
    `forward_features` gives one embedding per patch, which is what reaches the LM."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_dim,
                             depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0, global_pool="",
                             class_token=False)


def unknown_timm_model(name):
    """The message for a model name timm does not know, with the closest names it does know."""
    import timm
    base = name.split(".")[0]  # "vit_base_patch16_clip_224.openai": the tag is not in list_models()
    names = timm.list_models()
    close = difflib.get_close_matches(base, names, n=6, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{base}*") if n not in close]
    hint = f"; close matches: {', '.join(close[:8])}" if close else ""
    return f"timm has no model {name!r}{hint} (all names: python -c \"import timm; print(timm.list_models())\")"


class TimmEncoder(nn.Module):
    """A ViT-style timm model as the H-LVLM's encoder. Built offline (pretrained=False, nothing downloaded): its
    weights come from a local file (load_vision_weights) or from a train.py checkpoint. forward_features gives
    the patch tokens only, in row-major order, as build_vit's encoder does: class and register tokens (timm's
    num_prefix_tokens) are dropped and nothing is pooled, which is what LLaVA feeds its projector."""

    def __init__(self, name, kwargs=None):
        super().__init__()
        import timm
        from data.images import IMAGENET_MEAN, IMAGENET_STD
        if not timm.is_model(name):
            raise ValueError(unknown_timm_model(name))
        self.name, self.kwargs = name, dict(kwargs or {})
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **self.kwargs)
        except Exception as e:  # bad kwargs, unknown pretrained tag, ...: say which model and arguments
            raise ValueError(f"timm could not build {name!r} with {self.kwargs}: {type(e).__name__}: {e}") from e
        pe = getattr(self.model, "patch_embed", None)
        if pe is None or not hasattr(pe, "grid_size") or not hasattr(self.model, "num_prefix_tokens"):
            raise ValueError(f"timm model {name!r} is not a ViT-style model (patch_embed and a token sequence with "
                             f"num_prefix_tokens); the H-LVLM needs one embedding per image patch")
        (gh, gw), (ih, iw) = pe.grid_size, pe.img_size
        if gh != gw or ih != iw:
            raise ValueError(f"timm model {name!r}: images {ih}x{iw}, grid {gh}x{gw}; only square ones are supported")
        self.grid, self.image_size, self.patch_size = gh, ih, pe.patch_size[0]
        self.dim, self.skip = self.model.num_features, self.model.num_prefix_tokens
        blocks = getattr(self.model, "blocks", [])
        self.depth = len(blocks)
        self.heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 0) if self.depth else 0
        # The data pipeline normalises with ImageNet's mean/std (data.images.normalize). A model trained with
        # other statistics (CLIP: OpenAI's; many timm ViTs: 0.5) must see its own, or its features drift: one
        # affine map converts, x_model = (x * std_in + mean_in - mean) / std.
        mean = torch.tensor(self.model.pretrained_cfg.get("mean", IMAGENET_MEAN)).view(3, 1, 1)
        std = torch.tensor(self.model.pretrained_cfg.get("std", IMAGENET_STD)).view(3, 1, 1)
        mean_in, std_in = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.renormalize = not (torch.equal(mean, mean_in) and torch.equal(std, std_in))
        self.register_buffer("scale", std_in / std, persistent=False)
        self.register_buffer("shift", (mean_in - mean) / std, persistent=False)

    def forward_features(self, images):
        """(N, 3, S, S) ImageNet-normalised pixels -> (N, grid*grid, num_features) patch tokens."""
        if self.renormalize:
            images = images * self.scale + self.shift
        x = self.model.forward_features(images)
        if x.dim() != 3 or x.shape[1] != self.skip + self.grid ** 2:
            raise ValueError(f"timm model {self.name!r} gave features {tuple(x.shape)}, expected "
                             f"(N, {self.skip} + {self.grid ** 2}, {self.dim})")
        return x[:, self.skip:]


def load_vision_weights(encoder, path):
    """Load a timm state dict from `path` into a TimmEncoder and return the keys ignored.

    The file is what `torch.save(timm.create_model(name, pretrained=True).state_dict(), path)` writes (read with
    weights_only=True: loading runs no code), or a .safetensors file if the safetensors package is installed.
    The classifier head, which the encoder is built without (num_classes=0), is ignored; anything else that
    does not fit is refused, naming the keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no vision weights file at {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path} is a .safetensors file, but the safetensors package is not installed: "
                              "pip install safetensors, or save the weights with torch.save(state_dict, 'x.pt')"
                              ) from None
        state = load_file(path)
    else:
        from utils import safe_load  # the project's message for a file a weights-only load refuses
        state = safe_load(path, path, "a state dict of model weights")
    for key in ("state_dict", "model"):  # a checkpoint dict around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (name -> tensor); save one with "
                         "torch.save(model.state_dict(), path)")
    own = encoder.model.state_dict()
    head = encoder.model.pretrained_cfg.get("classifier") or "head"
    heads = tuple(h + "." for h in ([head] if isinstance(head, str) else head))
    ignored = sorted(k for k in state if k not in own and k.startswith(heads))
    state = {k: v for k, v in state.items() if k not in ignored}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        problems = [f"{len(v)} {what}: {show(v)}" for what, v in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if v]
        raise ValueError(f"{path} does not fit timm model {encoder.name!r} (arguments {encoder.kwargs}): "
                         + "; ".join(problems) + ". Save the state dict of timm.create_model with the same name "
                         "and arguments (e.g. the same img_size).")
    encoder.model.load_state_dict(state)
    return ignored


def build_encoder(cfg):
    """The H-LVLM encoder cfg asks for: build_vit, or a TimmEncoder for vision='timm:<name>'."""
    if not cfg.vision:
        return build_vit(cfg)
    if not cfg.vision.startswith("timm:") or not cfg.vision[5:]:
        raise ValueError(f"vision must be '' (the built-in ViT) or 'timm:<model name>', got {cfg.vision!r}")
    return TimmEncoder(cfg.vision[5:], cfg.vision_kwargs)


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
        (N, grid*grid, vit_dim) encoder features computed beforehand (data.features: the frozen encoder's)."""
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
