"""Scale: what a big run needs beyond the core, plugged into the core scripts when this package is imported.

    python -m scale train --data "shards/{000000..000099}.tar" --stream ...   # train.py with these plug-ins

    shards.py, shard_reader.py  webdataset-style tar shards: writing them, reading their records (data.records)
    stream.py                   --stream: images decoded per batch (train.open_images)
    image_cache.py              --image-cache: decoded images in a file the tensor maps (data.images)
    features.py                 --feature-cache: the frozen ViT's features computed once (train.py, eval.py)
    score_shards.py             score.py --stream / torchrun: p_ref written in shards as it is computed
    flops.py                    FLOPs of a step, FLOP/s and MFU in train.py's log lines
    alarm.py                    train.py's alarm when a weighted loss unlearns the caption language
    fsdp.py                     --fsdp: FSDP2 sharding under torchrun (utils.wrap)
    hf.py, hf_tokenizer.py      Hugging Face Llama folders: --init-decoder hf:FOLDER, --tokenizer hf:FOLDER, export
    export.py                   a trained VLM as a self-contained folder (--init-from FOLDER, eval.py --ckpt FOLDER)
    wandb_log.py                --wandb PROJECT: the log's lines in Weights & Biases too (utils.RunLog)
    timm_encoder.py             --vision timm:<name> --vision-weights FILE: a pretrained ViT (CLIP) as the encoder
docs/scale.md.
"""
import warnings

# `python -m scale.export` runs a module this package has imported already: runpy's warning would be a second line
warnings.filterwarnings("ignore", r"'scale\.\w+' found in sys.modules after import of package 'scale'", RuntimeWarning)
from scale import (alarm, export, features, flops, fsdp, hf, hf_tokenizer, image_cache,  # noqa: F401,E402 (plug-ins)
                   score_shards, shard_reader, stream, timm_encoder, wandb_log)
