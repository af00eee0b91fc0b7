"""Scene -> RGB image for the built-in synthetic data (data/generate.py)."""
import math

import numpy as np
from PIL import Image, ImageDraw

from data.scenes import COLOURS, COLS, ROWS


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
