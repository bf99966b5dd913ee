"""
Part 2-1's leaderboard score, locally: the accuracy of a submission.csv (`id,label`, one row per test id)
against the test labels that data/prepare_news.py writes (News_test_labels.csv, the same format).

    python data/score_news.py submission.csv --labels=data/news/News_test_labels.csv

The last line printed is `accuracy: <value>`; before it, macro-F1 over the classes of the test set.
"""
import csv
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for bleu.py's parser
from bleu import parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
labels = "data/news/News_test_labels.csv"  # the true labels (data/prepare_news.py writes them)
# -----------------------------------------------------------------------------

NUM_CLASSES = 15


def read_labels(path):
    """{id: label} from an `id,label` CSV; anything else stops with one line naming the file and row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:   # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.reader(io.StringIO(f.read())))
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read ({e})") from None
    if not rows or [c.strip() for c in rows[0]] != ["id", "label"]:
        raise SystemExit(f"error: {path}: the first line must be the header id,label")
    result = {}
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        try:
            i, label = (int(c) for c in row)
        except ValueError:
            raise SystemExit(f"error: {path}: line {number}: expected two integers id,label, got {','.join(row)!r}")
        if not 0 <= label < NUM_CLASSES:
            raise SystemExit(f"error: {path}: line {number}: label {label} is outside 0..{NUM_CLASSES - 1}")
        if i in result:
            raise SystemExit(f"error: {path}: line {number}: id {i} appears twice")
        result[i] = label
    if not result:
        raise SystemExit(f"error: {path}: no rows")
    return result


def score(predicted, true):
    """(accuracy, macro-F1) of predicted against true, both {id: label} over the same ids."""
    missing, extra = sorted(set(true) - set(predicted)), sorted(set(predicted) - set(true))
    if missing or extra:
        raise SystemExit(f"error: the submission's ids do not match the labels': missing {missing[:5]}, "
                         f"not in the labels {extra[:5]}")
    pairs = [(predicted[i], true[i]) for i in true]
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    f1s = []
    for c in sorted(set(true.values())):  # the classes of the test set, as textcls.py's validation counts them
        tp = sum(p == c and t == c for p, t in pairs)
        fp = sum(p == c and t != c for p, t in pairs)
        fn = sum(p != c and t == c for p, t in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return accuracy, sum(f1s) / len(f1s)


if __name__ == "__main__":
    paths = parse_overrides(sys.argv[1:], globals())
    if len(paths) != 1:
        raise SystemExit("error: usage: python data/score_news.py submission.csv [--labels=News_test_labels.csv]")
    accuracy, macro_f1 = score(read_labels(paths[0]), read_labels(labels))
    print(f"macro-F1: {macro_f1:.4f}")
    print(f"accuracy: {accuracy:.4f}")
