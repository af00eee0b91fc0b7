"""Text generation: greedy or sampled decoding with cached keys and values (model.Decoder's `cache`).
Used by tools/caption.py and benchmarks/qa_eval.py."""
import torch

from data import tokenizer as T
from model import VLM

SPECIAL_NOT_EOS = (T.PAD, T.BOS, T.IMAGE, T.VISION, T.VISION_END, T.VROW)


class KVCache:
    """Keys and values of every decoder layer for the positions decoded so far (inference only): each new
    token then costs one position's work instead of re-reading the whole sequence. All rows of a batch are
    at the same position (no padding). Allocated at the first write, in the dtype attention produces (bf16
    under autocast), for at most max_len positions."""

    def __init__(self, max_len):
        self.max_len, self.pos, self.k, self.v = max_len, 0, [], []

    def update(self, layer, k, v):
        """Write (B, H, T, D) keys and values at positions pos..pos+T-1 of `layer`; return those of 0..pos+T-1.
        Decoder.forward advances pos once all layers have written."""
        if layer == len(self.k):
            B, H, _, D = k.shape
            self.k.append(k.new_empty(B, H, self.max_len, D))
            self.v.append(v.new_empty(B, H, self.max_len, D))
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions, room for {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sample_next(logits, temperature=0.0, top_k=None, generator=None):
    """Next token ids (B,) from last-position logits (B, V): argmax for temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens (None or 0: all)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, input_ids, images=None, max_new_tokens=40, temperature=0.0, top_k=None, eos_id=T.EOS,
             generator=None, use_cache=True, return_logits=False, banned=SPECIAL_NOT_EOS):
    """Continue input_ids (B, T) with a VLM (images: one per image block, as in VLM.forward) or a Decoder.

    Greedy for temperature 0, else sampled (sample_next; `generator` makes draws reproducible). A row stops
    at eos_id (None: never); decoding stops when every row has, after max_new_tokens, or at the model's
    max_seq_len. `banned` ids are never chosen: by default the special tokens other than eos, which training
    never labels (an <|image|> drawn by chance would ask for an image that is not there). Returns a list of B
    lists of new token ids, without the eos; with return_logits also the
    (B, steps, V) float logits each step was drawn from. use_cache=False re-runs the whole sequence every step:
    the slow reference the cache is tested against."""
    model.eval()
    decoder = model.decoder if isinstance(model, VLM) else model
    B, n = input_ids.shape
    steps = min(max_new_tokens, decoder.cfg.max_seq_len - n)
    if steps < 0 or n == 0:
        raise ValueError(f"{n} input tokens; the model takes 1 to {decoder.cfg.max_seq_len}")

    def run(ids, images=None, **kw):  # logits at each row's last position
        keep = torch.arange(1, ids.shape[0] + 1, device=ids.device) * ids.shape[1] - 1
        if isinstance(model, VLM):
            return model(ids, images, keep=keep, **kw).float()
        return model(ids, keep=keep, **kw).float()

    cache = KVCache(n + steps) if use_cache else None
    ban = torch.tensor(list(banned or ()), dtype=torch.long, device=input_ids.device)
    seq, new, all_logits = input_ids, [], []
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = run(input_ids, images, cache=cache)  # the prompt (image included) in one pass
    for step in range(steps):
        allowed = logits.index_fill(1, ban, float("-inf")) if len(ban) else logits
        token = sample_next(allowed, temperature, top_k, generator)
        if eos_id is not None:
            token = torch.where(done, eos_id, token)  # finished rows keep emitting eos, ignored below
            done |= token == eos_id
        new.append(token)
        all_logits.append(logits)
        if bool(done.all()) or step == steps - 1:
            break
        if use_cache:  # images are in the cache already: only the new token runs
            logits = run(token[:, None], cache=cache)
        else:
            seq = torch.cat([seq, token[:, None]], dim=1)
            logits = run(seq, images)
    out = torch.stack(new, 1).tolist() if new else [[] for _ in range(B)]
    if eos_id is not None:
        out = [row[:row.index(eos_id)] if eos_id in row else row for row in out]
    if return_logits:
        return out, torch.stack(all_logits, 1) if all_logits else torch.empty(B, 0, decoder.cfg.vocab_size)
    return out
