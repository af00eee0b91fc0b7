"""The generator's ground-truth word tags ("tags" in a record: one category per caption word, world/generate.py)
carried down to tokens, so training and evaluation can report loss per category and the tag oracle weight by it,
and the vocabulary of the image words (world/scenes.py draws what they say), so the grounding gap splits by
attribute."""
import sys

from data import tokenizer as T

CATEGORIES = ("image", "boiler", "noise", "glue")
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring"]
COLOUR_WORDS = "red green blue yellow purple orange cyan pink white black brown".split()
NUMS = "zero one two three four five six seven eight nine ten".split()


def plural(shape, n):
    return shape if n == 1 else shape + ("es" if shape.endswith("s") else "s")


# What an image word says: the grounding gap per attribute (eval.py's gap_<kind>)
ATTRIBUTES = ("shape", "colour", "count", "size", "position")
ATTRIBUTE_OF = {**{w: "shape" for s in SHAPES for w in (s, plural(s, 2))}, **{c: "colour" for c in COLOUR_WORDS},
                **{n: "count" for n in NUMS}, "small": "size", "large": "size",
                **{p: "position" for p in ("top", "bottom", "left", "right", "center")}}


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


def token_attributes(tok, records, tags):
    """ATTRIBUTES id of each label whose word is an image word (tags from token_tags) of a known kind; -1 else."""
    image = CATEGORIES.index("image")
    out = []
    for r, index, row in zip(records, T.token_word_index(tok, [r.caption for r in records]), tags):
        words = [w for w in r.caption.split(" ") if w]
        kinds = [ATTRIBUTE_OF.get(words[w]) if w >= 0 and t == image else None for w, t in zip(index, row)]
        out.append([ATTRIBUTES.index(k) if k else -1 for k in kinds] + [-1])
    return out
