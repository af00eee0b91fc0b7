"""Byte-level BPE tokenizer for captions (HuggingFace `tokenizers`). Later artefacts (reference LM, scores,
checkpoints) record `fingerprint(tok)`, so a mismatched tokenizer is refused instead of producing garbage.

    python -m data.tokenizer --data data/synth/text.jsonl,data/synth/train.jsonl --out out/tokenizer.json
"""
import hashlib
import os
import re
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.records import read_records
from utils import TokenizerChecks, UserError, atomic_write, check_out, flag, parse_config, plugin, run

# always the first ids: sequence plumbing, one image embedding (a ViT token or a pixel patch), and the image
# boundaries and row separator of the encoder-free model
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
    """For each caption, the index of the space-separated word each token belongs to: that of its first non-space
    character, as a byte-level token like 'Ġred' spans the space before its word (-1: none)."""
    out = []
    for caption, enc in zip(captions, tok.encode_batch(captions, add_special_tokens=False)):
        word_of_char = [-1] * len(caption)
        for w, m in enumerate(re.finditer("[^ ]+", caption)):
            word_of_char[m.start():m.end()] = [w] * len(m.group())
        out.append([next((w for w in word_of_char[a:b] if w >= 0), -1) for a, b in enc.offsets])
    return out


@dataclass
class TokenizerConfig(TokenizerChecks):
    data: str = flag("data/synth/text.jsonl,data/synth/train.jsonl",
                     "comma-separated caption files (JSONL, LLaVA or COCO JSON, .tar shards) to learn merges from")
    out: str = flag("out/tokenizer.json", "where to write tokenizer.json")
    vocab_size: int = flag(2048, "BPE vocabulary size including special tokens")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of a file's records is bad")


def main(argv=None):
    return build(parse_config(TokenizerConfig, argv, description=__doc__))


def build(cfg):
    check_out(cfg.out)
    captions = [r.caption for path in cfg.data.split(",") for r in
                read_records(path, require_image=False, check_files=False, max_bad_fraction=cfg.max_bad_fraction)]
    tok = train_tokenizer(captions, cfg.vocab_size)
    atomic_write(cfg.out, tok.save)  # a full disk leaves the previous tokenizer.json whole, and no cut-off file
    print(f"tokenizer: {tok.get_vocab_size()} tokens from {len(captions)} captions -> {cfg.out} "
          f"(fingerprint {fingerprint(tok)})")


if __name__ == "__main__":
    run(build, TokenizerConfig, description=__doc__)
