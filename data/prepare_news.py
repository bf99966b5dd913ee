"""
Part 2-1's files from the public original: the HuffPost "News Category Dataset" by Rishabh Misra (v3, 2022;
v2 works too), JSON lines with `link, headline, category, short_description, authors, date`, to the homework's
News_train.json, News_test.json (no labels) and sample_submission.csv, plus News_test_labels.csv, the hidden
test labels, so that a submission can be scored locally (data/score_news.py).

    python data/prepare_news.py --source=News_Category_Dataset_v3.json --out_dir=data/news
    python data/score_news.py submission.csv --labels=data/news/News_test_labels.csv

`--source` is the file as downloaded (or Kaggle's zip holding it). Records of the homework's 15 categories are
kept (label ids POLITICS 0 ... PARENTS 14), every other category is dropped; the rest is shuffled with `seed`,
the first `n_test` become the test set and the next `n_train` (0 = all the rest) the training set, each with
ids 0, 1, 2, ... The files are written exactly as the homework's are (a JSON array, indent 1, UTF-8; CSV with
CRLF line ends), and the same seed gives the same bytes.
"""
import json
import os
import random
import sys
import zipfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for bleu.py's parser
from bleu import parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
source = "News_Category_Dataset_v3.json"  # the original: JSON lines, or Kaggle's zip holding it
out_dir = "data/news"
n_test = 1000           # test records; their labels go to News_test_labels.csv
n_train = 0             # training records after them; 0 = all the rest (the homework's file has 137,122)
seed = 1337             # the shuffle before the split
# -----------------------------------------------------------------------------

# The homework's label ids: the 15 largest categories of v3, largest first.
LABELS = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING", "HEALTHY LIVING",
          "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS", "BLACK VOICES", "HOME & LIVING", "PARENTS"]
# Other spellings of those 15 (case and spacing are normalised first: "Style & Beauty" is STYLE & BEAUTY).
# PARENTS and PARENTING, STYLE and STYLE & BEAUTY are different categories in the original, not spellings.
VARIANTS = {"STYLE AND BEAUTY": "STYLE & BEAUTY", "FOOD AND DRINK": "FOOD & DRINK",
            "HOME AND LIVING": "HOME & LIVING", "HEALTHY-LIVING": "HEALTHY LIVING", "HEALTHYLIVING": "HEALTHY LIVING",
            "QUEERVOICES": "QUEER VOICES", "BLACKVOICES": "BLACK VOICES"}
LABEL_OF = {**{name: i for i, name in enumerate(LABELS)}, **{v: LABELS.index(name) for v, name in VARIANTS.items()}}
# The other categories of v2 and v3, dropped; a category in neither list is dropped too, with a note.
OTHER_CATEGORIES = {"THE WORLDPOST", "WORLDPOST", "WEDDINGS", "WOMEN", "CRIME", "IMPACT", "DIVORCE", "WORLD NEWS",
                    "MEDIA", "WEIRD NEWS", "GREEN", "RELIGION", "STYLE", "SCIENCE", "TECH", "TASTE", "MONEY", "ARTS",
                    "ENVIRONMENT", "FIFTY", "GOOD NEWS", "U.S. NEWS", "ARTS & CULTURE", "CULTURE & ARTS", "COLLEGE",
                    "LATINO VOICES", "EDUCATION"}
FIELDS = ("headline", "short_description", "category")


# ----------------------------------------------------------------------------- reading the original
def read_source(path):
    """The original's text, from the file itself or from the one .json file inside a zip."""
    name, is_zip = os.path.basename(path), zipfile.is_zipfile(path)
    if name.lower().endswith(".zip") and not is_zip:
        raise SystemExit(f"error: {path}: not a complete zip (a download cut short?): download it again")
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:   # a zip re-packed on a Mac also holds __MACOSX/._*.json
                members = [m for m in archive.namelist() if m.endswith(".json") and "__MACOSX/" not in m
                           and not os.path.basename(m).startswith("._")]
                if len(members) != 1:
                    raise SystemExit(f"error: {name}: expected one .json file in the zip, found {members}")
                data = archive.read(members[0])
                name = f"{name}/{members[0]}"
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot read ({e.strerror})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:   # damaged inside: a bad CRC or deflate stream
        raise SystemExit(f"error: {path}: a damaged zip ({type(e).__name__}: {e}): download it again") from None
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {name}: not UTF-8 text (byte {e.start}): expected News_Category_Dataset_v3.json")


def parse_records(name, text):
    """[(headline, short_description, category)] from JSON lines (a JSON array of the same objects works too).
    A line that is not such an object stops with one line naming it."""
    if text.lstrip().startswith("["):
        try:
            objects = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {name}: invalid JSON at line {e.lineno}: {e.msg}") from None
        items = [(f"record {i}", obj) for i, obj in enumerate(objects)]
    else:
        items = []
        for number, line in enumerate(text.split("\n"), 1):   # not splitlines(): U+2028 may sit inside a string
            if line.strip():
                try:
                    items.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {name}: line {number}: not a JSON object ({e.msg}): expected the "
                                     f"original's JSON lines") from None
    if not items:
        raise SystemExit(f"error: {name}: no records")
    records = []
    for where, obj in items:
        if not isinstance(obj, dict):
            raise SystemExit(f"error: {name}: {where}: expected an object, got {type(obj).__name__}")
        for field in FIELDS:
            if field not in obj:
                hint = (": this is the homework's file, give the original News_Category_Dataset_v3.json"
                        if "label" in obj else "")
                raise SystemExit(f"error: {name}: {where}: missing field '{field}'{hint}")
            if not isinstance(obj[field], str):
                raise SystemExit(f"error: {name}: {where}: field '{field}' must be a string, got {obj[field]!r}")
        records.append(tuple(obj[field] for field in FIELDS))
    return records


def label_records(records):
    """[{headline, short_description, label}] of the 15 categories, in file order; a count of the dropped ones."""
    kept, dropped = [], {}
    for headline, description, category in records:
        key = " ".join(category.upper().split())
        if key in LABEL_OF:
            kept.append({"headline": headline.strip(), "short_description": description.strip(),
                         "label": LABEL_OF[key]})
        else:
            dropped[category] = dropped.get(category, 0) + 1
    return kept, dropped


# ----------------------------------------------------------------------------- the split and the files
def split(kept, n_test, n_train, seed):
    """Seeded shuffle, then test = the first n_test, train = the next n_train (0 = the rest); ids 0, 1, ..."""
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    want = n_test + (n_train or 1)
    if want > len(kept):
        raise SystemExit(f"error: --n_test={n_test} and --n_train={n_train} need {want} records, the source has "
                         f"{len(kept)} in the 15 categories")
    test = [kept[i] for i in order[:n_test]]
    train = [kept[i] for i in order[n_test:n_test + n_train if n_train else None]]
    train = [{"id": i, **r} for i, r in enumerate(train)]
    test = [{"id": i, **r} for i, r in enumerate(test)]
    return train, test


def json_bytes(rows):
    """A JSON array with indent 1, non-ASCII characters as they are, no final newline: the homework's layout."""
    return json.dumps(rows, indent=1, ensure_ascii=False).encode("utf-8")


def csv_bytes(rows):
    """`id,label` with CRLF line ends, as the homework's sample_submission.csv."""
    return "".join(f"{a},{b}\r\n" for a, b in [("id", "label")] + rows).encode()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def main():
    if not os.path.isfile(source):
        raise SystemExit(f"error: {source}: " + ("a folder: give the file News_Category_Dataset_v3.json itself"
                                                 if os.path.isdir(source) else "no such file"))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:   # a file of that name, or an empty --out_dir
        raise SystemExit(f"error: --out_dir={out_dir}: cannot make the folder ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: {out_dir}: not writable")
    name, text = read_source(source)
    records = parse_records(name, text)
    kept, dropped = label_records(records)
    print(f"read {len(records):,} records from {name}; {len(kept):,} in the homework's 15 categories")
    if not kept:
        raise SystemExit(f"error: {name}: none of its categories is one of the homework's 15 ({LABELS[0]}, ...): "
                         f"expected News_Category_Dataset_v3.json")
    if dropped:
        print("dropped: " + ", ".join(f"{c} {n:,}" for c, n in sorted(dropped.items(), key=lambda kv: -kv[1])))
    unknown = sorted(c for c in dropped if " ".join(c.upper().split()) not in OTHER_CATEGORIES)
    if unknown:
        print(f"note: categories in neither the 15 nor v3's others, dropped too: {', '.join(unknown)}")
    train, test = split(kept, n_test, n_train, seed)
    outputs = {
        "News_train.json": json_bytes(train),
        "News_test.json": json_bytes([{k: r[k] for k in ("id", "headline", "short_description")} for r in test]),
        "sample_submission.csv": csv_bytes([(r["id"], 0) for r in test]),
        "News_test_labels.csv": csv_bytes([(r["id"], r["label"]) for r in test]),
    }
    for filename, data in outputs.items():
        write_atomic(os.path.join(out_dir, filename), data)
    print(f"wrote {len(train):,} training and {len(test):,} test records to {out_dir}/ (News_train.json, "
          f"News_test.json, sample_submission.csv, News_test_labels.csv)")
    print(f"next: python textcls.py --train --data_dir={out_dir}; then score a submission with "
          f"python data/score_news.py submission.csv --labels={out_dir}/News_test_labels.csv")


if __name__ == "__main__":
    if parse_overrides(sys.argv[1:], globals(), {
            "n_test": (lambda v: v >= 1, "an integer >= 1"), "n_train": (lambda v: v >= 0, "an integer >= 0")}):
        raise SystemExit("error: no positional arguments: use --source=FILE --out_dir=DIR (--help lists the options)")
    main()
