"""Scale: what a big run needs beyond the core, plugged into the core scripts when this package is imported.

    python -m scale train --data "shards/{000000..000099}.tar" --stream ...   # train.py with these plug-ins

    shards.py, shard_reader.py  webdataset-style tar shards: writing them, reading their records (data.records)
    stream.py                   --stream: images decoded per batch (train.open_images)
    features.py                 --feature-cache: the frozen ViT's features computed once (train.py, eval.py)
    score_shards.py             score.py --stream: p_ref written in shards as it is computed
    hf.py, hf_tokenizer.py      Hugging Face Llama folders: --init-decoder hf:FOLDER, --tokenizer hf:FOLDER, export
    export.py                   a trained VLM as a self-contained folder (--init-from FOLDER, eval.py --ckpt FOLDER)
FSDP (--fsdp) is torch's own, in utils.wrap. docs/scale.md.
"""
from scale import export, features, hf, hf_tokenizer, score_shards, shard_reader, stream  # noqa: F401 (plug-ins)
