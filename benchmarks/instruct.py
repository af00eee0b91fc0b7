"""Instruction data for train.py --instruct (plug-in "instruct"): real multi-turn conversations, the loss on the
assistant's turns only.

    python -m benchmarks train --instruct --data llava_v1_5_mix665k.json::playground/data \
        --init-from runs/x/ckpt_000300.pt \\
        --steps 20 --loss ntp --out-dir runs/x_it            # the paper's 20 steps of instruction tuning
    python -m benchmarks train --instruct --data out/paper/instruct/qa_train.jsonl ...   # benchmarks/qa.py's questions

Formats (picked by shape):
  .json   LLaVA's instruction list (llava_v1_5_mix665k.json): [{"id", "image" (optional: text-only entries have
          none), "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value":
          "..."}, ...]}], any number of turns, alternating human, gpt; "user"/"assistant" are read as human/gpt.
          Read as LLaVA's own preprocessing reads it: a first turn from gpt is dropped (the rest of the entry is
          kept), "<image>" markers are removed (the image always comes first, as in pre-training) and each turn
          stripped, so a leading "<image>\\n" goes with its newline; newlines inside a turn stay (lists, code).
  .jsonl  benchmarks/qa.py's questions: {"image", "prompt", "caption" = prompt + " " + answer} (or "target"): one turn.

A conversation becomes one text, "question: <human> answer: <gpt> <|eos|> question: <human> answer: <gpt>", the
prompt format of benchmarks/qa.py and benchmarks/load.py, so a tuned model is asked the benchmarks' questions the way
it was tuned. Every answer but the last is followed by the tokenizer's <|eos|> token (piece [T.EOS], token ids, not
text: the text "<|eos|>" is never the special token), trained, as LLaVA trains the separator after each of its
answers: a multi-turn model learns to stop after an inner answer too. The last answer is closed by the sample's own
<|eos|> label, so a one-turn conversation is exactly the one-turn sample it always was. Each record keeps its
pieces in extra["pieces"]: data.packing.make_samples makes the Sample, whose tokens are the pieces' tokens end to
end and whose loss_mask is 1 on every assistant piece, its <|eos|> and the closing <|eos|>, 0 on the rest: pack()
gives the masked labels -100, so no loss and no logits there, with any --loss. With --loss ntp that is LLaVA's
masked loss, the mean over the assistant tokens of the batch. A conversation cut by --row-len keeps its closing
<|eos|> trained only after an answer token (data.packing.pack); one cut before its first answer trains nothing and
is counted at start-up (data.packing.warn_unanswered). Bad entries are skipped, counted by reason and limited by
--max-bad-fraction, like every reader.
"""
import json
import os

from data import tokenizer as T
from data.record_types import BadRecord, DataError, Record, Tally
from data.records import split_source
from utils import register

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def turn_text(value):
    """A turn's text as LLaVA's preprocessing leaves it: "<image>" markers removed, the ends stripped (a leading
    "<image>\\n" leaves no newline behind), every other newline and space kept."""
    return value.replace("<image>", "").strip()


def turn_pieces(turns):
    """[(text or token ids, trained)] of a conversation: "question: <human> answer:" (not trained), "<gpt>"
    (trained), and [T.EOS] (trained) after every answer but the last (module doc)."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no conversations list")
    roles = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise BadRecord("turn not {from, value}")
        role = ROLES.get(t.get("from"))
        if role is None:
            raise BadRecord("unknown role", repr(t.get("from")))
        roles.append(role)
    if roles[0] == "gpt":  # LLaVA skips a first turn that is not the human's: an answer to no question
        turns, roles = turns[1:], roles[1:]
    pieces = []
    for j, (t, role) in enumerate(zip(turns, roles)):
        if role != ("human" if j % 2 == 0 else "gpt"):
            raise BadRecord("turns do not alternate human, gpt")
        text = turn_text(t["value"])
        if not text:
            raise BadRecord("empty turn")
        pieces.append((f"question: {text} answer:", False) if role == "human" else (text, True))
    if pieces and not pieces[-1][1]:
        pieces.pop()  # a closing question without an answer trains nothing
    if not any(trained for _, trained in pieces):
        raise BadRecord("no gpt turn")
    # every answer but the last ends with <|eos|>, trained like the answer; the last one's is the sample's own
    return [q for p in pieces[:-1] for q in ([p, ([T.EOS], True)] if p[1] else [p])] + pieces[-1:]


def piece_text(piece):
    """A piece as text, for the record's caption: token ids by their special tokens' names."""
    return piece if isinstance(piece, str) else "".join(T.SPECIALS[i] for i in piece)


def _entry(obj, key, folder, llava):
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    if llava:
        pieces = turn_pieces(obj.get("conversations"))
    else:
        prompt, caption = obj.get("prompt"), obj.get("caption")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRecord("missing prompt")
        target = obj.get("target")
        if not isinstance(target, str):
            if not isinstance(caption, str) or not caption.startswith(prompt):
                raise BadRecord("caption does not start with the prompt")
            target = caption[len(prompt):]
        if not target.strip():
            raise BadRecord("empty answer")
        pieces = [(prompt.strip(), False), (target.strip(), True)]
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise BadRecord("image not a path")
        image = os.path.abspath(os.path.join(folder, image))
        if not os.path.isfile(image):
            raise BadRecord("missing image file", image)
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations", "caption")}
    extra["pieces"] = pieces
    rid = obj.get("id")
    return Record(str(rid) if rid is not None else key, " ".join(piece_text(p) for p, _ in pieces), image,
                  extra)


@register("instruct")
def read_instruct(path, images_root=None, max_bad_fraction=0.01):
    """Records of an instruction file (module doc): caption = the whole text, extra["pieces"] = [(text, trained)]
    (a piece of token ids in place of text for the <|eos|> after an inner answer),
    image None for text-only entries. "file.json::folder" reads image paths relative to folder."""
    path, images_root = split_source(path, images_root)
    folder = images_root or os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    tally, good = Tally("instruction entries", path), []

    def take(obj, key, loc, llava):
        tally.total += 1
        try:
            good.append(_entry(obj, key, folder, llava))
        except BadRecord as e:
            tally.bad(loc, e.args[0], e.args[1] if len(e.args) > 1 else "")

    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    tally.total += 1
                    tally.bad(f"{path} line {n}", "broken JSON")
                    continue
                take(obj, f"{stem}:{n}", f"{path} line {n}", llava=False)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a JSON file ({e})")
        if not isinstance(items, list):
            raise DataError(f"{path}: not a list of conversations (LLaVA's instruction format)")
        for i, obj in enumerate(items):
            take(obj, f"{stem}:{i}", f"{path} entry {i}", llava=True)
    tally.good = len(good)
    tally.finish(max_bad_fraction)
    return good
