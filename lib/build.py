"""The VLM a training config asks for, built and initialised: from scratch, from a base LM (reference_lm.py or
hf:FOLDER), a tools/vision.py ViT or a timm model with local weights, or a whole train.py checkpoint or exported
folder (--init-from; lib/export.py). train.py, bench.py and the tests build their models here.

    read_vlm(path), load_vlm(path)  a train.py checkpoint or an exported folder: the checkpoint dict / (model, dict)
    frozen_to_bf16(model, device)   --train projector on CUDA: the frozen encoder and decoder held in bf16
"""
import json
import os
import sys

import torch

import baselines
from data import tokenizer as T
from lib.encoders import load_vision_weights
from lib.hf import base_checkpoint
from model import VLM, DecoderConfig, VLMConfig, load_model
from lib.cli import UserError
from lib.utils import check_fingerprint, load_checkpoint, pick_device

FOLDER_FORMAT = "prior-vlm"  # config.json's "format" in a folder lib/export.py writes


def read_vlm(path, flag=""):
    """A train.py checkpoint's dict (model, model_config, config, tokenizer, ...) from its .pt file, or from a folder
    lib/export.py wrote (config.json, model.safetensors, tokenizer.json; config["tokenizer"] is then that file)."""
    if not os.path.isdir(path):
        return load_checkpoint(path, "vlm", flag)
    config_path = os.path.join(path, "config.json")
    meta = json.load(open(config_path)) if os.path.isfile(config_path) else {}
    if meta.get("format") != FOLDER_FORMAT:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is a folder but not an exported VLM (no config.json "
                         f"with format {FOLDER_FORMAT!r}; python -m lib.export writes one)")
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"))
    for key, source in meta["tied"].items():  # safetensors stores a shared tensor once
        state[key] = state[source]
    return {"model": state, "model_config": meta["model_config"], "tokenizer": meta["tokenizer"], "data": meta["data"],
            "step": meta["step"], "inputs": meta.get("inputs", {}),
            "config": {**meta["train_config"], "tokenizer": os.path.join(path, "tokenizer.json")}}


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


def build_model(cfg, tok):
    """The VLM described by cfg, with the decoder/encoder/whole model initialised as cfg asks."""
    dcfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         d_model=cfg.d_model, max_seq_len=cfg.row_len)
    base = enc = start = None
    if cfg.init_decoder:
        base = base_checkpoint(cfg.init_decoder, "lm", "--init-decoder")
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
        load_vision_weights(model.encoder, cfg.vision_weights)
    elif cfg.vision and not cfg.init_from:
        print(f"warning: no --vision-weights: the {cfg.vision} encoder starts from random weights", file=sys.stderr)
    if start is not None:  # heads of an --objective run (aux.*) are not part of the VLM
        model.load_state_dict({k: v for k, v in start["model"].items() if not k.startswith("aux.")})
    if cfg.train == "projector":
        for name, part in model.parts().items():
            part.requires_grad_(name == "projector")
    extra = baselines.hook(cfg)
    if extra is not None:  # after everything else, and trained even with --train projector
        extra.attach(model, start)
    model.decoder.grad_checkpoint = getattr(cfg, "grad_checkpoint", False)
    if cfg.train == "projector" and not cfg.fsdp:  # FSDP2 wants one dtype per sharding unit: fp32 there
        frozen_to_bf16(model, pick_device(cfg.device))
    return model
