"""Export a trained VLM (a train.py checkpoint) as one self-contained folder, to share or archive it.

    python -m scale.export --ckpt runs/h_prior/last.pt --out out/h_prior_vlm    # --tokenizer: default the run's own

The folder holds config.json (format "prior-vlm": the model config, the encoder's and projector's settings, the
training flags, tokenizer and data fingerprints, step), model.safetensors (every VLM weight, in the checkpoint's
dtypes; a tied output head stored once; no optimizer, no --objective heads) and tokenizer.json (the run's
tokenizer, also when it was hf:FOLDER: converted, with the fingerprint the checkpoint records). It loads back
wherever a checkpoint does: `train.py --init-from FOLDER`, `eval.py --ckpt FOLDER`, model.load_model(FOLDER)
(tests/test_scale.py: identical logits). Nothing of it needs the run folder, the --vision-weights file or network.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

from data import tokenizer as T
from data.images import IMAGENET_MEAN, IMAGENET_STD
from model import read_vlm
import utils
from utils import UserError, atomic_write, flag, register, run

FOLDER_FORMAT = "prior-vlm"  # config.json's "format" in a folder this script writes


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_out(out):
    """--out must be a new folder or an earlier export: never a file, nor one where one cannot write (utils.check_out:
    beside it too, where the export is written first), never a run folder (its config.json is the run's), never a
    folder of something else."""
    utils.check_out(out, "dir")
    utils.check_out(os.path.dirname(os.path.abspath(out)), "dir")
    if os.path.isdir(out) and os.listdir(out):
        config = os.path.join(out, "config.json")
        meta = json.load(open(config)) if os.path.isfile(config) else {}
        if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
            raise UserError(f"--out {out} is a folder that holds something else (a run folder?): export into a new "
                            f"folder or an earlier export")


@register("vlm_folder")
def read_folder(path, flag=""):
    """An exported folder (config.json, model.safetensors, tokenizer.json) as a train.py checkpoint's dict, whose
    config["tokenizer"] is the folder's tokenizer.json: what model.read_vlm gives for a folder."""
    config_path = os.path.join(path, "config.json")
    meta = json.load(open(config_path)) if os.path.isfile(config_path) else {}
    if meta.get("format") != FOLDER_FORMAT:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is a folder but not an exported VLM (no config.json "
                        f"with format {FOLDER_FORMAT!r}; python -m scale.export writes one)")
    from safetensors.torch import load_file
    weights = os.path.join(path, "model.safetensors")
    if "sha256" in meta and file_sha256(weights) != meta["sha256"]:  # flipped or cut bytes load silently otherwise
        raise UserError(f"{flag + ': ' if flag else ''}{weights} is not the file this export wrote (sha256 differs "
                        f"from its config.json): damaged or edited; export the checkpoint again")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors' own errors name no file
        raise UserError(f"{flag + ': ' if flag else ''}{weights} cannot be read ({type(e).__name__}: {e})") from None
    for key, source in meta["tied"].items():  # safetensors stores a shared tensor once
        state[key] = state[source]
    return {"model": state, "model_config": meta["model_config"], "tokenizer": meta["tokenizer"], "data": meta["data"],
            "step": meta["step"], "inputs": meta.get("inputs", {}),
            "config": {**meta["train_config"], "tokenizer": os.path.join(path, "tokenizer.json")}}


def settings(model_config):
    """What a user of the folder needs to feed the model: image size, normalisation, tokens per image, and what the
    encoder and projector are (model_config holds the same, in the VLMConfig's own terms)."""
    c, d = model_config, model_config["decoder"]
    grid = c["image_size"] // c["patch_size"]
    image = {"size": c["image_size"], "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
             "resize": "to size x size, bicubic, alpha on white (data.images)"}
    if c["arch"] == "u":
        return {"image": image, "image_tokens": grid * grid + grid + 2, "encoder": None,
                "projector": {"type": "linear patch embedding (no bias)", "in": 3 * c["patch_size"] ** 2,
                              "out": d["d_model"]}}
    kwargs = dict(c.get("vision_kwargs") or {})
    layer = kwargs.pop("vision_layer", 0)
    encoder = {"type": c["vision"] or "built-in ViT (timm blocks)", "timm_kwargs": kwargs,
               "patch_size": c["patch_size"], "width": c["vit_dim"], "depth": c["vit_depth"], "heads": c["vit_heads"],
               "features": "final, normed" if not layer else f"block {layer} (from the end), before the final norm"}
    return {"image": image, "image_tokens": grid * grid, "encoder": encoder,
            "projector": {"type": "mlp2x_gelu (Linear, GELU, Linear)", "in": c["vit_dim"], "out": d["d_model"]}}


def export_vlm(ckpt_path, out, tokenizer=None):
    """Write the folder; returns its config.json dict. tokenizer: default the checkpoint's own --tokenizer."""
    from safetensors.torch import save_file
    check_out(out)
    ckpt = read_vlm(ckpt_path, "--ckpt")
    tok_path = tokenizer or ckpt["config"]["tokenizer"]
    tok = T.load_tokenizer(tok_path)
    if T.fingerprint(tok) != ckpt["tokenizer"]:
        raise UserError(f"--tokenizer {tok_path} is not the tokenizer {ckpt_path} was trained with (fingerprint "
                        f"{T.fingerprint(tok)}, the checkpoint's {ckpt['tokenizer']}): give the run's --tokenizer")
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("aux.")}
    tied, seen = {}, {}
    for k, v in state.items():  # safetensors refuses tensors sharing memory: keep one, note the others
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen:
            tied[k] = seen[key]
        else:
            seen[key] = k
    state = {k: v.contiguous() for k, v in state.items() if k not in tied}
    meta = {"format": FOLDER_FORMAT, "version": 1, "model_config": ckpt["model_config"],
            **settings(ckpt["model_config"]), "tied": tied, "tokenizer": ckpt["tokenizer"], "data": ckpt["data"],
            "step": ckpt["step"],
            "inputs": ckpt.get("inputs", {}), "train_config": ckpt["config"], "source": os.path.abspath(ckpt_path)}
    # Written into a temporary folder beside --out, then swapped in: an interrupted export leaves the earlier one
    # whole (never two checkpoints mixed, never a 0-byte config.json).
    out = os.path.normpath(out)
    tmp, old = f"{out}.tmp{os.getpid()}", f"{out}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        atomic_write(os.path.join(tmp, "model.safetensors"),
                     lambda path: save_file(state, path, metadata={"format": FOLDER_FORMAT}))
        meta["sha256"] = file_sha256(os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            f.write(tok.to_str())
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=1)
        saved = T.fingerprint(T.load_tokenizer(os.path.join(tmp, "tokenizer.json")))
        if saved != ckpt["tokenizer"]:  # the file must load to the tokenizer the checkpoint names
            raise RuntimeError(f"{out}/tokenizer.json reloads with fingerprint {saved}, not {ckpt['tokenizer']}")
        if os.path.isdir(out):
            os.rename(out, old)
        os.rename(tmp, out)
    except (OSError, UserError) as e:  # a full disk (atomic_write says so), a read-only folder
        raise UserError(f"--out {out}: cannot write the export ({getattr(e, 'strerror', None) or e}); nothing was "
                        f"changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return meta


@dataclass
class ExportConfig:
    ckpt: str = flag("", "a train.py checkpoint (ckpt_<step>.pt or last.pt)")
    out: str = flag("", "folder to write (config.json, model.safetensors, tokenizer.json)")
    tokenizer: str = flag("", "the run's tokenizer, if its config's path does not hold here ('' = the config's)")


def main(cfg):
    if not cfg.ckpt or not cfg.out:
        raise UserError("give --ckpt and --out")
    meta = export_vlm(cfg.ckpt, cfg.out, cfg.tokenizer or None)
    print(f"wrote {cfg.out}: {meta['model_config']['arch']}-LVLM at step {meta['step']}, {meta['image_tokens']} "
          f"image tokens per image")


if __name__ == "__main__":
    run(main, ExportConfig, description=__doc__)
