"""The VLM a training config asks for, built and initialised: from scratch, from a base LM (reference_lm.py or
hf:FOLDER), a tools/vision.py ViT or a timm model with local weights, or a whole train.py checkpoint (--init-from).
train.py, bench.py and the tests build their models here."""
import json
import sys

import baselines
from data import tokenizer as T
from lib.encoders import load_vision_weights
from lib.hf import base_checkpoint
from model import VLM, DecoderConfig, VLMConfig
from lib.utils import check_fingerprint, load_checkpoint


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
        raise ValueError("--vision (a timm encoder) and --init-encoder (a tools/vision.py ViT) are two encoders: "
                         "give one")
    if cfg.vision_weights and not cfg.vision:
        raise ValueError("--vision-weights needs --vision timm:<name>, the model the weights belong to")
    if cfg.vision_weights and cfg.init_from:
        raise ValueError("--init-from already holds the encoder's weights: drop --vision-weights")
    try:
        vision_kwargs = json.loads(cfg.vision_kwargs) if cfg.vision_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--vision-kwargs is not JSON ({e}): {cfg.vision_kwargs!r}") from None
    vcfg = VLMConfig(arch=cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size, vit_dim=cfg.vit_dim,
                     vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads, decoder=dcfg, vision=cfg.vision,
                     vision_kwargs=vision_kwargs)
    if cfg.init_encoder:
        enc = load_checkpoint(cfg.init_encoder, "vit", "--init-encoder")
        e = enc["vit_config"]
        vcfg.image_size, vcfg.patch_size = e["image_size"], e["patch_size"]
        vcfg.vit_dim, vcfg.vit_depth, vcfg.vit_heads = e["vit_dim"], e["vit_depth"], e["vit_heads"]
    if cfg.init_from:
        start = load_checkpoint(cfg.init_from, "vlm", "--init-from")
        check_fingerprint("tokenizer", start["tokenizer"], T.fingerprint(tok), cfg.init_from, cfg.tokenizer)
        vcfg = VLMConfig.from_dict(start["model_config"])
        if vcfg.arch != cfg.arch:  # the run would train one family and label it the other
            raise ValueError(f"--init-from {cfg.init_from} is a {vcfg.arch.upper()}-LVLM, but --arch is {cfg.arch}: "
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
    return model
