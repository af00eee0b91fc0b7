import os

import pytest
import torch

import score
import scale  # noqa: F401 (plug-ins: score.py --stream and under torchrun)
from scale.score_shards import data_pass
from data import tokenizer as T
from data.records import read_records
from data.record_types import DataError
from model import load_lm
from utils import text_fingerprint
from data.scores import INDEX_FORMAT, load_scores
from scale.score_shards import _load_shard


def test_scores_align_with_single_caption_forward(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    records = read_records(str(tiny["train"]))
    p_ref = load_scores(str(tiny["scores"]), T.fingerprint(tok), text_fingerprint(records))
    model, _ = load_lm(str(tiny["ref_lm"]), tok)
    model.eval()
    for r in records[:5]:
        ids = T.encode_captions(tok, [r.caption])[0]
        seq = torch.tensor([[T.BOS] + ids + [T.EOS]])
        with torch.no_grad():
            probs = model(seq[:, :-1]).softmax(-1)[0]
        expected = probs[torch.arange(len(ids) + 1), seq[0, 1:]]
        assert len(p_ref[r.id]) == len(ids) + 1  # one score per label: caption tokens, then eos
        torch.testing.assert_close(p_ref[r.id], expected, atol=2e-5, rtol=0)  # uint16 quantisation


def test_fingerprint_mismatch_names_both_sides(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    with pytest.raises(ValueError) as err:
        load_scores(str(tiny["scores"]), T.fingerprint(tok), "0123456789abcdef", "my_captions.jsonl")
    message = str(err.value)
    assert "0123456789abcdef" in message and "my_captions.jsonl" in message and str(tiny["scores"]) in message
    with pytest.raises(ValueError, match="tokenizer"):
        load_scores(str(tiny["scores"]), "ffffffffffffffff", "x")


def test_two_bytes_per_token(tiny):
    blob = torch.load(str(tiny["scores"]), weights_only=True)
    assert blob["p_ref"].dtype == torch.uint16
    assert blob["offsets"][-1] == len(blob["p_ref"])


def test_report_written(tiny):
    import json
    report = json.load(open(str(tiny["scores"]).replace(".pt", ".json")))
    assert report["score_tokens_per_s"] > 0 and 0 <= report["weights"]["tokens_near_zero"] <= 1


# ----------------------------------------------------------------------------- streaming, sharded scoring

def _cfg(tiny, out, **kw):
    base = dict(ref=str(tiny["ref_lm"]), tokenizer=str(tiny["tokenizer"]), data=str(tiny["train"]), out=str(out),
                row_len=128, device="cpu")
    return score.ScoreConfig(**{**base, **kw})


def _fps(tiny):
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    return T.fingerprint(tok), text_fingerprint(read_records(str(tiny["train"])))


def _same_scores(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0)  # other packing: float noise, then uint16


def test_stream_fingerprint_is_text_fingerprint(tiny):
    n, fp = data_pass(_cfg(tiny, "unused"))
    assert (n, fp) == (48, _fps(tiny)[1])


def test_stream_one_process_matches_one_file(tiny, tmp_path):
    out = tmp_path / "s" / "scores.pt"
    report = score.main(_cfg(tiny, out, stream=True, chunk=7))  # 48 captions: 7 chunk frames + the end frame
    index = torch.load(out, weights_only=True)
    assert index["format"] == INDEX_FORMAT and index["records"] == 48
    assert [s["file"] for s in index["shards"]] == [os.path.join("scores.shards", "rank-00000-of-00001.bin")]
    blocks, end, _ = _load_shard(str(tmp_path / "s" / index["shards"][0]["file"]))
    assert len(blocks) == 7 and end["records"] == 48
    assert report["captions"] == 48 and "weights" in report and (tmp_path / "s" / "scores.json").exists()
    _same_scores(load_scores(str(out), *_fps(tiny)), load_scores(str(tiny["scores"]), *_fps(tiny)))


def _rank_main(rank, world, port, cfg):
    """One torchrun-like process: the env torchrun would set, then score.py's main."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    score.main(cfg)


def test_two_processes_gloo_write_shards_and_index(tiny, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "scores.pt"
    mp.spawn(_rank_main, args=(2, port, _cfg(tiny, out, chunk=10)), nprocs=2)  # no --stream: torchrun implies it
    index = torch.load(out, weights_only=True)
    assert [s["records"] for s in index["shards"]] == [24, 24]  # round-robin: 48 records, 2 ranks
    assert sorted(os.listdir(tmp_path / "scores.shards")) == ["rank-00000-of-00002.bin", "rank-00001-of-00002.bin"]
    _same_scores(load_scores(str(out), *_fps(tiny)), load_scores(str(tiny["scores"]), *_fps(tiny)))


def test_index_refuses_damaged_or_foreign_shards(tiny, tmp_path):
    out = tmp_path / "scores.pt"
    score.main(_cfg(tiny, out, stream=True, chunk=16))
    tok_fp, data_fp = _fps(tiny)
    with pytest.raises(ValueError) as err:  # fingerprints are checked on the index, naming both sides
        load_scores(str(out), tok_fp, "0123456789abcdef", "my_captions.jsonl")
    assert "0123456789abcdef" in str(err.value) and "my_captions.jsonl" in str(err.value) and str(out) in str(err.value)
    shard = tmp_path / "scores.shards" / "rank-00000-of-00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])                                  # cut short
    with pytest.raises(DataError, match="cut short"):
        load_scores(str(out), tok_fp, data_fp)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF                                 # same size, other content
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=f"{shard}.*(sha256|cannot read)"):
        load_scores(str(out), tok_fp, data_fp)
    shard.unlink()                                                  # missing
    with pytest.raises(DataError, match="missing"):
        load_scores(str(out), tok_fp, data_fp)
    shard.write_bytes(good)
    assert len(load_scores(str(out), tok_fp, data_fp)) == 48  # and back to normal


def test_overlong_captions_are_scored_and_counted(tiny, tmp_path, capsys):
    import json
    rows = [json.loads(l) for l in open(tiny["train"])][:3]
    rows[1]["caption"] = " ".join(["stock photo : a red circle by ann"] * 20)  # ~140 tokens, context is 64
    for r in rows:
        r["image"] = str(tiny["root"] / r["image"])
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = score.main(_cfg(tiny, tmp_path / "s.pt", data=str(data)))
    assert report["overlong"]["captions"] == 1 and report["overlong"]["context"] == 64
    assert "1 captions are longer than the reference LM's context of 64" in capsys.readouterr().err
    tok = T.load_tokenizer(str(tiny["tokenizer"]))
    recs = read_records(str(data))
    p = load_scores(str(tmp_path / "s.pt"), T.fingerprint(tok), text_fingerprint(recs))
    ids = T.encode_captions(tok, [recs[1].caption])[0]
    long = p[recs[1].id]
    assert len(long) == len(ids) + 1  # still one score per label, so training accepts it
    # 64 positions score 64 labels; the rest (counted as labels past the context) get 0, weight 1
    assert (long[64:] == 0).all() and (long[:64] > 0).all()
    assert report["overlong"]["labels_past_context"] == len(ids) + 1 - 64 == int((long == 0).sum())
    assert report["pad_fraction"] == 0 and report["tokens"] == sum(len(p[r.id]) for r in recs) - (len(ids) + 1 - 64)
    model, _ = load_lm(str(tiny["ref_lm"]), tok)
    with torch.no_grad():
        seq = torch.tensor([[T.BOS] + ids[:63]])
        probs = model.eval()(seq).softmax(-1)[0, torch.arange(64), torch.tensor(ids[:64])]
    torch.testing.assert_close(long[:64], probs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("stream", [False, True])
def test_duplicate_record_ids_are_refused_at_scoring(tiny, tmp_path, stream):
    import json
    rows = [json.loads(l) for l in open(tiny["train"])][:4]
    for r in rows:
        r["image"] = str(tiny["root"] / r["image"])
    rows[3]["id"] = rows[1]["id"]
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=f"1 record ids appear more than once .first: '{rows[1]['id']}'"):
        score.main(_cfg(tiny, tmp_path / "s.pt", data=str(data), stream=stream))
    assert not (tmp_path / "s.pt").exists()


def test_an_interrupted_stream_rescore_keeps_the_previous_scores(tiny, tmp_path, monkeypatch):
    """score.py --stream over an existing index: until the new shards are complete, the old index and shards stay
    as they were (they were deleted first, so an interrupted re-score lost them); the new ones replace them at the
    end."""
    out = tmp_path / "scores.pt"
    score.main(_cfg(tiny, out, stream=True, chunk=16))
    before = load_scores(str(out), *_fps(tiny))
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped mid-way: one chunk scored, two to go
        return real(*args, **kw)
    real = score.label_probs
    monkeypatch.setattr("scale.score_shards.label_probs", failing)
    with pytest.raises(KeyboardInterrupt):
        score.main(_cfg(tiny, out, stream=True, chunk=16))
    after = load_scores(str(out), *_fps(tiny))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.setattr("scale.score_shards.label_probs", real)
    score.main(_cfg(tiny, out, stream=True, chunk=16))  # and a completed re-score replaces them
    assert load_scores(str(out), *_fps(tiny)).keys() == before.keys()
