"""Turn every evaluated checkpoint into the summary a researcher reads: tables, verdicts and plots
(write_report; the command line is report.py: python -m experiments.report --results R --out DIR).

results.json is a list of rows {"mix", "arch", "loss", "seed", "lr", "step", "phase", "benchmark", "value"}
(missing mix / phase: "web" / "main"; extra keys ignored). Writes out/results.md and, per mix and model family,
curves_*, average_*, token_nll_* and lr_grid_*.png. results.md depends on the rows alone (no paths, dates or
machine details), so report.py regenerates it byte for byte.

Primary endpoint (experiments/protocol.py's PRIMARY, declared in docs/experiment.md): "gap_image" at the
final step, what the image adds: the NLL of the test captions' image words with another caption's image minus
with their own, in nats per token (0 for a model that ignores the image, whatever its text prior). The
verdicts section (claims.py) applies
the protocol's rules: the positive control first, then final, peak and stability. "probe_cc_avg" (the
chance-corrected average; computed here from probe and chance_* rows where eval.py wrote none) is secondary.

Statistics (stats.py), kept simple enough to check by hand:
- seed s gives every arm the same initialisation and data order, so an arm is compared with NTP by paired
  differences over the seeds both ran: d_s = x_arm,s − x_ntp,s, negated for nll_* rows (lower is better), so
  positive d always means "better than NTP"; the 95% CI is mean d ± t_{0.975,n−1} · sd(d)/√n, with the exact
  t quantile. Verdict "better" / "worse" when the CI excludes 0, else "no clear difference"; "1 seed" with n < 2;
- relative change = mean d / |mean NTP| (over the shared seeds); effect size = mean d / sd(d);
- duplicate rows of one seed and checkpoint are averaged first; cells are mean ± sample std over seeds;
- secondary rows are not corrected for multiple comparisons: with many rows some "better"/"worse" are chance.
The final-step tables are the main ones. The "best step" tables pick each method's checkpoint by the numbers
they then report, which flatters every method. When the primary endpoint's curve still peaks at the last
checkpoint for most seeds of an arm, that arm is flagged "still improving" and the area under the curve (the
mean over checkpoints) is added as a secondary row.
"""
import math
import os

from experiments.claims import NAMES as ARM_NAMES, claims_section, seed_curves
from experiments.protocol import PRIMARY, TAIL, choose_lr, tail_mean
from experiments.report_plots import plot_specs, primary_plot
from experiments.stats import (NAN, ci, fmt, lr_key, lr_str, md_table, paired, pm, seed_key, series,  # noqa: F401
                               still_rising, summary, welch)  # paper.py calls report.fmt / report.pm)

CC, NOCOUNT = "probe_cc_avg", "probe_cc_avg_nocount"
AUC = f"{PRIMARY} AUC (mean over checkpoints)"
PROBES = ["presence_random", "presence_popular", "presence_adversarial", "colour", "count", "position", "retrieval"]
CHANCE = {"presence_random": 0.5, "presence_popular": 0.5, "presence_adversarial": 0.5}  # others: chance_* rows
CATS = ["image", "glue", "boiler", "noise", "all"]
COUNTED = PROBES + ["nll_image", "nll_glue", "nll_boiler", "nll_noise"]  # the rows a verdict count counts
LOSSES = ["ntp", "prior", "prior_shuffled", "oracle", "rare", "attn", "rho1", "cal"]
NAMES = {**ARM_NAMES, "rare": "Rare", "attn": "Attention", "rho1": "Rho-1", "cal": "CAL", "itm": "ITM", "itc": "ITC",
         "h": "H-LVLM", "u": "U-LVLM"}
COLOURS = {"ntp": "tab:gray", "prior": "tab:orange", "prior_shuffled": "tab:brown", "oracle": "tab:green",
           "rare": "tab:purple", "attn": "tab:blue", "rho1": "tab:red", "cal": "tab:olive"}


def name(key):
    if isinstance(key, str) and "+" in key and key not in NAMES:
        return " + ".join(name(k) for k in key.split("+"))
    return NAMES.get(key, str(key))


def lower_better(bench):
    return bench.startswith("nll_")  # gap_* (shuffled − true NLL) is higher-is-better


def bench_key(bench):
    """Probes in the paper's order (each _norm variant after its base), averages, NLL rows, gap rows."""
    base, norm = (bench[:-5], 1) if bench.endswith("_norm") else (bench, 0)
    if base in ("probe_avg", PRIMARY, CC, NOCOUNT, AUC):
        return (1, ["probe_avg", PRIMARY, CC, NOCOUNT, AUC].index(base), "", norm)
    if not bench.startswith(("nll_", "gap_")):
        return (0, PROBES.index(base) if base in PROBES else len(PROBES), base, norm)
    cat = bench.split("_")[1] if "_" in bench else ""  # nll_image, nll_image_shuffled, ..., nll_w_* by weight
    return (3 if bench.startswith("gap_") else 2, CATS.index(cat) if cat in CATS else len(CATS), bench, 0)


def loss_key(loss):
    return (LOSSES.index(loss) if loss in LOSSES else len(LOSSES), str(loss))


def parse_rows(rows):
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"loss", "step", "benchmark"} <= set(r)
                                             for r in rows):
        raise ValueError("expected a JSON list of rows with 'loss', 'step', 'benchmark' and 'value'")
    return [_normal(r) for r in rows]


def judged(rows):
    """Rows that get a verdict. NLL with a wrong image (nll_*_shuffled) is neither better low nor high on its
    own: it enters only through the grounding gap (gap_* = shuffled - true), so it stays in results.json only."""
    return [r for r in rows if "_shuffled" not in r["benchmark"]]


def _normal(row):
    row = dict(row)
    row["mix"], row["phase"] = row.get("mix") or "web", row.get("phase") or "main"
    row["arch"], row["seed"] = row.get("arch", "?"), row.get("seed", 0)
    row["value"] = NAN if row.get("value") is None else float(row["value"])  # a diverged run stays visible
    return row


stats = summary  # {seed: value} -> mean, sample std, n (paper.py uses report.stats)


def compare(x, ntp, bench, loss):
    """UNPAIRED x vs NTP on summaries (stats.welch), kept for paper.py; report.py itself uses paired()."""
    c = welch(x, ntp, lower_better(bench))
    return {**c, "verdict": {1: f"{name(loss)} better", -1: "NTP better", 0: "no clear difference"}[c["better"]]}


def cc_avg(vals, chance, drop=()):
    """Chance-corrected probe average of one checkpoint ({bench: value}); None when a chance is unknown."""
    groups = {}
    for p in PROBES:
        if p in vals and p.split("_")[0] not in drop:
            groups.setdefault(p.split("_")[0], []).append(p)
    ccs = []
    for g, stems in groups.items():
        per = []
        for p in stems:
            c = CHANCE.get(p, vals.get(f"chance_{p}", chance.get(p)))
            if c is None or not c < 1:
                return None
            per.append((vals[p] - c) / (1 - c))
        ccs.append(sum(per) / len(per))
    return sum(ccs) / len(ccs) if ccs else None


def prepare(rows):
    """Normalised, judged rows plus probe_cc_avg(_nocount) rows derived where eval.py wrote none; (rows, n)."""
    rows = judged([_normal(r) for r in rows])
    ckpts, chance = {}, {}
    for r in rows:
        key = tuple(r.get(k) for k in ("mix", "arch", "loss", "seed", "lr", "step", "phase"))
        ckpts.setdefault(key, {})[r["benchmark"]] = r["value"]
        if r["benchmark"].startswith("chance_"):
            chance.setdefault(r["mix"], {}).setdefault(r["benchmark"][7:], r["value"])
    new = []
    for key, vals in ckpts.items():
        for bench, drop in ((CC, ()), (NOCOUNT, ("count",))):
            v = None if bench in vals else cc_avg(vals, chance.get(key[0], {}), drop)
            if v is not None:
                new.append({**dict(zip(("mix", "arch", "loss", "seed", "lr", "step", "phase"), key)),
                            "benchmark": bench, "value": v})
    return rows + new, len(new)


def _tree(rows, phase):
    """{(mix, arch): {run: {step: {bench: {seed: value}}}}}, run = loss (main) or (loss, lr); duplicates averaged."""
    t = {}
    for r in rows:
        if r["phase"] == phase and not r["benchmark"].startswith("chance_"):
            loss = r["loss"] + (f" (low {r['oracle_low']:g})" if phase == "grid" and "oracle_low" in r else "")
            run = r["loss"] if phase == "main" else (loss, r.get("lr"))
            (t.setdefault((r["mix"], r["arch"]), {}).setdefault(run, {}).setdefault(r["step"], {})
             .setdefault(r["benchmark"], {}).setdefault(r["seed"], []).append(r["value"]))
    return {fam: {run: {step: {b: {s: sum(sorted(v)) / len(v) for s, v in seeds.items()} for b, seeds in bs.items()}
                        for step, bs in steps.items()} for run, steps in runs.items()} for fam, runs in t.items()}


def _score(st, bench):
    """Seed-mean of `bench` at one step, for choosing a step; missing or NaN never wins."""
    m = summary(st[bench])["mean"] if st.get(bench) else NAN
    return -math.inf if math.isnan(m) else m


def _part(runs, arms, pick):
    """Values of each arm at the step pick(steps) chooses, and every arm paired with NTP."""
    step = {a: pick(runs[a]) for a in arms}
    vals = {a: runs[a][step[a]] for a in arms}
    vs = {a: {b: paired(vals[a][b], vals["ntp"][b], lower_better(b)) for b in vals[a] if b in vals["ntp"]}
          for a in arms if a != "ntp"} if "ntp" in vals else {}
    return {"step": step, "vals": vals, "vs": vs}


def _grid(g):
    """Grid runs {(loss, lr): steps} -> (PRIMARY, {loss: {"scores": {lr: summary}, "chosen", "edge"}}): each run's
    score is the mean of its last protocol.TAIL checkpoints' PRIMARY; the choice is protocol.choose_lr's."""
    out = {}
    for (loss, lr), steps in sorted(g.items(), key=lambda kv: lr_key(kv[0][1])):
        v = {seed: tail_mean(c) for seed, c in seed_curves(steps, PRIMARY).items()}
        out.setdefault(loss, {"scores": {}})["scores"][lr] = summary(v) if v else None
    for o in out.values():
        o["tried"] = list(o["scores"])
        ok = {lr: s["mean"] for lr, s in o["scores"].items() if s and not math.isnan(s["mean"])}
        o["chosen"], o["edge"] = choose_lr(ok) if ok else (None, False)
    return PRIMARY, {k: out[k] for k in sorted(out, key=loss_key)}


def summarize(rows):
    """out[mix][arch] = {"arms", "benchmarks", "steps", "seeds", "lrs", "runs", "final" and "best" ({"step",
    "vals", "vs"}), "best_by", "improving" (arm -> (k, n)), "auc" (or None), "grid_by", "grid"}."""
    rows = prepare(rows)[0]
    main, grid = _tree(rows, "main"), _tree(rows, "grid")
    out = {}
    for mix, arch in sorted(set(main) | set(grid), key=lambda k: (k[0] != "web", str(k[0]), str(k[1]))):
        runs = main.get((mix, arch), {})
        arms = sorted(runs, key=loss_key)
        fam = {"arms": arms, "runs": runs, "auc": None, "best": None, "improving": {}}
        fam["benchmarks"] = sorted({b for a in arms for st in runs[a].values() for b in st}, key=bench_key)
        fam["steps"] = sorted({s for a in arms for s in runs[a]})
        fam["seeds"] = {a: sorted({sd for st in runs[a].values() for v in st.values() for sd in v}, key=seed_key)
                        for a in arms}
        fam["lrs"] = {a: sorted({r.get("lr") for r in rows if r["phase"] == "main" and r["mix"] == mix
                                 and r["arch"] == arch and r["loss"] == a}, key=lr_key) for a in arms}
        fam["best_by"] = next((b for b in (PRIMARY, "probe_avg") if b in fam["benchmarks"]), None)
        if arms:
            fam["final"] = _part(runs, arms, max)
            if fam["best_by"]:
                fam["best"] = _part(runs, arms, lambda st: max(sorted(st), key=lambda s: _score(st[s], fam["best_by"])))
        if PRIMARY in fam["benchmarks"]:
            fam["improving"] = {a: still_rising(runs[a], PRIMARY) for a in arms}
            if any(n and k > n / 2 for k, n in fam["improving"].values()):
                auc = {a: {sd: sum(v) / len(v) for sd, v in series(runs[a], PRIMARY).items()} for a in arms}
                fam["auc"] = {"vals": auc, "vs": {a: paired(auc[a], auc["ntp"]) for a in arms if a != "ntp"}
                              if "ntp" in auc else {}}
        fam["grid_runs"] = grid.get((mix, arch), {})
        fam["grid_by"], fam["grid"] = _grid(fam["grid_runs"])
        out.setdefault(mix, {})[arch] = fam
    return out


def _still(fam, a):
    k, n = fam["improving"].get(a, (0, 0))
    return f"still improving at the last step ({k}/{n} seeds)" if n and k > n / 2 else ""


def _setting(mix, arch):
    return f"mix `{mix}` · {name(arch)}"


def _primary(summary_, bench):
    """One table over every setting: each arm vs NTP on `bench` at the final step, paired over seeds."""
    lines, table = [], []
    for mix, fams in summary_.items():
        for arch, fam in fams.items():
            vs = fam["final"]["vs"] if fam["arms"] else {}
            if not any(bench in c for c in vs.values()):
                lines.append(f"- {_setting(mix, arch)}: no `{bench}` for NTP and another arm (no rows, and no "
                             f"chance_* rows to compute it from), so no comparison.")
                continue
            for a, cmp in vs.items():
                c = cmp.get(bench)
                if c is None:
                    continue
                v = f"{name(a)} {c['verdict']} than NTP" if c["verdict"] in ("better", "worse") else c["verdict"]
                if a == "prior" and bench == PRIMARY:
                    lines.append(f"- {_setting(mix, arch)}: PRIOR − NTP = {ci(c)} (95% CI, n = {c['n']} paired "
                                 f"seeds) → **{v}**.")
                vals = fam["final"]["vals"]
                table.append([_setting(mix, arch), f"{name(a)} − NTP", str(c["n"]), pm(summary(vals[a][bench])),
                              pm(summary(vals["ntp"][bench])), ci(c), fmt(c["rel"], pct=True),
                              fmt(c["effect"], sign=True), c["verdict"], _still(fam, a)])
    head = ["setting", "comparison", "n", "arm", "NTP", "mean d [95% CI]", "relative", "effect d/sd", "verdict", "note"]
    return lines + ([""] if lines and table else []) + (md_table(head, table) if table else [])


def _table(fam, part, auc=None):
    arms, vs, vals = fam["arms"], part["vs"], part["vals"]
    head = ["benchmark"] + [f"{name(a)} (n={len(fam['seeds'][a])}, step {part['step'][a]})" for a in arms]
    for a in vs:
        head += [f"{name(a)} vs NTP: mean d [95% CI]", "relative", "verdict"]
    rows = []
    for b in [b for b in fam["benchmarks"] if b != PRIMARY] + ([AUC] if auc else []):
        get = (lambda a: auc["vals"][a]) if b == AUC else (lambda a: vals[a].get(b))
        cells = [f"`{b}` {'↓' if lower_better(b) else '↑'}"] + [pm(summary(get(a))) if get(a) else "–" for a in arms]
        for a in vs:
            c = auc["vs"].get(a) if b == AUC else vs[a].get(b)
            cells += [ci(c), fmt(c["rel"], pct=True), c["verdict"]] if c else ["–"] * 3
        rows.append(cells)
    return md_table(head, rows)


def _counts(fam):
    out = []
    for a, cmp in fam["final"]["vs"].items():
        cs = [cmp[b]["verdict"] for b in COUNTED if b in cmp]
        if cs:
            out.append(f"{name(a)} vs NTP: better on {cs.count('better')}, worse on {cs.count('worse')}, no clear "
                       f"difference or no verdict on {len(cs) - cs.count('better') - cs.count('worse')}")
    if not out:
        return []
    return ["", f"Counted over the {len(cs)} base rows only (each probe file, and nll_image/glue/boiler/noise when "
            f"present; no averages, _norm variants or gap rows), at the final step: " + "; ".join(out) + "."]


def _grid_table(fam):
    if not fam["grid"]:
        return ["No grid runs (phase \"grid\") for this setting."]
    by = f"`{fam['grid_by']}` {'↓' if lower_better(fam['grid_by'] or '') else '↑'}"
    head = ["loss", "lrs tried", f"mean validation {by} per lr (n seeds; each run: its last {TAIL} checkpoints)",
            "chosen", "main runs used", "note"]
    rows = []
    for loss, g in fam["grid"].items():
        per = "; ".join(f"{lr_str(lr)}: {fmt(s['mean']) if s else '–'} (n={s['n'] if s else 0})"
                        for lr, s in ((lr, g["scores"][lr]) for lr in g["tried"]))
        rows.append([name(loss), ", ".join(map(lr_str, g["tried"])), per, lr_str(g["chosen"]),
                     ", ".join(map(lr_str, fam["lrs"].get(loss, []))) or "–",
                     "at the edge of the grid" if g["edge"] else "single lr" if len(g["tried"]) == 1 else ""])
    return md_table(head, rows)


def _data_section(rows):
    """Rows of phase "data" (the main job: the reference LM on each mix's test captions, per word tag)."""
    got = {}
    for r in rows:
        if r["phase"] == "data" and "_" in r["benchmark"]:
            key, tag = r["benchmark"].split("_", 1)
            got.setdefault(r["mix"], {}).setdefault(tag, {})[key] = r["value"]
    if not got:
        return []
    out = [["mix", "tag", "share of tokens", "mean w = 1 − p_ref", "predicted by the reference LM (p_ref > 0.5)"]]
    for mix in sorted(got):
        for tag in sorted(got[mix], key=lambda t: CATS.index(t) if t in CATS else len(CATS)):
            v = got[mix][tag]
            out.append([f"`{mix}`", tag, *(fmt(v[k]) if k in v else "–" for k in ("share", "mean", "predicted"))])
    return ["", "## The data: which words the reference LM predicts (test captions)", "",
            "PRIOR down-weights what the reference LM predicts; an image word it predicts is where PRIOR can lose.",
            ""] + md_table(out[0], out[1:])


def write_report(rows, out_dir, source="results.json", plots=True):
    """Write results.md (and the plots unless plots=False) into out_dir; return the path of results.md."""
    os.makedirs(out_dir, exist_ok=True)
    derived = prepare(rows)[1]
    summ = summarize(rows)
    md = ["# PRIOR results", "",
          f"Generated by `report.py` from {len(rows)} rows of `{os.path.basename(str(source))}`"
          + (f" (plus {derived} `{CC}`/`{NOCOUNT}` rows computed from probe and chance_* rows)" if derived else "")
          + "; every number and sentence below is computed from them. Arms vs NTP: paired differences d over the "
          "seeds both ran (same seed = same initialisation and data order), positive = better than NTP (nll rows: NTP "
          "− arm); 95% CI mean d ± t(0.975, n−1)·sd(d)/√n; verdict \"better\"/\"worse\" when it excludes 0. Relative "
          "= mean d / |NTP mean|; effect = mean d / sd(d). Cells: mean ± sample std over seeds. ↑/↓: higher/lower is "
          "better.",
          "", *claims_section(summ),
          f"## Primary endpoint: `{PRIMARY}` (final step)", "",
          f"`{PRIMARY}`: NLL of the test captions' image words with another caption's image minus with their own, "
          f"nats per token (what the image adds; exactly 0 for a model that ignores it); declared in "
          f"experiments/protocol.py. Two comparisons per setting are co-primary (PRIOR vs NTP, PRIOR vs shuffled: "
          f"their 97.5% intervals are in Verdicts); below, every arm vs NTP at 95%. Columns arm / NTP: mean ± std "
          f"over each one's seeds; n: the seeds both ran.", ""]
    md += _primary(summ, PRIMARY)
    points = [(f"{m}:{a} {name(arm)}", c["mean_d"], c["lo"], c["hi"]) for m, fams in summ.items()
              for a, fam in fams.items() for arm, cmp in (fam["final"]["vs"] if fam["arms"] else {}).items()
              for c in [cmp.get(PRIMARY)] if c and c["n"] > 1 and not math.isnan(c["lo"])]
    md += ["", "![primary endpoint](primary.png)"] if points else []
    if points and plots:
        primary_plot(points, PRIMARY, os.path.join(out_dir, "primary.png"))
    notes = [f"{_setting(m, a)}: {', '.join(name(arm) for arm in fam['arms'] if _still(fam, arm))}"
             for m, fams in summ.items() for a, fam in fams.items() if any(_still(fam, arm) for arm in fam["arms"])]
    if notes:
        md += ["", f"Still improving at the last step (the last checkpoint is the maximum of the `{PRIMARY}` curve for "
               f"most seeds): {'; '.join(notes)}. For these settings the secondary tables add `{AUC}`."]
    md += _data_section([_normal(dict(r)) for r in rows])
    md += ["", "## Secondary (not corrected for multiple comparisons)", "",
           "Each benchmark once, per setting; with this many rows a few \"better\"/\"worse\" verdicts are expected by "
           "chance alone. nll_*_shuffled rows enter only through gap_* (shuffled − true NLL)."]
    for mix, fams in summ.items():
        for arch, fam in fams.items():
            md += ["", f"### Mix `{mix}` · {name(arch)} (`{arch}`)", ""]
            if not fam["arms"]:
                md += ["No main-phase runs for this setting."]
            else:
                seeds = ", ".join(f"{name(a)} {len(s)}" for a, s in fam["seeds"].items())
                lrs_used = ", ".join(f"{name(a)} {', '.join(map(lr_str, v))}" for a, v in fam["lrs"].items())
                md += [f"Seeds per arm: {seeds}; {len(fam['steps'])} evaluated steps ({fam['steps'][0]}–"
                       f"{fam['steps'][-1]}); main-run learning rates: {lrs_used}."]
                md += _counts(fam) + ["", "#### Final step (the main table)", ""]
                md += _table(fam, fam["final"], fam["auc"])
                if fam["best"]:
                    md += ["", f"#### Best step (flattering: each method's step is chosen by its own seed-mean "
                           f"`{fam['best_by']}` on these same test numbers)", "", *_table(fam, fam["best"])]
            md += ["", "#### Learning-rate grid", "", *_grid_table(fam)]
            files = plot_specs(fam, mix, arch, name, COLOURS)
            for f, draw in files if plots else []:
                draw(os.path.join(out_dir, f))
            md += ["", "#### Plots", ""] + [f"- `{f}`\n\n  ![{f}]({f})" for f, _ in files]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path
