"""The own-data alarms (utils.py; training's: scale/alarm.py): a memorising reference LM, PRIOR unlearning the
caption language, collapsed weights; on made-up numbers, plus one small end-to-end run of each script that raises
them."""
import json

import pytest
import torch

import utils as health
from scale import alarm as A  # registers the training alarm (a lab plug-in)
import reference_lm
import score
import train


def test_val_split_size():
    assert health.val_split_size(150) == 37          # not 5% (7 captions): at least 64, at most a quarter
    assert health.val_split_size(1000) == 64
    assert health.val_split_size(100_000) == 5000    # 5% once that is more than 64
    assert health.val_split_size(3) == 1 and health.val_split_size(1) == 0


def test_memorising_needs_val_up_and_train_down():
    up = [{"step": 200, "train_loss": 1.0, "val_nll": 2.33}, {"step": 400, "train_loss": 0.4, "val_nll": 2.77}]
    assert "memorising" in health.memorising(up) and "2.330" in health.memorising(up)
    assert health.memorising([dict(up[0]), dict(up[1], train_loss=1.2)]) is None  # both rose: not memorising
    assert health.memorising([dict(up[0]), dict(up[1], val_nll=2.0)]) is None     # both fell: healthy
    assert health.memorising(up[:1]) is None


def test_nll_rise_on_synthetic_sequences():
    warm, window = 10, 5
    falling = [4.0 - 0.02 * i for i in range(60)]
    assert A.nll_rise(falling, warm, window) is None
    flat_noisy = [3.0 + (0.3 if i % 2 else -0.3) for i in range(60)]
    assert A.nll_rise(flat_noisy, warm, window) is None
    spike = falling[:40] + [9.0] + falling[41:]                      # one bad batch: the running mean absorbs it
    assert A.nll_rise(spike, warm, window) is None
    rising = [3.0] * 10 + [3.0 + 0.05 * i for i in range(50)]       # the run: 3.3 -> 5.8 after warm-up
    baseline, current = A.nll_rise(rising, warm, window)
    assert baseline == pytest.approx(3.0) and current > 5.0
    first = next(n for n in range(1, 61) if A.nll_rise(rising[:n], warm, window))
    # the level (mean of the last 5) first passes 3.0 + max(0.2, 0.1 x 3.0) at step 20 (values 3.25..3.45: 3.35);
    # the alarm waits until it has stayed above for hold = 2 x 5 steps: steps 20..29
    assert first == 29
    assert A.nll_rise(rising[:28], warm, window) is None        # never before warm-up + window + hold


def test_weight_collapse_on_synthetic_scores():
    healthy = [torch.tensor([0.99, 0.99, 0.2, 0.5, 0.9]) for _ in range(10)]  # boilerplate near 1, the rest not
    stats, warning = health.weight_collapse(healthy)
    assert warning is None and stats["tokens_near_zero"] == pytest.approx(0.5)
    memorised = [torch.tensor([0.99, 0.999, 0.98, 0.97, 0.5])] * 3 + healthy[:7]
    stats, warning = health.weight_collapse(memorised)
    assert stats["captions_near_zero"] == pytest.approx(0.3) and "memorised" in warning and "30%" in warning


def test_past_ntp_reads_the_log_for_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(l) + "\n" for l in
                           [{"step": 1, "ntp": 3.0}, {"step": 2, "ntp": 2.5, "alarm": "x"}, {"step": 3, "ntp": 9.0}]))
    assert A.past_ntp(str(log), 2) == ([3.0, 2.5], "x")
    assert A.past_ntp(str(log), 0) == ([], None)


def test_reference_lm_keeps_the_best_validation_step(tiny, tmp_path, monkeypatch, capsys):
    nlls, snapshots = iter([3.0, 2.0, 2.5, 2.8]), []

    def scripted(model, samples, row_len, device, batch_rows=32):  # validation NLL that falls, then rises
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(nlls)
    monkeypatch.setattr(reference_lm, "evaluate", scripted)
    out = tmp_path / "ref.pt"
    reference_lm.train_lm(reference_lm.RefConfig(data=str(tiny["ref"]), tokenizer=str(tiny["tokenizer"]), out=str(out),
                                                 n_layer=1, n_head=2, d_model=32, row_len=64, batch_rows=4, steps=8,
                                                 eval_every=2, device="cpu"))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["kept_step"] == 4 and ckpt["best_val_nll"] == 2.0 and ckpt["val_captions"] == 50
    assert all(torch.equal(ckpt["model"][k], snapshots[1][k]) for k in snapshots[1])
    assert not all(torch.equal(ckpt["model"][k], snapshots[3][k]) for k in snapshots[3])
    err = capsys.readouterr()
    assert "kept step 4 of 8" in err.out and "memorising" in err.err


def _collapsed_scores(tiny, path):
    """A memorising reference LM's scores: every label predicted (p_ref ~ 1) but one per caption."""
    blob = torch.load(str(tiny["scores"]), weights_only=True)
    p = torch.full(blob["p_ref"].shape, 65535, dtype=torch.int32)
    p[blob["offsets"][1:] - 2] = 0  # the last caption token of each caption keeps weight 1
    blob["p_ref"] = p.to(torch.uint16)
    torch.save(blob, path)
    return blob


def test_broken_setup_raises_both_alarms_healthy_neither(tiny, tmp_path, capsys):
    # score.py's report on the fixture's scores (a reference LM trained on other captions): no warning
    assert "warning" not in json.load(open(str(tiny["scores"]).replace(".pt", ".json")))["weights"]
    bad = tmp_path / "scores_bad.pt"
    blob = _collapsed_scores(tiny, bad)
    p_ref = [blob["p_ref"][a:b].float() / 65535 for a, b in zip(blob["offsets"][:-1], blob["offsets"][1:])]
    report = {}
    score._write_report(score.ScoreConfig(out=str(tmp_path / "r.pt")), report, p_ref)
    assert "memorised" in report["weights"]["warning"] and report["weights"]["tokens_near_zero"] > 0.8
    # training: whole decoder from a trained LM, no text mix, PRIOR on collapsed weights -> the alarm fires once
    kw = dict(data=str(tiny["train"]), tokenizer=str(tiny["tokenizer"]), init_decoder=str(tiny["ref_lm"]),
              image_size=16, patch_size=4, vit_dim=16, vit_depth=1, vit_heads=2, batch_size=8, row_len=64,
              steps=24, warmup=4, save_every=24, device="cpu", lr=0.03, loss="prior")
    train.main(train.TrainConfig(scores=str(bad), out_dir=str(tmp_path / "bad"), **kw))
    lines = [json.loads(l) for l in open(tmp_path / "bad" / "log.jsonl")]
    assert sum("alarm" in l for l in lines) == 1 and "unlearning" in capsys.readouterr().err
    assert A.run_alarm(str(tmp_path / "bad"))[1].startswith("ALARM")  # eval.py --run-dir repeats it
    assert "training raised an alarm at step" in capsys.readouterr().err
    train.main(train.TrainConfig(scores=str(tiny["scores"]), out_dir=str(tmp_path / "good"), train="projector", **kw))
    assert not any("alarm" in json.loads(l) for l in open(tmp_path / "good" / "log.jsonl"))
    assert "ALARM" not in capsys.readouterr().err
    assert A.run_alarm(str(tmp_path / "good")) is None
