"""The paper's evaluation protocol for the benchmark-format files (docs/benchmarks.md): the POPE- and MMBench-style
files are asked of an instruction-tuned copy of a checkpoint, never of the raw pre-trained one.

    spec = {"out": "eval.json", ..., "bench": [...],                        # experiments/experiment.py's eval_spec
            "instruct": {"data": qa_train_file("out/data_web"), "steps": 20, "lr": 1e-3}}
    rows = tuned_bench(run_cfg, step, spec["instruct"], spec["bench"], tok, device="cpu", max_rows=160)

Why: no training caption holds a question, so a pre-trained model has never continued "question: ... answer:".
On the raw checkpoint the files measure tokenisation: "yes" is two BPE tokens ("Ġy" "es"), "no" one, and every
model answered "no" to every POPE question. The paper instruction-tunes each evaluated checkpoint for 20 steps
first and leaves the pre-training run alone; so does this module, inside the worker that trains the run.

tuned_bench: train.py --instruct semantics (the loss on the answers only, --loss ntp) from the checkpoint
(--init-from), on question-answer pairs about the TRAINING scenes (benchmarks/qa.py; data_<mix>/bench/qa_train.jsonl,
written on first use), otherwise the run's own recipe: the H-LVLM trains its projector alone (frozen ViT features
from the feature cache), the U-LVLM all its weights. The copy trains in RUN/instruct/, a sub-folder no run file
lives in (ckpt_*.pt, log.jsonl and last.pt are only ever looked for in RUN itself), so the run's checkpoints, log
and --resume are untouched; the copy's config.json and log.jsonl stay there to be read, its checkpoints are deleted
once its rows exist (they are the rows' only purpose). Rows keep the benchmarks' usual names (pope_f1, ...), plus
MARKER = the tuning steps they come after. The rows are summed log-likelihoods; pope_tail_logp says whether the
tuning taught the 2nd token of "yes" (near 0: "yes" and "no" compare fairly; docs/benchmarks.md measures when).
"""
import glob
import os
import shutil
from dataclasses import replace

import eval as E
import train
from benchmarks.qa import build_qa
from experiments.jobs import checked

IT_STEPS, IT_LR = 20, 1e-3  # the paper's 20 steps; one lr for every arm, so the tuning cannot favour one of them
MARKER = "bench_it_steps"   # eval.json row: the bench rows of this step come after this many steps of tuning


def qa_train_file(data, per_scene=2, scenes=0):
    """data/bench/qa_train.jsonl: questions about train.jsonl's scenes (never the test scenes the files ask about),
    written once per data folder, on first use; with `scenes`, qa_train_<scenes>.jsonl, about the first that many
    scenes alone (a tuning that reads 640 pairs need not load 16,000: the preset's it_scenes)."""
    path = os.path.join(data, "bench", f"qa_train_{scenes}.jsonl" if scenes else "qa_train.jsonl")
    if not os.path.exists(path):
        build_qa(os.path.join(data, "train.jsonl"), path, per_scene=per_scene, max_scenes=scenes)  # atomic write
    return path


def instruct_config(run_cfg, ckpt, it, out_dir):
    """The run's TrainConfig turned into its checkpoint's instruction tuning: --instruct --loss ntp --init-from ckpt,
    the run's arch, trained part (--train; it["train"] may differ), feature cache, batch size, row length, seed and
    device."""
    steps, part = int(it["steps"]), it.get("train") or run_cfg.train
    cfg = replace(run_cfg, data=it["data"], instruct=True, loss="ntp", init_from=ckpt, init_decoder="",
                  init_encoder="", text_data="", steps=steps, save_every=steps, warmup=steps // 10, lr=float(it["lr"]),
                  out_dir=out_dir, resume=False, overwrite=True, stop_at=0, wandb="", train=part,
                  image_cache=it.get("image_cache", ""),  # the QA file's own: the run's holds its captions' images
                  feature_cache=run_cfg.feature_cache if part == "projector" else "")  # a training ViT: no cache
    return checked(cfg)


def tuned_bench(run_cfg, step, it, bench, tok, device="cpu", **kw):
    """{benchmark: value} of the `bench` specs on a copy of RUN/ckpt_<step>.pt tuned by `it` ({"data", "steps",
    "lr"}, optional "train": all or projector, '' = the run's; optional "image_cache": the QA file's images decoded
    once for every run, --image-cache), plus {MARKER: steps}. kw: eval.evaluate_model's
    (max_rows, feature_cache)."""
    ckpt = os.path.join(run_cfg.out_dir, f"ckpt_{step:06d}.pt")
    out_dir = os.path.join(run_cfg.out_dir, "instruct")
    shutil.rmtree(out_dir, ignore_errors=True)  # an interrupted tuning starts over: a few steps are cheap
    cfg = instruct_config(run_cfg, ckpt, it, out_dir)
    model = train.main(cfg)
    out = E.evaluate_model(model, tok, bench=bench, device=device, **{**kw, "feature_cache": cfg.feature_cache})
    for path in glob.glob(os.path.join(out_dir, "*.pt")):
        os.remove(path)
    return {**out, MARKER: int(it["steps"])}
