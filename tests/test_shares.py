"""Tests for experiments/shares.py: the share of the caption loss weight on each word tag, per arm, against the same
shares computed by hand from Eq. 4 (f_i = k w_i / sum_j w_j per caption) on a tiny main-job folder whose p_ref we
choose.

Run: .venv/bin/python -m pytest tests/test_shares.py
"""
import json
import random

import pytest
import torch
from PIL import Image

from experiments import shares as S
from data import tokenizer as T
from data.records import read_records
from data.scores import save_scores
from data.tags import CATEGORIES, token_tags
from train import TrainConfig
from utils import UserError, run, text_fingerprint

IMAGE, GLUE = CATEGORIES.index("image"), CATEGORIES.index("glue")
COLOURS, SHAPES, NAMES = ["red", "blue", "green"], ["circle", "square", "star"], ["ann", "bob", "eve"]


def caption(rng):
    words = [("stock", "boiler"), ("photo", "boiler"), ("of", "boiler"), ("a", "glue"), (rng.choice(COLOURS), "image"),
             (rng.choice(SHAPES), "image")]
    if rng.random() < 0.5:  # captions of two lengths, so the per-caption normalisation matters
        words += [("and", "glue"), ("a", "glue"), (rng.choice(COLOURS), "image"), (rng.choice(SHAPES), "image")]
    words += [("by", "boiler"), (rng.choice(NAMES), "noise")] * rng.randint(1, 3)
    return " ".join(w for w, _ in words), [t for _, t in words]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A main job's folder as experiments/main.py --stage prepare leaves it (no scores yet: each test writes its)."""
    root = tmp_path_factory.mktemp("job")
    (root / "data_web" / "img").mkdir(parents=True)
    rng, rows = random.Random(0), []
    for i in range(24):
        text, tags = caption(rng)
        Image.new("RGB", (16, 16), (rng.randrange(256), 0, 0)).save(root / "data_web" / "img" / f"{i}.png")
        rows.append({"id": f"train-{i}", "image": f"img/{i}.png", "caption": text, "tags": tags})
    (root / "data_web" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = T.train_tokenizer([r["caption"] for r in rows], vocab_size=300)
    tok.save(str(root / "tokenizer.json"))
    records = read_records(str(root / "data_web" / "train.jsonl"))
    return {"root": root, "tok": tok, "records": records, "tags": token_tags(tok, records)}


def write_scores(job, p_of_tag):
    """scores_web_train.pt with p_ref = p_of_tag(tag id) for every label (<|eos|>: tag -1); returns them as the
    trainer reads them back (uint16: p * 65535 rounded)."""
    p = [torch.tensor([p_of_tag(t) for t in tags]) for tags in job["tags"]]
    save_scores(str(job["root"] / "scores_web_train.pt"), [r.id for r in job["records"]], p,
                {"tokenizer": T.fingerprint(job["tok"]), "data": text_fingerprint(job["records"])})
    return [((q * 65535).round() / 65535).tolist() for q in p]


def by_hand(job, weight, n=None):
    """{tag: share, "cv": ...} from Eq. 4 in plain Python: weight(tag, p_ref) per label, f = k w / sum w per caption
    (uniform when the weights sum to 0)."""
    total, cvs = {t: 0.0 for t in S.TAGS}, []
    for tags, p in zip(job["tags"][:n], job["p"][:n]):
        w = [weight(t, q) for t, q in zip(tags, p)]
        f = [len(w) * x / sum(w) for x in w] if sum(w) > 0 else [1.0] * len(w)
        for t, x in zip(tags, f):
            total[S.TAGS[t + 1]] += x
        mean = sum(f) / len(f)
        cvs.append((sum((x - mean) ** 2 for x in f) / len(f)) ** 0.5 / mean)
    return {**{t: x / sum(total.values()) for t, x in total.items()}, "cv": sum(cvs) / len(cvs)}


def shares(job, arm, n=0):
    root = job["root"]
    return S.arm_shares(TrainConfig(data=str(root / "data_web" / "train.jsonl"), tokenizer=str(root / "tokenizer.json"),
                                    scores=str(root / "scores_web_train.pt"), loss=arm), n)


def low_on_image(t):  # the reference LM guesses everything but the image words
    return 0.05 if t == IMAGE else 0.9


def check(got, want):
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-6)


def test_ntp_share_is_the_fraction_of_image_labels(job):
    job["p"] = write_scores(job, low_on_image)
    got = shares(job, "ntp")
    labels = [t for tags in job["tags"] for t in tags]  # caption tokens and <|eos|>: every label the loss counts
    ids = T.encode_captions(job["tok"], [r.caption for r in job["records"]])
    assert len(labels) == sum(len(x) + 1 for x in ids)
    assert got["image"] == pytest.approx(labels.count(IMAGE) / len(labels), abs=1e-12)
    assert got["untagged"] == pytest.approx(labels.count(-1) / len(labels), abs=1e-12)  # <|eos|>, lone spaces
    assert labels.count(-1) >= len(job["tags"])  # one <|eos|> a caption at least
    assert got["cv"] == 0 and got["captions"] == 24 and 0.2 < got["image"] < 0.5
    check(got, by_hand(job, lambda t, p: 1.0))


def test_arms_match_eq4_by_hand(job):
    job["p"] = write_scores(job, low_on_image)
    ntp, oracle, prior, anti = (shares(job, a) for a in ("ntp", "oracle", "prior", "anti_prior"))
    check(oracle, by_hand(job, lambda t, p: 1.0 if t in (IMAGE, GLUE) else 0.1))
    check(prior, by_hand(job, lambda t, p: 1 - p))
    check(shares(job, "prior_alpha2"), by_hand(job, lambda t, p: (1 - p) ** 2))
    check(anti, by_hand(job, lambda t, p: p))
    assert oracle["image"] > ntp["image"] + 0.1
    assert prior["image"] > ntp["image"] > anti["image"]
    assert prior["cv"] > 0.5 and anti["cv"] > 0.5
    # the control: PRIOR's weights permuted within each caption (train.py's prepare ran), the same spread
    shuffled = shares(job, "prior_shuffled")
    assert shuffled["image"] < prior["image"] - 0.05 and shuffled["cv"] == pytest.approx(prior["cv"], abs=1e-6)
    # within each tag: the allocation across tags is PRIOR's
    check(shares(job, "prior_shuffled_tag"), {t: prior[t] for t in S.TAGS})


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_equal_p_ref_gives_ntp(job, p):
    job["p"] = write_scores(job, lambda t: p)
    ntp, prior = shares(job, "ntp"), shares(job, "prior")
    if p == 0:  # w = 1 everywhere: NTP exactly; anti-PRIOR's w = 0 everywhere falls back to uniform (loss.py)
        assert prior == ntp and shares(job, "anti_prior") == ntp
    else:
        check(prior, ntp)


def test_max_captions_counts_the_first(job):
    job["p"] = write_scores(job, low_on_image)
    got = shares(job, "prior", 5)
    assert got["captions"] == 5
    check(got, by_hand(job, lambda t, p: 1 - p, n=5))


def test_cli_table_json_and_errors(job, tmp_path, capsys):
    job["p"] = write_scores(job, low_on_image)
    root, out = str(job["root"]), str(tmp_path / "shares.json")
    got = run(S.main, S.SharesConfig, ["--from", root, "--arms", "ntp,oracle", "--max-captions", "0", "--json", out])
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(got)) and saved["captions"] == 24
    assert set(saved["ntp"]) == {*S.TAGS, "cv"} and saved["oracle"]["image"] > saved["ntp"]["image"]
    assert saved["command"] == f"python -m experiments.shares --from {root} --mix web --arms ntp,oracle " \
                               f"--max-captions 0 --json {out}"
    assert "| oracle | " in capsys.readouterr().out
    for argv, words in ((["--from", str(tmp_path / "none")], "--from"),
                        (["--from", root, "--arms", "ntp,nope"], "--arms ntp,nope"),
                        (["--from", root, "--mix", "hard"], "data_hard"),
                        (["--from", root, "--arms", "rho1"], "online")):  # rho1 weighs online, from the model
        with pytest.raises(SystemExit) as e:
            run(S.main, S.SharesConfig, argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err
    with pytest.raises(UserError, match="--from .* no .*scores_web_train.pt"):
        (job["root"] / "scores_web_train.pt").unlink()
        S.main(S.SharesConfig(from_=root, arms="ntp,prior"))
