"""Caption an image with a train.py checkpoint, decoding with the KV cache (benchmarks/generate.py).

    python -m tools.caption --ckpt runs/h_prior/last.pt --image my.png
    python -m tools.caption --ckpt runs/h_prior/last.pt --image my.png --prompt "a photo of" --greedy
    python -m tools.caption --ckpt runs/h_prior/last.pt --image my.png --temperature 0.8 --top-k 20 --seed 0

The model sees what it was trained on: the image's placeholder tokens (model.image_tokens()), <|bos|>, then the
prompt's tokens; it continues until <|eos|> or --max-new-tokens. Prints the prompt and its continuation. The
tokenizer is the one the checkpoint's run recorded (--tokenizer to point elsewhere; a different tokenizer is
refused). For evaluators: `benchmarks.generate.generate(model, input_ids, images, max_new_tokens, temperature=0)`
decodes a batch greedily, and `caption()` below does one image end to end.
"""
from dataclasses import dataclass

import torch

from data import tokenizer as T
from utils import UserError, autocast, check_fingerprint, flag, pick_device, run
from data.images import load_image, normalize
from benchmarks.generate import generate
import scale  # noqa: F401 (checkpoints with a timm encoder, hf: tokenizers, exported folders)


@dataclass
class CaptionConfig:
    ckpt: str = flag("runs/default/last.pt", "train.py checkpoint (last.pt or ckpt_<step>.pt)")
    image: str = flag("", "image file to caption (any format PIL reads)")
    prompt: str = flag("", "text the caption starts with, e.g. 'a photo of' ('' = none)")
    greedy: bool = flag(False, "always take the most likely token (ignores --temperature and --top-k)")
    temperature: float = flag(0.8, "sampling temperature (0 = greedy)")
    top_k: int = flag(20, "sample among the k most likely tokens (0 = all)")
    max_new_tokens: int = flag(40, "stop after this many new tokens if no <|eos|> came")
    seed: int = flag(0, "seed of the sampling: the same seed gives the same caption")
    tokenizer: str = flag("", "tokenizer.json ('' = the one recorded in the checkpoint)")
    device: str = flag("auto", "auto, cpu or cuda")


def read_image(path, size):
    """uint8 (3, size, size), or an error that says what is wrong with the file."""
    try:
        return load_image(path, size)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not an image file") from None
    except Exception as e:  # PIL raises many types for files it cannot decode
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def load(ckpt_path, tokenizer_path="", device="cpu"):
    """(model, tokenizer) from a train.py checkpoint; the tokenizer must be the one the run used."""
    from model import load_model
    model, ckpt = load_model(ckpt_path, device)
    tok_path = tokenizer_path or ckpt["config"]["tokenizer"]
    tok = T.load_tokenizer(tok_path)
    check_fingerprint("tokenizer", ckpt["tokenizer"], T.fingerprint(tok), ckpt_path, tok_path)
    return model, tok


def caption(model, tok, image, prompt="", max_new_tokens=40, temperature=0.0, top_k=None, seed=0):
    """The caption text (prompt included) of one uint8 (3, S, S) image."""
    device = next(model.parameters()).device
    prompt_ids = T.encode_captions(tok, [prompt])[0] if prompt else []
    ids = torch.tensor([model.image_tokens() + [T.BOS] + prompt_ids], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with autocast(device):
        new = generate(model, ids, normalize(image.to(device))[None], max_new_tokens, temperature,
                       top_k or None, generator=generator)[0]
    return tok.decode(prompt_ids + new).strip()


def main(argv=None):
    """The command line (argv) -> the caption; a user's mistake is one line `error: ...`, exit 2 (utils.run)."""
    return run(caption_image, CaptionConfig, argv, description=__doc__)


def caption_image(cfg):
    if not cfg.image:
        raise UserError("tools/caption.py: give an image with --image")
    device = pick_device(cfg.device)
    try:  # the user's inputs (files, a prompt longer than the model takes): one line, no traceback
        model, tok = load(cfg.ckpt, cfg.tokenizer, device)
        image = read_image(cfg.image, model.cfg.image_size)
        text = caption(model, tok, image, cfg.prompt, cfg.max_new_tokens, 0.0 if cfg.greedy else cfg.temperature,
                       cfg.top_k, cfg.seed)
    except (OSError, ValueError) as e:
        raise UserError(f"tools/caption.py: {e}") from None
    print(text)
    return text


if __name__ == "__main__":
    run(caption_image, CaptionConfig, description=__doc__)
