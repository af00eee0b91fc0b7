"""
Built-in synthetic image-caption data for PRIOR, with a ground-truth tag for every caption word: image, glue,
boiler or noise (docs/formats.md). The world itself (scenes, captions, probes) is world/scenes.py.

    python -m world.generate --out data/synth                   # default 'web' mix, about a minute on 2 cores
    python -m world.generate --out data/synth_hard --mix hard   # presets: web, hard, boiler, noisy

No validation, test or probe scene equals a training scene, and no training-side text (reference LM, base LM,
labels) holds one of their scenes or captions. Same config -> byte-identical files, whatever --workers.
"""
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from multiprocessing import Pool
from typing import Optional

from tqdm import tqdm

from world.scenes import (BOIL, COLOURS, GLUE, IMG, NOISE, PROBES, SHAPES, answered_questions, caption, label_words,
                         make_sites, noise_pools, probe, render, sample_scene, scene_key, text_document, text_of)
from utils import FRACTION, Checks, UserError, atomic_write, check_out, flag, parse_config, run

# caption filler presets (fill the flags below left at None), all with one image share. PRIOR should down-weight
# boilerplate but will UP-weight noise (it cannot predict it either); in "hard" the text gives image words away (a
# shape's usual colour, a site's shapes, a title), so PRIOR down-weights those too: the mix where it can lose.
MIXES = {"web": dict(image_share=0.30, noise_share=0.15, noise_vocab=300),    # mostly boilerplate
         "boiler": dict(image_share=0.30, noise_share=0.02, noise_vocab=20),  # predictable filler only
         "noisy": dict(image_share=0.30, noise_share=1.0, noise_vocab=5000, bare_noise=1.0),
         "hard": dict(image_share=0.30, noise_share=0.15, noise_vocab=300, colour_corr=0.7, site_shapes=0.7,
                      title_prob=0.5, boiler_vary=0.5)}


@dataclass
class GenConfig(Checks):
    OWN_RANGES = {"n_train": 1, "min_objects": (1, 9), "max_objects": (1, 9), "n_shapes": (2, len(SHAPES)),
                  "n_colours": (4, len(COLOURS)), "noise_vocab": (1, 10000), "n_sites": 1, **dict.fromkeys((
                      "n_ref", "n_text", "n_label", "n_val", "n_test", "n_probe", "n_probe_val", "object_scale",
                      "rotate", "colour_jitter", "colour_contrast", "bg_noise", "shape_skew"), 0), **dict.fromkeys((
                      "image_share", "noise_share", "colour_corr", "site_shapes", "title_prob", "boiler_vary",
                      "bare_noise", "small_ratio", "jitter", "pair_prob", "cooccur_prob", "pos_prob", "count_prob",
                      "text_context", "text_questions", "text_grid", "pope_wording", "size_prob", "colour_prob"),
                     FRACTION)}
    out: str = flag("data/synth", "output folder")
    seed: int = flag(0, "master seed; same config gives byte-identical files")
    mix: str = flag("web", "caption filler preset: sets the next three flags unless given", list(MIXES))
    image_share: Optional[float] = flag(None, "share of caption words that depend on the image (paper: ~0.3)")
    # the description's own glue words count as boilerplate, so a high noise_share may not fit (it saturates)
    noise_share: Optional[float] = flag(None, "share of the NON-image words that are random noise (rest: boiler)")
    noise_vocab: Optional[int] = flag(None, "distinct items per noise kind (names, places, prices, dates, ids)")
    colour_corr: Optional[float] = flag(None, "chance an object has its shape's usual colour (text gives it away)")
    site_shapes: Optional[float] = flag(None, "chance an object's shape is one of its caption site's two favourites")
    title_prob: Optional[float] = flag(None, "chance a site repeats a short title of the scene (text predicts it)")
    boiler_vary: Optional[float] = flag(None, "chance a stock phrase is drawn at random, not from the site's template")
    bare_noise: Optional[float] = flag(None, "chance a noise field comes without its template words ('maria lopez')")
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
    jitter: float = flag(1.0, "drift from the cell centre, as a share of the free room (0: fixed, easier)")
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
    text_grid: float = flag(0.0, "chance a text document's description is a 3x3 grid, cell by cell (scenes.grid_words)")
    text_questions: float = flag(0.0, "chance a text-only document ends with 3 questions about its scene, answered")
    pope_wording: float = flag(0.0, "share of those questions about presence asked in POPE's words ('Is there a "
                                    "star in the image?')")
    size_prob: float = flag(0.35, "chance an object phrase keeps its size")
    colour_prob: float = flag(0.85, "chance an object phrase keeps its colour")
    workers: int = flag(2, "processes rendering images (the output does not depend on it)")


def resolve(cfg):
    """Fill the preset-controlled fields left at None from --mix."""
    for k in ("colour_corr", "site_shapes", "title_prob", "boiler_vary", "bare_noise"):
        if getattr(cfg, k) is None and k not in MIXES[cfg.mix]:
            setattr(cfg, k, 0.0)
    for k, v in MIXES[cfg.mix].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.check()  # ranges (OWN_RANGES), and what they cannot say:
    if not (cfg.min_objects <= cfg.max_objects < cfg.n_shapes and 0 < cfg.image_share < 1):
        raise UserError(f"--min-objects {cfg.min_objects} <= --max-objects {cfg.max_objects} < --n-shapes "
                        f"{cfg.n_shapes} and 0 < --image-share {cfg.image_share} < 1 are needed")
    return cfg


def _render_job(cfg, job):
    path, scene, key = job
    atomic_write(path, lambda tmp: render(scene, cfg, key).save(tmp, format="PNG"))


def shares(rows):
    c = Counter(t for r in rows for t in r["tags"])
    n = sum(c.values()) or 1
    out = {k: round(c[k] / n, 4) for k in (IMG, GLUE, BOIL, NOISE)}
    out["noise_of_nonimage"] = round(c[NOISE] / max(1, c[NOISE] + c[BOIL]), 4)
    out["words_per_caption"] = round(n / max(1, len(rows)), 2)
    return out


def probe_scene_cfg(cfg, i):
    """Probe row i's scene settings: object counts cycle through min..max (the training scenes' dedup would drop
    most one-object scenes), and no text correlations of the mix, so that no answer is given away by the text."""
    n = cfg.min_objects + i % (cfg.max_objects - cfg.min_objects + 1)
    return replace(cfg, min_objects=n, max_objects=n, colour_corr=0.0, site_shapes=0.0, cooccur_prob=0.0,
                   shape_skew=0.0)


def generate(cfg):
    cfg = resolve(cfg)
    check_out(cfg.out, "dir")
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
    train_scenes, train_captions, eval_scenes = set(), set(), set()
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
            if split == "train":
                train_scenes.add(key)
                train_captions.add(text)
            else:
                eval_scenes.add(key)
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
    # probes_val: the same kinds on other scenes, for choices made in training (learning rates), so that the
    # test probes never tune anything
    for folder, n_rows, tag in (("probes", cfg.n_probe, "probe"), ("probes_val", cfg.n_probe_val, "probe_val")):
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
            make = text_document if split == "text" else caption
            text, tags = make(scene, rng, cfg, pools, sites, site)
            # a text document is "<full description> . <caption>": its caption part must be new too
            if scene_key(scene) in eval_scenes or text in seen or text.partition(" . ")[2] in seen:
                dropped[split] += 1
                continue
            if split == "text" and cfg.text_questions and rng.random() < cfg.text_questions:  # 0: no draw, the
                # documents byte for byte as before the flag
                # questions about the scene, answered: a base LM pre-trained on them answers from its context,
                # which the H-LVLM's frozen LM would need to answer from an image; it then did so from text, not
                # from images (docs/experiment.md, "A frozen LM that answers"), so the main job leaves them out
                words = answered_questions(scene, rng, SHAPES[:cfg.n_shapes], list(COLOURS)[:cfg.n_colours],
                                           cfg.max_objects, pope_share=cfg.pope_wording)
                text, tags = f"{text} {text_of(words)}", tags + [t for _, t in words]
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

    work = partial(_render_job, cfg)
    if cfg.workers > 1:  # each image has its own seed, so the pool's order does not matter
        with Pool(cfg.workers) as pool:
            list(tqdm(pool.imap_unordered(work, jobs, chunksize=64), total=len(jobs), desc="images"))
    else:
        list(tqdm(map(work, jobs), total=len(jobs), desc="images"))

    for folder in ("probes", "probes_val"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for name, rows in {**files, **probes}.items():
        atomic_write(os.path.join(out, f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    meta = dict(config={k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")},  # no effect on data
                counts={k: len(v) for k, v in {**files, **probes}.items()},
                shares={k: shares(v) for k, v in files.items()},
                shapes=SHAPES[:cfg.n_shapes], colours=list(COLOURS)[:cfg.n_colours],
                train_shape_freq=dict(stats["freq"].most_common()),
                dropped_as_duplicates=dict(sorted(dropped.items())))
    atomic_write(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
    print(f"wrote {out} in {time.time() - t0:.1f}s  (mix={cfg.mix}: image_share={cfg.image_share} "
          f"noise_share={cfg.noise_share} noise_vocab={cfg.noise_vocab})")
    for k, s in meta["shares"].items():
        print(f"  {k:6s} " + "  ".join(f"{a}={b}" for a, b in s.items()))
    return meta


def parse_args(argv=None):
    return parse_config(GenConfig, argv, description=__doc__)


if __name__ == "__main__":
    run(generate, GenConfig, description=__doc__)
