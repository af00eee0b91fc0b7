"""experiments/paper.py ablation: PRIOR's exponent alpha and the factor k, next to NTP (the paper's Fig. 5)."""
import os
import time

from experiments.paper_setup import Setup, bar_plot, table, write_json

MAIN_BENCHES = ["probe_avg", "presence", "colour", "count", "position", "retrieval", "nll_image", "nll_boiler",
                "nll_noise", "nll_all", "gap_image", "gap_all"]


def ablation_arms(alphas):
    arms = [("ntp", "NTP", "ntp", 1.0, False)]
    arms += [(f"prior_a{a:g}", f"PRIOR α={a:g}", "prior", a, False) for a in alphas]
    arms.append(("prior_nok", "PRIOR α=1 w/o k", "prior", 1.0, True))
    return arms  # (key, label, loss, alpha, no_k)


def ablation(args):
    from experiments import reporting as report
    t0 = time.time()
    s = Setup(args, "ablation")
    lrs, steps, seeds = s.lrs(), s.steps(), args.seeds or (1 if args.quick else s.p["seeds"])
    alphas = [float(a) for a in args.alphas.split(",")]
    arms = ablation_arms(alphas)
    plan, reused = [], {}
    for key, label, loss, alpha, no_k in arms:
        lr = lrs[loss]
        for seed in range(seeds):
            d = os.path.join(s.out, "runs", s.mix, s.arch, f"{key}_lr{lr:g}_s{seed}_steps{steps}")
            cfg = s.train_config(loss, lr, seed, d, changes={"alpha": alpha, "no_k": no_k})
            main = None if args.no_reuse or args.quick else s.main_run(loss, lr, seed)
            if main and s.final_rows(main, steps) and s.same_run(main, cfg):
                reused[key, seed] = main
                continue
            plan.append((key, seed, d, cfg))
    print(f"ablation ({s.mix}, {s.arch.upper()}-LVLM): {len(arms)} arms x {seeds} seeds, {steps} steps at lr "
          f"NTP {lrs['ntp']:g} / PRIOR {lrs['prior']:g}; {len(reused)} main-job runs reused, {len(plan)} to run")
    print(s.estimate(steps * len(plan), len(plan), len(plan)))
    if args.plan:
        return None
    s.check_own([(d, cfg) for k, seed, d, cfg in plan])
    todo = [((cfg, "train"), f"train_{k}_s{seed}") for k, seed, d, cfg in plan
            if not os.path.exists(os.path.join(d, f"ckpt_{steps:06d}.pt"))]
    s.run_jobs(todo, "train")
    s.run_jobs([((s.eval_config(d), "eval"), f"eval_{k}_s{seed}") for k, seed, d, _ in plan
                if not s.final_rows(d, steps)], "evaluate")
    values = {}  # key -> bench -> {seed: value}
    for k, seed, d, _ in plan:
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[seed] = v
    for (k, seed), d in reused.items():
        for b, v in s.final_rows(d, steps).items():
            values.setdefault(k, {}).setdefault(b, {})[seed] = v
    st = {k: {b: report.stats(v) for b, v in bs.items()} for k, bs in values.items()}
    benches = [b for b in MAIN_BENCHES if b in st.get("ntp", {})]
    every = sorted({b for bs in st.values() for b in bs if "_shuffled" not in b}, key=report.bench_key)
    vs = {k: {b: report.compare(st[k][b], st["ntp"][b], b, "prior") for b in st[k] if b in st["ntp"]}
          for k in st if k != "ntp"}

    md = s.header("Ablation: PRIOR's exponent alpha and the factor k (the paper's Fig. 5)",
                  "PRIOR with w = (1 - p_ref)^alpha for each alpha, and PRIOR (alpha 1) without the factor k in "
                  "its per-caption normalisation (`train.py --no-k`: f_i = w_i / sum_j w_j), next to NTP. Every "
                  "arm: the main job's recipe, data and initialisation, the final checkpoint, evaluated as the "
                  "main job evaluates.")
    md += [f"- {steps} steps of batch {s.batch()}, lr NTP {lrs['ntp']:g}, every PRIOR arm {lrs['prior']:g} "
           "(chosen_lrs.json: chosen for NTP and PRIOR alpha 1 by their probe average on the validation probes; "
           "the other arms "
           f"were not tuned), seeds 0-{seeds - 1}; eval rows per probe file / test captions: {s.eval_rows or 'all'}",
           "- reused main-job runs (same settings): "
           f"{', '.join(sorted({os.path.relpath(d, s.src) for d in reused.values()})) or 'none'}",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", "",
           "## Mean ± sample std over seeds (final step)", ""]
    md += table(["benchmark"] + [f"{lab} (n={st[k][benches[0]]['n'] if benches else 0})"
                                 for k, lab, *_ in arms if k in st],
                [[f"`{b}` {'↓' if report.lower_better(b) else '↑'}"]
                 + [report.pm(st[k].get(b)) for k, *_ in arms if k in st]
                 for b in benches])
    md += ["",
           "## Change vs NTP (relative; positive = better than NTP; * = |difference| > 2 Welch standard errors)", ""]
    md += table(["benchmark"] + [lab for k, lab, *_ in arms if k in vs],
                [[f"`{b}`"] + [(report.fmt(vs[k][b]["rel"], pct=True) + (" *" if vs[k][b]["clear"] else ""))
                               if b in vs[k] else "–" for k, *_ in arms if k in vs] for b in benches])
    md += ["", "Every benchmark of eval.py (mean ± std) is in results.json. `probe_avg`: mean accuracy over the probe "
           "groups (chance: 0.5 for presence, 0.25 for each other group, with the generator's defaults); `nll_image`: "
           "NLL of image-related caption words with the true image; "
           "`gap_image`: NLL with another image minus with the true one (how much the image helps).", ""]

    keys = [k for k, *_ in arms if k in st]
    labels = {k: lab for k, lab, *_ in arms}
    png = os.path.join(s.out, "ablation.png")
    bar_plot(st, keys, labels, [b for b in ("probe_avg", "nll_image", "gap_image") if b in st.get("ntp", {})],
             {"ntp": "tab:gray"}, "tab:orange", f"PRIOR ablation ({s.mix}, {s.arch.upper()}-LVLM; mean ± std over "
             f"{seeds} seeds)", png)
    md += ["![ablation](ablation.png)", ""]
    md += ["## Every benchmark", ""] + table(
        ["benchmark"] + [labels[k] for k in keys],
        [[f"`{b}`"] + [report.pm(st[k].get(b)) for k in keys] for b in every])
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "arms": [{"key": k, "label": lab, "loss": l, "alpha": a,
                  "no_k": nk, "lr": lrs[l]} for k, lab, l, a, nk in arms],
        "steps": steps, "seeds": seeds, "stats": st, "vs_ntp": vs,
        "reused": {f"{k}/s{sd}": d for (k, sd), d in reused.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out
