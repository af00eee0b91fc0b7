"""
Tests for tools/vision.py: per-cell labels, cell pooling, training on a tiny hand-drawn set, and the checkpoint
loading into build_model through --init-encoder.

Run: .venv/bin/python -m pytest -q tests/test_vision.py
"""
import json
import os
import random

import pytest
import torch
from PIL import Image, ImageDraw

import train
from tools import vision
from data.records import read_records
from data.images import load_images, normalize
from data.record_types import DataError
from model import VLMConfig
from model import build_vit
from data.tokenizer import train_tokenizer
from utils import load_checkpoint
from model import build_model

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 230), "yellow": (240, 215, 40)}
ROWS, COLS = ["top", "middle", "bottom"], ["left", "center", "right"]


def draw_scene(scene, size=48):
    """Grey background, each object centred in its cell of the 3x3 grid."""
    im = Image.new("RGB", (size, size), (120, 120, 120))
    d = ImageDraw.Draw(im)
    cell = size / 3
    for o in scene:
        cx, cy = (COLS.index(o["col"]) + 0.5) * cell, (ROWS.index(o["row"]) + 0.5) * cell
        r = cell * (0.42 if o["size"] == "large" else 0.25)
        box = [cx - r, cy - r, cx + r, cy + r]
        if o["shape"] == "circle":
            d.ellipse(box, fill=COLOURS[o["colour"]])
        else:
            d.rectangle(box, fill=COLOURS[o["colour"]])
    return im


def write_scenes(folder, n, seed=0, with_scene=True):
    rng = random.Random(seed)
    os.makedirs(folder / "images", exist_ok=True)
    rows = []
    for i in range(n):
        scene = [dict(shape=rng.choice(["circle", "square"]), colour=rng.choice(list(COLOURS)),
                      size=rng.choice(["small", "large"]), row=ROWS[c // 3], col=COLS[c % 3])
                 for c in rng.sample(range(9), rng.randint(1, 3))]
        draw_scene(scene).save(folder / "images" / f"{i:03d}.png")
        row = dict(id=f"s{i}", image=f"images/{i:03d}.png", caption=" ".join(o["shape"] for o in scene))
        if with_scene:
            row["scene"] = scene
        rows.append(row)
    path = folder / "scenes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(data, out, **kw):
    base = dict(data=str(data), out=str(out), image_size=48, patch_size=8, vit_dim=32, vit_depth=1,
                vit_heads=2, steps=40, batch_size=16, lr=3e-3, warmup=5, pixel_noise=0.0, eval_every=0,
                val_fraction=0.1, threads=1)
    base.update(kw)
    return vision.Config(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    data = write_scenes(folder, 48)
    cfg = tiny_config(data, folder / "out" / "vit.pt")
    threads = torch.get_num_threads()  # threads=1: a tiny model gains nothing from more, and a busy CPU loses
    try:
        encoder, heads, summary = vision.main(cfg)
    finally:
        torch.set_num_threads(threads)  # process-wide setting: leave it as the other tests expect
    return cfg, data, summary


def test_labels_put_each_object_in_its_cell():
    scene = [{"shape": "circle", "colour": "red", "size": "large", "row": "top", "col": "right"},
             {"shape": "square", "colour": "blue", "size": "small", "row": 2, "col": 0},  # ints work too
             {"shape": "square", "colour": "red", "size": "large", "row": "middle", "col": "center"}]
    classes = vision.build_classes([scene])
    assert classes == {"shape": ["empty", "circle", "square"], "colour": ["empty", "blue", "red"],
                       "size": ["empty", "large", "small"]}
    labels = vision.scene_labels(scene, classes)
    assert labels.shape == (9, 3)
    expect = {2: [1, 2, 1], 6: [2, 1, 2], 4: [2, 2, 1]}  # cell = row * 3 + col
    for cell in range(9):
        assert labels[cell].tolist() == expect.get(cell, [0, 0, 0]), cell
    with pytest.raises(ValueError, match="two objects in cell"):
        vision.scene_labels(scene + [dict(scene[0])], classes)
    with pytest.raises(ValueError, match="row must be"):
        vision.scene_labels([dict(scene[0], row="upper")], classes)


def test_cell_pooling_averages_the_cells_patches():
    pool = vision.cell_pooling(48, 8)  # 6x6 patches, 2x2 per cell
    assert pool.shape == (9, 36)
    assert torch.allclose(pool.sum(1), torch.ones(9))
    assert pool[0].nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert pool[8].nonzero().flatten().tolist() == [28, 29, 34, 35]
    odd = vision.cell_pooling(40, 8)  # 5x5 patches: the middle patch row/col is shared by two cells
    assert torch.allclose(odd.sum(1), torch.ones(9))
    assert odd[0, 1] > 0 and odd[4, 12] == odd[4].max()


def test_training_lowers_the_loss(trained):
    cfg, data, summary = trained
    ckpt = load_checkpoint(cfg.out)
    records, images = load_images(read_records(data), cfg.image_size)
    labels = torch.stack([vision.scene_labels(s, ckpt["classes"]) for s in vision.scenes_of(records)])
    x = normalize(images)

    def loss_of(encoder, heads):
        with torch.no_grad():
            return float(vision.cell_loss(heads(encoder.eval().forward_features(x)), labels))

    vcfg = VLMConfig(**ckpt["vit_config"])
    torch.manual_seed(123)
    fresh = loss_of(build_vit(vcfg), vision.CellHeads(cfg.vit_dim, ckpt["classes"], cfg.image_size, cfg.patch_size))
    encoder, heads = build_vit(vcfg), vision.CellHeads(cfg.vit_dim, ckpt["classes"], cfg.image_size, cfg.patch_size)
    encoder.load_state_dict(ckpt["model"])
    heads.load_state_dict(ckpt["heads"])
    assert loss_of(encoder, heads) < 0.3 * fresh  # ~0.4 vs ~4 in practice
    # the accuracy file and the checkpoint agree, with every attribute reported
    with open(os.path.splitext(cfg.out)[0] + ".json") as f:
        report = json.load(f)
    assert report["val_accuracy"] == ckpt["val_accuracy"]
    assert set(report["val_accuracy"]) == {"shape", "colour", "size", "empty", "scene"}
    assert report["n_train"] + report["n_val"] == 48 and report["n_val"] == 5


def test_checkpoint_loads_through_init_encoder(trained, tmp_path):
    cfg, _, _ = trained
    ckpt = load_checkpoint(cfg.out)
    assert ckpt["vit_config"] == dict(image_size=48, patch_size=8, vit_dim=32, vit_depth=1, vit_heads=2)
    assert ckpt["config"]["steps"] == cfg.steps and len(ckpt["data"]) == 16
    tok = train_tokenizer(["a red circle", "two blue squares at the top left"], vocab_size=300)
    # TrainConfig's ViT defaults (192 wide, 4 deep) differ: the checkpoint's vit_config must win.
    tcfg = train.TrainConfig(arch="h", init_encoder=cfg.out, n_layer=1, n_head=2, d_model=32, row_len=64,
                             train="projector")
    model = build_model(tcfg, tok)
    got = model.encoder.state_dict()
    assert got.keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        assert torch.equal(got[k], v), k
    assert not any(p.requires_grad for p in model.encoder.parameters())
    out = model.embed_images(torch.zeros(2, 3, 48, 48))
    assert out.shape == (2, 36, 32)


def test_records_without_scene_are_refused(tmp_path):
    data = write_scenes(tmp_path, 4, with_scene=False)
    with pytest.raises(DataError, match="record s0 has no 'scene' field"):
        vision.main(tiny_config(data, tmp_path / "vit.pt", threads=0))  # 0: leave torch threads alone
    assert not (tmp_path / "vit.pt").exists()
    bad = read_records(write_scenes(tmp_path / "b", 2))
    del bad[1].extra["scene"][0]["colour"]
    with pytest.raises(DataError, match=r"record s1: scene object .* lacks \['colour'\]"):
        vision.scenes_of(bad)
