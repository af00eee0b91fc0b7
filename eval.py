"""Evaluate train.py checkpoints: multiple-choice probes, token-level NLL by word tag, grounding gap.

    python eval.py --ckpt runs/h_prior/ckpt_000300.pt --mc my_questions.jsonl      # your own questions, printed
    python eval.py --run-dir runs/h_prior --probes data/synth/probes --test data/synth/test.jsonl \
        --test-scores out/scores_test.pt     # what runs/h_prior/eval.json lacks of each ckpt_*.pt, into it
    python -m benchmarks eval --ckpt CKPT --bench pope:coco_pope_random.json::coco/val2014   # docs/benchmarks.md

A choice (docs/formats.md) scores log p(choice | image, prompt), summed over its tokens and per token (_norm).
eval.json rows are {"arch", "loss", "seed", "lr", "step", "benchmark", "value", "ckpt", "source"}; the benchmarks:
    <stem>(_norm, _blind)         accuracy on each file (_blind: each question given another's image)
    <stem>_chance, _const         a guesser's expected accuracy; the best constant answer's
    probe_avg(_norm, _blind)      mean over groups (files sharing the stem before "_": POPE's splits are one)
    probe_img_avg, <group>_img    mean over groups of accuracy - blind accuracy
    probe_cc_avg(_nocount)        mean over groups (_nocount: all but count) of (acc - chance)/(1 - chance)
    nll_<c>(_shuffled), gap_<c>   mean NLL of caption tokens of tag c (image/glue/boiler/noise/all; an image word's
                                  attribute: shape/colour/count/size/position) with the true and another record's
                                  image; the grounding gap is their difference (gap_image: the primary endpoint)
    nll_w_gt_0.5, nll_w_le_0.5..  (--test-scores) the same for tokens of PRIOR weight 1 - p_ref > or <= 0.25/0.5/0.75
"""
import glob
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import tokenizer as T
from data.images import load_images, normalize
from data.packing import next_fit
from data.record_types import BadRecord, DataError, Record, Tally
from data.records import read_records
from data.scores import load_scores
from data.tags import ATTRIBUTES, CATEGORIES, token_attributes, token_tags
from model import load_model  # a train.py checkpoint, or a folder scale/export.py wrote
from utils import (PLUGINS, EvalChecks, UserError, atomic_write, autocast, check_fingerprint, check_out,
                   file_fingerprint, flag, pick_device, plugin, run, text_fingerprint)


@dataclass
class EvalConfig(EvalChecks):
    ckpt: str = flag("", "one train.py checkpoint to evaluate (results printed)")
    run_dir: str = flag("", "evaluate every ckpt_*.pt here into RUN_DIR/eval.json, skipping what it has already")
    mc: str = flag("", "comma-separated multiple-choice JSONL files of your own")
    bench: str = flag("", "benchmark files KIND:PATH[::IMAGES], comma-separated, e.g. pope:coco_pope.json::val2014")
    bench_generate: int = flag(0, "--bench: also answer by greedy decoding of up to N tokens (<bench>_gen_*; 0 = off)")
    probes: str = flag("", "folder of probe *.jsonl files (built in: data/synth/probes)")
    test: str = flag("", "held-out caption JSONL with word 'tags', for the token NLL")
    test_scores: str = flag("", "score.py output for --test: adds NLL by PRIOR weight w = 1 - p_ref")
    tokenizer: str = flag("", "tokenizer.json ('' = the path in the checkpoint's config); its fingerprint is checked")
    max_rows: int = flag(0, "a fixed random subset of this many rows of each probe file and of --test (0 = all)")
    row_len: int = flag(256, "tokens per packed row (grown to fit the longest question or caption)")
    batch_rows: int = flag(8, "rows per forward pass")
    seed: int = flag(0, "seed of the image derangement and of --max-rows subsets")
    blind: bool = flag(True, "also score each question with another question's image (the _blind rows)")
    max_bad_fraction: float = flag(0.05, "stop if more than this share of an MC or --test file's rows is bad")
    device: str = flag("auto", "auto, cpu or cuda")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    feature_cache: str = flag("",
                              "H-LVLM: folder caching the ViT's features per image file, across runs (data/features)")


# ----------------------------------------------------------------------------- reading the files
_data = {}  # data_key -> (records, uint8 images[, fingerprint of the whole file]), read once per process


def data_key(kind, path, size, max_rows, seed):
    return kind, os.path.abspath(path), os.path.getmtime(path), size, max_rows, seed


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def subsample(items, max_rows, seed):
    """A fixed random subset in file order, so every checkpoint sees the same rows."""
    if not max_rows or len(items) <= max_rows:
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:max_rows]
    return [items[i] for i in sorted(keep.tolist())]


def _question(obj, key, folder):
    """One MC row -> Record(caption=prompt, extra={"choices", "answer"}), or raise BadRecord(reason)."""
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    image, prompt, choices, answer = obj.get("image"), obj.get("prompt", ""), obj.get("choices"), obj.get("answer")
    if not isinstance(image, str) or not image.strip():
        raise BadRecord("missing image field")
    image = os.path.abspath(os.path.join(folder, image))
    if not os.path.isfile(image):
        raise BadRecord("missing image file", image)
    if not isinstance(prompt, str):
        raise BadRecord("prompt not a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRecord("fewer than 2 choices")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRecord("empty or non-string choice")
    if type(answer) is not int or not 0 <= answer < len(choices):  # type(): True is not a valid answer
        raise BadRecord("answer not a choice index")
    # Stripped, so that encode(prompt) + encode(choice) is the tokenisation of "prompt choice" (add_prefix_space).
    return Record(str(obj.get("id", key)), prompt.strip(), image,
                  {"choices": [c.strip() for c in choices], "answer": answer})


def read_mc(path, max_bad_fraction=0.05):
    """Valid questions of a multiple-choice JSONL file; bad rows are skipped and reported like data/records.py."""
    folder, tally, good = os.path.dirname(os.path.abspath(path)), Tally("questions", path), []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            tally.total += 1
            try:
                good.append(_question(json.loads(raw.decode("utf-8")), f"{stem(path)}:{n}", folder))
            except (UnicodeDecodeError, json.JSONDecodeError):
                tally.bad(f"line {n}", "broken JSON")
            except BadRecord as e:
                tally.bad(f"line {n}", *e.args)
    if tally.total == 0:
        raise DataError(f"{path}: no questions")
    tally.good = len(good)
    tally.finish(max_bad_fraction)  # "none of the N questions is usable" when no row is
    return good


def load_mc(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("mc", path, size, max_rows, seed)
    if key not in _data:  # undecodable images are dropped and reported by load_images
        _data[key] = load_images(subsample(read_mc(path, max_bad_fraction), max_rows, seed), size, max_bad_fraction)
    return _data[key]


def load_test(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("test", path, size, max_rows, seed)
    if key not in _data:
        records = read_records(path, max_bad_fraction=max_bad_fraction)
        _data[key] = (*load_images(subsample(records, max_rows, seed), size, max_bad_fraction),
                      text_fingerprint(records))
    return _data[key]


def report_skipped(out, name, skipped, total, what):
    """Items longer than the model's context: counted in the results (name_skipped) and on stderr."""
    if skipped:
        out[f"{name}_skipped"] = skipped
        print(f"warning: {name}: {skipped} of {total} {what} reach past the model's context and are not scored "
              f"(counted as {name}_skipped)", file=sys.stderr)


# ----------------------------------------------------------------------------- probes and captions
def mc_eval(model, tok, path, device="cpu", max_rows=None, seed=0, max_bad_fraction=0.05, feature_cache="",
            blind=False, **kw):
    """(per question, per choice log p tensors; answers) of a multiple-choice file. blind: each question sees
    another question's image (a seeded derangement): what the text and the look of images in general give."""
    questions, images = load_mc(path, model.cfg.image_size, max_rows, seed, max_bad_fraction)
    prefix = model.image_tokens() + [T.BOS]
    prompts = T.encode_captions(tok, [q.caption for q in questions])
    choices = iter(T.encode_captions(tok, [c for q in questions for c in q.extra["choices"]]))
    which = derangement(len(questions), seed) if blind else range(len(questions))
    docs = [(i, prefix + p, [next(choices) for _ in q.extra["choices"]]) for i, q, p in zip(which, questions, prompts)]
    embeds = image_embeds(model, images, data_key("mc", path, model.cfg.image_size, max_rows, seed), device,
                          feature_cache=feature_cache)
    name = stem(path) + ("_blind" if blind else "")
    return score_docs(model, docs, embeds, device=device, desc=name, **kw), [q.extra["answer"] for q in questions]


def constant_accuracy(questions):
    """The best constant answer's accuracy: an answer text picked wherever offered (a guess elsewhere)."""
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
        kinds = token_attributes(tok, [records[i] for i in scored], [tags[i] for i in scored])
        kind = torch.tensor([k for row in kinds for k in row[:-1]], dtype=torch.long)  # gap_shape, gap_colour, ...
        groups.update({name: kind == i for i, name in enumerate(ATTRIBUTES)})
    if scores_path:
        p_ref = load_scores(scores_path, T.fingerprint(tok), data_fp, path)
        bad = [r.id for r, c in zip(records, captions) if r.id not in p_ref or len(p_ref[r.id]) != len(c) + 1]
        if bad:
            raise UserError(f"{scores_path}: scores of record {bad[0]} do not match its tokens")
        w = 1 - torch.cat([p_ref[records[i].id][:-1] for i in scored] or [torch.zeros(0)])
        for t in (0.25, 0.5, 0.75):
            groups[f"w_gt_{t:g}"], groups[f"w_le_{t:g}"] = w > t, w <= t
    out = {}
    for name, sel in groups.items():
        if sel.any():
            true, shuffled = float(nll[""][sel].mean()), float(nll["_shuffled"][sel].mean())
            out.update({f"nll_{name}": true, f"nll_{name}_shuffled": shuffled, f"gap_{name}": shuffled - true})
    report_skipped(out, "test", len(records) - len(scored), len(records), "captions")
    return out


# ----------------------------------------------------------------------------- checkpoints and runs
def probe_groups(out, chance, stems):
    """Group averages and the endpoints over groups (see the module doc); POPE's three splits count once."""
    groups = {}
    for s in stems:
        groups.setdefault(s.split("_")[0], []).append(s)
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


def evaluate_model(model, tok, probes_dir=None, test_path=None, test_scores=None, mc_files=(), blind=True, bench=(),
                   bench_generate=0, device="cpu", max_rows=None, seed=0, max_bad_fraction=0.05, **kw):
    """{benchmark: value} of a model in hand (eval.py's checkpoints, or train.py's model at a checkpoint).
    kw: feature_cache, row_len, batch_rows."""
    probe_files = sorted(glob.glob(os.path.join(probes_dir, "*.jsonl"))) if probes_dir else []
    if probes_dir and not probe_files:
        raise FileNotFoundError(f"no *.jsonl files in {probes_dir}")
    kw = dict(device=device, max_rows=max_rows, seed=seed, max_bad_fraction=max_bad_fraction, **kw)
    was_training = model.training
    model.eval()
    out, chance = {}, {}
    for f in list(mc_files) + probe_files:
        s = stem(f)
        logps, answers = mc_eval(model, tok, f, **kw)
        out[s], out[s + "_norm"] = accuracy(logps, answers), accuracy(logps, answers, normalise=True)
        if blind:
            out[s + "_blind"] = accuracy(mc_eval(model, tok, f, blind=True, **kw)[0], answers)
        scored = [lp for lp in logps if lp is not None]
        chance[s] = out[s + "_chance"] = sum(1 / len(lp) for lp in scored) / max(1, len(scored))
        out[s + "_const"] = constant_accuracy(load_mc(f, model.cfg.image_size, max_rows, seed, max_bad_fraction)[0])
        report_skipped(out, s, sum(lp is None for lp in logps), len(logps), "questions")
    probe_groups(out, chance, [stem(f) for f in probe_files])
    if bench:  # the paper's benchmarks as distributed, their official metrics (plug-in: benchmarks/scoring.py)
        out.update(plugin("bench", "--bench")(bench, model, tok, generate=bench_generate, **kw))
    if test_path:
        out.update(token_analysis(model, tok, test_path, test_scores, **kw))
    model.train(was_training)
    return out


def evaluate_checkpoint(path, tokenizer=None, device="cpu", run_rows=False, parts=None, **kw):
    """[{"benchmark", "value"}] of one checkpoint; run_rows: eval.json's rows, with the run's arch, loss, seed, lr,
    the step and the checkpoint's fingerprint; parts: {source: evaluate_model's arguments}, each row naming its
    "source". kw: evaluate_model's."""
    model, ckpt = load_model(path, device)
    tok_path = tokenizer or ckpt["config"]["tokenizer"]
    tok = T.load_tokenizer(tok_path)
    check_fingerprint("tokenizer", ckpt["tokenizer"], T.fingerprint(tok), path, tok_path)
    c = ckpt["config"]
    meta = {"arch": c["arch"], "loss": c["loss"], "seed": c["seed"], "lr": c["lr"], "step": ckpt["step"],
            "ckpt": ckpt_fingerprint(path)} if run_rows else {}
    return [{**meta, "benchmark": k, "value": v, **({"source": s} if parts else {})} for s, part in
            (parts or {"": {}}).items() for k, v in evaluate_model(model, tok, device=device, **kw, **part).items()]


def ckpt_fingerprint(path):
    """Which weights an eval.json row comes from: a hash of the CRC-32s of the checkpoint's tensors in torch.save's zip
    directory (read at once; the same weights in any folder give the same), else of the whole file."""
    if not zipfile.is_zipfile(path):
        return file_fingerprint(path)
    with zipfile.ZipFile(path) as z:
        return hashlib.sha256(repr([i.CRC for i in z.infolist() if "/data/" in i.filename]).encode()).hexdigest()[:16]


def evaluate_run(run_dir, out=None, **kw):
    """Evaluate each ckpt_*.pt of run_dir on each source (an --mc file, the --bench specs, --probes, --test) `out`
    (default run_dir/eval.json) has no rows of from it; returns all rows. Rows name their source and the weights
    they come from (ckpt_fingerprint): other weights than the run's (another run's eval.json, or one left from
    before train.py --overwrite) are refused. Rewritten after each checkpoint: a kill loses one checkpoint's work."""
    ckpts = {int(re.search(r"ckpt_(\d+)\.pt$", p).group(1)): p for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt"))}
    if not ckpts:
        what = "has no ckpt_*.pt" if os.path.isdir(run_dir) else "is a file" if os.path.exists(run_dir) else "is absent"
        raise UserError(f"--run-dir {run_dir} {what}: give a train.py --out-dir with its checkpoints")
    out = out or os.path.join(run_dir, "eval.json")
    check_out(out, "file", "--run-dir")
    rows = json.load(open(out)) if os.path.exists(out) else []
    fps = {step: ckpt_fingerprint(p) for step, p in ckpts.items()}
    stale = next((r["step"] for r in rows if r["step"] in fps and r.get("ckpt") != fps[r["step"]]), None)
    if stale is not None:
        raise UserError(f"{out}: its rows of step {stale} come from other weights than {ckpts[stale]} (another run's, "
                        f"or left from before train.py --overwrite): move it away and evaluate again")
    probes, test, scores, bench = (kw.pop(k, None) for k in ("probes_dir", "test_path", "test_scores", "bench"))
    asked = {f"--mc {os.path.abspath(f)}": {"mc_files": [f]} for f in kw.pop("mc_files", ())}  # evaluate_model's args
    if bench:  # the specs together: POPE's splits are pooled
        asked[f"--bench {','.join(bench)} --bench-generate {kw.get('bench_generate', 0)}"] = {"bench": bench}
    if probes:
        asked[f"--probes {os.path.abspath(probes)}"] = {"probes_dir": probes}
    if test:
        asked[f"--test {os.path.abspath(test)} --test-scores {scores}"] = {"test_path": test, "test_scores": scores}
    for step, path in tqdm(sorted(ckpts.items()), desc=f"eval {os.path.basename(os.path.normpath(run_dir))}",
                           disable=not sys.stderr.isatty()):
        done, t0 = {r.get("source") for r in rows if r["step"] == step}, time.perf_counter()
        parts = {k: a for k, a in asked.items() if k not in done}
        if parts:
            results = evaluate_checkpoint(path, run_rows=True, parts=parts, **kw)
            names = {r["benchmark"] for r in results}  # evaluated again: the new rows replace the old
            rows = [r for r in rows if r["step"] != step or r["benchmark"] not in names] + results
            write_rows(out, rows)
            tqdm.write(f"{path}: {len(results)} benchmarks in {time.perf_counter() - t0:.1f}s")
    if "run_alarm" in PLUGINS:  # the lab's training alarm, said again (scale/alarm.py)
        PLUGINS["run_alarm"](run_dir)
    return rows


def write_rows(path, rows):
    """eval.json atomically, a row a line; rows without a "ckpt" (in-process) get their ckpt_<step>.pt's fingerprint."""
    missing = {r["step"] for r in rows if "ckpt" not in r}  # each checkpoint fingerprinted once, not once a row
    ckpts = {s: os.path.join(os.path.dirname(path), "ckpt_%06d.pt" % s) for s in missing}
    fps = {s: ckpt_fingerprint(c) for s, c in ckpts.items() if os.path.isfile(c)}
    for r in rows:
        if "ckpt" not in r and r["step"] in fps:
            r["ckpt"] = fps[r["step"]]
    atomic_write(path, "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kw = dict(probes_dir=cfg.probes, test_path=cfg.test, test_scores=cfg.test_scores,
              mc_files=[f for f in cfg.mc.split(",") if f], bench=[b for b in cfg.bench.split(",") if b],
              bench_generate=cfg.bench_generate, tokenizer=cfg.tokenizer, device=pick_device(cfg.device),
              max_rows=cfg.max_rows or None, seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction, blind=cfg.blind,
              feature_cache=cfg.feature_cache, row_len=cfg.row_len, batch_rows=cfg.batch_rows)
    if not (cfg.ckpt or cfg.run_dir):
        raise SystemExit("nothing to do: give --ckpt or --run-dir (see --help)")
    if not (cfg.probes or cfg.test or kw["mc_files"] or kw["bench"]):
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
            print(plugin("bench_table", "--bench")({r["benchmark"]: r["value"] for r in results}, kw["bench"]))
        print(f"({time.perf_counter() - t0:.1f}s)  accuracy: summed log-likelihood; _norm: per-token mean")


# ----------------------------------------------------------------------------- likelihood
_features = {}  # (hash of ViT weights, data_key) -> ViT patch features


def image_embeds(model, images, key, device, chunk=256, feature_cache=""):
    """(N, image tokens, d) embeddings of uint8 images. The paper trains only the H-LVLM's projector, so its ViT is
    the same in every checkpoint: its features are cached by a hash of its weights and the ViT runs once per file
    and process; with feature_cache (a folder, scale/features.py) once per file and encoder, across processes."""
    def run(fn):
        return torch.cat([fn(normalize(images[i:i + chunk].to(device))) for i in range(0, len(images), chunk)])
    with autocast(device):
        if model.cfg.arch != "h":
            return run(model.embed_images)
        h = hashlib.sha1()
        for t in model.encoder.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
        h = h.hexdigest()
        if (h, key) not in _features:
            for k in [k for k in _features if k[0] != h]:  # another encoder: its features are stale
                del _features[k]
            _features[h, key] = (plugin("feature_cache", "--feature-cache")(model.encoder, images, feature_cache,
                                                                              device) if feature_cache
                                 else run(model.encoder.forward_features))
        return model.embed_images(_features[h, key])  # features in: the projector, k tokens a patch out


def derangement(n, seed=0):
    """A fixed permutation without fixed points: one random cycle through all n items."""
    if n < 2:
        raise ValueError("shuffling images needs at least 2 records")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        out[a] = b
    return out


@torch.inference_mode()
def score_docs(model, docs, embeds, row_len=256, batch_rows=8, device="cpu", desc="score"):
    """log p of every branch token of every doc -> per doc, per branch, a float tensor.

    A doc is (image index into embeds, shared ids, branches). The shared ids (image, bos, prompt) are read once
    and each branch (a choice) attends to them and to itself only, with positions as if it were alone: k choices
    cost one image + prompt instead of k. Docs are packed next-fit into rows of row_len (grown to fit the longest
    doc). A doc that reaches past the model's context is not scored: its entry is None, and the caller counts it."""
    limit = model.decoder.cfg.max_seq_len  # the last input of a branch sits at len(shared) + len(b) - 2
    fits = [len(shared) + max(len(b) - 1 for b in branches) <= limit for _, shared, branches in docs]
    sizes = [len(shared) + sum(len(b) - 1 for b in branches) for _, shared, branches in docs]  # last tokens: no input
    row_len = max(row_len, *(n for n, ok in zip(sizes, fits) if ok), 1)
    keep = [d for d, ok in enumerate(fits) if ok]
    rows = [[keep[i] for i in row] for row in next_fit([sizes[d] for d in keep], row_len)]
    out = [[None] * len(b) if ok else None for (_, _, b), ok in zip(docs, fits)]
    causal = torch.ones(row_len, row_len, dtype=torch.bool, device=device).tril()
    for start in tqdm(range(0, len(rows), batch_rows), desc=desc, leave=False, disable=not sys.stderr.isatty()):
        cells, pred, target, owner, images = [], [], [], [], []  # cells: (token, position, doc, branch)
        for r, row in enumerate(rows[start:start + batch_rows]):
            here = []
            for k, d in enumerate(row):
                image, shared, branches = docs[d]
                images.append(image)
                here += [(t, p, k, 0) for p, t in enumerate(shared)]
                last = r * row_len + len(here) - 1  # flat index of the hidden state that predicts each first token
                for j, b in enumerate(branches):
                    at = r * row_len + len(here)
                    pred += [last, *range(at, at + len(b) - 1)]
                    target += b
                    owner.append((d, j, len(b)))
                    here += [(t, len(shared) + p, k, j + 1) for p, t in enumerate(b[:-1])]
            cells.append(here + [(T.PAD, 0, len(row), 0)] * (row_len - len(here)))  # padding: its own doc
        ids, pos, doc, branch = torch.tensor(cells, device=device).unbind(-1)
        visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (causal & (doc[:, :, None] == doc[:, None, :]) & visible).unsqueeze(1)
        with autocast(device):  # the LM head runs only where a token is scored
            x = model(ids, position_ids=pos, mask=mask, image_embeds=embeds[torch.tensor(images, device=device)],
                      return_hidden=True)
            logits = model.decoder.head(model.decoder.norm(x.flatten(0, 1)[torch.tensor(pred, device=device)]))
        logits, tgt = logits.float(), torch.tensor(target, device=device)
        logp = (logits.gather(1, tgt[:, None]).squeeze(1) - logits.logsumexp(-1)).cpu()
        for (d, j, _), piece in zip(owner, logp.split([n for _, _, n in owner])):
            out[d][j] = piece
    return out


def accuracy(logps, answers, normalise=False):
    """Share of questions whose answer has the highest summed (or per-token mean) log-likelihood; questions
    score_docs did not score (None) are left out, NaN if none is left."""
    hits = [max(range(len(lp)), key=lambda j: float(lp[j].sum()) / (len(lp[j]) if normalise else 1)) == a
            for lp, a in zip(logps, answers) if lp is not None]
    return sum(hits) / len(hits) if hits else float("nan")


if __name__ == "__main__":
    run(main, EvalConfig, description=__doc__)
