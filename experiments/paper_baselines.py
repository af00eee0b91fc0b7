"""experiments/paper.py baselines: the paper's Table 1 baselines, Rho-1 and CAL, each at its own lr from
a grid on the validation probes, next to the main job's NTP, PRIOR and oracle runs.
"""
import os
import time

from baselines.attention import AttnConfig
from experiments.paper_setup import Setup, bar_plot, table, write_json
from utils import option


def baseline_arms(attn_scores):
    """(key, label, train.py fields) of each baseline; each replaces the loss (and adds an objective) in the main
    job's recipe. ITM, ITC and reconstruction are added to NTP, as the paper combines them."""
    return [("rare", "rare-word weighting", {"loss": "rare"}),
            ("attn", "attention weighting", {"loss": "attn", "attn_scores": attn_scores}),
            ("itm", "NTP + ITM", {"loss": "ntp", "objective": "itm"}),
            ("itc", "NTP + ITC", {"loss": "ntp", "objective": "itc"}),
            ("recon", "NTP + reconstruction", {"loss": "ntp", "objective": "recon", "feature_cache": ""}),
            ("rho1", "Rho-1 (not in the paper)", {"loss": "rho1"}),
            ("cal", "CAL (not in the paper)", {"loss": "cal"})]


def as_flags(fields):
    """An arm's train.py fields as the flags results.json lists: ["--loss", "attn", "--attn-scores", PATH]."""
    return [x for name, value in fields.items() for x in (option(name), str(value))]


def weight_relevance(s, score_file, attention):
    """Mean token weight by ground-truth word kind and image-vs-rest ROC-AUC of a score file on the training
    captions: w = 1 - p_ref for PRIOR's file, the stored weight for the attention scorer's."""
    from data import tokenizer as T
    from data.records import read_records
    from experiments.importance import relevance_report
    from data.scores import load_scores
    from data.tags import token_tags
    from utils import text_fingerprint
    data = os.path.join(s.data, "train.jsonl")
    tok = T.load_tokenizer(s.path("tokenizer.json"))
    records = read_records(data, check_files=False)
    stored = load_scores(score_file, T.fingerprint(tok), text_fingerprint(records), data)
    tags = token_tags(tok, records)
    if tags is None:
        return None
    values = [1 - stored[r.id].float() if attention else stored[r.id].float() for r in records]
    return relevance_report(values, tags)  # it takes p_ref: 1 - attention weight gives w = attention weight


def baselines(args):
    from experiments import reporting as report
    t0 = time.time()
    s = Setup(args, "baselines")
    chosen, steps, seeds = s.lrs(), s.steps(), args.seeds or (1 if args.quick else s.p["seeds"])
    attn_scores = os.path.join(s.out, "attn_scores_train.pt")
    wanted = [k for k in args.arms.split(",") if k]
    arms = [a for a in baseline_arms(attn_scores) if a[0] in wanted]
    unknown = set(wanted) - {a[0] for a in baseline_arms("")}
    if unknown:
        raise SystemExit(f"paper.py baselines: unknown --arms {sorted(unknown)}; choose from "
                         f"{[a[0] for a in baseline_arms('')]}")
    grid = [float(x) for x in args.lrs.split(",")] if args.lrs else \
        ([chosen["ntp"]] if args.quick or args.lr else list(s.p["lrs"][s.arch]))
    if args.lr:
        grid = [args.lr]

    def run_dir(key, lr, seed):
        return os.path.join(s.out, "runs", s.mix, s.arch, f"{key}_lr{lr:g}_s{seed}_steps{steps}")

    # the main job's NTP, PRIOR and oracle runs are the reference rows; trained here only when missing
    refs = [(loss, {"ntp": "NTP", "prior": "PRIOR", "oracle": "oracle (ground-truth weights)"}[loss])
            for loss in ("ntp", "prior", "oracle") if loss in chosen]
    ref_plan, reused = [], {}
    for loss, _ in refs:
        for seed in range(seeds):
            d = run_dir(loss, chosen[loss], seed)
            cfg = s.train_config(loss, chosen[loss], seed, d)
            main = None if args.quick else s.main_run(loss, chosen[loss], seed)
            if main and s.final_rows(main, steps) and s.same_run(main, cfg):
                reused[loss, seed] = main
            else:
                ref_plan.append((loss, seed, d, cfg))
    grid_plan = [(k, lr, run_dir(k, lr, 0), s.train_config("ntp", lr, 0, run_dir(k, lr, 0), changes=fields))
                 for k, _, fields in arms for lr in grid]
    n_more = len(arms) * (seeds - 1)
    print(f"baselines ({s.mix}, {s.arch.upper()}-LVLM): {len(arms)} baselines; lr grid {grid} at seed 0 "
          f"({len(grid_plan)} runs, chosen on the validation probes), then seeds 1-{seeds - 1} at each one's "
          f"chosen lr ({n_more} runs); NTP/PRIOR/oracle: {len(reused)} main-job runs reused, {len(ref_plan)} to run")
    print(s.estimate(steps * (len(grid_plan) + n_more + len(ref_plan)) * 1.4, len(grid_plan) + n_more + len(ref_plan),
                     2 * len(grid_plan) + n_more + len(ref_plan),
                     extra_s=0 if "attn" not in wanted or os.path.exists(attn_scores) else 540 / (os.cpu_count() or 1),
                     note=" x1.4 for the baselines' extra forwards (docs/performance.md); the attention "
                          "scorer: 535 s on one thread of our 2-core CPU at the cpu preset (measured), here "
                          "on every core"))
    if args.plan:
        return None
    s.check_own([(d, cfg) for *_, d, cfg in grid_plan + ref_plan])

    # 1. the attention-weighting baseline's scorer (the paper: CLIP's attention; ours: a small contrastive model
    #    on the same captions, its image side the main job's ViT)
    if "attn" in wanted and not os.path.exists(attn_scores):
        cfg = AttnConfig(**{"data": os.path.join(s.data, "train.jsonl"), "tokenizer": s.path("tokenizer.json"),
                            "init_encoder": s.path("vit.pt"), "device": s.device, "out": attn_scores,
                            **({"steps": 3, "batch_size": 8} if args.quick else {})})
        s.run_jobs([((cfg, "baselines.attention"), "attn_scorer")], "attention scorer")
    # 2. the lr grid at seed 0, each final checkpoint evaluated on the validation probes and captions
    last = f"ckpt_{steps:06d}.pt"
    s.run_jobs([((cfg, "train"), f"train_{k}_lr{lr:g}_s0") for k, lr, d, cfg in grid_plan
                if not os.path.exists(os.path.join(d, last))], "lr grid")
    val_jobs = []
    for k, lr, d, _ in grid_plan:
        v = d + "_val"
        os.makedirs(v, exist_ok=True)
        if not os.path.exists(os.path.join(v, last)):
            os.link(os.path.join(d, last), os.path.join(v, last))
        if not s.final_rows(v, steps):
            cfg = s.eval_config(v, probes=os.path.join(s.data, "probes_val"), test=os.path.join(s.data, "val.jsonl"),
                                test_scores=False)
            val_jobs.append(((cfg, "eval"), f"eval_{k}_lr{lr:g}_val"))
    s.run_jobs(val_jobs, "evaluate the lr grid on validation probes")
    val, lr_of = {}, {}
    for k, lr, d, _ in grid_plan:
        f = s.final_rows(d + "_val", steps)
        val.setdefault(k, {})[lr] = f
    for k in val:  # best validation probe average, ties to the lower image NLL (one seed; experiment.py's
        # protocol scores probe_cc_avg over 2 seeds and extends the grid at its edges: docs/experiment.md)
        lr_of[k] = max(val[k],
                       key=lambda lr: (round(val[k][lr].get("probe_avg", -1), 6), -val[k][lr].get("nll_image", 0)))
    # 3. the other seeds at each baseline's chosen lr, and any missing reference run
    fields_of = {k: f for k, _, f in arms}
    seed_plan = [(k, sd, run_dir(k, lr_of[k], sd), s.train_config("ntp", lr_of[k], sd, run_dir(k, lr_of[k], sd),
                                                                 changes=fields_of[k]))
                 for k, _, _ in arms for sd in range(1, seeds)]
    s.check_own([(d, cfg) for *_, d, cfg in seed_plan])
    s.run_jobs([((cfg, "train"), f"train_{k}_s{sd}") for k, sd, d, cfg in seed_plan + ref_plan
                if not os.path.exists(os.path.join(d, last))], "train the other seeds")
    runs = {(k, 0): run_dir(k, lr_of[k], 0) for k, _, _ in arms}
    runs.update({(k, sd): d for k, sd, d, _ in seed_plan + ref_plan})
    runs.update(reused)
    s.run_jobs([((s.eval_config(d), "eval"), f"eval_{k}_s{sd}") for (k, sd), d in sorted(runs.items())
                if not s.final_rows(d, steps)], "evaluate on the test probes")

    values = {}
    for (k, sd), d in runs.items():
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[sd] = v
    st = {k: {b: report.stats(v) for b, v in bs.items()} for k, bs in values.items()}
    vs = {k: {b: report.compare(st[k][b], st["ntp"][b], b, "prior") for b in st[k] if b in st["ntp"]}
          for k in st if k != "ntp"}
    labels = {**dict(refs), **{k: lab for k, lab, _ in arms}}
    keys = [k for k in [r for r, _ in refs] + [a[0] for a in arms] if k in st]
    lr_used = {**{k: chosen[k] for k, _ in refs}, **lr_of}
    relevance = {}
    if not args.quick or os.path.exists(attn_scores):
        relevance["PRIOR: w = 1 - p_ref"] = weight_relevance(s, s.path(f"scores_{s.mix}_train.pt"), False)
        if os.path.exists(attn_scores):
            relevance["attention weighting"] = weight_relevance(s, attn_scores, True)

    md = s.header("Baselines (the paper's Table 1) and two related token-selection methods",
                  "Each baseline in the main job's recipe (same data, initialisation, steps and batch; H-LVLM: "
                  "only the projector trains), next to the main job's NTP, PRIOR and oracle runs. Every baseline "
                  "gets its own learning rate from the main job's lr grid, chosen at seed 0 by the validation "
                  "probes as the main job chooses NTP's and PRIOR's; the final checkpoint is evaluated on the "
                  "test probes and captions as the main job evaluates.")
    md += [f"- {steps} steps of batch {s.batch()}, seeds 0-{seeds - 1}; eval rows per probe file / test captions: "
           f"{s.eval_rows or 'all'}; wall time of this command: {(time.time() - t0) / 60:.1f} min",
           "- reused main-job runs: "
           f"{', '.join(sorted({os.path.relpath(d, s.src) for d in reused.values()})) or 'none'}",
           "", "## Mean ± sample std over seeds (final step); change vs NTP", "",
           "Relative change vs NTP, positive = better; * = |difference| > 2 Welch standard errors (clear).", ""]
    show = [b for b in ("probe_avg", "presence", "colour", "count", "position", "retrieval", "nll_image",
                        "gap_image", "nll_boiler") if b in st.get("ntp", {})]
    head = (["method", "lr", "n"] + [f"`{b}` {'↓' if report.lower_better(b) else '↑'}" for b in show]
            + ["`probe_avg` vs NTP", "`nll_image` vs NTP"])
    rows = []
    for k in keys:
        row = [labels[k], f"{lr_used[k]:g}", str(st[k][show[0]]["n"]) if show else "0"]
        row += [report.pm(st[k].get(b)) for b in show]
        for b in ("probe_avg", "nll_image"):
            c = vs.get(k, {}).get(b)
            row.append("–" if c is None else report.fmt(c["rel"], pct=True) + (" *" if c["clear"] else ""))
        rows.append(row)
    md += table(head, rows)
    md += ["", "## Learning-rate grid (seed 0, validation probes and captions, final step)", ""]
    md += table(["method"] + [f"lr {lr:g}: `probe_avg` / `nll_image`" for lr in grid] + ["chosen"],
                [[labels[k]] + [f"{val[k][lr].get('probe_avg', float('nan')):.3f} / "
                                f"{val[k][lr].get('nll_image', float('nan')):.3f}"
                                for lr in grid] + [f"{lr_of[k]:g}"] for k in val])
    if relevance:
        md += ["", "## How well each weighting finds the image words (training captions, ground-truth tags)", ""]
        md += table(["weights", "mean w: image", "boiler", "noise", "AUC image vs boiler", "image vs noise",
                     "image vs rest"],
                    [[name, *(report.fmt(r["mean_w"][c]) for c in ("image", "boiler", "noise")),
                      *(report.fmt(r["auc"][a]) for a in ("image_vs_boiler", "image_vs_noise", "image_vs_rest"))]
                     for name, r in relevance.items() if r])
    md += ["", "`probe_avg`: mean accuracy over the probe groups (chance 0.5 for presence, 0.25 for the others); "
           "`nll_image` / `nll_boiler`: NLL of image-related / boilerplate caption words with the true image; "
           "`gap_image`: NLL with another image minus with the true one. Every benchmark is in results.json.", ""]
    png = os.path.join(s.out, "baselines.png")
    bar_plot(st, keys, labels, [b for b in ("probe_avg", "nll_image", "gap_image") if b in st.get("ntp", {})],
             {"ntp": "tab:gray", "prior": "tab:orange", "oracle": "tab:green"}, "tab:blue",
             f"Baselines ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over {seeds} seeds)", png)
    md += ["![baselines](baselines.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "arms": [{"key": k, "label": labels[k], "lr": lr_used[k],
                  "flags": as_flags(fields_of.get(k, {"loss": k}))} for k in keys],
        "steps": steps, "seeds": seeds, "stats": st, "vs_ntp": vs, "lr_grid": {k: {f"{lr:g}": v for lr, v in g.items()}
                                                                              for k, g in val.items()},
        "chosen_lr": lr_of, "relevance": relevance, "reused": {f"{k}/s{sd}": d for (k, sd), d in reused.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out
