"""Byte-level BPE tokenizer for captions, trained with HuggingFace `tokenizers`.

    python -m data.tokenizer --data data/synth/text.jsonl,data/synth/train.jsonl --out out/tokenizer.json

Special tokens (always the first ids, in this order):
    <|pad|> <|bos|> <|eos|>          sequence plumbing
    <|image|>                        placeholder for one image embedding (a ViT token or a pixel patch)
    <|vision|> <|/vision|> <|vrow|>  image boundaries and row separator of the encoder-free model

Every later artefact (reference LM, scores, checkpoints) records `fingerprint(tok)` so a mismatched
tokenizer is refused instead of silently producing garbage.

Flags in detail: --data's formats are read by data/records.py.
"""
import hashlib
import os
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from utils import TokenizerChecks, UserError, flag

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|image|>", "<|vision|>", "<|/vision|>", "<|vrow|>"]
PAD, BOS, EOS, IMAGE, VISION, VISION_END, VROW = range(len(SPECIALS))


def train_tokenizer(captions, vocab_size=2048):
    tok = Tokenizer(models.BPE())
    # add_prefix_space: a word is tokenised the same at the start of a caption as in the middle.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer)
    tok.encode_special_tokens = True  # caption text "<|image|>" is text, never a real placeholder
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    return tok


def load_tokenizer(path):
    """A tokenizer.json from this script, or "hf:FOLDER": a Hugging Face Llama folder's, relabelled (scale/hf.py)."""
    if path.startswith("hf:"):
        from utils import plugin
        return plugin("hf_tokenizer", "--tokenizer")(path[3:], SPECIALS)[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}: make one with `python -m data.tokenizer --out {path}`")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library says "expected value at line 1 column 1", and no file name
        raise UserError(f"{path}: not a tokenizer.json ({(str(e).splitlines() or [''])[0][:200]}); make one with "
                        f"`python -m data.tokenizer --out {path}`") from None
    if [tok.token_to_id(s) for s in SPECIALS] != list(range(len(SPECIALS))):
        raise UserError(f"{path} lacks prior's special tokens {SPECIALS} at ids 0..{len(SPECIALS) - 1}")
    tok.encode_special_tokens = True
    return tok


def fingerprint(tok):
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def encode_captions(tok, captions):
    """Token ids of each caption, without bos/eos (added by the packer)."""
    return [e.ids for e in tok.encode_batch(captions, add_special_tokens=False)]


def token_word_index(tok, captions):
    """For each caption, the index of the whitespace-separated word each token belongs to.

    Lets per-word ground truth (the generator's "tags") be read per token. A byte-level token like
    'Ġred' spans the space before the word, so a token belongs to the word of its first non-space char.
    """
    out = []
    for caption, enc in zip(captions, tok.encode_batch(captions, add_special_tokens=False)):
        word_of_char, word = [], 0
        for i, ch in enumerate(caption):
            if ch == " ":
                word_of_char.append(-1)
                if i > 0 and caption[i - 1] != " ":
                    word += 1
            else:
                word_of_char.append(word)
        index = []
        for start, end in enc.offsets:
            hits = [w for w in word_of_char[start:end] if w >= 0]
            index.append(hits[0] if hits else -1)
        out.append(index)
    return out


@dataclass
class TokenizerConfig(TokenizerChecks):
    data: str = flag("data/synth/text.jsonl,data/synth/train.jsonl",
                     "comma-separated caption files (JSONL, LLaVA or COCO JSON, .tar shards) to "
                     "learn merges from")
    out: str = flag("out/tokenizer.json", "where to write tokenizer.json")
    vocab_size: int = flag(2048, "BPE vocabulary size including special tokens")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of a file's records is bad")



def main(argv=None):
    from utils import parse_config
    return build(parse_config(TokenizerConfig, argv, description=__doc__))


def build(cfg):
    from data.records import read_records
    bad = cfg.max_bad_fraction
    captions = [r.caption for path in cfg.data.split(",")
                for r in read_records(path, require_image=False, check_files=False, max_bad_fraction=bad)]
    tok = train_tokenizer(captions, cfg.vocab_size)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    tok.save(cfg.out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens from {len(captions)} captions -> {cfg.out} "
          f"(fingerprint {fingerprint(tok)})")


if __name__ == "__main__":
    from utils import run
    run(build, TokenizerConfig, description=__doc__)
