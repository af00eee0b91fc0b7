"""The generator's ground-truth word tags (data/generate.py), carried down to tokens.

A caption's record may hold "tags": one category per word. token_tags gives each label (caption tokens, then
<|eos|>) the category of the word it belongs to, so training and evaluation can report loss per category and
the tag oracle can weight by it.
"""
import sys

from data import tokenizer as T

CATEGORIES = ("image", "boiler", "noise", "glue")  # the generator's word tags (data/generate.py)


def token_tags(tok, records):
    """Category id (index into CATEGORIES) of each label, -1 for <|eos|> or untagged words."""
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
