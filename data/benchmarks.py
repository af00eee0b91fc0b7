"""Reading evaluation files: multiple-choice questions (eval.py --mc and --probes, data/qa.py's question files),
held-out captions (eval.py --test), and the paper's benchmarks as distributed (eval.py --bench, docs/benchmarks.md:
POPE json-lines, MME folders, VLMEvalKit TSVs, SEED-Bench JSON), decoded once per process, with the same --max-rows
subset for every checkpoint; and report_skipped, which counts the items a model could not score.

    from data.benchmarks import load_bench
    records, images, image_index = load_bench("pope:coco_pope_random.json::coco/val2014", size=48)"""
import base64
import csv
import json
import os
import sys

import torch

from data.records import read_records
from data.images import decode_image_bytes, load_images
from data.record_types import BadRecord, DataError, Record, Tally, report_bad
from lib.utils import text_fingerprint

_data = {}  # data_key -> (records, uint8 images[, fingerprint of the whole file])


def data_key(kind, path, size, max_rows, seed):
    return kind, os.path.abspath(path), os.path.getmtime(path), size, max_rows, seed


def subsample(items, max_rows, seed):
    """A fixed random subset in file order, so every checkpoint sees the same rows."""
    if not max_rows or len(items) <= max_rows:
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:max_rows]
    return [items[i] for i in sorted(keep.tolist())]


def _question(obj, key, folder):
    """One MC row -> Record(caption=prompt, extra={"choices", "answer"}), or raise BadRecord(reason)."""
    if not isinstance(obj, dict):
        raise BadRecord("not an object")
    image, prompt, choices, answer = obj.get("image"), obj.get("prompt", ""), obj.get("choices"), obj.get("answer")
    if not isinstance(image, str) or not image.strip():
        raise BadRecord("missing image field")
    image = os.path.abspath(os.path.join(folder, image))
    if not os.path.isfile(image):
        raise BadRecord("missing image file", image)
    if not isinstance(prompt, str):
        raise BadRecord("prompt not a string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRecord("fewer than 2 choices")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRecord("empty or non-string choice")
    if type(answer) is not int or not 0 <= answer < len(choices):  # type(): True is not a valid answer
        raise BadRecord("answer not a choice index")
    # Stripped, so that encode(prompt) + encode(choice) is the tokenisation of "prompt choice" (add_prefix_space).
    return Record(str(obj.get("id", key)), prompt.strip(), image,
                  {"choices": [c.strip() for c in choices], "answer": answer})


def read_mc(path, max_bad_fraction=0.05):
    """Valid questions of a multiple-choice JSONL file; bad rows are skipped and reported like data/records.py."""
    folder, stem = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    good, bad, total = [], [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                good.append(_question(json.loads(raw.decode("utf-8")), f"{stem}:{n}", folder))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append((f"line {n}", "broken JSON", ""))
            except BadRecord as e:
                bad.append((f"line {n}", e.args[0], e.args[1] if len(e.args) > 1 else ""))
    if total == 0:
        raise DataError(f"{path}: no questions")
    report_bad("questions", path, bad, total, max_bad_fraction)
    if not good:
        raise DataError(f"{path}: none of the {total} questions is usable")
    return good


def load_mc(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("mc", path, size, max_rows, seed)
    if key not in _data:  # undecodable images are dropped and reported by load_images
        _data[key] = load_images(subsample(read_mc(path, max_bad_fraction), max_rows, seed), size, max_bad_fraction)
    return _data[key]


def load_test(path, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    key = data_key("test", path, size, max_rows, seed)
    if key not in _data:
        records = read_records(path, max_bad_fraction=max_bad_fraction)
        _data[key] = (*load_images(subsample(records, max_rows, seed), size, max_bad_fraction),
                      text_fingerprint(records))
    return _data[key]


def report_skipped(out, name, skipped, total, what):
    """Items longer than the model's context: counted in the results (name_skipped) and on stderr."""
    if skipped:
        out[f"{name}_skipped"] = skipped
        print(f"warning: {name}: {skipped} of {total} {what} reach past the model's context and are not scored "
              f"(counted as {name}_skipped)", file=sys.stderr)


# ----------------------------------------------------------------------------- the paper's benchmarks as distributed
# Every reader returns Records of one shape: caption = the prompt a choice continues ("question: ... answer:", as
# data/qa.py writes its questions), image = the image file (None for a TSV row: its base64 bytes are in
# extra["image_b64"]), extra = {"bench", "choices", "answer" (index), "question"} and the metric's keys ("split",
# "subtask" + "image_key", "category" / "l2_category" / "group", "question_type").
PROMPT = "question: {} answer:"
YES_NO = ["yes", "no"]
KINDS = ("pope", "mme", "mmbench", "mmstar", "seed", "seed_tsv", "tsv")


def _bad_reason(e):
    return e.args[0], e.args[1] if len(e.args) > 1 else ""


def _yes_no(text):
    t = str(text).strip().lower().rstrip(".")
    if t not in ("yes", "no"):
        raise BadRecord("answer not yes/no", repr(text))
    return YES_NO.index(t)


def _image_file(folder, name):
    if not isinstance(name, str) or not name.strip():
        raise BadRecord("missing image field")
    path = os.path.abspath(os.path.join(folder, name))
    if not os.path.isfile(path):
        raise BadRecord("missing image file", path)
    return path


def read_pope(path, images_root=None, max_bad_fraction=0.05):
    """POPE's coco_pope_<split>.json: one {"question_id", "image", "text", "label": yes|no} a line; images in
    images_root (COCO val2014; default: the file's folder). The split is the file name's last "_" part."""
    folder = images_root or os.path.dirname(os.path.abspath(path))
    split = os.path.splitext(os.path.basename(path))[0].split("_")[-1]
    tally, good = Tally("POPE questions", path), []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            tally.total += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise BadRecord("not an object")
                text = obj.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise BadRecord("missing question text")
                answer = _yes_no(obj.get("label"))
                image = _image_file(folder, obj.get("image"))
                good.append(Record(str(obj.get("question_id", n)), PROMPT.format(text.strip()), image,
                                   {"bench": "pope", "split": split, "choices": YES_NO, "answer": answer,
                                    "question": text.strip()}))
            except (UnicodeDecodeError, json.JSONDecodeError):
                tally.bad(f"{path} line {n}", "broken JSON")
            except BadRecord as e:
                tally.bad(f"{path} line {n}", *_bad_reason(e))
    tally.good = len(good)
    tally.finish(max_bad_fraction)
    return good


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".bmp")


def _mme_pairs(sub):
    """(question file, image folder) pairs of one MME subtask folder, in either layout."""
    qa_dir = os.path.join(sub, "questions_answers_YN")
    if os.path.isdir(qa_dir):
        return [(os.path.join(qa_dir, f), os.path.join(sub, "images")) for f in sorted(os.listdir(qa_dir))
                if f.endswith(".txt")]
    return [(os.path.join(sub, f), sub) for f in sorted(os.listdir(sub)) if f.endswith(".txt")]


def read_mme(folder, max_bad_fraction=0.05):
    """MME: one folder per subtask, each with images and `question<TAB>Yes|No` lines in a .txt of the image's
    name, either beside the image or in questions_answers_YN/ (the images then in images/)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: not an MME folder")
    tally, good = Tally("MME questions", folder), []
    subs = [d for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    for sub in subs:
        for txt, img_dir in _mme_pairs(os.path.join(folder, sub)):
            stem = os.path.splitext(os.path.basename(txt))[0]
            image = next((os.path.join(img_dir, stem + e) for e in IMAGE_EXTS
                          if os.path.isfile(os.path.join(img_dir, stem + e))), None)
            with open(txt, "rb") as f:
                lines = [raw for raw in f if raw.strip()]
            for n, raw in enumerate(lines, 1):
                tally.total += 1
                try:
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError:
                        raise BadRecord("not UTF-8")
                    if "\t" not in line:
                        raise BadRecord("no tab between question and answer")
                    question, answer = line.rsplit("\t", 1)
                    answer = _yes_no(answer)
                    if not question.strip():
                        raise BadRecord("missing question text")
                    if image is None:
                        raise BadRecord("missing image file", os.path.join(img_dir, stem + ".*"))
                    good.append(Record(f"{sub}/{stem}:{n}", PROMPT.format(question.strip()), os.path.abspath(image),
                                       {"bench": "mme", "subtask": sub, "image_key": f"{sub}/{stem}",
                                        "choices": YES_NO, "answer": answer, "question": question.strip()}))
                except BadRecord as e:
                    tally.bad(f"{txt} line {n}", *_bad_reason(e))
    tally.good = len(good)
    if not subs:
        raise DataError(f"{folder}: no subtask folders (expected e.g. existence/, count/, OCR/)")
    tally.finish(max_bad_fraction)
    return good


def mc_prompt(question, options, hint=""):
    """The prompt of a lettered multiple-choice question: hint, question and its options, then "answer:"; the
    choices scored after it are the options' texts (likelihood, not a generated letter: docs/benchmarks.md)."""
    text = " ".join(t for t in (hint.strip(), question.strip()) if t)
    listed = " ".join(f"{chr(65 + j)}. {o}" for j, o in enumerate(options))
    return PROMPT.format(f"{text} options: {listed}")


def _cell(row, name):
    v = row.get(name)
    return "" if v is None or v.strip().lower() in ("", "nan", "none") else v.strip()


def read_tsv(path, kind="tsv", max_bad_fraction=0.05):
    """A VLMEvalKit multiple-choice TSV (MMBench, MMStar, SEEDBench_IMG, ...): columns index, question, optional
    hint, options A, B, ... (empty: absent), answer (a letter), category, l2-category (or l2_category), image
    (base64; a short number: the image of the row with that index). Rows of MMBench's circular copies share a
    group, index % 1e6."""
    csv.field_size_limit(sys.maxsize)
    tally, rows = Tally(f"{kind} questions", path), []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ("index", "question", "answer", "image", "A", "B") if c not in header]
        if missing:
            raise DataError(f"{path}: not a VLMEvalKit multiple-choice TSV, no column(s) {', '.join(missing)}")
        letters = [c for c in header if len(c) == 1 and c.isupper()]
        for n, row in enumerate(reader, 2):  # line numbers count the header
            tally.total += 1
            rows.append((n, row))
    images = {_cell(row, "index"): _cell(row, "image") for _, row in rows}
    good = []
    for n, row in rows:
        try:
            if None in row or any(v is None for v in row.values()):
                raise BadRecord("wrong number of columns")
            index = _cell(row, "index")
            if not index.lstrip("-").isdigit():
                raise BadRecord("index not a number", repr(index))
            question = _cell(row, "question")
            if not question:
                raise BadRecord("missing question text")
            options = [_cell(row, c) for c in letters]
            n_opt = next((j for j, o in enumerate(options) if not o), len(options))
            options = options[:n_opt]
            if len(options) < 2:
                raise BadRecord("fewer than 2 options")
            answer = _cell(row, "answer")
            if len(answer) != 1 or not 0 <= ord(answer) - 65 < len(options):
                raise BadRecord("answer not an option letter", repr(answer))
            image = _cell(row, "image")
            if image.isdigit() and len(image) < 16:  # a reference to another row's image (one hop)
                image = images.get(image, "")
                if not image or (image.isdigit() and len(image) < 16):
                    raise BadRecord("image refers to a row that has none", _cell(row, "image"))
            if not image:
                raise BadRecord("missing image field")
            cat = _cell(row, "category")
            good.append(Record(f"{kind}:{index}", mc_prompt(question, options, _cell(row, "hint")), None,
                               {"bench": kind, "choices": options, "answer": ord(answer) - 65, "question": question,
                                "category": cat, "l2_category": _cell(row, "l2-category") or _cell(row, "l2_category"),
                                "group": int(index) % 1_000_000, "image_b64": image, "hint": _cell(row, "hint")}))
        except BadRecord as e:
            tally.bad(f"{path} line {n}", *_bad_reason(e))
    tally.good = len(good)
    tally.finish(max_bad_fraction)
    return good


def read_seed(path, images_root=None, max_bad_fraction=0.05):
    """SEED-Bench.json: {"questions": [{"question", "choice_a".."choice_d", "answer": "A".."D", "question_type_id",
    "data_id" (the image file, in images_root), "question_id"}], "question_type": {name: id}}. Video questions
    (data_type "video") are left out and counted on stderr: this project's models see one image."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get("questions"), list):
        raise DataError(f"{path}: no \"questions\" list: not SEED-Bench's JSON")
    names = {v: k for k, v in (obj.get("question_type") or {}).items()}
    folder = images_root or os.path.dirname(os.path.abspath(path))
    tally, good = Tally("SEED-Bench questions", path), []
    questions = [q for q in obj["questions"] if not (isinstance(q, dict) and q.get("data_type") == "video")]
    if len(questions) < len(obj["questions"]):
        print(f"{path}: {len(obj['questions']) - len(questions)} video questions left out", file=sys.stderr)
    for i, q in enumerate(questions):
        tally.total += 1
        try:
            if not isinstance(q, dict):
                raise BadRecord("not an object")
            question = q.get("question")
            if not isinstance(question, str) or not question.strip():
                raise BadRecord("missing question text")
            options = [q.get(f"choice_{c}") for c in "abcd"]
            if not all(isinstance(o, str) and o.strip() for o in options):
                raise BadRecord("missing or empty choice")
            answer = q.get("answer")
            if answer not in ("A", "B", "C", "D"):
                raise BadRecord("answer not an option letter", repr(answer))
            name = q.get("data_id")
            if isinstance(name, str) and not os.path.splitext(name)[1]:
                name = next((name + e for e in IMAGE_EXTS if os.path.isfile(os.path.join(folder, name + e))), name)
            image = _image_file(folder, name)
            qt = q.get("question_type_id")
            options = [o.strip() for o in options]
            good.append(Record(str(q.get("question_id", i)), mc_prompt(question, options), image,
                               {"bench": "seed", "choices": options, "answer": "ABCD".index(answer),
                                "question": question.strip(), "question_type": str(names.get(qt, qt)),
                                "category": str(names.get(qt, qt))}))
        except BadRecord as e:
            tally.bad(f"{path} question {i}", *_bad_reason(e))
    tally.good = len(good)
    tally.finish(max_bad_fraction)
    return good


def parse_bench(spec):
    """'kind:path[::images]' -> (kind, path, images or None); kinds: KINDS (seed_tsv/mmstar/mmbench: TSVs)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise DataError(f"--bench {spec!r}: expected KIND:PATH[::IMAGE_FOLDER], KIND one of {', '.join(KINDS)}")
    path, images = rest.split("::", 1) if "::" in rest else (rest, None)
    if not os.path.exists(path):
        raise DataError(f"--bench {spec!r}: {path} does not exist")
    if images is not None and not os.path.isdir(images):
        raise DataError(f"--bench {spec!r}: image folder {images} does not exist")
    return kind, path, images


def read_bench(spec, max_bad_fraction=0.05):
    """The Records of one --bench spec (parse_bench)."""
    kind, path, images = parse_bench(spec)
    if kind == "pope":
        return read_pope(path, images, max_bad_fraction)
    if kind == "mme":
        return read_mme(path, max_bad_fraction)
    if kind == "seed":
        return read_seed(path, images, max_bad_fraction)
    return read_tsv(path, kind, max_bad_fraction)


def load_bench(spec, size, max_rows=None, seed=0, max_bad_fraction=0.05):
    """(records, uint8 images (M, 3, size, size), image index of each record): each distinct image decoded once
    (POPE asks 6 questions of an image, MME 2). Undecodable images drop their questions, counted like bad rows."""
    key = ("bench", spec, size, max_rows, seed)
    if key in _data:
        return _data[key]
    records = subsample(read_bench(spec, max_bad_fraction), max_rows, seed)
    first = {}
    for r in records:
        first.setdefault(r.image or r.extra["image_b64"], r)
    uniq = list(first.values())
    if uniq[0].image is not None:
        kept, images = load_images(uniq, size, max_bad_fraction)
        at = {r.image: i for i, r in enumerate(kept)}
        keep = [r for r in records if r.image in at]
        index = [at[r.image] for r in keep]
    else:
        decoded, bad = {}, []
        for r in uniq:
            try:
                decoded[r.extra["image_b64"]] = decode_image_bytes(base64.b64decode(r.extra["image_b64"]), size)
            except Exception as e:  # binascii.Error or any of PIL's errors: this image is unusable
                bad.append((f"row {r.id}", "cannot decode base64 image", f"{type(e).__name__}: {e}"))
        report_bad("images", spec, bad, len(uniq), max_bad_fraction)
        if not decoded:
            raise DataError(f"{spec}: none of the {len(uniq)} images decodes")
        at = {k: i for i, k in enumerate(decoded)}
        keep = [r for r in records if r.extra["image_b64"] in at]
        index = [at[r.extra["image_b64"]] for r in keep]
        images = torch.stack(list(decoded.values()))
        for r in keep:
            r.extra.pop("image_b64", None)  # decoded once: the base64 text need not stay in memory
    _data[key] = keep, images, index
    return _data[key]
