"""bleu.py against its oracles: sacrebleu (the standard) and nltk (nltk mode). Scores equal to 1e-9, counts exact."""
import json
import random
import re
import subprocess
import sys
import warnings

import pytest
import sacrebleu
from nltk.translate import bleu_score as nltk_bleu
from sacrebleu.metrics import BLEU

import bleu
from conftest import ROOT, real_data_path

SMOOTHING = [("exp", None), ("floor", None), ("floor", 0.3), ("add-k", None), ("add-k", 2), ("none", None)]


def assert_same_as_sacrebleu(ours, theirs, smooth="exp", smooth_value=None):
    assert ours.score == pytest.approx(theirs.score, abs=1e-9, rel=0)
    assert ours.bp == pytest.approx(theirs.bp, abs=1e-12)
    assert (ours.hyp_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert ours.totals[0] == theirs.totals[0] and ours.matches[0] == theirs.counts[0]
    if smooth == "add-k" and any(ours.matches):  # sacrebleu reports add-k counts with k added to orders 2..N
        k = 1 if smooth_value is None else smooth_value
        assert [m + k for m in ours.matches[1:]] == theirs.counts[1:]
        assert [t + k for t in ours.totals[1:]] == theirs.totals[1:]
    else:
        assert ours.matches == theirs.counts and ours.totals == theirs.totals
    assert ours.precisions == pytest.approx(theirs.precisions, abs=1e-9)


def iwslt_corpus():
    """The shared IWSLT files, or a small corpus of their kind when $DL_DATA is not set."""
    data = real_data_path("bleu")
    if data is None:
        refs = ["the cat sat on the mat .", "there is a cat , on 3.5 mats !", "a b c d", "hello world"]
        return {"sys": ["the cat is on the mat .", "there is cat on the mat", "a b c", "goodbye"]}, [refs]
    refs = bleu.read_lines(data / "refs.test2010.lc.tok.en.0")
    systems = {s: bleu.read_lines(data / f"hyps.lc.tok.en.{s}.opt0") for s in ("baseline", "sys1")}
    assert len(refs) == 2489 and all(len(h) == 2489 for h in systems.values())
    return systems, [refs]


@pytest.mark.slow
@pytest.mark.parametrize("smooth, smooth_value", SMOOTHING)
@pytest.mark.parametrize("tokenize, lowercase", [("13a", False), ("none", False), ("13a", True)])
def test_iwslt_files_equal_sacrebleu(smooth, smooth_value, tokenize, lowercase):
    systems, refs = iwslt_corpus()
    for hyps in systems.values():
        ours = bleu.corpus_bleu(hyps, refs, smooth=smooth, smooth_value=smooth_value, tokenize=tokenize,
                                lowercase=lowercase)
        theirs = sacrebleu.corpus_bleu(hyps, refs, smooth_method=smooth, smooth_value=smooth_value,
                                       tokenize=tokenize, lowercase=lowercase, force=True)
        assert_same_as_sacrebleu(ours, theirs, smooth, smooth_value)
        assert str(ours) == str(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", range(8))
def test_iwslt_files_equal_nltk(smoothing):
    systems, refs = iwslt_corpus()
    for hyps in systems.values():
        ours = bleu.nltk_corpus_bleu(hyps, refs, smoothing=smoothing)
        theirs = nltk_corpus(hyps, refs, smoothing)
        assert ours.score / 100 == pytest.approx(theirs, abs=1e-11, rel=0)


def nltk_corpus(hyps, refs, smoothing, max_order=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero counts under method0
        return nltk_bleu.corpus_bleu([[r.split() for r in seg] for seg in zip(*refs)], [h.split() for h in hyps],
                                     weights=(1 / max_order,) * max_order,
                                     smoothing_function=getattr(nltk_bleu.SmoothingFunction(), f"method{smoothing}"))


# ----------------------------------------------------------------------------- random corpora
WORDS = "the a cat dog sat on mat 3.14 5,000 1990-2000 ( ) , . ! ? \" ' - e-mail &amp; &quot; <b>".split()


def random_segment(rng, max_len):
    n = rng.choice([0, 1, 2, 3, rng.randint(0, max_len)])  # many shorter than 4 tokens, some empty
    words = [rng.choice(WORDS) for _ in range(n)]
    glue = lambda w: w if rng.random() < 0.7 else w + rng.choice([".", ",", "!", ")"])  # "mat." "cat,"
    return " ".join(glue(w) for w in words)


def random_corpus(seed, n_refs=None, max_len=12, overlap=0.5):
    rng = random.Random(seed)
    n_segments, n_refs = rng.randint(1, 30), n_refs or rng.randint(1, 4)
    refs = [[random_segment(rng, max_len) for _ in range(n_segments)] for _ in range(n_refs)]
    hyps = []
    for i in range(n_segments):
        if rng.random() < overlap:  # a corrupted copy of a reference, so that higher orders match too
            words = refs[0][i].split()
            hyps.append(" ".join(w for w in words if rng.random() < 0.8))
        else:
            hyps.append(random_segment(rng, max_len))
    return hyps, refs


@pytest.mark.parametrize("seed", range(40))
def test_random_corpora_equal_sacrebleu(seed):
    hyps, refs = random_corpus(seed)
    for smooth, smooth_value in SMOOTHING:
        for effective_order in (False, True):
            for tokenize in ("13a", "none"):
                ours = bleu.corpus_bleu(hyps, refs, smooth=smooth, smooth_value=smooth_value, tokenize=tokenize,
                                        effective_order=effective_order)
                theirs = BLEU(smooth_method=smooth, smooth_value=smooth_value, tokenize=tokenize,
                              effective_order=effective_order).corpus_score(hyps, refs)
                assert_same_as_sacrebleu(ours, theirs, smooth, smooth_value)


@pytest.mark.parametrize("seed", range(20))
def test_random_sentences_equal_sacrebleu_sentence_bleu(seed):
    hyps, refs = random_corpus(seed)
    for i, hyp in enumerate(hyps):
        seg_refs = [stream[i] for stream in refs]
        for smooth, smooth_value in SMOOTHING:
            ours = bleu.sentence_bleu(hyp, seg_refs, smooth=smooth, smooth_value=smooth_value)
            theirs = sacrebleu.sentence_bleu(hyp, seg_refs, smooth_method=smooth, smooth_value=smooth_value)
            assert_same_as_sacrebleu(ours, theirs, smooth, smooth_value)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("max_order", [2, 4])
def test_random_corpora_equal_nltk(seed, max_order):
    hyps, refs = random_corpus(seed, overlap=0.8)
    for smoothing in range(8):
        try:
            theirs = nltk_corpus(hyps, refs, smoothing, max_order)
        except (AssertionError, IndexError) as nltk_error:  # method 6 needs p_3 > 0 and max_order >= 3
            with pytest.raises(ValueError):
                bleu.nltk_corpus_bleu(hyps, refs, max_order, smoothing)
            assert smoothing == 6, nltk_error
            continue
        ours = bleu.nltk_corpus_bleu(hyps, refs, max_order, smoothing)
        assert ours.score / 100 == pytest.approx(theirs, abs=1e-11, rel=0), smoothing


@pytest.mark.parametrize("hyps, refs", [(["cat"], [["cat"]]), (["cat"], [["dog"]]), (["a", "b"], [["a", "c"]])])
def test_one_token_corpora_equal_nltk(hyps, refs):
    """Method 4 needs ln(hypothesis length) > 0: on a one-token corpus it leaves the zero precisions, which nltk
    leaves out of the geometric mean (before, bleu.py took log(0) and stopped with a math domain error)."""
    for smoothing in (0, 1, 2, 3, 4, 5, 7):
        theirs = nltk_corpus(hyps, refs, smoothing, 4)
        assert bleu.nltk_corpus_bleu(hyps, refs, 4, smoothing).score / 100 == pytest.approx(theirs, abs=1e-11, rel=0)


def test_edge_cases_against_sacrebleu():
    cases = [
        (["", ""], [["a cat", "the dog"]]),                      # empty hypotheses
        (["zebra", "yak yak"], [["a cat", "the dog"]]),          # no match at all
        (["a", "b c"], [["a", "b c"]]),                           # shorter than 4 tokens: no 3- or 4-grams
        (["the the the the"], [["the cat"], ["the the dog"]]),   # clipping with two references
        (["cat."], [["cat ."]]), (["3.14, 5,000."], [["3.14 , 5,000 ."]]),  # 13a splits . and , off words
        (["a b c d e f"], [["a b c"], ["a b c d e f g h i"], ["a b c d e f g"]]),  # closest-length ref
        (["a b c d e"], [["a b c d"], ["a b c d e f"]]),          # tie in length: the shorter reference
    ]
    for hyps, refs in cases:
        for smooth, smooth_value in SMOOTHING:
            theirs = sacrebleu.corpus_bleu(hyps, refs, smooth_method=smooth, smooth_value=smooth_value)
            assert_same_as_sacrebleu(bleu.corpus_bleu(hyps, refs, smooth=smooth, smooth_value=smooth_value),
                                     theirs, smooth, smooth_value)


def test_worked_example_of_the_two_conventions():
    """The example in bleu.py's comments: nltk counts an n-gram for the 1-word hypothesis, sacrebleu does not."""
    hyps, refs = ["a b c d e", "x"], [["a b c d e", "x y"]]
    ours, ours_nltk = bleu.corpus_bleu(hyps, refs), bleu.nltk_corpus_bleu(hyps, refs)
    assert ours.score == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    assert ours_nltk.score / 100 == pytest.approx(nltk_corpus(hyps, refs, 0), abs=1e-12)
    assert round(ours.score, 2) == 84.65 and round(ours_nltk.score, 2) == 67.32


@pytest.mark.parametrize("line", [
    "Hello, world! (It's 3.14.)", "a-b 1990-2000 e-mail 5,000.00 x.y", "&quot;q&quot; &amp; &lt;b&gt;",
    "<skipped> joined-\nline", "tabs\tand  spaces ", "unicode café — “quotes”", "$5 @home #tag 50% a/b c\\d {x}|~^_`",
])
def test_13a_tokenizer_equals_sacrebleu(line):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    assert bleu.tokenize_13a(line) == Tokenizer13a()(line).split()


def test_sacrebleu_line_format():
    hyps, refs = iwslt_corpus()
    hyp = next(iter(hyps.values()))
    assert str(bleu.corpus_bleu(hyp, refs)) == str(sacrebleu.corpus_bleu(hyp, refs, force=True))


# ----------------------------------------------------------------------------- the command line
def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "bleu.py"), *map(str, args)], capture_output=True, text=True)


def test_cli_text_files(tmp_path):
    hyps, refs = random_corpus(3, n_refs=2, overlap=0.9)
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    for i, stream in enumerate(refs):
        (tmp_path / f"ref{i}.txt").write_text("\n".join(stream) + "\n")
    result = run_cli(tmp_path / "hyp.txt", tmp_path / "ref0.txt", tmp_path / "ref1.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(sacrebleu.corpus_bleu(hyps, refs))
    result = run_cli(tmp_path / "hyp.txt", tmp_path / "ref0.txt", tmp_path / "ref1.txt", "--mode=nltk",
                     "--nltk_smoothing=1")
    score = float(result.stdout.strip().splitlines()[-1].split()[2])
    assert score == pytest.approx(100 * nltk_corpus(hyps, refs, 1), abs=0.005)  # printed with 2 decimals


def test_cli_homework_json(tmp_path):
    references = [{"idx": 7, "references": ["a dog runs on the grass .", "a brown dog is running"]},
                  {"idx": 3, "references": ["two children play in the water", "kids are swimming ."]}]
    submission = [{"idx": 3, "output": "two kids play in the water ."}, {"idx": 7, "output": "a dog runs ."}]
    (tmp_path / "sub.json").write_text(json.dumps(submission))
    (tmp_path / "refs.json").write_text(json.dumps(references))
    result = run_cli(tmp_path / "sub.json", tmp_path / "refs.json")
    assert result.returncode == 0, result.stderr
    expected = sacrebleu.corpus_bleu(["a dog runs .", "two kids play in the water ."],
                                     [["a dog runs on the grass .", "two children play in the water"],
                                      ["a brown dog is running", "kids are swimming ."]])
    assert result.stdout.strip().splitlines()[-1] == str(expected)
    # the {"idx", "caption"} form: one reference each
    (tmp_path / "caps.json").write_text(json.dumps([{"idx": r["idx"], "caption": r["references"][0]}
                                                    for r in references]))
    result = run_cli(tmp_path / "sub.json", tmp_path / "caps.json")
    expected = sacrebleu.corpus_bleu(["a dog runs .", "two kids play in the water ."],
                                     [["a dog runs on the grass .", "two children play in the water"]])
    assert result.stdout.strip().splitlines()[-1] == str(expected)


@pytest.mark.parametrize("files, message", [
    ({"h.txt": "a\nb\n", "r.txt": "a\n"}, "r.txt has 1 lines, .*h.txt has 2"),
    ({"h.txt": "", "r.txt": "a\n"}, "h.txt: the file is empty"),
    ({"h.txt": b"ok\ncaf\xe9\n", "r.txt": "a\nb\n"}, "h.txt: line 2: invalid UTF-8"),
    ({"s.json": [{"idx": 1, "output": 5}], "r.json": [{"idx": 1, "caption": "a"}]}, "idx 1: 'output' must be a string"),
    ({"s.json": [{"idx": 1, "output": "a"}], "r.json": [{"idx": 1, "caption": "a"}, {"idx": 2, "caption": "b"}]},
     r"missing \[2\]"),
    ({"s.json": [{"idx": 1, "output": "a"}, {"idx": 1, "output": "b"}], "r.json": [{"idx": 1, "caption": "a"}]},
     "s.json: idx 1 appears twice"),
    ({"s.json": [{"idx": 1, "text": "a"}], "r.json": [{"idx": 1, "caption": "a"}]},
     "s.json: record 0: expected an object with 'idx' \\(a number or text\\) and 'output'"),
    ({"s.json": [{"idx": [1], "output": "a"}], "r.json": [{"idx": 1, "caption": "a"}]}, "s.json: record 0: expected"),
    ({"s.json": [{"idx": 1, "output": "a"}], "r.json": [{"idx": 1, "references": 5}]},
     "s.json: idx 1: 'output' must be a string and the references in .*r.json strings"),
])
def test_cli_bad_input_gives_one_clear_error(tmp_path, files, message):
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = run_cli(*(tmp_path / name for name in files))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ")
    assert re.search(message, result.stderr), result.stderr


def test_api_bad_input():
    with pytest.raises(ValueError, match="reference set 1 has 1 segments, the hypotheses 2"):
        bleu.corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="must be a str, got int"):
        bleu.corpus_bleu([3], [["a"]])
    with pytest.raises(ValueError, match="unknown smoothing"):
        bleu.corpus_bleu(["a"], [["a"]], smooth="bogus")
