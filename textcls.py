"""
News classification into 15 categories with a Transformer encoder built from PyTorch's own blocks
(homework part 2-1): tokenizer.py's preprocessing, `<cls> headline <sep> description`, nn.TransformerEncoder,
optional masked-language pre-training of the same encoder (BERT's recipe), a hand-written training loop, and the
competition's submission.csv.

    python textcls.py --train --data_dir=data/news --out_dir=out/textcls --max_minutes=20
    python textcls.py --predict --out_dir=out/textcls --test_file=data/news/News_test.json --submission=submission.csv
    python textcls.py --attention="Stocks fall as Fed raises rates" --out_dir=out/textcls   # attention-map PNG
    python textcls.py --bench --data_dir=data/news        # beside fastText and TF-IDF + LR on one held-out split
    python textcls.py --train --pretrain_epochs=2 ...     # masked-language pre-training first, then fine-tuning
    torchrun --nproc_per_node=2 textcls.py --train ...    # several processes (DDP), as nanoGPT does it

Training writes into out_dir: ckpt.pt (the latest state, to resume; it holds the vocabulary and the configuration
with the weights), best.pt (best validation accuracy, the same), pretrain.pt (the masked-language phase, when
pretrain_epochs > 0), vocab.json (a readable copy of the vocabulary), history.json and learning_curve.png. Run the
same --train command again to resume; Ctrl-C or SIGTERM saves a checkpoint at the step reached, then stops.
"""
import hashlib
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from tokenizer import Vocab, parse_overrides, preprocess, stem as porter_stem

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
# what to do
train = False           # train on data_dir/News_train.json
predict = False         # write submission for test_file
bench = False           # the benchmark: this model (without and with MLM) beside fastText and TF-IDF + LR
attention = ""          # a sentence: draw its attention maps into out_dir/attention.png
data_dir = "data/news"
out_dir = "out/textcls"
test_file = "data/news/News_test.json"
submission = "submission.csv"
# preprocessing (tokenizer.py)
remove_stop = True      # drop the 179 stop words
stem = True             # Porter stems
min_freq = 2            # a token seen fewer times in the training split is <unk>
max_vocab = 50000       # the whole vocabulary, special tokens included
max_len = 64            # tokens per example, <cls> and <sep> included; longer ones are cut longest-first
# model
d_model = 128           # embedding and hidden size
nhead = 4               # attention heads (d_model must be a multiple)
d_hid = 256             # feed-forward size inside each layer
nlayers = 2             # encoder layers
dropout = 0.1
pos_encoding = "sinusoidal"  # "sinusoidal" (Vaswani et al. 2017, section 3.5) or "learned"
pooling = "mean"        # "mean" (masked mean over tokens) or "cls" (the <cls> position)
embeddings = ""         # GloVe-format text file (word v1 ... vd, d = d_model) to initialise matching rows
# masked-language pre-training (BERT, Devlin et al. 2019, section 3.1), then fine-tuning from its encoder
pretrain_epochs = 0     # epochs of MLM over the training texts (and the test texts) first; 0 = off
pretrain_lr = 1e-3      # peak learning rate of the MLM phase (same warmup and cosine shape)
mask_prob = 0.15        # share of the non-special positions chosen; of those 80 % <mask>, 10 % random, 10 % kept
pretrain_test = True    # MLM reads the test_file's headlines and descriptions too (never its labels)
pretrain_share = 0.5    # with max_minutes, MLM stops (and fine-tuning starts) after this share of the budget
encoder_lr_frac = 1.0   # fine-tuning: the pre-trained encoder's learning rate as a fraction of lr (the head's)
# training
epochs = 3
batch_size = 64
lr = 1e-3               # peak learning rate, after warmup
min_lr_frac = 0.05      # cosine decay ends at lr * min_lr_frac
warmup_steps = 300
weight_decay = 0.01     # AdamW, on weight matrices only (not biases, norms or embeddings)
grad_clip = 1.0
label_smoothing = 0.1
val_frac = 0.05         # stratified validation split of the training file; 0 = none (best.pt = the last epoch)
bucket = True           # batches of similar length (less padding, faster); False = fully random batches
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this many minutes of training; 0 = no limit
seed = 1337
device = ""             # "" = cuda if available, else cpu
precision = "auto"      # auto | bf16 | fp16 | fp32 (auto: bf16 where native, fp16 + scaler on older GPUs, else fp32)
deterministic = True    # deterministic algorithms, cuBLAS workspace, cuDNN flags: same command, same numbers
num_threads = 2         # CPU threads per process
log_every = 200         # steps between progress lines
# benchmark
holdout_frac = 0.1      # --bench: stratified held-out split that no model trains on
bench_pretrain_epochs = 2  # --bench: MLM epochs of its "with MLM" run when pretrain_epochs is 0
# -----------------------------------------------------------------------------

CHECKS = {
    "min_freq": (lambda v: v >= 1, "an integer >= 1"),
    "max_vocab": (lambda v: v > len(Vocab.SPECIALS), f"an integer > {len(Vocab.SPECIALS)} (the special tokens)"),
    "max_len": (lambda v: v >= 3, "an integer >= 3 (<cls>, <sep> and one token)"),
    "d_model": (lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
    "nhead": (lambda v: v >= 1, "an integer >= 1"),
    "d_hid": (lambda v: v >= 1, "an integer >= 1"),
    "nlayers": (lambda v: v >= 1, "an integer >= 1"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "pos_encoding": ("sinusoidal", "learned"),
    "pooling": ("mean", "cls"),
    "pretrain_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "pretrain_lr": (lambda v: v > 0, "a number > 0"),
    "mask_prob": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "pretrain_share": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "encoder_lr_frac": (lambda v: v >= 0, "a number >= 0"),
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "min_lr_frac": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v > 0, "a number > 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "val_frac": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "max_minutes": (lambda v: v >= 0, "a number >= 0"),
    "device": (lambda v: v in ("", "cpu", "cuda") or v.startswith("cuda:"), '"", "cpu", "cuda" or "cuda:N"'),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "num_threads": (lambda v: v >= 1, "an integer >= 1"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
    "holdout_frac": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "bench_pretrain_epochs": (lambda v: v >= 1, "an integer >= 1"),
}

NUM_CLASSES = 15
LABEL_NAMES = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING",
               "HEALTHY LIVING", "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS",
               "BLACK VOICES", "HOME & LIVING", "PARENTS"]


# ----------------------------------------------------------------------------- data
class NewsFormatError(ValueError):
    """Bad input; the message names the file and the record."""


def read_utf8(path):
    """The whole text of a file; bytes that are not UTF-8 are a NewsFormatError naming file, line and byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise NewsFormatError(f"{os.path.basename(path)}: line {line}: byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start} is not UTF-8 (save the file as UTF-8)") from None


def load_news(path, require_label=True):
    """A News_*.json file as a list of dicts {id, headline, short_description[, label]}. Accepts a JSON array
    or JSON lines (one object a line); anything malformed is a NewsFormatError naming file and record."""
    name = os.path.basename(path)
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            objects = json.loads(text)
        except json.JSONDecodeError as e:
            raise NewsFormatError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        where = [f"record {i}" for i in range(len(objects))]
    else:
        objects, where = [], []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objects.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise NewsFormatError(f"{name}: line {line_number}: invalid JSON: {e.msg}") from None
                where.append(f"line {line_number}")
    records = [_check_record(obj, name, w, require_label) for obj, w in zip(objects, where)]
    if not records:
        raise NewsFormatError(f"{name}: no records")
    return records


def _check_record(obj, name, where, require_label):
    if not isinstance(obj, dict):
        raise NewsFormatError(f"{name}: {where}: expected an object, got {type(obj).__name__}")
    fields = [("id", int), ("headline", str), ("short_description", str)]
    if require_label or "label" in obj:
        fields.append(("label", int))
    for field, kind in fields:
        if field not in obj:
            raise NewsFormatError(f"{name}: {where}: missing field '{field}'")
        if not isinstance(obj[field], kind) or isinstance(obj[field], bool):
            raise NewsFormatError(f"{name}: {where}: field '{field}' must be {kind.__name__}, "
                                  f"got {obj[field]!r}")
    if "label" in obj and not 0 <= obj["label"] < NUM_CLASSES:
        raise NewsFormatError(f"{name}: {where}: label {obj['label']} is outside 0..{NUM_CLASSES - 1}")
    return obj


def stratified_split(labels, frac, seed):
    """Indices (kept, held_out): frac of every class held out (at least one record of a class that has two),
    so rare classes are in both parts."""
    rng = random.Random(seed)
    by_class = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    kept, held_out = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        n_out = min(len(indices) - 1, max(1, round(len(indices) * frac))) if frac > 0 else 0
        held_out += indices[:n_out]
        kept += indices[n_out:]
    return sorted(kept), sorted(held_out)


_TOKENS = {}   # (headline, description, remove_stop, stem) -> token lists: --bench tokenizes each record once


def record_tokens(record, config):
    """The two segments of one record as token lists (tokenizer.py's pipeline, with config's settings)."""
    key = (record["headline"], record["short_description"], config["remove_stop"], config["stem"])
    if key not in _TOKENS:
        _TOKENS[key] = (preprocess(record["headline"], config["remove_stop"], config["stem"]),
                        preprocess(record["short_description"], config["remove_stop"], config["stem"]))
    return _TOKENS[key]


def encode_pairs(token_pairs, vocab, length):
    """(headline tokens, description tokens) pairs -> `<cls> a <sep> b` ids, cut to length longest-first."""
    return [vocab.encode(a, max_len=length, tokens_b=b) for a, b in token_pairs]


def encode_records(records, vocab, config):
    return encode_pairs([record_tokens(r, config) for r in records], vocab, config["max_len"])


def fingerprint(records, with_labels=True):
    """A short hash of the records' texts (and labels): a resumed run must train on the same data."""
    digest = hashlib.sha1()
    for r in records:
        digest.update(f"{r['headline']}\x00{r['short_description']}\x00"
                      f"{r.get('label', '') if with_labels else ''}\x01".encode("utf-8", "surrogatepass"))
    return f"{len(records)} records, sha1 {digest.hexdigest()[:16]}"


def make_batches(lengths, batch_size, rng, bucket):
    """Lists of example indices. With bucketing, shuffle, then sort each window of 50 batches by length and
    cut it into batches: each batch holds similar lengths (little padding) yet the order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded, indices, labels=None):
    """Pad to the longest example of this batch (not to a global maximum) with <pad> = 0."""
    width = max(len(encoded[i]) for i in indices)
    ids = torch.full((len(indices), width), Vocab.pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
    return ids, (torch.tensor([labels[i] for i in indices]) if labels is not None else None)


def mask_tokens(ids, vocab_size, generator, prob):
    """BERT's masking (Devlin et al. 2019, 3.1): each non-special position is chosen with probability prob; of the
    chosen, 80 % become <mask>, 10 % a random non-special token, 10 % stay. Returns (inputs, labels) with labels
    -100 (ignored by the loss) wherever a position was not chosen. Specials (<pad>, <unk>, <cls>, <sep>) never are."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & (ids >= len(Vocab.SPECIALS))
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(Vocab.SPECIALS), vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, Vocab.mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------- model
class SinusoidalPositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 3.5)."""

    def __init__(self, d_model, max_len):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        inverse_frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * inverse_frequency)
        pe[:, 1::2] = torch.cos(position * inverse_frequency)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x):  # x: (batch, length, d_model)
        return x + self.pe[: x.size(1)]


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len):
        super().__init__()
        self.pe = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.pe.weight, std=0.02)

    def forward(self, x):
        return x + self.pe.weight[: x.size(1)]


def run_encoder(module, ids):
    """Token embedding scaled by sqrt(d_model) (so the positional signal does not swamp it, section 3.4),
    positions, dropout, the encoder with the padding mask. -> (states (batch, length, d_model), padding)."""
    padding = ids == Vocab.pad_id              # True where attention must not look
    x = module.dropout(module.positional(module.embedding(ids) * math.sqrt(module.d_model)))
    return module.encoder(x, src_key_padding_mask=padding), padding


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, d_hid, nlayers, dropout, max_len, pos_encoding, pooling):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.d_model, self.pooling = d_model, pooling
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=Vocab.pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)
        with torch.no_grad():
            self.embedding.weight[Vocab.pad_id].zero_()
        positional = {"sinusoidal": SinusoidalPositionalEncoding, "learned": LearnedPositionalEncoding}
        if pos_encoding not in positional:
            raise ValueError(f"pos_encoding must be 'sinusoidal' or 'learned', got {pos_encoding!r}")
        self.positional = positional[pos_encoding](d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        # Pre-norm layers (norm_first) train stably without a long warmup; a final LayerNorm closes the stack.
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, norm=nn.LayerNorm(d_model),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, ids):
        x, padding = run_encoder(self, ids)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:                                      # mean over real tokens only
            keep = (~padding).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(self.dropout(pooled))

    @torch.no_grad()
    def attention_maps(self, ids):
        """Per layer, the attention weights (batch, heads, query, key) that forward() uses. nn.TransformerEncoder
        does not return them, so run its layers one at a time and ask each one's attention for its weights."""
        padding = ids == Vocab.pad_id
        x = self.positional(self.embedding(ids) * math.sqrt(self.d_model))
        maps = []
        for layer in self.encoder.layers:
            h = layer.norm1(x) if layer.norm_first else x
            _, weights = layer.self_attn(h, h, h, key_padding_mask=padding, need_weights=True,
                                         average_attn_weights=False)
            maps.append(weights)
            x = layer(x, src_key_padding_mask=padding)
        return maps


class MaskedLanguageModel(nn.Module):
    """The classifier's own embedding, positions and encoder (the same modules, not copies) with BERT's MLM head:
    dense + GELU + LayerNorm, then an output layer whose weight IS the token embedding (tied, as in BERT and
    Vaswani et al. 3.4) plus a bias of its own. Only the chosen positions go through the output layer."""

    def __init__(self, classifier):
        super().__init__()
        self.d_model = classifier.d_model
        self.embedding, self.positional = classifier.embedding, classifier.positional
        self.dropout, self.encoder = classifier.dropout, classifier.encoder
        self.transform = nn.Sequential(nn.Linear(self.d_model, self.d_model), nn.GELU(), nn.LayerNorm(self.d_model))
        self.bias = nn.Parameter(torch.zeros(classifier.embedding.num_embeddings))

    def forward(self, ids, labels):
        """-> (logits over the vocabulary at the chosen positions, their targets)."""
        x, _ = run_encoder(self, ids)
        chosen = labels != -100
        return F.linear(self.transform(x[chosen]), self.embedding.weight, self.bias), labels[chosen]


MODEL_KEYS = ["remove_stop", "stem", "max_len", "d_model", "nhead", "d_hid", "nlayers", "dropout", "pos_encoding",
              "pooling"]


def build_model(config, vocab_size):
    return TransformerClassifier(vocab_size, config["d_model"], config["nhead"], config["d_hid"],
                                 config["nlayers"], config["dropout"], config["max_len"],
                                 config["pos_encoding"], config["pooling"])


def load_glove(path, vocab, embedding, use_stems):
    """Initialise the embedding rows of tokens found in a GloVe text file. Vocabulary tokens are Porter stems
    when stem=True, so a GloVe word also matches through its stem; GloVe lists frequent words first, so the
    most frequent word of each stem wins. Returns the number of rows set."""
    matched = set()
    with torch.no_grad():
        for line_number, line in enumerate(read_utf8(path).splitlines(), 1):
            word, *values = line.rstrip().split(" ")
            if len(values) != embedding.embedding_dim:
                raise NewsFormatError(f"{os.path.basename(path)}: line {line_number}: {len(values)} numbers, "
                                      f"but d_model is {embedding.embedding_dim}")
            for token in {word, porter_stem(word) if use_stems and word.isalpha() else word}:
                index = vocab.stoi.get(token)
                if index is not None and index >= len(Vocab.SPECIALS) and index not in matched:
                    embedding.weight[index] = torch.tensor([float(v) for v in values])
                    matched.add(index)
    return len(matched)


# ----------------------------------------------------------------------------- precision
def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively: AMX or AVX512-BF16 in Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(requested, device_type):
    """The autocast precision for `precision` on this device, and why: auto is bf16 where the hardware computes it
    natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16), fp16 with a gradient
    scaler on older GPUs (a T4, 7.5, only emulates bf16: its convolutions then skip cuDNN and the tensor cores),
    and fp32 elsewhere."""
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
        return "fp16", f"CUDA capability {major}.{minor} has no native bfloat16: float16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return "bf16", "this CPU computes bfloat16 natively (AMX or AVX512-BF16)"
    return "fp32", f"no native bfloat16 on this {device_type}"


def check_cuda_build():
    """Stop at once where this PyTorch build has no kernels for the GPU (Kaggle's P100, sm_60, under a build for
    sm_70 and newer), rather than with a CUDA error from deep inside. A cubin sm_XY runs on capability X.y for
    y >= Y; PTX compute_XY is compiled for any capability >= X.Y."""
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    def version(arch):  # "sm_86" -> (8, 6), "sm_90a" -> (9, 0), "compute_120" -> (12, 0)
        digits = "".join(char for char in arch.split("_")[-1] if char.isdigit())
        return int(digits[:-1]), int(digits[-1])
    runs = any((arch.startswith("sm_") and version(arch)[0] == major and version(arch)[1] <= minor) or
               (arch.startswith("compute_") and version(arch) <= (major, minor)) for arch in archs)
    if archs and not runs:
        raise SystemExit(f"error: this PyTorch {torch.__version__} has GPU kernels for {' '.join(archs)}, none for "
                         f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a PyTorch build that lists "
                         f"sm_{major}{minor} (see the README, 'On a GPU'), or choose another GPU")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GRAD_SCALER_INIT = 2.0 ** 16   # torch's default initial loss scale (tests start higher to force skipped steps)


def autocast(device_type, name):
    return torch.autocast(device_type, dtype=DTYPES[name], enabled=name != "fp32")


def set_deterministic(on):
    """The same command gives the same numbers on the same GPU (the homework asks "fully reproducible"):
    deterministic algorithms only (an op without one stops with an error instead of varying), the cuBLAS
    workspace setting those need, and cuDNN without its run-time kernel search. A no-op cost on the CPU."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def default_device():
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- checkpoints and output paths
def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this script. weights_only=True: tensors, numbers, strings, lists and dicts only, so a file
    from elsewhere cannot run code on loading; a damaged file is a one-line error that says what to do."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise SystemExit(f"error: {path} holds objects other than tensors, numbers and strings, so it was not "
                             f"written by textcls.py; refused to load it (weights_only=True)") from None
        raise SystemExit(damaged(path, e)) from None
    except Exception as e:   # truncated, empty, not a zip
        raise SystemExit(damaged(path, e)) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint \
            or "vocab" not in checkpoint:
        raise SystemExit(f"error: {path} is not a checkpoint of this textcls.py (no model, configuration and "
                         f"vocabulary inside; older versions kept the vocabulary apart): train into another --out_dir")
    return checkpoint


def damaged(path, error):
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
    previous = (f"the previous state may be in {path}.tmp (rename it to {os.path.basename(path)} to use it), or "
                if os.path.exists(path + ".tmp") else "")
    return f"error: {path} is damaged ({type(error).__name__}: {reason}); {previous}delete it to start again"


def check_writable(path, is_folder=True):
    """Make sure out_dir (created if missing) or a file's folder takes new files, before any long work."""
    folder = path if is_folder else (os.path.dirname(path) or ".")
    try:
        if is_folder:
            os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        if not is_folder and os.path.isdir(path):
            raise IsADirectoryError(21, "is a folder")
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror or e}")


def weights_finite(model):
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


# ----------------------------------------------------------------------------- evaluation
def classification_metrics(predictions, labels):
    """Accuracy and macro-F1 (the mean over classes of 2PR/(P+R)), from the confusion matrix."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)), 1)
    true_positive = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    f1 = np.divide(2 * true_positive, predicted + actual, out=np.zeros(NUM_CLASSES), where=predicted + actual > 0)
    present = actual > 0
    return {"accuracy": float(true_positive.sum() / max(1, confusion.sum())),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


@torch.no_grad()
def predict_logits(model, encoded, run_device, precision_name="fp32", batch=256):
    """Logits for every example, in order (batches of similar length for speed, then put back in order)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits = torch.empty(len(encoded), NUM_CLASSES)
    for s in range(0, len(order), batch):
        indices = order[s:s + batch]
        ids, _ = collate(encoded, indices)
        with autocast(run_device.split(":")[0], precision_name):
            logits[indices] = model(ids.to(run_device)).float().cpu()
    return logits


def evaluate(model, encoded, labels, run_device, precision_name):
    logits = predict_logits(model, encoded, run_device, precision_name)
    metrics = classification_metrics(logits.argmax(1).tolist(), labels)
    metrics["loss"] = F.cross_entropy(logits, torch.tensor(labels)).item()
    return metrics


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps, peak=None):
    """Linear warmup to the peak (lr unless given), then cosine decay to peak * min_lr_frac at the last step."""
    peak = lr if peak is None else peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# What a run is, saved in every checkpoint. A resumed run must match it, except for the RESUMABLE keys (more epochs,
# a lower learning rate...), which continue with the new value and say so.
TRAIN_KEYS = MODEL_KEYS + ["min_freq", "max_vocab", "embeddings", "pretrain_epochs", "pretrain_lr", "mask_prob",
                           "pretrain_test", "pretrain_share", "encoder_lr_frac", "epochs", "batch_size", "lr",
                           "min_lr_frac", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing", "val_frac",
                           "bucket", "seed"]
RESUMABLE = {"epochs", "lr", "min_lr_frac", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing",
             "dropout", "embeddings", "pretrain_lr", "pretrain_share", "encoder_lr_frac"}


def run_config(records, mlm_records, world_size):
    config = {name: globals()[name] for name in TRAIN_KEYS}
    config["train_data"] = fingerprint(records)
    config["mlm_texts"] = fingerprint(mlm_records, with_labels=False) if pretrain_epochs and mlm_records else ""
    config["processes"] = world_size
    return config


def compare_config(path, saved, config):
    """Stop, naming every differing key, where this run cannot continue the saved one; return the keys that
    differ but may (RESUMABLE)."""
    missing = "(not saved)"
    differ = [key for key in config if saved.get(key, missing) != config[key]]
    refused = [key for key in differ if key not in RESUMABLE]
    if refused:
        raise SystemExit(f"error: {path} was trained with "
                         f"{', '.join(f'{key}={saved.get(key, missing)!r}' for key in refused)}; this run has "
                         f"{', '.join(f'{key}={config[key]!r}' for key in refused)}: run with the checkpoint's values "
                         f"to resume it, or train into another --out_dir")
    return [key for key in differ if key in RESUMABLE]


def setup_distributed():
    """-> (ddp, rank, world_size, device). Under torchrun (RANK and WORLD_SIZE set, as in nanoGPT) one process per
    GPU with nccl, or several CPU processes with gloo; otherwise one process."""
    run_device = default_device()
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, run_device
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if run_device.startswith("cuda"):
        run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(run_device)
    dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    return True, rank, world_size, run_device


def agree(flags, ddp, run_device):
    """Each flag True if it is True in any process. Every process gets the same answer, so all stop at the same
    step (one that stopped alone would leave the others waiting for it in the next gradient all-reduce)."""
    if not ddp:
        return [bool(f) for f in flags]
    import torch.distributed as dist
    values = torch.tensor([int(bool(f)) for f in flags], device=run_device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what Colab and Kaggle send when a runtime ends) asks the training loop to save
    a checkpoint after the current step and stop; a second Ctrl-C stops at once."""

    def __init__(self):
        self.name, self.number, self.previous = None, 0, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.name:
            raise KeyboardInterrupt
        self.name, self.number = signal.Signals(signum).name, signum
        print(f"\n{self.name}: saving a checkpoint after this step, then stopping", flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def parameter_groups(named_parameters, scale_of=lambda name: 1.0):
    """AdamW groups: weight decay on weight matrices only (not biases, norms, embeddings or positions), each group
    with an lr_scale (the pre-trained encoder may learn slower than the new head)."""
    groups = {}
    for name, p in named_parameters:
        decays = p.dim() >= 2 and "embedding" not in name and ".pe." not in name
        key = (decays, scale_of(name))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), ps in groups.items()]


def train_model(records, out_dir, mlm_records=None):
    """Train on records (a stratified val_frac of them validates), resuming from out_dir if it holds a run. With
    pretrain_epochs > 0: first masked-language pre-training on the texts of records and of mlm_records (unlabeled,
    the test texts), then fine-tuning from that encoder. Returns the history: one dict per finished epoch."""
    ddp, rank, world_size, run_device = setup_distributed()
    requested = StopRequest()
    try:
        return _train(records, out_dir, mlm_records, ddp, rank, world_size, run_device, requested)
    finally:
        requested.restore()
        if ddp:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(records, out_dir, mlm_records, ddp, rank, world_size, run_device, requested):
    device_type, master = run_device.split(":")[0], rank == 0
    log = print if master else (lambda *a, **k: None)
    start = time.time()
    deadline = start + max_minutes * 60 if max_minutes > 0 else math.inf
    if device_type == "cuda":
        check_cuda_build()
    set_deterministic(deterministic)
    precision_name, why = choose_precision(precision, device_type)
    check_writable(out_dir)
    ckpt_path, best_path, pre_path = (os.path.join(out_dir, name) for name in ("ckpt.pt", "best.pt", "pretrain.pt"))

    # what this run is, against what out_dir holds: nothing is written before they are found to agree
    config = run_config(records, mlm_records, world_size)
    checkpoint = load_checkpoint(ckpt_path, run_device) if os.path.exists(ckpt_path) else None
    pre = (load_checkpoint(pre_path, run_device) if pretrain_epochs and checkpoint is None and
           os.path.exists(pre_path) else None)
    saved = checkpoint or pre
    if saved is not None:
        path = ckpt_path if checkpoint else pre_path
        for key in compare_config(path, saved["config"], config):
            log(f"note: {key} = {config[key]!r} differs from {path}'s {saved['config'].get(key)!r}: "
                f"continuing with the new value")

    # data: validation split, vocabulary from the training part only (or the checkpoint's, which never changes)
    labels = [r["label"] for r in records]
    train_idx, val_idx = stratified_split(labels, val_frac, seed)
    tokens = [record_tokens(r, config) for r in records]
    vocab = Vocab(saved["vocab"]) if saved else \
        Vocab.build((t for i in train_idx for t in tokens[i]), min_freq=min_freq, max_size=max_vocab)
    train_encoded = encode_pairs([tokens[i] for i in train_idx], vocab, max_len)
    val_encoded = encode_pairs([tokens[i] for i in val_idx], vocab, max_len)
    train_labels, val_labels = [labels[i] for i in train_idx], [labels[i] for i in val_idx]
    if master and saved is None:
        vocab.save(os.path.join(out_dir, "vocab.json.tmp"))        # a readable copy; the checkpoints hold the real one
        os.replace(os.path.join(out_dir, "vocab.json.tmp"), os.path.join(out_dir, "vocab.json"))
    log(f"data: {len(train_idx)} train, {len(val_idx)} validation, vocabulary {len(vocab)} "
        f"({time.time() - start:.1f} s)")
    if not val_idx:
        log("no validation split (val_frac=0, or no class has two records): each epoch's model becomes best.pt")
    steps_per_epoch = math.ceil(len(train_idx) / batch_size) // world_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_idx)} training records make no batch for each of {world_size} processes")
    total_steps = epochs * steps_per_epoch

    torch.manual_seed(seed)
    model = build_model(config, len(vocab)).to(run_device)
    if embeddings and saved is None:
        log(f"embeddings: {load_glove(embeddings, vocab, model.embedding, stem)} rows initialised from {embeddings}")
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{ {key: config[key] for key in MODEL_KEYS} }")
    log(f"precision: {precision_name} ({why}); deterministic algorithms {'on' if deterministic else 'off'}")
    from torch.nn.parallel import DistributedDataParallel
    wrap = (lambda m: DistributedDataParallel(m, device_ids=[run_device] if device_type == "cuda" else None)) \
        if ddp else (lambda m: m)

    def stop_for_nonfinite(phase, step, value, path):
        last = (f"the last good checkpoint {path} (step {load_checkpoint(path)['step']}) is kept"
                if os.path.exists(path) else "nothing was saved")
        message = (f"error: the {phase} loss is {value} at step {step + 1}: training stopped; {last}. "
                   f"Lower --lr (now {lr if phase == 'training' else pretrain_lr}) or try --precision=fp32")
        raise SystemExit(message if master else 1)

    def stop_for_signal(step, path):
        if master:
            print(f"stopped by {requested.name} at step {step}: checkpoint saved in {path}; run the same command to "
                  f"resume", file=sys.stderr, flush=True)
        if ddp:
            import torch.distributed as dist
            dist.barrier()
        raise SystemExit(128 + requested.number)

    def run_phase(label, net, optimizer, scaler, step, total, per_epoch, lengths, batch_loss, peak_lr, seed_offset,
                  phase_deadline, end_epoch, save):
        """The loop of one phase from `step` on. -> (step, why it stopped: None when done, "time", "share",
        "signal", or "nonfinite", the loss value)."""
        skipped = 0
        while step < total:
            epoch = step // per_epoch
            # the batch order of an epoch depends only on (seed, epoch): a resumed run skips what it already did
            batches = make_batches(lengths, batch_size, random.Random(seed + seed_offset + epoch), bucket)
            batches = batches[rank:per_epoch * world_size:world_size]
            net.train()
            tick, seen, loss_sum, loss_count, reason = time.time(), 0, 0.0, 0, None
            for batch in batches[step - epoch * per_epoch:]:
                torch.manual_seed(seed + seed_offset + step * world_size + rank)   # dropout masks repeat on resume
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total, peak_lr) * group["lr_scale"]
                with autocast(device_type, precision_name):
                    loss = batch_loss(net, batch, step)
                value = loss.item()
                now = time.time()
                nonfinite, time_up, share_up, signalled = agree(
                    [not math.isfinite(value), now > deadline, now > phase_deadline, requested.name], ddp, run_device)
                if nonfinite:
                    return step, "nonfinite", value
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)           # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
                scale = scaler.get_scale() if scaler.is_enabled() else 0.0
                scaler.step(optimizer)               # skipped by the scaler where a gradient is inf or NaN
                scaler.update()
                skipped += scaler.is_enabled() and scaler.get_scale() < scale
                step += 1
                seen += len(batch) * world_size
                loss_sum, loss_count = loss_sum + value, loss_count + 1
                if step % log_every == 0:
                    rate = seen / max(1e-9, time.time() - tick)
                    left = (total - step) * batch_size * world_size / rate
                    log(f"{label}epoch {epoch + 1} step {step}/{total} loss {loss_sum / loss_count:.4f} "
                        f"lr {learning_rate(step, total, peak_lr):.2e} {rate:.0f} examples/s, about "
                        f"{left / 60:.1f} min left" + (f"; {skipped} steps skipped by the gradient scaler"
                                                        if skipped else ""), flush=True)
                if time_up or share_up or signalled:
                    reason = "signal" if signalled else "time" if time_up else "share"
                    break
            if not weights_finite(net):
                return step, "nonfinite", "finite, but the weights are not"
            if step % per_epoch == 0 or step == total:      # a whole epoch done
                end_epoch(epoch, step, loss_sum / max(1, loss_count))
            save(step, reason)
            if reason:
                return step, reason, None
        return step, None, None

    seconds_before = saved.get("seconds", 0.0) if saved else 0.0
    seconds = lambda: seconds_before + time.time() - start

    # ------------------------------------------------------------------ phase 1: masked-language pre-training
    pretrained = bool(pretrain_epochs) and (checkpoint is None or checkpoint.get("pretrained", False))
    if pretrain_epochs and checkpoint is None:
        mlm = MaskedLanguageModel(model).to(run_device)
        mlm_texts = records + list(mlm_records or [])
        mlm_encoded = encode_records(mlm_texts, vocab, config)
        mlm_steps_per_epoch = math.ceil(len(mlm_encoded) / batch_size) // world_size
        mlm_total = pretrain_epochs * mlm_steps_per_epoch
        mlm_optimizer = torch.optim.AdamW(parameter_groups(mlm.named_parameters()), lr=pretrain_lr)
        mlm_scaler = torch.amp.GradScaler(device_type, init_scale=GRAD_SCALER_INIT, enabled=precision_name == "fp16")
        mlm_step, pre_history, done = 0, [], False
        if pre is not None:
            mlm.load_state_dict(pre["model"])
            mlm_optimizer.load_state_dict(pre["optimizer"])
            if mlm_scaler.is_enabled() and pre["scaler"]:
                mlm_scaler.load_state_dict(pre["scaler"])
            mlm_step, pre_history, done = pre["step"], pre["history"], pre["done"]
            log(f"resuming pre-training from {pre_path} at step {mlm_step}" if not done else
                f"pre-training done ({pre_path}, step {mlm_step}): fine-tuning from its encoder")
        if not done:
            log(f"pre-training: masked-language model on {len(mlm_texts)} texts ({len(records)} training"
                f"{f', {len(mlm_records)} test' if mlm_records else ''}), {pretrain_epochs} epochs, "
                f"{mlm_total} steps")
            mlm_net = wrap(mlm)

            def mlm_loss(net, batch, step):
                ids, _ = collate(mlm_encoded, batch)
                generator = torch.Generator().manual_seed(seed * 1000003 + step * world_size + rank)
                inputs, targets = mask_tokens(ids, len(vocab), generator, mask_prob)
                logits, chosen = net(inputs.to(run_device), targets.to(run_device))
                if chosen.numel() == 0:        # nothing chosen in this batch: a zero loss that reaches every weight
                    return logits.float().sum() * 0.0
                return F.cross_entropy(logits.float(), chosen)

            def mlm_epoch_end(epoch, step, loss):
                pre_history.append({"epoch": epoch + 1, "step": step, "mlm_loss": loss, "minutes": seconds() / 60})
                log(f"pre-training epoch {epoch + 1}: masked-language loss {loss:.4f}")

            def save_pretrain(step, reason):
                if master:
                    save_atomic({"model": mlm.state_dict(), "optimizer": mlm_optimizer.state_dict(),
                                 "scaler": mlm_scaler.state_dict(), "step": step, "done": reason == "share" or
                                 step >= mlm_total, "history": pre_history, "seconds": seconds(), "config": config,
                                 "vocab": vocab.itos}, pre_path)

            share_deadline = start + pretrain_share * max_minutes * 60 if max_minutes > 0 else math.inf
            mlm_step, reason, value = run_phase("pre-training ", mlm_net, mlm_optimizer, mlm_scaler, mlm_step,
                                                mlm_total, mlm_steps_per_epoch, [len(e) for e in mlm_encoded],
                                                mlm_loss, pretrain_lr, 7777, share_deadline, mlm_epoch_end,
                                                save_pretrain)
            if reason == "nonfinite":
                stop_for_nonfinite("pre-training", mlm_step, value, pre_path)
            if reason == "signal":
                stop_for_signal(mlm_step, pre_path)
            if reason == "time":
                log(f"stopped after {max_minutes} minutes in pre-training at step {mlm_step}/{mlm_total}; checkpoint "
                    f"saved, run the same command to resume")
                if ddp:
                    import torch.distributed as dist
                    dist.barrier()
                return []
            if reason == "share":
                log(f"pre-training stopped at step {mlm_step}/{mlm_total}, its share ({pretrain_share}) of "
                    f"--max_minutes: fine-tuning starts")
        del mlm

    # ------------------------------------------------------------------ phase 2: classification (fine-tuning)
    encoder_scale = (lambda name: 1.0 if name.startswith("head.") else encoder_lr_frac) if pretrained \
        else (lambda name: 1.0)
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), encoder_scale), lr=lr)
    scaler = torch.amp.GradScaler(device_type, init_scale=GRAD_SCALER_INIT, enabled=precision_name == "fp16")
    step, history, best_accuracy = 0, [], -1.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        step, history, best_accuracy = checkpoint["step"], checkpoint["history"], checkpoint["best_accuracy"]
        log(f"resuming from {ckpt_path} at step {step} (epoch {step // steps_per_epoch + 1})")
    elif pretrained:
        log(f"fine-tuning from the pre-trained encoder (encoder learning rate {encoder_lr_frac} x lr)")
    net = wrap(model)

    def classify_loss(net, batch, step):
        ids, targets = collate(train_encoded, batch, train_labels)
        return F.cross_entropy(net(ids.to(run_device)).float(), targets.to(run_device),
                               label_smoothing=label_smoothing)

    def save_best(metrics, epoch):
        save_atomic({"model": model.state_dict(), "config": config, "vocab": vocab.itos, "epoch": epoch,
                     "metrics": metrics}, best_path)

    def end_epoch(epoch, step, train_loss):
        nonlocal best_accuracy
        if not master:
            return
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "minutes": seconds() / 60}
        if val_idx:
            metrics.update(evaluate(model, val_encoded, val_labels, run_device, precision_name))
            log(f"epoch {epoch + 1}: train loss {train_loss:.4f} val loss {metrics['loss']:.4f} "
                f"val accuracy {metrics['accuracy']:.4f} val macro-F1 {metrics['macro_f1']:.4f}", flush=True)
        else:
            log(f"epoch {epoch + 1}: train loss {train_loss:.4f} (no validation split)", flush=True)
        history.append(metrics)
        if not val_idx or metrics["accuracy"] > best_accuracy:
            best_accuracy = metrics.get("accuracy", best_accuracy)
            save_best(metrics, epoch + 1)
        with open(os.path.join(out_dir, "history.json.tmp"), "w") as f:
            json.dump(history, f, indent=1)
        os.replace(os.path.join(out_dir, "history.json.tmp"), os.path.join(out_dir, "history.json"))
        plot_learning_curve(history, os.path.join(out_dir, "learning_curve.png"))

    def save(step, reason):
        if master:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "history": history,
                         "best_accuracy": best_accuracy, "seconds": seconds(), "pretrained": pretrained,
                         "config": config, "vocab": vocab.itos}, ckpt_path)

    step, reason, value = run_phase("", net, optimizer, scaler, step, total_steps, steps_per_epoch,
                                    [len(e) for e in train_encoded], classify_loss, lr, 0, math.inf, end_epoch, save)
    if reason == "nonfinite":
        stop_for_nonfinite("training", step, value, ckpt_path)
    if reason == "signal":
        stop_for_signal(step, ckpt_path)
    if reason == "time":
        log(f"stopped after {max_minutes} minutes at step {step}/{total_steps}; checkpoint saved, "
            f"run the same command to resume")
    if not os.path.exists(best_path) and master:   # stopped before the first epoch ended
        save_best(evaluate(model, val_encoded, val_labels, run_device, precision_name) if val_idx else {}, 0)
    if ddp:
        import torch.distributed as dist
        dist.barrier()                             # rank 0's last saves are done before any process leaves
    return history


# ----------------------------------------------------------------------------- prediction
def load_trained(out_dir, run_device):
    """The best checkpoint: (model, vocabulary, the configuration it was trained with). The preprocessing settings
    come from the checkpoint and are passed on explicitly; this module's constants are left as they are."""
    path = os.path.join(out_dir, "best.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: train first (python textcls.py --train --out_dir={out_dir})")
    checkpoint = load_checkpoint(path, run_device)
    vocab = Vocab(checkpoint["vocab"])
    model = build_model(checkpoint["config"], len(vocab)).to(run_device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), vocab, checkpoint["config"]


def write_submission(out_dir, test_file, submission):
    """`id,label` for every record of test_file, in id order, written atomically. With labels in the file, also
    the accuracy. The submission's folder is checked before any work."""
    check_writable(submission, is_folder=False)
    run_device = default_device()
    model, vocab, config = load_trained(out_dir, run_device)
    records = sorted(load_news(test_file, require_label=False), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise NewsFormatError(f"{os.path.basename(test_file)}: id {next(i for i in ids if ids.count(i) > 1)} "
                              f"appears more than once")
    precision_name, _ = choose_precision(precision, run_device.split(":")[0])
    predictions = predict_logits(model, encode_records(records, vocab, config), run_device,
                                 precision_name).argmax(1).tolist()
    with open(submission + ".tmp", "w") as f:
        f.write("id,label\n")
        f.writelines(f"{i},{p}\n" for i, p in zip(ids, predictions))
    os.replace(submission + ".tmp", submission)     # a kill never leaves half a submission, nor loses the old one
    print(f"wrote {len(records)} predictions to {submission}")
    if all("label" in r for r in records):
        metrics = classification_metrics(predictions, [r["label"] for r in records])
        print(f"accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
    return predictions


# ----------------------------------------------------------------------------- figures (PIL only)
def plot_learning_curve(history, path):
    """Two panels: train and validation loss per epoch; validation accuracy and macro-F1 per epoch (the second
    stays empty without a validation split)."""
    epochs_done = [h["epoch"] for h in history]
    image = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(image)
    with_val = all("accuracy" in h for h in history)
    losses = {"train loss": [h["train_loss"] for h in history]}
    if with_val:
        losses["val loss"] = [h["loss"] for h in history]
    draw_chart(draw, (60, 30, 430, 320), epochs_done, losses, "loss")
    if with_val:
        draw_chart(draw, (510, 30, 880, 320), epochs_done, {"val accuracy": [h["accuracy"] for h in history],
                                                            "val macro-F1": [h["macro_f1"] for h in history]}, "score")
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
CHART_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def draw_chart(draw, box, xs, series, title):
    """A line chart of each named series over xs inside box, with min/max labels and a legend."""
    left, top, right, bottom = box
    values = [v for ys in series.values() for v in ys]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    to_pixel = lambda x, y: (left + (x - x_low) / (x_high - x_low) * (right - left),
                             bottom - (y - low) / (high - low) * (bottom - top))
    draw.rectangle(box, outline="black")
    draw.text((left, top - 18), title, fill="black")
    draw.text((left - 55, top), f"{high:.3f}", fill="black")
    draw.text((left - 55, bottom - 10), f"{low:.3f}", fill="black")
    draw.text((left, bottom + 5), f"epoch {x_low}", fill="black")
    draw.text((right - 50, bottom + 5), f"epoch {x_high}", fill="black")
    for k, (name, ys) in enumerate(series.items()):
        points = [to_pixel(x, y) for x, y in zip(xs, ys)]
        colour = CHART_COLOURS[k % len(CHART_COLOURS)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((left + 60 + 110 * k, top - 18), name, fill=colour)   # legend beside the title


def plot_attention(tokens, maps, path, cell=28):
    """One heat map per layer (averaged over heads): row = query token, column = key token, darker = more."""
    n = len(tokens)
    label_width = 8 * max(len(t) for t in tokens) + 10
    panel = label_width + n * cell + 20
    image = Image.new("RGB", (panel * len(maps), label_width + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    for layer, weights in enumerate(maps):
        weights = weights[0].mean(0)[:n, :n]            # first example, mean over heads: (query, key)
        x0, y0 = layer * panel + label_width, label_width + 20
        draw.text((x0, 2), f"layer {layer + 1} (mean over heads)", fill="black")
        for q in range(n):
            draw.text((x0 - label_width + 2, y0 + q * cell + 8), tokens[q], fill="black")
            for k in range(n):
                shade = int(255 * (1 - float(weights[q, k]) / float(weights.max())))
                draw.rectangle((x0 + k * cell, y0 + q * cell, x0 + (k + 1) * cell - 1, y0 + (q + 1) * cell - 1),
                               fill=(shade, shade, 255))
        for k, token in enumerate(tokens):     # key labels written sideways above the columns
            label = Image.new("RGB", (label_width, 14), "white")
            ImageDraw.Draw(label).text((2, 1), token, fill="black")
            image.paste(label.rotate(90, expand=True), (x0 + k * cell + 7, 18))
    image.save(path)


def draw_attention(sentence, out_dir):
    model, vocab, config = load_trained(out_dir, "cpu")
    headline, _, description = sentence.partition("|")   # "headline | description" gives two segments
    words = lambda text: preprocess(text, config["remove_stop"], config["stem"])
    ids = vocab.encode(words(headline), max_len=config["max_len"], tokens_b=words(description) if description else None)
    ids = torch.tensor([ids])
    with torch.no_grad():
        probabilities = model(ids).softmax(-1)[0]
    path = os.path.join(out_dir, "attention.png")
    plot_attention(vocab.decode(ids[0].tolist()), model.attention_maps(ids), path)
    print(f"{sentence!r} -> {LABEL_NAMES[int(probabilities.argmax())]} ({float(probabilities.max()):.2f}); "
          f"attention maps in {path}")




# ----------------------------------------------------------------------------- benchmark
def bench_speed(records, steps=40, rounds=2):
    """Training examples/s of the configured model on this device with fp32 and with bf16 autocast, on the same
    batches in the same run. The rounds alternate the two and the best round of each counts (other work on a
    shared machine slows some rounds down)."""
    run_device = default_device()
    device_type = run_device.split(":")[0]
    config = {key: globals()[key] for key in MODEL_KEYS}
    tokens = [record_tokens(r, config) for r in records]
    vocab = Vocab.build((t for pair in tokens for t in pair), min_freq=min_freq, max_size=max_vocab)
    encoded, labels = encode_pairs(tokens, vocab, max_len), [r["label"] for r in records]
    batches = make_batches([len(e) for e in encoded], batch_size, random.Random(seed), bucket)[:steps + 5]
    best = {}
    for _ in range(rounds):
        for name in ("fp32", "bf16"):
            torch.manual_seed(seed)
            model = build_model(config, len(vocab)).to(run_device).train()
            optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters()), lr=lr)
            for i, batch in enumerate(batches):
                if i == 5:                      # the first steps warm up (allocations, kernel choice)
                    tick, seen = time.perf_counter(), 0
                ids, targets = collate(encoded, batch, labels)
                with autocast(device_type, name):
                    loss = F.cross_entropy(model(ids.to(run_device)).float(), targets.to(run_device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen = seen + len(batch) if i >= 5 else 0
            best[name] = max(best.get(name, 0.0), seen / (time.perf_counter() - tick))
    return best


def run_bench(data_dir, out_dir):
    """On one stratified held-out split: the training speed in fp32 and bf16, then this Transformer with the
    constants above without and with masked-language pre-training (the held-out texts, never their labels, play
    the test texts that MLM may read), fastText (supervised, word bigrams, 10 epochs) and TF-IDF word 1-2-grams +
    logistic regression. max_minutes applies to each Transformer run. The baselines see the same training records
    as the Transformer (its validation part excluded). Only here: pip install fasttext-wheel scikit-learn."""
    import fasttext
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from tokenizer import tokenize

    records = load_news(os.path.join(data_dir, "News_train.json"))
    kept, held_out = stratified_split([r["label"] for r in records], holdout_frac, seed + 1)
    train_records, test_records = [records[i] for i in kept], [records[i] for i in held_out]
    fit_idx, _ = stratified_split([r["label"] for r in train_records], val_frac, seed)  # what train_model uses
    fit_records = [train_records[i] for i in fit_idx]
    text = lambda r: " ".join(tokenize(r["headline"] + " . " + r["short_description"]))
    test_labels = [r["label"] for r in test_records]
    run_device = default_device()
    precision_name, why = choose_precision(precision, run_device.split(":")[0])
    results = {}

    speeds = bench_speed(fit_records)
    print(f"training speed on {run_device}, batch {batch_size}: fp32 {speeds['fp32']:.0f} examples/s, "
          f"bf16 {speeds['bf16']:.0f} examples/s (x{speeds['bf16'] / speeds['fp32']:.2f}); the runs below use "
          f"{precision_name} ({why})", flush=True)

    mlm_epochs = pretrain_epochs or bench_pretrain_epochs
    for name, folder, phase_epochs in [("Transformer, no MLM", "bench_no_mlm", 0),
                                       (f"Transformer, MLM {mlm_epochs} ep", "bench_mlm", mlm_epochs)]:
        folder = os.path.join(out_dir, folder)
        globals()["pretrain_epochs"], kept_value = phase_epochs, pretrain_epochs
        try:
            train_model(train_records, folder, test_records if phase_epochs and pretrain_test else None)
        finally:
            globals()["pretrain_epochs"] = kept_value
        model, vocab, config = load_trained(folder, run_device)
        logits = predict_logits(model, encode_records(test_records, vocab, config), run_device, precision_name)
        seconds = load_checkpoint(os.path.join(folder, "ckpt.pt"))["seconds"]
        results[name] = (classification_metrics(logits.argmax(1).tolist(), test_labels), seconds)
        print(f"{name}: held-out accuracy {results[name][0]['accuracy']:.4f}", flush=True)

    start = time.time()
    with open(os.path.join(out_dir, "fasttext_train.txt"), "w") as f:
        f.writelines(f"__label__{r['label']} {text(r)}\n" for r in fit_records)
    ft = fasttext.train_supervised(os.path.join(out_dir, "fasttext_train.txt"), wordNgrams=2, epoch=10,
                                   thread=num_threads, seed=seed, verbose=0)
    predictions = [int(labels[0].removeprefix("__label__"))
                   for labels in ft.predict([text(r) for r in test_records])[0]]
    results["fastText (bigrams, 10 epochs)"] = (classification_metrics(predictions, test_labels), time.time() - start)

    start = time.time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, token_pattern=r"\S+")
    features = vectorizer.fit_transform([text(r) for r in fit_records])
    classifier = LogisticRegression(C=10, max_iter=1000).fit(features, [r["label"] for r in fit_records])
    predictions = classifier.predict(vectorizer.transform([text(r) for r in test_records])).tolist()
    results["TF-IDF 1-2-grams + LR"] = (classification_metrics(predictions, test_labels), time.time() - start)

    print(f"held-out split: {len(test_records)} records ({holdout_frac:.0%} stratified, seed {seed + 1}); "
          f"training records: {len(fit_records)}")
    print("| model | accuracy | macro-F1 | training minutes |\n| --- | --- | --- | --- |")
    for name, (metrics, seconds) in results.items():
        print(f"| {name} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {seconds / 60:.1f} |")
    return results, speeds


# ----------------------------------------------------------------------------- command line
def main(argv):
    positional = parse_overrides(argv, globals(), CHECKS)
    if positional:
        raise SystemExit(f"error: textcls.py takes only --name=value options, got {positional[0]!r} "
                         f"(--help lists them)")
    if d_model % nhead:
        raise SystemExit(f"error: --d_model={d_model} must be a multiple of --nhead={nhead}")
    torch.set_num_threads(num_threads)
    try:
        if train:
            records = load_news(os.path.join(data_dir, "News_train.json"))
            mlm_records = None
            if pretrain_epochs and pretrain_test:
                if not os.path.exists(test_file):
                    raise SystemExit(f"error: --pretrain_test=True reads the test texts, but {test_file} does not "
                                     f"exist: pass --test_file=PATH or --pretrain_test=False")
                mlm_records = load_news(test_file, require_label=False)
            train_model(records, out_dir, mlm_records)
        if predict:
            write_submission(out_dir, test_file, submission)
        if attention:
            draw_attention(attention, out_dir)
        if bench:
            check_writable(out_dir)
            run_bench(data_dir, out_dir)
        if not (train or predict or attention or bench):
            print(__doc__)
    except NewsFormatError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
    main(sys.argv[1:])
