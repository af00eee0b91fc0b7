"""score.py's streaming mode: the indexed score layout, written in chunks by every process, and read back for
data.scores.load_scores (plug-ins "score_sharded" and "score_index").

    torchrun --standalone --nproc_per_node=4 -m scale score --ref out/ref_lm.pt \
        --data "shards/{000000..000099}.tar" --out out/scores_train.pt
    python -m scale score --stream ...     # the same layout from one process; memory stays flat as data grows

The layout: --out is a small index {"format", "shards": [{"file", "bytes", "sha256", "records", "tokens"}],
"fingerprint"}, and each process r of N writes <out stem>.shards/rank-0000r-of-0000N.bin: a magic line, then
frames (8-byte little-endian length + a torch.save'd dict): chunks {"ids", "offsets", "p_ref"}, then one end frame.
Records are dealt round-robin (record i to rank i % N). Every process reads the captions twice: data_pass counts
them, fingerprints them and refuses bad ones and duplicate ids without a model; write_shard then scores its share,
--chunk captions at a time. gather_index collects the shard summaries on rank 0, which writes the index last, so
an index names only complete shards; the reader checks each shard's size and sha256 against it, so a shard cut
short, missing or from another run is refused by name.
"""
import hashlib
import io
import os
import struct
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.packing import count_overlong, make_samples
from data.record_types import DataError, Tally
from data.records import iter_records
from data.scores import INDEX_FORMAT, _block, quantise
from score import (_write_report, context_len, fingerprints_of, label_probs, overlong_note,
                   refuse_duplicate_ids, warn_if_trained_on)
from utils import atomic_save, register, safe_load, setup_distributed

SHARD_MAGIC = b"PRIOR-SCORES-SHARD-1\n"


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
    p_ref, which the report checks for collapsed weights."""
    writer = ShardWriter(shard_path(cfg.out, rank, world))
    kept = []  # rank 0's first --report-captions p_ref
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
        room = cfg.report_captions - len(kept) if rank == 0 else 0
        if room > 0:
            kept.extend(p_ref[:room])

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
    return summary, stats, kept, writer


def gather_index(cfg, summary, writer, n_records, fingerprints, rank, world):
    """Every shard's summary to rank 0 (also the barrier: every shard is closed after this); rank 0 checks the
    count; then the shards take their final names and rank 0 writes the index at --out, last (the previous
    index and shards stay untouched until here). Returns the summaries on rank 0, None elsewhere."""
    summaries = [None] * world
    if world > 1:
        dist.all_gather_object(summaries, summary)
    else:
        summaries = [summary]
    records, tokens = sum(s["records"] for s in summaries), sum(s["tokens"] for s in summaries)
    if records != n_records:
        raise DataError(f"{cfg.data}: the shards hold {records} records but the data has {n_records}: "
                        f"did the data change while scoring?")
    writer.commit()
    if world > 1:
        dist.barrier()  # every shard under its final name before the index names them
    if rank != 0:
        return None
    atomic_save({"format": INDEX_FORMAT, "shards": summaries, "records": records, "tokens": tokens,
                 "fingerprint": fingerprints}, cfg.out)
    return summaries


def score_stream(cfg, tok, score, ctx, n_records, fingerprints, rank, world):
    """This process's shard, then (rank 0) the index and the report's numbers: (report, kept captions' p_ref) on
    rank 0, (None, None) elsewhere. The caller has run data_pass (n_records, fingerprints' data)."""
    summary, stats, kept, writer = write_shard(cfg, tok, score, ctx, n_records, fingerprints, rank, world)
    overlong_note(stats["long"], stats["past"], ctx, f"{cfg.data} (rank {rank})")
    summaries = gather_index(cfg, summary, writer, n_records, fingerprints, rank, world)
    if summaries is None:
        return None, None
    records, tokens = sum(s["records"] for s in summaries), sum(s["tokens"] for s in summaries)
    per_s = stats["positions"] / max(stats["seconds"], 1e-9)
    report = {"config": asdict(cfg), "captions": records, "tokens": tokens, "processes": world,
              "score_tokens_per_s": per_s, "score_tokens_per_s_all_processes": per_s * world,
              "overlong": {"captions": sum(s.get("overlong", 0) for s in summaries), "context": ctx},
              "report_captions": len(kept)}
    print(f"scored {records} captions, {tokens} tokens in {world} shard(s) under "
          f"{os.path.dirname(shard_path(cfg.out, rank, world))}; rank 0 at {per_s:,.0f} tokens/s")
    return report, kept


@register("score_sharded")
def score_sharded(cfg, tok, model, ckpt, device):
    """score.py --stream or under torchrun: one shard per process and an index, scored by score.label_probs;
    rank 0 reports on its first --report-captions captions. Under torchrun it joins the caller's process group, or
    starts one (gloo on CPU, NCCL on a GPU: it only gathers the shard summaries) and ends it."""
    rank, world, started = 0, int(os.environ.get("WORLD_SIZE", "1")), False
    if world > 1 and dist.is_initialized():  # a caller's own group: join it, leave it to the caller
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif world > 1:
        (rank, world, device), started = setup_distributed(device, bf16=False), True  # scoring runs in float32
    try:
        report = _score_shards(cfg, tok, model, ckpt, device, rank, world)
        if started:  # tear down together (see the end of train.main)
            dist.barrier()
        return report
    finally:
        if started:
            dist.destroy_process_group()


def _score_shards(cfg, tok, model, ckpt, device, rank, world):
    """score_sharded in this process's group: its shard; on rank 0 the index and the report."""
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
    _write_report(cfg, report, kept)
    return report


# ----------------------------------------------------------------------------- the shard files

def _read_frames(path):
    """Frames of a shard file (module doc), checking the magic and that no frame is cut short.
    Yields dicts; returns the sha256 of the whole file via StopIteration.value (see _load_shard)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        magic = f.read(len(SHARD_MAGIC))
        sha.update(magic)
        if magic != SHARD_MAGIC:
            raise DataError(f"{path}: not a score shard (bad magic)")
        while True:
            head = f.read(8)
            if not head:
                return sha.hexdigest()
            sha.update(head)
            if len(head) != 8:
                raise DataError(f"{path}: cut short inside a frame header")
            (n,) = struct.unpack("<Q", head)
            data = f.read(n)
            sha.update(data)
            if len(data) != n:
                raise DataError(f"{path}: cut short: a frame of {n} bytes has only {len(data)}")
            yield safe_load(io.BytesIO(data), path, "a score file", DataError)


def _load_shard(path):
    """(blocks, end frame, sha256) of one shard file; refuses a shard without its end frame."""
    blocks, end, frames = [], None, _read_frames(path)
    while True:
        try:
            frame = next(frames)
        except StopIteration as stop:
            sha = stop.value
            break
        if isinstance(frame, dict) and frame.get("end"):
            end = frame
        else:
            blocks.append(_block(path, frame))
    if end is None:
        raise DataError(f"{path}: incomplete shard (no end frame): its process stopped early; re-run score.py")
    return blocks, end, sha




@register("score_index")
def load_index(path, index):
    """The blocks of an indexed score file (data.scores.load_scores' plug-in), each shard checked against the index."""
    folder = os.path.dirname(os.path.abspath(path))
    blocks = []
    for s in index["shards"]:
        shard = os.path.join(folder, s["file"])
        if not os.path.isfile(shard):
            raise DataError(f"{path}: its shard {shard} is missing")
        size = os.path.getsize(shard)
        if size != s["bytes"]:
            raise DataError(f"{shard}: {size} bytes, but the index {path} says {s['bytes']}: the shard is cut "
                            f"short or from another run; re-run score.py")
        got, end, sha = _load_shard(shard)
        if sha != s["sha256"]:
            raise DataError(f"{shard}: content (sha256 {sha[:16]}) differs from what the index {path} recorded "
                            f"({s['sha256'][:16]}): damaged or from another run; re-run score.py")
        if sum(len(ids) for ids, _, _ in got) != s["records"]:
            raise DataError(f"{shard}: holds {sum(len(ids) for ids, _, _ in got)} records, the index says "
                            f"{s['records']}")
        blocks += got
    return blocks


def shard_path(out, rank, world):
    return os.path.join(os.path.splitext(out)[0] + ".shards", f"rank-{rank:05d}-of-{world:05d}.bin")


class ShardWriter:
    """One process's shard (module doc), written frame by frame to a temporary name and renamed by commit(), once
    every process has finished its shard: a shard under its final name is always complete, and an interrupted
    re-score leaves the previous shards and index as they were. Its size and sha256 are known without re-reading."""

    def __init__(self, path):
        self.path, self.tmp = path, path + ".tmp"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = self.records = self.tokens = 0
        self._write(SHARD_MAGIC)

    def commit(self):
        os.replace(self.tmp, self.path)

    def _write(self, data):
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def _frame(self, obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        self._write(struct.pack("<Q", len(data)))
        self._write(data)

    def write(self, ids, p_ref):
        offsets, quantised = quantise(p_ref)
        self._frame({"ids": list(ids), "offsets": offsets, "p_ref": quantised})
        self.records += len(ids)
        self.tokens += len(quantised)

    def close(self, **end):
        """The end frame; the shard stays under its temporary name until commit()."""
        self._frame({"end": True, "records": self.records, "tokens": self.tokens, **end})
        self.f.close()
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest(), "records": self.records, "tokens": self.tokens}
