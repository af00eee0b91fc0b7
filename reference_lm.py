"""Train a text-only decoder LM on captions: the PRIOR reference LM (the paper's Eq. 2), or the base LM.

    python reference_lm.py --data data/synth/ref.jsonl --out out/ref_lm.pt     # reference LM (scores captions)
    python reference_lm.py --data data/synth/text.jsonl --out out/base_lm.pt   # base LM the VLMs start from
    torchrun --standalone --nproc_per_node=8 -m scale reference_lm --fsdp --grad-checkpoint --init-decoder hf:FOLDER ...

Writes --out (the weights of the step with the best validation NLL, "kept_step", with this config, the decoder
config and the tokenizer's and captions' fingerprints) and beside it a .json of the validation history. The
reference LM must train on captions disjoint from those it scores: on memorised captions p_ref is inflated and
every weight shrinks. --steps 0 sizes the run to the data (docs/own_data.md, docs/performance.md).
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import tokenizer as T
from utils import (RefChecks, UserError, atomic_save, atomic_write, autocast, check_fingerprint, check_out, flag,
                   full_weights, global_mean, load_checkpoint, lr_at, make_optimizer, memorising, pick_device, run,
                   seed_everything, setup_distributed, plugin, text_fingerprint, val_split_size, wrap)
from data.packing import make_samples, pack
from data.records import read_records
from loss import ntp_loss
from model import Decoder, DecoderConfig, count_params


MAX_EPOCHS, MAX_STEPS = 40, 600  # sized runs: 150 captions -> 40 steps; 10,000 captions -> 600 (docs/performance.md)


@dataclass
class RefConfig(RefChecks):
    data: str = flag("data/synth/ref.jsonl",
                     "caption file(s), comma-separated: JSONL, LLaVA or COCO JSON, or .tar shards; images are not read")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json from data/tokenizer.py")
    out: str = flag("out/ref_lm.pt", "checkpoint to write")
    val_fraction: float = flag(0.05, "share of captions held out for validation (at least 64, at most a quarter)")
    n_layer: int = flag(4, "decoder layers")
    n_head: int = flag(4, "attention heads")
    d_model: int = flag(256, "decoder width")
    row_len: int = flag(256, "tokens per packed row")
    batch_rows: int = flag(16, "packed rows per optimizer step")
    steps: int = flag(
        0, "optimizer steps (0 = sized to the data: --max-epochs passes over the training rows, at most 600)")
    max_epochs: float = flag(MAX_EPOCHS, "with --steps 0: passes over the training captions' packed rows")
    lr: float = flag(2e-3, "peak learning rate (AdamW)")
    warmup: int = flag(50, "linear warm-up steps")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices")
    eval_every: int = flag(
        0, "validate every N steps, the checkpoint keeps the best (0 = a tenth of sized steps, else 200)")
    patience: int = flag(3, "stop after this many validations without a better NLL (0 = run all --steps)")
    init_decoder: str = flag(
        "", "start from this LM: hf:FOLDER (Hugging Face Llama, scale/hf.py) or a reference_lm.py checkpoint")
    seed: int = flag(0, "random seed")
    device: str = flag("auto", "auto, cpu or cuda")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of a file's records is bad")
    grad_checkpoint: bool = flag(False, "recompute decoder blocks in backward: less activation memory, same numbers")
    fsdp: bool = flag(False, "with several processes, shard weights, gradients and optimizer state (FSDP2)")
    wandb: str = flag("", "also log the config and the validation history to this wandb project ('' = off)")


@torch.no_grad()
def evaluate(model, samples, row_len, device, batch_rows=32):
    """Mean NLL per token over all samples (packed, forward only)."""
    model.eval()
    batch = pack(samples, row_len)
    total, count = 0.0, 0
    for start in range(0, batch.input_ids.shape[0], batch_rows):
        rows = slice(start, start + batch_rows)
        labels = batch.labels[rows].to(device)
        with autocast(device):
            logits = model(batch.input_ids[rows].to(device), position_ids=batch.position_ids[rows].to(device),
                           doc_ids=batch.doc_ids[rows].to(device))
        n = int((labels != -100).sum())
        total += float(ntp_loss(logits, labels)) * n
        count += n
    model.train()
    return total / max(count, 1)


def size_steps(cfg, epoch_rows):
    """cfg with --steps 0 sized to the data (epoch_rows packed rows per pass): --max-epochs passes, at most
    MAX_STEPS, the warm-up at most a tenth of them; --eval-every 0: a tenth of sized steps, else 200. A given --steps
    is kept as it is (the main job passes its own), and so is everything else then."""
    sized = not cfg.steps
    if sized:  # a step of more rows than a pass has takes the whole pass (the loop re-packs for each epoch)
        per_epoch = max(1, epoch_rows // cfg.batch_rows)
        steps = max(1, min(MAX_STEPS, math.ceil(cfg.max_epochs * per_epoch)))
        cfg = replace(cfg, steps=steps, warmup=min(cfg.warmup, steps // 10))
    return replace(cfg, eval_every=cfg.eval_every or (max(1, cfg.steps // 10) if sized else 200))


def train_lm(cfg):
    check_out(cfg.out)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    master, sharded = rank == 0, cfg.fsdp and world > 1
    if cfg.batch_rows % world:
        raise UserError(f"--batch-rows {cfg.batch_rows} is not divisible by {world} processes")
    seed_everything(cfg.seed)
    tok = T.load_tokenizer(cfg.tokenizer)
    records = [r for path in cfg.data.split(",")
               for r in read_records(path, require_image=False, check_files=False,
                                     max_bad_fraction=cfg.max_bad_fraction)]
    samples = make_samples(tok, records)
    random.Random(cfg.seed).shuffle(samples)  # the held-out captions: a random share, the same for one --seed
    n_val = val_split_size(len(samples), cfg.val_fraction)
    val, train = samples[:n_val], samples[n_val:]
    given, epoch_rows = cfg.steps, len(pack(train, cfg.row_len).input_ids)
    cfg = size_steps(cfg, epoch_rows)
    if not given and master:
        print(f"--steps 0: {cfg.steps} steps of up to {cfg.batch_rows} rows ({cfg.max_epochs:g} passes over the "
              f"{epoch_rows} rows of training captions at most), validation every {cfg.eval_every}, "
              f"warm-up {cfg.warmup}")

    dcfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=cfg.n_layer, n_head=cfg.n_head,
                         d_model=cfg.d_model, max_seq_len=cfg.row_len)
    if cfg.init_decoder:  # a pretrained LM trained further on captions (the paper's reference LM: Llama-3-8B)
        base = load_checkpoint(cfg.init_decoder, "lm", "--init-decoder")  # hf:FOLDER: scale/hf.py
        check_fingerprint("tokenizer", base["tokenizer"], T.fingerprint(tok), cfg.init_decoder, cfg.tokenizer)
        dc = base["decoder_config"]
        dcfg = DecoderConfig(**{**dc, "max_seq_len": max(cfg.row_len, dc["max_seq_len"])})
    model = Decoder(dcfg)
    if cfg.init_decoder:
        model.load_state_dict(base["model"])
    model = model.to(device)
    model.grad_checkpoint = cfg.grad_checkpoint
    n_params = count_params(model)
    train_model, opt = wrap(model, make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay), cfg, world, device,
                            master)
    run = plugin("wandb", "--wandb")(cfg.wandb, {"config": asdict(cfg), "decoder_config": asdict(dcfg)},
                                     os.path.dirname(os.path.abspath(cfg.out)), os.path.basename(cfg.out)) \
        if cfg.wandb and master else None
    if master:
        print(f"LM: {n_params / 1e6:.2f}M params, {len(train)} train / {len(val)} val captions from {cfg.data}, "
              f"{world} process(es)")

    rng = random.Random(cfg.seed + 1)
    epoch, cursor, tokens_seen, t_train = None, 0, 0, 0.0
    history, best = [], None  # best: (val_nll, step, weights on the CPU) of the best validation so far
    bar = tqdm(range(cfg.steps), desc=f"train {os.path.basename(cfg.out)}", dynamic_ncols=True, disable=not master)
    for step in bar:
        if epoch is None or cursor + cfg.batch_rows > len(epoch[0]):  # new epoch: reshuffle captions and re-pack
            rng.shuffle(train)
            packed, cursor = pack(train, cfg.row_len), 0
            epoch = (packed.input_ids, packed.labels, packed.position_ids, packed.doc_ids)
        rows = [t[cursor:cursor + cfg.batch_rows] for t in epoch]
        cursor += cfg.batch_rows
        n_tokens = int((rows[1] != -100).sum())  # the step's labelled tokens, over all processes
        input_ids, labels, position_ids, doc_ids = (x[rank::world].to(device) for x in rows)  # this process's rows
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        t0 = time.perf_counter()
        with autocast(device):
            logits = train_model(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        # this share's mean x its share of the step's tokens x world: DDP's gradient mean is then the step's mean
        loss = ntp_loss(logits, labels) * ((labels != -100).sum() * world / n_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        tokens_seen += input_ids.numel() * world
        loss = global_mean(loss, world)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_nll = evaluate(model, val, cfg.row_len, device)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_nll": val_nll})
            if run is not None:
                run.log(history[-1], step=step + 1)
            if master:
                tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, val nll {val_nll:.3f}, "
                           f"val ppl {torch.tensor(val_nll).exp():.2f}")
            if not val or best is None or val_nll < best[0]:  # sharded: gathered on rank 0, every rank joins
                best = (val_nll, step + 1, full_weights(model, sharded))
            elif cfg.patience and (step + 1 - best[1]) // cfg.eval_every >= cfg.patience:
                tqdm.write(f"stopping: no better validation NLL in {cfg.patience} validations")
                break

    warning = memorising(history)
    if master:  # rank 0 writes; the others leave once it has
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
        if not sharded:  # sharded, the returned model keeps its last step's shards; the file holds the best step
            model.load_state_dict(best[2])
        kept = {"kept_step": best[1], "best_val_nll": best[0] if val else None, "val_captions": len(val)}
        print(f"kept step {best[1]} of {history[-1]['step']} (validation NLL {best[0]:.3f}, {len(val)} captions)")
        train_tokens_per_s = tokens_seen / t_train
        print(f"training throughput: {train_tokens_per_s:,.0f} tokens/s (forward + backward + step, {device})")
        atomic_save({"model": best[2] if sharded else model.state_dict(), "decoder_config": asdict(dcfg),
                     "config": asdict(cfg), "tokenizer": T.fingerprint(tok), "data": text_fingerprint(records),
                     "history": history, "train_tokens_per_s": train_tokens_per_s, **kept}, cfg.out)
        atomic_write(os.path.splitext(cfg.out)[0] + ".json", json.dumps({
            "history": history, "train_tokens_per_s": train_tokens_per_s, "params": n_params, **kept,
            "memorising": warning}, indent=1))
        print(f"saved {cfg.out}")
    if run is not None:
        run.finish()
    if world > 1:  # leave together, after rank 0 has written
        dist.barrier()
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    run(train_lm, RefConfig, description=__doc__)
