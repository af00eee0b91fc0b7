"""Readers of the paper's benchmarks as their authors distribute them (docs/benchmarks.md), used through
benchmarks/load.py (read_bench, load_bench; eval.py --bench): POPE json-lines, MME folders (both layouts),
VLMEvalKit TSVs (multiple choice with options A, B, ...; yes/no like VLMEvalKit's MME.tsv and POPE.tsv) and
SEED-Bench's JSON, all as one Record shape.

    from benchmarks.formats import read_pope
    records = read_pope("coco_pope_random.json", "coco/val2014")
"""
import csv
import json
import os
import sys

from data.record_types import BadRecord, DataError, Record, Tally


# ----------------------------------------------------------------------------- the paper's benchmarks as distributed
# Every reader returns Records of one shape: caption = the prompt a choice continues ("question: ... answer:", as
# benchmarks/qa.py writes its questions), image = the image file (None for a TSV row: its base64 bytes are in
# extra["image_b64"]), extra = {"bench", "choices", "answer" (index), "question"} and the metric's keys ("splits",
# "subtask" + "image_key", "category" / "l2_category" / "group" + "index", "question_type"). POPE's "splits" is a
# list: VLMEvalKit's POPE.tsv stores a question shared by several splits once ("random,popular,adversarial"), and
# its scoring counts that row in each of them; "split" keeps the field as written, for display.
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
                obj = json.loads(raw.decode("utf-8-sig"))  # -sig: a byte-order mark (Windows editors) is no error
                if not isinstance(obj, dict):
                    raise BadRecord("not an object")
                text = obj.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise BadRecord("missing question text")
                answer = _yes_no(obj.get("label"))
                image = _image_file(folder, obj.get("image"))
                good.append(Record(str(obj.get("question_id", n)), PROMPT.format(text.strip()), image,
                                   {"bench": "pope", "split": split, "splits": [split], "choices": YES_NO,
                                    "answer": answer, "question": text.strip()}))
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
                lines = [(n, raw) for n, raw in enumerate(f, 1) if raw.strip()]
            for n, raw in lines:
                tally.total += 1
                try:
                    try:
                        line = raw.decode("utf-8-sig").rstrip("\r\n")
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


OFFSET = 1_000_000  # VLMEvalKit's circular copies of question g are rows g + k * OFFSET, k = 1, 2, ...
YES_NO_KINDS = {"pope": "POPE", "mme": "MME"}  # the only kinds whose questions are yes/no (never by their options)


def pope_splits(field):
    """The POPE splits a row counts in: VLMEvalKit's POPE.tsv writes a question shared by several splits once, its
    category listing them ("random,popular,adversarial"), and its scoring counts it in each."""
    return [s.strip() for s in field.split(",") if s.strip()] or ["all"]


def _tsv_rows(path):
    """(header, [(line number, row)]) of a TSV; a file that is not UTF-8 is refused as a whole, in one line (the
    csv module would raise mid-file, far from any row)."""
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is read through
            reader = csv.DictReader(f, delimiter="\t")
            return reader.fieldnames or [], list(enumerate(reader, 2))  # line numbers count the header
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the TSV as UTF-8") from None


def _unique_indices(path, rows):
    """A duplicated index is refused as a whole: a row whose image refers to it could get either row's image, and
    circular copies (index % OFFSET) could not be told apart."""
    seen, dups = {}, []
    for n, row in rows:
        index = _cell(row, "index")
        key = int(index) if index.lstrip("-").isdigit() else index
        if index and key in seen:
            dups.append(f"{index} (lines {seen[key]} and {n})")
        seen.setdefault(key, n)
    if dups:
        more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
        raise DataError(f"{path}: duplicated index {', '.join(dups[:3])}{more}: each row needs its own index "
                        f"(image references and circular copies go by it)")


def read_tsv(path, kind="tsv", max_bad_fraction=0.05):
    """A VLMEvalKit multiple-choice TSV (MMBench, MMStar, SEEDBench_IMG, ...): columns index, question, optional
    hint, options A, B, ... (empty: absent), answer (a letter), category, l2-category (or l2_category), image
    (base64; a short number: the image of the row with that index). Rows of MMBench's circular copies share a
    group, index % 1e6. Yes/no TSVs (kind pope or mme, no A, B columns; answer Yes/No: VLMEvalKit's MME.tsv,
    POPE.tsv) become two-choice questions; their category is MME's subtask or POPE's splits (pope_splits), and an
    image is known by its image_path or by the index of the row that holds it (MME's acc+ pairs the two questions
    of an image). A multiple-choice TSV given as pope or mme is refused: it has no POPE or MME metric."""
    tally = Tally(f"{kind} questions", path)
    header, rows = _tsv_rows(path)
    tally.total = len(rows)
    if kind in YES_NO_KINDS and "A" in header and "B" in header:
        raise DataError(f"--bench {kind}:{path}: looks like a multiple-choice TSV (option columns A, B, ...), not "
                        f"{YES_NO_KINDS[kind]}'s yes/no questions; give it as mmbench:, mmstar: or tsv:")
    yes_no = kind in YES_NO_KINDS
    missing = [c for c in ("index", "question", "answer", "image") + (() if yes_no else ("A", "B"))
               if c not in header]
    if missing:
        raise DataError(f"{path}: not a VLMEvalKit multiple-choice TSV, no column(s) {', '.join(missing)}")
    _unique_indices(path, rows)
    letters = [c for c in header if len(c) == 1 and c.isupper()]
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
            options = YES_NO if yes_no else options[:n_opt]
            if len(options) < 2:
                raise BadRecord("fewer than 2 options")
            answer = _cell(row, "answer")
            if yes_no:
                answer = chr(65 + _yes_no(answer))
            if len(answer) != 1 or not 0 <= ord(answer) - 65 < len(options):
                raise BadRecord("answer not an option letter", repr(answer))
            image, source = _cell(row, "image"), index
            if image.isdigit() and len(image) < 16:  # a reference to another row's image (one hop)
                source, image = image, images.get(image, "")
                if not image or (image.isdigit() and len(image) < 16):
                    raise BadRecord("image refers to a row that has none", _cell(row, "image"))
            if not image:
                raise BadRecord("missing image field")
            cat = _cell(row, "category")
            image_id = _cell(row, "image_path") or source
            prompt = PROMPT.format(question) if yes_no else mc_prompt(question, options, _cell(row, "hint"))
            good.append(Record(f"{kind}:{index}", prompt, None,
                               {"bench": kind, "choices": options, "answer": ord(answer) - 65, "question": question,
                                "category": cat, "l2_category": _cell(row, "l2-category") or _cell(row, "l2_category"),
                                "index": int(index), "group": int(index) % OFFSET, "image_b64": image,
                                "hint": _cell(row, "hint"), "subtask": cat, "split": cat or "all",
                                "image_id": image_id, "image_key": f"{cat}/{image_id}"}
                               | ({"splits": pope_splits(cat)} if kind == "pope" else {})))
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
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is read through
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
