"""
The world of the built-in synthetic data (data/generate.py): its vocabulary, scenes of 1-4 coloured shapes on a
3x3 grid, the caption grammar that tags every word (image, glue, boiler, noise), the web sites captions come from,
web-style captions and text-only documents, and the multiple-choice probes. data/render.py draws a scene;
data/generate.py writes the files.
"""
import random

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


# No position probe: at 48 px a grid cell is one image token, and in 16 runs of every arm and setting its accuracy
# stayed at chance (0.26-0.32 against 0.25; docs/experiment.md): the H-LVLM's per-token projector in front of a
# frozen LM did not learn to name cells, so the probe could not judge any weighting.
PROBES = ["presence_random", "presence_popular", "presence_adversarial", "colour", "count", "retrieval"]
