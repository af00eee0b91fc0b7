"""experiments/paper.py instruct: instruction tuning on scene questions from each pre-trained checkpoint,
exact match of the generated answers next to the likelihood evaluation.
"""
import json
import os
import time

import numpy as np

from experiments.paper_setup import Setup, _plt, table, write_json
from train import TrainConfig


def instruct(args):
    from experiments import reporting as report
    from benchmarks import qa
    t0 = time.time()
    s = Setup(args, "instruct")
    lrs, seeds = s.lrs(), args.seeds or (1 if args.quick else s.p["seeds"])
    methods = args.methods.split(",")
    kinds = qa.KINDS
    it_steps = args.it_steps or (3 if args.quick else 100)
    qa_rows = args.qa_rows or (8 if args.quick else 100)
    qdir = os.path.join(s.out, "qa")
    qa_train, mask = os.path.join(qdir, "qa_train.jsonl"), os.path.join(qdir, "qa_train_answer_mask.pt")
    qa_test = {k: os.path.join(qdir, f"qa_{k}.jsonl") for k in kinds}
    # pre-trained checkpoints: the main job's runs where they exist, else trained here with its recipe
    pre, pre_jobs = {}, []  # (method, seed) -> (checkpoint, run dir, its step)
    for m in methods:
        for seed in range(seeds):
            main = None if args.quick else s.main_run(m, lrs[m], seed)
            if main:
                step = s.p["vlm"]["steps"]
                pre[m, seed] = (os.path.join(main, f"ckpt_{step:06d}.pt"), main, step)
            else:
                step = s.steps()
                d = os.path.join(s.out, "pretrain", f"{m}_lr{lrs[m]:g}_s{seed}_steps{step}")
                pre[m, seed] = (os.path.join(d, f"ckpt_{step:06d}.pt"), d, step)
                pre_jobs.append((s.train_config(m, lrs[m], seed, d), f"pretrain_{m}_s{seed}", pre[m, seed][0]))
    runs = {}
    for m in methods:
        for seed in range(seeds):
            d = os.path.join(s.out, "runs", f"{m}_s{seed}_it{it_steps}_{args.it_loss}")
            cfg = TrainConfig(data=qa_train, tokenizer=s.path("tokenizer.json"), arch=s.arch, out_dir=d,
                              init_from=pre[m, seed][0], train=args.it_train, steps=it_steps, save_every=it_steps,
                              lr=args.it_lr, warmup=min(10, max(1, it_steps // 10)), batch_size=s.batch(),
                              row_len=s.p["vlm"]["row_len"], seed=seed, device=s.device, resume=True, overwrite=True,
                              **({"loss": "prior", "alpha": 1.0, "scores": mask} if args.it_loss == "answer"
                                 else {"loss": "ntp"}))
            runs[m, seed] = (d, cfg)
    print(f"instruct ({s.mix}, {s.arch.upper()}-LVLM): {', '.join(methods)} x {seeds} seed(s); pre-trained "
          f"checkpoints: {len(pre) - len(pre_jobs)} from the "
          f"main job, {len(pre_jobs)} to train; instruction tuning {it_steps} steps of batch {s.batch()} at lr "
          f"{args.it_lr:g} ({args.it_train}, loss on "
          f"{'the answer' if args.it_loss == 'answer' else 'the whole text'}); "
          f"{qa_rows} test questions per kind")
    factor = 3 if args.it_train == "all" else 1  # a guess: every weight's gradient, not only the projector's
    print(s.estimate(it_steps * len(runs) * factor + s.steps() * len(pre_jobs), len(runs) + len(pre_jobs),
                     len(runs) + len(pre_jobs), extra_s=len(runs) * 2 * (1 if args.quick else 15),
                     note=f"; tuning steps counted x{factor}" + (" (all weights train)" if factor > 1 else "")
                     + "; ~15 s per checkpoint for the QA evaluation in this process"))
    if args.plan:
        return None
    # QA data: training scenes for tuning, test scenes for evaluation
    if not os.path.exists(qa_train):
        rows = qa.build_qa(os.path.join(s.data, "train.jsonl"), qa_train, per_scene=args.per_scene, seed=0,
                           max_scenes=64 if args.quick else 0)
        print(f"  {len(rows)} training questions from the scenes of train.jsonl")
    for k in kinds:
        if not os.path.exists(qa_test[k]):
            qa.build_qa(os.path.join(s.data, "test.jsonl"), qa_test[k], per_scene=0, seed=1, kinds=(k,))
    if args.it_loss == "answer" and not os.path.exists(mask):
        qa.answer_only_scores(qa_train, s.path("tokenizer.json"), mask)
    s.check_own([(os.path.dirname(ckpt), cfg) for cfg, name, ckpt in pre_jobs] + list(runs.values()))
    s.run_jobs([((cfg, "train"), name) for cfg, name, ckpt in pre_jobs if not os.path.exists(ckpt)],
               "pre-train (no main-job checkpoint)")
    s.run_jobs([((cfg, "train"), f"it_{m}_s{seed}") for (m, seed), (d, cfg) in runs.items()
                if not os.path.exists(os.path.join(d, f"ckpt_{it_steps:06d}.pt"))], "instruction tuning")
    s.run_jobs([((s.eval_config(d), "eval"), f"eval_it_{m}_s{seed}") for (m, seed), (d, _) in runs.items()
                if not s.final_rows(d, it_steps)], "likelihood evaluation (probes, token NLL) after tuning")
    # pre-trained checkpoints of this command (not the main job's, which have eval.json already)
    s.run_jobs([((s.eval_config(d), "eval"), f"eval_pre_{m}_s{seed}") for (m, seed), (c, d, step) in pre.items()
                if not s.final_rows(d, step)],
               "likelihood evaluation of the pre-trained checkpoints")

    # generated answers and the same questions by likelihood, before and after tuning
    import eval as E
    from benchmarks import qa_eval
    from tools.caption import load
    from utils import pick_device
    device = pick_device(s.device)
    kind_of = {}
    for k in kinds:
        with open(qa_test[k]) as f:
            kind_of.update({json.loads(line)["id"]: k for line in f if line.strip()})
    results = {}  # (method, stage) -> bench -> {seed: value}
    print(f"[{time.strftime('%H:%M:%S')}] generated answers and multiple choice on {len(kinds)} x {qa_rows} "
          "test questions")
    for (m, seed), (d, _) in runs.items():
        for stage, ckpt in (("pre", pre[m, seed][0]), ("it", os.path.join(d, f"ckpt_{it_steps:06d}.pt"))):
            model, tok = load(ckpt, s.path("tokenizer.json"), device)
            res = results.setdefault((m, stage), {})
            preds = []
            for k in kinds:
                rows = qa_eval.qa_generate(model, tok, qa_test[k], device, max_rows=qa_rows, seed=0)
                preds += rows
                res.setdefault(f"em_{k}", {})[seed] = sum(r["correct"] for r in rows) / len(rows)
            res.setdefault("em_avg", {})[seed] = sum(res[f"em_{k}"][seed] for k in kinds) / len(kinds)
            mc = {r["benchmark"]: r["value"] for r in E.evaluate_checkpoint(
                ckpt, mc_files=[qa_test[k] for k in kinds], device=device, max_rows=qa_rows, seed=0,
                tokenizer=s.path("tokenizer.json"))}
            for k in kinds:
                res.setdefault(f"mc_{k}", {})[seed] = mc[f"qa_{k}"]
            res.setdefault("mc_avg", {})[seed] = sum(mc[f"qa_{k}"] for k in kinds) / len(kinds)
            like = s.final_rows(d, it_steps) if stage == "it" else s.final_rows(*pre[m, seed][1:])
            for b in ("probe_avg", "nll_image", "gap_image"):
                if b in like:
                    res.setdefault(b, {})[seed] = like[b]
            with open(os.path.join(s.out, f"answers_{m}_s{seed}_{stage}.jsonl"), "w") as f:
                f.writelines(json.dumps({**r, "kind": kind_of.get(r["id"], "")}) + "\n" for r in preds)
    st = {key: {b: report.stats(v) for b, v in bs.items()} for key, bs in results.items()}
    benches = ([f"em_{k}" for k in kinds] + ["em_avg"] + [f"mc_{k}" for k in kinds]
               + ["mc_avg", "probe_avg", "nll_image", "gap_image"])
    cols = [(m, stage) for m in methods for stage in ("pre", "it") if (m, stage) in st]
    vs = {}
    if {"ntp", "prior"} <= set(methods):
        for stage in ("pre", "it"):
            vs[stage] = {b: report.compare(st["prior", stage][b], st["ntp", stage][b], b, "prior")
                         for b in benches if b in st.get(("prior", stage), {}) and b in st.get(("ntp", stage), {})}

    md = s.header("Instruction tuning and generated answers (issue 7, item 4)",
                  "A short instruction-tuning stage (the paper: 20 steps before its benchmarks) from each pre-trained "
                  "NTP and PRIOR checkpoint, on question-answer pairs made from the ground truth of the *training* "
                  "scenes (benchmarks/qa.py), then questions about the *test* scenes: exact match of the greedily "
                  "generated answer (KV-cached `model.generate`; `em_*`), and the same questions scored by "
                  "likelihood as multiple choice (`mc_*`), with eval.py's probes and token NLL of the same "
                  "checkpoints. \"pre\" = the pre-trained checkpoint before tuning, \"it\" = after.")
    n_train_q = sum(1 for _ in open(qa_train))
    chance = {}
    for k in kinds:
        with open(qa_test[k]) as f:
            inv = [1 / len(json.loads(line)["choices"]) for line in f if line.strip()]
        chance[k] = sum(inv) / len(inv)
    md += [f"- pre-trained: {', '.join(sorted({os.path.relpath(d, s.src) for c, d, _ in pre.values()}))}",
           f"- tuning: {n_train_q} questions from train.jsonl's scenes ({args.per_scene} per scene), {it_steps} "
           f"steps of batch {s.batch()}, lr {args.it_lr:g} (warm-up, then cosine), `--train {args.it_train}`, loss on "
           + ("the answer tokens and <|eos|> only (`--loss prior` with p_ref 1 on the question, 0 on the answer: "
              "data/qa.answer_only_scores)" if args.it_loss == "answer"
              else "the whole question-and-answer text (NTP)"),
           f"- test: {qa_rows} questions per kind ({', '.join(kinds)}) from test.jsonl's scenes (a fixed random "
           f"subset of each kind's file), the same for generation and multiple choice; chance for `mc_*` (1 / "
           f"choices): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()),
           f"- exact match: after lower-casing, collapsing spaces and stripping end punctuation; greedy decoding, "
           f"at most 8 new tokens, stops at <|eos|>",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", "",
           "## Mean ± sample std over seeds", ""]
    head = ["benchmark"] + [f"{m.upper()} {stage} (n={st[m, stage]['em_avg']['n']})" for m, stage in cols]
    if "it" in vs:
        head += ["PRIOR − NTP after tuning", "relative"]
    rows = []
    for b in benches:
        if not any(b in st[c] for c in cols):
            continue
        r = [f"`{b}` {'↓' if report.lower_better(b) else '↑'}"] + [report.pm(st[c].get(b)) for c in cols]
        if "it" in vs:
            c = vs["it"].get(b)
            r += [report.fmt(c["diff"], sign=True) + (" *" if c["clear"] else ""),
                  report.fmt(c["rel"], pct=True)] if c else ["–", "–"]
        rows.append(r)
    md += table(head, rows)
    md += ["",
           "* = |difference| > 2 Welch standard errors. Every answer is in answers_<method>_s<seed>_<pre|it>.jsonl.",
           ""]

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(kinds) + 1)
    for ax, pre_b in zip(axes, ("em", "mc")):
        names = [f"{pre_b}_{k}" for k in kinds] + [f"{pre_b}_avg"]
        w = 0.8 / max(1, len(cols))
        for i, c in enumerate(cols):
            mean = [st[c][b]["mean"] for b in names]
            std = [st[c][b]["std"] for b in names]
            ax.bar(x + (i - (len(cols) - 1) / 2) * w, mean, w, yerr=std, capsize=3,
                   color={"ntp": "tab:gray", "prior": "tab:orange"}.get(c[0]), alpha=0.45 if c[1] == "pre" else 0.9,
                   label=f"{c[0].upper()} {'before' if c[1] == 'pre' else 'after'} tuning")
        ax.set_xticks(x, list(kinds) + ["average"])
        ax.set_ylim(0, 1)
        ax.set_title("exact match of the generated answer" if pre_b == "em" else "multiple choice by likelihood")
        ax.legend(fontsize=7)
    fig.suptitle(f"questions about test scenes ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over {seeds} seeds)",
                 fontsize=10)
    fig.tight_layout()
    png = os.path.join(s.out, "instruct.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md += ["![instruct](instruct.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "stats": {f"{m}/{stage}": v for (m, stage), v in st.items()}, "prior_vs_ntp": vs, "it_steps": it_steps,
        "it_lr": args.it_lr, "it_loss": args.it_loss, "it_train": args.it_train, "qa_rows": qa_rows, "seeds": seeds,
        "pretrained": {f"{m}/s{sd}": c for (m, sd), (c, d, _) in pre.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out
