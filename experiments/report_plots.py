"""The PNGs of report.py. plot_specs() decides which files a setting gets from the data alone (so results.md
lists the same files with or without drawing); each spec's draw(path) writes one PNG (matplotlib Figure, Agg)."""

from experiments.stats import summary

AVERAGES = ("probe_avg", "probe_cc_avg", "probe_cc_avg_nocount")
NLL = ["nll_image", "nll_glue", "nll_boiler", "nll_noise"]
GAP = ["gap_image", "gap_glue", "gap_boiler", "gap_noise", "gap_all"]


def _curve(steps, bench):
    return [(s, summary(steps[s][bench])) for s in sorted(steps) if steps[s].get(bench)]


def _band(ax, series, label, colour):
    xs, m, sd = [s for s, _ in series], [st["mean"] for _, st in series], [st["std"] for _, st in series]
    (line,) = ax.plot(xs, m, label=label, color=colour, marker=".")
    ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=line.get_color(),
                    alpha=0.2)
    return line


def plot_specs(fam, mix, arch, name=str, colours=None):
    """[(file name, draw(path))] for one setting (mix, arch)."""
    colours, tag, specs = colours or {}, f"{mix}_{arch}", []
    runs, arms, benches = fam["runs"], fam["arms"], fam["benchmarks"]

    def add(stem, build):
        def draw(path):
            from matplotlib.figure import Figure  # no pyplot state (Agg, no display); imported only to draw
            fig = build(Figure)
            fig.suptitle(f"{stem.replace('_', ' ')}: mix {mix}, {name(arch)} (mean ± std over seeds)")
            fig.savefig(path, dpi=90)
        specs.append((f"{stem}_{tag}.png", draw))

    probes = [b for b in benches if not b.startswith(("nll_", "gap_")) and b not in AVERAGES and "AUC" not in b]
    if probes and arms:
        def curves(Figure):
            cols = min(4, len(probes))
            fig = Figure(figsize=(4 * cols, 3 * -(-len(probes) // cols)), layout="constrained")
            for i, b in enumerate(probes):
                ax = fig.add_subplot(-(-len(probes) // cols), cols, i + 1, title=b, xlabel="step")
                for a in arms:
                    if _curve(runs[a], b):
                        _band(ax, _curve(runs[a], b), name(a), colours.get(a))
            fig.axes[0].legend()
            return fig
        add("curves", curves)
    avg = next((b for b in ("probe_cc_avg", "probe_avg") if b in benches), None)
    if avg and arms:
        def average(Figure):
            fig = Figure(figsize=(6, 4), layout="constrained")
            ax = fig.add_subplot(xlabel="step", ylabel=avg)
            for a in arms:
                if _curve(runs[a], avg):
                    colour = _band(ax, _curve(runs[a], avg), name(a), colours.get(a)).get_color()
                    per_seed = {}
                    for s in sorted(runs[a]):
                        for sd, v in runs[a][s].get(avg, {}).items():
                            per_seed.setdefault(sd, []).append((s, v))
                    for pts in per_seed.values():
                        ax.plot(*zip(*pts), color=colour, lw=0.6, alpha=0.5)  # each seed, thin: the raw spread
            ax.legend()
            return fig
        add("average", average)
    groups = [(t, [b for b in bs if b in benches]) for t, bs in (("held-out NLL by token type ↓", NLL),
                                                                 ("grounding gap (shuffled − true NLL) ↑", GAP))]
    groups = [(t, bs) for t, bs in groups if bs]
    if groups and arms:
        def token_nll(Figure):
            fig = Figure(figsize=(6 * len(groups), 4), layout="constrained")
            w = 0.8 / len(arms)
            for k, (title, bs) in enumerate(groups):
                ax = fig.add_subplot(1, len(groups), k + 1)
                for i, a in enumerate(arms):
                    got = [summary(fam["final"]["vals"][a][b]) if fam["final"]["vals"][a].get(b) else
                           {"mean": float("nan"), "std": 0} for b in bs]
                    ax.bar([j + i * w for j in range(len(bs))], [g["mean"] for g in got], w,
                           yerr=[g["std"] for g in got], capsize=3, label=name(a), color=colours.get(a))
                ax.set_xticks([j + w * (len(arms) - 1) / 2 for j in range(len(bs))], bs)
                ax.set_title(f"{title}, final step")
            fig.axes[0].legend()
            return fig
        add("token_nll", token_nll)
    pts = {loss: [(lr, g["scores"][lr]) for lr in g["tried"] if lr and lr > 0 and g["scores"][lr]]
           for loss, g in fam["grid"].items()}
    if any(pts.values()):
        def lr_grid(Figure):
            fig = Figure(figsize=(6, 4), layout="constrained")
            ax = fig.add_subplot(xlabel="learning rate", ylabel=f"final validation {fam['grid_by']}", xscale="log")
            for loss, p in pts.items():
                if p:
                    ax.errorbar([x for x, _ in p], [s["mean"] for _, s in p], [s["std"] for _, s in p], marker="o",
                                capsize=3, label=name(loss), color=colours.get(loss))
            ax.legend()
            return fig
        add("lr_grid", lr_grid)
    return specs


def primary_plot(points, bench, path):
    """The headline picture: every arm's paired difference to NTP on the primary endpoint, with its 95% CI, one
    row per (setting, arm). points: [(label, mean_d, lo, hi)], top to bottom."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 0.45 * len(points) + 1.2), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(points)))[::-1]
    for y, (label, m, lo, hi) in zip(ys, points):
        colour = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
        ax.errorbar([m], [y], xerr=[[m - lo], [hi - m]], fmt="o", color=colour, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [p[0] for p in points])
    ax.set_xlabel(f"{bench}: arm − NTP, paired over seeds (95% CI)")
    fig.savefig(path, dpi=90)
