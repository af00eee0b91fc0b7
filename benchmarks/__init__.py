"""The paper's benchmarks and instruction tuning, plugged into the core scripts when this package is imported.

    python -m benchmarks eval --ckpt runs/x/ckpt_000300.pt --bench pope:coco_pope_random.json::coco/val2014
    python -m benchmarks train --instruct --data llava_v1_5_mix665k.json::images --init-from ... --steps 20

    load.py, formats.py   the benchmarks' files as distributed (POPE, MME, VLMEvalKit TSVs, SEED-Bench)
    metrics.py            their official metrics;  scoring.py  eval.py --bench (plug-ins "bench", "bench_table")
    files.py              the generator's scenes written in the benchmarks' formats
    qa.py, qa_eval.py     question-answer data from the scenes; greedy answers scored by exact match
    instruct.py           train.py --instruct: LLaVA conversations, the loss on the answers (plug-in "instruct")
    join_repeated         `eval --bench A --bench B` is `--bench A,B` (python -m benchmarks|experiments eval)
docs/benchmarks.md.
"""
from benchmarks import instruct, scoring  # noqa: F401 (plug-ins)


def join_repeated(argv, name="--bench"):
    """argv with every `--bench X` / `--bench=X` joined into one `--bench X,Y,...` (argparse keeps only the last)."""
    values, rest, args = [], [], iter(argv)
    for arg in args:
        if arg == name and (value := next(args, None)) is not None:
            values.append(value)
        elif arg.startswith(name + "="):
            values.append(arg[len(name) + 1:])
        else:
            rest.append(arg)
    return rest + ([name, ",".join(values)] if values else [])

