"""
Tests for data/records.py: formats, bad-record accounting, COCO, image folders, tar shards (images: test_images.py).

Run: .venv/bin/python -m pytest -q tests/test_records.py
"""
import json
import os

import pytest
import torch
from PIL import Image

from data.images import load_image, load_images
from data.record_types import DataError
from data.records import read_records


def png(path, color=(255, 0, 0), size=(8, 8), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def good_rows(tmp_path, n):
    png(tmp_path / "images" / "a.png")
    return [{"image": "images/a.png", "caption": f"caption {i}"} for i in range(n)]


def test_jsonl_round_trip(tmp_path):
    png(tmp_path / "images" / "000001.png")
    absolute = png(tmp_path / "elsewhere" / "b.png")
    p = write_jsonl(tmp_path / "train.jsonl", [
        {"image": "images/000001.png", "caption": "  a red circle  ", "id": 7,
         "tags": ["boiler", "image", "image"], "scene": {"n": 1}, "label": 3},
        "",  # blank lines are not records
        {"image": str(absolute), "caption": "a blue square"},
    ])
    recs = read_records(p)
    assert len(recs) == 2
    a, b = recs
    assert a.id == "7" and a.caption == "a red circle"
    assert a.image == str(tmp_path / "images" / "000001.png")
    assert a.extra == {"tags": ["boiler", "image", "image"], "scene": {"n": 1}, "label": 3}
    assert b.id == "train:3" and b.image == str(absolute) and b.extra == {}


def test_llava_json(tmp_path):
    png(tmp_path / "img" / "x.png")
    entries = [
        {"id": "llava-1", "image": "img/x.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": "<image> a cat on a mat "},
            {"from": "gpt", "value": "second answer, ignored"}]},
        {"image": "img/x.png", "conversations": [
            {"from": "human", "value": "Render a caption.\n<image>"},
            {"from": "gpt", "value": "a dog"}], "source": "cc3m"},
    ]
    p = tmp_path / "blip_laion.json"
    p.write_text(json.dumps(entries))
    a, b = read_records(p)
    assert (a.id, a.caption, a.image) == ("llava-1", "a cat on a mat", str(tmp_path / "img" / "x.png"))
    assert a.extra == {}
    assert (b.id, b.caption, b.extra) == ("blip_laion:1", "a dog", {"source": "cc3m"})


def test_each_bad_kind_is_counted(tmp_path, capsys):
    rows = good_rows(tmp_path, 100)
    rows += [
        "{not json",                                        # broken JSON
        "[1, 2]",                                           # not an object
        {"image": "images/a.png", "caption": "   "},        # empty caption
        {"image": "images/a.png", "caption": 5},            # caption not a string
        {"image": ["images/a.png"], "caption": "x"},        # image not a string
        {"image": "images/missing.png", "caption": "x"},    # missing image file
        {"caption": "no image"},                            # missing image field
    ]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(p, "ab") as f:
        f.write(b'{"image": "images/a.png", "caption": "caf\xe9"}\n')  # latin-1, not UTF-8
    recs = read_records(p, max_bad_fraction=0.5)
    assert len(recs) == 100
    err = capsys.readouterr().err
    assert f"skipped 8 of 108 records in {p}" in err
    for reason in ["broken JSON x 1", "not an object x 1", "empty caption x 1",
                   "caption not a string x 1", "image not a string x 1", "missing image file x 1",
                   "missing image field x 1", "non-UTF-8 line x 1"]:
        assert reason in err
    assert "line 101: broken JSON" in err and "line 105" in err and "line 106" not in err  # first 5 only


def test_llava_bad_entries(tmp_path, capsys):
    png(tmp_path / "x.png")
    ok = {"image": "x.png", "conversations": [{"from": "gpt", "value": "fine"}]}
    entries = [ok] * 3 + [{"image": "x.png", "conversations": [{"from": "human", "value": "hi"}]}, 42]
    p = tmp_path / "l.json"
    p.write_text(json.dumps(entries))
    assert len(read_records(p, max_bad_fraction=0.5)) == 3
    err = capsys.readouterr().err
    assert "no gpt turn x 1" in err and "not an object x 1" in err and "entry 3" in err


def test_clean_file_prints_nothing(tmp_path, capsys):
    read_records(write_jsonl(tmp_path / "d.jsonl", good_rows(tmp_path, 5)))
    assert capsys.readouterr().err == ""


def test_threshold(tmp_path):
    rows = good_rows(tmp_path, 199) + ["{oops"]
    assert len(read_records(write_jsonl(tmp_path / "ok.jsonl", rows))) == 199  # 0.5% <= 1%
    rows = good_rows(tmp_path, 97) + ["{oops"] * 3
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_records(p)
    assert str(p) in str(e.value) and "3 of 100" in str(e.value)
    assert len(read_records(p, max_bad_fraction=0.05)) == 97  # configurable


def test_whole_file_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="none of the 2"):
        read_records(write_jsonl(tmp_path / "allbad.jsonl", ["{", "{"]), max_bad_fraction=1.0)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="valid UTF-8 JSON"):
        read_records(tmp_path / "broken.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(DataError, match="JSON list"):
        read_records(tmp_path / "dict.json")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="extension"):
        read_records(tmp_path / "x.csv")


def test_text_only(tmp_path):
    p = write_jsonl(tmp_path / "text.jsonl", [{"caption": "just words"}, {"caption": "more", "id": "t2"}])
    with pytest.raises(DataError):
        read_records(p)  # images are required by default
    recs = read_records(p, require_image=False)
    assert [(r.id, r.caption, r.image) for r in recs] == [("text:1", "just words", None), ("t2", "more", None)]


# ----------------------------------------------------------------------------- COCO, image folders, tar shards

def png_bytes(color=(255, 0, 0), size=(8, 8)):
    import io
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples):
    """samples: [(key, {ext: bytes})] -> a webdataset-layout tar, members in the order given."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_coco_captions(tmp_path):
    png(tmp_path / "coco" / "train2017" / "000000000009.png")
    png(tmp_path / "coco" / "train2017" / "b.png")
    ann = {"images": [{"id": 9, "file_name": "000000000009.png"}, {"id": 25, "file_name": "b.png"}],
           "annotations": [{"id": 48, "image_id": 9, "caption": " A plate of food. "},
                           {"id": 67, "image_id": 9, "caption": "Two cups."},
                           {"id": 70, "image_id": 25, "caption": "A giraffe."},
                           {"id": 71, "image_id": 99, "caption": "no such image"}]}
    (tmp_path / "coco" / "annotations").mkdir()
    p = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    p.write_text(json.dumps(ann))
    with pytest.raises(DataError, match="name the image folder"):
        read_records(p)
    folder = tmp_path / "coco" / "train2017"
    for recs in (read_records(f"{p}::{folder}", max_bad_fraction=0.5),
                 read_records(p, images_root=folder, max_bad_fraction=0.5)):
        assert [(r.id, r.caption, os.path.basename(r.image)) for r in recs] == [
            ("48", "A plate of food.", "000000000009.png"), ("67", "Two cups.", "000000000009.png"),
            ("70", "A giraffe.", "b.png")]
        assert recs[0].extra == {"image_id": 9}
    assert len(read_records(p, require_image=False, max_bad_fraction=0.5)) == 3  # text only: no folder needed
    with pytest.raises(DataError, match="does not exist"):
        read_records(f"{p}::{tmp_path / 'nope'}")


def test_llava_with_image_folder(tmp_path):
    png(tmp_path / "LLaVA-Pretrain" / "images" / "00453" / "004539375.png")
    entries = [{"id": "004539375", "image": "00453/004539375.png",
                "conversations": [{"from": "human", "value": "<image>\nRender a clear caption."},
                                  {"from": "gpt", "value": "select luxury furniture"}]}]
    p = tmp_path / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json"
    p.write_text(json.dumps(entries))
    (r,) = read_records(f"{p}::{tmp_path / 'LLaVA-Pretrain' / 'images'}")
    assert r.image == str(tmp_path / "LLaVA-Pretrain" / "images" / "00453" / "004539375.png")
    with pytest.raises(DataError, match="missing image file"):
        read_records(p)  # relative to the JSON's folder, where the images are not


def test_tar_shards_read_as_records(tmp_path):
    import scale  # noqa: F401 (tar shards are scale/'s plug-in "shards")
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), (12, 6))
    write_shard(tmp_path / "shard-000000.tar", [
        ("000001", {"jpg": red, "txt": b" a red square "}),
        ("000002",
         {"png": blue, "json": json.dumps({"caption": "a blue one", "url": "http://x", "id": "b2"}).encode()}),
        ("000003", {"png": red, "txt": b"txt wins", "json": b'{"caption": "json loses", "w": 8}'})])
    write_shard(tmp_path / "shard-000001.tar", [("sub/000004", {"jpeg": red, "txt": "caf\u00e9".encode()})])
    for spec in (tmp_path, tmp_path / "shard-*.tar", tmp_path / "shard-{000000..000001}.tar"):
        recs = read_records(spec)
        assert [(r.id, r.caption, r.extra) for r in recs] == [
            ("000001", "a red square", {}), ("b2", "a blue one", {"url": "http://x"}),
            ("000003", "txt wins", {"w": 8}), ("sub/000004", "caf\u00e9", {})]
    assert recs[0].image == str(tmp_path / "shard-000000.tar") and recs[0].image_span[1] == len(red)
    kept, imgs = load_images(recs, 4)
    assert imgs.shape == (4, 3, 4, 4) and imgs[1, :, 2, 2].tolist() == [0, 0, 255]
    assert load_image(recs[0].image, 4, recs[0].image_span)[:, 0, 0].tolist() == [255, 0, 0]
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        read_records(tmp_path / "x-{0..1}.tar")
    with pytest.raises(DataError, match="matches no"):
        read_records(tmp_path / "nothing-*.tar")


def test_write_shards_round_trip(tmp_path):
    """python -m scale.shards turns any source into shards whose records (and so fingerprint) are the same."""
    from scale.shards import main as shards_main
    from utils import text_fingerprint
    png(tmp_path / "images" / "a.png", (1, 2, 3))
    png(tmp_path / "images" / "b.jpg", (200, 100, 50))
    rows = [{"image": "images/a.png", "caption": f"caption {i}", "tags": ["x", str(i)]} for i in range(5)]
    rows.insert(2, {"image": "images/b.jpg", "caption": "a jpeg", "id": "j"})
    src = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    shards_main(["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "shards"), "--per-shard", "4"])
    assert sorted(os.listdir(tmp_path / "shards")) == ["000000.tar", "000001.tar"]
    back = read_records(tmp_path / "shards")
    assert [(r.id, r.caption, r.extra) for r in back] == [(r.id, r.caption, r.extra) for r in src]
    assert text_fingerprint(back) == text_fingerprint(src)  # scores of the JSONL fit the shards
    _, a = load_images(src, 8)
    _, b = load_images(back, 8)
    assert torch.equal(a, b)  # the same bytes, not re-encoded


def test_broken_json_is_located_on_its_own_line(tmp_path, capsys):
    """A record is one line: the error names the file's line and a column, never 'line 2' of the record."""
    rows = good_rows(tmp_path, 3) + ['{"image": "images/a.png", "caption": "x"']  # cut short before its "}"
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(read_records(p, max_bad_fraction=0.5)) == 3
    err = capsys.readouterr().err
    assert "line 4: broken JSON: Expecting ',' delimiter at column 41" in err and "line 2" not in err
