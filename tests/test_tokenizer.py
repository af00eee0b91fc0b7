import pytest

from data import tokenizer as T

CAPTIONS = ["stock photo : a red circle by ann", "two blue squares at the top left , $ 12.99",
            "royalty free image of a green star"] * 20


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(CAPTIONS, vocab_size=300)


def test_round_trip(tok):
    for text in CAPTIONS[:3] + ["an unseen word: zebra 42!"]:
        ids = T.encode_captions(tok, [text])[0]
        assert tok.decode(ids).strip() == text


def test_special_tokens_first_and_never_produced_by_text(tok):
    assert [tok.token_to_id(s) for s in T.SPECIALS] == list(range(len(T.SPECIALS)))
    ids = T.encode_captions(tok, ["<|image|> <|eos|> hello"])[0]
    assert all(i >= len(T.SPECIALS) for i in ids), "special tokens must not be injectable through caption text"


def test_word_index_maps_tokens_to_their_words(tok):
    text = "two blue squares at the top left , $ 12.99"
    ids = T.encode_captions(tok, [text])[0]
    index = T.token_word_index(tok, [text])[0]
    words = text.split(" ")
    assert len(index) == len(ids)
    rebuilt = [""] * len(words)
    for token_id, w in zip(ids, index):
        rebuilt[w] += tok.decode([token_id]).strip()
    assert rebuilt == words


def test_fingerprint_and_load(tok, tmp_path):
    path = str(tmp_path / "tok.json")
    tok.save(path)
    assert T.fingerprint(T.load_tokenizer(path)) == T.fingerprint(tok)
    other = T.train_tokenizer(CAPTIONS[:3], vocab_size=280)
    assert T.fingerprint(other) != T.fingerprint(tok)
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        T.load_tokenizer(str(tmp_path / "missing.json"))


def dirty_jsonl(path, n_good=204, n_bad=3):
    """207 lines, 3 of them broken JSON (1.45%): over the default 1%, under a raised --max-bad-fraction."""
    import json
    lines = [json.dumps({"id": f"c{i}", "caption": CAPTIONS[i % 3]}) for i in range(n_good)] + ["{broken"] * n_bad
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_max_bad_fraction_is_a_flag(tmp_path):
    from data.record_types import DataError
    data = dirty_jsonl(tmp_path / "dirty.jsonl")
    with pytest.raises(DataError, match="max_bad_fraction"):
        T.main(["--data", data, "--out", str(tmp_path / "a.json"), "--vocab-size", "280"])
    T.main(["--data", data, "--out", str(tmp_path / "b.json"), "--vocab-size", "280", "--max-bad-fraction", "0.02"])
    assert T.load_tokenizer(str(tmp_path / "b.json")).get_vocab_size() <= 280


def test_a_full_disk_leaves_the_previous_tokenizer_whole(tmp_path, monkeypatch):
    """python -m data.tokenizer --out over an existing tokenizer: a failed write (a full disk) is one line, and the
    old file stays as it was (it was written in place: a cut-off file that every later step refused)."""
    import errno
    from tokenizers import Tokenizer
    data = tmp_path / "c.jsonl"
    data.write_text("".join(f'{{"caption": "a red circle number {i}"}}\n' for i in range(30)))
    out = tmp_path / "tok.json"
    T.main(["--data", str(data), "--out", str(out), "--vocab-size", "300"])
    before = out.read_bytes()

    def full(self, path, *a):
        open(path, "w").write('{"version": "1.0", "trunc')  # part of the file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Tokenizer, "save", full)
    with pytest.raises(ValueError, match="no space left"):
        T.main(["--data", str(data), "--out", str(out), "--vocab-size", "301"])
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "tok.json"]
