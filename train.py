"""Train a vision-language model on image-caption pairs with NTP, PRIOR, or another token weighting.

One process (CPU or one GPU):
    python train.py --arch h --loss prior --scores out/scores_train.pt --out-dir runs/h_prior
Several GPUs, or several CPU processes (gloo):
    torchrun --standalone --nproc_per_node=4 train.py --arch h --loss prior --out-dir runs/h_prior
Several machines (run on each, with its --node_rank):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

The paper's recipes:
    H-LVLM: pretrained frozen ViT and LM, only the projector trains:
        python train.py --arch h --init-decoder out/base_lm.pt --init-encoder out/vit.pt --train projector ...
    U-LVLM: decoder from the base LM, everything trains, captions mixed 1:1 with text-only data:
        python train.py --arch u --init-decoder out/base_lm.pt --text-data data/synth/text.jsonl ...

Losses (--loss): ntp (plain next-token prediction), prior (w = (1 - p_ref)^alpha from score.py, per-caption
normalised, Eq. 4), rare (inverse token frequency, the paper's rare-word baseline), oracle (the generator's
ground truth: image-related words 1, others --oracle-low; the best any token weighting could do).

Writes to --out-dir: config.json, log.jsonl (one line per step), ckpt_<step>.pt (weights, every --save-every
steps, for eval.py) and last.pt (weights, optimizer, step and RNG: `--resume` continues bit for bit).
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
from data.packing import IGNORE, Sample, pack
from data.records import load_images, normalize, read_records
from loss import inverse_frequency_table, token_losses, weighted_loss, prior_weights
from model import DecoderConfig, VLM, VLMConfig, count_params
from reference_lm import make_optimizer
from score import load_scores, token_tags
from utils import (atomic_save, autocast, check_fingerprint, load_checkpoint, lr_at, pick_device,
                   seed_everything, text_fingerprint)


@dataclass
class TrainConfig:
    data: str = field(default="data/synth/train.jsonl", metadata={"help": "image-caption pairs (JSONL or LLaVA JSON)"})
    tokenizer: str = field(default="out/tokenizer.json", metadata={"help": "tokenizer.json"})
    scores: str = field(default="out/scores_train.pt", metadata={"help": "score.py output for --data (needed by --loss prior)"})
    out_dir: str = field(default="runs/default", metadata={"help": "where config, log and checkpoints go"})
    arch: str = field(default="h", metadata={"help": "h: ViT -> projector -> LM; u: encoder-free pixel patches -> LM", "choices": ["h", "u"]})
    loss: str = field(default="ntp", metadata={"help": "token weighting of the caption loss", "choices": ["ntp", "prior", "rare", "oracle"]})
    alpha: float = field(default=1.0, metadata={"help": "PRIOR exponent: w = (1 - p_ref)^alpha"})
    no_k: bool = field(default=False, metadata={"help": "drop the factor k (caption length) from PRIOR's normalisation (ablation)"})
    oracle_low: float = field(default=0.1, metadata={"help": "oracle weight of image-unrelated words (image-related words get 1)"})
    train: str = field(default="all", metadata={"help": "which parts train: all, or projector (encoder and decoder frozen, the paper's H-LVLM recipe)", "choices": ["all", "projector"]})
    init_decoder: str = field(default="", metadata={"help": "base-LM checkpoint from reference_lm.py to start the decoder from ('' = scratch)"})
    init_encoder: str = field(default="", metadata={"help": "vision-encoder checkpoint from vision.py to start the ViT from ('' = scratch)"})
    init_from: str = field(default="", metadata={"help": "a train.py checkpoint to start all weights from (e.g. the U-LVLM's stage 1)"})
    text_data: str = field(default="", metadata={"help": "text-only captions mixed into every batch with NTP loss ('' = none)"})
    text_ratio: float = field(default=1.0, metadata={"help": "text-only samples per image-caption sample when --text-data is set"})
    image_size: int = field(default=48, metadata={"help": "images are resized to this square size"})
    patch_size: int = field(default=8, metadata={"help": "pixels per patch side (ViT patches, or U-LVLM pixel patches)"})
    vit_dim: int = field(default=192, metadata={"help": "ViT width (scratch encoder)"})
    vit_depth: int = field(default=4, metadata={"help": "ViT depth (scratch encoder)"})
    vit_heads: int = field(default=3, metadata={"help": "ViT heads (scratch encoder)"})
    n_layer: int = field(default=4, metadata={"help": "decoder layers (scratch decoder)"})
    n_head: int = field(default=4, metadata={"help": "decoder heads (scratch decoder)"})
    d_model: int = field(default=256, metadata={"help": "decoder width (scratch decoder)"})
    batch_size: int = field(default=32, metadata={"help": "image-caption samples per optimizer step, over all processes"})
    micro_batch: int = field(default=0, metadata={"help": "samples per forward pass per process (gradient accumulation); 0 = all at once"})
    row_len: int = field(default=256, metadata={"help": "tokens per packed row"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine to lr/10"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    save_every: int = field(default=100, metadata={"help": "write ckpt_<step>.pt every N steps (the paper: 500 of 5,000)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/last.pt"})
    stop_at: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this step, e.g. to fit a time slot; --resume continues (0 = run to --steps)"})
    max_bad_fraction: float = field(default=0.01, metadata={"help": "stop if more than this share of records is bad"})
    workers: int = field(default=0, metadata={"help": "processes for decoding images at start-up"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})


def build_model(cfg, tok):
    """The VLM described by cfg, with the decoder/encoder/whole model initialised as cfg asks."""
    dcfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         d_model=cfg.d_model, max_seq_len=cfg.row_len)
    base = enc = None
    if cfg.init_decoder:
        base = load_checkpoint(cfg.init_decoder)
        check_fingerprint("tokenizer", base["tokenizer"], T.fingerprint(tok), cfg.init_decoder, cfg.tokenizer)
        dcfg = DecoderConfig(**{**base["decoder_config"], "max_seq_len": max(cfg.row_len, base["decoder_config"]["max_seq_len"])})
    vcfg = VLMConfig(arch=cfg.arch, image_size=cfg.image_size, patch_size=cfg.patch_size, vit_dim=cfg.vit_dim,
                     vit_depth=cfg.vit_depth, vit_heads=cfg.vit_heads, decoder=dcfg)
    if cfg.init_encoder:
        enc = load_checkpoint(cfg.init_encoder)
        e = enc["vit_config"]
        vcfg.image_size, vcfg.patch_size = e["image_size"], e["patch_size"]
        vcfg.vit_dim, vcfg.vit_depth, vcfg.vit_heads = e["vit_dim"], e["vit_depth"], e["vit_heads"]
    if cfg.init_from:
        start = load_checkpoint(cfg.init_from)
        check_fingerprint("tokenizer", start["tokenizer"], T.fingerprint(tok), cfg.init_from, cfg.tokenizer)
        vcfg = VLMConfig.from_dict(start["model_config"])
    model = VLM(vcfg)
    if base is not None:
        model.decoder.load_state_dict(base["model"])
    if enc is not None:
        model.encoder.load_state_dict(enc["model"])
    if cfg.init_from:
        model.load_state_dict(start["model"])
    if cfg.train == "projector":
        for name, part in model.parts().items():
            part.requires_grad_(name == "projector")
    return model


def load_model(path, device="cpu"):
    """A VLM rebuilt from a train.py checkpoint alone (config inside), plus the checkpoint dict."""
    ckpt = load_checkpoint(path)
    model = VLM(VLMConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


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


def flops_per_token(model, context):
    """Training FLOPs per token: 6 x (decoder params) for the matmuls (2 forward + 4 backward), plus
    attention scores and mixing 6 x 2 x n_layer x d_model x context (nanoGPT/PaLM accounting). Frozen
    weights still cost their forward and input-gradient passes; we keep the standard 6N for comparability."""
    d = model.decoder.cfg
    n = count_params(model.decoder) - d.vocab_size * d.d_model  # tied embedding: a lookup, counted once as head
    n += d.vocab_size * d.d_model
    return 6 * n + 12 * d.n_layer * d.d_model * context


def setup_distributed(device):
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return rank, world, device


def main(cfg):
    device = pick_device(cfg.device)
    rank, world, device = setup_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    master = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)

    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    data_fp = text_fingerprint(records)
    p_ref = load_scores(cfg.scores, T.fingerprint(tok), data_fp, cfg.data) if cfg.loss == "prior" else None
    records, images = load_images(records, cfg.image_size, cfg.max_bad_fraction, cfg.workers)
    tags = token_tags(tok, records)
    if cfg.loss == "oracle" and tags is None:
        raise ValueError(f"--loss oracle needs the generator's ground-truth 'tags' field in {cfg.data}")
    samples = make_samples(tok, records, p_ref, tags)
    if p_ref is not None:
        bad = next((s for s in samples if len(s.p_ref) != len(s.caption_ids) + 1), None)
        if bad is not None:
            raise ValueError(f"{cfg.scores}: record {records[bad.index].id} has {len(bad.p_ref)} scores for "
                             f"{len(bad.caption_ids) + 1} tokens")
    text_samples = []
    if cfg.text_data:
        text_samples = make_samples(tok, read_records(cfg.text_data, require_image=False, check_files=False))
    rare_table = None
    if cfg.loss == "rare":
        rare_table = inverse_frequency_table([s.caption_ids + [T.EOS] for s in samples], tok.get_vocab_size())

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok).to(device)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    step = 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume and os.path.exists(last_path):
        state = load_checkpoint(last_path)
        check_fingerprint("caption data", state["data"], data_fp, last_path, cfg.data)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        if master:
            print(f"resumed from {last_path} at step {step}")
    meta = {"model_config": asdict(model.cfg), "config": asdict(cfg), "tokenizer": T.fingerprint(tok), "data": data_fp}
    if master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"{cfg.arch}-LVLM, loss {cfg.loss}: {count_params(model) / 1e6:.2f}M params, "
              f"{count_params(model, True) / 1e6:.3f}M trainable; {len(samples)} pairs; {world} process(es) on {device}")
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    prefix = model.image_tokens()
    fpt = flops_per_token(model, cfg.row_len)
    trainable = [p for p in model.parameters() if p.requires_grad]

    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=os.path.basename(cfg.out_dir),
               disable=not master, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
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
        stats = {"loss": 0.0, "ntp": 0.0, "tokens": 0, "positions": 0}
        nll_by_tag = torch.zeros(3), torch.zeros(3)
        for c, (ids, tids) in enumerate(chunks):
            batch = pack([samples[i] for i in ids], cfg.row_len, prefix)
            if tids:
                text = pack([text_samples[i] for i in tids], cfg.row_len)
                for name in ("input_ids", "labels", "position_ids", "doc_ids", "p_ref", "tags"):
                    setattr(batch, name, torch.cat([getattr(batch, name), getattr(text, name)]))
            batch.to(device)
            pixels = normalize(images[batch.indices].to(device))
            sync = c == len(chunks) - 1 or world == 1
            ctx = train_model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
            with ctx:
                with autocast(device):
                    logits = train_model(batch.input_ids, pixels, batch.position_ids, batch.doc_ids)
                valid = batch.labels != IGNORE
                if cfg.loss == "ntp":
                    weights = torch.ones_like(batch.p_ref)
                elif cfg.loss == "prior":
                    weights = prior_weights(batch.p_ref, cfg.alpha)
                elif cfg.loss == "rare":
                    weights = rare_table.to(device)[batch.labels.clamp(min=0)]
                else:  # oracle: ground-truth image words 1, everything else oracle_low
                    weights = torch.where(batch.tags == 0, 1.0, cfg.oracle_low)
                if tids:  # text-only rows train with plain NTP in every arm
                    weights[len(weights) - len(text.labels):] = 1.0
                n_local = int(valid.sum())
                loss = weighted_loss(logits, batch.labels, weights, batch.doc_ids, scale_by_k=not cfg.no_k)
                (loss * n_local / n_global * world).backward()
            with torch.no_grad():
                per_token = token_losses(logits.detach(), batch.labels)
                stats["loss"] += float(loss) * n_local
                stats["ntp"] += float(per_token.sum())
                stats["tokens"] += n_local
                stats["positions"] += batch.labels.numel()
                t = batch.tags[valid]
                nll_by_tag[0].index_add_(0, t[t >= 0].cpu(), per_token[valid][t >= 0].cpu())
                nll_by_tag[1].index_add_(0, t[t >= 0].cpu(), torch.ones(int((t >= 0).sum())))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if not torch.isfinite(torch.tensor(stats["loss"])) or not torch.isfinite(grad_norm):
            last = last_path if os.path.exists(last_path) else "none yet"
            raise RuntimeError(f"non-finite loss or gradient at step {step}; batch sample ids "
                               f"{[records[i].id for i in batch_ids]}; last good checkpoint: {last}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0

        if world > 1:  # every figure in the log covers the global batch
            packed = torch.tensor([stats["loss"], stats["ntp"], stats["tokens"], stats["positions"]], dtype=torch.float64)
            dist.all_reduce(packed)
            stats.update(zip(("loss", "ntp", "tokens", "positions"), packed.tolist()))
            for x in nll_by_tag:
                dist.all_reduce(x)
        if master:
            tokens = stats["tokens"]
            line = {"step": step + 1, "loss": stats["loss"] / tokens, "ntp": stats["ntp"] / tokens, "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": stats["positions"] / seconds,
                    "flops_per_s": fpt * stats["positions"] / seconds, "seconds": seconds,
                    "pad_fraction": 1 - tokens / stats["positions"]}
            if nll_by_tag[1].sum() > 0:
                for i, name in enumerate(("image", "boiler", "noise")):
                    if nll_by_tag[1][i] > 0:
                        line[f"nll_{name}"] = float(nll_by_tag[0][i] / nll_by_tag[1][i])
            if device.startswith("cuda"):
                line["mfu"] = line["flops_per_s"] / 989e12  # H100 dense bf16 peak; see bench.py
            log.write(json.dumps(line) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{line['loss']:.3f}", ntp=f"{line['ntp']:.3f}")
        done = step + 1
        scheduled, stopping = done % cfg.save_every == 0 or done == cfg.steps, done == cfg.stop_at
        if master and (scheduled or stopping):
            weights_only = {"model": model.state_dict(), "step": done, **meta}
            if scheduled:  # the evaluated series: every --save-every steps and the last
                atomic_save(weights_only, os.path.join(cfg.out_dir, f"ckpt_{done:06d}.pt"))
            atomic_save({**weights_only, "optimizer": opt.state_dict(),
                         "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps},
                         "rng": {"torch": torch.get_rng_state()}}, last_path)
        if stopping:
            break
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main(parse_config(TrainConfig, description=__doc__))
