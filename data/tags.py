"""The generator's ground-truth word tags ("tags" in a record: one category per caption word, data/generate.py)
carried down to tokens, so training and evaluation can report loss per category and the tag oracle weight by it."""
import sys

from data import tokenizer as T

CATEGORIES = ("image", "boiler", "noise", "glue")


def token_tags(tok, records):
    """Category id (index into CATEGORIES) of each label (caption tokens, then <|eos|>); -1: <|eos|>, untagged."""
    if any(not isinstance(r.extra.get("tags"), list) for r in records):
        return None
    word_index = T.token_word_index(tok, [r.caption for r in records])
    out, wrong = [], []
    for r, index in zip(records, word_index):
        words = r.extra["tags"]
        if len(words) != len([w for w in r.caption.split(" ") if w]) or any(w not in CATEGORIES for w in words):
            wrong.append(r.id)  # tags that do not fit the caption are not ground truth: leave them out
            out.append([-1] * (len(index) + 1))
            continue
        out.append([CATEGORIES.index(words[w]) if w >= 0 else -1 for w in index] + [-1])
    if wrong:
        print(f"{len(wrong)} records have tags that do not match their caption's words (first: {wrong[0]}); "
              f"their tokens count as untagged", file=sys.stderr)
    return out
