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
import argparse
import json
import math
import os
import random
import time
import typing
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# ----------------------------------------------------------------------------- vocabulary
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring"]
COLOURS = {  # clearly distinct hues; --colour-contrast pulls them towards grey (harder)
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 135, 25), "cyan": (40, 205, 215), "pink": (245, 120, 190),
    "white": (250, 250, 250), "black": (15, 15, 15), "brown": (130, 80, 35)}
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]
NUMS = "zero one two three four five six seven eight nine ten".split()
IMG, BOIL, NOISE, GLUE = "image", "boiler", "noise", "glue"
# caption intros and their weights: "a photo of" dominates, so probe prompts are common caption prefixes
INTROS = ["a photo of", "an image of", "a picture of", "photo of", "close up of", "an illustration of", ""]
INTRO_WEIGHTS = [6, 1, 1, 1, 1, 1, 2]
BOILER = ("stock photo;royalty free stock photo;royalty free image;high resolution image;high quality image;"
          "click to download;all rights reserved;available in high resolution;available in all sizes;"
          "this picture shows;free for commercial use;download this image now;stock illustration;"
          "vector illustration;hd wallpaper;best price online;buy now;see more ideas about;editorial use only;"
          "license this photo;view full size;share on facebook;pin it on pinterest;no attribution required;"
          "copyright protected;image for your website;find the perfect image;premium quality;free download").split(";")
SEPARATORS = [",", "-", "|", "."]
# noise material; pseudo-words from SYLLABLES extend names and places when --noise-vocab asks for more
FIRST = ("maria john anna li ahmed sofia david elena kenji fatima lucas olga peter amara diego yuki sara omar ines "
         "tom nina raj eva igor").split()
LAST = ("lopez smith chen novak garcia muller rossi kim silva ivanov okafor tanaka dubois jensen khan costa nowak "
        "berg santos white moreau haas").split()
PLACES = ("lisbon berlin tokyo lagos lima oslo cairo denver kyoto porto quito dublin seoul milan austin hanoi perth "
          "zurich nairobi bogota riga accra").split()
MONTHS = "january february march april may june july august september october november december".split()
SYLLABLES = "ka lo mi ren tu sa vel dor an bri ost um qua zel fin ha jo ter ne pil gor shi wa ex".split()

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


def opt(default, help):  # a config field with the help text argparse shows
    return field(default=default, metadata={"help": help})


@dataclass
class GenConfig:
    out: str = opt("data/synth", "output folder")
    seed: int = opt(0, "master seed; same config gives byte-identical files")
    mix: str = opt("web", f"caption filler preset {list(MIXES)}: sets the next three flags unless given")
    image_share: typing.Optional[float] = opt(None, "target fraction of caption words that depend on the image "
                                                    "(the paper measured ~0.3)")
    noise_share: typing.Optional[float] = opt(None, "target fraction of the NON-image words that are random noise "
                                                    "(rest: boilerplate)")
    noise_vocab: typing.Optional[int] = opt(None, "distinct items per noise kind (names, places, prices, dates, "
                                                  "ids, numbers)")
    colour_corr: typing.Optional[float] = opt(None, "chance an object has its shape's usual colour (text predicts "
                                                    "the shape from the colour)")
    site_shapes: typing.Optional[float] = opt(None, "chance an object's shape is one of its caption site's two "
                                                    "favourite shapes")
    title_prob: typing.Optional[float] = opt(None, "chance a site repeats a short title of the scene (image words "
                                                   "that the description predicts)")
    boiler_vary: typing.Optional[float] = opt(None, "chance a stock phrase is drawn at random instead of from the "
                                                    "site's template")
    bare_noise: typing.Optional[float] = opt(None, "chance a noise field comes without its template words "
                                                   "('maria lopez')")
    n_ref: int = opt(20000, "text-only captions for the reference LM (fresh scenes, never a train/val/test caption)")
    n_text: int = opt(20000, "more text-only captions (base LM pre-training / text-only mix)")
    n_label: int = opt(5000, "images with a short label as caption (stage 1 of the encoder-free model)")
    n_train: int = opt(20000, "image-caption pairs for training")
    n_val: int = opt(1000, "image-caption pairs for validation")
    n_test: int = opt(1000, "image-caption pairs for testing")
    n_probe: int = opt(500, "rows per probe kind (test probes, probes/)")
    n_probe_val: int = opt(200, "rows per probe kind for validation (probes_val/: choosing learning rates)")
    image_size: int = opt(48, "image side in pixels (a 3x3 grid of cells)")
    min_objects: int = opt(1, "fewest objects per scene")
    max_objects: int = opt(4, "most objects per scene (below --n-shapes)")
    n_shapes: int = opt(6, f"shapes used, the first n of: {' '.join(SHAPES)}")
    n_colours: int = opt(8, f"colours used, the first n of: {' '.join(COLOURS)}")
    object_scale: float = opt(1.0, "object size multiplier; large radius = 0.42 cell x scale (bigger: easier)")
    small_ratio: float = opt(0.75, "radius of 'small' objects relative to 'large' ones (smaller: harder)")
    jitter: float = opt(1.0, "how far an object may drift from its cell centre, as a share of the free room "
                              "(0: fixed)")
    rotate: float = opt(10.0, "max random rotation of a shape in degrees (keep < 45: square vs diamond)")
    colour_jitter: float = opt(15.0, "max per-channel RGB jitter of an object's colour")
    colour_contrast: float = opt(1.0, "scale colours around grey (< 1: more similar colours, harder)")
    bg_noise: float = opt(8.0, "std of per-pixel noise over the whole image")
    pair_prob: float = opt(0.25, "chance a scene has two objects of one shape and colour ('two red circles')")
    cooccur_prob: float = opt(0.3, "chance an object takes the partner shape of another (adversarial POPE)")
    shape_skew: float = opt(0.6, "shape frequency ~ rank^-skew (popular POPE)")
    n_sites: int = opt(40, "web sites captions come from; each writes its boilerplate from one template")
    pos_prob: float = opt(0.5, "chance a site's captions give object positions")
    count_prob: float = opt(0.25, "chance a site's captions count the objects ('three shapes :')")
    text_context: float = opt(1.0, "chance a text-only document starts with a full description of its scene")
    size_prob: float = opt(0.35, "chance an object phrase keeps its size")
    colour_prob: float = opt(0.85, "chance an object phrase keeps its colour")
    workers: int = opt(2, "processes rendering images (the output does not depend on it)")


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


# ----------------------------------------------------------------------------- scenes
def usual_colour(shape, colours):
    """The colour a shape comes in most often when --colour-corr is set (a fixed pairing)."""
    return colours[SHAPES.index(shape) % len(colours)]


def sample_scene(rng, cfg, site=None):
    """1-4 objects on distinct cells. With --site-shapes a caption's site favours two shapes, and with
    --colour-corr shapes favour their usual colour: then the text predicts image words."""
    shapes, colours = SHAPES[:cfg.n_shapes], list(COLOURS)[:cfg.n_colours]
    weights = [(i + 1) ** -cfg.shape_skew for i in range(len(shapes))]
    partner = {s: shapes[(i + len(shapes) // 2) % len(shapes)] for i, s in enumerate(shapes)}
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    objs = []
    for i, cell in enumerate(rng.sample(range(9), n)):
        if i == 1 and rng.random() < cfg.pair_prob:  # a twin: same shape and colour
            shape, colour = objs[0]["shape"], objs[0]["colour"]
        else:
            if site and cfg.site_shapes and rng.random() < cfg.site_shapes:
                shape = rng.choice(site["shapes"])
            elif i and rng.random() < cfg.cooccur_prob:
                shape = partner[rng.choice(objs)["shape"]]
            else:
                shape = rng.choices(shapes, weights)[0]
            usual = cfg.colour_corr and rng.random() < cfg.colour_corr
            colour = usual_colour(shape, colours) if usual else rng.choice(colours)
        objs.append(dict(shape=shape, colour=colour, size=rng.choice(["small", "large"]),
                         row=ROWS[cell // 3], col=COLS[cell % 3]))
    rng.shuffle(objs)
    return objs


def scene_key(scene):
    """Order-free identity of a scene, for de-duplication."""
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in scene))


def groups_of(scene, with_pos):
    """Object phrases for a scene: one per object when positions are given, else identical
    shape+colour objects merge into 'two red circles' (size kept only if they agree)."""
    if with_pos:
        return [dict(n=1, shape=o["shape"], colour=o["colour"], size=o["size"], pos=(o["row"], o["col"]))
                for o in scene]
    out = {}
    for o in scene:
        g = out.setdefault((o["shape"], o["colour"]), dict(n=0, shape=o["shape"], colour=o["colour"],
                                                            size=o["size"], pos=None))
        g["n"] += 1
        g["size"] = g["size"] if g["size"] == o["size"] else None
    return list(out.values())


# ----------------------------------------------------------------------------- caption grammar
def W(text, tag):  # "a photo of" -> [("a", tag), ("photo", tag), ("of", tag)]
    return [(w, tag) for w in text.split()]


def text_of(words):  # [(word, tag), ...] -> "word word ..."
    return " ".join(w for w, _ in words)


def plural(shape, n):
    return shape if n == 1 else shape + ("es" if shape.endswith("s") else "s")


def pos_words(row, col):
    """'at the top left', 'at the center'. Always "at the": with "in the center" / "on the left" the glue
    word would give the position away, so a text-only model could not predict it (it depends on the image)."""
    if row == "middle" and col == "center":
        return W("at the", BOIL) + [("center", IMG)]
    if row == "middle":
        return W("at the", BOIL) + [(col, IMG)]
    if col == "center":
        return W("at the", BOIL) + [(row, IMG)]
    return W("at the", BOIL) + [(row, IMG), (col, IMG)]


def object_words(g, with_shape=True):
    """'a large red circle at the top left' / 'two blue stars'. The article is glue (it says "one", where
    a number word would say more), a number word is image content. Always "a", never "an": "an" would
    announce "orange" before it comes."""
    attrs = [a for a in (g.get("size"), g.get("colour")) if a]
    w = [("a", GLUE)] if g["n"] == 1 else [(NUMS[g["n"]], IMG)]
    w += [(a, IMG) for a in attrs]
    if with_shape:
        w.append((plural(g["shape"], g["n"]), IMG))
        if g.get("pos"):
            w += pos_words(*g["pos"])
    return w


def describe(groups):
    """'A and B and C': one fixed list grammar, so a model can learn where objects start ('A , B and C'
    would make the glue word tell how many objects are left, which only the image knows). "and" itself is
    glue: whether another object follows depends on the image."""
    w = []
    for i, g in enumerate(groups):
        if i:
            w.append(("and", GLUE))
        w += object_words(g)
    return w


def count_words(n):
    return [(NUMS[n], IMG), (plural("shape", n), GLUE)]  # "shape" or "shapes": the count decides


def label_words(scene):  # short label: 'two red circles and a blue square' (no size, no position)
    return describe([dict(g, size=None) for g in groups_of(scene, False)])


def noise_pools(cfg):
    """V distinct items per noise kind, fixed per seed (ref LM and VLM see the same pools)."""
    rng, V = random.Random(f"{cfg.seed}/noise"), cfg.noise_vocab

    def distinct(make):
        seen, items = set(), []
        while len(items) < V:
            x = make()
            if x not in seen:
                seen.add(x)
                items.append(x)
        return items

    pseudo = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))  # noqa: E731
    last = LAST + [pseudo() for _ in range(max(0, 2 * V // len(FIRST) - len(LAST) + 1))]
    big = max(100, 4 * V)
    return dict(
        name=distinct(lambda: f"{rng.choice(FIRST)} {rng.choice(last)}"),
        place=distinct(lambda: rng.choice(PLACES) if rng.random() < 0.5 else pseudo()),
        price=distinct(lambda: f"{rng.randint(1, big)}.{rng.choice(['99', '95', '49', '00'])}"),
        date=distinct(lambda: f"{rng.choice(MONTHS)} {rng.randint(1, 28)} {rng.randint(1995, 2024)}"),
        id=distinct(lambda: str(rng.randint(1000, 1000 + 10 * big))),
        number=distinct(lambda: str(rng.randint(2, big))))


# noise templates: the slot {} is noise, the rest is predictable glue (tagged boiler)
NOISE_TEMPLATES = {"name": ["by {}", "{}", "photo by {}", "{}"], "place": ["in {}", "{}", "{}"],
                   "price": ["$ {}", "{} usd", "only $ {}"], "date": ["{}", "{}", "posted on {}"],
                   "id": ["img {}", "dsc {}", "# {}", "{}"], "number": ["{} views", "{}", "lot {}"]}


def make_sites(cfg):
    """The web sites captions come from. A site writes all its alt-text from one template: the same intro,
    separator, stock phrases and noise fields, in the same order, and the same habits (positions given or
    not, a count or not). That is what makes real boilerplate predictable from text: a reference LM learns
    each site's template, so once a caption's first words give the site away, the rest of its boilerplate
    is predictable and only the noise values (and the image words) are not."""
    rng = random.Random(f"{cfg.seed}/sites")
    sites = []
    for _ in range(cfg.n_sites):
        noise = [[(kind, rng.choice(NOISE_TEMPLATES[kind]))
                  for kind in rng.sample(list(NOISE_TEMPLATES), rng.choice([1, 2, 3]))]
                 for _ in range(3)]  # up to three noise segments, e.g. "photo by {name} {date}"
        sites.append(dict(intro=rng.choices(INTROS, INTRO_WEIGHTS)[0], sep=rng.choice(SEPARATORS),
                          boiler=rng.sample(BOILER, 6), noise=noise, desc_first=rng.random() < 0.8,
                          noise_first=rng.random() < 0.5, pos=rng.random() < cfg.pos_prob,
                          count=rng.random() < cfg.count_prob))
    extra = random.Random(f"{cfg.seed}/site-habits")
    for site in sites:
        site.update(shapes=extra.sample(SHAPES[:cfg.n_shapes], 2), title=extra.random() < cfg.title_prob,
                    title_first=extra.random() < 0.5)
    return sites


def noise_segment(rng, pools, slots, bare=0.0):  # [(kind, "photo by {}"), ...] -> "photo by maria lopez ..."
    seg = []
    for kind, template in slots:
        if bare and rng.random() < bare:  # --bare-noise: the value without its template words
            template = "{}"
        pre, post = template.split("{}")
        seg += W(pre, BOIL) + W(rng.choice(pools[kind]), NOISE) + W(post, BOIL)
    return seg


def caption(scene, rng, cfg, pools, sites, site=None):
    """One web-style caption from a site (random unless given): the site's intro and a description of the
    scene, padded with the site's boilerplate and noise segments until image words make up ~image_share of
    it; sites with a title habit also repeat a short label of the scene. Returns (text, tags)."""
    site = site or rng.choice(sites)
    groups = groups_of(scene, site["pos"])
    rng.shuffle(groups)
    for g in groups:  # drop attributes: web captions are incomplete
        g["size"] = g["size"] if rng.random() < cfg.size_prob else None
        g["colour"] = g["colour"] if rng.random() < cfg.colour_prob else None
    core = W(site["intro"], BOIL)
    if site["count"]:
        core += count_words(len(scene)) + [(":", BOIL)]
    core += describe(groups)
    title = label_words(scene) if site["title"] else []  # the scene again, in short: text predicts it
    # word budgets: non-image words = image words * (1/image_share - 1), noise_share of them noise.
    # The description's own glue words come first, so a high noise_share may not fit (capped).
    n_img = sum(t == IMG for _, t in core + title)
    room = n_img / cfg.image_share - len(core) - len(title)  # words still to add
    noise_left = cfg.noise_share * (n_img / cfg.image_share - n_img)
    noise, boiler = [], []
    # noise first (its template words and separators count as boiler), boilerplate fills the rest, each
    # in the site's order. A segment that overshoots a budget is kept with probability budget/size, so
    # shares stay unbiased.
    while noise_left > 0 and room > 0:
        seg = noise_segment(rng, pools, site["noise"][len(noise) % len(site["noise"])], cfg.bare_noise)
        # +1: the separator it brings (bare noise runs on without separators: "maria lopez 14.99 lisbon")
        k, m = sum(t == NOISE for _, t in seg), len(seg) + (not cfg.bare_noise)
        if (k > noise_left or m > room) and rng.random() > min(noise_left / k, room / m):
            break
        noise.append(seg)
        noise_left, room = noise_left - k, room - m
    while room > 0:
        phrase = site["boiler"][len(boiler) % len(site["boiler"])]
        if cfg.boiler_vary and rng.random() < cfg.boiler_vary:  # off-template: only partly predictable
            phrase = rng.choice(BOILER)
        seg = W(phrase, BOIL)
        if len(seg) + 1 > room and rng.random() > room / (len(seg) + 1):
            break
        boiler.append(seg)
        room -= len(seg) + 1
    if cfg.bare_noise and noise:
        noise = [sum(noise, [])]
    segs = noise + boiler if site["noise_first"] else boiler + noise
    # the description leads most sites' captions, so "a photo of ..." probe prompts are natural prefixes
    segs = [core] + segs if site["desc_first"] else segs + [core]
    if title:
        segs = [title] + segs if site["title_first"] else segs + [title]
    words, after_image = [], False
    for seg in segs:
        if words:  # a separator right after the description or title: where it falls depends on the image
            words.append((site["sep"], GLUE if after_image else BOIL))
        words += seg
        after_image = seg is core or seg is title
    return text_of(words), [t for _, t in words]


def text_document(scene, rng, cfg, pools, sites, site=None):
    """A text-only document: with probability text_context, a full description of the scene (every object
    with its size, colour and position) before a caption of it, the way a web page repeats in its text
    what its alt-text says. A base LM trained on such text learns to use what its context says about the
    scene, which the frozen LM of the H-LVLM needs to read the projector's output (a real LLM can)."""
    text, tags = caption(scene, rng, cfg, pools, sites, site)
    if rng.random() >= cfg.text_context:
        return text, tags
    full = describe(groups_of(scene, True)) + [(".", BOIL)]
    return f"{text_of(full)} {text}", [t for _, t in full] + tags


# ----------------------------------------------------------------------------- probes
def probe(kind, scene, rng, cfg, stats):
    """(prompt, correct, wrong choices) for one scene, or None if the scene does not fit."""
    intro, text = "a photo of", text_of
    shapes, colours = SHAPES[:cfg.n_shapes], list(COLOURS)[:cfg.n_colours]
    pairs = {(o["shape"], o["colour"]) for o in scene}
    if kind.startswith("presence"):  # POPE as two continuations: present vs absent shape
        present = {o["shape"] for o in scene}
        absent = [s for s in shapes if s not in present]
        g = dict(rng.choice(groups_of(scene, False)), size=None)
        if kind == "presence_random":
            a = rng.choice(absent)
        elif kind == "presence_popular":  # most frequent absent shape in train
            a = max(absent, key=lambda s: stats["freq"][s])
        else:  # adversarial: absent shape co-occurring most with the present ones in train
            a = max(absent, key=lambda s: (sum(stats["cooc"][p, s] for p in present), stats["freq"][s]))
        return f"{intro} {text(object_words(g, with_shape=False))}", plural(g["shape"], g["n"]), [plural(a, g["n"])]
    if kind == "colour":
        g = rng.choice(groups_of(scene, False))
        wrong = [c for c in colours if (g["shape"], c) not in pairs]
        alt = lambda c: text(object_words(dict(g, colour=c, size=None)))  # noqa: E731
        return intro, alt(g["colour"]), [alt(c) for c in rng.sample(wrong, min(3, len(wrong)))]
    if kind == "count":
        counts = range(cfg.min_objects, cfg.max_objects + 1)
        return intro, text(count_words(len(scene))), [text(count_words(n)) for n in counts if n != len(scene)]
    if kind == "position":
        unique = [o for o in scene if sum((p["shape"], p["colour"]) == (o["shape"], o["colour"]) for p in scene) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        g = dict(n=1, shape=o["shape"], colour=o["colour"])
        others = [(r, c) for r in ROWS for c in COLS if (r, c) != (o["row"], o["col"])]
        return (f"{intro} {text(object_words(g))}", text(pos_words(o["row"], o["col"])),
                [text(pos_words(*rc)) for rc in rng.sample(others, 3)])
    if kind == "retrieval":  # true description vs 3 that each change exactly one detail
        with_pos = rng.random() < 0.5
        groups = [dict(g, size=None) for g in groups_of(scene, with_pos)]
        true, wrong = text(describe(groups)), []
        for _ in range(100):
            i = rng.randrange(len(groups))
            g = dict(groups[i])
            what = rng.choice(["colour", "shape", "position" if with_pos else "count"])
            if what == "colour":
                g["colour"] = rng.choice([c for c in colours if (g["shape"], c) not in pairs])
            elif what == "shape":
                g["shape"] = rng.choice([s for s in shapes if (s, g["colour"]) not in pairs])
            elif what == "count":
                g["n"] = g["n"] + 1 if g["n"] == 1 or rng.random() < 0.5 else g["n"] - 1
            else:
                used = {(o["row"], o["col"]) for o in scene}
                g["pos"] = rng.choice([(r, c) for r in ROWS for c in COLS if (r, c) not in used])
            d = text(describe(groups[:i] + [g] + groups[i + 1:]))
            if d not in wrong:
                wrong.append(d)
            if len(wrong) == 3:
                return intro, true, wrong
        return None
    raise ValueError(kind)


PROBES = ["presence_random", "presence_popular", "presence_adversarial", "colour", "count",
          "position", "retrieval"]


# ----------------------------------------------------------------------------- rendering
def _regular(k, r, start=-90.0, r2=None):  # k-gon (or 2k-point star when r2 is given), unit space
    n = 2 * k if r2 else k
    return [((r2 if r2 and i % 2 else r) * math.cos(math.radians(start + 360 * i / n)),
             (r2 if r2 and i % 2 else r) * math.sin(math.radians(start + 360 * i / n))) for i in range(n)]


_w, _l = 0.38, 1.15
POLYGONS = {  # radii chosen so all shapes cover a similar area (area alone must not give it away)
    "square": _regular(4, 1.22, 45), "diamond": _regular(4, 1.3, 0), "triangle": _regular(3, 1.45),
    "hexagon": _regular(6, 1.1, 0), "star": _regular(5, 1.45, -90, 0.6),
    "cross": [(_w, _l), (_w, _w), (_l, _w), (_l, -_w), (_w, -_w), (_w, -_l), (-_w, -_l), (-_w, -_w),
              (-_l, -_w), (-_l, _w), (-_w, _w), (-_w, _l)]}


def render(scene, cfg, key):
    """Scene -> RGB image. Shapes are drawn 4x larger and box-downsampled (anti-aliasing)."""
    S, SS = cfg.image_size, 4
    rng = np.random.default_rng(key)
    yy, xx = np.mgrid[0:S, 0:S] / S - 0.5
    angle = rng.uniform(0, 2 * np.pi)  # background: random tone + tint + soft gradient
    bg = rng.uniform(50, 200) + rng.uniform(-30, 30) * (xx * np.cos(angle) + yy * np.sin(angle))
    img = bg[..., None] + rng.normal(0, 10, 3)
    cell = S / 3
    for o in scene:
        r = 0.42 * cell * cfg.object_scale * (1.0 if o["size"] == "large" else cfg.small_ratio)
        free = cfg.jitter * max(0.0, cell / 2 - r)  # jitter inside the cell without leaving it
        cx = (COLS.index(o["col"]) + 0.5) * cell + rng.uniform(-free, free)
        cy = (ROWS.index(o["row"]) + 0.5) * cell + rng.uniform(-free, free)
        rot = math.radians(rng.uniform(-cfg.rotate, cfg.rotate))
        mask = Image.new("L", (S * SS, S * SS), 0)
        d = ImageDraw.Draw(mask)
        box = lambda k: [SS * (cx - k * r), SS * (cy - k * r), SS * (cx + k * r), SS * (cy + k * r)]  # noqa
        if o["shape"] in ("circle", "ring"):
            d.ellipse(box(1.0), fill=255)
            if o["shape"] == "ring":
                d.ellipse(box(0.5), fill=0)
        else:
            d.polygon([(SS * (cx + r * (x * math.cos(rot) - y * math.sin(rot))),
                        SS * (cy + r * (x * math.sin(rot) + y * math.cos(rot)))) for x, y in POLYGONS[o["shape"]]],
                      fill=255)
        a = np.asarray(mask.reduce(SS), np.float64)[..., None] / 255
        rgb = 128 + cfg.colour_contrast * (np.array(COLOURS[o["colour"]]) - 128)
        img = img * (1 - a) + (rgb + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)) * a
    img += rng.normal(0, cfg.bg_noise, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


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
                scene = sample_scene(rng, cfg)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(GenConfig):
        typ = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default, help=f.metadata["help"],
                       **({"choices": list(MIXES)} if f.name == "mix" else {}))
    return GenConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    generate(parse_args())
