"""experiments/paper.py scaling: NTP and PRIOR on nested subsets of the training captions, power-law fits
over the caption tokens seen (the paper's Figs. 6-7).
"""
import json
import math
import os
import time

import numpy as np

from experiments.paper_setup import Setup, _plt, table, write_json
from score import ScoreConfig
from experiments.powerlaw import bootstrap_alpha, fit_power_law, holdout, log_sizes, predict


def write_subset(src, out, n):
    """The first n records of a JSONL caption file, same ids, captions and fields; image paths rewritten to be
    relative to the new file's folder."""
    src_dir, out_dir = os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    with open(src) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    if len(rows) < n:
        raise ValueError(f"{src} has only {len(rows)} records, asked for {n}")
    for r in rows:
        if r.get("image") and not os.path.isabs(r["image"]):
            r["image"] = os.path.relpath(os.path.join(src_dir, r["image"]), out_dir)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)
    return out


def tokens_seen(lengths, steps, batch, seed):
    """Caption tokens (labels: caption + <|eos|>) in the batches train.py draws in `steps` steps."""
    from data.packing import global_batch
    return sum(lengths[i] for step in range(steps) for i in global_batch(step, len(lengths), batch, seed))


def scaling(args):
    from experiments import reporting as report
    from data import tokenizer as T
    t0 = time.time()
    s = Setup(args, "scaling")
    lrs, seeds = s.lrs(), args.seeds or (1 if args.quick else 2)
    methods = args.methods.split(",")
    targets = args.targets.split(",")
    train_path = os.path.join(s.data, "train.jsonl")
    n_all = sum(1 for line in open(train_path) if line.strip())
    batch = s.batch() if not args.quick or args.batch_size else min(s.batch(), 16)
    if args.sizes:
        sizes = sorted(int(x) for x in args.sizes.split(","))
    else:
        sizes = log_sizes(min(n_all, 200) if args.quick else n_all, k=5 if args.quick else 6, minimum=batch)
    if sizes[-1] > n_all:
        raise SystemExit(f"paper.py: --sizes up to {sizes[-1]}, but {train_path} has {n_all} records")
    if len(sizes) < 2:
        raise SystemExit("paper.py: scaling needs at least two sizes")
    steps_of = {n: max(1, math.ceil(args.epochs * n / batch)) for n in sizes}
    ref = s.path(f"ref_lm_{s.mix}.pt")
    data_dir = os.path.join(s.out, "data")
    subset, scores = {}, {}
    for n in sizes:
        if n == n_all:
            subset[n], scores[n] = train_path, s.path(f"scores_{s.mix}_train.pt")
        else:
            subset[n] = os.path.join(data_dir, f"train_{n}.jsonl")
            scores[n] = os.path.join(data_dir, f"scores_train_{n}.pt")
    need_scores = [n for n in sizes if "prior" in methods and not os.path.exists(scores[n])]
    if need_scores and not os.path.exists(ref):
        raise SystemExit(f"paper.py: {ref} (the reference LM) is missing: it scores the subsets")
    runs = []
    for m in methods:
        for n in sizes:
            for seed in range(seeds):
                d = os.path.join(s.out, "runs", s.mix, s.arch, f"{m}_n{n}_s{seed}_ep{args.epochs:g}_b{batch}")
                changes = {"data": subset[n], "batch_size": batch, **({"scores": scores[n]} if m == "prior" else {})}
                runs.append((m, n, seed, d, s.train_config(m, lrs[m], seed, d, steps_of[n], changes)))
    total_steps = sum(steps_of[n] for m, n, *_ in runs)
    print(f"scaling ({s.mix}, {s.arch.upper()}-LVLM): {', '.join(methods)} on {len(sizes)} subsets of {train_path} "
          f"({', '.join(map(str, sizes))} records; {args.epochs:g} epoch(s) of batch {batch}: "
          f"{', '.join(str(steps_of[n]) for n in sizes)} steps), {seeds} seed(s); lr "
          f"{', '.join(f'{m} {lrs[m]:g}' for m in methods)}")
    report_path = s.path(f"scores_{s.mix}_train.json")  # the main job's scoring report: its measured speed
    measured = json.load(open(report_path)).get("score_tokens_per_s") if os.path.exists(report_path) else None
    score_speed = measured or 6500
    print(s.estimate(total_steps, len(runs), len(runs), other_jobs=len(need_scores),
                     extra_s=sum(need_scores) * 28 / score_speed / s.parallel,
                     note=f"; scoring the subsets at ~{score_speed:,.0f} tokens/s of ~28 per caption ("
                          f"{'measured in ' + os.path.basename(report_path) if measured else 'a guess'})"))
    if args.plan:
        return None
    for n in sizes:
        if subset[n] != train_path and not os.path.exists(subset[n]):
            write_subset(train_path, subset[n], n)
    s.run_jobs([((ScoreConfig(ref=ref, tokenizer=s.path("tokenizer.json"), data=subset[n], out=scores[n],
                               device=s.device), "score"), f"score_{n}") for n in need_scores], "score the subsets")
    score_check = {}
    if "prior" in methods:
        from data.records import read_records
        from data.scores import load_scores
        from utils import text_fingerprint
        tok = T.load_tokenizer(s.path("tokenizer.json"))
        full_records = read_records(train_path, require_image=False, check_files=False)
        full = load_scores(s.path(f"scores_{s.mix}_train.pt"), T.fingerprint(tok), text_fingerprint(full_records))
        for n in sizes:
            if subset[n] == train_path:
                continue
            recs = read_records(subset[n], require_image=False, check_files=False)
            part = load_scores(scores[n], T.fingerprint(tok), text_fingerprint(recs), subset[n])
            score_check[n] = max(float((part[r.id] - full[r.id]).abs().max()) for r in recs)
    s.check_own([(d, cfg) for m, n, seed, d, cfg in runs])
    s.run_jobs([((cfg, "train"), f"train_{m}_n{n}_s{seed}") for m, n, seed, d, cfg in runs
                if not os.path.exists(os.path.join(d, f"ckpt_{steps_of[n]:06d}.pt"))], "train")
    s.run_jobs([((s.eval_config(d), "eval"), f"eval_{m}_n{n}_s{seed}") for m, n, seed, d, _ in runs
                if not s.final_rows(d, steps_of[n])], "evaluate")

    tok = T.load_tokenizer(s.path("tokenizer.json"))
    with open(train_path) as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    lengths = [len(c) + 1 for c in T.encode_captions(tok, captions)]
    points = []  # {"method", "n", "seed", "steps", "D", bench: value}
    for m, n, seed, d, a in runs:
        rows = s.final_rows(d, steps_of[n])
        points.append({"method": m, "n": n, "seed": seed, "steps": steps_of[n],
                       "D": tokens_seen(lengths[:n], steps_of[n], batch, seed), **rows})
    fits = {}
    for tgt in targets:
        for m in methods:
            pts = [p for p in points if p["method"] == m and p.get(tgt) is not None]
            D = [p["D"] for p in pts]
            y = [p[tgt] for p in pts]
            if len({p["n"] for p in pts}) < 2 or min(y, default=0) <= 0:
                fits[tgt, m] = {"error": "fewer than two sizes or a non-positive value: no power law in log space"}
                continue
            f = fit_power_law(D, y)
            f["bootstrap_ci"], slopes = bootstrap_alpha(D, y, seed=methods.index(m))
            f["slopes"] = slopes
            try:
                f["holdout"] = holdout(D, y) if len({p["n"] for p in pts}) >= 3 else None
            except ValueError:
                f["holdout"] = None
            fits[tgt, m] = f
    diffs = {}
    for tgt in targets:
        if ({"ntp", "prior"} <= set(methods) and "alpha" in fits.get((tgt, "prior"), {})
                and "alpha" in fits.get((tgt, "ntp"), {})):
            a, b = fits[tgt, "prior"]["slopes"], fits[tgt, "ntp"]["slopes"]  # independent resamples (seeds 0, 1)
            k = min(len(a), len(b))
            diff = a[:k] - b[:k]
            diffs[tgt] = {"diff": fits[tgt, "prior"]["alpha"] - fits[tgt, "ntp"]["alpha"],
                          "ci": [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]}

    md = s.header("Scaling with data: L(D) = (D / D_c)^alpha_D (the paper's Figs. 6-7)",
                  f"NTP and PRIOR trained on nested subsets of the training captions (the first n records of "
                  f"train.jsonl), {args.epochs:g} epoch(s) each with its own warm-up and cosine schedule, so D, the "
                  f"caption tokens seen, grows with the data. Fitted per method: log y = alpha_D log D - alpha_D "
                  f"log D_c by least squares over every run (each seed one point), for y = "
                  f"{', '.join(f'`{t}`' for t in targets)} of the final checkpoint. For a score (↑) a larger alpha_D "
                  f"means faster gains with data; for a loss (↓) alpha_D is negative and a more negative one "
                  f"means faster gains.")
    md += [f"- sizes (records): {', '.join(map(str, sizes))} of {n_all}; steps: "
           f"{', '.join(str(steps_of[n]) for n in sizes)} (batch {batch}); warm-up: the preset's share of the steps "
           f"({', '.join(str(s.warmup(steps_of[n])) for n in sizes)}); "
           f"lr {', '.join(f'{m} {lrs[m]:g}' for m in methods)} (chosen_lrs.json: the main job's grid at "
           f"{s.p['vlm']['steps']} steps); seeds 0-{seeds - 1}; eval rows: {s.eval_rows or 'all'}",
           "- D: caption tokens incl. <|eos|> in the run's batches (data.packing.global_batch), before any truncation "
           "to the row (train.py's log warns if any caption was truncated)",
           f"- PRIOR's p_ref for each subset: score.py run on the subset file with the main job's reference LM "
           f"(`{os.path.relpath(ref, s.src)}`, same tokenizer), so each score file carries its subset's data "
           f"fingerprint; largest |p_ref(subset) - p_ref(full file)| over all tokens: "
           f"{max(score_check.values()):.2e}" if score_check else "- PRIOR's p_ref: the full file's scores (no "
                                                                  "subset scored)",
           f"- wall time of this command: {(time.time() - t0) / 60:.1f} min", ""]
    md += ["## Fits", "", "95% intervals of alpha_D: from the regression's standard error (t, n − 2 dof) and from "
           "a bootstrap over runs (2,000 resamples). D_c = exp(−intercept / alpha_D) is only meaningful when alpha_D "
           "is clearly away from 0. Held-out: the fit on all but the largest size predicts the largest size's mean; "
           "relative error = |predicted − observed| / observed.", ""]
    rows = []
    for tgt in targets:
        for m in methods:
            f = fits.get((tgt, m), {})
            if "alpha" not in f:
                rows.append([f"`{tgt}`", m.upper(), f.get("error", "–"), "", "", "", "", "", ""])
                continue
            h = f.get("holdout")
            rows.append([f"`{tgt}`", m.upper(), f"{f['alpha']:+.4g}", f"[{f['ci'][0]:+.4g}, {f['ci'][1]:+.4g}]",
                         f"[{f['bootstrap_ci'][0]:+.4g}, {f['bootstrap_ci'][1]:+.4g}]", f"{f['D_c']:.3g}",
                         f"{f['n']}", f"{h['predicted']:.4f} vs {h['observed']:.4f}" if h else "–",
                         f"{100 * h['rel_error']:.2f}%" if h else "–"])
    md += table(["y", "method", "alpha_D", "95% CI (SE)", "95% CI (bootstrap)", "D_c", "runs",
                 "held-out: predicted vs observed", "rel. error"], rows)
    for tgt, d in diffs.items():
        md += ["", f"alpha_D(PRIOR) − alpha_D(NTP) on `{tgt}`: {d['diff']:+.4g}, 95% interval from the two "
               f"bootstraps (independent resamples) [{d['ci'][0]:+.4g}, {d['ci'][1]:+.4g}]"
               + (" (excludes 0)" if d['ci'][0] > 0 or d['ci'][1] < 0 else " (includes 0)")]
    md += ["", "## Runs (final checkpoint)", ""]
    md += table(["method", "records", "seed", "steps", "D (tokens)", *[f"`{t}`" for t in targets]],
                [[p["method"].upper(), str(p["n"]), str(p["seed"]), str(p["steps"]), str(p["D"]),
                  *[report.fmt(p.get(t)) for t in targets]] for p in points])

    plt = _plt()
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4))
    colours = {"ntp": "tab:gray", "prior": "tab:orange"}
    for ax, tgt in zip(np.atleast_1d(axes), targets):
        for m in methods:
            pts = [p for p in points if p["method"] == m and p.get(tgt) is not None]
            c = colours.get(m, None)
            ax.plot([p["D"] for p in pts], [p[tgt] for p in pts], "o", color=c, ms=4, alpha=0.7)
            f = fits.get((tgt, m), {})
            if "alpha" in f:
                xs = np.geomspace(min(p["D"] for p in pts), max(p["D"] for p in pts), 50)
                ax.plot(xs, predict(f, xs), "-", color=c, label=f"{m.upper()}: alpha_D = {f['alpha']:+.3f}")
                h = f.get("holdout")
                if h:
                    ax.plot(xs, predict(h["fit"], xs), ":", color=c, lw=1)
                    ax.plot([h["D"]], [h["predicted"]], "x", color=c, ms=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter
        for fmt_ in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            fmt_(ScalarFormatter())
        ax.set_xlabel("D: caption tokens seen")
        ax.set_ylabel(f"{tgt} {'↓' if report.lower_better(tgt) else '↑'}")
        ax.set_title(f"{tgt}: dots = runs, line = fit; x = held-out prediction", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(s.out, "scaling.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md += ["", "![scaling](scaling.png)", ""]
    open(os.path.join(s.out, "results.md"), "w").write("\n".join(md) + "\n")
    write_json(os.path.join(s.out, "results.json"), {
        "sizes": sizes, "steps": steps_of, "batch": batch, "epochs": args.epochs, "seeds": seeds, "lrs": lrs,
        "points": points, "score_max_abs_diff": score_check, "alpha_diff": diffs,
        "fits": {f"{t}/{m}": {k: v for k, v in f.items() if k != "slopes"} for (t, m), f in fits.items()}})
    print(f"done in {(time.time() - t0) / 60:.1f} min: {os.path.join(s.out, 'results.md')}, {png}")
    return s.out
