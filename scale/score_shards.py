"""score.py's streaming mode: the indexed score layout of data/scores.py, written in chunks by every process.

    torchrun --standalone --nproc_per_node=4 score.py --ref out/ref_lm.pt --data "shards/{000000..000099}.tar" \\
        --out out/scores_train.pt
    python score.py --stream ...     # the same layout from one process; memory stays flat as data grows

Every process reads the captions twice (data/scores.py's docstring has the layout): data_pass counts them,
fingerprints them and refuses bad ones and duplicate ids without a model; write_shard then scores record i when
i % world is its rank, --chunk captions at a time, and appends each chunk to its shard. gather_index collects
the shard summaries on rank 0, which writes the index last, so an index names only complete shards.

The scoring itself is score.py's (label_probs), handed in as a function: this module only reads, deals out and
writes, and never imports score.py.
"""
import hashlib
import os
import sys
import time
from dataclasses import asdict

import torch.distributed as dist
from tqdm import tqdm

from data.packing import count_overlong, make_samples
from data.record_types import DataError, Tally
from data.records import iter_records
from data.scores import INDEX_FORMAT, ShardWriter, shard_path
from score import (_relevance, _write_report, context_len, fingerprints_of, label_probs, overlong_note,
                   refuse_duplicate_ids, warn_if_trained_on)
from utils import atomic_save, register


def data_pass(cfg):
    """First pass: (number of records, data fingerprint), and the bad-record and duplicate-id checks.
    The fingerprint is utils.text_fingerprint's, fed one record at a time."""
    tally, h, n, ids = Tally("records", cfg.data), hashlib.sha256(), 0, []
    for r in iter_records(cfg.data, tally=tally):
        h.update(f"{r.id}\t{r.caption}\n".encode())
        ids.append(r.id)
        n += 1
    tally.finish(cfg.max_bad_fraction)
    refuse_duplicate_ids(ids, cfg.data)
    return n, h.hexdigest()[:16]


def write_shard(cfg, tok, score, ctx, n_records, fingerprints, rank, world):
    """Second pass: this process's records scored (score(samples) -> (p_ref list, positions)) and written chunk
    by chunk. Returns the shard's summary, the timing and overlong counts, and rank 0's first --report-captions
    (records, samples, p_ref) for the relevance report and picture."""
    writer = ShardWriter(shard_path(cfg.out, rank, world))
    kept = {"records": [], "samples": [], "p_ref": []}
    stats = {"positions": 0, "seconds": 0.0, "long": 0, "past": 0}

    def flush(chunk):
        samples = make_samples(tok, chunk)
        n_long, n_past = count_overlong(samples, ctx)
        t0 = time.perf_counter()
        p_ref, positions = score(samples)
        stats["seconds"] += time.perf_counter() - t0
        stats["positions"] += positions
        stats["long"] += n_long
        stats["past"] += n_past
        writer.write([r.id for r in chunk], p_ref)
        room = cfg.report_captions - len(kept["records"]) if rank == 0 else 0
        if room > 0:
            kept["records"] += chunk[:room]
            kept["samples"] += samples[:room]
            kept["p_ref"] += p_ref[:room]

    chunk = []
    bar = tqdm(total=n_records, desc=f"score (rank {rank} of {world})", dynamic_ncols=True, disable=rank != 0)
    # The second pass reads exactly the records of the first (same file, same rules): record i is rank i % world's.
    for i, r in enumerate(iter_records(cfg.data, tally=Tally("records", cfg.data))):
        bar.update()
        if i % world != rank:
            continue
        chunk.append(r)
        if len(chunk) >= cfg.chunk:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    bar.close()
    summary = writer.close(rank=rank, world=world, fingerprint=fingerprints, overlong=stats["long"])
    summary["file"] = os.path.relpath(writer.path, os.path.dirname(os.path.abspath(cfg.out)))
    return summary, stats, kept


def gather_index(cfg, summary, n_records, fingerprints, rank, world):
    """Every shard's summary to rank 0 (also the barrier: every shard is closed after this), which checks the
    count and writes the index at --out; returns the summaries on rank 0, None elsewhere."""
    summaries = [None] * world
    if world > 1:
        dist.all_gather_object(summaries, summary)
    else:
        summaries = [summary]
    if rank != 0:
        return None
    records, tokens = sum(s["records"] for s in summaries), sum(s["tokens"] for s in summaries)
    if records != n_records:
        raise DataError(f"{cfg.data}: the shards hold {records} records but the data has {n_records}: "
                        f"did the data change while scoring?")
    atomic_save({"format": INDEX_FORMAT, "shards": summaries, "records": records, "tokens": tokens,
                 "fingerprint": fingerprints}, cfg.out)
    return summaries


def score_stream(cfg, tok, score, ctx, n_records, fingerprints, rank, world):
    """This process's shard, then (rank 0) the index and the report's numbers: (report, kept captions) on rank
    0, (None, None) elsewhere. The caller has run data_pass (n_records, fingerprints' data)."""
    if rank == 0 and os.path.exists(cfg.out):  # an old index must not outlive the shards this run rewrites
        os.remove(cfg.out)
    summary, stats, kept = write_shard(cfg, tok, score, ctx, n_records, fingerprints, rank, world)
    overlong_note(stats["long"], stats["past"], ctx, f"{cfg.data} (rank {rank})")
    summaries = gather_index(cfg, summary, n_records, fingerprints, rank, world)
    if summaries is None:
        return None, None
    records, tokens = sum(s["records"] for s in summaries), sum(s["tokens"] for s in summaries)
    per_s = stats["positions"] / max(stats["seconds"], 1e-9)
    report = {"config": asdict(cfg), "captions": records, "tokens": tokens, "processes": world,
              "score_tokens_per_s": per_s, "score_tokens_per_s_all_processes": per_s * world,
              "overlong": {"captions": sum(s.get("overlong", 0) for s in summaries), "context": ctx},
              "report_captions": len(kept["records"])}
    print(f"scored {records} captions, {tokens} tokens in {world} shard(s) under "
          f"{os.path.dirname(shard_path(cfg.out, rank, world))}; rank 0 at {per_s:,.0f} tokens/s")
    return report, kept


@register("score_sharded")
def score_sharded(cfg, tok, model, ckpt, device, rank, world):
    """--stream or torchrun: one shard per process and an index, written by scale/score_shards.py with this
    file's label_probs; rank 0 reports on its first --report-captions captions."""
    n_records, data_fp = data_pass(cfg)
    if rank == 0:
        warn_if_trained_on(cfg, ckpt, data_fp)

    def score(samples):
        return label_probs(model, samples, cfg.row_len, cfg.batch_rows, device, progress=False)
    report, kept = score_stream(cfg, tok, score, context_len(model, cfg.row_len), n_records,
                                fingerprints_of(cfg, tok, data_fp), rank, world)
    if report is None:  # not rank 0
        return None
    report["ref_train_tokens_per_s"] = ckpt.get("train_tokens_per_s")
    _relevance(report, tok, kept["records"], kept["samples"], kept["p_ref"])
    _write_report(cfg, report, tok, kept["records"], kept["samples"], kept["p_ref"])
    return report
