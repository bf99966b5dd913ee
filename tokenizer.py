"""
Text preprocessing for the news classifier (homework part 2-1, "Data Preprocessing"), written by hand:
cleaning, a regex word tokenizer, stop words, the Porter stemmer and a vocabulary with special tokens.

    python tokenizer.py "The cats are running quickly!"      # print every stage (one or more texts)
    python tokenizer.py --vocab_path=out/textcls/vocab.json "Stocks fall"   # ids of textcls.py's trained vocabulary
    python tokenizer.py --bench                              # docs/s over data/news/News_train.json, beside NLTK

As a library (textcls.py does this):
    from tokenizer import preprocess, Vocab
    vocab = Vocab.build([preprocess(t) for t in texts], min_freq=2)
    ids = vocab.encode(preprocess(headline), max_len=64, tokens_b=preprocess(description))
"""
import ast
import difflib
import functools
import html
import io
import json
import re
import sys
import time
import unicodedata
from collections import Counter
from tokenize import COMMENT, generate_tokens

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
data_dir = "data/news"  # where News_train.json lives (for --bench)
bench = False           # time preprocess() over the training texts, beside NLTK
bench_docs = 0          # texts --bench reads: 0 = all, or the first N for a quick look
vocab_path = ""         # demo ids from a saved Vocab (textcls.py's out_dir/vocab.json); "" = built from the text
# -----------------------------------------------------------------------------

CHECKS = {"bench_docs": (lambda v: v >= 0, "an integer >= 0")}   # checked before any work (see parse_overrides)

# ----------------------------------------------------------------------------- cleaning
# Punctuation to fold into its plain ASCII twin. Curly quotes and their look-alikes (primes, guillemets, the acute
# accent and the backtick typed for an apostrophe) become straight ones, so that "didn’t" and "didn't" are the same
# word; hyphen look-alikes (hyphen, no-break hyphen, minus) become "-" (they join words: "covid‑19"), while en and
# em dashes and the horizontal bar become spaces (they separate: "win—again" is two words). The no-break space
# becomes a space; the zero-width space goes, and so does the combining dot above that lower() leaves on a Turkish
# capital I ("İstanbul" -> "i" + U+0307 + "stanbul" -> "istanbul").
UNICODE_FOLD = str.maketrans("\u2018\u2019\u201b\u2032\u00b4\u0060" "\u201c\u201d\u201e\u2033\u00ab\u00bb"   # these
                             "\u2010\u2011\u2212" "\u2013\u2014\u2015" "\u00a0",
                             "''''''" '""""""' "---" "   " " ", "\u200b\u0307")  # become these; the last two go
HTML_TAG = re.compile(r"</?[a-zA-Z!][^<>]{0,200}>")  # "<br/>", "<B>", "</p>", "<!-- -->": markup, not words
                                                     # ("x < 3 and y > 5" is no tag: a name follows "<" at once)
POSSESSIVE = re.compile(r"(?<=\w)'s\b")     # "spacex's" -> "spacex", "it's" -> "it" (see TOKEN below)


def clean(text):
    """Unescape HTML, drop markup, lowercase, fold Unicode quotes and dashes, drop the possessive 's.
    Punctuation stays: the tokenizer decides which dots belong to "3.14" or a URL and which end a sentence."""
    if not isinstance(text, str):  # one clear error for None, a number or bytes (a missing or undecoded field)
        raise TypeError(f"expected a str, got {type(text).__name__}")
    # Each `if` skips a step that cannot change this text (most headlines are plain ASCII without "&", "<" or "'"):
    # the same tokens, and preprocess() about 1.1x as fast over News_train (tokenizer.py --bench).
    if "&" in text:
        text = html.unescape(text)         # "&amp;" -> "&", "&#39;" -> "'", "&quot;" -> '"'
    if "<" in text:
        text = HTML_TAG.sub(" ", text)
    text = text.lower()
    if not text.isascii() or "`" in text:   # the backtick typed for an apostrophe is ASCII
        # NFC joins a letter and a combining accent into one code point: "cafe" + U+0301 becomes "café", and TOKEN
        # (below) takes "é" as a letter (\w). The combining mark alone is not \w: the token would stop at "cafe".
        text = unicodedata.normalize("NFC", text).translate(UNICODE_FOLD)
    return POSSESSIVE.sub("", text) if "'" in text else text


# ----------------------------------------------------------------------------- tokenizing
# One regular expression. findall scans the text left to right; at each position the branches are tried in the
# order below and the first that matches takes the token, so a URL or an e-mail address is taken whole before its
# pieces could match as words. Whatever no branch matches (punctuation, symbols, emoji) is dropped: that is the
# "remove punctuation and special characters" step.
#   URL        "see https://x.com/a?b=1." -> "https://x.com/a?b=1"     (no trailing sentence dot)
#   e-mail     "mail jo.ann@mail.co.uk"   -> "jo.ann@mail.co.uk"
#   handle/tag "@nasa loves #space"       -> "@nasa", "loves", "#space"
#   acronym    "the u.s. and b.i.g."      -> "the", "u.s.", "and", "b.i.g."
#   number     "3.14 of 5,000"            -> "3.14", "of", "5,000"    (plain "2020", "19th" are words)
#   word       "state-of-the-art", "didn't", "o'brien", "covid-19", "café", "naïve" stay one token each.
# Contractions stay whole ("didn't", "you'll") because the stop list holds them whole. The possessive "'s" was
# removed by clean(): "spacex's" is about SpaceX, and "it's" -> "it" is a stop word either way.
# \w is Unicode-aware, so letters with accents count as letters; [^\W\d_] means "a letter", [^\W_] "a letter or digit".
# Only syntax that Python 3.10 accepts (no atomic groups or possessive quantifiers, both new in 3.11).
TOKEN = re.compile(r"""
    (?:https?://|www\.)[^\s<>"]*[^\s<>"'.,;:!?)\]]   # URL, not ending in punctuation
  | (?<![\w.+-])[\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+     # e-mail address (tried once per run of [\w.+-])
  | [@#]\w+                                           # @handle, #hashtag
  | (?:[^\W\d_]\.){2,}                                # acronym with dots
  | \d+(?:[.,]\d+)+                                   # number with a decimal point or thousands commas
  | [^\W_]+(?:[-'_][^\W_]+)*                          # word, with inner hyphens, apostrophes, underscores
""", re.VERBOSE)


def tokenize(text):
    """Split a text into lowercase tokens. tokenize("The cats are running quickly!") ->
    ['the', 'cats', 'are', 'running', 'quickly']; an empty or all-punctuation text gives []."""
    return TOKEN.findall(clean(text))


def remove_punctuation(text):
    """The text without punctuation and special characters, as one string: its tokens joined by spaces.
    "The cats are running quickly!" -> "the cats are running quickly". Its tokens are the text's own:
    tokenize(remove_punctuation(text)) == tokenize(text)."""
    return " ".join(tokenize(text))


# ----------------------------------------------------------------------------- stop words
# NLTK's English stop list, the 179 words of stopwords.words("english") until February 2025 (nltk_data has since
# added 19 contractions such as "i'm"). It holds the pieces that other tokenizers split contractions into
# ("didn", "t", "ll") as well as the whole forms ("didn't", "you'll") that ours keeps.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his himself
she she's her hers herself it it's its itself they them their theirs themselves what which who whom this that that'll
these those am is are was were be been being have has had having do does did doing a an the and but if or because as
until while of at by for with about against between into through during before after above below to from up down in out
on off over under again further then once here there when where why how all any both each few more most other some such
no nor not only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain aren
aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't
mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())


# ----------------------------------------------------------------------------- Porter stemmer
# M. F. Porter, "An algorithm for suffix stripping", Program 14(3), 130-137, July 1980, exactly as published.
# Porter's later C code departs from the paper in three small ways that this version does not take: it maps
# "bli" -> "ble" where the paper has "abli" -> "able", adds "logi" -> "log", and leaves words of one or two
# letters alone (the paper stems "is" to "i" and "as" to "a").
#
# The paper's notation: a consonant is a letter other than a, e, i, o, u, and other than y preceded by a
# consonant. Writing C for a run of consonants and V for a run of vowels, every word is [C](VC)^m[V];
# m, the "measure", counts the VC pairs: m=0 "tree", "by"; m=1 "trouble", "oats"; m=2 "troubles", "private".
# A rule "(condition) S1 -> S2" replaces the suffix S1 by S2 when what is left before S1 meets the condition.
# The paper calls that part the stem; the code calls it `base`, since stem() is the whole algorithm.

def _is_consonant(word, i):
    """Whether word[i] is a consonant in the paper's sense (above)."""
    if word[i] == "y":  # "y" is a vowel after a consonant ("by"), a consonant at the start or after a vowel ("toy")
        return i == 0 or not _is_consonant(word, i - 1)
    return word[i] not in "aeiou"


def _measure(word):
    """m in [C](VC)^m[V]: the number of vowel-to-consonant changes."""
    is_vowel = [not _is_consonant(word, i) for i in range(len(word))]
    return sum(1 for i in range(1, len(word)) if is_vowel[i - 1] and not is_vowel[i])


def _has_vowel(word):
    """The paper's *v*: the word contains a vowel."""
    return any(not _is_consonant(word, i) for i in range(len(word)))


def _ends_double_consonant(word):
    """The paper's *d: the word ends with a double consonant ("-tt", "-ss")."""
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word):
    """The paper's *o: the word ends consonant-vowel-consonant, the last not w, x or y ("-wil", "-hop")."""
    n = len(word)
    return (n >= 3 and _is_consonant(word, n - 1) and not _is_consonant(word, n - 2)
            and _is_consonant(word, n - 3) and word[-1] not in "wxy")


# Steps 2, 3 and 4 as the paper lists them. Of the rules of one step "only one is obeyed, and this will be the one
# with the longest matching S1" (the paper): with the suffixes sorted longest first, that is the first suffix the
# word ends with, so a word ending in "ement" meets "ement", not "ment" or "ent".
STEP2_RULES = sorted([  # (m>0) suffix -> replacement
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
    ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
    ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
], key=lambda rule: len(rule[0]), reverse=True)   # longest suffix first
STEP3_RULES = sorted([  # (m>0) suffix -> replacement
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", ""),
], key=lambda rule: len(rule[0]), reverse=True)
STEP4_RULES = sorted([(suffix, "") for suffix in [  # (m>1) suffix -> nothing; "ion" also needs *S or *T
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism", "ate",
    "iti", "ous", "ive", "ize",
]], key=lambda rule: len(rule[0]), reverse=True)


def _replace_suffix(word, rules, min_measure=1):
    """Steps 2, 3 and 4: replace the longest listed suffix the word ends with if the base before it has
    m >= min_measure (and, for step 4's "ion", ends in s or t). If it has not, the word stays as it is: no shorter
    suffix is tried."""
    for suffix, replacement in rules:
        if word.endswith(suffix):
            base = word[: -len(suffix)]
            applies = _measure(base) >= min_measure and (suffix != "ion" or base.endswith(("s", "t")))
            return base + replacement if applies else word
    return word


@functools.cache  # texts repeat words: stem each distinct word once
def stem(word):
    """Porter (1980) stem of one lowercase word: stem("running") -> "run", stem("ponies") -> "poni"."""
    # Step 1a: plurals. sses -> ss, ies -> i, ss -> ss, s -> (nothing). caresses -> caress, ponies -> poni
    if word.endswith(("sses", "ies")):                    # both lose their "es"
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]

    # Step 1b: past tenses and gerunds. (m>0) eed -> ee; (*v*) ed -> (nothing); (*v*) ing -> (nothing). A word
    # ending in "eed" meets only the first rule (the longest suffix): agreed -> agree, but feed stays feed, not "fe".
    if word.endswith("eed"):
        if _measure(word[:-3]) > 0:
            word = word[:-1]
    elif word.endswith(("ed", "ing")):
        base = word[:-2] if word.endswith("ed") else word[:-3]
        if _has_vowel(base):
            # after the second or third rule, the paper tidies up: at -> ate, bl -> ble, iz -> ize,
            # (*d and not (*L or *S or *Z)) -> single letter, (m=1 and *o) -> e
            word = base
            if word.endswith(("at", "bl", "iz")):
                word += "e"                               # conflat(ed) -> conflate, troubl(ing) -> trouble
            elif _ends_double_consonant(word) and word[-1] not in "lsz":
                word = word[:-1]                          # hopp(ing) -> hop, but fall(ing) -> fall
            elif _measure(word) == 1 and _ends_cvc(word):
                word += "e"                               # fil(ing) -> file

    # Step 1c: (*v*) y -> i. happy -> happi, sky -> sky
    if word.endswith("y") and _has_vowel(word[:-1]):
        word = word[:-1] + "i"

    # Step 2: double suffixes to single ones, (m>0). relational -> relate, digitizer -> digitize
    word = _replace_suffix(word, STEP2_RULES)

    # Step 3: -ic-, -ful, -ness etc., (m>0). triplicate -> triplic, hopeful -> hope, goodness -> good
    word = _replace_suffix(word, STEP3_RULES)

    # Step 4: remove a suffix, (m>1). revival -> reviv, adjustment -> adjust; (m>1 and (*S or *T)) ion -> (nothing):
    # adoption -> adopt. As in steps 2 and 3, only the longest suffix the word ends with is tried.
    word = _replace_suffix(word, STEP4_RULES, min_measure=2)

    # Step 5a: (m>1) e -> (nothing); (m=1 and not *o) e -> (nothing). probate -> probat, rate -> rate, cease -> ceas
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]

    # Step 5b: (m>1 and *d and *L) -> single letter. controll -> control, roll -> roll
    if word.endswith("ll") and _measure(word) > 1:
        word = word[:-1]
    return word


# ----------------------------------------------------------------------------- the whole pipeline
def _stem_token(token):
    """The Porter stem of a token of letters only ("running" -> "run"). Other tokens stay as they are: "3.14",
    "@nasa", "didn't", URLs, e-mail addresses. A word with inner hyphens is stemmed on its last part when that is
    letters only ("long-lasting" -> "long-last", "covid-19" stays): in an English compound the last part usually
    carries the inflection."""
    head, dash, last = token.rpartition("-")        # ("", "", token) without a hyphen
    return head + dash + (stem(last) or last) if last.isalpha() else token   # the paper stems "s" to nothing


def preprocess(text, remove_stop=True, use_stemming=True):
    """clean -> tokenize -> drop stop words -> Porter stems. "The cats are running quickly!" ->
    ['cat', 'run', 'quickli']; remove_stop=False or use_stemming=False skips that step."""
    tokens = tokenize(text)
    if remove_stop:  # before stemming, on the words as written: the stop list holds "was", not its stem "wa"
        tokens = [t for t in tokens if t not in STOP_WORDS]
    return [_stem_token(t) for t in tokens] if use_stemming else tokens


# ----------------------------------------------------------------------------- vocabulary
class Vocab:
    """Token <-> id. The special tokens have fixed ids, so a model can rely on them:
    <pad> 0 (batch padding, masked out), <unk> 1 (unknown token), <cls> 2 (first position; its output is the
    text's vector with textcls.py --pooling=cls), <sep> 3 (between two segments), <mask> 4 (masked-language
    pre-training, textcls.py --pretrain_epochs)."""
    SPECIALS = ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>"]
    pad_id, unk_id, cls_id, sep_id, mask_id = range(len(SPECIALS))   # their positions in SPECIALS

    def __init__(self, itos):
        self.itos = list(itos)
        self.stoi = {token: i for i, token in enumerate(self.itos)}
        if self.itos[: len(self.SPECIALS)] != self.SPECIALS or len(self.stoi) != len(self.itos):
            raise ValueError(f"a vocabulary must start with {self.SPECIALS} and list each token once, "
                             f"got {self.itos[:8]}{'...' if len(self.itos) > 8 else ''}")

    @classmethod
    def build(cls, token_lists, min_freq=1, max_size=None):
        """Most frequent tokens first (ties alphabetically, so a build is repeatable), those seen fewer than
        min_freq times dropped; max_size caps the whole vocabulary, special tokens included (which are always in,
        so it never holds fewer than 5)."""
        counts = Counter(token for tokens in token_lists for token in tokens)
        kept = sorted((token for token, count in counts.items() if count >= min_freq and token not in cls.SPECIALS),
                      key=lambda token: (-counts[token], token))     # (a "<pad>" among the tokens is not listed twice)
        if max_size is not None:
            kept = kept[: max(0, max_size - len(cls.SPECIALS))]
        return cls(cls.SPECIALS + kept)

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens, max_len=None, add_cls=True, tokens_b=None):
        """[<cls>] tokens [<sep> tokens_b] as ids, unknown tokens as <unk>. With max_len, tokens are cut from the
        end of whichever segment is longer (the second when both are as long), one at a time, until everything
        fits: BERT's "longest first" (_truncate_seq_pair in google-research/bert's run_classifier.py)."""
        segments = [list(tokens)] if tokens_b is None else [list(tokens), list(tokens_b)]   # copies: cutting pops
        if max_len is not None:
            room = max_len - int(add_cls) - (len(segments) - 1)      # what <cls> and <sep> leave
            if room < 0:
                raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
            while sum(len(segment) for segment in segments) > room:
                (segments[0] if len(segments[0]) > len(segments[-1]) else segments[-1]).pop()
        ids = [self.cls_id] if add_cls else []
        for k, segment in enumerate(segments):
            ids += [self.sep_id] * k + [self.stoi.get(t, self.unk_id) for t in segment]
        return ids

    def decode(self, ids):
        """ids -> tokens, special tokens included."""
        return [self.itos[i] for i in ids]

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f)["itos"])


# --- extras (not the lesson) ---
def show_stages(text, vocab_path=""):
    """Print what each step of preprocess() makes of one text, as the homework slides do, then the ids of its
    stems (in the vocabulary saved at vocab_path, or in one of these stems alone). Every line comes from the
    pipeline's own functions (preprocess with its later steps switched off), so what is shown is what runs."""
    stems = preprocess(text)
    vocab = Vocab.load(vocab_path) if vocab_path else Vocab.build([stems])
    ids = vocab.encode(stems)
    stages = [("input", text), ("cleaned", clean(text)), ("no punctuation", remove_punctuation(text)),
              ("tokens", preprocess(text, remove_stop=False, use_stemming=False)),
              ("no stop words", preprocess(text, use_stemming=False)), ("stems", stems),
              ("with specials", vocab.decode(ids)), ("ids", ids)]
    for name, value in stages:
        print(f"{name:15s}: {value}")


def run_bench(data_dir, n_docs=0):
    """docs/s of preprocess() over the training texts (the first n_docs; 0 = all), and of the nearest NLTK
    pipeline in the same run (TreebankWordTokenizer + the stop list + PorterStemmer ORIGINAL; nltk is in
    requirements-dev.txt)."""
    from nltk.stem.porter import PorterStemmer
    from nltk.tokenize import TreebankWordTokenizer
    treebank, porter = TreebankWordTokenizer(), PorterStemmer(PorterStemmer.ORIGINAL_ALGORITHM)
    nltk = lambda text: [porter.stem(word) for word in treebank.tokenize(text.lower()) if word not in STOP_WORDS]
    text = open(f"{data_dir}/News_train.json", encoding="utf-8").read()
    if not text.lstrip().startswith("["):   # JSON lines (one record a line, as the competition may ship it): the
        text = "[" + ",".join(line for line in text.split("\n") if line.strip()) + "]"   # same records as one array
    texts = [record["headline"] + " " + record["short_description"] for record in json.loads(text)][: n_docs or None]
    speeds = {}
    for name, pipeline in [("tokenizer.py", preprocess), ("NLTK", nltk)]:
        stem.cache_clear()  # the first call of a run pays for stemming every distinct word, as a user's would
        t0 = time.perf_counter()
        n_tokens = sum(len(pipeline(text)) for text in texts)
        speeds[name] = len(texts) / (time.perf_counter() - t0)
        print(f"{name:13s}: {speeds[name]:10,.0f} docs/s  ({len(texts):,} docs, {n_tokens:,} tokens)")
    print(f"speed-up     : {speeds['tokenizer.py'] / speeds['NLTK']:.1f}x")


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
    sentences = parse_overrides(sys.argv[1:], globals(), CHECKS)
    try:
        for sentence in [] if bench else sentences or ["The cats are running quickly!"]:
            show_stages(sentence, vocab_path)
        if bench:
            run_bench(data_dir, bench_docs)
    except (OSError, ValueError, KeyError, TypeError) as e:   # the one file read: missing, not JSON, not what it holds
        sys.exit(f"error: {data_dir if bench else vocab_path}: {type(e).__name__}: {e}")
