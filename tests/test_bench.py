"""bench.py, and the speed-ups it measures: tight packing, logits at labelled positions only, torch.compile."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from data import tokenizer as T
from data.packing import IGNORE, Sample, cat, pack
from loss import prior_weights, weighted_loss
from model import VLM, Decoder, DecoderConfig, VLMConfig
from scale.flops import step_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("prior_over_ntp_step_time", "train_flops_per_s", "matmul_flops_per_s", "train_tokens_per_s",
            "score_tokens_per_s", "loader_images_per_s", "pad_fraction", "peak_memory_mb", "train_step_s_ntp",
            "train_step_s_prior", "loader_images_per_s_needed", "flops_fraction_of_matmul",
            "h_feature_cache_speedup", "h_step_s_pixels", "h_step_s_cached", "h_part_s_packing",
            "h_part_s_encoder_forward", "h_part_s_optimizer", "ref_ms_ours", "ref_ms_gpt2", "ref_ours_over_gpt2",
            # issue 23's targets: ours / GPT-2 stack, train FLOP/s / matmul FLOP/s, checkpoint eval / 30 train steps
            "decoder_over_gpt2", "train_over_matmul", "eval_over_train", "eval_s_checkpoint", "eval_train_s_interval")


def test_bench_tiny_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.bench", "--preset", "tiny", "--steps", "2",
                           "--warmup", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PRIOR / NTP step time" in done.stdout
    r = json.loads(out.read_text())
    for key in REQUIRED:
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0 or key == "pad_fraction", key
    assert 0 <= r["pad_fraction"] < 1
    assert "mfu" in r  # None on a CPU
    assert r["decoder_over_gpt2"] == r["ref_ours_over_gpt2"] and r["train_over_matmul"] == r["flops_fraction_of_matmul"]
    assert r["eval_over_train"] == r["eval_s_checkpoint"] / r["eval_train_s_interval"]
    assert r["eval_train_s_interval"] == 30 * r["h_step_s_cached"] and r["eval_benchmarks"] > 0


def test_bench_help_explains_every_flag():
    from bench import bench
    text = subprocess.run([sys.executable, "-m", "bench.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True).stdout
    for f in bench.BenchConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text


def random_samples(n, prefix_len=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(3, 30)
        out.append(Sample([rng.randrange(10, 64) for _ in range(k)], {"p_ref": [rng.random() for _ in range(k + 1)]},
                          [rng.randrange(-1, 3) for _ in range(k + 1)], i))
    return out


@pytest.mark.parametrize("n", [1, 5, 32, 100])
def test_tight_packing_holds_every_sample_intact(n):
    prefix = [T.IMAGE] * 6
    samples = random_samples(n)
    loose, tight = pack(samples, 64, prefix), pack(samples, 64, prefix, tight=True)
    assert tight.input_ids.shape[1] <= 64 and sorted(tight.indices) == list(range(n))
    assert (tight.input_ids == T.PAD).sum() <= (loose.input_ids == T.PAD).sum()
    # every sample appears once, whole, with its own labels, scores, tags and positions 0..n-1; indices list
    # the samples row by row, document by document
    k = 0
    for r in range(tight.input_ids.shape[0]):
        real = tight.input_ids[r] != T.PAD
        for d in range(len(tight.doc_ids[r][real].unique())):
            at = (tight.doc_ids[r] == d).nonzero().squeeze(1)
            s = samples[tight.indices[k]]
            k += 1
            assert at.tolist() == list(range(int(at[0]), int(at[0]) + len(at)))  # contiguous
            assert tight.input_ids[r, at].tolist() == prefix + [T.BOS] + s.caption_ids
            assert tight.labels[r, at].tolist() == [IGNORE] * 6 + s.caption_ids + [T.EOS]
            assert tight.position_ids[r, at].tolist() == list(range(len(at)))
            assert tight.inputs["p_ref"][r, at[6:]].tolist() == torch.tensor(s.inputs["p_ref"]).tolist()
            assert tight.tags[r, at[6:]].tolist() == s.tags
    assert k == n


def test_tight_packing_pads_little_on_caption_like_lengths():
    rng = random.Random(1)
    samples = [Sample([20] * rng.randint(15, 45), index=i) for i in range(32)]
    prefix = [T.IMAGE] * 36
    loose, tight = pack(samples, 256, prefix), pack(samples, 256, prefix, tight=True)
    pad = lambda b: float((b.input_ids == T.PAD).float().mean())
    assert pad(tight) < 0.05 < pad(loose)


def test_cat_pads_to_the_wider_batch():
    a = pack(random_samples(3), 64, [T.IMAGE] * 6, tight=True)
    b = pack(random_samples(20, seed=1), 64, tight=True)
    both = cat(a, b)
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])
    assert both.input_ids.shape == (len(a.input_ids) + len(b.input_ids), width)
    assert both.indices == a.indices + b.indices
    widened = both.input_ids[:len(a.input_ids), a.input_ids.shape[1]:]
    assert (widened == T.PAD).all() and (both.labels[:len(a.input_ids), a.input_ids.shape[1]:] == IGNORE).all()


def test_packed_forward_equals_each_sample_alone_with_tight_packing():
    torch.manual_seed(0)
    # float64: packed rows and single samples are matrices of other shapes, whose float32 sums differ in the last bits
    model = Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64)).double().eval()
    samples = random_samples(12)
    b = pack(samples, 64, tight=True)
    logits = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
    row_of = [(r, d) for r in range(len(b.input_ids)) for d in b.doc_ids[r][b.input_ids[r] != T.PAD].unique().tolist()]
    assert len(row_of) == len(samples)
    for (r, d), i in zip(row_of, b.indices):
        alone = model(torch.tensor([[T.BOS] + samples[i].caption_ids]))
        torch.testing.assert_close(logits[r, b.doc_ids[r] == d], alone[0], atol=1e-10, rtol=1e-10)


def test_logits_at_kept_positions_and_flat_prior_loss_match_the_full_batch():
    torch.manual_seed(0)
    # float64: the kept-positions head is a matmul of another shape than the full one
    model = Decoder(DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=64)).double().eval()
    b = pack(random_samples(10), 64, [T.IMAGE] * 6, tight=True)
    b.input_ids[b.input_ids == T.IMAGE] = 5  # a plain decoder: any token for the image slots
    full = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
    keep = (b.labels != IGNORE).flatten().nonzero().squeeze(1)
    kept = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids, keep=keep)
    torch.testing.assert_close(kept, full.flatten(0, 1)[keep], atol=1e-10, rtol=1e-10)
    R, L = b.input_ids.shape
    captions = (b.doc_ids + torch.arange(R)[:, None] * (L + 1)).flatten()[keep]
    w = prior_weights(b.inputs["p_ref"]).double()
    flat = weighted_loss(kept[None], b.labels.flatten()[keep][None], w.flatten()[keep][None], captions[None])
    # the loss itself is reduced in float32 (token_losses): the same positive per-token terms summed in another
    # order, relative error under n_tokens x 1.2e-7 (measured: 2.3e-7 on a ~4.2 loss)
    n = len(keep)
    torch.testing.assert_close(flat, weighted_loss(full, b.labels, w, b.doc_ids), atol=0, rtol=n * 1.2e-7)


def test_step_flops_counts_decoder_head_and_vision():
    model = VLM(VLMConfig())
    d = model.decoder.cfg
    one = step_flops(model, 1, 0, 0, 256)
    assert step_flops(model, 10, 0, 0, 256) == 10 * one
    assert step_flops(model, 1, 1, 0, 256) - one == 6 * d.vocab_size * d.d_model
    assert step_flops(model, 0, 0, 1, 256) > 0


def test_compile_matches_eager(tmp_path):
    """torch.compile (train.py --compile) trains like eager mode: 2 steps, same losses. Fresh processes, so no
    compiled state leaks into other tests; its own tiny data (conftest's recipe), not the session fixture,
    whose creation order another test depends on. ~20-40 s on a 2-core CPU, nearly all of it compiling.
    --loss oracle: the per-caption weighting path of PRIOR, without needing a reference LM."""
    from data import tokenizer
    from tests.conftest import write_split
    write_split(tmp_path, "train", 24, random.Random(0), with_images=True)
    tokenizer.main(["--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "tok.json"),
                    "--vocab-size", "300"])
    args = ["--data", str(tmp_path / "train.jsonl"), "--tokenizer", str(tmp_path / "tok.json"), "--loss", "oracle",
            "--image-size", "16", "--patch-size", "4", "--vit-dim", "16", "--vit-depth", "1", "--vit-heads", "2",
            "--n-layer", "1", "--n-head", "2", "--d-model", "32", "--batch-size", "8", "--row-len", "64",
            "--steps", "2", "--save-every", "2", "--device", "cpu"]
    for run in ("eager", "compiled"):
        cmd = [sys.executable, "train.py", *args, "--out-dir", str(tmp_path / run), "--compile", str(run == "compiled")]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    eager, compiled = ([json.loads(l) for l in open(tmp_path / run / "log.jsonl")] for run in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["ntp"] == pytest.approx(a["ntp"], rel=1e-4)
