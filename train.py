"""Train a vision-language model on image-caption pairs with NTP, PRIOR, or another token weighting.

    python train.py --arch h --loss prior --scores out/scores_train.pt --out-dir runs/h_prior
    torchrun --standalone --nproc_per_node=4 train.py --arch h --loss prior --out-dir runs/h_prior  # DDP (or --fsdp)
    python train.py --arch h --init-decoder out/base_lm.pt --init-encoder out/vit.pt --train projector ...  # H-LVLM
    python train.py --arch u --init-decoder out/base_lm.pt --text-data data/synth/text.jsonl ...  # U-LVLM, 1:1 text

Losses (--loss): ntp; prior (w = (1 - p_ref)^alpha, p_ref from score.py, normalised per caption: Eq. 4);
prior_shuffled (each caption's PRIOR weights permuted among its own tokens: the control); oracle (the generator's tags:
image and glue words 1, the rest --oracle-low). The baselines register theirs: python -m baselines train ...

Writes to --out-dir: config.json, log.jsonl (a line per step; through the lab, "alarm" once if a weighted loss's
plain caption NLL rises: scale/alarm.py), ckpt_<step>.pt (weights, for eval.py), last.pt (for --resume, which
continues bit for bit) and run.lock while it runs. Resume, locks, FSDP: docs/scale.md; data formats: docs/formats.md.
"""
import atexit
import glob
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import tokenizer as T
from data.images import load_images, normalize
from data.packing import (IGNORE, cat, global_batch, make_samples, n_labels, pack, to_device, warn_overlong,
                          warn_unanswered)
from data.records import read_records
from data.scores import load_scores
from data.tags import CATEGORIES, token_tags
from loss import prior_weights, shuffle_within_captions, token_losses, weighted_loss
from model import VLMConfig, build_model, count_params
from utils import (PLUGINS, RunLog, TrainChecks, UserError, atomic_save, atomic_write, autocast,
                   check_fingerprint, check_out, file_fingerprint, flag, full_state, load_checkpoint, lr_at,
                   make_optimizer, option, pick_device, plugin, reduce_stats, run, seed_everything, setup_distributed,
                   text_fingerprint, unwrap, wait_until, wrap, exit_distributed)


@dataclass
class TrainConfig(TrainChecks):
    data: str = flag("data/synth/train.jsonl", "image-caption pairs: JSONL, LLaVA/COCO JSON or .tar shards")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json")
    scores: str = flag("out/scores_train.pt", "score.py output for --data (needed by --loss prior)")
    out_dir: str = flag("runs/default", "where config, log and checkpoints go")
    arch: str = flag("h", "h: ViT -> projector -> LM; u: encoder-free pixel patches -> LM", ["h", "u"])
    loss: str = flag("ntp", "token weighting of the caption loss: a name in train.WEIGHTINGS (see Losses, above)")
    alpha: float = flag(1.0, "PRIOR exponent: w = (1 - p_ref)^alpha")
    no_k: bool = flag(False, "drop the factor k (caption length) from PRIOR's normalisation (ablation)")
    oracle_low: float = flag(0.1, "oracle weight of boiler and noise words (image and glue words get 1)")
    train: str = flag("all", "which parts train: all, or projector (the paper's H-LVLM recipe)", ["all", "projector"])
    init_decoder: str = flag("", "base LM: a reference_lm.py checkpoint, or hf:FOLDER (scale/hf.py) ('' = scratch)")
    init_encoder: str = flag("", "ViT checkpoint from tools/vision.py to start the encoder from ('' = scratch)")
    init_from: str = flag("", "a train.py checkpoint to start all weights from (e.g. the U-LVLM's stage 1)")
    vision: str = flag("", "H-LVLM encoder: '' = the built-in ViT; 'timm:<name>' = that timm model")
    vision_weights: str = flag("", "local file with the --vision timm model's state dict; nothing is downloaded")
    vision_kwargs: str = flag("", "extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 336}'")
    text_data: str = flag("", "text-only captions mixed into every batch with NTP loss ('' = none)")
    instruct: bool = flag(False, "--data is instruction data (LLaVA conversations; benchmarks/): loss on answers only")
    text_ratio: float = flag(1.0, "text-only samples per image-caption sample when --text-data is set")
    image_size: int = flag(48, "images are resized to this square size")
    patch_size: int = flag(8, "pixels per patch side (ViT patches, or U-LVLM pixel patches)")
    tokens_per_patch: int = flag(1, "H-LVLM: image tokens the projector makes per patch (1 = LLaVA's)", min=1)
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
    grad_clip: float = flag(1.0, "gradient-norm clip (0 = no clipping)")
    save_every: int = flag(100, "write ckpt_<step>.pt every N steps (the paper: 500 of 5,000)")
    seed: int = flag(0, "seed for initialisation and data order")
    resume: bool = flag(False, "continue from out_dir/last.pt")
    overwrite: bool = flag(False, "replace the run in --out-dir (with --resume: only when it has no last.pt)")
    stop_at: int = flag(0, "stop (with a checkpoint) after this step; --resume continues (0 = run to --steps)")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")
    workers: int = flag(0, "processes for decoding images at start-up")
    image_cache: str = flag("", "keep decoded images in this memory-mapped file, reused by re-runs ('' = memory)")
    feature_cache: str = flag("", "folder caching the frozen ViT's features (--train projector; scale/features.py)")
    device: str = flag("auto", "auto, cpu or cuda")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "with several processes, shard weights, gradients and optimizer state (FSDP2)")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    peak_tflops: float = flag(0.0, "the device's dense bf16 peak in TFLOP/s for MFU (0 = scale/flops.py's by name)")
    grad_checkpoint: bool = flag(False, "recompute decoder blocks in backward: less activation memory, same numbers")
    vision_layer: int = flag(0, "--vision timm features: 0 = the final ones; -2 = the penultimate block's (LLaVA)")
    wandb: str = flag("", "also log the config and every log.jsonl line to this wandb project ('' = off)")
    stream: bool = flag(False, "decode images per batch from their files or tar shards, not all at start-up")
    # the baselines' flags (baselines/), read only with their --loss or --objective; old configs keep these names
    objective: str = flag("none", "auxiliary objective added to the caption loss (baselines/heads.py)",
                          ["none", "itm", "itc", "recon"])
    aux_weight: float = flag(1.0, "loss = caption loss + aux_weight x the --objective's loss")
    rho1_keep: float = flag(0.6, "--loss rho1: share of each micro-batch's caption tokens kept; 1 = NTP")
    itc_dim: int = flag(64, "--objective itc: width of the image and text projections")
    attn_scores: str = flag("out/attn_scores_train.pt", "--loss attn: token weights from python -m baselines.attention")


# ---- token weightings: --loss NAME is the function registered as NAME ------------------------------------------------
@dataclass
class Weighting:
    weights: Callable         # (cfg, batch, state) -> (R, L) weight of every position (only labelled ones count)
    inputs: dict              # per-token input name (Sample.inputs) -> the TrainConfig field naming its score file
    prepare: Callable = None  # (cfg, samples, records, tok, device) -> state for weights; once, may change inputs


WEIGHTINGS = {}


def weighting(name, inputs=None, prepare=None):
    """Register fn(cfg, batch, state) -> weights as `--loss name` (normalised per caption by loss.weighted_loss)."""
    def add(fn):
        WEIGHTINGS[name] = Weighting(fn, inputs or {}, prepare)
        return fn
    return add


@weighting("ntp")
def ntp_weights(cfg, batch, state):
    return torch.ones(batch.labels.shape, device=batch.labels.device)


@weighting("prior", inputs={"p_ref": "scores"})
def prior(cfg, batch, state):
    return prior_weights(batch.inputs["p_ref"], cfg.alpha)  # Eq. 4: w = (1 - p_ref)^alpha


def shuffle_p_ref(cfg, samples, records, tok, device):
    """Each caption's p_ref permuted among its own tokens (by record id): PRIOR's weights on the wrong tokens."""
    shuffled = shuffle_within_captions({records[s.index].id: torch.tensor(s.inputs["p_ref"]) for s in samples})
    for s in samples:
        s.inputs["p_ref"] = shuffled[records[s.index].id].tolist()


weighting("prior_shuffled", inputs={"p_ref": "scores"}, prepare=shuffle_p_ref)(prior)


@weighting("oracle")
def oracle(cfg, batch, state):
    # the positive control: image words and glue (their form depends on the image) 1; a reference point, not a bound
    related = (batch.tags == CATEGORIES.index("image")) | (batch.tags == CATEGORIES.index("glue"))
    return torch.where(related, 1.0, cfg.oracle_low)


@dataclass
class Data:
    samples: list                 # image-caption Samples
    images: torch.Tensor          # uint8 (N, 3, S, S); images[s.index] is s's
    prefix: list                  # the model's image placeholder tokens
    text_samples: list = field(default_factory=list)  # text-only Samples (--text-data), trained with NTP
    features: torch.Tensor = None                     # --feature-cache: the frozen encoder's (N, P, D) features
    extra: object = None          # a lab method's hook (plug-in "method": baselines/); None for a weighting alone
    state: object = None          # what the weighting's prepare returned


def method_hook(cfg, world=1):
    """The hook of a method that is more than a token weighting (baselines/' rho1, cal, --objective), or None."""
    if cfg.objective != "none" and "method" not in PLUGINS:
        plugin("method", f"--objective {cfg.objective}")
    return PLUGINS["method"](cfg, world) if "method" in PLUGINS else None


def gradient_sync(train_model, world, last):
    """The context a backward runs in: gradients are reduced once, after the last micro-batch (DDP: no_sync()
    before it; FSDP2 keeps full gradients until told, then reduce-scatters)."""
    if world > 1 and hasattr(train_model, "set_requires_gradient_sync"):
        train_model.set_requires_gradient_sync(last)
    elif world > 1 and not last:
        return train_model.no_sync()
    return torch.enable_grad()


def train_step(cfg, step, train_model, data, device, rank=0, world=1):
    """Forward and backward of this process's share of step `step`'s batch; returns (stats, nll_by_tag, batch_ids)
    and leaves the gradients for the caller to clip and step. All a step does but the optimizer, so bench.py times
    what training runs. One device sync, at the end, for the stats."""
    extra = data.extra = data.extra or method_hook(cfg)  # Data built by hand (bench, tests) has no hook yet
    # The loss is a sum over the global batch / its caption-token count, computed from the sample list every rank
    # knows, so N processes x gradient accumulation give one big batch.
    samples, texts = data.samples, data.text_samples
    batch_ids = global_batch(step, len(samples), cfg.batch_size, cfg.seed)
    n_text = int(cfg.batch_size * cfg.text_ratio) if texts else 0
    text_ids = global_batch(step, len(texts), n_text, cfg.seed + 1) if n_text else []
    n_global = sum(n_labels(samples[i]) for i in batch_ids) + sum(n_labels(texts[i]) for i in text_ids)
    mine, mine_text = batch_ids[rank::world], text_ids[rank::world]
    micro = cfg.micro_batch or len(mine)
    chunks = [(mine[i:i + micro], mine_text[i * len(mine_text) // len(mine):(i + micro) * len(mine_text) // len(mine)])
              for i in range(0, len(mine), micro)]
    counts, sums = {}, torch.zeros(3, device=device)  # weighted loss x tokens, NTP loss, aux x samples
    nll_by_tag = torch.zeros(2, len(CATEGORIES), device=device)
    for c, (ids, text_ids) in enumerate(chunks):
        batch = pack([samples[i] for i in ids], cfg.row_len, data.prefix, tight=True)  # tight: no padding
        image_rows, image_indices = len(batch.input_ids), batch.indices
        if text_ids:
            batch = cat(batch, pack([texts[i] for i in text_ids], cfg.row_len, tight=True))
        # Logits only at labelled positions, chosen on the host (no device sync). Caption ids unique over the
        # micro-batch (row x (L + 1) + doc) keep PRIOR's per-caption normalisation on the flat list.
        keep = (batch.labels != IGNORE).flatten().nonzero().squeeze(1)
        rows, width = batch.input_ids.shape
        captions = (batch.doc_ids + torch.arange(rows)[:, None] * (width + 1)).flatten()[keep]
        count_work(counts, batch, keep, len(image_indices))
        host = extra.host(batch, image_rows, image_indices, samples, device) if extra is not None else None
        batch.to(device)
        keep, captions = to_device(keep, device), to_device(captions, device)
        pixels = to_device(data.features[image_indices], device) if data.features is not None else \
            normalize(to_device(data.images[image_indices], device))  # features: the frozen encoder's output
        weights = WEIGHTINGS[cfg.loss].weights(cfg, batch, data.state)
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
            # NLL per ground-truth word tag (-1: unknown), with masks: boolean indexing would wait for the GPU
            tags = batch.tags.flatten()[keep]
            known = tags >= 0
            nll_by_tag[0].index_add_(0, tags.clamp(min=0), torch.where(known, per_token, 0.0))
            nll_by_tag[1].index_add_(0, tags.clamp(min=0), known.float())
    stats = dict(zip(("loss", "ntp", "aux"), sums.tolist()), **counts)  # the one device sync of the step
    return stats, nll_by_tag, batch_ids


def count_work(counts, batch, keep, n_images):
    """Add a micro-batch's sizes to `counts`: labelled tokens, positions, padding, images; with scale/flops.py's
    plug-in also the attention work (its FLOPs and MFU in the log)."""
    R, L = batch.input_ids.shape
    padding = int((batch.input_ids == T.PAD).sum())
    for key, n in (("tokens", len(keep)), ("positions", R * L), ("padding", padding), ("images", n_images),
                   *(PLUGINS["attention_work"](batch) if "attention_work" in PLUGINS else ())):
        counts[key] = counts.get(key, 0) + n


def open_images(cfg, records, size, master=True, world=1):
    """(records kept, uint8 images): decoded now (with --image-cache, rank 0 decodes into the file and the other
    ranks wait for it), or with --stream per batch (plug-in "stream": scale/stream.py)."""
    if cfg.stream:
        return plugin("stream", "--stream")(cfg, records, size, master, world)
    if cfg.image_cache and world > 1 and not master:
        wait_until(lambda: plugin("image_cache_ready", "--image-cache")(records, size, cfg.image_cache))
    return load_images(records, size, cfg.max_bad_fraction, cfg.workers, cfg.image_cache)


def load_data(cfg, tok, model, extra, device, master, world):
    """(records, Data, meta: config.json's dict, with fingerprints of all the run read) for the run."""
    if cfg.instruct:  # instruction data: records whose extra["pieces"] say what trains (benchmarks/instruct.py)
        records = plugin("instruct", "--instruct")(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    else:
        records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    chat_text = [r for r in records if r.image is None]  # text-only conversations of instruction data
    records = [r for r in records if r.image is not None]
    if not records:
        raise UserError(f"--data {cfg.data}: none of its {len(chat_text)} entries has an image to train on")
    data_fp = text_fingerprint(records)
    inputs, files = {}, {}  # the weighting's per-token inputs; fingerprints of what else the run read (--resume)
    how = WEIGHTINGS[cfg.loss]
    for name, source in how.inputs.items():
        inputs[name] = load_scores(getattr(cfg, source), T.fingerprint(tok), data_fp, cfg.data)
        files[source] = file_fingerprint(getattr(cfg, source))
    records, images = open_images(cfg, records, model.cfg.image_size, master, world)
    features = plugin("feature_cache", "--feature-cache")(model.encoder, images, cfg.feature_cache, device) \
        if cfg.feature_cache else None
    tags = token_tags(tok, records)
    if cfg.loss == "oracle" and tags is None:
        raise UserError(f"--loss oracle needs the generator's ground-truth 'tags' field in {cfg.data}")
    source = ", ".join(getattr(cfg, s) for s in how.inputs.values())
    samples = make_samples(tok, records, inputs, tags, source)
    text_samples = make_samples(tok, chat_text)  # --instruct: text-only conversations train as text rows
    if cfg.text_data:
        text_records = read_records(cfg.text_data, require_image=False, check_files=False,
                                    max_bad_fraction=cfg.max_bad_fraction)
        text_samples += make_samples(tok, text_records)
        files["text_data"] = text_fingerprint(text_records)
    if master:
        warn_overlong(samples, cfg.row_len, len(model.image_tokens()), "image-caption")
        warn_overlong(text_samples, cfg.row_len, 0, "text-only")
        warn_unanswered(cfg.row_len, (samples, len(model.image_tokens())), (text_samples, 0))
    state = how.prepare(cfg, samples, records, tok, device) if how.prepare is not None else None
    meta = {"model_config": asdict(model.cfg), "config": asdict(cfg), "tokenizer": T.fingerprint(tok), "data": data_fp,
            "inputs": files}
    return records, Data(samples, images, model.image_tokens(), text_samples, features, extra, state), meta


def setup(cfg, rank, world, device):
    """(model, records, data, meta, resumed state or None). Every flag is checked, and the run folder and last.pt,
    before anything is built: a mistake is refused at once."""
    check_out(cfg.out_dir, "dir", "--out-dir")
    if cfg.init_from and (cfg.init_decoder or cfg.init_encoder):  # its weights would replace theirs
        raise UserError("--init-from holds every weight: give it alone, without --init-decoder or --init-encoder")
    if cfg.fsdp and world > 1:
        plugin("fsdp", "--fsdp")
    for name, wanted in (("stream", cfg.stream), ("feature_cache", cfg.feature_cache), ("instruct", cfg.instruct),
                         ("image_cache", cfg.image_cache)):
        if wanted:  # a lab feature: its plug-in must be there before any work (utils.plugin names the way)
            plugin(name, "--" + name.replace("_", "-"))
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.feature_cache and (cfg.arch != "h" or cfg.train != "projector" or cfg.objective == "recon"):
        raise UserError("--feature-cache needs --arch h with a frozen encoder (--train projector), and no --objective "
                        "recon (it reads the pixels)")
    if cfg.loss not in WEIGHTINGS:
        raise UserError(f"--loss {cfg.loss}: no such weighting; registered: {', '.join(WEIGHTINGS)} (the baselines' "
                        f"come with python -m baselines train ...)")
    extra = method_hook(cfg, world)
    state = resume_state(cfg, extra is not None and extra.per_micro_batch())
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)  # the model first: its encoder decides the image size
    model = build_model(cfg, tok, extra).to(device)
    loaded, dec = "--init-from" if cfg.init_from else "--init-decoder", model.decoder.cfg
    for name in ("d_model", "n_layer", "n_head") if cfg.init_from or cfg.init_decoder else ():  # a loaded model's own
        if getattr(cfg, name) not in (getattr(dec, name), getattr(TrainConfig, name)):
            raise UserError(f"{option(name)} {getattr(cfg, name)}: the {loaded} model has {name} {getattr(dec, name)}")
    if cfg.row_len > dec.max_seq_len:  # --init-from: its RoPE tables end there
        raise UserError(f"--row-len {cfg.row_len}: the {loaded} model reads at most {dec.max_seq_len} tokens")
    if len(model.image_tokens()) + 2 > cfg.row_len:
        raise UserError(f"an image takes {len(model.image_tokens())} tokens: --row-len {cfg.row_len} leaves no "
                        f"room for a caption; raise --row-len")
    records, data, meta = load_data(cfg, tok, model, extra, device, rank == 0, world)
    return model, records, data, meta, state


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
        atomic_write(os.path.join(cfg.out_dir, "config.json"), json.dumps(meta, indent=1))
        print(f"{cfg.arch}-LVLM, loss {cfg.loss}: {count_params(model) / 1e6:.2f}M params, "
              f"{count_params(model, True) / 1e6:.3f}M trainable; {len(data.samples)} pairs; "
              f"{world} process(es) on {device}")
    train_model, opt = wrap(model, opt, cfg, world, device, master)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    log = RunLog(log_path, cfg.wandb, meta) if master else None
    alarm = PLUGINS["alarm"](cfg, log_path, step, master) if "alarm" in PLUGINS else None  # the lab's: scale/alarm.py
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=os.path.basename(cfg.out_dir),
               disable=not master, dynamic_ncols=True)
    for step in bar:
        t0, lr = time.perf_counter(), lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        stats, nll_by_tag, batch_ids = train_step(cfg, step, train_model, data, device, rank, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf)  # the norm, for the log
        grad_norm = grad_norm.full_tensor() if sharded else grad_norm  # a DTensor when sharded
        if not math.isfinite(stats["loss"]) or not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite loss or gradient at step {step}; batch sample ids "
                               f"{[records[i].id for i in batch_ids]}; last good checkpoint: "
                               f"{last_path if os.path.exists(last_path) else 'none yet'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        stats, nll_by_tag = reduce_stats(stats, nll_by_tag, world, device)
        if master:  # log.jsonl: losses per caption token, speed, NLL by word tag (and FLOPs, MFU: scale/flops.py)
            tokens, positions = stats["tokens"], stats["positions"]
            line = {"step": step + 1, "loss": stats["loss"] / tokens, "ntp": stats["ntp"] / tokens, "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": positions / seconds, "seconds": seconds,
                    "pad_fraction": stats["padding"] / positions, "label_fraction": tokens / positions}
            if "flops" in PLUGINS:
                line.update(PLUGINS["flops"](cfg, model, stats, seconds, device))
            if cfg.objective != "none":  # mean auxiliary loss per sample; the objective is loss + aux_weight x aux
                line["aux"] = stats["aux"] / cfg.batch_size
            for i, name in enumerate(CATEGORIES):
                if nll_by_tag[1][i] > 0:
                    line[f"nll_{name}"] = float(nll_by_tag[0][i] / nll_by_tag[1][i])
            if alarm:
                alarm.watch(line, step)
            log.write(line)  # log.jsonl, and wandb with --wandb
            bar.set_postfix(loss=f"{line['loss']:.3f}", ntp=f"{line['ntp']:.3f}")
        done = step + 1
        scheduled, stopping = done % cfg.save_every == 0 or done == cfg.steps, done == cfg.stop_at
        if scheduled or stopping:
            model_state, opt_state = full_state(model, opt, sharded)  # sharded: every rank joins
            weights_only = {"model": model_state, "step": done, **meta}  # ckpt_<step>.pt, for eval.py
            if master and scheduled:
                atomic_save(weights_only, os.path.join(cfg.out_dir, f"ckpt_{done:06d}.pt"))
            if master:  # last.pt: all --resume needs to continue bit for bit
                atomic_save({**weights_only, "optimizer": opt_state, **({"optimizer_format": "fqn"} if sharded else {}),
                             "schedule": {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps},
                             "rng": {"torch": torch.get_rng_state()}}, last_path)
            if master and scheduled and on_checkpoint is not None:
                on_checkpoint(done, model)
        if stopping:
            break
    if log:
        log.close()
        release_lock(lock)
    if alarm:
        alarm.summary()
    if world > 1:  # leave together: a rank gone while a peer is in the last all-reduce can abort it at exit
        dist.barrier()
        del train_model  # DDP's reducer holds the group; let it go before the group does
        dist.destroy_process_group()
    return model


# ---- the run folder and its checkpoints (docs/scale.md: resume, run.lock) ------------------------------------------
# Flags --resume may change: where and how the run computes, never what (same numbers). --steps may not grow: it sets
# the cosine schedule of every step.
RESUME_MAY_DIFFER = {"out_dir", "resume", "stop_at", "threads", "workers", "device", "image_cache", "compile", "fsdp",
                     "save_every", "max_bad_fraction", "overwrite", "grad_checkpoint", "wandb"}
# Files may move (a copied artefacts folder), but not change from '' to a file or back: what the run read is checked
# by fingerprint (restore), and the --init-* weights by the model's shape (last.pt holds every weight).
RESUME_PATHS = {"data", "tokenizer", "scores", "attn_scores", "text_data", "init_decoder", "init_encoder", "init_from",
                "vision_weights"}
LOCK = "run.lock"  # in --out-dir while a run writes there: {"pid", "host"} of the writer


def run_files(out_dir):
    names = [os.path.join(out_dir, n) for n in ("config.json", "log.jsonl", "last.pt")]
    return [p for p in names if os.path.exists(p)] + sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))


def check_run_dir(cfg):
    """--resume needs a last.pt; a new run needs a folder without another run's files (their log and checkpoints
    would mix with its own in eval.py --run-dir); --overwrite allows both."""
    last, old = os.path.join(cfg.out_dir, "last.pt"), run_files(cfg.out_dir)
    if cfg.resume and not os.path.exists(last) and not cfg.overwrite:
        raise UserError(f"--resume: no last.pt in {cfg.out_dir} to continue from (leave out --resume for a new run, "
                        f"or add --overwrite to start one there when there is nothing to resume)")
    if not cfg.resume and old and not cfg.overwrite:
        raise UserError(f"--out-dir {cfg.out_dir} holds another run ({', '.join(map(os.path.basename, old[:3]))}"
                        f"{', ...' if len(old) > 3 else ''}): add --resume to continue it, --overwrite to replace it, "
                        f"or give a new --out-dir")


def resume_state(cfg, per_micro_batch=False):
    """check_run_dir, then with --resume last.pt, refused under flags that would change the run; else None.
    per_micro_batch: the loss depends on how the batch is split (baselines.Baseline.per_micro_batch)."""
    check_run_dir(cfg)
    path = os.path.join(cfg.out_dir, "last.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    state = load_checkpoint(path, "vlm")
    old = state.get("config", {})
    may_differ = RESUME_MAY_DIFFER | (set() if per_micro_batch else {"micro_batch"})
    changed = [(k, old[k], v) for k, v in asdict(cfg).items() if k not in may_differ and k in old and
               old[k] != v and (k not in RESUME_PATHS or bool(old[k]) != bool(v))]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, a, b in changed)
        raise UserError(f"--resume: {path} is a run with other flags ({flags}); a resumed run keeps the flags that "
                        f"define it (see its config.json): give the old values, or a new --out-dir")
    return state


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def take_lock(out_dir):
    """Create out_dir/run.lock naming this process, atomically (O_EXCL). A lock of a live process is refused; one
    left on this host by a process that is gone (killed: no exit handler ran) is taken over; on another host its
    state is unknown, so it is refused. This process's own lock (a second run in one process) is its own."""
    path, me = os.path.join(out_dir, LOCK), {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            with open(path, "x") as f:  # "x": created atomically (O_EXCL), or FileExistsError
                json.dump(me, f)
            atexit.register(release_lock, path)
            return path
        except FileExistsError:
            pass
        except OSError as e:  # a full disk: no lock without its holder left behind
            if os.path.exists(path):
                os.remove(path)
            raise UserError(f"--out-dir {out_dir}: cannot write its lock {path} ({e.strerror})") from None
        try:
            with open(path) as f:
                holder = json.load(f)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):  # half-written by a writer killed at once
            holder, pid, host = None, None, me["host"]
        if holder == me:
            return path
        if host != me["host"]:
            raise UserError(f"--out-dir {out_dir} is in use by process {pid} on {host} ({path}); if no run "
                            f"writes there any more, delete {path}")
        if pid is not None and _alive(pid):
            raise UserError(f"--out-dir {out_dir} is in use by process {pid} on {host} (its lock {path}): one "
                            f"run writes to a folder at a time; wait for it, or give another --out-dir")
        print(f"note: {path} was left by process {pid}, which is gone: taking it over")
        os.remove(path)
    raise UserError(f"--out-dir {out_dir}: cannot take its lock {path} (another process keeps taking it)")


def release_lock(path):
    """Remove the lock if it is still this process's (at the end of a run, and at exit after a failure)."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") == os.getpid():
                os.remove(path)
    except (OSError, ValueError):
        pass


def claim_run_dir(cfg, master):
    """Once the model is built: make the folder, lock it (rank 0) and, with --overwrite and no run to resume, clear
    the old run's files. Returns the lock's path (None on other ranks)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if not master:
        return None
    lock = take_lock(cfg.out_dir)
    try:
        check_run_dir(cfg)  # again, now that no other writer can come between: one may have finished since
    except UserError:
        release_lock(lock)
        raise
    if cfg.overwrite and not (cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "last.pt"))):
        for path in run_files(cfg.out_dir):
            os.remove(path)
    return lock


def trim_log(path, step):
    """Keep the log lines up to `step` (the resumed run writes the later ones again); drop torn lines (a full disk
    or a kill while logging), so every complete line up to the last is kept."""
    if not os.path.exists(path):
        return
    with open(path, errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        n = value.get("step", 0) if isinstance(value, dict) else None
        if isinstance(n, int) and n <= step:
            kept.append(line.rstrip("\n") + "\n")
    if kept != lines:
        atomic_write(path, "".join(kept))


def restore(state, path, model, opt, cfg, meta, master=True):
    """Put last.pt (`state`, from `path`) back into model and opt, and return its step; what the run read (data,
    tokenizer, meta["inputs"]) must be what it reads now."""
    check_fingerprint("caption data", state["data"], meta["data"], path, cfg.data)
    check_fingerprint("tokenizer", state["tokenizer"], meta["tokenizer"], path, cfg.tokenizer)
    for key, fp in meta["inputs"].items():  # checkpoints older than this record have no "inputs"
        if state.get("inputs", {}).get(key, fp) != fp:
            raise UserError(f"--resume: --{key.replace('_', '-')} {getattr(cfg, key)} is not the file the run in "
                            f"{path} read (fingerprint {fp}, the run's {state['inputs'][key]})")
    if VLMConfig.from_dict(state["model_config"]) != model.cfg:  # e.g. an --init-* file that changed since
        raise UserError(f"--resume: {path} holds another model than these flags build "
                        f"({state['model_config']} vs {asdict(model.cfg)})")
    model.load_state_dict(state["model"])
    if state.get("optimizer_format") == "fqn":  # from an --fsdp run: keyed by parameter name (scale/fsdp.py)
        plugin("fsdp_load_optimizer", f"--resume from an --fsdp run's {path}")(model, opt, state["optimizer"])
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if master:
        trim_log(os.path.join(cfg.out_dir, "log.jsonl"), state["step"])
        print(f"resumed from {path} at step {state['step']}")
    return state["step"]


if __name__ == "__main__":
    run(main, TrainConfig, description=__doc__)
    exit_distributed()
