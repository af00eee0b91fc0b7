"""Turn every evaluated checkpoint into the summary a researcher reads: tables, verdicts and plots.

    python report.py --results out/results.json --out out/

results.json is a list of rows {"mix", "arch", "loss", "seed", "lr", "step", "phase", "benchmark", "value"}
(a missing mix / phase reads as "web" / "main"; extra keys are ignored). Writes out/results.md and, per
caption mix and model family, curves_*.png, average_*.png, token_nll_*.png and lr_grid_*.png.

The statistics are kept simple enough to check by hand:
- each loss is shown as mean ± sample std over seeds (duplicate rows of one seed are averaged first);
- a difference to NTP is "clear" only when |mean difference| > 2 standard errors, with the UNPAIRED
  (Welch) standard error sqrt(sd_a²/n_a + sd_b²/n_b). Seeds are not paired: that is conservative (pairing
  could only shrink the error if seeds share data order) and it works when the losses ran different seeds.
  With one seed there is no spread to compare against, so nothing is ever called clear;
- the relative change is signed so that positive always means "better than NTP": (x − ntp)/|ntp| for
  higher-is-better rows (probes, gap_*), (ntp − x)/|ntp| for nll_* rows (lower is better).
Benchmarks are classified by name only (nll_* lower is better, everything else higher), so new ones simply
show up. The "best step" tables pick each method's checkpoint by the same numbers they then report, as the
paper does: that flatters every method a little, so the final-step table is the one to trust.
"""
import argparse
import json
import math
import os

PROBES = ["presence_random", "presence_popular", "presence_adversarial", "colour", "count", "position", "retrieval"]
CATS = ["image", "boiler", "noise", "all"]
LOSSES = ["ntp", "prior", "oracle", "rare"]
NAMES = {"ntp": "NTP", "prior": "PRIOR", "oracle": "Oracle", "rare": "Rare", "h": "H-LVLM", "u": "U-LVLM"}
COLOURS = {"ntp": "tab:gray", "prior": "tab:orange", "oracle": "tab:green", "rare": "tab:purple"}
Z = 2.0  # a difference counts as clear beyond Z standard errors
NAN = float("nan")


def name(key):
    return NAMES.get(key, str(key))


def lr_str(lr):
    return "?" if lr is None else f"{lr:g}"


def lower_better(bench):
    return bench.startswith("nll_")  # gap_* (shuffled − true NLL) is higher-is-better


def is_probe(bench):
    return not bench.startswith(("nll_", "gap_"))


def bench_key(bench):
    """Probes in the paper's order (each _norm variant after its base), probe_avg, NLL rows, gap rows."""
    base, norm = (bench[:-5], 1) if bench.endswith("_norm") else (bench, 0)
    if base == "probe_avg":
        return (1, 0, "", norm)
    if is_probe(bench):
        return (0, PROBES.index(base) if base in PROBES else len(PROBES), base, norm)
    cat = bench.split("_")[1]  # nll_image, nll_image_shuffled, ..., then nll_w_* by reference weight
    return (3 if bench.startswith("gap_") else 2, CATS.index(cat) if cat in CATS else len(CATS), bench, 0)


def loss_key(loss):
    return (LOSSES.index(loss) if loss in LOSSES else len(LOSSES), loss)


def load_rows(path):
    with open(path) as f:
        return [_normal(r) for r in json.load(f)]


def judged(rows):
    """Rows that get a verdict. NLL with a wrong image (nll_*_shuffled) is neither better low nor high on its
    own: it enters only through the grounding gap (gap_* = shuffled - true), so it stays in results.json only."""
    return [r for r in rows if "_shuffled" not in r["benchmark"]]


def _normal(row):
    row = dict(row)
    row["mix"], row["phase"] = row.get("mix") or "web", row.get("phase") or "main"
    row["value"] = NAN if row.get("value") is None else float(row["value"])  # a diverged run stays visible
    return row


def stats(by_seed):
    """{seed: value} -> mean, sample std (0 with one seed), n. Written out by hand so NaN propagates."""
    v = list(by_seed.values())
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "by_seed": dict(by_seed)}


def compare(x, ntp, bench, loss):
    """x vs NTP on one benchmark: signed difference, relative change (positive = x better), verdict."""
    diff = x["mean"] - ntp["mean"]
    se = math.sqrt(x["std"] ** 2 / x["n"] + ntp["std"] ** 2 / ntp["n"])
    sign = -1 if lower_better(bench) else 1
    rel = sign * diff / abs(ntp["mean"]) if ntp["mean"] else NAN
    clear = min(x["n"], ntp["n"]) > 1 and abs(diff) > Z * se  # NaN compares False: never clear
    better = (1 if sign * diff > 0 else -1) if clear else 0
    verdict = {1: f"{name(loss)} better", -1: "NTP better", 0: "no clear difference"}[better]
    return {"diff": diff, "se": se, "rel": rel, "clear": clear, "better": better, "verdict": verdict}


def _tree(rows, phase, by_lr):
    """{(mix, arch): {run: {step: {bench: {seed: value}}}}}, run = loss or (loss, lr); duplicates averaged."""
    t = {}
    for r in rows:
        if r["phase"] == phase:
            run = (r["loss"], r.get("lr")) if by_lr else r["loss"]
            (t.setdefault((r["mix"], r.get("arch", "?")), {}).setdefault(run, {}).setdefault(r["step"], {})
             .setdefault(r["benchmark"], {}).setdefault(r.get("seed", 0), []).append(r["value"]))
    return {fam: {run: {step: {b: stats({s: sum(v) / len(v) for s, v in seeds.items()}) for b, seeds in bs.items()}
                        for step, bs in steps.items()} for run, steps in runs.items()} for fam, runs in t.items()}


def _score(st, bench="probe_avg"):
    """Seed-mean of `bench` for choosing a step / lr; missing or NaN never wins."""
    m = st.get(bench, {}).get("mean", NAN)
    return -math.inf if math.isnan(m) else m


def _part(runs, losses, pick):
    """Stats of each loss at the step pick(steps) chooses, plus every loss compared with NTP."""
    step = {l: pick(runs[l]) for l in losses}
    st = {l: runs[l][step[l]] for l in losses}
    vs = {l: {b: compare(st[l][b], st["ntp"][b], b, l) for b in st[l] if b in st["ntp"]}
          for l in losses if l != "ntp" and "ntp" in st}
    return {"step": step, "n": {l: max(s["n"] for s in st[l].values()) for l in losses}, "stats": st, "vs_ntp": vs}


def summarize(rows):
    """Nested dict out[mix][arch] with, for the main runs, "final" and "best" parts ({"step", "n", "stats",
    "vs_ntp"} per loss), "curves" (loss -> bench -> [(step, stats)]), and for the grid runs "grid"
    (loss -> lr -> stats at that run's final step) and "best_lr" (loss -> lr)."""
    rows = judged([_normal(r) for r in rows])
    main, grid = _tree(rows, "main", False), _tree(rows, "grid", True)
    out = {}
    for mix, arch in sorted(set(main) | set(grid), key=lambda k: (k[0] != "web", k)):
        runs, fam = main.get((mix, arch), {}), {}
        losses = sorted(runs, key=loss_key)
        fam["losses"] = losses
        fam["benchmarks"] = sorted({b for l in losses for st in runs[l].values() for b in st}, key=bench_key)
        fam["steps"] = sorted({s for l in losses for s in runs[l]})
        fam["seeds"] = {l: len({sd for st in runs[l].values() for s in st.values() for sd in s["by_seed"]})
                        for l in losses}
        fam["lrs"] = {l: sorted({r.get("lr") for r in rows if r["phase"] == "main" and r["mix"] == mix
                                 and r.get("arch", "?") == arch and r["loss"] == l}, key=str) for l in losses}
        if losses:
            fam["final"] = _part(runs, losses, max)
            fam["best"] = _part(runs, losses, lambda steps: max(sorted(steps), key=lambda s: _score(steps[s])))
            fam["best"]["by_probe_avg"] = any("probe_avg" in st for l in losses for st in runs[l].values())
        fam["curves"] = {l: {b: [(s, runs[l][s][b]) for s in sorted(runs[l]) if b in runs[l][s]]
                             for b in fam["benchmarks"]} for l in losses}
        g = {}
        for (l, lr), steps in grid.get((mix, arch), {}).items():
            g.setdefault(l, {})[lr] = steps[max(steps)]
        fam["grid"] = {l: g[l] for l in sorted(g, key=loss_key)}
        # best lr: highest probe_avg; without probes, lowest image-token NLL
        fam["best_lr"] = {l: max(sorted(lrs, key=str), key=lambda lr: _score(lrs[lr]) if "probe_avg" in lrs[lr]
                                 else -lrs[lr].get("nll_image", {}).get("mean", math.inf)) for l, lrs in g.items()}
        out.setdefault(mix, {})[arch] = fam
    return out


def fmt(x, sign=False, pct=False):
    if x is None or math.isnan(x):
        return "–"
    x = 0.0 if round(x, 3) == 0 else x  # no "-0.000": a rounded zero has no sign
    return f"{100 * x:+.1f}%" if pct else f"{x:+.3f}" if sign else f"{x:.3f}"


def pm(s):
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s else "–"


def _table(fam, part):
    losses, vs = fam["losses"], part["vs_ntp"]
    head = ["benchmark"] + [f"{name(l)} (n={part['n'][l]}, step {part['step'][l]})" for l in losses]
    for l in vs:
        head += [f"{name(l)} − NTP", f"{name(l)} vs NTP", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in fam["benchmarks"]:
        cells = [f"`{b}` {'↓' if lower_better(b) else '↑'}"] + [pm(part["stats"][l].get(b)) for l in losses]
        for l in vs:
            c = vs[l].get(b)
            cells += [fmt(c["diff"], sign=True), fmt(c["rel"], pct=True), c["verdict"]] if c else ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _findings(fam):
    """The 'What this shows' paragraph: every sentence is computed from the numbers."""
    if not fam["losses"]:
        return ["No main-phase runs for this family."]
    seeds = ", ".join(f"{name(l)} {n}" for l, n in fam["seeds"].items())
    s = [f"Main runs: seeds per loss {seeds}; {len(fam['steps'])} evaluated steps ({fam['steps'][0]}–{fam['steps'][-1]})."]
    if "ntp" not in fam["losses"]:
        return s + ["No NTP runs, so nothing is compared."]
    if min(fam["seeds"].values()) < 2:
        s.append("With a single seed there is no spread, so no difference can be called clear.")
    for where in ("final", "best"):
        for l, cmp in fam[where]["vs_ntp"].items():
            for b in ("probe_avg", "gap_all", "gap_image"):
                if b not in cmp or (b == "gap_image" and "gap_all" in cmp) or (where == "best" and b != "probe_avg"):
                    continue
                c, st = cmp[b], fam[where]["stats"]
                what = "average probe score" if b == "probe_avg" else "grounding gap"
                s.append(f"{name(l)} vs NTP on `{b}` ({what}) at the {where} step: {fmt(c['rel'], pct=True)} "
                         f"({fmt(st[l][b]['mean'])} vs {fmt(st['ntp'][b]['mean'])}; difference {fmt(c['diff'], sign=True)}, "
                         f"2 s.e. = {fmt(Z * c['se'])}: {'clear' if c['clear'] else 'not clear'}) → "
                         f"{['no clear gain or loss', 'a gain', 'a loss'][c['better']]}.")
            if where == "final":
                n = [sum(c["better"] == k for c in cmp.values()) for k in (1, -1, 0)]
                s.append(f"Over all {len(cmp)} rows at the final step: {name(l)} clearly better on {n[0]}, "
                         f"NTP clearly better on {n[1]}, no clear difference on {n[2]}.")
    if fam["best_lr"]:
        s.append("Best grid lr per loss: " + ", ".join(f"{name(l)} {lr_str(lr)}" for l, lr in fam["best_lr"].items()) + ".")
    return [" ".join(s)]


def _grid_table(fam):
    if not fam["grid"]:
        return ["No grid runs (phase \"grid\") for this family."]
    lines = ["| loss | lr | n | probe_avg ↑ | nll_image ↓ | |", "|---|---|---|---|---|---|"]
    for l, lrs in fam["grid"].items():
        for lr in sorted(lrs, key=lambda x: (x is None, x or 0)):
            st = lrs[lr]
            n = max(x["n"] for x in st.values())
            best = "**best**" if lr == fam["best_lr"].get(l) else ""
            lines.append(f"| {name(l)} | {lr_str(lr)} | {n} | {pm(st.get('probe_avg'))} | {pm(st.get('nll_image'))} | {best} |")
    return lines


def _band(ax, series, loss):
    xs, m, sd = [s for s, _ in series], [st["mean"] for _, st in series], [st["std"] for _, st in series]
    (line,) = ax.plot(xs, m, label=name(loss), color=COLOURS.get(loss), marker=".")
    ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=line.get_color(), alpha=0.2)
    return line


def _bars(ax, fam, benches, title):
    losses, st, w = fam["losses"], fam["final"]["stats"], 0.8 / len(fam["losses"])
    for i, l in enumerate(losses):
        got = [st[l].get(b, {"mean": NAN, "std": 0}) for b in benches]
        ax.bar([j + i * w for j in range(len(benches))], [g["mean"] for g in got], w, yerr=[g["std"] for g in got],
               capsize=3, label=name(l), color=COLOURS.get(l))
    ax.set_xticks([j + w * (len(losses) - 1) / 2 for j in range(len(benches))], benches)
    ax.set_title(title)


def _plots(fam, mix, arch, out_dir):
    """Write the PNGs this family has data for; return their file names. Figure() needs no pyplot state."""
    from matplotlib.figure import Figure
    tag, files, curves = f"{mix}_{arch}", [], fam["curves"]
    probes = [b for b in fam["benchmarks"] if is_probe(b)]

    def save(fig, stem):
        fig.suptitle(f"{stem.replace('_', ' ')}: mix {mix}, {name(arch)} (mean ± std over seeds)")
        fig.savefig(os.path.join(out_dir, f"{stem}_{tag}.png"), dpi=90)
        files.append(f"{stem}_{tag}.png")

    if probes:
        cols = min(4, len(probes))
        rows = -(-len(probes) // cols)
        fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
        for i, b in enumerate(probes):
            ax = fig.add_subplot(rows, cols, i + 1, title=b, xlabel="step")
            for l in fam["losses"]:
                if curves[l][b]:
                    _band(ax, curves[l][b], l)
        fig.axes[0].legend()
        save(fig, "curves")
    if "probe_avg" in fam["benchmarks"]:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot(xlabel="step", ylabel="probe_avg")
        for l in fam["losses"]:
            if curves[l]["probe_avg"]:
                colour = _band(ax, curves[l]["probe_avg"], l).get_color()
                for seed in sorted({sd for _, st in curves[l]["probe_avg"] for sd in st["by_seed"]}, key=str):
                    pts = [(s, st["by_seed"][seed]) for s, st in curves[l]["probe_avg"] if seed in st["by_seed"]]
                    ax.plot(*zip(*pts), color=colour, lw=0.6, alpha=0.5)  # each seed, thin: the raw spread
        ax.legend()
        save(fig, "average")
    groups = [(t, [b for b in fam["benchmarks"] if b in bs]) for t, bs in
              (("held-out NLL by token type ↓", ["nll_image", "nll_boiler", "nll_noise"]),
               ("grounding gap (shuffled − true NLL) ↑", ["gap_image", "gap_boiler", "gap_noise", "gap_all"]))]
    groups = [(t, bs) for t, bs in groups if bs]
    if groups and fam["losses"]:
        fig = Figure(figsize=(6 * len(groups), 4), layout="constrained")
        for i, (title, bs) in enumerate(groups):
            _bars(fig.add_subplot(1, len(groups), i + 1), fam, bs, f"{title}, final step")
        fig.axes[0].legend()
        save(fig, "token_nll")
    pts = {l: sorted((lr, st["probe_avg"]) for lr, st in lrs.items() if lr and lr > 0 and "probe_avg" in st)
           for l, lrs in fam["grid"].items()}
    if any(pts.values()):
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot(xlabel="learning rate", ylabel="final probe_avg", xscale="log")
        for l, p in pts.items():
            if p:
                ax.errorbar([x for x, _ in p], [s["mean"] for _, s in p], [s["std"] for _, s in p], marker="o",
                            capsize=3, label=name(l), color=COLOURS.get(l))
        ax.legend()
        save(fig, "lr_grid")
    return files


def write_report(rows, out_dir, source="results.json"):
    """Write results.md and the plots into out_dir; return the path of results.md."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(rows)
    md = ["# PRIOR results", "",
          f"Generated by `report.py` from {len(rows)} rows of `{source}`; every number and sentence below is "
          f"computed from them. Cells are mean ± sample std over seeds (n in the header). ↑ higher is better, "
          f"↓ lower is better. \"X vs NTP\" is the relative change, signed so that positive means X is better "
          f"(nll rows: (ntp − x)/ntp). A difference is clear when |x − ntp| > {Z:g} × sqrt(sd_x²/n_x + sd_ntp²/n_ntp) "
          f"(unpaired standard error, seeds not paired). The best-step table picks each method's checkpoint "
          f"by its own seed-mean probe_avg, so it favours every method a little; trust the final step first."]
    for mix, fams in summary.items():
        for arch, fam in fams.items():
            md += ["", f"## Mix `{mix}` · {name(arch)} (`{arch}`)", "", "### What this shows", ""] + _findings(fam)
            if fam["losses"]:
                lrs = ", ".join(f"{name(l)} {', '.join(map(lr_str, v))}"
                                for l, v in fam["lrs"].items())
                how = "seed-mean probe_avg" if fam["best"]["by_probe_avg"] else "nothing: no probe_avg, so the final step"
                md += ["", "### Final step", "", *_table(fam, fam["final"]), "", f"Main-run learning rates: {lrs}.",
                       "", f"### Best step (per method, chosen by {how})", "", *_table(fam, fam["best"])]
            md += ["", "### Learning-rate grid (each run's final step)", "", *_grid_table(fam)]
            files = _plots(fam, mix, arch, out_dir)
            md += ["", "### Plots", ""] + [f"- `{f}`\n\n  ![{f}]({f})" for f in files]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="out/results.json", help="JSON list of evaluation rows (one per "
                   "mix, arch, loss, seed, lr, step, phase, benchmark)")
    p.add_argument("--out", default="out", help="folder for results.md and the PNG plots (created if missing)")
    args = p.parse_args(argv)
    print(write_report(load_rows(args.results), args.out, source=args.results))


if __name__ == "__main__":
    main()
