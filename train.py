"""Train a vision-language model on image-caption pairs with NTP, PRIOR, or another token weighting.

One process (CPU or one GPU), or several with torchrun (DDP; --fsdp shards instead; docs/scale.md):
    python train.py --arch h --loss prior --scores out/scores_train.pt --out-dir runs/h_prior
    torchrun --standalone --nproc_per_node=4 train.py --arch h --loss prior --out-dir runs/h_prior

The paper's recipes (H: frozen pretrained ViT and LM, only the projector trains; U: all trains from the base LM,
captions mixed 1:1 with text; a timm ViT such as CLIP: --vision timm:<name> --vision-weights FILE):
    python train.py --arch h --init-decoder out/base_lm.pt --init-encoder out/vit.pt --train projector ...
    python train.py --arch u --init-decoder out/base_lm.pt --text-data data/synth/text.jsonl ...

Losses (--loss), the method and its controls here: ntp (plain next-token prediction); prior (w = (1 - p_ref)^alpha
from score.py, per-caption normalised, Eq. 4: loss.weighted_loss); prior_shuffled (each caption's PRIOR weights
permuted among its own tokens: keeps the weights, not their tokens); oracle (the generator's tags: image and glue
words 1, others --oracle-low; a reference point, not a bound). The baselines (rare, attn, rho1, cal, and the
auxiliary --objective itm, itc, recon) live in baselines/ and enter through one hook (baselines.hook).

Writes to --out-dir: config.json, log.jsonl (a line per step), ckpt_<step>.pt (weights, for eval.py), last.pt
(lib/checkpoint.py: --resume continues bit for bit).
Alarm: with a weighted loss, when the plain caption NLL (log.jsonl's "ntp") rises clearly above its level at the
end of warm-up (health.nll_rise), the run warns once and logs "alarm": it is unlearning the caption language.
Speed: python -m experiments.bench times this script's step. Data formats: docs/formats.md; own data: docs/own_data.md.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import baselines
from data import tokenizer as T
from lib.build import build_model
from lib.checkpoint import claim_run_dir, release_lock, restore, resume_state, save
from lib.cli import UserError, flag, run
from lib.flag_checks import TrainChecks
from data.features import encoder_features
from data.images import normalize
from data.stream import open_images
from data.instruct import instruct_samples, read_train_data
from data.packing import IGNORE, cat, global_batch, make_samples, n_labels, pack, to_device, warn_overlong
from data.records import read_records
from data.scores import load_scores
from data.tags import CATEGORIES, token_tags
from lib.distributed import full_state, reduce_stats, setup_distributed, unwrap, wrap
from lib.flops import count_work, peak_flops, step_flops
from lib.health import Alarm
from lib.tracking import RunLog
from loss import prior_weights, shuffle_within_captions, token_losses, weighted_loss
from model import count_params
from lib.utils import (autocast, file_fingerprint, lr_at, make_optimizer, pick_device, seed_everything,
                   text_fingerprint)


@dataclass
class TrainConfig(TrainChecks):
    data: str = flag("data/synth/train.jsonl", "image-caption pairs: JSONL, LLaVA/COCO JSON or .tar shards")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json")
    scores: str = flag("out/scores_train.pt", "score.py output for --data (needed by --loss prior)")
    out_dir: str = flag("runs/default", "where config, log and checkpoints go")
    arch: str = flag("h", "h: ViT -> projector -> LM; u: encoder-free pixel patches -> LM", ["h", "u"])
    loss: str = flag("ntp", "token weighting of the caption loss (see Losses, above)",
                     ["ntp", "prior", "prior_shuffled", "oracle", *baselines.LOSSES])
    alpha: float = flag(1.0, "PRIOR exponent: w = (1 - p_ref)^alpha")
    no_k: bool = flag(False, "drop the factor k (caption length) from PRIOR's normalisation (ablation)")
    oracle_low: float = flag(0.1, "oracle weight of boiler and noise words (image and glue words get 1)")
    train: str = flag("all", "which parts train: all, or projector (the paper's H-LVLM recipe)", ["all", "projector"])
    init_decoder: str = flag("", "base LM: a reference_lm.py checkpoint, or hf:FOLDER (lib/hf.py) ('' = scratch)")
    init_encoder: str = flag("", "ViT checkpoint from tools/vision.py to start the encoder from ('' = scratch)")
    init_from: str = flag("", "a train.py checkpoint to start all weights from (e.g. the U-LVLM's stage 1)")
    vision: str = flag("", "H-LVLM encoder: '' = the built-in ViT; 'timm:<name>' = that timm model")
    vision_weights: str = flag("", "local file with the --vision timm model's state dict; nothing is downloaded")
    vision_kwargs: str = flag("", "extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 336}'")
    text_data: str = flag("", "text-only captions mixed into every batch with NTP loss ('' = none)")
    instruct: bool = flag(False, "--data is instruction data (LLaVA conversations, data/qa.py): loss on answers only")
    text_ratio: float = flag(1.0, "text-only samples per image-caption sample when --text-data is set")
    image_size: int = flag(48, "images are resized to this square size")
    patch_size: int = flag(8, "pixels per patch side (ViT patches, or U-LVLM pixel patches)")
    vit_dim: int = flag(192, "ViT width (scratch encoder)")
    vit_depth: int = flag(4, "ViT depth (scratch encoder)")
    vit_heads: int = flag(3, "ViT heads (scratch encoder)")
    n_layer: int = flag(4, "decoder layers (scratch decoder)")
    n_head: int = flag(4, "decoder heads (scratch decoder)")
    d_model: int = flag(256, "decoder width (scratch decoder)")
    batch_size: int = flag(32, "image-caption samples per optimizer step, over all processes")
    micro_batch: int = flag(0, "samples per forward pass per process (gradient accumulation); 0 = all at once")
    row_len: int = flag(256, "tokens per packed row")
    steps: int = flag(300, "optimizer steps")
    lr: float = flag(1e-3, "peak learning rate")
    warmup: int = flag(20, "linear warm-up steps, then cosine to lr/10")
    weight_decay: float = flag(0.0, "AdamW weight decay on matrices")
    grad_clip: float = flag(1.0, "gradient-norm clip")
    save_every: int = flag(100, "write ckpt_<step>.pt every N steps (the paper: 500 of 5,000)")
    seed: int = flag(0, "seed for initialisation and data order")
    resume: bool = flag(False, "continue from out_dir/last.pt")
    overwrite: bool = flag(False, "replace the run in --out-dir (with --resume: only when it has no last.pt)")
    stop_at: int = flag(0, "stop (with a checkpoint) after this step; --resume continues (0 = run to --steps)")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")
    workers: int = flag(0, "processes for decoding images at start-up")
    image_cache: str = flag("", "keep decoded images in this memory-mapped file, reused by re-runs ('' = memory)")
    feature_cache: str = flag("", "folder caching the frozen ViT's features (--train projector; data/features.py)")
    device: str = flag("auto", "auto, cpu or cuda")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "with several processes, shard weights, gradients and optimizer state (FSDP2)")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    peak_tflops: float = flag(0.0, "the device's dense bf16 peak in TFLOP/s for MFU (0 = flops.PEAK_BF16 by name)")
    grad_checkpoint: bool = flag(False, "recompute decoder blocks in backward: less activation memory, same numbers")
    vision_layer: int = flag(0, "--vision timm features: 0 = the final ones; -2 = the penultimate block's (LLaVA)")
    wandb: str = flag("", "also log the config and every log.jsonl line to this wandb project ('' = off)")
    stream: bool = flag(False, "decode images per batch from their files or tar shards, not all at start-up")
    # ---- the baselines' flags (baselines/: Table 1's comparisons, not PRIOR); read only with their --loss or
    # --objective. Named as before, so old checkpoints' configs and the experiment drivers keep working.
    objective: str = flag("none", "auxiliary objective added to the caption loss (baselines/heads.py)",
                          ["none", "itm", "itc", "recon"])
    aux_weight: float = flag(1.0, "loss = caption loss + aux_weight x the --objective's loss")
    rho1_keep: float = flag(0.6, "--loss rho1: share of each micro-batch's caption tokens kept; 1 = NTP")
    itc_dim: int = flag(64, "--objective itc: width of the image and text projections")
    attn_scores: str = flag("out/attn_scores_train.pt", "--loss attn: token weights from python -m baselines.attention")


@dataclass
class Data:
    """What the steps draw from."""
    samples: list                 # image-caption Samples
    images: torch.Tensor          # uint8 (N, 3, S, S), decoded once at start-up; images[s.index] is s's
    prefix: list                  # the model's image placeholder tokens
    text_samples: list = field(default_factory=list)  # text-only Samples (--text-data), trained with NTP
    features: torch.Tensor = None                     # --feature-cache: the frozen encoder's (N, P, D) features
    extra: baselines.Baseline = None                  # a baseline's hook (baselines.hook), None for the core


def loss_weights(cfg, batch, extra=None):
    """Per-position token weights (R, L) of the chosen --loss (rows of text-only data get NTP's 1s later)."""
    if cfg.loss in ("prior", "prior_shuffled"):  # prior_shuffled: p_ref was permuted per caption in load_data
        return prior_weights(batch.p_ref, cfg.alpha)
    if cfg.loss == "oracle":  # ground-truth tags: image words and glue (its form depends on the image) 1
        related = (batch.tags == CATEGORIES.index("image")) | (batch.tags == CATEGORIES.index("glue"))
        return torch.where(related, 1.0, cfg.oracle_low)
    if extra is not None and cfg.loss in baselines.LOSSES:
        return extra.weights(batch)
    return torch.ones_like(batch.p_ref)  # ntp (rho1 and cal make their weights online: baselines/heads.py)


def micro_batches(cfg, step, data, rank, world):
    """Step `step`'s global batch (sample ids), this process's share split into micro-batches of (image-caption
    ids, text-only ids), and the global batch's caption-token count. The loss is a sum over the global batch / that
    count, computed from the sample list every rank knows, so N processes x accumulation give one big batch."""
    samples, texts = data.samples, data.text_samples
    batch_ids = global_batch(step, len(samples), cfg.batch_size, cfg.seed)
    n_text = int(cfg.batch_size * cfg.text_ratio) if texts else 0
    text_ids = global_batch(step, len(texts), n_text, cfg.seed + 1) if n_text else []
    n_global = sum(n_labels(samples[i]) for i in batch_ids) + sum(n_labels(texts[i]) for i in text_ids)
    mine, mine_text = batch_ids[rank::world], text_ids[rank::world]
    micro = cfg.micro_batch or len(mine)
    chunks = [(mine[i:i + micro], mine_text[i * len(mine_text) // len(mine):(i + micro) * len(mine_text) // len(mine)])
              for i in range(0, len(mine), micro)]
    return batch_ids, chunks, n_global


def gradient_sync(train_model, world, last):
    """Under DDP/FSDP, reduce gradients only after the last micro-batch: DDP's no_sync() before it; FSDP2 keeps
    full gradients until told, then reduce-scatters once. Returns the context the backward runs in."""
    if world > 1 and hasattr(train_model, "set_requires_gradient_sync"):
        train_model.set_requires_gradient_sync(last)
    elif world > 1 and not last:
        return train_model.no_sync()
    return torch.enable_grad()


def add_tag_nll(nll_by_tag, tags, per_token):
    """Sum and count of the token NLL per ground-truth word tag (tag -1 = unknown), with masks rather than boolean
    indexing, which would wait for the GPU."""
    known = tags >= 0
    nll_by_tag[0].index_add_(0, tags.clamp(min=0), torch.where(known, per_token, 0.0))
    nll_by_tag[1].index_add_(0, tags.clamp(min=0), known.float())


def prepare_hook(cfg, data, train_model, device):
    """The baselines' hook for a caller that built Data by hand (bench, tests); None for the core's losses."""
    data.extra = baselines.hook(cfg)
    if data.extra is not None:
        data.extra.prepare(data.samples, unwrap(train_model).decoder.cfg.vocab_size, device)
    return data.extra


def train_step(cfg, step, train_model, data, device, rank=0, world=1):
    """Forward and backward of step `step`: this process's share of the global batch, in micro-batches. Leaves the
    gradients in the model (the caller clips and steps); returns (stats, nll_by_tag, batch_ids). Everything a step
    does but the optimizer, so bench.py times what training runs. One device sync, at the end, for the stats."""
    extra = data.extra or prepare_hook(cfg, data, train_model, device)
    batch_ids, chunks, n_global = micro_batches(cfg, step, data, rank, world)
    counts, sums = {}, torch.zeros(3, device=device)  # weighted loss x tokens, NTP loss, aux x samples
    nll_by_tag = torch.zeros(2, len(CATEGORIES), device=device)
    for c, (ids, text_ids) in enumerate(chunks):
        batch = pack([data.samples[i] for i in ids], cfg.row_len, data.prefix, tight=True)  # tight: no padding
        image_rows, image_indices = len(batch.input_ids), batch.indices
        if text_ids:
            batch = cat(batch, pack([data.text_samples[i] for i in text_ids], cfg.row_len, tight=True))
        # Logits only at labelled positions, chosen on the host (no device sync). Caption ids unique over the
        # micro-batch (row x (L + 1) + doc) keep PRIOR's per-caption normalisation on the flat list.
        keep = (batch.labels != IGNORE).flatten().nonzero().squeeze(1)
        rows, width = batch.input_ids.shape
        captions = (batch.doc_ids + torch.arange(rows)[:, None] * (width + 1)).flatten()[keep]
        count_work(counts, batch, keep, len(image_indices))
        host = extra.host(batch, image_rows, image_indices, data.samples, device) if extra is not None else None
        batch.to(device)
        keep, captions = to_device(keep, device), to_device(captions, device)
        pixels = to_device(data.features[image_indices], device) if data.features is not None else \
            normalize(to_device(data.images[image_indices], device))  # features: the frozen encoder's output
        weights = loss_weights(cfg, batch, extra)
        weights[image_rows:] = 1.0  # text-only rows train with plain NTP in every arm
        labels = batch.labels.flatten()[keep][None]
        with gradient_sync(train_model, world, last=c == len(chunks) - 1):
            aux = None
            if extra is None:  # NTP, PRIOR, its controls: one forward, the per-caption weighted loss (Eq. 4)
                with autocast(device):
                    logits = train_model(batch.input_ids, pixels, batch.position_ids, batch.doc_ids, keep=keep)[None]
                loss = weighted_loss(logits, labels, weights.flatten()[keep][None], captions[None],
                                     scale_by_k=not cfg.no_k)
            else:
                logits, loss, aux = extra.loss(unwrap(train_model), train_model, batch, pixels, keep, labels, captions,
                                               weights, image_rows, host, device)
            total = loss * len(keep) / n_global * world
            if aux is not None:
                total = total + cfg.aux_weight * aux * (len(ids) / cfg.batch_size * world)
            total.backward()
        with torch.no_grad():
            per_token = token_losses(logits.detach(), labels)[0]
            aux_sum = aux.detach().float() * len(ids) if aux is not None else torch.zeros((), device=device)
            sums += torch.stack([loss.detach() * len(keep), per_token.sum(), aux_sum])
            add_tag_nll(nll_by_tag, batch.tags.flatten()[keep], per_token)
    stats = dict(zip(("loss", "ntp", "aux"), sums.tolist()), **counts)  # the one device sync of the step
    return stats, nll_by_tag, batch_ids


def load_data(cfg, tok, model, extra, device, master, world):
    """(records, Data, fingerprints of the files read besides --data and --tokenizer) for the run."""
    records, chat_text, make = read_train_data(cfg.data, cfg.instruct, cfg.max_bad_fraction)  # data/instruct.py
    data_fp = text_fingerprint(records)
    p_ref = weights = None
    inputs = {}  # fingerprints of what else the run read, checked by --resume
    if cfg.loss in ("prior", "prior_shuffled"):
        p_ref = load_scores(cfg.scores, T.fingerprint(tok), data_fp, cfg.data)
        inputs["scores"] = file_fingerprint(cfg.scores)
        if cfg.loss == "prior_shuffled":
            p_ref = shuffle_within_captions(p_ref)
    elif extra is not None:
        p_ref, weights = extra.token_inputs(tok, data_fp, inputs)
    records, images = open_images(cfg, records, model.cfg.image_size, master, world)  # decoded now, or per batch
    features = encoder_features(model.encoder, images, cfg.feature_cache, device) if cfg.feature_cache else None
    tags = token_tags(tok, records)
    if cfg.loss == "oracle" and tags is None:
        raise UserError(f"--loss oracle needs the generator's ground-truth 'tags' field in {cfg.data}")
    samples = make(tok, records, p_ref, tags, weights, cfg.attn_scores if cfg.loss == "attn" else cfg.scores)
    text_samples = instruct_samples(tok, chat_text)  # --instruct: text-only conversations train as text rows
    if cfg.text_data:
        text_records = read_records(cfg.text_data, require_image=False, check_files=False,
                                    max_bad_fraction=cfg.max_bad_fraction)
        text_samples += make_samples(tok, text_records)
        inputs["text_data"] = text_fingerprint(text_records)
    if master:
        warn_overlong(samples, cfg.row_len, len(model.image_tokens()), "image-caption")
        warn_overlong(text_samples, cfg.row_len, 0, "text-only")
    if extra is not None:
        extra.prepare(samples, tok.get_vocab_size(), device)
    meta = {"model_config": asdict(model.cfg), "config": asdict(cfg), "tokenizer": T.fingerprint(tok), "data": data_fp,
            "inputs": inputs}
    return records, Data(samples, images, model.image_tokens(), text_samples, features, extra), meta


def check_flags(cfg, world):
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.feature_cache and (cfg.arch != "h" or cfg.train != "projector" or cfg.objective == "recon"):
        raise UserError("--feature-cache needs --arch h with a frozen encoder (--train projector), and no --objective "
                        "recon (it reads the pixels)")


def log_line(cfg, model, step, lr, stats, nll_by_tag, grad_norm, seconds, peak):
    """log.jsonl's line for a step: losses per caption token, speed, work (FLOPs the step needed) and NLL by tag."""
    tokens, positions, real = stats["tokens"], stats["positions"], stats["positions"] - stats["padding"]
    flops = step_flops(model, real, tokens, stats["images"], stats["attended"] / real)
    line = {"step": step + 1, "loss": stats["loss"] / tokens, "ntp": stats["ntp"] / tokens, "lr": lr,
            "grad_norm": float(grad_norm), "tokens_per_s": positions / seconds, "flops_per_s": flops / seconds,
            "seconds": seconds, "pad_fraction": stats["padding"] / positions, "label_fraction": tokens / positions}
    if cfg.objective != "none":  # mean auxiliary loss per sample; the objective is loss + aux_weight x aux
        line["aux"] = stats["aux"] / cfg.batch_size
    for i, name in enumerate(CATEGORIES):
        if nll_by_tag[1][i] > 0:
            line[f"nll_{name}"] = float(nll_by_tag[0][i] / nll_by_tag[1][i])
    if peak:
        line["mfu"] = line["flops_per_s"] / peak
    return line


def setup(cfg, rank, world, device):
    """(model, records, data, meta, resumed state or None): checked flags, tokenizer, model, data."""
    check_flags(cfg, world)
    extra = baselines.hook(cfg, world)  # then the folder and last.pt, before anything is built (refused at once)
    state = resume_state(cfg, extra is not None and extra.per_micro_batch())
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)  # the model first: its encoder decides the image size
    model = build_model(cfg, tok).to(device)
    if len(model.image_tokens()) + 2 > cfg.row_len:
        raise UserError(f"an image takes {len(model.image_tokens())} tokens: --row-len {cfg.row_len} leaves no "
                        f"room for a caption; raise --row-len")
    records, data, meta = load_data(cfg, tok, model, extra, device, rank == 0, world)
    return model, records, data, meta, state


def describe(cfg, model, data, meta, world, device):
    """config.json, and a line on what trains."""
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{cfg.arch}-LVLM, loss {cfg.loss}: {count_params(model) / 1e6:.2f}M params, "
          f"{count_params(model, True) / 1e6:.3f}M trainable; {len(data.samples)} pairs; "
          f"{world} process(es) on {device}")
    if peak_flops(device, cfg.peak_tflops) is None and device.startswith("cuda"):
        print(f"note: no bf16 peak known for {torch.cuda.get_device_name(device)!r}: no MFU in the log "
              f"(pass --peak-tflops)", file=sys.stderr)


def main(cfg, on_checkpoint=None):
    """Train; on_checkpoint(step, model), if given, runs on rank 0 after each ckpt_<step>.pt (in-process eval)."""
    rank, world, device = setup_distributed(pick_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    master, sharded, last_path = rank == 0, cfg.fsdp and world > 1, os.path.join(cfg.out_dir, "last.pt")
    model, records, data, meta, state = setup(cfg, rank, world, device)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    lock = claim_run_dir(cfg, master)  # one writer per folder (run.lock)
    step = restore(state, last_path, model, opt, cfg, meta, master) if state is not None else 0
    if master:
        describe(cfg, model, data, meta, world, device)
    train_model, opt = wrap(model, opt, cfg, world, device, master)
    peak = peak_flops(device, cfg.peak_tflops)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    alarm, log = Alarm(cfg, log_path, step, master), RunLog(log_path, cfg.wandb, meta) if master else None
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=os.path.basename(cfg.out_dir),
               disable=not master, dynamic_ncols=True)
    for step in bar:
        t0, lr = time.perf_counter(), lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        stats, nll_by_tag, batch_ids = train_step(cfg, step, train_model, data, device, rank, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if sharded else grad_norm  # a DTensor when sharded
        if not math.isfinite(stats["loss"]) or not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite loss or gradient at step {step}; batch sample ids "
                               f"{[records[i].id for i in batch_ids]}; last good checkpoint: "
                               f"{last_path if os.path.exists(last_path) else 'none yet'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        stats, nll_by_tag = reduce_stats(stats, nll_by_tag, world, device)
        if master:
            line = log_line(cfg, model, step, lr, stats, nll_by_tag, grad_norm, seconds, peak)
            alarm.watch(line, step)
            log.write(line)  # log.jsonl, and wandb with --wandb
            bar.set_postfix(loss=f"{line['loss']:.3f}", ntp=f"{line['ntp']:.3f}")
        done = step + 1
        scheduled, stopping = done % cfg.save_every == 0 or done == cfg.steps, done == cfg.stop_at
        if scheduled or stopping:
            model_state, opt_state = full_state(model, opt, sharded)  # sharded: every rank joins
            if master:
                save(cfg.out_dir, done, model_state, opt_state, meta, cfg, scheduled, sharded)
            if master and scheduled and on_checkpoint is not None:
                on_checkpoint(done, model)
        if stopping:
            break
    if log:
        log.close()
        release_lock(lock)
    alarm.summary()
    if world > 1:  # leave together: a rank gone while a peer is in the last all-reduce can abort it at exit
        dist.barrier()
        del train_model  # DDP's reducer holds the group; let it go before the group does
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    run(main, TrainConfig, description=__doc__)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Finished cleanly, process group destroyed, files closed: skip the interpreter's teardown, where a
        # leftover gloo thread can still abort the process ("terminate called without an active exception";
        # seen in CI about once in thirty 2-process runs) and turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
