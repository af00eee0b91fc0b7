"""The paper's benchmarks and instruction tuning, plugged into the core scripts when this package is imported.

    python -m benchmarks eval --ckpt runs/x/ckpt_000300.pt --bench pope:coco_pope_random.json::coco/val2014
    python -m benchmarks train --instruct --data llava_v1_5_mix665k.json::images --init-from ... --steps 20

    load.py, formats.py   the benchmarks' files as distributed (POPE, MME, VLMEvalKit TSVs, SEED-Bench)
    metrics.py            their official metrics;  scoring.py  eval.py --bench (plug-ins "bench", "bench_table")
    files.py              the generator's scenes written in the benchmarks' formats
    qa.py, qa_eval.py     question-answer data from the scenes; greedy answers scored by exact match
    instruct.py           train.py --instruct: LLaVA conversations, the loss on the answers (plug-in "instruct")
docs/benchmarks.md.
"""
from benchmarks import instruct, scoring  # noqa: F401 (plug-ins)
