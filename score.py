"""Offline token scoring: p_ref(t_i | t_<i) from the text-only reference LM for every caption token.

    python score.py --ref out/ref_lm.pt --data data/synth/train.jsonl --out out/scores_train.pt
    # big data (scale/'s plug-in): a shard file per process, scored and written in chunks (flat memory), an index
    torchrun --standalone --nproc_per_node=4 -m scale score --ref out/ref_lm.pt --data "shards/{000000..000099}.tar" \\
        --out out/scores_train.pt
    python -m scale score --stream ...     # the same streaming, sharded format from one process

Writes --out in data/scores.py's format (one score per label: caption tokens, then <|eos|>), and beside it a
report (.json: speed, captions past the context, whether the weights collapse). Captions longer than the reference
LM's context get p_ref = 0 past it (weight 1, as in NTP): counted, never dropped (docs/formats.md). How well
w = 1 - p_ref finds the generator's image words, and the paper's Fig. 1 picture: `python -m experiments.importance`.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from data import tokenizer as T
from utils import (ScoreChecks, atomic_write, check_out, file_fingerprint, flag, pick_device, plugin, run,
                   text_fingerprint, weight_collapse)
from data.packing import count_overlong, make_samples
from data.record_types import DataError
from data.records import read_records
from data.scores import save_scores
from model import load_lm


@dataclass
class ScoreConfig(ScoreChecks):
    ref: str = flag("out/ref_lm.pt", "reference LM checkpoint from reference_lm.py")
    tokenizer: str = flag("out/tokenizer.json", "tokenizer.json the reference LM was trained with")
    data: str = flag("data/synth/train.jsonl",
                     "caption data to score (the VLM's training data): .jsonl, LLaVA/COCO .json, .tar shards")
    out: str = flag("out/scores_train.pt",
                    "score file (or, with --stream / torchrun, index file) to write; report .json and .png beside it")
    row_len: int = flag(
        512, "longest caption scored whole (capped by the model's context); tokens per row of a forward pass")
    batch_rows: int = flag(16, "a forward pass holds up to row_len x batch_rows tokens (captions of one length)")
    device: str = flag("auto", "auto, cpu or cuda")
    stream: bool = flag(False,
                        "score in chunks, write a shard per process and an index at --out (always on under torchrun)")
    chunk: int = flag(2048, "with --stream: captions scored and written at a time")
    report_captions: int = flag(
        2000, "with --stream: captions (the first of rank 0's share) the report checks for collapsed weights")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of records is bad")


def context_len(model, row_len):
    """Longest sample (bos + caption, in positions) the reference LM scores in one piece."""
    return min(row_len, model.cfg.max_seq_len)


@torch.inference_mode()
def label_probs(model, samples, row_len, batch_rows, device, progress=True):
    """p_ref of every label of every sample, one tensor per sample (forward only), and the positions run. Each batch
    holds captions of one length (row_len * batch_rows tokens at most): no padding and no cross-document mask, so
    attention is the fast causal kernel over one caption. A caption longer than the context is scored on its first
    ctx labels; its later labels (and <|eos|>) get 0 (count_overlong counts them)."""
    model.eval().to(device)
    ctx = context_len(model, row_len)
    clipped = [s.caption_ids[:ctx] for s in samples]
    by_length = {}
    for i, ids in enumerate(clipped):
        by_length.setdefault(len(ids), []).append(i)
    out, positions = [None] * len(samples), 0
    bar = tqdm(total=len(samples), desc="score", dynamic_ncols=True, disable=not progress)
    for n, members in sorted(by_length.items()):
        per_batch = max(1, row_len * batch_rows // (n + 1))
        for start in range(0, len(members), per_batch):
            chunk = members[start:start + per_batch]
            # (B, n + 2); a clipped caption (n = ctx, only clipped ones are that long) ends without <|eos|>
            seqs = torch.tensor([[T.BOS] + list(clipped[i]) + ([T.EOS] if n < ctx else []) for i in chunk])
            inputs, labels = seqs[:, :-1].to(device), seqs[:, 1:].to(device)
            # float32 on every device, autocast off: under bf16 autocast p_ref moves and a score
            # file would depend on the device that wrote it. Scoring is forward only, a small share of the work.
            with torch.autocast(torch.device(device).type, enabled=False):
                logits = model(inputs)
            logp = logits.float().log_softmax(-1).gather(2, labels[..., None]).squeeze(2)
            for i, p in zip(chunk, logp.exp().cpu()):  # one score per label: those past the context get 0
                out[i] = torch.cat([p, p.new_zeros(len(samples[i].caption_ids) + 1 - len(p))])
            positions += inputs.numel()
            bar.update(len(chunk))
    bar.close()
    return out, positions


def fingerprints_of(cfg, tok, data_fp):
    """What a score file is valid for: train.py and eval.py refuse it for another tokenizer or other captions."""
    return {"tokenizer": T.fingerprint(tok), "reference": file_fingerprint(cfg.ref), "data": data_fp,
            "data_path": os.path.abspath(cfg.data), "reference_path": os.path.abspath(cfg.ref)}


def warn_if_trained_on(cfg, ckpt, data_fp):
    if ckpt["data"] == data_fp:
        print(f"WARNING: {cfg.ref} was trained on these very captions; its scores will be inflated "
              "(the paper scores captions disjoint from the reference LM's training set)")


def refuse_duplicate_ids(ids, path):
    """Scores are keyed by record id, so two records with one id cannot both be scored."""
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DataError(f"{path}: {len(dup)} record ids appear more than once (first: {dup[0]!r}); every record "
                        f"needs its own id (an \"id\" field, or leave it out to get file:line ids)")


def overlong_note(n_long, n_labels, ctx, where):
    if n_long:
        print(f"{where}: {n_long} captions are longer than the reference LM's context of {ctx} positions; "
              f"their {n_labels} labels past it got p_ref = 0 (weight 1, as in NTP)", file=sys.stderr)


def main(cfg):
    check_out(cfg.out)
    device = pick_device(cfg.device)
    tok = T.load_tokenizer(cfg.tokenizer)
    model, ckpt = load_lm(cfg.ref, tok)
    if cfg.stream or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one shard per process and an index: scale/score_shards.py's plug-in, which also sets up torchrun's group
        return plugin("score_sharded", "--stream" if cfg.stream else "torchrun")(cfg, tok, model, ckpt, device)
    # one process: everything in memory, one file out
    records = read_records(cfg.data, max_bad_fraction=cfg.max_bad_fraction)
    refuse_duplicate_ids((r.id for r in records), cfg.data)
    data_fp = text_fingerprint(records)
    warn_if_trained_on(cfg, ckpt, data_fp)
    samples = make_samples(tok, records)
    ctx = context_len(model, cfg.row_len)
    n_long, n_past = count_overlong(samples, ctx)
    t0 = time.perf_counter()
    p_ref, positions = label_probs(model, samples, cfg.row_len, cfg.batch_rows, device)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(p) for p in p_ref) - n_past  # labels scored; those past the context are counted apart
    save_scores(cfg.out, [r.id for r in records], p_ref, fingerprints_of(cfg, tok, data_fp))
    overlong_note(n_long, n_past, ctx, cfg.data)
    speed, ref_speed = positions / seconds, ckpt.get("train_tokens_per_s")
    report = {"config": asdict(cfg), "captions": len(records), "tokens": n_tokens,
              "pad_fraction": 1 - n_tokens / positions, "score_tokens_per_s": speed,
              "ref_train_tokens_per_s": ref_speed,
              "overlong": {"captions": n_long, "labels_past_context": n_past, "context": ctx}}
    print(f"scored {len(records)} captions, {n_tokens} tokens in {seconds:.1f}s: {speed:,.0f} tokens/s scoring vs "
          f"{ref_speed or float('nan'):,.0f} tokens/s reference-LM training "
          f"({speed / (ref_speed or float('nan')):.1f}x)")
    _write_report(cfg, report, p_ref)
    return report


# ----------------------------------------------------------------------------- report
def _write_report(cfg, report, p_ref):
    base = os.path.splitext(cfg.out)[0]
    if p_ref:  # do the weights collapse (a memorising reference LM)? utils.weight_collapse; numbers in the report
        report["weights"], warning = weight_collapse(p_ref)
        if warning:
            report["weights"]["warning"] = warning
            print(warning, file=sys.stderr)
    atomic_write(base + ".json", json.dumps(report, indent=1))
    print(f"saved {cfg.out}, {base}.json")


if __name__ == "__main__":
    run(main, ScoreConfig, description=__doc__)
