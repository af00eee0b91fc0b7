"""experiments/lm_variant.py: the main job's prepare stage and one NTP run on a base LM pre-trained on other
text documents (the smoke preset here)."""
import json

import pytest
import torch

from experiments import experiment as X
from experiments import lm_variant
from utils import UserError


def test_a_variant_changes_the_base_lm_text_and_nothing_else(tmp_path):
    """--text-grid reaches the generated text documents and --base-steps the base LM, the run's row has every
    reported benchmark, the JSON names its command, and the preset table is left as it was."""
    before = json.dumps(X.PRESETS, sort_keys=True)
    out = tmp_path / "out"
    cfg = lm_variant.VariantConfig(out=str(out), preset="smoke", text_grid=1.0, base_steps=7, seed=0, lr=3e-3,
                                   json=str(tmp_path / "row.json"))
    row = lm_variant.main(cfg)
    assert json.dumps(X.PRESETS, sort_keys=True) == before
    assert set(lm_variant.READ) | {"text_context_adds", "text_right"} <= set(row)
    assert row["step"] == X.PRESETS["smoke"]["vlm"]["steps"]
    docs = [json.loads(x) for x in open(out / "data_web" / "text.jsonl")]
    assert all(len(d["caption"].partition(" . ")[0].split()) == 27 for d in docs)  # every description a grid
    assert torch.load(out / "base_lm.pt", map_location="cpu", weights_only=False)["config"]["steps"] == 7
    written = json.load(open(tmp_path / "row.json"))
    assert written["row"] == row and "--text-grid 1 " in written["command"] and "--base-steps 7" in written["command"]
    with pytest.raises(UserError, match="made with"):  # the same folder for another variant: refused
        lm_variant.main(lm_variant.VariantConfig(out=str(out), preset="smoke", text_grid=0.5))


def test_a_folder_it_did_not_make_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="--out"):
        lm_variant.main(lm_variant.VariantConfig(out=str(tmp_path)))
    with pytest.raises(UserError, match="--out"):
        lm_variant.main(lm_variant.VariantConfig(out=""))
