"""Train a vision-language model on image-caption pairs with NTP, PRIOR, or another token weighting.

One process (CPU or one GPU):
    python train.py --arch h --loss prior --scores out/scores_train.pt --out-dir runs/h_prior
Several GPUs, or several CPU processes (gloo):
    torchrun --standalone --nproc_per_node=4 train.py --arch h --loss prior --out-dir runs/h_prior
Several machines: the same command on each, with its own --node_rank (0 on HOST, whose rank 0 writes --out-dir;
every machine needs the data, tokenizer and scores at the same paths):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
Sharded (FSDP2: weights, gradients and optimizer state split over the processes instead of copied; CPU too):
    torchrun --standalone --nproc_per_node=8 train.py --fsdp ...

The paper's recipes:
    H-LVLM: pretrained frozen ViT and LM, only the projector trains:
        python train.py --arch h --init-decoder out/base_lm.pt --init-encoder out/vit.pt --train projector ...
    H-LVLM with a pretrained timm ViT (e.g. CLIP) whose state dict was saved once with torch.save:
        python train.py --arch h --vision timm:vit_base_patch16_clip_224.openai --vision-weights clip_b16.pt \
            --train projector --row-len 320 ...
    U-LVLM: decoder from the base LM, everything trains, captions mixed 1:1 with text-only data:
        python train.py --arch u --init-decoder out/base_lm.pt --text-data data/synth/text.jsonl ...

Losses (--loss): ntp (plain next-token prediction), prior (w = (1 - p_ref)^alpha from score.py, per-caption
normalised, Eq. 4), prior_shuffled (each caption's PRIOR weights permuted among its own tokens: a control that
keeps the weights but not their tokens), rare (inverse token frequency, the paper's rare-word baseline), oracle
(the generator's tags: image and glue words 1, others --oracle-low; a reference point, not a bound), attn (weights
from a small contrastive model's text-to-image attention, the paper's attention-weighting baseline: make them
with `python objectives.py`), and two related methods not in the paper: rho1 (Rho-1: keep the top --rho1-keep
of the tokens by excess loss over the reference LM's, online) and cal (CAL: clamp(logit with the image - logit
with another sample's image, 1, 5), smoothed, batch-normalised; one more forward without gradient).
Auxiliary objectives (--objective, added to the caption loss with --aux-weight; objectives.py): itm (image-text
matching), itc (image-text contrastive), recon (reconstruct the image's patches from the decoder's outputs at
the image positions): the paper's other Table 1 baselines. Their heads train even with --train projector.

Speed: python bench.py measures this script's step (tokens/s, FLOP/s against the machine's matmul, MFU on a
GPU); --compile fuses the many small elementwise kernels (worth it on a GPU; ~20-40 s to compile on a CPU).

Writes to --out-dir: config.json, log.jsonl (one line per step; with --objective also "aux", the mean auxiliary
loss), ckpt_<step>.pt (weights, every --save-every steps, for eval.py; an --objective's heads are in it too, under
aux.*, and load_model leaves them out) and last.pt (weights, optimizer, step and RNG: `--resume` continues bit
for bit).

Alarm: with any weighted loss (not ntp), when the plain caption NLL (log.jsonl's "ntp") rises clearly above its
level at the end of warm-up (health.nll_rise, a running mean), the run prints a warning once, again at the end,
and records it as "alarm" in that step's log line: the model is unlearning the caption language (docs/own_data.md).

Flags in detail:
  --data: JSONL, LLaVA JSON, COCO captions (captions.json::image_folder) or webdataset .tar shards (see
    data/records.py).
  --loss: ntp, prior (--scores), prior_shuffled (PRIOR's weights permuted within each caption: a control), rare
    (inverse frequency), oracle (ground-truth tags), attn (--attn-scores from objectives.py), rho1 (Rho-1
    selection by excess loss over -log p_ref from --scores; --rho1-keep), cal (CAL: weight clamp(logit with image
    - logit with another sample's image, 1, 5), 3-token moving average, batch mean 1; +1 forward without
    gradient).
  --objective: none, itm (image-text matching head at each caption's last token, mismatches = the batch's images
    rolled by one; ~2.2x step time), itc (InfoNCE between the pooled image states and a text-only pass's caption
    state; ~1.3x), recon (linear head at the image positions regresses each patch's normalised pixels, MSE;
    ~1.05x). Its heads train with --train projector too.
  --vision timm:<name>: the timm model is built offline; image size, patches and width then come from it.
    --vision-weights holds torch.save(model.state_dict(), path) or a .safetensors file; nothing is downloaded.
    --vision-kwargs: the weights must fit them.
  --stop-at: e.g. to fit a time slot.
  --image-cache: memory stays flat for any number of images, and a re-run with the same images reads the file
    instead of decoding.
  --fsdp: FSDP2 fully_shard per decoder block and the root, instead of DDP's full copies.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import tokenizer as T
from cli import parse_config
from data.packing import IGNORE, Sample, cat, pack, to_device
from data.features import encoder_features
from hf import base_checkpoint
from data.images import images_cached, load_images, normalize
from data.records import read_records
from loss import inverse_frequency_table, prior_weights, shuffle_within_captions, token_losses, weighted_loss
from health import nll_alarm_message, nll_rise, past_ntp
from model import DecoderConfig, VLM, VLMConfig, count_params, load_vision_weights
from objectives import MicroBatch, attach_heads, host_positions, micro_batch_loss, split_state
from reference_lm import make_optimizer
from score import CATEGORIES, count_overlong, load_scores, token_tags
from utils import (atomic_save, autocast, check_fingerprint, file_fingerprint, load_checkpoint, lr_at, pick_device,
                   seed_everything, text_fingerprint)


@dataclass
class TrainConfig:
    data: str = field(default="data/synth/train.jsonl",
                      metadata={"help": "image-caption pairs: JSONL, LLaVA JSON, COCO captions "
                                        "(captions.json::image_folder) or .tar shards"})
    tokenizer: str = field(default="out/tokenizer.json", metadata={"help": "tokenizer.json"})
    scores: str = field(default="out/scores_train.pt",
                        metadata={"help": "score.py output for --data (needed by --loss prior)"})
    out_dir: str = field(default="runs/default", metadata={"help": "where config, log and checkpoints go"})
    arch: str = field(default="h",
                      metadata={"help": "h: ViT -> projector -> LM; u: encoder-free pixel patches -> LM",
                                "choices": ["h", "u"]})
    loss: str = field(default="ntp",
                      metadata={"help": "token weighting of the caption loss (see Losses and Flags in detail, above)",
                                "choices": ["ntp", "prior", "prior_shuffled", "rare", "oracle", "attn", "rho1", "cal"]})
    objective: str = field(default="none",
                           metadata={"help": "auxiliary objective added to the caption loss (objectives.py; Flags in "
                                             "detail, above)", "choices": ["none", "itm", "itc", "recon"]})
    aux_weight: float = field(default=1.0,
                              metadata={"help": "weight of the --objective loss: loss = caption loss + aux_weight x "
                                                "auxiliary loss"})
    rho1_keep: float = field(default=0.6,
                             metadata={"help": "--loss rho1: share of each micro-batch's caption tokens kept (top by "
                                               "excess loss); 1 = NTP"})
    itc_dim: int = field(default=64, metadata={"help": "--objective itc: width of the image and text projections"})
    attn_scores: str = field(default="out/attn_scores_train.pt",
                             metadata={"help": "--loss attn: per-token weights for --data in score-file format, from "
                                               "`python objectives.py`"})
    alpha: float = field(default=1.0, metadata={"help": "PRIOR exponent: w = (1 - p_ref)^alpha"})
    no_k: bool = field(default=False,
                       metadata={"help": "drop the factor k (caption length) from PRIOR's normalisation (ablation)"})
    oracle_low: float = field(default=0.1,
                              metadata={"help": "oracle weight of boiler and noise words (image and glue words get 1)"})
    train: str = field(default="all",
                       metadata={"help": "which parts train: all, or projector (encoder and decoder frozen, the "
                                         "paper's H-LVLM recipe)", "choices": ["all", "projector"]})
    init_decoder: str = field(default="",
                              metadata={"help": "base LM for the decoder: a reference_lm.py checkpoint, or hf:FOLDER "
                                                "(hf.py) ('' = scratch)"})
    init_encoder: str = field(default="",
                              metadata={"help": "vision-encoder checkpoint from vision.py to start the ViT from "
                                                "('' = scratch)"})
    init_from: str = field(default="",
                           metadata={"help": "a train.py checkpoint to start all weights from (e.g. the "
                                             "U-LVLM's stage 1)"})
    vision: str = field(default="",
                        metadata={"help": "H-LVLM encoder: '' = the built-in ViT (--vit-*, --init-encoder); "
                                          "'timm:<name>' = that timm model"})
    vision_weights: str = field(default="",
                                metadata={"help": "local file with the --vision timm model's state dict (torch.save or "
                                                  ".safetensors); no download"})
    vision_kwargs: str = field(default="",
                               metadata={"help": "extra timm.create_model arguments for --vision as JSON, e.g. "
                                                 "'{\"img_size\": 336}'"})
    text_data: str = field(default="",
                           metadata={"help": "text-only captions mixed into every batch with NTP loss ('' = none)"})
    text_ratio: float = field(default=1.0,
                              metadata={"help": "text-only samples per image-caption sample when --text-data is set"})
    image_size: int = field(default=48, metadata={"help": "images are resized to this square size"})
    patch_size: int = field(default=8,
                            metadata={"help": "pixels per patch side (ViT patches, or U-LVLM pixel patches)"})
    vit_dim: int = field(default=192, metadata={"help": "ViT width (scratch encoder)"})
    vit_depth: int = field(default=4, metadata={"help": "ViT depth (scratch encoder)"})
    vit_heads: int = field(default=3, metadata={"help": "ViT heads (scratch encoder)"})
    n_layer: int = field(default=4, metadata={"help": "decoder layers (scratch decoder)"})
    n_head: int = field(default=4, metadata={"help": "decoder heads (scratch decoder)"})
    d_model: int = field(default=256, metadata={"help": "decoder width (scratch decoder)"})
    batch_size: int = field(default=32,
                            metadata={"help": "image-caption samples per optimizer step, over all processes"})
    micro_batch: int = field(default=0,
                             metadata={"help": "samples per forward pass per process (gradient accumulation); 0 "
                                               "= all at once"})
    row_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine to lr/10"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    save_every: int = field(default=100,
                            metadata={"help": "write ckpt_<step>.pt every N steps (the paper: 500 of 5,000)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/last.pt"})
    stop_at: int = field(default=0,
                         metadata={"help": "stop (with a checkpoint) after this step; --resume continues (0 = "
                                           "run to --steps)"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more than this share of records is bad"})
    workers: int = field(default=0, metadata={"help": "processes for decoding images at start-up"})
    image_cache: str = field(default="",
                             metadata={"help": "keep the decoded images in this memory-mapped file, reused by re-runs "
                                               "('' = in memory)"})
    feature_cache: str = field(default="",
                               metadata={"help": "folder caching the frozen ViT's features (--arch h --train projector "
                                                 "only; data/features.py)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False,
                       metadata={"help": "with several processes, shard weights, gradients and optimizer state "
                                         "(FSDP2), not DDP's copies"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    peak_tflops: float = field(default=0.0,
                               metadata={"help": "the device's dense bf16 peak in TFLOP/s for MFU (0 = from "
                                                 "train.PEAK_BF16 by GPU name)"})


def build_model(cfg, tok):
    """The VLM described by cfg, with the decoder/encoder/whole model initialised as cfg asks."""
    dcfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         d_model=cfg.d_model, max_seq_len=cfg.row_len)
    base = enc = None
    if cfg.init_decoder:
        base = base_checkpoint(cfg.init_decoder, "lm", "--init-decoder")
        check_fingerprint("tokenizer", base["tokenizer"], T.fingerprint(tok), cfg.init_decoder, cfg.tokenizer)
        dcfg = DecoderConfig(**{**base["decoder_config"],
                                "max_seq_len": max(cfg.row_len, base["decoder_config"]["max_seq_len"])})
    if cfg.vision and cfg.init_encoder:
        raise ValueError("--vision (a timm encoder) and --init-encoder (a vision.py ViT) are two encoders: give one")
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
    start_aux = {}
    if cfg.init_from:
        vlm_state, start_aux = split_state(start["model"])  # heads of an --objective run: not part of the VLM
        model.load_state_dict(vlm_state)
    if cfg.train == "projector":
        for name, part in model.parts().items():
            part.requires_grad_(name == "projector")
    # Auxiliary heads (--objective) after everything else: the VLM's initialisation draws the same random
    # numbers with or without them. Not in model.parts(): they train with --train projector too.
    heads = attach_heads(model, cfg.objective, cfg.itc_dim)
    if heads is not None and start_aux and start.get("config", {}).get("objective") == cfg.objective:
        heads.load_state_dict(start_aux)  # --init-from a run with the same objective: keep its heads
    return model


def load_model(path, device="cpu"):
    """A VLM rebuilt from a train.py checkpoint alone (config inside), plus the checkpoint dict. Auxiliary
    heads (--objective: itm, itc, recon) are left out; they stay in ckpt["model"] under aux.*."""
    ckpt = load_checkpoint(path, "vlm")
    model = VLM(VLMConfig.from_dict(ckpt["model_config"]))
    # Heads of an --objective run (keys aux.*) are training-only: evaluation and captioning use the VLM alone.
    model.load_state_dict(split_state(ckpt["model"])[0])
    return model.to(device).eval(), ckpt


# Flags that --resume lets differ from the run's own: where and how it runs, never what it computes. --steps may not
# grow: it sets the cosine schedule of every step.
RESUME_MAY_DIFFER = {"out_dir", "resume", "stop_at", "threads", "workers", "device", "image_cache", "compile", "fsdp",
                     "save_every", "max_bad_fraction"}
# Files may move (a copied artefacts folder): a path may change, but not from '' to a file or back. What the run read
# is checked instead: data, tokenizer, scores and text data by fingerprint, the --init-* weights by the model's shape
# (last.pt holds every weight).
RESUME_PATHS = {"data", "tokenizer", "scores", "attn_scores", "text_data", "init_decoder", "init_encoder", "init_from",
                "vision_weights"}


def check_resume(cfg, state, path):
    """Refuse to resume `state` (last.pt) under flags that would change the run: one line naming them."""
    old = state.get("config", {})
    may_differ = set(RESUME_MAY_DIFFER)
    if cfg.loss not in ("rho1", "cal") and cfg.objective == "none":  # those act per micro-batch (docs/scale.md)
        may_differ.add("micro_batch")
    changed = [(k, old[k], v) for k, v in asdict(cfg).items() if k not in may_differ and k in old and
               old[k] != v and (k not in RESUME_PATHS or bool(old[k]) != bool(v))]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, a, b in changed)
        raise ValueError(f"--resume: {path} is a run with other flags ({flags}); a resumed run keeps the flags that "
                         f"define it (see its config.json): give the old values, or a new --out-dir")


def trim_log(path, step):
    """Drop log lines after `step` (the resumed checkpoint's), which the resumed run writes again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def make_samples(tok, records, p_ref=None, tags=None):
    ids = T.encode_captions(tok, [r.caption for r in records])
    return [Sample(c, None if p_ref is None else p_ref[r.id].tolist(), None if tags is None else tags[i], i)
            for i, (c, r) in enumerate(zip(ids, records))]


def global_batch(step, n, batch_size, seed):
    """Data-set indices of step `step`'s batch: a fresh permutation each epoch, walked in order.
    A pure function of (step, seed), so resume and every rank agree without sharing any state."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset:offset + batch_size - len(out)]
    return out


def step_flops(model, positions, labelled, images, context):
    """Training FLOPs (forward + backward) of the work a step needs, in the nanoGPT/PaLM accounting:
    a weight multiplying a token's vector costs 2 FLOPs per weight forward and 4 backward (the input's and
    the weight's gradient), 6 x params per token; attention (scores and mixing, 2 x 2 x d x context per
    token and layer forward) adds 12 x n_layer x d_model x context per token, forward and backward.

        decoder  (6 x non-embedding params + 12 x n_layer x d_model x context) x positions
        head     6 x d_model x vocab x labelled    (logits only where a label is; the tied embedding is
                                                    a lookup and costs nothing)
        vision   (6 x (encoder + projector params) + 12 x depth x vit_dim x patches/image) x patches

    positions: the non-padding positions of the step (padding is waste, so it does not count as work
    done); labelled: the positions with a label; images: images encoded; context: keys per query, on average:
    attended_pairs / positions for the attention each document needs (causal, inside the document; train.py
    logs this), or the row width for what a dense masked kernel computes (bench.py reports both). Frozen weights
    skip their weight gradient (4N, not 6N); like everyone we still count 6N, so numbers compare across recipes
    and papers."""
    d = model.decoder.cfg
    head = d.vocab_size * d.d_model
    flops = (6 * (count_params(model.decoder) - head) + 12 * d.n_layer * d.d_model * context) * positions
    flops += 6 * head * labelled
    patches = images * model.grid ** 2
    if model.cfg.arch == "h":
        vision = count_params(model.encoder) + count_params(model.projector)
        flops += (6 * vision + 12 * model.cfg.vit_depth * model.cfg.vit_dim * model.grid ** 2) * patches
    else:
        flops += 6 * count_params(model.patch_embed) * patches
    return flops


def attended_pairs(doc_ids, real):
    """Query-key pairs that causal attention inside each document needs: n (n + 1) / 2 for a document of n
    positions, summed over the (R, L) batch's documents; padding (real False) counts nothing. Host tensors."""
    R, L = doc_ids.shape
    docs = (doc_ids + torch.arange(R)[:, None] * (L + 1))[real]  # unique over the batch
    n = torch.bincount(docs - docs.min()) if docs.numel() else docs
    return int((n * (n + 1) // 2).sum())


def flops_per_token(model, context):
    """Training FLOPs of one labelled text token in a row `context` wide (see step_flops)."""
    return step_flops(model, 1, 1, 0, context)


# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from NVIDIA's data sheets (their sparse figure / 2).
# Keys are whole words of torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"); the
# longest key whose words all appear wins, so "H100 NVL" is not taken for an H100 SXM, nor "L40S" for an L40.
PEAK_BF16 = {
    "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12, "H800 PCIe": 756e12,
    "H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12, "H20": 148e12,
    "A100": 312e12, "A800": 312e12, "A30": 165e12, "A10": 125e12, "A40": 150e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "B200": 2250e12, "B100": 1750e12, "GB200": 2500e12,
}


def name_words(name):
    return set(name.upper().replace("-", " ").replace("_", " ").split())


def peak_for_name(name):
    """Dense bf16 peak (FLOP/s) of a GPU by its device name (PEAK_BF16), None if the name is not known."""
    words = name_words(name)
    known = [key for key in PEAK_BF16 if name_words(key) <= words]
    return PEAK_BF16[max(known, key=lambda k: len(name_words(k)))] if known else None


def peak_flops(device, peak_tflops=0.0):
    """The GPU's dense bf16 peak (FLOP/s): peak_tflops (--peak-tflops) if given, else from PEAK_BF16 by device
    name; None on a CPU or for an unknown GPU (MFU is then not reported: pass --peak-tflops)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not str(device).startswith("cuda"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def check_bf16(device):
    """Training on a GPU runs under bf16 autocast (utils.autocast); refuse GPUs without bf16 (V100, T4), whose
    fp16 would need a GradScaler this project does not have."""
    if str(device).startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16, which training on a GPU needs (fp16 "
                         f"with loss scaling is not implemented): use --device cpu or a GPU with bf16 (A100 or newer)")


def setup_distributed(device):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):  # bind the process to its GPU before NCCL starts, and tell NCCL which one
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class Data:
    """What the steps draw from."""
    samples: list                 # image-caption Samples
    images: torch.Tensor          # uint8 (N, 3, S, S), decoded once at start-up; images[s.index] is s's
    prefix: list                  # the model's image placeholder tokens
    text_samples: list = field(default_factory=list)  # text-only Samples (--text-data), trained with NTP
    rare_table: torch.Tensor = None                   # --loss rare: weight per vocabulary id, on the device
    features: torch.Tensor = None                     # --feature-cache: the frozen encoder's (N, P, D) features


def loss_weights(cfg, batch, rare_table=None):
    """Per-position token weights (R, L) of the chosen --loss (rows of text-only data get NTP's 1s later)."""
    if cfg.loss == "ntp":
        return torch.ones_like(batch.p_ref)
    if cfg.loss in ("prior", "prior_shuffled"):  # prior_shuffled: p_ref was permuted per caption in main
        return prior_weights(batch.p_ref, cfg.alpha)
    if cfg.loss == "rare":
        return rare_table[batch.labels.clamp(min=0)]
    if cfg.loss == "attn":  # the scorer's attention weights travel in the p_ref field (see main)
        return batch.p_ref.float()
    if cfg.loss == "oracle":  # ground-truth tags: image words and glue (its form depends on the image) 1
        related = (batch.tags == CATEGORIES.index("image")) | (batch.tags == CATEGORIES.index("glue"))
        return torch.where(related, 1.0, cfg.oracle_low)
    return torch.ones_like(batch.p_ref)  # rho1, cal: weights made online in objectives.micro_batch_loss


def plain_path(cfg):
    """True when a step is one forward and a per-caption weighted loss (ntp, prior, rare, oracle, attn without an
    --objective): the original, fastest path. Others (rho1, cal, any --objective) go through
    objectives.micro_batch_loss."""
    return cfg.loss in ("ntp", "prior", "prior_shuffled", "rare", "oracle", "attn") and cfg.objective == "none"


def unwrap(module):
    """The bare model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def train_step(cfg, step, train_model, data, device, rank=0, world=1, model=None):
    """Forward and backward of step `step`: this process's share of the global batch, in micro-batches.
    Leaves the gradients in the model (the caller clips and steps) and returns (stats, nll_by_tag,
    batch_ids). Everything a step does but the optimizer, so bench.py times exactly what training runs.
    model: the bare VLM inside train_model (default: unwrapped from it), for the auxiliary heads.

    Scaling: the caption loss of a micro-batch counts by its share of the global batch's caption tokens, the
    auxiliary loss (--objective) by its share of the global batch's samples, so accumulation and processes
    give the mean over the batch. --loss rho1 selects and --loss cal normalises within each micro-batch of
    each process (the whole batch with one process and no --micro-batch).

    Host work per micro-batch is a few list operations and tensor creations; the device is synchronised
    once per step, at the end, to read the statistics."""
    samples, text_samples = data.samples, data.text_samples
    fsdp = world > 1 and hasattr(train_model, "set_requires_gradient_sync")
    batch_ids = global_batch(step, len(samples), cfg.batch_size, cfg.seed)
    n_text = int(cfg.batch_size * cfg.text_ratio) if text_samples else 0
    text_ids = global_batch(step, len(text_samples), n_text, cfg.seed + 1) if n_text else []
    # Loss = sum over the global batch / its number of caption tokens, computed from the sample list that
    # every rank knows, so N processes x accumulation give the same gradient as one big batch.
    n_global = sum(len(samples[i].caption_ids) + 1 for i in batch_ids) + \
        sum(len(text_samples[i].caption_ids) + 1 for i in text_ids)
    mine, mine_text = batch_ids[rank::world], text_ids[rank::world]
    micro = cfg.micro_batch or len(mine)
    chunks = [(mine[i:i + micro], mine_text[i * len(mine_text) // len(mine):(i + micro) * len(mine_text) // len(mine)])
              for i in range(0, len(mine), micro)]
    # tokens: labelled positions; context: non-padding positions x row width (what a masked attention kernel
    # computes); attended: query-key pairs per-document causal attention needs (step_flops counts these)
    counts = {"tokens": 0, "positions": 0, "padding": 0, "images": 0, "context": 0, "attended": 0}
    sums = torch.zeros(3, device=device)                      # weighted loss x tokens, NTP loss, aux x samples
    plain = plain_path(cfg)
    if not plain and model is None:
        model = unwrap(train_model)
    nll_by_tag = torch.zeros(2, len(CATEGORIES), device=device)  # NLL sum and count per ground-truth category
    for c, (ids, tids) in enumerate(chunks):
        # Tight packing: no sample order is needed, and padding would cost as much as real tokens.
        batch = pack([samples[i] for i in ids], cfg.row_len, data.prefix, tight=True)
        image_rows, image_indices = len(batch.input_ids), batch.indices
        if tids:
            batch = cat(batch, pack([text_samples[i] for i in tids], cfg.row_len, tight=True))
        R, L = batch.input_ids.shape
        # Logits only at labelled positions, chosen here on the host (no device sync). Caption ids unique
        # over the micro-batch (row x (L + 1) + doc) keep PRIOR's per-caption normalisation on the flat list.
        keep = (batch.labels != IGNORE).flatten().nonzero().squeeze(1)
        captions = (batch.doc_ids + torch.arange(R)[:, None] * (L + 1)).flatten()[keep]
        n_local = len(keep)
        counts["tokens"] += n_local
        counts["positions"] += R * L
        padding = int((batch.input_ids == T.PAD).sum())
        counts["padding"] += padding
        counts["context"] += (R * L - padding) * L
        counts["attended"] += attended_pairs(batch.doc_ids, batch.input_ids != T.PAD)
        counts["images"] += len(image_indices)
        if not plain:  # host-side positions for the auxiliary objectives (cheap; no device sync)
            eos, slots, image_labels = host_positions(batch, image_rows)
            text = None
            if cfg.objective == "itc":  # the same captions without their images, in the images' order
                tb = pack([samples[i] for i in image_indices], cfg.row_len)
                text = tuple(to_device(t, device) for t in
                             (tb.input_ids, tb.position_ids, tb.doc_ids,
                              (tb.labels == T.EOS).flatten().nonzero().squeeze(1)))
        batch.to(device)
        keep, captions = to_device(keep, device), to_device(captions, device)
        if data.features is not None:  # the frozen encoder's output, read instead of computed (data/features.py)
            pixels = to_device(data.features[image_indices], device)
        else:
            pixels = normalize(to_device(data.images[image_indices], device))
        weights = loss_weights(cfg, batch, data.rare_table)
        if tids:  # text-only rows train with plain NTP in every arm
            weights[image_rows:] = 1.0
        labels = batch.labels.flatten()[keep][None]
        sync = c == len(chunks) - 1 or world == 1
        ctx = train_model.no_sync() if (world > 1 and not sync and not fsdp) else torch.enable_grad()
        if fsdp:  # FSDP2's no_sync: keep full gradients until the last micro-batch, then reduce-scatter once
            train_model.set_requires_gradient_sync(sync)
        with ctx:
            aux = None
            if plain:
                with autocast(device):
                    logits = train_model(batch.input_ids, pixels, batch.position_ids, batch.doc_ids, keep=keep)[None]
                loss = weighted_loss(logits, labels, weights.flatten()[keep][None], captions[None],
                                     scale_by_k=not cfg.no_k)
                total = loss * n_local / n_global * world
            else:
                mb = MicroBatch(batch.input_ids, batch.position_ids, batch.doc_ids, pixels, keep, labels,
                                captions[None],
                                weights.flatten()[keep][None], batch.p_ref.flatten()[keep][None], image_rows,
                                image_labels, len(image_indices), to_device(eos, device),
                                to_device(slots, device), text)
                logits, loss, aux = micro_batch_loss(cfg, model, train_model, mb, device)
                total = loss * n_local / n_global * world
                if aux is not None:
                    total = total + cfg.aux_weight * aux * (len(ids) / cfg.batch_size * world)
            total.backward()
        with torch.no_grad():
            per_token = token_losses(logits.detach(), labels)[0]
            aux_sum = aux.detach().float() * len(ids) if aux is not None else torch.zeros((), device=device)
            sums += torch.stack([loss.detach() * n_local, per_token.sum(), aux_sum])
            t = batch.tags.flatten()[keep]
            known = t >= 0  # masks, not boolean indexing: that would wait for the GPU
            nll_by_tag[0].index_add_(0, t.clamp(min=0), torch.where(known, per_token, 0.0))
            nll_by_tag[1].index_add_(0, t.clamp(min=0), known.float())
    stats = dict(zip(("loss", "ntp", "aux"), sums.tolist()), **counts)  # the one device sync of the step
    return stats, nll_by_tag, batch_ids


def shard(model, opt, cfg, device):
    """FSDP2: fully_shard each decoder block, then the root (encoder, projector, embeddings, final norm: one
    unit). Each process keeps 1/world of every weight, gradient and optimizer moment; a block's full weights
    are gathered just for its forward and backward. Weights stay fp32 in the all-gathers (no
    MixedPrecisionPolicy): under autocast the matmuls run in bf16 anyway, while norms, embeddings and the
    residual stream keep fp32. fully_shard swaps the parameters for sharded ones, so the optimizer is made
    again over them, carrying over the state `opt` holds when resuming (by parameter name)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    full = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, opt, options=full) if opt.state else None
    # An explicit mesh: fully_shard's default is a CUDA mesh whenever CUDA exists, even for --device cpu.
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    for block in model.decoder.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    if state is not None:
        set_optimizer_state_dict(model, opt, state, options=full)
    return opt


def full_state(model, opt, sharded):
    """Weights and optimizer state as one unsharded process holds them. Sharded (FSDP): a collective that every
    rank must join, gathering full tensors onto rank 0's CPU (the others get empty dicts), so a checkpoint
    of a sharded run loads anywhere (load_model, eval.py, a run without --fsdp); the optimizer state is then
    keyed by parameter name, which --resume reads with or without --fsdp."""
    if not sharded:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=gather), get_optimizer_state_dict(model, opt, options=gather)


def main(cfg):
    device = pick_device(cfg.device)
    check_bf16(device)
    rank, world, device = setup_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    master = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.fsdp and world > 1 and (cfg.loss == "cal" or cfg.objective != "none"):
        raise ValueError("--fsdp with several processes does not support --loss cal or an --objective (their extra "
                         "forwards and heads run outside the sharded forward); use DDP (drop --fsdp)")
    if cfg.feature_cache and (cfg.arch != "h" or cfg.train != "projector" or cfg.objective == "recon"):
        raise ValueError("--feature-cache needs --arch h with a frozen encoder (--train projector), and no --objective "
                         "recon (it reads the pixels)")
    if not 0 < cfg.rho1_keep <= 1:
        raise ValueError(f"--rho1-keep must be in (0, 1], got {cfg.rho1_keep}")
    last_path = os.path.join(cfg.out_dir, "last.pt")
    state = None
    if cfg.resume and os.path.exists(last_path):  # before anything is built: a changed flag is refused at once
        state = load_checkpoint(last_path, "vlm")
        check_resume(cfg, state, last_path)
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)
    # The model first: its encoder decides the image size (a timm model's, or --init-encoder's ViT).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok).to(device)
    if len(model.image_tokens()) + 2 > cfg.row_len:
        raise ValueError(f"an image takes {len(model.image_tokens())} tokens: --row-len {cfg.row_len} leaves no "
                         f"room for a caption; raise --row-len")

    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    data_fp = text_fingerprint(records)
    p_ref, inputs = None, {}  # inputs: fingerprints of what else the run read, checked by --resume
    if cfg.loss in ("prior", "prior_shuffled", "rho1"):
        p_ref = load_scores(cfg.scores, T.fingerprint(tok), data_fp, cfg.data)
        inputs["scores"] = file_fingerprint(cfg.scores)
        if cfg.loss == "prior_shuffled":
            p_ref = shuffle_within_captions(p_ref)
    elif cfg.loss == "attn":  # per-token weights in score-file format: they ride in the p_ref field
        p_ref = load_scores(cfg.attn_scores, T.fingerprint(tok), data_fp, cfg.data)
        inputs["attn_scores"] = file_fingerprint(cfg.attn_scores)
    if cfg.image_cache and world > 1 and not master:
        # rank 0 decodes into the file, the others wait for it (polling, not a barrier: decoding a large set can
        # outlast a collective's timeout; if rank 0 fails, torchrun stops the others)
        while not images_cached(records, model.cfg.image_size, cfg.image_cache):
            time.sleep(1.0)
    records, images = load_images(records, model.cfg.image_size, cfg.max_bad_fraction, cfg.workers, cfg.image_cache)
    features = encoder_features(model.encoder, images, cfg.feature_cache, device) if cfg.feature_cache else None
    tags = token_tags(tok, records)
    if cfg.loss == "oracle" and tags is None:
        raise ValueError(f"--loss oracle needs the generator's ground-truth 'tags' field in {cfg.data}")
    samples = make_samples(tok, records, p_ref, tags)
    if p_ref is not None:
        bad = next((s for s in samples if len(s.p_ref) != len(s.caption_ids) + 1), None)
        if bad is not None:
            raise ValueError(f"{cfg.attn_scores if cfg.loss == 'attn' else cfg.scores}: record {records[bad.index].id} "
                             f"has {len(bad.p_ref)} scores for "
                             f"{len(bad.caption_ids) + 1} tokens")
    text_samples = []
    if cfg.text_data:
        text_records = read_records(cfg.text_data, require_image=False, check_files=False,
                                    max_bad_fraction=cfg.max_bad_fraction)
        text_samples = make_samples(tok, text_records)
        inputs["text_data"] = text_fingerprint(text_records)
    for what, group, room in (("image-caption", samples, cfg.row_len - len(model.image_tokens())),
                              ("text-only", text_samples, cfg.row_len)):
        n_long, lost = count_overlong(group, room)  # pack() keeps their first tokens and <|eos|>
        if n_long and master:
            print(f"warning: {n_long} of {len(group)} {what} samples are longer than --row-len {cfg.row_len} "
                  f"allows ({room} positions after the image); training keeps their start and drops {lost} "
                  f"caption tokens in all (raise --row-len to keep them)", file=sys.stderr)
    rare_table = None
    if cfg.loss == "rare":
        rare_table = inverse_frequency_table([s.caption_ids + [T.EOS] for s in samples], tok.get_vocab_size())

    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    step = 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    if state is not None:
        check_fingerprint("caption data", state["data"], data_fp, last_path, cfg.data)
        check_fingerprint("tokenizer", state["tokenizer"], T.fingerprint(tok), last_path, cfg.tokenizer)
        for key, fp in inputs.items():  # checkpoints older than this record have no "inputs"
            if state.get("inputs", {}).get(key, fp) != fp:
                raise ValueError(f"--resume: --{key.replace('_', '-')} {getattr(cfg, key)} is not the file the run "
                                 f"in {last_path} read (fingerprint {fp}, the run's {state['inputs'][key]})")
        if VLMConfig.from_dict(state["model_config"]) != model.cfg:  # e.g. an --init-* file that changed since
            raise ValueError(f"--resume: {last_path} holds another model than these flags build "
                             f"({state['model_config']} vs {asdict(model.cfg)})")
        model.load_state_dict(state["model"])
        if state.get("optimizer_format") == "fqn":  # from an --fsdp run: keyed by parameter name
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        if master:
            trim_log(os.path.join(cfg.out_dir, "log.jsonl"), step)  # steps after the checkpoint come again
            print(f"resumed from {last_path} at step {step}")
    meta = {"model_config": asdict(model.cfg), "config": asdict(cfg), "tokenizer": T.fingerprint(tok), "data": data_fp,
            "inputs": inputs}
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"{cfg.arch}-LVLM, loss {cfg.loss}: {count_params(model) / 1e6:.2f}M params, "
              f"{count_params(model, True) / 1e6:.3f}M trainable; {len(samples)} pairs; "
              f"{world} process(es) on {device}")
    train_model = model
    sharded = cfg.fsdp and world > 1
    if cfg.fsdp and not sharded and master:
        print("--fsdp: one process, nothing to shard; training unsharded")
    if sharded:  # in place: model is now the sharded module
        opt = shard(model, opt, cfg, device)
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None)
    if cfg.compile:
        train_model = torch.compile(train_model, dynamic=True)  # batch shapes change every step (tight packing)
    data = Data(samples, images, model.image_tokens(), text_samples,
                rare_table.to(device) if rare_table is not None else None, features)
    peak = peak_flops(device, cfg.peak_tflops)
    if peak is None and device.startswith("cuda") and master:
        print(f"note: no bf16 peak known for {torch.cuda.get_device_name(device)!r}: no MFU in the log "
              f"(pass --peak-tflops)", file=sys.stderr)
    trainable = [p for p in model.parameters() if p.requires_grad]

    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    watch = master and cfg.loss != "ntp"  # the unlearning alarm (health.nll_rise) watches the weighted losses
    ntp_seen, alarm = past_ntp(log_path, step) if watch else ([], None)  # resumed: the steps so far, from the log
    log = open(log_path, "a") if master else None
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=os.path.basename(cfg.out_dir),
               disable=not master, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        stats, nll_by_tag, batch_ids = train_step(cfg, step, train_model, data, device, rank, world, model)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if sharded:  # a DTensor over the shards' gradients
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(stats["loss"]) or not torch.isfinite(grad_norm):
            last = last_path if os.path.exists(last_path) else "none yet"
            raise RuntimeError(f"non-finite loss or gradient at step {step}; batch sample ids "
                               f"{[records[i].id for i in batch_ids]}; last good checkpoint: {last}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0

        if world > 1:  # every figure in the log covers the global batch
            keys = ("loss", "ntp", "aux", "tokens", "positions", "padding", "images", "context", "attended")
            packed = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU only
            dist.all_reduce(packed)
            stats.update(zip(keys, packed.tolist()))
            dist.all_reduce(nll_by_tag)
        nll_by_tag = nll_by_tag.cpu()
        if master:
            tokens, positions, real = stats["tokens"], stats["positions"], stats["positions"] - stats["padding"]
            flops = step_flops(model, real, tokens, stats["images"], stats["attended"] / real)  # needed work
            line = {"step": step + 1, "loss": stats["loss"] / tokens, "ntp": stats["ntp"] / tokens, "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": positions / seconds,
                    "flops_per_s": flops / seconds, "seconds": seconds,
                    "pad_fraction": stats["padding"] / positions, "label_fraction": tokens / positions}
            if cfg.objective != "none":  # mean auxiliary loss per sample; the objective is loss + aux_weight x aux
                line["aux"] = stats["aux"] / cfg.batch_size
            if nll_by_tag[1].sum() > 0:
                for i, name in enumerate(CATEGORIES):
                    if nll_by_tag[1][i] > 0:
                        line[f"nll_{name}"] = float(nll_by_tag[0][i] / nll_by_tag[1][i])
            if peak:
                line["mfu"] = line["flops_per_s"] / peak
            if watch:
                ntp_seen.append(line["ntp"])
                rise = None if alarm else nll_rise(ntp_seen, cfg.warmup, window=max(5, min(20, cfg.warmup)))
                if rise:
                    alarm = line["alarm"] = nll_alarm_message(cfg.loss, *rise, step + 1)
                    tqdm.write(alarm, file=sys.stderr)
            log.write(json.dumps(line) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{line['loss']:.3f}", ntp=f"{line['ntp']:.3f}")
        done = step + 1
        scheduled, stopping = done % cfg.save_every == 0 or done == cfg.steps, done == cfg.stop_at
        if scheduled or stopping:
            model_state, opt_state = full_state(model, opt, sharded)  # sharded: every rank joins
        if master and (scheduled or stopping):
            weights_only = {"model": model_state, "step": done, **meta}
            if scheduled:  # the evaluated series: every --save-every steps and the last
                atomic_save(weights_only, os.path.join(cfg.out_dir, f"ckpt_{done:06d}.pt"))
            atomic_save({**weights_only, "optimizer": opt_state, **({"optimizer_format": "fqn"} if sharded else {}),
                         "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps},
                         "rng": {"torch": torch.get_rng_state()}}, last_path)
        if stopping:
            break
    if log:
        log.close()
    if watch and ntp_seen:
        print(f"caption NLL (ntp): {ntp_seen[0]:.3f} at step 1, {ntp_seen[-1]:.3f} at step {len(ntp_seen)}"
              + (f"\n{alarm}" if alarm else ""), file=sys.stderr if alarm else sys.stdout)
    if world > 1:
        # Tear down together: a rank that destroys its gloo connections while a peer is still in the last
        # all-reduce or writing the checkpoint can abort at exit ("terminate called without an active exception").
        dist.barrier()
        del train_model  # DDP's reducer holds the group; let it go before the group does
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main(parse_config(TrainConfig, description=__doc__))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Finished cleanly, process group destroyed, files closed: skip the interpreter's teardown, where a
        # leftover gloo thread can still abort the process ("terminate called without an active exception";
        # seen in CI about once in thirty 2-process runs) and turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
