"""Does the H-LVLM use the image? A small grid over what the tiny world may lack, measured by the grounding gap: the
captions' NLL (validation split by default: design choices are made there) with another caption's image minus with
the right one, in nats per token, over all image words
and per attribute (eval.token_analysis: gap_image, gap_shape, gap_colour, gap_count, gap_size, gap_position). A model
that ignores the image has a gap of 0 whatever its text prior: the prior is the same on both sides.

    python -m experiments.main --stage prepare --out out      # data, tokenizer, scores (then the base LM and ViT:
    python -m experiments.see --from out --prepare            #   --prepare trains them if missing)
    python -m experiments.see --from out --tokens 1,3 --arms ntp,oracle --seeds 0,1   # -> out/see/see.json, see.md

Each run is the main job's H-LVLM recipe (frozen base LM and ViT, only the projector trains, --feature-cache) at one
learning rate; --tokens sets the projector's image tokens per patch (model.VLMConfig.tokens_per_patch).
"""
import json
import os
import statistics
from dataclasses import asdict, dataclass

import eval as E
import train
from data import tokenizer as T
from data.tags import ATTRIBUTES
from utils import UserError, flag, run

KEYS = ("gap_image", *(f"gap_{a}" for a in ATTRIBUTES), "nll_image", "gap_all")


@dataclass
class SeeConfig:
    from_: str = flag("out", "a main job's folder: data_<mix>/, tokenizer.json, scores, base_lm.pt, vit.pt, features/")
    mix: str = flag("web", "the caption mix (data_<mix>/)")
    tokens: str = flag("1,3", "image tokens per patch to compare, comma-separated")
    arms: str = flag("ntp,oracle", "losses (train.py --loss), comma-separated")
    seeds: str = flag("0,1", "seeds, comma-separated (paired over the other factors)")
    lr: float = flag(3e-3, "peak learning rate of every run")
    steps: int = flag(240, "steps per run (the cpu preset's)")
    batch_size: int = flag(32, "image-caption pairs per step")
    split: str = flag("val", "captions the gaps are measured on: val (design choices) or test", ["val", "test"])
    max_rows: int = flag(300, "captions scored (0 = all)")
    prepare: bool = flag(False, "first train the base LM and the ViT if the folder lacks them (the main job's recipe)")
    lm_check: bool = flag(True, "also measure whether the frozen base LM reads colour and shape from its context")
    out: str = flag("", "folder for the runs, see.json and see.md ('' = FROM/see)")
    device: str = flag("cpu", "cpu or cuda")


def context_use(src, mix, n=200, seed=0):
    """Does the frozen base LM read an attribute from its context? For n validation scenes: the caption's NLL of its
    shape and colour words after the scene's full description (as in the base LM's text documents) minus after
    the same description with that attribute of every object changed. {kind: gap in nats per token}."""
    import random
    import torch
    from world.scenes import COLOURS, SHAPES, describe, groups_of, text_of
    from data.tags import ATTRIBUTE_OF
    from model import load_lm
    tok = T.load_tokenizer(os.path.join(src, "tokenizer.json"))
    lm, _ = load_lm(os.path.join(src, "base_lm.pt"), tok)
    lm.eval()
    rng = random.Random(seed)
    with open(os.path.join(src, f"data_{mix}", "val.jsonl")) as f:
        rows = [json.loads(line) for line in f][:n]

    def nll(context, caption, kind):
        words, ids = caption.split(" "), T.encode_captions(tok, [context, caption])
        seq = torch.tensor([[T.BOS] + ids[0] + ids[1]])
        with torch.no_grad():
            logp = lm(seq).log_softmax(-1)[0]
        start = len(ids[0])  # logp[start + j] predicts caption token j
        index = T.token_word_index(tok, [caption])[0]
        return [-float(logp[start + j, t]) for j, (t, w) in enumerate(zip(ids[1], index))
                if w >= 0 and ATTRIBUTE_OF.get(words[w]) == kind]
    out = {}
    for kind, values in (("colour", list(COLOURS)), ("shape", SHAPES)):
        right, wrong = [], []
        for r in rows:
            other = [dict(o, **{kind: rng.choice([v for v in values if v != o[kind]])}) for o in r["scene"]]
            right += nll(text_of(describe(groups_of(r["scene"], True))) + " .", r["caption"], kind)
            wrong += nll(text_of(describe(groups_of(other, True))) + " .", r["caption"], kind)
        out[kind] = {"tokens": len(right), "nll_right": sum(right) / len(right), "nll_wrong": sum(wrong) / len(wrong),
                     "gap": (sum(wrong) - sum(right)) / len(right)}
    return out


def summary(rows):
    """{(tokens, arm): {key: (mean, min over seeds)}} of the final-step gaps."""
    out = {}
    for key in {(r["tokens"], r["arm"]) for r in rows}:
        runs = [r for r in rows if (r["tokens"], r["arm"]) == key]
        out[key] = {k: (statistics.mean(r[k] for r in runs), min(r[k] for r in runs)) for k in KEYS
                    if all(k in r for r in runs)}
    return out


def table(rows):
    lines = ["| tokens/patch | arm | seeds | " + " | ".join(KEYS) + " |", "|---" * (3 + len(KEYS)) + "|"]
    for (k, arm), s in sorted(summary(rows).items()):
        n = sum(1 for r in rows if (r["tokens"], r["arm"]) == (k, arm))
        lines.append(f"| {k} | {arm} | {n} | " + " | ".join(
            f"{s[key][0]:.3f} (min {s[key][1]:.3f})" if key in s else "–" for key in KEYS) + " |")
    return "\n".join(lines)


def main(cfg):
    src = os.path.abspath(cfg.from_)
    data = os.path.join(src, f"data_{cfg.mix}")
    if cfg.prepare:
        from experiments.experiment import Experiment, ExperimentConfig
        exp = Experiment(ExperimentConfig(preset="cpu", out=src, settings=f"{cfg.mix}:h"))
        exp.prepare(with_pretrain=True)
        exp.jobs.close()
    need = [os.path.join(src, f) for f in ("tokenizer.json", "base_lm.pt", "vit.pt", f"scores_{cfg.mix}_train.pt")]
    missing = [p for p in need + [os.path.join(data, f"{cfg.split}.jsonl")] if not os.path.exists(p)]
    if missing:
        raise UserError(f"--from {cfg.from_}: {missing[0]} is missing (python -m experiments.see --prepare makes it)")
    out = os.path.abspath(cfg.out or os.path.join(src, "see"))
    os.makedirs(out, exist_ok=True)
    tok = T.load_tokenizer(os.path.join(src, "tokenizer.json"))
    rows = []
    for k in [int(x) for x in cfg.tokens.split(",")]:
        for arm in cfg.arms.split(","):
            for seed in [int(x) for x in cfg.seeds.split(",")]:
                run_dir = os.path.join(out, f"{arm}_k{k}_s{seed}")
                tcfg = train.TrainConfig(
                    data=os.path.join(data, "train.jsonl"), tokenizer=os.path.join(src, "tokenizer.json"),
                    scores=os.path.join(src, f"scores_{cfg.mix}_train.pt"), out_dir=run_dir, arch="h", loss=arm,
                    lr=cfg.lr, seed=seed, init_decoder=os.path.join(src, "base_lm.pt"),
                    init_encoder=os.path.join(src, "vit.pt"), train="projector",
                    feature_cache=os.path.join(src, "features"), steps=cfg.steps, batch_size=cfg.batch_size,
                    save_every=cfg.steps, warmup=10, row_len=256, patch_size=16, tokens_per_patch=k,
                    resume=os.path.exists(os.path.join(run_dir, "last.pt")), device=cfg.device)
                model = train.main(tcfg).eval()
                gaps = E.token_analysis(model, tok, os.path.join(data, f"{cfg.split}.jsonl"), device=cfg.device,
                                        max_rows=cfg.max_rows or None, feature_cache=os.path.join(src, "features"))
                rows.append({"tokens": k, "arm": arm, "seed": seed, **{key: gaps[key] for key in KEYS if key in gaps}})
                print(f"k={k} {arm} seed {seed}: " + ", ".join(f"{key} {gaps.get(key, float('nan')):.3f}"
                                                            for key in KEYS))
                with open(os.path.join(out, "see.json"), "w") as f:
                    json.dump({"config": asdict(cfg), "rows": rows}, f, indent=1)
    md, lm = table(rows), context_use(src, cfg.mix) if cfg.lm_check else {}
    if lm:
        with open(os.path.join(out, "see.json"), "w") as f:
            json.dump({"config": asdict(cfg), "rows": rows, "base_lm_context": lm}, f, indent=1)
        md += "\n\nThe frozen base LM alone, the caption after its scene's description (right) or after the " \
              "description with that attribute of every object changed (wrong), NLL in nats per token:\n\n" \
              "| attribute | tokens | " \
              "right | wrong | gap |\n|---|---|---|---|---|\n" + "\n".join(
                  f"| {k} | {v['tokens']} | {v['nll_right']:.3f} | {v['nll_wrong']:.3f} | {v['gap']:.3f} |"
                  for k, v in lm.items())
    with open(os.path.join(out, "see.md"), "w") as f:
        f.write(f"`python -m experiments.see --from {cfg.from_} --tokens {cfg.tokens} --arms {cfg.arms} --seeds "
                f"{cfg.seeds} --lr {cfg.lr:g} --steps {cfg.steps} --split {cfg.split}`\n\nFinal-step grounding gaps on "
                f"the {cfg.split} captions "
                f"(nats per token; mean over seeds, min over seeds):\n\n{md}\n")
    print(md)
    return rows


if __name__ == "__main__":
    run(main, SeeConfig, description=__doc__)
