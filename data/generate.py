"""
Built-in synthetic image-caption data for PRIOR, with ground truth for every caption word.

    python -m data.generate --out data/synth                    # default 'web' mix, about a minute on 2 cores
    python -m data.generate --out data/synth_hard --mix hard    # presets: web, hard, boiler, noisy
    python -m data.generate --help                              # every knob, explained

Scenes are 1-4 coloured shapes on a 3x3 grid. Captions imitate web alt-text: a consistent
image description ("a photo of two red circles and a blue star at the top left") buried in
- boilerplate: stock-photo/website phrases and glue words, predictable from text alone (each caption
  comes from one of --n-sites sites, and a site always writes the same template), and
- noise: names, prices, dates, places, photo ids, independent of the image AND of the text.
Every word carries a tag, so we can check what PRIOR's reference LM down-weights:
- image: names what is in the image (shape, colour, size, count, position words);
- glue: not a visual word, but whether it is there depends on the image: the article "a" (versus a
  number word), "and" (one fewer than the objects), "shape"/"shapes" after a count, and the separator
  that ends the description (its place depends on how long the description is);
- boiler: predictable from the text alone ("at the", stock phrases, template words, the site's intro);
- noise: names, prices, dates, ids, independent of the image and of the text.
PRIOR should down-weight boilerplate, but it will UP-weight noise (it cannot predict it either), and
in the "hard" mix it will also DOWN-weight image words that the text gives away (a shape's usual
colour, a site's usual shapes, a title that repeats the description): the mix where PRIOR can lose.
Probes are multiple-choice caption fragments scored by likelihood (the models are never instruction tuned).
No validation, test or probe scene equals a training scene, and no training-side text (reference LM,
base LM, labels) holds a validation, test or probe scene or caption: the evaluation measures generalisation.
Same config -> byte-identical files: every random draw comes from a seeded stream per split
and every image from its own seed, so the worker count does not matter.

Flags in detail: --noise-share: the description's glue words ('a', 'of', 'at the') are boilerplate too, so at
image_share 0.3 the measured share saturates near 0.25 (1.0: all filler is noise). --noise-vocab sets how high
the noise entropy is. --boiler-vary gives partly predictable boilerplate. --bare-noise: 'maria lopez' instead of
'photo by maria lopez'. --jitter 0 (fixed centres) is easier for a patch-8 ViT. --text-context teaches the base
LM to use context; such descriptions are never in the reference LM's captions.
"""
import json
import os
import random
import time
import typing
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from multiprocessing import Pool

from tqdm import tqdm

from data.render import render
from utils import flag, parse_config, run
from data.scenes import (BOIL, COLOURS, GLUE, IMG, NOISE, PROBES, SHAPES, caption, label_words, make_sites,
                         noise_pools, probe, sample_scene, scene_key, text_document, text_of)


# caption filler presets (fill image_share / noise_share / noise_vocab unless given explicitly).
# Image share is the same in all of them, so they differ in what the non-image words are and in how much the
# text gives the image words away.
MIXES = {"web": dict(image_share=0.30, noise_share=0.15, noise_vocab=300),    # mostly boilerplate
         "boiler": dict(image_share=0.30, noise_share=0.02, noise_vocab=20),  # predictable filler only
         # noise is most of the non-image words: bare noise fields (no "photo by"), few stock phrases
         "noisy": dict(image_share=0.30, noise_share=1.0, noise_vocab=5000, bare_noise=1.0),
         # image words that text predicts (PRIOR's risk) and boilerplate that it predicts only in part
         "hard": dict(image_share=0.30, noise_share=0.15, noise_vocab=300, colour_corr=0.7, site_shapes=0.7,
                      title_prob=0.5, boiler_vary=0.5)}





@dataclass
class GenConfig:
    out: str = flag("data/synth", "output folder")
    seed: int = flag(0, "master seed; same config gives byte-identical files")
    mix: str = flag("web", "caption filler preset: sets the next three flags unless given", list(MIXES))
    image_share: typing.Optional[float] = flag(None, "target fraction of caption words that depend on the image "
                                                    "(the paper measured ~0.3)")
    noise_share: typing.Optional[float] = flag(None, "target fraction of the NON-image words that are random noise "
                                                    "(rest: boilerplate)")
    noise_vocab: typing.Optional[int] = flag(None, "distinct items per noise kind (names, places, prices, dates, "
                                                  "ids, numbers)")
    colour_corr: typing.Optional[float] = flag(None, "chance an object has its shape's usual colour (text predicts "
                                                    "the shape from the colour)")
    site_shapes: typing.Optional[float] = flag(None, "chance an object's shape is one of its caption site's two "
                                                    "favourite shapes")
    title_prob: typing.Optional[float] = flag(None, "chance a site repeats a short title of the scene (image words "
                                                   "that the description predicts)")
    boiler_vary: typing.Optional[float] = flag(None, "chance a stock phrase is drawn at random instead of from the "
                                                    "site's template")
    bare_noise: typing.Optional[float] = flag(None, "chance a noise field comes without its template words "
                                                   "('maria lopez')")
    n_ref: int = flag(20000, "text-only captions for the reference LM (fresh scenes, never a train/val/test caption)")
    n_text: int = flag(20000, "more text-only captions (base LM pre-training / text-only mix)")
    n_label: int = flag(5000, "images with a short label as caption (stage 1 of the encoder-free model)")
    n_train: int = flag(20000, "image-caption pairs for training")
    n_val: int = flag(1000, "image-caption pairs for validation")
    n_test: int = flag(1000, "image-caption pairs for testing")
    n_probe: int = flag(500, "rows per probe kind (test probes, probes/)")
    n_probe_val: int = flag(200, "rows per probe kind for validation (probes_val/: choosing learning rates)")
    image_size: int = flag(48, "image side in pixels (a 3x3 grid of cells)")
    min_objects: int = flag(1, "fewest objects per scene")
    max_objects: int = flag(4, "most objects per scene (below --n-shapes)")
    n_shapes: int = flag(6, f"shapes used, the first n of: {' '.join(SHAPES)}")
    n_colours: int = flag(8, f"colours used, the first n of: {' '.join(COLOURS)}")
    object_scale: float = flag(1.0, "object size multiplier; large radius = 0.42 cell x scale (bigger: easier)")
    small_ratio: float = flag(0.75, "radius of 'small' objects relative to 'large' ones (smaller: harder)")
    jitter: float = flag(1.0, "how far an object may drift from its cell centre, as a share of the free room "
                              "(0: fixed)")
    rotate: float = flag(10.0, "max random rotation of a shape in degrees (keep < 45: square vs diamond)")
    colour_jitter: float = flag(15.0, "max per-channel RGB jitter of an object's colour")
    colour_contrast: float = flag(1.0, "scale colours around grey (< 1: more similar colours, harder)")
    bg_noise: float = flag(8.0, "std of per-pixel noise over the whole image")
    pair_prob: float = flag(0.25, "chance a scene has two objects of one shape and colour ('two red circles')")
    cooccur_prob: float = flag(0.3, "chance an object takes the partner shape of another (adversarial POPE)")
    shape_skew: float = flag(0.6, "shape frequency ~ rank^-skew (popular POPE)")
    n_sites: int = flag(40, "web sites captions come from; each writes its boilerplate from one template")
    pos_prob: float = flag(0.5, "chance a site's captions give object positions")
    count_prob: float = flag(0.25, "chance a site's captions count the objects ('three shapes :')")
    text_context: float = flag(1.0, "chance a text-only document starts with a full description of its scene")
    size_prob: float = flag(0.35, "chance an object phrase keeps its size")
    colour_prob: float = flag(0.85, "chance an object phrase keeps its colour")
    workers: int = flag(2, "processes rendering images (the output does not depend on it)")


def resolve(cfg):
    """Fill the preset-controlled fields left at None from --mix."""
    assert cfg.mix in MIXES, f"unknown --mix {cfg.mix}, choose from {list(MIXES)}"
    for k in ("colour_corr", "site_shapes", "title_prob", "boiler_vary", "bare_noise"):
        if getattr(cfg, k) is None and k not in MIXES[cfg.mix]:
            setattr(cfg, k, 0.0)
    for k, v in MIXES[cfg.mix].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    assert 1 <= cfg.min_objects <= cfg.max_objects <= 9 and cfg.max_objects < cfg.n_shapes <= len(SHAPES)
    assert 4 <= cfg.n_colours <= len(COLOURS) and 1 <= cfg.noise_vocab <= 10000 and 0 < cfg.image_share < 1
    return cfg


def _render_job(cfg, job):
    path, scene, key = job
    render(scene, cfg, key).save(path)


# ----------------------------------------------------------------------------- main
def shares(rows):
    c = Counter(t for r in rows for t in r["tags"])
    n = sum(c.values()) or 1
    out = {k: round(c[k] / n, 4) for k in (IMG, GLUE, BOIL, NOISE)}
    out["noise_of_nonimage"] = round(c[NOISE] / max(1, c[NOISE] + c[BOIL]), 4)
    out["words_per_caption"] = round(n / max(1, len(rows)), 2)
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def probe_scene_cfg(cfg, i):
    """The scene settings of probe row i: object counts cycle through min..max (uniform; the training scenes'
    dedup would otherwise drop most one-object scenes), and none of the mix's text correlations (a shape's usual
    colour, a site's shapes, partner shapes, skewed shape frequencies), so that no answer is given away by what
    the text says about scenes in general."""
    n = cfg.min_objects + i % (cfg.max_objects - cfg.min_objects + 1)
    return replace(cfg, min_objects=n, max_objects=n, colour_corr=0.0, site_shapes=0.0, cooccur_prob=0.0,
                   shape_skew=0.0)


def generate(cfg):
    cfg = resolve(cfg)
    t0 = time.time()
    pools, sites, out = noise_pools(cfg), make_sites(cfg), cfg.out
    files, jobs, seen = {}, [], set()

    def image_path(split, i, scene):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        rel = f"images/{split}/{i:06d}.png"
        jobs.append((os.path.join(out, rel), scene, [cfg.seed, len(jobs)]))  # own seed per image
        return rel

    # Image-caption splits first: their captions are what the ref LM must never see. Val and test scenes
    # and captions differ from every training one (a test scene seen in training would measure memory).
    train_scenes, train_captions, eval_scenes, eval_captions = set(), set(), set(), set()
    dropped = Counter()
    for split in ("train", "val", "test"):
        rng, rows = random.Random(f"{cfg.seed}/{split}"), []
        while len(rows) < getattr(cfg, f"n_{split}"):
            site = rng.choice(sites) if cfg.site_shapes else None  # site first: it picks the shapes
            scene = sample_scene(rng, cfg, site)
            text, tags = caption(scene, rng, cfg, pools, sites, site)
            key = scene_key(scene)
            if split != "train" and (key in train_scenes or text in train_captions):
                dropped[split] += 1
                continue
            (train_scenes if split == "train" else eval_scenes).add(key)
            (train_captions if split == "train" else eval_captions).add(text)
            seen.add(text)
            i = len(rows)
            rows.append(dict(id=f"{split}-{i:06d}", image=image_path(split, i, scene), caption=text, tags=tags,
                             scene=scene, label=text_of(label_words(scene))))
        files[split] = rows

    stats = dict(freq=Counter(o["shape"] for r in files["train"] for o in r["scene"]), cooc=Counter())
    for r in files["train"]:
        present = {o["shape"] for o in r["scene"]}
        stats["cooc"].update((a, b) for a in present for b in present if a != b)
    probes = {}
    for folder, n_rows, tag in (("probes", cfg.n_probe, "probe"), ("probes_val", cfg.n_probe_val, "probe_val")):
        # probes_val: the same kinds on other scenes, for choices made during training (learning rates), so
        # the test probes are never used to tune anything
        for kind in PROBES:
            if kind == "count" and cfg.min_objects == cfg.max_objects:
                continue  # nothing to choose between
            rng, rows = random.Random(f"{cfg.seed}/{tag}/{kind}"), []
            while len(rows) < n_rows:
                scene = sample_scene(rng, probe_scene_cfg(cfg, len(rows)))
                if scene_key(scene) in train_scenes:
                    dropped[folder] += 1
                    continue
                p = probe(kind, scene, rng, cfg, stats)
                if p is None:
                    continue
                eval_scenes.add(scene_key(scene))
                prompt, correct, wrong = p
                choices = [correct] + wrong
                rng.shuffle(choices)  # answer position uniformly random
                i = len(rows)
                rows.append(dict(id=f"{'val-' if folder == 'probes_val' else ''}{kind}-{i:06d}",
                                 image="../" + image_path(f"{folder}/{kind}", i, scene), prompt=prompt,
                                 choices=choices, answer=choices.index(correct), kind=kind, scene=scene))
            if rows:
                probes[f"{folder}/{kind}"] = rows

    # Training-side text and labels, on fresh scenes: never an evaluation scene, never a split's caption.
    for split in ("ref", "text"):
        rng, rows = random.Random(f"{cfg.seed}/{split}"), []
        while len(rows) < getattr(cfg, f"n_{split}"):
            site = rng.choice(sites) if cfg.site_shapes else None
            scene = sample_scene(rng, cfg, site)
            if split == "text":
                text, tags = text_document(scene, rng, cfg, pools, sites, site)
            else:
                text, tags = caption(scene, rng, cfg, pools, sites, site)
            # a text document is "<full description> . <caption>": its caption part must be new too
            if scene_key(scene) in eval_scenes or text in seen or text.partition(" . ")[2] in seen:
                dropped[split] += 1
                continue
            rows.append(dict(id=f"{split}-{len(rows):06d}", caption=text, tags=tags))
        files[split] = rows
    rng, rows = random.Random(f"{cfg.seed}/label"), []
    while len(rows) < cfg.n_label:  # short ImageNet-style labels, no filler
        scene = sample_scene(rng, cfg)
        if scene_key(scene) in eval_scenes:
            dropped["label"] += 1
            continue
        words, i = label_words(scene), len(rows)
        rows.append(dict(id=f"label-{i:06d}", image=image_path("label", i, scene), caption=text_of(words),
                         tags=[t for _, t in words], scene=scene))
    files["label"] = rows

    # render all images; each has its own seed, so the pool's order does not matter
    work = partial(_render_job, cfg)
    if cfg.workers > 1:
        with Pool(cfg.workers) as pool:
            list(tqdm(pool.imap_unordered(work, jobs, chunksize=64), total=len(jobs), desc="images"))
    else:
        for job in tqdm(jobs, desc="images"):
            work(job)

    for folder in ("probes", "probes_val"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for name, rows in files.items():
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
    for name, rows in probes.items():
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
    meta = dict(config={k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")},  # no effect on data
                counts={**{k: len(v) for k, v in files.items()}, **{k: len(v) for k, v in probes.items()}},
                shares={k: shares(v) for k, v in files.items()},
                shapes=SHAPES[:cfg.n_shapes], colours=list(COLOURS)[:cfg.n_colours],
                train_shape_freq=dict(stats["freq"].most_common()),
                dropped_as_duplicates=dict(sorted(dropped.items())))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} in {time.time() - t0:.1f}s  (mix={cfg.mix}: image_share={cfg.image_share} "
          f"noise_share={cfg.noise_share} noise_vocab={cfg.noise_vocab})")
    for k, s in meta["shares"].items():
        print(f"  {k:6s} " + "  ".join(f"{a}={b}" for a, b in s.items()))
    return meta


def parse_args(argv=None):
    """GenConfig from the command line (`python -m data.generate --mix noisy ...`)."""
    return parse_config(GenConfig, argv, description=__doc__)


if __name__ == "__main__":
    run(generate, GenConfig, description=__doc__)
