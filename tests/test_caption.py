import pytest
import torch

from tools import caption
from data import tokenizer as T
import train
from data.images import load_image, normalize
from benchmarks.generate import generate


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A tiny H-LVLM checkpoint (a few steps: enough to start the caption template). Cached decoding of both
    families is checked against full recomputation in test_model.py."""
    out = tmp_path_factory.mktemp("caption")
    train.main(train.TrainConfig(data=str(tiny["train"]), tokenizer=str(tiny["tokenizer"]), out_dir=str(out),
                                 arch="h", image_size=16, patch_size=4, vit_dim=16, vit_depth=1,
                                 vit_heads=2, n_layer=1, n_head=2, d_model=32, batch_size=8, row_len=64, steps=12,
                                 warmup=2, save_every=12, device="cpu", lr=1e-2))
    return {"ckpt": str(out / "last.pt"), "image": str(tiny["root"] / "images" / "train-0.png")}


def test_greedy_caption_matches_uncached_decoding(run):
    text = caption.main(["--ckpt", run["ckpt"], "--image", run["image"], "--greedy", "--max-new-tokens", "12"])
    model, tok = caption.load(run["ckpt"])
    ids = torch.tensor([model.image_tokens() + [T.BOS]])
    pixels = normalize(load_image(run["image"], 16))[None]
    slow = generate(model, ids, pixels, 12, use_cache=False)[0]
    assert text == tok.decode(slow).strip() and text
    assert text.startswith("stock")  # a few steps learn the boilerplate every training caption starts with


def test_prompt_and_seeded_sampling(run):
    argv = ["--ckpt", run["ckpt"], "--image", run["image"], "--temperature", "1.5", "--top-k", "0",
            "--max-new-tokens", "10", "--prompt", "by"]
    texts = [caption.main(argv + ["--seed", str(s)]) for s in (0, 0, 1, 2, 3)]
    assert all(t.startswith("by") for t in texts)
    assert texts[0] == texts[1] and len(set(texts)) > 1


def test_bad_inputs_give_clear_messages(run, tmp_path, capsys):
    def fails(argv):  # one line `error: ...` on stderr, exit code 2 (utils.run)
        with pytest.raises(SystemExit) as err:
            caption.main(argv)
        message = capsys.readouterr().err
        assert err.value.code == 2 and message.startswith("error: tools/caption.py: ") and message.count("\n") == 1
        return message
    assert "no image file at " + str(tmp_path / "none.png") in fails(
        ["--ckpt", run["ckpt"], "--image", str(tmp_path / "none.png")])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    assert f"cannot read image {tmp_path / 'junk.png'}: UnidentifiedImageError" in fails(
        ["--ckpt", run["ckpt"], "--image", str(tmp_path / "junk.png")])
    assert "is a folder" in fails(["--ckpt", run["ckpt"], "--image", str(tmp_path)])
    assert "no checkpoint at" in fails(["--ckpt", str(tmp_path / "x.pt"), "--image", run["image"]])
    assert "give an image" in fails(["--ckpt", run["ckpt"]])


def test_checkpoint_of_another_kind_is_named(run, tiny, capsys):
    """A reference LM given as --ckpt: one line naming the file, what it is and what was expected."""
    with pytest.raises(SystemExit) as err:
        caption.main(["--ckpt", str(tiny["ref_lm"]), "--image", run["image"]])
    assert err.value.code == 2 and capsys.readouterr().err == (
        f"error: tools/caption.py: {tiny['ref_lm']} is a reference_lm.py checkpoint (a language model), "
        f"not a train.py checkpoint (a VLM) as expected\n")
