"""Shared fixtures: a tiny hand-made caption data set with images, a tokenizer, a reference LM and scores.

Built once per test session in a temporary folder (a few seconds on a CPU), so the tests of each step
run on the real artefacts of the steps before it.
"""
import json
import random

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 20)}
SHAPES = ["circle", "square"]
NAMES = ["ann", "bob", "eve", "joe", "kim", "lea", "max", "sam"]


def caption(rng, colour, shape):
    words = [("stock", "boiler"), ("photo", "boiler"), (":", "boiler"), ("a", "boiler"), (colour, "image"),
             (shape, "image"), ("by", "boiler"), (rng.choice(NAMES), "noise")]
    return " ".join(w for w, _ in words), [t for _, t in words]


def write_split(root, split, n, rng, with_images):
    (root / "images").mkdir(exist_ok=True)
    with open(root / f"{split}.jsonl", "w") as f:
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            text, tags = caption(rng, colour, shape)
            row = {"id": f"{split}-{i}", "caption": text, "tags": tags}
            if with_images:
                im = Image.new("RGB", (16, 16), (240, 240, 240))
                draw = ImageDraw.Draw(im)
                (draw.ellipse if shape == "circle" else draw.rectangle)([3, 3, 12, 12], fill=COLOURS[colour])
                im.save(root / "images" / f"{split}-{i}.png")
                row["image"] = f"images/{split}-{i}.png"
                row["scene"] = [{"shape": shape, "colour": colour, "size": "large", "row": 1, "col": 1}]
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny end-to-end set-up: data, tokenizer, reference LM and scores of train.jsonl."""
    import reference_lm
    import score
    from data import tokenizer

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    write_split(root, "ref", 200, rng, with_images=False)
    write_split(root, "train", 48, rng, with_images=True)
    write_split(root, "text", 100, rng, with_images=False)
    tokenizer.main(["--data", f"{root}/ref.jsonl,{root}/train.jsonl", "--out", f"{root}/tok.json",
                    "--vocab-size", "300"])
    reference_lm.train_lm(reference_lm.RefConfig(data=f"{root}/ref.jsonl", tokenizer=f"{root}/tok.json",
                                                 out=f"{root}/ref.pt", n_layer=1, n_head=2, d_model=32,
                                                 row_len=64, batch_rows=8, steps=30, eval_every=30, device="cpu"))
    score.main(score.ScoreConfig(ref=f"{root}/ref.pt", tokenizer=f"{root}/tok.json", data=f"{root}/train.jsonl",
                                 out=f"{root}/scores.pt", row_len=128, device="cpu"))
    return {"root": root, "ref": root / "ref.jsonl", "train": root / "train.jsonl", "text": root / "text.jsonl",
            "tokenizer": root / "tok.json", "ref_lm": root / "ref.pt", "scores": root / "scores.pt"}
