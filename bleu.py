"""
Corpus BLEU written by hand (Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine
Translation"), giving the same numbers as sacrebleu, the standard tool, and, in its `nltk` mode, the same as
nltk.translate.bleu_score.corpus_bleu, which course scoring scripts often use.

    python bleu.py hyps.txt refs.txt [refs2.txt ...]      # plain text, one segment a line
    python bleu.py submission.json references.json       # the homework's JSON, matched by idx
    python bleu.py hyps.txt refs.txt --mode=nltk --nltk_smoothing=1
    python bleu.py --bench --data_dir=data/bleu           # speed beside sacrebleu

The last line printed is the score in sacrebleu's format (in nltk mode too); for sys1 of data/bleu:
    BLEU = 19.11 56.5/25.7/13.1/7.0 (BP = 1.000 ratio = 1.065 hyp_len = 67248 ref_len = 63138)
As a library (caption.py does this): corpus_bleu(hypotheses, [references_1, references_2]).score, the references
in sacrebleu's layout (one list per reference set); inside, every function takes the references of each segment.
"""
import ast
import difflib
import io
import json
import math
import re
import sys
import timeit
from collections import Counter
from dataclasses import dataclass
from tokenize import COMMENT, generate_tokens

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
max_order = 4          # longest n-gram counted
smooth = "exp"         # sacrebleu mode: exp | floor | add-k | none
smooth_value = -1.0    # floor's and add-k's value; -1 = their defaults (0.1 and 1)
tokenize = "13a"       # 13a (WMT's mteval-v13a rules) | none (split on whitespace only)
lowercase = False      # lowercase hypotheses and references before tokenizing (sacrebleu's -lc)
mode = "sacrebleu"     # sacrebleu | nltk (nltk's corpus_bleu: whitespace tokens, its own counting, nltk_smoothing)
nltk_smoothing = 0     # nltk mode: SmoothingFunction().method0 .. method7
bench = False          # time corpus_bleu beside sacrebleu over the files in data_dir
data_dir = "data/bleu" # --bench: the IWSLT 2010 reference and two system outputs (data/README.md)
# -----------------------------------------------------------------------------

# values with a fixed set of choices or a range, checked before any work (see parse_overrides)
CHECKS = {"max_order": (lambda v: v >= 1, "an integer >= 1"), "smooth": ("exp", "floor", "add-k", "none"),
          "tokenize": ("13a", "none"), "mode": ("sacrebleu", "nltk"), "nltk_smoothing": tuple(range(8))}


# ----------------------------------------------------------------------------- tokenizing
# mteval-v13a.pl, the script WMT scored with for years, splits punctuation off words before counting, so
# that "cat." and "cat" match. Its rules, in order:
#   1. drop "<skipped>", join words broken across lines by "-\n", unescape &quot; &amp; &lt; &gt;
#   2. put spaces around every ASCII symbol except . , ' and -  ("(a+b)" -> " ( a + b ) ")
#   3. split . and , off unless they sit between digits ("3.14" and "5,000" stay whole, "end." splits)
#   4. split - off after a digit ("1990-2000" -> "1990 - 2000"; "e-mail" stays whole)
def tokenize_13a(line):
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    # rule 2: [!-&(-+/:-@\[-`{-~] is ASCII ! " # $ % &  ( ) * +  /  : ; < = > ? @  [ \ ] ^ _ `  { | } ~
    line = re.sub(r"([!-&(-+/:-@\[-`{-~])", r" \1 ", f" {line} ")  # the padding lets rule 3 see both ends
    line = re.sub(r"([^0-9])([.,])", r"\1 \2 ", line)   # rule 3: a period or comma after a non-digit,
    line = re.sub(r"([.,])([^0-9])", r" \1 \2", line)   # or before a non-digit
    line = re.sub(r"([0-9])(-)", r"\1 \2 ", line)       # rule 4
    return line.split()


def to_tokens(segment, tokenize="13a", lowercase=False):
    """The token list of one segment, as sacrebleu prepares it: lowercased if asked, trailing whitespace
    stripped, then tokenized by `tokenize` (13a, or none: whitespace only, nltk's convention)."""
    if not isinstance(segment, str):
        raise TypeError(f"a segment must be a str, got {type(segment).__name__}: {segment!r}")
    segment = segment.lower() if lowercase else segment
    return tokenize_13a(segment.rstrip()) if tokenize == "13a" else segment.split()


# ----------------------------------------------------------------------------- n-gram statistics
def ngram_counts(tokens, max_order):
    """Counter of all n-grams of orders 1..max_order of a token list, each a tuple:
    ngram_counts("a b a".split(), 2) -> {(a,): 2, (b,): 1, (a, b): 1, (b, a): 1}."""
    counts = Counter()
    for n in range(1, max_order + 1):
        counts.update(zip(*(tokens[i:] for i in range(n))))  # zip of n shifted copies yields the n-grams
    return counts


def segment_stats(hyp_tokens, refs_tokens, max_order=4):
    """The counts BLEU is computed from (sacrebleu's "sufficient statistics") of one segment:
    (hyp_len c, ref_len r, matches[n-1], totals[n-1]). Clipping (Papineni et al., section 2.1, "modified n-gram
    precision") counts a hypothesis n-gram at most as often as it appears in any single reference: "the the the"
    against "the cat" matches 1 unigram, not 3. r is the reference length closest to c, the "best match length"
    (section 2.2.2); a tie goes to the shorter reference, as in mteval-v13a and sacrebleu (the paper does not say)."""
    max_ref_counts = ngram_counts(refs_tokens[0], max_order)
    for ref in refs_tokens[1:]:
        max_ref_counts |= ngram_counts(ref, max_order)   # Counter's |: the larger of the two counts of each n-gram
    matches = [0] * max_order
    for ngram, count in ngram_counts(hyp_tokens, max_order).items():
        if ngram in max_ref_counts:
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    ref_len = min((len(r) for r in refs_tokens), key=lambda length: (abs(length - len(hyp_tokens)), length))
    # totals: a hypothesis of c tokens holds c - n + 1 n-grams of order n
    return len(hyp_tokens), ref_len, matches, [max(0, len(hyp_tokens) - n + 1) for n in range(1, max_order + 1)]


def corpus_stats(hypotheses, refs_per_segment, max_order=4, tokenize="13a", lowercase=False):
    """The corpus' counts (hyp_len, ref_len, matches, totals): each segment's summed. BLEU pools the counts of all
    segments and divides once (Papineni et al., section 2.1.1); it does not average segment scores. Also nltk's
    denominators: each segment adds max(1, its count) (see the NLTK convention below)."""
    hyp_len, ref_len, matches, totals, nltk_totals = 0, 0, [0] * max_order, [0] * max_order, [0] * max_order
    for hypothesis, refs in zip(hypotheses, refs_per_segment):
        refs_tokens = [to_tokens(t, tokenize, lowercase) for t in refs]
        c, r, m, t = segment_stats(to_tokens(hypothesis, tokenize, lowercase), refs_tokens, max_order)  # one segment's
        hyp_len, ref_len = hyp_len + c, ref_len + r
        matches = [a + b for a, b in zip(matches, m)]
        totals = [a + b for a, b in zip(totals, t)]
        nltk_totals = [a + max(1, b) for a, b in zip(nltk_totals, t)]
    return hyp_len, ref_len, matches, totals, nltk_totals


# ----------------------------------------------------------------------------- corpus BLEU
@dataclass
class BLEUScore:
    """The score and the numbers it was computed from; str() is sacrebleu's one-line format."""
    score: float          # in percent, 0..100
    precisions: list      # the n-gram precisions used, in percent (after smoothing)
    bp: float             # brevity penalty
    hyp_len: int
    ref_len: int
    matches: list         # clipped n-gram matches per order, summed over the corpus (before smoothing)
    totals: list          # hypothesis n-grams per order, summed over the corpus

    def __str__(self):  # sacrebleu's format
        ratio = self.hyp_len / self.ref_len if self.ref_len else 0.0
        return (f"BLEU = {self.score:.2f} {'/'.join(f'{p:.1f}' for p in self.precisions)} (BP = {self.bp:.3f} "
                f"ratio = {ratio:.3f} hyp_len = {self.hyp_len:d} ref_len = {self.ref_len:d})")


def brevity_penalty(hyp_len, ref_len):
    """BP = 1 if c > r else exp(1 - r/c) (Papineni et al., section 2.2.2; the formula in section 2.3), with c
    and r summed over the corpus: precision alone would reward a hypothesis that says little."""
    if hyp_len >= ref_len:
        return 1.0
    return math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0


def bleu_from_stats(stats, smooth="exp", smooth_value=None, effective_order=False):
    """BLEU = BP * exp(sum_n log(p_n) / N) (Papineni et al., section 2.3, uniform weights 1/N): the geometric
    mean of the n-gram precisions p_n = matches/totals (section 2.1.1) times the brevity penalty. A p_n of 0
    makes it 0 unless smoothed, as `smooth` says, sacrebleu's methods (numbered as in Chen & Cherry 2014, "A
    Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU"):
      exp   (method 3, mteval-v13a's; the default): the k-th order with no match gets 1 / (2^k * total)
      floor (method 1): an order with no match gets smooth_value / total  (default 0.1)
      add-k (method 2): orders 2..N get smooth_value added to matches and totals  (default 1)
      none : no smoothing, the p_n stays 0
    effective_order (for single sentences) averages only over the orders that have n-grams at all (add-k's
    included: a corpus of 2-word hypotheses has no 3-grams). Precisions are in percent, as in sacrebleu."""
    if smooth not in ("exp", "floor", "add-k", "none"):
        raise ValueError(f"unknown smoothing {smooth!r} (exp, floor, add-k or none)")
    hyp_len, ref_len, matches, totals = stats[:4]
    bp = brevity_penalty(hyp_len, ref_len)
    if not any(matches):  # nothing matched at all: BLEU is 0 whatever the smoothing
        return BLEUScore(0.0, [0.0] * len(matches), bp, hyp_len, ref_len, matches, totals)
    # smooth_value when none is given: sacrebleu's defaults for the two methods that take one
    k = {"floor": 0.1, "add-k": 1.0}.get(smooth) if smooth_value is None or smooth_value < 0 else smooth_value
    matched = matches[:1] + [m + k for m in matches[1:]] if smooth == "add-k" else matches
    counted = totals[:1] + [t + k for t in totals[1:]] if smooth == "add-k" else totals
    orders_with_ngrams = len([t for t in counted if t > 0])   # totals never grow with the order
    precisions = [100.0 * m / t if m > 0 else 0.0 for m, t in zip(matched, counted)]   # m > 0 only where t > 0
    for halvings, n in enumerate([n for n in range(orders_with_ngrams) if matched[n] == 0], 1):
        if smooth in ("exp", "floor"):   # exp: the k-th empty order 1 / (2^k * total); floor: smooth_value / total
            precisions[n] = 100.0 / (2 ** halvings * counted[n]) if smooth == "exp" else 100.0 * k / counted[n]
    orders_used = orders_with_ngrams if effective_order else len(matches)
    # log(0) is -infinity; like mteval, use a huge negative number so that the score is exactly 0.0
    log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions[:orders_used]) / orders_used
    return BLEUScore(bp * math.exp(log_mean), precisions, bp, hyp_len, ref_len, matches, totals)


def per_segment(hypotheses, references):
    """sacrebleu's layout of the references (one list per reference set, each aligned with the hypotheses),
    checked, as the one layout used inside: the list of references of each segment."""
    for i, reference_set in enumerate(references if references and not isinstance(references, str) else [""]):
        if isinstance(reference_set, str) or isinstance(hypotheses, str) or len(reference_set) != len(hypotheses):
            raise ValueError(f"reference set {i + 1} has {len(reference_set)} segments, the hypotheses "
                             f"{len(hypotheses)} (references: a list of reference sets, as in sacrebleu)")
    return [list(refs) for refs in zip(*references)]


def corpus_bleu(hypotheses, references, max_order=4, smooth="exp", smooth_value=None, tokenize="13a",
                lowercase=False, effective_order=False):
    """BLEU of a list of hypothesis strings against references given as sacrebleu takes them: a list of
    reference sets, each a list of strings aligned with the hypotheses. Same defaults as sacrebleu.corpus_bleu."""
    stats = corpus_stats(hypotheses, per_segment(hypotheses, references), max_order, tokenize, lowercase)
    return bleu_from_stats(stats, smooth, smooth_value, effective_order)


def sentence_bleu(hypothesis, references, max_order=4, smooth="exp", smooth_value=None, tokenize="13a",
                  lowercase=False, effective_order=True):
    """BLEU of one hypothesis against its references (a list of strings). effective_order is on by
    default, as in sacrebleu.sentence_bleu: a 3-word sentence has no 4-grams and should not score 0."""
    return corpus_bleu([hypothesis], [[r] for r in references], max_order, smooth, smooth_value, tokenize,
                       lowercase, effective_order)


# ----------------------------------------------------------------------------- the NLTK convention (--mode=nltk)
# nltk.translate.bleu_score.corpus_bleu differs from sacrebleu in three ways:
#   1. tokens: it takes token lists; scoring scripts usually make them with str.split(), no 13a rules.
#   2. counting: each segment adds max(1, its n-gram count) to the denominator of p_n, so a hypothesis
#      shorter than n still counts one n-gram that cannot match; sacrebleu adds its true count, 0.
#   3. zero precisions: without smoothing (method0) a p_n of 0 becomes the smallest float instead of
#      0, and the score is a tiny number, not 0.0; its smoothing functions are not sacrebleu's either.
#      They see the corpus' total hypothesis length but only the LAST segment's tokens (methods 5-7).
# Worked example, one reference each: "a b c d e" -> "a b c d e" and "x" -> "x y".
#   sacrebleu: n-grams 6/4/3/2, all matched, p = 100/100/100/100, BP = exp(1 - 7/6) = 0.846 -> 84.65
#   nltk     : "x" adds 1 to each denominator: p = 6/6, 4/5, 3/4, 2/3, mean 0.795 * 0.846 -> 67.32
NLTK_EPSILON, NLTK_ALPHA, NLTK_K = 0.1, 5, 5  # SmoothingFunction's defaults


def nltk_bleu(hypotheses, refs, max_order=4, smoothing=0, lowercase=False):
    """nltk's corpus_bleu(list_of_references, hypotheses, smoothing_function=SmoothingFunction().method<k>)
    with uniform weights and whitespace tokens, refs the list of references of each segment, as a BLEUScore in
    percent, like corpus_bleu. The smoothing methods
    are Chen & Cherry 2014's, on the corpus precisions p_n = matches / denominators, one block each."""
    if smoothing not in range(8):
        raise ValueError(f"nltk smoothing must be 0..7, got {smoothing}")
    hyp_len, ref_len, matches, totals, denominators = corpus_stats(hypotheses, refs, max_order, "none", lowercase)
    bp = brevity_penalty(hyp_len, ref_len)
    if matches[0] == 0:
        return BLEUScore(0.0, [0.0] * max_order, bp, hyp_len, ref_len, matches, totals)
    # what nltk's smoothing functions see as "the hypothesis" and its references: the last segment's tokens
    last_hyp_tokens = to_tokens(hypotheses[-1], "none", lowercase)
    last_refs_tokens = [to_tokens(r, "none", lowercase) for r in refs[-1]]
    p = [m / d for m, d in zip(matches, denominators)]
    zeros = [i for i, m in enumerate(matches) if m == 0]   # the orders with no match
    if smoothing == 0:    # no smoothing: a zero precision becomes the smallest positive float
        p = [sys.float_info.min if i in zeros else p_n for i, p_n in enumerate(p)]
    if smoothing == 1:    # add epsilon to zero match counts
        p = [NLTK_EPSILON / denominators[i] if i in zeros else p_n for i, p_n in enumerate(p)]
    if smoothing == 2:    # add 1 to matches and denominators of orders 2..N (Lin & Och 2004)
        p = [p[0]] + [(m + 1) / (d + 1) for m, d in zip(matches[1:], denominators[1:])]
    if smoothing == 3:    # the k-th order with no match gets 1 / (2^k * denominator), like sacrebleu's exp
        for k, i in enumerate(zeros, 1):
            p[i] = 1 / (2 ** k * denominators[i])
    # method 4: like method 3, larger for longer hypotheses: the k-th order with no match gets
    # 1 / (2^k * K / ln(hyp_len)) / denominator (hypotheses longer than one token only)
    if smoothing in (4, 7):   # method 7 is method 4, then method 5 (Chen & Cherry 2014, section 4)
        for k, i in enumerate(zeros if hyp_len > 1 else [], 1):
            p[i] = 1 / (2 ** k * NLTK_K / math.log(hyp_len)) / denominators[i]
    # method 5: each precision averaged with its neighbours, the one before already averaged; the one after the
    # last order is the 5-gram precision of the last segment alone (nltk takes order 5 whatever max_order is)
    if smoothing in (5, 7):
        _, _, last_matches, last_totals = segment_stats(last_hyp_tokens, last_refs_tokens, 5)
        neighbours = p + [last_matches[4] / max(1, last_totals[4])]
        previous = p[0] + 1
        for i in range(len(p)):
            p[i] = (previous + p[i] + neighbours[i + 1]) / 3
            previous = p[i]
    if smoothing == 6:    # interpolate with a prior p_{n-1}^2 / p_{n-2} (Gao & He 2013); needs p_3 > 0
        if len(p) < 3 or not matches[2]:
            raise ValueError("nltk smoothing 6 needs max_order >= 3 and a non-zero trigram precision")
        for i in range(2, len(p)):
            prior = 0 if p[i - 2] == 0 else p[i - 1] ** 2 / p[i - 2]
            # the denominator holds the number of n-grams of order i+1 in the last hypothesis
            p[i] = (matches[i] + NLTK_ALPHA * prior) / (max(0, len(last_hyp_tokens) - i) + NLTK_ALPHA)
    # nltk leaves out a precision that is still 0 (method 4 on a one-token corpus; method 0 made its zeros tiny)
    score = bp * math.exp(math.fsum(math.log(p_n) / max_order for p_n in p if p_n > 0))
    return BLEUScore(100 * score, [100 * p_n for p_n in p], bp, hyp_len, ref_len, matches, totals)


def nltk_corpus_bleu(hypotheses, references, max_order=4, smoothing=0, lowercase=False):
    """nltk_bleu with the references in sacrebleu's layout, like corpus_bleu."""
    return nltk_bleu(hypotheses, per_segment(hypotheses, references), max_order, smoothing, lowercase)


# ----------------------------------------------------------------------------- reading the inputs
def read_lines(path):
    """The lines of a UTF-8 text file, without their newlines (a final newline does not add an empty line)."""
    data = open(path, "rb").read()
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {data[:e.start].count(10) + 1}: invalid UTF-8 (byte {data[e.start]:#04x})")
    if not "".join(lines).strip():
        raise ValueError(f"{path}: the file is empty")
    return lines[:-1] if lines[-1] == "" else lines


def read_by_idx(path, field, alt=None):
    """{idx: record[field]} (or record[alt]) of a JSON array of objects {"idx", field}."""
    try:
        records = json.loads("\n".join(read_lines(path)))   # read_lines: the file is UTF-8 and not empty
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    by_idx = {}
    for row, record in enumerate(records if isinstance(records, list) and records else [None]):
        if not isinstance(record, dict) or type(record.get("idx")) not in (int, str) or not {field, alt} & set(record):
            raise ValueError(f"{path}: record {row}: expected an object with 'idx' (a number or text) and {field!r}")
        if record["idx"] in by_idx:
            raise ValueError(f"{path}: idx {record['idx']} appears twice")
        by_idx[record["idx"]] = record.get(field, record.get(alt))
    return by_idx


def read_json_pair(submission_path, references_path):
    """The homework's files: [{"idx", "output"}] against [{"idx", "references": [...]}] or [{"idx", "caption"}].
    Returns hypotheses and the references of each segment, in the references' idx order."""
    outputs, refs = read_by_idx(submission_path, "output"), read_by_idx(references_path, "references", "caption")
    missing = [i for i in refs if i not in outputs]
    if missing or len(outputs) != len(refs):
        raise ValueError(f"{submission_path}: idx do not match {references_path}: missing {missing[:5]}, "
                         f"not in the references {[i for i in outputs if i not in refs][:5]}")
    for idx, ref in refs.items():
        refs[idx] = [ref] if isinstance(ref, str) else ref if isinstance(ref, list) else []   # [] is refused below
        if not isinstance(outputs[idx], str) or not refs[idx] or not all(isinstance(r, str) for r in refs[idx]):
            raise ValueError(f"{submission_path}: idx {idx}: 'output' must be a string and the references in "
                             f"{references_path} strings")
    return [outputs[idx] for idx in refs], list(refs.values())


def main(paths):
    """BLEU of the first file against the others, in the configured mode (or --bench); one line on bad input.
    Plain text files hold one segment a line, the hypotheses in the first, a set of references in each other."""
    if bench:
        return run_bench(data_dir)
    try:
        if len(paths) < 2 or (paths[0].endswith(".json") and len(paths) != 2):
            raise ValueError("usage: python bleu.py HYP REF [REF ...]  or  python bleu.py submission.json refs.json")
        if paths[0].endswith(".json"):
            hypotheses, refs = read_json_pair(paths[0], paths[1])
        else:
            hypotheses, references = read_lines(paths[0]), [read_lines(path) for path in paths[1:]]
            for path, reference_set in zip(paths[1:], references):
                if len(reference_set) != len(hypotheses):
                    raise ValueError(f"{path} has {len(reference_set)} lines, {paths[0]} has {len(hypotheses)}")
            refs = [list(segment_refs) for segment_refs in zip(*references)]
        if mode == "nltk":
            print(nltk_bleu(hypotheses, refs, max_order, nltk_smoothing, lowercase))
        else:
            print(bleu_from_stats(corpus_stats(hypotheses, refs, max_order, tokenize, lowercase), smooth, smooth_value))
    except (ValueError, TypeError, OSError) as e:
        sys.exit(f"error: {e}")


# --- extras (not the lesson) ---
def run_bench(data_dir, repeats=3):
    """Prints the seconds to score each system output of data_dir (2,489 lines), ours beside sacrebleu, best of
    `repeats`, and both scores."""
    import sacrebleu  # a test-and-benchmark oracle only (requirements-dev.txt)
    references = [read_lines(f"{data_dir}/refs.test2010.lc.tok.en.0")]
    # force=True: these files are tokenized already; it skips sacrebleu's check for that, and its warning
    scorers = {"bleu.py": corpus_bleu, "sacrebleu": lambda hyps, refs: sacrebleu.corpus_bleu(hyps, refs, force=True)}
    for system in ("baseline", "sys1"):
        hypotheses = read_lines(f"{data_dir}/hyps.lc.tok.en.{system}.opt0")
        for name, score in scorers.items():
            seconds = min(timeit.repeat(lambda: score(hypotheses, references), number=1, repeat=repeats))
            print(f"{system:8s} {name:9s} {seconds:.3f} s  BLEU = {score(hypotheses, references).score:.10f}")


# ----------------------------------------------------------------------------- command line
# nanoGPT's configurator, checked: --name=value overrides a constant of the configuration block at the top. The same
# lines stand in tokenizer.py, fid.py and bleu.py (a test keeps them identical), so that every script is one file.
def config_block(path):
    """[(name, comment)] for each line between '# configuration' and the next '# ---' line of a script's source:
    `name = value  # comment` gives its name, a comment line alone is a heading, (None, heading)."""
    block = open(path, encoding="utf-8").read().split("\n# configuration", 1)[1].split("\n# ---", 1)[0]
    entries = []
    for line in block.splitlines()[1:]:
        tokens = list(generate_tokens(io.StringIO(line).readline))  # Python's own reading of the line
        comment = next((t.string[1:].strip() for t in tokens if t.type == COMMENT), "")
        entries.append((tokens[0].string if tokens[1].string == "=" else None, comment))
    return entries


def parse_value(flag, text, default):
    """text as the type of the default: True/true/1 or False/false/0 for a bool, a Python literal for a number
    (an int is fine where a float is expected), anything for a string (a quoted one is unquoted)."""
    if isinstance(default, bool) and text in ("True", "true", "1", "False", "false", "0"):
        return text in ("True", "true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, str):
        return value if isinstance(value, str) else text
    if type(value) is not type(default) and (type(default), type(value)) != (float, int):
        kind = {bool: "True or False", int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
        raise SystemExit(f"error: {flag} takes {kind} (like {default!r}), got {text!r}")
    return type(default)(value)


def parse_overrides(argv, config, checks=None):
    """Set config[name] (a script's globals()) for every --name=value in argv and return the other arguments.
    -h/--help prints the docstring and every constant with the value a run would use, then exits.
    checks: {name: allowed values, or (predicate, "what it accepts")}, tested after the overrides so that an edited
    constant is checked too. Every mistake stops with one line naming the flag, before any work starts."""
    entries = config_block(config["__file__"])
    names = [name for name, _ in entries if name]
    positional = [arg for arg in argv if not arg.startswith("--") and arg != "-h"]
    for name, has_value, text in [arg[2:].partition("=") for arg in argv if arg.startswith("--") and arg != "--help"]:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean --{close[0]}?" if close else "--help lists the options"
            raise SystemExit(f"error: unknown option --{name} ({hint})")
        if not has_value and not isinstance(config[name], bool):
            raise SystemExit(f"error: --{name} needs a value: --{name}=VALUE (now {config[name]!r})")
        config[name] = parse_value(f"--{name}", text, config[name]) if has_value else True
        print(f"overriding: {name} = {config[name]!r}")
    if "-h" in argv or "--help" in argv:
        print(config["__doc__"].strip() + "\n\noptions (--name=value; a bare --name sets a bool to True):")
        for name, comment in entries:
            print(f"  {name} = {config[name]!r}".ljust(40) + f"# {comment}" if name else f"\n  {comment}")
        raise SystemExit(0)
    for name, rule in (checks or {}).items():
        if callable(rule[0]) and not rule[0](config[name]):
            raise SystemExit(f"error: --{name} must be {rule[1]}, got {config[name]!r}")
        if not callable(rule[0]) and config[name] not in rule:
            raise SystemExit(f"error: --{name} must be one of {', '.join(map(repr, rule))}, got {config[name]!r}")
    return positional


if __name__ == "__main__":
    main(parse_overrides(sys.argv[1:], globals(), CHECKS))
