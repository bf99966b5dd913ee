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

As a library (caption.py does this):
    from bleu import corpus_bleu
    result = corpus_bleu(hypotheses, [references_1, references_2])   # sacrebleu's layout: one list per reference set
    print(result.score, result)
"""
import ast
import difflib
import io
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from tokenize import COMMENT, generate_tokens
from typing import NamedTuple

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
CHECKS = {
    "max_order": (lambda v: v >= 1, "an integer >= 1"), "smooth": ("exp", "floor", "add-k", "none"),
    "tokenize": ("13a", "none"), "mode": ("sacrebleu", "nltk"), "nltk_smoothing": tuple(range(8))
}
# smooth_value when none is given: sacrebleu's defaults for the two methods that take one
SMOOTH_DEFAULTS = {"floor": 0.1, "add-k": 1.0}


# ----------------------------------------------------------------------------- tokenizing
# mteval-v13a.pl, the script WMT scored with for years, splits punctuation off words before counting, so
# that "cat." and "cat" match. Its rules, in order:
#   1. drop "<skipped>", join words broken across lines by "-\n", unescape &quot; &amp; &lt; &gt;
#   2. put spaces around every ASCII symbol except . , ' and -  ("(a+b)" -> " ( a + b ) ")
#   3. split . and , off unless they sit between digits ("3.14" and "5,000" stay whole, "end." splits)
#   4. split - off after a digit ("1990-2000" -> "1990 - 2000"; "e-mail" stays whole)
SYMBOLS = re.compile(r"([!-&(-+/:-@\[-`{-~])")  # ASCII ! " # $ % &  ( ) * +  /  : ; < = > ? @  [ \ ] ^ _ `  { | } ~
PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def tokenize_13a(line):
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = SYMBOLS.sub(r" \1 ", f" {line} ")  # the padding spaces let rule 3 see a neighbour at both ends
    line = PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", line)
    line = PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", line)
    line = DASH_AFTER_DIGIT.sub(r"\1 \2 ", line)
    return line.split()


def to_tokens(segment, tokenize="13a", lowercase=False):
    """The token list of one segment, as sacrebleu prepares it: lowercased if asked, trailing whitespace
    stripped, then tokenized by `tokenize` (13a or none)."""
    if not isinstance(segment, str):
        raise TypeError(f"a segment must be a str, got {type(segment).__name__}: {segment!r}")
    segment = segment.lower() if lowercase else segment
    if tokenize == "13a":
        return tokenize_13a(segment.rstrip())
    if tokenize == "none":
        return segment.split()
    raise ValueError(f"unknown tokenizer {tokenize!r} (13a or none)")


# ----------------------------------------------------------------------------- n-gram statistics
class BLEUStats(NamedTuple):
    """The counts BLEU is computed from (sacrebleu's "sufficient statistics"), of one segment or, summed, of a
    corpus."""
    hyp_len: int       # hypothesis tokens (c in Papineni et al.)
    ref_len: int       # the closest reference's tokens (r, the "best match length")
    matches: list      # matches[n-1]: clipped matches of the hypothesis n-grams of order n
    totals: list       # totals[n-1]: hypothesis n-grams of order n


def ngram_counts(tokens, max_order):
    """Counter of all n-grams of orders 1..max_order of a token list, each a tuple:
    ngram_counts("a b a".split(), 2) -> {(a,): 2, (b,): 1, (a, b): 1, (b, a): 1}."""
    counts = Counter()
    for n in range(1, max_order + 1):
        counts.update(zip(*(tokens[i:] for i in range(n))))  # zip of n shifted copies yields the n-grams
    return counts


def closest_ref_length(hyp_len, ref_lens):
    """The reference length closest to the hypothesis length, Papineni et al.'s "best match length" (section
    2.2.2); a tie goes to the shorter reference, as in mteval-v13a and sacrebleu (the paper does not say)."""
    return min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))


def segment_stats(hyp_tokens, refs_tokens, max_order=4):
    """BLEUStats of one segment. Clipping (Papineni et al., section 2.1, "modified n-gram precision") counts a
    hypothesis n-gram at most as often as it appears in any single reference: "the the the" against "the cat"
    matches 1 unigram, not 3."""
    max_ref_counts = ngram_counts(refs_tokens[0], max_order)
    for ref in refs_tokens[1:]:
        for ngram, count in ngram_counts(ref, max_order).items():
            if count > max_ref_counts[ngram]:
                max_ref_counts[ngram] = count
    matches = [0] * max_order
    for ngram, count in ngram_counts(hyp_tokens, max_order).items():
        if ngram in max_ref_counts:
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    totals = [max(0, len(hyp_tokens) - n + 1) for n in range(1, max_order + 1)]
    ref_len = closest_ref_length(len(hyp_tokens), [len(r) for r in refs_tokens])
    return BLEUStats(len(hyp_tokens), ref_len, matches, totals)


def corpus_segment_stats(hypotheses, refs_per_segment, max_order=4, tokenize="13a", lowercase=False):
    """BLEUStats of every segment, one at a time (a generator: sum_stats, below, adds them up as they come)."""
    for hypothesis, refs in zip(hypotheses, refs_per_segment):
        yield segment_stats(to_tokens(hypothesis, tokenize, lowercase),
                            [to_tokens(r, tokenize, lowercase) for r in refs], max_order)


def sum_stats(segments, max_order):
    """The corpus' BLEUStats: every count summed over the segments. BLEU pools the counts of all segments
    and divides once (Papineni et al., section 2.1.1); it does not average segment scores."""
    hyp_len = ref_len = 0
    matches, totals = [0] * max_order, [0] * max_order
    for segment in segments:
        hyp_len, ref_len = hyp_len + segment.hyp_len, ref_len + segment.ref_len
        matches = [a + b for a, b in zip(matches, segment.matches)]
        totals = [a + b for a, b in zip(totals, segment.totals)]
    return BLEUStats(hyp_len, ref_len, matches, totals)


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

    @property
    def ratio(self):
        return self.hyp_len / self.ref_len if self.ref_len else 0.0

    def __str__(self):  # sacrebleu's format
        precisions = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.2f} {precisions} (BP = {self.bp:.3f} ratio = {self.ratio:.3f} "
                f"hyp_len = {self.hyp_len:d} ref_len = {self.ref_len:d})")


def brevity_penalty(hyp_len, ref_len):
    """BP = 1 if c > r else exp(1 - r/c) (Papineni et al., section 2.2.2; the formula in section 2.3), with c
    and r summed over the corpus: precision alone would reward a hypothesis that says little."""
    if hyp_len >= ref_len:
        return 1.0
    return math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0


def smoothed_precisions(matches, totals, smooth="exp", smooth_value=None):
    """The n-gram precisions p_n = matches/totals in percent (Papineni et al., section 2.1.1), with a p_n of 0
    replaced by a small number as `smooth` says, sacrebleu's methods (numbered as in Chen & Cherry 2014, "A
    Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU"):
      exp   (method 3, mteval-v13a's; the default): the k-th order with no match gets 1 / (2^k * total)
      floor (method 1): an order with no match gets smooth_value / total  (default 0.1)
      add-k (method 2): orders 2..N get smooth_value added to matches and totals  (default 1)
      none : no smoothing, the p_n stays 0
    Also returns how many orders have a total above 0, add-k's addition included (a corpus of 2-word hypotheses
    has no 3-grams)."""
    if smooth_value is None or smooth_value < 0:
        smooth_value = SMOOTH_DEFAULTS.get(smooth)
    precisions, orders_with_ngrams, halvings = [0.0] * len(matches), 0, 1
    for n in range(1, len(matches) + 1):
        matched, total = matches[n - 1], totals[n - 1]
        if smooth == "add-k" and n > 1:
            matched, total = matched + smooth_value, total + smooth_value
        if total == 0:  # the hypotheses are all shorter than n: no n-grams of this order or above
            break
        orders_with_ngrams = n
        if matched == 0:
            if smooth == "exp":
                halvings *= 2
                precisions[n - 1] = 100.0 / (halvings * total)
            elif smooth == "floor":
                precisions[n - 1] = 100.0 * smooth_value / total
        else:
            precisions[n - 1] = 100.0 * matched / total
    return precisions, orders_with_ngrams


def bleu_from_stats(stats, smooth="exp", smooth_value=None, effective_order=False):
    """BLEU = BP * exp(sum_n log(p_n) / N) (Papineni et al., section 2.3, uniform weights 1/N): the geometric
    mean of the n-gram precisions (section 2.1.3) times the brevity penalty. A p_n of 0 makes it 0 unless
    smoothed. effective_order (for single sentences) averages only over the orders that have n-grams at all."""
    if smooth not in ("exp", "floor", "add-k", "none"):
        raise ValueError(f"unknown smoothing {smooth!r} (exp, floor, add-k or none)")
    hyp_len, ref_len, matches, totals = stats.hyp_len, stats.ref_len, list(stats.matches), list(stats.totals)
    bp = brevity_penalty(hyp_len, ref_len)
    if not any(matches):  # nothing matched at all: BLEU is 0 whatever the smoothing
        return BLEUScore(0.0, [0.0] * len(matches), bp, hyp_len, ref_len, matches, totals)
    precisions, orders_with_ngrams = smoothed_precisions(matches, totals, smooth, smooth_value)
    orders_used = orders_with_ngrams if effective_order else len(matches)
    # log(0) is -infinity; like mteval, use a huge negative number so that the score is exactly 0.0
    log_mean = sum(math.log(p) if p > 0 else -9999999999 for p in precisions[:orders_used]) / orders_used
    return BLEUScore(bp * math.exp(log_mean), precisions, bp, hyp_len, ref_len, matches, totals)


def references_per_segment(hypotheses, references):
    """sacrebleu's layout of the references (one list per reference set, each aligned with the hypotheses),
    checked, turned into one list of references per segment."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be lists of str (references: a list of such lists)")
    if not references:
        raise ValueError("no references given")
    for i, reference_set in enumerate(references):
        if isinstance(reference_set, str) or len(reference_set) != len(hypotheses):
            raise ValueError(f"reference set {i + 1} has {len(reference_set)} segments, the hypotheses "
                             f"{len(hypotheses)} (references: one list per reference set, as in sacrebleu)")
    return [list(refs) for refs in zip(*references)]


def corpus_bleu(hypotheses, references, max_order=4, smooth="exp", smooth_value=None, tokenize="13a",
                lowercase=False, effective_order=False):
    """BLEU of a list of hypothesis strings against references given as sacrebleu takes them: a list of
    reference sets, each a list of strings aligned with the hypotheses. Same defaults as sacrebleu.corpus_bleu."""
    refs_per_segment = references_per_segment(hypotheses, references)
    stats = sum_stats(corpus_segment_stats(hypotheses, refs_per_segment, max_order, tokenize, lowercase), max_order)
    return bleu_from_stats(stats, smooth=smooth, smooth_value=smooth_value, effective_order=effective_order)


def sentence_bleu(hypothesis, references, max_order=4, smooth="exp", smooth_value=None, tokenize="13a",
                  lowercase=False, effective_order=True):
    """BLEU of one hypothesis against its references (a list of strings). effective_order is on by
    default, as in sacrebleu.sentence_bleu: a 3-word sentence has no 4-grams and should not score 0."""
    return corpus_bleu([hypothesis], [[r] for r in references], max_order, smooth, smooth_value, tokenize,
                       lowercase, effective_order)


# ----------------------------------------------------------------------------- reading the inputs
class InputError(ValueError):
    """Bad input files; the message names the file, and the line or idx."""


def read_lines(path):
    """The lines of a UTF-8 text file, without their newlines (a final newline does not add an empty line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: invalid UTF-8 (byte {data[e.start]:#04x})") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def read_text_files(hyp_path, ref_paths):
    """Hypotheses, and the references per segment, from plain text files of one segment a line."""
    hypotheses = read_lines(hyp_path)
    references = [read_lines(p) for p in ref_paths]
    for path, reference_set in zip(ref_paths, references):
        if len(reference_set) != len(hypotheses):
            raise InputError(f"{path} has {len(reference_set)} lines, {hyp_path} has {len(hypotheses)}")
    return hypotheses, [list(refs) for refs in zip(*references)]


def read_json_list(path):
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON array of objects")
    return records


def index_by_idx(path, records, fields):
    """{idx: record[field]} for the first of `fields` the records have; duplicate or missing idx is an error."""
    by_idx = {}
    for row, record in enumerate(records):
        if not isinstance(record, dict) or "idx" not in record:
            raise InputError(f"{path}: record {row}: no 'idx' field")
        field = next((f for f in fields if f in record), None)
        if field is None:
            raise InputError(f"{path}: record {row} (idx {record['idx']}): no {' or '.join(map(repr, fields))} field")
        if record["idx"] in by_idx:
            raise InputError(f"{path}: idx {record['idx']} appears twice")
        by_idx[record["idx"]] = record[field]
    return by_idx


def read_json_pair(submission_path, references_path):
    """The homework's files: [{"idx", "output"}] against [{"idx", "references": [...]}] or [{"idx", "caption"}].
    Returns hypotheses and references per segment, in the references' idx order."""
    outputs = index_by_idx(submission_path, read_json_list(submission_path), ["output"])
    refs = index_by_idx(references_path, read_json_list(references_path), ["references", "caption"])
    missing = [i for i in refs if i not in outputs]
    extra = [i for i in outputs if i not in refs]
    if missing or extra:
        raise InputError(f"{submission_path}: idx do not match {references_path}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, not in the references {extra[:5]}")
    hypotheses, refs_per_segment = [], []
    for idx, ref in refs.items():
        if not isinstance(outputs[idx], str):
            raise InputError(f"{submission_path}: idx {idx}: 'output' must be a string, got "
                             f"{type(outputs[idx]).__name__}")
        ref = [ref] if isinstance(ref, str) else ref
        if not ref or not all(isinstance(r, str) for r in ref):
            raise InputError(f"{references_path}: idx {idx}: references must be strings")
        hypotheses.append(outputs[idx])
        refs_per_segment.append(ref)
    return hypotheses, refs_per_segment


# =============================================================================================================
# extras: not needed for BLEU itself. nltk's convention (--mode=nltk) and the benchmark (--bench).
# =============================================================================================================

# ----------------------------------------------------------------------------- the NLTK convention
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


def nltk_smoothed_precisions(method, matches, denominators, hyp_len, last_hyp_tokens, last_refs_tokens):
    """SmoothingFunction().method0..7 of nltk (Chen & Cherry 2014), on the corpus precisions matches/denominators.
    As in nltk, methods 4 and 7 see hyp_len, the corpus' hypothesis length, and methods 5-7 the last segment."""
    max_order = len(matches)
    p = [m / d for m, d in zip(matches, denominators)]
    if method == 0:    # no smoothing: a zero precision becomes the smallest positive float
        return [p_n if m else sys.float_info.min for p_n, m in zip(p, matches)]
    if method == 1:    # add epsilon to zero match counts
        return [p_n if m else NLTK_EPSILON / d for p_n, m, d in zip(p, matches, denominators)]
    if method == 2:    # add 1 to matches and denominators of orders 2..N (Lin & Och 2004)
        return [p[0]] + [(m + 1) / (d + 1) for m, d in zip(matches[1:], denominators[1:])]
    if method == 6:    # interpolate with a prior p_{n-1}^2 / p_{n-2} (Gao & He 2013); needs p_3 > 0
        if max_order < 3 or not matches[2]:
            raise ValueError("nltk smoothing 6 needs max_order >= 3 and a non-zero trigram precision")
        for i in range(2, max_order):
            prior = 0 if p[i - 2] == 0 else p[i - 1] ** 2 / p[i - 2]
            length = max(0, len(last_hyp_tokens) - i)  # n-grams of order i+1 in the last hypothesis
            p[i] = (matches[i] + NLTK_ALPHA * prior) / (length + NLTK_ALPHA)
        return p
    if method in (3, 4, 7):  # a k-th order with no match gets 1/(2^k ...), like sacrebleu's exp
        halvings = 1
        for i in range(max_order):
            if matches[i] == 0 and (method == 3 or hyp_len > 1):
                p[i] = 1 / (2 ** halvings * denominators[i]) if method == 3 else \
                    1 / (2 ** halvings * NLTK_K / math.log(hyp_len)) / denominators[i]
                halvings += 1
        if method != 7:
            return p
    # methods 5 and 7: average each precision with its neighbours; the one after the last order is the
    # 5-gram precision of the last segment alone (nltk takes order 5 whatever max_order is)
    last_segment = segment_stats(last_hyp_tokens, last_refs_tokens, 5)
    neighbours = p + [last_segment.matches[4] / max(1, last_segment.totals[4])]
    previous = p[0] + 1
    for i in range(max_order):
        p[i] = (previous + p[i] + neighbours[i + 1]) / 3
        previous = p[i]
    return p


def nltk_corpus_bleu(hypotheses, references, max_order=4, smoothing=0, lowercase=False):
    """nltk's corpus_bleu(list_of_references, hypotheses, smoothing_function=SmoothingFunction().method<k>)
    with uniform weights and whitespace tokens, returned as a BLEUScore in percent, like corpus_bleu."""
    refs_per_segment = references_per_segment(hypotheses, references)
    if smoothing not in range(8):
        raise ValueError(f"nltk smoothing must be 0..7, got {smoothing}")
    segments = list(corpus_segment_stats(hypotheses, refs_per_segment, max_order, "none", lowercase))
    stats = sum_stats(segments, max_order)
    denominators = [sum(max(1, s.totals[n]) for s in segments) for n in range(max_order)]  # difference 2 above
    bp = brevity_penalty(stats.hyp_len, stats.ref_len)
    if stats.matches[0] == 0:
        return BLEUScore(0.0, [0.0] * max_order, bp, stats.hyp_len, stats.ref_len, stats.matches, stats.totals)
    # what nltk's smoothing functions see as "the hypothesis" and its references: the last segment's tokens
    last_hyp_tokens = to_tokens(hypotheses[-1], "none", lowercase)
    last_refs_tokens = [to_tokens(r, "none", lowercase) for r in refs_per_segment[-1]]
    p = nltk_smoothed_precisions(smoothing, stats.matches, denominators, stats.hyp_len, last_hyp_tokens,
                                 last_refs_tokens)
    score = bp * math.exp(math.fsum(math.log(p_n) / max_order for p_n in p))
    return BLEUScore(100 * score, [100 * p_n for p_n in p], bp, stats.hyp_len, stats.ref_len, stats.matches,
                     stats.totals)


# ----------------------------------------------------------------------------- the benchmark
def run_bench(data_dir, repeats=3):
    """Prints the seconds to score each system output of data_dir (2,489 lines), ours beside sacrebleu, best of
    `repeats`, and both scores."""
    import sacrebleu  # a test-and-benchmark oracle only (requirements-dev.txt)
    # force=True: these files are tokenized already; it skips sacrebleu's check for that, and its warning
    oracle = lambda hyps, refs: sacrebleu.corpus_bleu(hyps, refs, force=True)
    references = [read_lines(f"{data_dir}/refs.test2010.lc.tok.en.0")]
    for system in ("baseline", "sys1"):
        hypotheses = read_lines(f"{data_dir}/hyps.lc.tok.en.{system}.opt0")
        timings = {}
        for name, fn in (("bleu.py", corpus_bleu), ("sacrebleu", oracle)):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = fn(hypotheses, references)
                best = min(best, time.perf_counter() - t0)
            timings[name] = best
            print(f"{system:8s} {name:9s} {best:.3f} s  BLEU = {result.score:.10f}")
        print(f"{system:8s} sacrebleu / bleu.py time: {timings['sacrebleu'] / timings['bleu.py']:.2f}x")


# ======================================================================================== end of the extras


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
        kind = {bool: "True or False", int: "an integer", float: "a number"}[type(default)]
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


def score_files(paths):
    """The CLI's work: BLEU of the first file against the others, in the configured mode."""
    if len(paths) < 2:
        raise InputError("usage: python bleu.py HYP REF [REF ...]  or  python bleu.py submission.json refs.json")
    if paths[0].endswith(".json"):
        if len(paths) != 2:
            raise InputError("with a JSON submission give exactly one JSON reference file")
        hypotheses, refs_per_segment = read_json_pair(paths[0], paths[1])
    else:
        hypotheses, refs_per_segment = read_text_files(paths[0], paths[1:])
    if mode == "nltk":
        # nltk_corpus_bleu takes reference sets (sacrebleu's layout), so every segment needs as many references
        n_sets = max(len(r) for r in refs_per_segment)
        if any(len(r) != n_sets for r in refs_per_segment):
            raise InputError("nltk mode needs the same number of references for every segment")
        return nltk_corpus_bleu(hypotheses, list(map(list, zip(*refs_per_segment))), max_order, nltk_smoothing,
                                lowercase)
    # corpus_bleu's work, on references per segment: a JSON file may give each segment a different number
    stats = sum_stats(corpus_segment_stats(hypotheses, refs_per_segment, max_order, tokenize, lowercase), max_order)
    return bleu_from_stats(stats, smooth=smooth, smooth_value=smooth_value)


if __name__ == "__main__":
    files = parse_overrides(sys.argv[1:], globals(), CHECKS)
    if bench:
        run_bench(data_dir)
        sys.exit(0)
    try:
        print(score_files(files))
    except (InputError, TypeError, ValueError) as e:
        sys.exit(f"error: {e}")
