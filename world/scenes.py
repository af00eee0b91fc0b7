"""The world of the synthetic data (world/generate.py writes it): its vocabulary, scenes of 1-4 coloured shapes on a
3x3 grid and how one is drawn, the caption grammar that tags every word (image, glue, boiler, noise), the web sites
captions come from, web-style captions, text-only documents and the multiple-choice probes."""
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from data.tags import COLOUR_WORDS, NUMS, SHAPES, plural  # the image words' vocabulary

COLOURS = dict(zip(COLOUR_WORDS, [  # clearly distinct hues; --colour-contrast pulls them towards grey (harder)
    (220, 40, 40), (40, 170, 60), (40, 80, 230), (240, 215, 40), (140, 60, 190), (245, 135, 25), (40, 205, 215),
    (245, 120, 190), (250, 250, 250), (15, 15, 15), (130, 80, 35)]))
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]
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


def usual_colour(shape, colours):
    """The colour a shape comes in most often when --colour-corr is set (a fixed pairing)."""
    return colours[SHAPES.index(shape) % len(colours)]


def sample_scene(rng, cfg, site=None):
    """Objects on distinct cells. A caption's site may favour two shapes (--site-shapes) and shapes their usual
    colour (--colour-corr): then the text predicts image words."""
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
    """Scene -> RGB image, `key` seeding its noise. Shapes are drawn 4x larger and box-downsampled (anti-aliasing)."""
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


def groups_of(scene, with_pos):
    """Object phrases: one per object with positions, else one per shape+colour ('two red circles'; size kept
    only if they agree)."""
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


def W(text, tag):  # "a photo of" -> [("a", tag), ("photo", tag), ("of", tag)]
    return [(w, tag) for w in text.split()]


def text_of(words):  # [(word, tag), ...] -> "word word ..."
    return " ".join(w for w, _ in words)


def pos_words(row, col):
    """'at the top left', 'at the left', 'at the center'. Always "at the": "in the center" / "on the left" would
    give the position away in a glue word that a text-only model could not predict (it depends on the image)."""
    words = [w for w in (row, col) if w not in ("middle", "center")] or ["center"]
    return W("at the", BOIL) + [(w, IMG) for w in words]


def object_words(g, with_shape=True):
    """'a large red circle at the top left' / 'two blue stars'. The article is glue (it says "one"), a number word
    image content. Always "a", never "an": "an" would announce "orange" before it comes."""
    w = [("a", GLUE)] if g["n"] == 1 else [(NUMS[g["n"]], IMG)]
    w += [(a, IMG) for a in (g.get("size"), g.get("colour")) if a]
    if with_shape:
        w.append((plural(g["shape"], g["n"]), IMG))
        if g.get("pos"):
            w += pos_words(*g["pos"])
    return w


def describe(groups):
    """'A and B and C': 'A , B and C' would make the glue word tell how many objects are left, which only the
    image knows. "and" is glue: whether another object follows depends on the image."""
    w = []
    for i, g in enumerate(groups):
        if i:
            w.append(("and", GLUE))
        w += object_words(g)
    return w


def grid_words(scene):
    """The scene cell by cell in the order an H-LVLM's image tokens come (row-major, 3 tokens per 16-px cell):
    'size colour shape' for an object, 'empty empty empty' for an empty cell: 27 words."""
    at = {(o["row"], o["col"]): o for o in scene}
    words = []
    for r in ROWS:
        for c in COLS:
            o = at.get((r, c))
            words += [(w, IMG) for w in (o["size"], o["colour"], o["shape"])] if o else [("empty", BOIL)] * 3
    return words


def label_words(scene):  # short label: 'two red circles and a blue square' (no size, no position)
    return describe([dict(g, size=None) for g in groups_of(scene, False)])


def noise_pools(cfg):
    """V distinct items per noise kind, fixed per seed (the ref LM and the VLM see the same pools)."""
    rng, V = random.Random(f"{cfg.seed}/noise"), cfg.noise_vocab

    def distinct(make):
        items = {}  # a dict keeps the order of first appearance
        while len(items) < V:
            items.setdefault(make())
        return list(items)

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
    """The web sites captions come from. A site writes all its alt-text from one template (intro, separator, stock
    phrases, noise fields, habits): what makes real boilerplate predictable from text, once a caption's first
    words give the site away; only the noise values (and the image words) are not."""
    # habits (favourite shapes, title) draw from their own stream: adding them left the other draws as they were
    rng, habits = random.Random(f"{cfg.seed}/sites"), random.Random(f"{cfg.seed}/site-habits")
    sites = []
    for _ in range(cfg.n_sites):
        noise = [[(kind, rng.choice(NOISE_TEMPLATES[kind]))
                  for kind in rng.sample(list(NOISE_TEMPLATES), rng.choice([1, 2, 3]))]
                 for _ in range(3)]  # up to three noise segments, e.g. "photo by {name} {date}"
        sites.append(dict(intro=rng.choices(INTROS, INTRO_WEIGHTS)[0], sep=rng.choice(SEPARATORS),
                          boiler=rng.sample(BOILER, 6), noise=noise, desc_first=rng.random() < 0.8,
                          noise_first=rng.random() < 0.5, pos=rng.random() < cfg.pos_prob,
                          count=rng.random() < cfg.count_prob, shapes=habits.sample(SHAPES[:cfg.n_shapes], 2),
                          title=habits.random() < cfg.title_prob, title_first=habits.random() < 0.5))
    return sites


def caption(scene, rng, cfg, pools, sites, site=None):
    """(text, tags) of a caption from a site (random unless given): its intro and a description of the scene,
    padded with its noise and boilerplate until image words are ~image_share; maybe a short title too."""
    site = site or rng.choice(sites)
    groups = groups_of(scene, site["pos"])
    rng.shuffle(groups)
    for g in groups:  # drop attributes: web captions are incomplete
        g["size"] = g["size"] if rng.random() < cfg.size_prob else None
        g["colour"] = g["colour"] if rng.random() < cfg.colour_prob else None
    core = W(site["intro"], BOIL)
    if site["count"]:  # "three shapes :" ("shape" or "shapes": the count decides)
        core += [(NUMS[len(scene)], IMG), (plural("shape", len(scene)), GLUE), (":", BOIL)]
    core += describe(groups)
    title = label_words(scene) if site["title"] else []  # the scene again, in short: text predicts it
    # word budgets: non-image words = image words * (1/image_share - 1), noise_share of them noise
    n_img = sum(t == IMG for _, t in core + title)
    room = n_img / cfg.image_share - len(core) - len(title)  # words still to add
    noise_left = cfg.noise_share * (n_img / cfg.image_share - n_img)
    noise, boiler = [], []
    # noise first (its template words and separators are boiler), then boilerplate, each in the site's order; a
    # segment that overshoots a budget is kept with probability budget/size, so shares stay unbiased
    while noise_left > 0 and room > 0:
        seg = []
        for kind, template in site["noise"][len(noise) % len(site["noise"])]:  # e.g. (name, "photo by {}")
            if cfg.bare_noise and rng.random() < cfg.bare_noise:  # the value without its template words
                template = "{}"
            pre, post = template.split("{}")
            seg += W(pre, BOIL) + W(rng.choice(pools[kind]), NOISE) + W(post, BOIL)
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
    """A caption, with probability text_context after a full description of its scene (as a web page repeats
    its alt-text): a base LM learns to use its context, which the H-LVLM's frozen LM needs (a real LLM can)."""
    text, tags = caption(scene, rng, cfg, pools, sites, site)
    if rng.random() >= cfg.text_context:
        return text, tags
    # text_grid 0 or 1: no draw, so the documents are the same but for their descriptions
    grid = cfg.text_grid >= 1 or (cfg.text_grid > 0 and rng.random() < cfg.text_grid)
    full = (grid_words(scene) if grid else describe(groups_of(scene, True))) + [(".", BOIL)]
    return f"{text_of(full)} {text}", [t for _, t in full] + tags


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
    if kind == "count":  # the number word alone: every choice has one form ("one" vs "two shapes" would not)
        counts = range(cfg.min_objects, cfg.max_objects + 1)
        return intro, NUMS[len(scene)], [NUMS[n] for n in counts if n != len(scene)]
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


# No position probe: its accuracy stayed at chance in every run (docs/experiment.md), so it judged nothing.
PROBES = ["presence_random", "presence_popular", "presence_adversarial", "colour", "count", "retrieval"]


# ----------------------------------------------------------------------------- questions about a scene
# Read off the ground truth; benchmarks/qa.py writes them as instruction data and evaluation files, and the
# generator ends some text-only documents with them (GenConfig.text_questions).
KINDS = ("count", "colour", "shape", "position", "presence")
PROMPT = "question: {} answer:"


def position_phrase(row, col):
    """'at the top left', 'at the left', 'at the top', 'at the center' (the generator's wording)."""
    return text_of(pos_words(row, col))


def all_positions():
    return [position_phrase(r, c) for r in ("top", "middle", "bottom") for c in ("left", "center", "right")]


def scene_questions(scene, rng, shapes, colours, max_objects=4, kinds=KINDS):
    """Every question of `kinds` that has one unambiguous answer in this scene: a list of
    {"kind", "question", "target", "choices"} (the target is one of the choices)."""
    out = []
    shape_count = {s: sum(o["shape"] == s for o in scene) for s in {o["shape"] for o in scene}}
    pair_count = {}
    for o in scene:
        pair_count[o["shape"], o["colour"]] = pair_count.get((o["shape"], o["colour"]), 0) + 1
    for kind in kinds:
        if kind == "count":
            choices = NUMS[1:max(max_objects, len(scene)) + 1]
            out.append(dict(kind=kind, question="how many shapes are there?", target=NUMS[len(scene)], choices=choices))
        elif kind == "colour":
            single = [o for o in scene if shape_count[o["shape"]] == 1]
            if single:
                o = rng.choice(single)
                out.append(dict(kind=kind, question=f"what colour is the {o['shape']}?", target=o["colour"],
                                choices=list(colours)))
        elif kind == "shape":
            o = rng.choice(scene)  # one object per grid cell, so the cell names it
            out.append(dict(kind=kind, question=f"what shape is {position_phrase(o['row'], o['col'])}?",
                            target=o["shape"], choices=list(shapes)))
        elif kind == "position":
            unique = [o for o in scene if pair_count[o["shape"], o["colour"]] == 1]
            if unique:
                o = rng.choice(unique)
                out.append(dict(kind=kind, question=f"where is the {o['colour']} {o['shape']}?",
                                target=position_phrase(o["row"], o["col"]), choices=all_positions()))
        elif kind == "presence":
            present = sorted(shape_count)
            absent = [s for s in shapes if s not in shape_count]
            if absent and rng.random() < 0.5:
                out.append(dict(kind=kind, question=f"is there a {rng.choice(absent)}?", target="no",
                                choices=["yes", "no"]))
            else:
                out.append(dict(kind=kind, question=f"is there a {rng.choice(present)}?", target="yes",
                                choices=["yes", "no"]))
        else:
            raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")
    return out


def answered_questions(scene, rng, shapes, colours, max_objects=4, n=3, pope_share=0.0):
    """[(word, tag)]: " . " then n of the scene's questions, each with its answer, in the instruction data's words
    ("question: is there a star? answer: no ..."), to end a text document with; a share pope_share of the presence
    questions in POPE's words instead ("Is there a star in the image?"; 0: no draw). The template's words are tagged
    boilerplate, the answers image words (they depend on the scene)."""
    qs = scene_questions(scene, rng, shapes, colours, max_objects)
    rng.shuffle(qs)
    words = [(".", BOIL)]
    for q in qs[:n]:
        text = q["question"]
        if q["kind"] == "presence" and pope_share and rng.random() < pope_share:
            text = f"Is there a {text.removeprefix('is there a ').removesuffix('?')} in the image?"
        words += [(w, BOIL) for w in PROMPT.format(text).split()] + [(w, IMG) for w in q["target"].split()]
    return words
