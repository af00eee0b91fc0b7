"""A Hugging Face Llama folder's tokenizer.json, relabelled so that the project's special tokens (tokenizer.SPECIALS)
hold ids 0..6: what `--tokenizer hf:FOLDER` loads (tokenizer.load_tokenizer) and scale/hf.py's weights follow (its
module docstring explains the relabelling)."""
import json
import os
import re

import torch

from utils import register

RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a Hugging Face checkpoint folder needs its {what}")
    with open(path) as f:
        return json.load(f)


def _special_id(path, which, data, config):
    """The id of the folder's bos/eos token: tokenizer_config.json's bos_token/eos_token, else config.json's."""
    tc_path = os.path.join(path, "tokenizer_config.json")
    token = None
    if os.path.isfile(tc_path):
        with open(tc_path) as f:
            token = json.load(f).get(f"{which}_token")
        token = token.get("content") if isinstance(token, dict) else token
    if token:
        ids = [a["id"] for a in data["added_tokens"] if a["content"] == token]
        ids += [i for t, i in data["model"]["vocab"].items() if t == token] if not ids else []
        if not ids:
            raise ValueError(f"{tc_path}: {which}_token {token!r} is not in {path}/tokenizer.json")
        return ids[0]
    i = config.get(f"{which}_token_id")
    i = i[0] if isinstance(i, list) else i
    if i is None:
        raise ValueError(f"{path}: no {which} token (neither tokenizer_config.json {which}_token "
                         f"nor config.json {which}_token_id)")
    return i


@register("hf_tokenizer")
def convert_tokenizer(path, specials):
    """(tokenizers.Tokenizer with `specials` (tokenizer.SPECIALS) at ids 0.., perm, n_new): row i of the converted
    model is row perm[i] of the original one; perm[i] >= the original vocabulary size marks a new token (n_new of
    them)."""
    from tokenizers import Tokenizer
    data = read_json(os.path.join(path, "tokenizer.json"), "tokenizer.json")
    config = read_json(os.path.join(path, "config.json"), "config.json")
    if data.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{path}/tokenizer.json: a {data.get('model', {}).get('type')} model; only BPE (Llama's)")
    vocab, added = data["model"]["vocab"], data["added_tokens"]
    size = 1 + max([*vocab.values(), *(a["id"] for a in added)])
    if size != config["vocab_size"]:
        raise ValueError(f"{path}: tokenizer.json has {size} ids but config.json vocab_size is {config['vocab_size']}")
    bos, eos = _special_id(path, "bos", data, config), _special_id(path, "eos", data, config)
    if bos == eos:
        raise ValueError(f"{path}: bos and eos are the same token (id {bos}); the project needs two different ones")
    reserved = sorted((int(RESERVED.fullmatch(a["content"]).group(1)), a["id"]) for a in added
                      if RESERVED.fullmatch(a["content"]) and a["id"] not in (bos, eos))
    # pad, image, vision, /vision, vrow: a token of that name (a folder export_hf wrote), else the next reserved
    named = {a["content"]: a["id"] for a in added if a["content"] in specials}
    reserved = iter(i for _, i in reserved if i not in named.values())
    free, n_new = [], 0
    for name in (s for s in specials if s not in ("<|bos|>", "<|eos|>")):
        i = named.get(name, next(reserved, None))
        if i is None:  # too few reserved tokens: new ones at the end
            i, n_new = size + n_new, n_new + 1
        free.append(i)
    targets = [free[0], bos, eos, *free[1:]]  # original ids that become pad, bos, eos, image, vision, /vision, vrow
    perm = list(range(size + n_new))
    for new_id, old_id in enumerate(targets):  # swap each target into place; earlier places stay put
        j = perm.index(old_id)
        perm[new_id], perm[j] = perm[j], perm[new_id]
    inv = [0] * len(perm)
    for new_id, old_id in enumerate(perm):
        inv[old_id] = new_id
    rename = {old_id: name for old_id, name in zip(targets, specials)}
    data["model"]["vocab"] = {rename.get(i, t): inv[i] for t, i in vocab.items()}
    for a in added:
        a["content"], a["id"] = rename.get(a["id"], a["content"]), inv[a["id"]]
    for old_id in range(size, size + n_new):
        added.append({"id": inv[old_id], "content": rename[old_id], "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    added.sort(key=lambda a: a["id"])
    # tokenizers gives an added token that is not in the model's vocabulary the next free id, whatever the file
    # says: the relabelled special tokens keep their ids only as vocabulary entries (as Llama-2's <s> is).
    data["model"]["vocab"].update({a["content"]: a["id"] for a in added})
    data["post_processor"] = None  # BOS/EOS are the packer's job, as with the project's own tokenizer
    tok = Tokenizer.from_str(json.dumps(data))
    tok.encode_special_tokens = True  # caption text "<|image|>" is text, never a real placeholder
    assert [tok.token_to_id(s) for s in specials] == list(range(len(specials)))
    return tok, torch.tensor(perm), n_new
