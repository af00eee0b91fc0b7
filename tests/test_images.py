"""
Tests for data/images.py: image decoding, dropping undecodable images, the image cache, normalize.

Run: .venv/bin/python -m pytest -q tests/test_images.py
"""
import os

import pytest
import torch

from data.images import load_image, load_images, normalize
from data.record_types import DataError
from data.records import read_records
from test_records import png, write_jsonl  # noqa: E402  (tests/ is on sys.path under pytest)


def test_load_images_drops_undecodable(tmp_path, capsys):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    rows = [{"image": f"i{k}.png", "caption": f"c{k}"} for k in range(4)]
    for k, c in enumerate(colors):
        png(tmp_path / f"i{k}.png", c, size=(20, 10))
    data = (tmp_path / "i1.png").read_bytes()
    (tmp_path / "i1.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    (tmp_path / "i2.png").write_bytes(b"")                     # zero-byte file
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    for workers in (0, 2):
        kept, imgs = load_images(recs, 16, max_bad_fraction=0.5, workers=workers)
        assert [r.caption for r in kept] == ["c0", "c3"]
        assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.uint8
        assert imgs[0, :, 8, 8].tolist() == [255, 0, 0] and imgs[1, :, 8, 8].tolist() == [9, 9, 9]
        err = capsys.readouterr().err
        assert "skipped 2 of 4 images" in err and "cannot decode image x 2" in err
    with pytest.raises(DataError, match="2 of 4"):
        load_images(recs, 16)  # 50% bad is far over the default 1%


def test_image_cache_equals_memory_and_is_reused(tmp_path, capsys, monkeypatch):
    import scale.image_cache as R  # --image-cache (registers the plug-in)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (1, 2, 3)]
    rows = [{"image": f"i{k}.png", "caption": f"c{k}"} for k in range(5)]
    for k, c in enumerate(colors):
        png(tmp_path / f"i{k}.png", c, size=(20, 10))
    (tmp_path / "i2.png").write_bytes(b"")  # a bad one: skipped and reported with or without the cache
    recs = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    kept, imgs = load_images(recs, 16, max_bad_fraction=0.5)
    cache = str(tmp_path / "cache" / "images.u8")
    assert not R.images_cached(recs, 16, cache)
    for workers in (0, 2):
        kept_c, imgs_c = load_images(recs, 16, max_bad_fraction=0.5, workers=workers, cache=cache)
        assert [r.id for r in kept_c] == [r.id for r in kept] and torch.equal(imgs_c, imgs)
        assert "skipped 1 of 5 images" in capsys.readouterr().err
    assert R.images_cached(recs, 16, cache) and not R.images_cached(recs, 8, cache)
    assert os.path.getsize(cache) == 4 * 3 * 16 * 16
    # a second call maps the file: nothing is decoded, the bad record is still reported and counted
    monkeypatch.setattr("data.images._try_load", lambda job: pytest.fail("decoded again"))
    kept_c, imgs_c = load_images(recs, 16, max_bad_fraction=0.5, cache=cache)
    assert torch.equal(imgs_c, imgs) and "skipped 1 of 5 images" in capsys.readouterr().err
    with pytest.raises(DataError, match="1 of 5"):
        load_images(recs, 16, cache=cache)  # the threshold applies to a cached result too
    # a changed image file (or other records, or another size) makes it decode again
    monkeypatch.undo()
    png(tmp_path / "i0.png", (7, 7, 7), size=(20, 10))
    os.utime(tmp_path / "i0.png", ns=(1, 1))
    assert not R.images_cached(recs, 16, cache)
    kept_c, imgs_c = load_images(recs, 16, max_bad_fraction=0.5, cache=cache)
    assert "decoding again" in capsys.readouterr().err and imgs_c[0, :, 8, 8].tolist() == [7, 7, 7]
    # a cut-off pixel file (e.g. a full disk) is not taken for a cache
    with open(cache, "r+b") as f:
        f.truncate(100)
    assert not R.images_cached(recs, 16, cache)


def test_modes_become_rgb(tmp_path):
    cases = {"L": 128, "RGBA": (10, 20, 30, 255), "CMYK": (0, 0, 0, 0), "P": 3, "LA": (50, 255)}
    for mode, color in cases.items():
        ext = "jpg" if mode == "CMYK" else "png"
        x = load_image(png(str(tmp_path / f"{mode}.{ext}"), color, size=(5, 7), mode=mode), 6)
        assert x.shape == (3, 6, 6) and x.dtype == torch.uint8, mode
    assert load_image(tmp_path / "L.png", 6)[:, 0, 0].tolist() == [128] * 3
    assert load_image(tmp_path / "RGBA.png", 6)[:, 0, 0].tolist() == [10, 20, 30]
    # fully transparent pixels show the white background, not whatever RGB hides under them
    assert load_image(png(str(tmp_path / "clear.png"), (0, 0, 0, 0), mode="RGBA"), 4)[:, 0, 0].tolist() == [255] * 3


def test_normalize():
    imgs = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    imgs[:, :, :, :] = torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)
    x = normalize(imgs)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expect = (torch.tensor([124, 116, 104]) / 255 - mean) / std
    assert torch.allclose(x[1, :, 2, 3], expect, atol=1e-6)
    assert x.abs().max() < 0.01  # those bytes are ~the ImageNet mean
    white = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(white[0, :, 0, 0], (1 - mean) / std)
