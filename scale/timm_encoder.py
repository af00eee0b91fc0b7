"""Pretrained ViT-style timm models as the H-LVLM's encoder (the paper's CLIP-ViT-L/336), built offline with their
weights read from a local file (nothing is downloaded): model.py's plug-ins "timm_encoder" (--vision timm:<name>)
and "vision_weights" (--vision-weights FILE).

    TimmEncoder(name, {"vision_layer": -2})  LLaVA's features: the penultimate block's output (--vision-layer)
    load_vision_weights(enc, f)   a timm state dict saved once with torch.save (or a .safetensors file)
"""
import difflib
import os

import torch
import torch.nn as nn

from utils import UserError, register, safe_load


def unknown_timm_model(name):
    """The message for a model name timm does not know, with the closest names it does know."""
    import timm
    base = name.split(".")[0]  # "vit_base_patch16_clip_224.openai": the tag is not in list_models()
    names = timm.list_models()
    close = difflib.get_close_matches(base, names, n=6, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{base}*") if n not in close]
    hint = f"; close matches: {', '.join(close[:8])}" if close else ""
    return f"timm has no model {name!r}{hint} (all names: python -c \"import timm; print(timm.list_models())\")"


@register("timm_encoder")
class TimmEncoder(nn.Module):
    """A ViT-style timm model as the H-LVLM's encoder. Built offline (pretrained=False, nothing downloaded): its
    weights come from a local file (load_vision_weights) or from a train.py checkpoint. forward_features gives
    the patch tokens only, in row-major order, as build_vit's encoder does: class and register tokens (timm's
    num_prefix_tokens) are dropped and nothing is pooled, which is what LLaVA feeds its projector.

    kwargs["vision_layer"] (not passed to timm; saved with the other kwargs in the checkpoint's model_config): 0 = the
    last block after the final norm (forward_features); -k = the output of the k-th block from the end, before any
    final norm, as LLaVA takes CLIP's hidden_states[-2] (-2: the penultimate block). Later blocks are not run."""

    def __init__(self, name, kwargs=None):
        super().__init__()
        import timm
        from data.images import IMAGENET_MEAN, IMAGENET_STD
        if not timm.is_model(name):
            raise UserError(unknown_timm_model(name))
        self.name, self.kwargs = name, dict(kwargs or {})
        self.layer = self.kwargs.get("vision_layer", 0)
        timm_kwargs = {k: v for k, v in self.kwargs.items() if k != "vision_layer"}
        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        except Exception as e:  # bad kwargs, unknown pretrained tag, ...: say which model and arguments
            raise UserError(f"timm could not build {name!r} with {self.kwargs}: {type(e).__name__}: {e}") from e
        pe = getattr(self.model, "patch_embed", None)
        if pe is None or not hasattr(pe, "grid_size") or not hasattr(self.model, "num_prefix_tokens"):
            raise UserError(f"timm model {name!r} is not a ViT-style model (patch_embed and a token sequence with "
                            f"num_prefix_tokens); the H-LVLM needs one embedding per image patch")
        (gh, gw), (ih, iw) = pe.grid_size, pe.img_size
        if gh != gw or ih != iw:
            raise UserError(f"timm model {name!r}: images {ih}x{iw}, grid {gh}x{gw}; only square ones are supported")
        self.grid, self.image_size, self.patch_size = gh, ih, pe.patch_size[0]
        self.dim, self.skip = self.model.num_features, self.model.num_prefix_tokens
        blocks = getattr(self.model, "blocks", [])
        self.depth = len(blocks)
        self.heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 0) if self.depth else 0
        if not isinstance(self.layer, int) or not -self.depth <= self.layer <= 0:
            raise UserError(f"--vision-layer {self.layer!r}: timm model {name!r} has {self.depth} blocks; give 0 (the "
                            f"final features) or -1 .. -{self.depth} (a block's output counted from the end)")
        if self.layer and not hasattr(self.model, "forward_intermediates"):
            raise UserError(f"--vision-layer: timm model {name!r} has no forward_intermediates; use 0")
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
        if self.layer:  # timm drops the prefix tokens itself here; stop_early: the blocks after it do not run
            return self.model.forward_intermediates(images, indices=[self.depth + self.layer], norm=False,
                                                    stop_early=True, output_fmt="NLC", intermediates_only=True)[0]
        x = self.model.forward_features(images)
        if x.dim() != 3 or x.shape[1] != self.skip + self.grid ** 2:
            raise ValueError(f"timm model {self.name!r} gave features {tuple(x.shape)}, expected "
                             f"(N, {self.skip} + {self.grid ** 2}, {self.dim})")
        return x[:, self.skip:]


@register("vision_weights")
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
        state = safe_load(path, path, "a state dict of model weights")
    for key in ("state_dict", "model"):  # a checkpoint dict around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state dict (name -> tensor); save one with "
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
        raise UserError(f"{path} does not fit timm model {encoder.name!r} (arguments {encoder.kwargs}): "
                        + "; ".join(problems) + ". Save the state dict of timm.create_model with the same name "
                        "and arguments (e.g. the same img_size).")
    encoder.model.load_state_dict(state)
    return ignored
