"""Evaluate train.py checkpoints: multiple-choice probes, token-level NLL by word tag, grounding gap.

    python eval.py --ckpt runs/h_prior/ckpt_000300.pt --mc my_questions.jsonl      # your own questions
    # the paper's benchmarks from the files as distributed, official metrics and a table (docs/benchmarks.md):
    python eval.py --ckpt runs/h_prior/ckpt_000300.pt --bench pope:coco_pope_random.json::coco/val2014 \\
        --bench mme:MME_Benchmark_release_version --bench mmbench:MMBench_DEV_EN.tsv [--bench-generate 16]
    # every ckpt_*.pt of a run -> runs/h_prior/eval.json (a re-run skips the checkpoints already there):
    python eval.py --run-dir runs/h_prior --probes data/synth/probes --test data/synth/test.jsonl \\
        --test-scores out/scores_test.pt
    # importance scores vs caption length and token position (the paper's Fig. 8; lib/importance.py), no model:
    python eval.py --importance out/scores_test.pt --importance-data data/synth/test.jsonl \\
        --tokenizer out/tokenizer.json

Multiple choice (JSONL, docs/formats.md): {"image", "prompt", "choices", "answer"}, image relative to the file.
A choice scores log p(choice | image, prompt), summed over its tokens (`<stem>`) and per token (`<stem>_norm`),
<|eos|> excluded: the models are not instruction tuned, so a prompt is a caption prefix. Bad rows are skipped,
counted and reported. eval.json rows: {"arch", "loss", "seed", "lr", "step", "benchmark", "value"}; benchmarks:
    <stem>(_norm)                  accuracy on each probe file; files sharing the stem part before "_" (POPE's
                                   presence_random/popular/adversarial) are averaged into a group (presence)
    <stem>_blind, _chance, _const  accuracy with each question's image swapped for another's (what the text gives);
                                   a guesser's expected accuracy; the best constant answer's
    probe_avg(_norm, _blind)       mean over groups: POPE counts once, like the paper's average over benchmarks
    probe_img_avg, <group>_img     mean over groups of accuracy - blind accuracy: what the image adds (the primary
                                   endpoint of docs/experiment.md)
    probe_cc_avg(_nocount)         mean over groups (_nocount: all but count) of (acc - chance)/(1 - chance)
    nll_<c>(_shuffled), gap_<c>    mean NLL of caption tokens (eos excluded) of tag c (image/glue/boiler/noise/all)
                                   with the true image and another record's (a seeded derangement); grounding gap
                                   = nll_<c>_shuffled - nll_<c>: how much the image helps those tokens
    nll_w_gt_0.5, nll_w_le_0.5...  (with --test-scores) the same for tokens whose PRIOR weight w = 1 - p_ref is
                                   above / at most 0.25, 0.5, 0.75

Probe files and images are read once per process (data/benchmarks.py); train.py's model can be evaluated in its
own process at each checkpoint (evaluate_model; experiments/worker.py does).
"""
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import tokenizer as T
from lib.cli import UserError, flag, run
from lib.flag_checks import EvalChecks
from data.benchmarks import data_key, load_mc, load_test, report_skipped
from data.bench_score import bench_results, bench_table, join_repeated
from data.scores import load_scores
from data.tags import CATEGORIES, token_tags
from lib.importance import importance_analysis
from lib.likelihood import _features, accuracy, derangement, image_embeds, score_docs  # noqa: F401 (tests)
from lib.build import load_vlm  # a train.py checkpoint, or a folder lib/export.py wrote
from lib.utils import check_fingerprint, pick_device

THRESHOLDS = (0.25, 0.5, 0.75)


@dataclass
class EvalConfig(EvalChecks):
    ckpt: str = flag("", "one train.py checkpoint to evaluate (results printed)")
    run_dir: str = flag("", "evaluate every ckpt_*.pt here into RUN_DIR/eval.json, skipping those already in it")
    mc: str = flag("", "comma-separated multiple-choice JSONL files of your own")
    bench: str = flag("", "benchmark files KIND:PATH[::IMAGES], e.g. pope:coco_pope_random.json::val2014 (repeatable)")
    bench_generate: int = flag(0, "--bench: also answer by greedy decoding of up to N tokens (<bench>_gen_*; 0 = off)")
    probes: str = flag("", "folder of probe *.jsonl files (built in: data/synth/probes)")
    test: str = flag("", "held-out caption JSONL with word 'tags', for the token NLL")
    test_scores: str = flag("", "score.py output for --test: adds NLL by PRIOR weight w = 1 - p_ref")
    importance: str = flag("",
                           "score.py output to analyse: mean w vs caption length and token position (lib/importance)")
    importance_data: str = flag("", "the caption file --importance was scored on ('' = the path recorded in it)")
    png: str = flag("", "figure of the importance analysis ('' = beside the score file)")
    tokenizer: str = flag("", "tokenizer.json ('' = the path in the checkpoint's config); its fingerprint is checked")
    max_rows: int = flag(0,
                         "evaluate a fixed random subset of this many rows of each probe file and of --test (0 = all)")
    row_len: int = flag(256, "tokens per packed row (grown to fit the longest question or caption)")
    batch_rows: int = flag(8, "rows per forward pass")
    seed: int = flag(0, "seed of the image derangement and of --max-rows subsets")
    blind: bool = flag(True, "also score each question with another question's image (the _blind rows)")
    max_bad_fraction: float = flag(0.05, "stop if more than this share of an MC or --test file's rows is bad")
    device: str = flag("auto", "auto, cpu or cuda")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    feature_cache: str = flag("",
                              "H-LVLM: folder caching the ViT's features per image file, across runs (data/features)")



# ----------------------------------------------------------------------------- probes and captions
def mc_eval(model, tok, path, device="cpu", max_rows=None, seed=0, max_bad_fraction=0.05, feature_cache="",
            blind=False, **kw):
    """Choice log-likelihoods of a multiple-choice file: (per question, per choice log p tensors, answers).
    blind: each question sees another question's image (a seeded derangement): what the model gets without the
    right image, from the text of the prompt and choices and from what images look like in general."""
    questions, images = load_mc(path, model.cfg.image_size, max_rows, seed, max_bad_fraction)
    prefix = model.image_tokens() + [T.BOS]
    prompts = T.encode_captions(tok, [q.caption for q in questions])
    choices = iter(T.encode_captions(tok, [c for q in questions for c in q.extra["choices"]]))
    which = derangement(len(questions), seed) if blind else range(len(questions))
    docs = [(i, prefix + p, [next(choices) for _ in q.extra["choices"]]) for i, q, p in zip(which, questions, prompts)]
    embeds = image_embeds(model, images, data_key("mc", path, model.cfg.image_size, max_rows, seed), device,
                          feature_cache=feature_cache)
    name = os.path.splitext(os.path.basename(path))[0] + ("_blind" if blind else "")
    return score_docs(model, docs, embeds, device=device, desc=name, **kw), [q.extra["answer"] for q in questions]


def constant_accuracy(questions):
    """The best constant answer's accuracy: for each answer text, the share of questions it answers right when
    it is always picked where offered (a guess elsewhere); the best of them. Balanced probes keep it at chance."""
    best = 0.0
    for text in {c for q in questions for c in q.extra["choices"]}:
        hits = [(q.extra["choices"][q.extra["answer"]] == text) if text in q.extra["choices"]
                else 1 / len(q.extra["choices"]) for q in questions]
        best = max(best, sum(hits) / len(hits))
    return best


def token_analysis(model, tok, path, scores_path=None, device="cpu", max_rows=None, seed=0, max_bad_fraction=0.05,
                   feature_cache="", **kw):
    """Mean NLL of caption tokens by category, with the true and a deranged image, and the grounding gap.
    Captions longer than the model's context are left out and counted (test_skipped)."""
    records, images, data_fp = load_test(path, model.cfg.image_size, max_rows, seed, max_bad_fraction)
    captions = T.encode_captions(tok, [r.caption for r in records])
    embeds = image_embeds(model, images, data_key("test", path, model.cfg.image_size, max_rows, seed), device,
                          feature_cache=feature_cache)
    prefix = model.image_tokens() + [T.BOS]
    nll = {}
    for cond, which in (("", range(len(records))), ("_shuffled", derangement(len(records), seed))):
        docs = [(i, prefix, [c + [T.EOS]]) for i, c in zip(which, captions)]
        logps = score_docs(model, docs, embeds, device=device, desc="test" + cond, **kw)
        scored = [i for i, lp in enumerate(logps) if lp is not None]  # the same captions in both conditions
        nll[cond] = -torch.cat([logps[i][0][:-1] for i in scored] or [torch.zeros(0)])  # the eos label is dropped
    groups = {"all": torch.ones(len(nll[""]), dtype=torch.bool)}
    tags = token_tags(tok, records)
    if tags is not None:
        cat = torch.tensor([c for i in scored for c in tags[i][:-1]], dtype=torch.long)
        groups.update({name: cat == i for i, name in enumerate(CATEGORIES)})
    if scores_path:
        p_ref = load_scores(scores_path, T.fingerprint(tok), data_fp, path)
        bad = [r.id for r, c in zip(records, captions) if r.id not in p_ref or len(p_ref[r.id]) != len(c) + 1]
        if bad:
            raise UserError(f"{scores_path}: scores of record {bad[0]} do not match its tokens")
        w = 1 - torch.cat([p_ref[records[i].id][:-1] for i in scored] or [torch.zeros(0)])
        for t in THRESHOLDS:
            groups[f"w_gt_{t:g}"], groups[f"w_le_{t:g}"] = w > t, w <= t
    out = {}
    for name, sel in groups.items():
        if sel.any():
            true, shuffled = float(nll[""][sel].mean()), float(nll["_shuffled"][sel].mean())
            out.update({f"nll_{name}": true, f"nll_{name}_shuffled": shuffled, f"gap_{name}": shuffled - true})
    report_skipped(out, "test", len(records) - len(scored), len(records), "captions")
    return out


# ----------------------------------------------------------------------------- checkpoints and runs
def probe_scores(model, tok, files, device, max_rows, seed, max_bad_fraction, blind=True, **kw):
    """Accuracy (summed and per-token log p), blind accuracy, chance and the best constant answer of each file."""
    out, chance = {}, {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        logps, answers = mc_eval(model, tok, f, device, max_rows, seed, max_bad_fraction, **kw)
        out[stem], out[stem + "_norm"] = accuracy(logps, answers), accuracy(logps, answers, normalise=True)
        if blind:
            out[stem + "_blind"] = accuracy(mc_eval(model, tok, f, device, max_rows, seed, max_bad_fraction,
                                                    blind=True, **kw)[0], answers)
        scored = [lp for lp in logps if lp is not None]
        chance[stem] = out[stem + "_chance"] = sum(1 / len(lp) for lp in scored) / max(1, len(scored))
        out[stem + "_const"] = constant_accuracy(load_mc(f, model.cfg.image_size, max_rows, seed, max_bad_fraction)[0])
        report_skipped(out, stem, sum(lp is None for lp in logps), len(logps), "questions")
    return out, chance


def probe_groups(out, chance, stems):
    """Group averages (files sharing the stem part before "_": POPE's three splits are one group, presence) and
    the endpoints over groups: probe_avg(_norm), probe_cc_avg(_nocount) = mean (acc - chance)/(1 - chance), and
    the primary, probe_img_avg = mean over groups of accuracy - blind accuracy: what the image adds."""
    groups = {}
    for stem in stems:
        groups.setdefault(stem.split("_")[0], []).append(stem)
    if not groups:
        return
    mean = lambda g, key: sum(key(s) for s in groups[g]) / len(groups[g])  # noqa: E731
    for suffix in ("", "_norm", "_blind"):
        if all(s + suffix in out for s in stems):
            means = {g: mean(g, lambda s: out[s + suffix]) for g in groups}
            out.update({g + suffix: m for g, m in means.items() if len(groups[g]) > 1})
            out["probe_avg" + suffix] = sum(means.values()) / len(means)
    cc = {g: mean(g, lambda s: (out[s] - chance[s]) / (1 - chance[s])) for g in groups}
    out["probe_cc_avg"] = sum(cc.values()) / len(cc)
    rest = [v for g, v in cc.items() if g != "count"]
    if rest and len(rest) < len(cc):
        out["probe_cc_avg_nocount"] = sum(rest) / len(rest)
    if all(s + "_blind" in out for s in stems):
        added = {g: mean(g, lambda s: out[s] - out[s + "_blind"]) for g in groups}
        out.update({g + "_img": v for g, v in added.items()})
        out["probe_img_avg"] = sum(added.values()) / len(added)


def evaluate_model(model, tok, probes_dir=None, test_path=None, test_scores=None, device="cpu", max_rows=None,
                   mc_files=(), seed=0, max_bad_fraction=0.05, blind=True, bench=(), bench_generate=0, **kw):
    """{benchmark: value} of a model in hand (eval.py's checkpoints, or train.py's model at a checkpoint)."""
    probe_files = sorted(glob.glob(os.path.join(probes_dir, "*.jsonl"))) if probes_dir else []
    if probes_dir and not probe_files:
        raise FileNotFoundError(f"no *.jsonl files in {probes_dir}")
    was_training = model.training
    model.eval()
    out, chance = probe_scores(model, tok, list(mc_files) + probe_files, device, max_rows, seed, max_bad_fraction,
                               blind, **kw)
    probe_groups(out, chance, [os.path.splitext(os.path.basename(f))[0] for f in probe_files])
    if bench:  # the paper's benchmarks as distributed, their official metrics (data/bench_score.py)
        out.update(bench_results(bench, model, tok, score_docs, image_embeds, device, bench_generate, max_rows=max_rows,
                                 seed=seed, max_bad_fraction=max_bad_fraction, **kw))
    if test_path:
        out.update(token_analysis(model, tok, test_path, test_scores, device, max_rows, seed, max_bad_fraction, **kw))
    model.train(was_training)
    return out


def _evaluate(path, probes_dir=None, test_path=None, test_scores=None, device="cpu", max_rows=None, tokenizer=None,
              **kw):
    model, ckpt = load_vlm(path, device)
    tok_path = tokenizer or ckpt["config"]["tokenizer"]
    tok = T.load_tokenizer(tok_path)
    check_fingerprint("tokenizer", ckpt["tokenizer"], T.fingerprint(tok), path, tok_path)
    out = evaluate_model(model, tok, probes_dir, test_path, test_scores, device, max_rows, **kw)
    return [{"benchmark": k, "value": v} for k, v in out.items()], ckpt


def evaluate_checkpoint(path, probes_dir=None, test_path=None, test_scores=None, device="cpu", max_rows=None, **kw):
    """[{"benchmark", "value"}] of one checkpoint.

    kw: mc_files, tokenizer, row_len, batch_rows, seed, max_bad_fraction."""
    return _evaluate(path, probes_dir, test_path, test_scores, device, max_rows, **kw)[0]


def evaluate_run(run_dir, probes_dir=None, test_path=None, test_scores=None, device="cpu", max_rows=None,
                 out=None, **kw):
    """Evaluate every ckpt_*.pt of run_dir not yet in `out` (default run_dir/eval.json); returns all rows.
    The file is rewritten after each checkpoint, so an interrupted run loses at most one checkpoint's work."""
    out = out or os.path.join(run_dir, "eval.json")
    rows = []
    if os.path.exists(out):
        with open(out) as f:
            rows = json.load(f)
    done = {r["step"] for r in rows}
    ckpts = sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))
    todo = [p for p in ckpts if int(re.search(r"ckpt_(\d+)\.pt$", p).group(1)) not in done]
    for path in tqdm(todo, desc=f"eval {os.path.basename(os.path.normpath(run_dir))}",
                     disable=not todo or not sys.stderr.isatty()):
        t0 = time.perf_counter()
        results, ckpt = _evaluate(path, probes_dir, test_path, test_scores, device, max_rows, **kw)
        c = ckpt["config"]
        rows += [{"arch": c["arch"], "loss": c["loss"], "seed": c["seed"], "lr": c["lr"], "step": ckpt["step"], **r}
                 for r in results]
        write_rows(out, rows)
        tqdm.write(f"{path}: {len(results)} benchmarks in {time.perf_counter() - t0:.1f}s")
    alarm = run_alarm(run_dir)
    if alarm:
        print(f"{run_dir}: training raised an alarm at step {alarm[0]}: {alarm[1]}", file=sys.stderr)
    return rows


def write_rows(path, rows):
    """eval.json, atomically: one row a line (readable, diffable), still one JSON list."""
    with open(path + ".tmp", "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    os.replace(path + ".tmp", path)


def run_alarm(run_dir):
    """(step, message) of the unlearning alarm train.py recorded in run_dir/log.jsonl, or None."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        hit = next((line for line in f if '"alarm"' in line), None)
    if hit is None:
        return None
    line = json.loads(hit)
    return line.get("step"), line.get("alarm")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kw = dict(probes_dir=cfg.probes or None, test_path=cfg.test or None, test_scores=cfg.test_scores or None,
              device=pick_device(cfg.device), max_rows=cfg.max_rows or None,
              mc_files=[f for f in cfg.mc.split(",") if f], bench=[b for b in cfg.bench.split(",") if b],
              bench_generate=cfg.bench_generate,
              tokenizer=cfg.tokenizer or None, row_len=cfg.row_len, batch_rows=cfg.batch_rows, seed=cfg.seed,
              max_bad_fraction=cfg.max_bad_fraction, feature_cache=cfg.feature_cache, blind=cfg.blind)
    if not (cfg.ckpt or cfg.run_dir or cfg.importance):
        raise SystemExit("nothing to do: give --ckpt, --run-dir or --importance (see --help)")
    if (cfg.ckpt or cfg.run_dir) and not (kw["probes_dir"] or kw["test_path"] or kw["mc_files"] or kw["bench"]):
        raise SystemExit("give --mc, --bench, --probes and/or --test to evaluate on")
    if cfg.run_dir:
        rows = evaluate_run(cfg.run_dir, **kw)
        print(f"{cfg.run_dir}/eval.json: {len(rows)} rows, steps {sorted({r['step'] for r in rows})}")
    if cfg.ckpt:
        t0 = time.perf_counter()
        results = evaluate_checkpoint(cfg.ckpt, **kw)
        for r in results:
            print(f"{r['benchmark']:24s} {r['value']:.4f}")
        if kw["bench"]:
            print(bench_table({r["benchmark"]: r["value"] for r in results}, kw["bench"]))
        print(f"({time.perf_counter() - t0:.1f}s)  accuracy: summed log-likelihood; _norm: per-token mean")
    if cfg.importance:
        png = cfg.png or os.path.splitext(cfg.importance)[0] + "_importance.png"
        rep = importance_analysis(cfg.importance, cfg.importance_data or None,
                                  cfg.tokenizer or "out/tokenizer.json", png)
        print(f"{rep['captions']} captions, mean w {rep['mean_w']:.3f}, Pearson r(length, mean w) = "
              f"{rep['pearson_r']:.3f}")
        for b in rep["length_bins"]:
            print(f"  length {b['min_len']:3d}-{b['max_len']:3d}: mean w {b['mean_w']:.3f} ({b['captions']} captions)")
        print(f"figure: {png}")


if __name__ == "__main__":
    run(main, EvalConfig, join_repeated(sys.argv[1:]), description=__doc__)
