"""
News classification into 15 categories with a Transformer encoder built from PyTorch's own blocks
(homework part 2-1): tokenizer.py's preprocessing, `<cls> headline <sep> description`, nn.TransformerEncoder,
optional masked-language pre-training of the same encoder (BERT's recipe), a hand-written training loop, an
ensemble of four such models whose logits are averaged, and the competition's submission.csv.

    python textcls.py --train --data_dir=data/news --out_dir=out/textcls --max_minutes=20
    python textcls.py --predict --out_dir=out/textcls --test_file=data/news/News_test.json --submission=submission.csv
    python textcls.py --attention="Stocks fall as Fed raises rates" --out_dir=out/textcls   # attention-map PNG
    python textcls.py --bench --data_dir=data/news        # beside fastText and TF-IDF + LR on one held-out split
    python textcls.py --train --pretrain_epochs=2 ...     # masked-language pre-training first, then fine-tuning
    torchrun --nproc_per_node=2 textcls.py --train ...    # several processes (DDP), as nanoGPT does it

Training writes into out_dir: ckpt.pt (the latest state, to resume; it holds the vocabulary and the configuration
with the weights), best.pt (the model to predict with: the last epoch's, or with --val_frac the best on
validation; the same contents), pretrain.pt (the masked-language phase, when pretrain_epochs > 0), vocab.json (a
readable copy of the vocabulary), history.json and learning_curve.png. Run the same --train command again to resume;
Ctrl-C or SIGTERM saves a checkpoint at the step reached, then stops.
With ensemble = 4 (the default) the second, third and fourth models write the same files into out_dir/member_2,
out_dir/member_3 and out_dir/member_4.
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
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
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
remove_stop = False     # drop the 179 stop words (kept: the Transformer reads word order, README)
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
epochs = 2              # per model (each model of the ensemble)
batch_size = 128
lr = 2e-3               # peak learning rate, after warmup
min_lr_frac = 0.05      # cosine decay ends at lr * min_lr_frac
warmup_steps = 300      # linear warmup to lr over these steps, then cosine decay (learning_rate)
weight_decay = 0.01     # AdamW, on weight matrices only (not biases, norms or embeddings)
grad_clip = 1.0
label_smoothing = 0.1   # share of the target spread over all classes (Szegedy et al. 2016, section 7)
val_frac = 0.0          # stratified validation split, e.g. 0.05; 0 = train on all (best.pt = the last epoch; README)
bucket = True           # batches of similar length (less padding, faster); False = fully random batches
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this many minutes of training; 0 = no limit
ensemble = 4            # models trained one after another (seeds seed, seed+1, ...); --predict averages their logits
ensemble_alternate_stem = True  # models 2, 4, ... of an ensemble read the text with the other `stem` setting
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
    "ensemble": (lambda v: v >= 1, "an integer >= 1"),
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


# Reading order: data, model, devices and precision, evaluation, checkpoints, training (train_model() at the end of
# that section is the whole recipe), prediction, the command line. The extras (the hand-drawn charts, --attention
# and --bench) are fenced off at the end of the file.

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


def check_record(obj, name, where, require_label):
    """obj itself if it is a valid record (`where` names it in the error otherwise)."""
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
    records = [check_record(obj, name, w, require_label) for obj, w in zip(objects, where)]
    if not records:
        raise NewsFormatError(f"{name}: no records")
    return records


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


TOKEN_CACHE = {}   # (headline, description, remove_stop, stem) -> the two token lists: --bench tokenizes a record once


def record_tokens(record, config):
    """The two segments of one record as token lists (tokenizer.py's pipeline, with config's settings)."""
    key = (record["headline"], record["short_description"], config["remove_stop"], config["stem"])
    if key not in TOKEN_CACHE:
        TOKEN_CACHE[key] = (preprocess(record["headline"], config["remove_stop"], config["stem"]),
                            preprocess(record["short_description"], config["remove_stop"], config["stem"]))
    return TOKEN_CACHE[key]


def encode_pairs(token_pairs, vocab, length):
    """(headline tokens, description tokens) pairs -> `<cls> a <sep> b` ids, cut to length longest-first."""
    return [vocab.encode(a, max_len=length, tokens_b=b) for a, b in token_pairs]


def encode_records(records, vocab, config):
    """Records -> `<cls> headline <sep> description` ids, with config's preprocessing and max_len."""
    return encode_pairs([record_tokens(r, config) for r in records], vocab, config["max_len"])


def make_batches(lengths, batch_size, rng, bucket):
    """Lists of example indices. With bucketing, shuffle, then sort each window of 50 batches by length and
    cut it into batches: each batch holds similar lengths (little padding); the batches are shuffled again, so
    their order stays random."""
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
    """Pad to the longest example of this batch (not to a global maximum) with <pad> = 0. -> (ids, labels or
    None)."""
    width = max(len(encoded[i]) for i in indices)
    ids = torch.full((len(indices), width), Vocab.pad_id, dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
    return ids, (torch.tensor([labels[i] for i in indices]) if labels is not None else None)


def mask_tokens(ids, vocab_size, generator, prob):
    """BERT's masking (Devlin et al. 2019, 3.1): each non-special position is chosen with probability prob; of the
    chosen, 80 % become <mask>, 10 % a random non-special token, 10 % stay. Returns (inputs, targets) with targets
    -100 wherever a position was not chosen. The special tokens (<pad>, <unk>, <cls>, <sep>, <mask>) never are."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & (ids >= len(Vocab.SPECIALS))
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(Vocab.SPECIALS), vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, Vocab.mask_id), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, targets


# ----------------------------------------------------------------------------- model
class SinusoidalPositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 2017, 3.5),
    added to the token embeddings. Fixed: nothing to learn."""

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
    """One learned vector per position, added to the token embeddings (--pos_encoding=learned)."""

    def __init__(self, d_model, max_len):
        super().__init__()
        self.pe = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.pe.weight, std=0.02)

    def forward(self, x):
        return x + self.pe.weight[: x.size(1)]


def embed_tokens(model, ids):
    """Token embeddings times sqrt(d_model), plus positions. Vaswani et al. (2017, 3.4) scale the embedding by
    sqrt(d_model) without saying why; here the rows start with std d_model^-0.5 (about unit length), so the scaling
    brings their components to about 1, the size of the sinusoidal encoding's, and neither drowns the other."""
    return model.positional(model.embedding(ids) * math.sqrt(model.d_model))


def run_encoder(model, ids):
    """Embedding and positions, dropout, the encoder with the padding mask. model: the classifier, or the masked
    language model that shares its modules. -> (states (batch, length, d_model), padding (batch, length))."""
    padding = ids == Vocab.pad_id              # True where attention must not look
    return model.encoder(model.dropout(embed_tokens(model, ids)), src_key_padding_mask=padding), padding


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, d_hid, nlayers, dropout, max_len, pos_encoding, pooling):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.d_model, self.pooling = d_model, pooling
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=Vocab.pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)    # see embed_tokens for this scale
        with torch.no_grad():
            self.embedding.weight[Vocab.pad_id].zero_()
        positional = {"sinusoidal": SinusoidalPositionalEncoding, "learned": LearnedPositionalEncoding}
        if pos_encoding not in positional:
            raise ValueError(f"pos_encoding must be 'sinusoidal' or 'learned', got {pos_encoding!r}")
        self.positional = positional[pos_encoding](d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        # Pre-norm layers (norm_first: LayerNorm at the start of each residual branch; Wang et al. 2019, Xiong et al.
        # 2020) keep the gradients well scaled from the start, so they train stably without the long warmup that
        # post-norm layers need (Xiong et al. 2020). Their stack's output is not normalised: a final LayerNorm is.
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
        """Per layer, the attention weights (batch, heads, query, key) that forward() uses (in eval mode, without
        dropout). nn.TransformerEncoder does not return them, so run its layers one at a time and ask each one's
        attention for its weights."""
        padding = ids == Vocab.pad_id
        x = embed_tokens(self, ids)
        maps = []
        for layer in self.encoder.layers:
            h = layer.norm1(x)                         # pre-norm: attention reads the normalised input
            _, weights = layer.self_attn(h, h, h, key_padding_mask=padding, need_weights=True,
                                         average_attn_weights=False)
            maps.append(weights)
            x = layer(x, src_key_padding_mask=padding)
        return maps


class MaskedLanguageModel(nn.Module):
    """The classifier's own embedding, positions and encoder (the same modules, not copies) with the MLM head of
    BERT's released code: dense + GELU + LayerNorm, then an output layer whose weight IS the token embedding (tied,
    as in BERT and Vaswani et al. 3.4) plus a bias of its own. Only the chosen positions go through the output
    layer."""

    def __init__(self, classifier):
        super().__init__()
        self.d_model = classifier.d_model
        self.embedding, self.positional = classifier.embedding, classifier.positional
        self.dropout, self.encoder = classifier.dropout, classifier.encoder
        self.transform = nn.Sequential(nn.Linear(self.d_model, self.d_model), nn.GELU(), nn.LayerNorm(self.d_model))
        self.bias = nn.Parameter(torch.zeros(classifier.embedding.num_embeddings))

    def forward(self, ids, targets):
        """targets: mask_tokens' (-100 where not chosen). -> (logits over the vocabulary at the chosen positions,
        their targets)."""
        x, _ = run_encoder(self, ids)
        chosen = targets != -100
        return F.linear(self.transform(x[chosen]), self.embedding.weight, self.bias), targets[chosen]


# The configuration a trained model needs besides its weights: the preprocessing and the model's shape.
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


# ----------------------------------------------------------------------------- devices and precision
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
def predict_logits(model, encoded, run_device, precision_name="fp32", examples_per_batch=256):
    """Logits for every example, in order (batches of similar length for speed, then put back in order)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits = torch.empty(len(encoded), NUM_CLASSES)
    for s in range(0, len(order), examples_per_batch):
        indices = order[s:s + examples_per_batch]
        ids, _ = collate(encoded, indices)
        with autocast(run_device.split(":")[0], precision_name):
            logits[indices] = model(ids.to(run_device)).float().cpu()
    return logits


def evaluate(model, encoded, labels, run_device, precision_name):
    """Accuracy, macro-F1 and the loss (plain cross-entropy, without label smoothing) on labelled examples."""
    logits = predict_logits(model, encoded, run_device, precision_name)
    metrics = classification_metrics(logits.argmax(1).tolist(), labels)
    metrics["loss"] = F.cross_entropy(logits, torch.tensor(labels)).item()
    return metrics


# ----------------------------------------------------------------------------- checkpoints and output paths
def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def damaged_checkpoint_message(path, error):
    """The one-line error for a checkpoint that does not load, saying what to do."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
    previous = (f"the previous state may be in {path}.tmp (rename it to {os.path.basename(path)} to use it), or "
                if os.path.exists(path + ".tmp") else "")
    return f"error: {path} is damaged ({type(error).__name__}: {reason}); {previous}delete it to start again"


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this script. weights_only=True: tensors, numbers, strings, lists and dicts only, so a file
    from elsewhere cannot run code on loading; a damaged file is a one-line error that says what to do."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise SystemExit(f"error: {path} holds objects other than tensors, numbers and strings, so it was not "
                             f"written by textcls.py; refused to load it (weights_only=True)") from None
        raise SystemExit(damaged_checkpoint_message(path, e)) from None
    except Exception as e:   # truncated, empty, not a zip
        raise SystemExit(damaged_checkpoint_message(path, e)) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint \
            or "vocab" not in checkpoint:
        raise SystemExit(f"error: {path} is not a checkpoint of this textcls.py (no model, configuration and "
                         f"vocabulary inside; older versions kept the vocabulary apart): train into another --out_dir")
    return checkpoint


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


# ----------------------------------------------------------------------------- training
# train_model(), at the end of this section, is the whole recipe: four set-up steps (start_run, check_saved_run,
# prepare_data, init_model), then one loop (train_loop) per phase: Pretraining (masked-language modelling, only with
# pretrain_epochs > 0), then Classification. Before them: the schedule, the optimizer's groups, what a run is (to
# resume it), and the processes.

def learning_rate(step, total_steps, peak=None):
    """The learning rate of step (from 0): linear warmup over warmup_steps up to the peak (lr unless given; the
    Transformer's schedule warms up linearly too, Vaswani et al. 2017, 5.3), then cosine decay (Loshchilov & Hutter
    2017, without restarts) down to peak * min_lr_frac at the last step."""
    peak = lr if peak is None else peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(named_parameters, lr_scale_of=lambda name: 1.0):
    """AdamW's parameter groups, each with an lr_scale that the loop multiplies into the learning rate (the
    pre-trained encoder may learn slower than the new head). Weight decay applies to weight matrices only: not to
    biases and LayerNorm gains, offsets and scales that have no reason to be small; not to the embeddings (tokens,
    learned positions): a row gets a gradient only in the steps whose batch holds its token, but AdamW's decay
    shrinks it at every step, so the rows of rare tokens would fade between their appearances (minGPT leaves
    embeddings undecayed too)."""
    groups = {}
    for name, p in named_parameters:
        decays = p.dim() >= 2 and "embedding" not in name and ".pe." not in name
        key = (decays, lr_scale_of(name))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), ps in groups.items()]


# What a run is, saved in every checkpoint. A resumed run must match it, except for the RESUMABLE keys (more epochs,
# a lower learning rate...), which continue with the new value and say so.
TRAIN_KEYS = MODEL_KEYS + ["min_freq", "max_vocab", "embeddings", "pretrain_epochs", "pretrain_lr", "mask_prob",
                           "pretrain_test", "pretrain_share", "encoder_lr_frac", "epochs", "batch_size", "lr",
                           "min_lr_frac", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing", "val_frac",
                           "bucket", "seed", "ensemble", "ensemble_alternate_stem"]
RESUMABLE = {"epochs", "lr", "min_lr_frac", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing",
             "dropout", "embeddings", "pretrain_lr", "pretrain_share", "encoder_lr_frac", "ensemble",
             "ensemble_alternate_stem"}


def fingerprint(records, with_labels=True):
    """A short hash of the records' texts (and labels): a resumed run must train on the same data."""
    digest = hashlib.sha1()
    for r in records:
        digest.update(f"{r['headline']}\x00{r['short_description']}\x00"
                      f"{r.get('label', '') if with_labels else ''}\x01".encode("utf-8", "surrogatepass"))
    return f"{len(records)} records, sha1 {digest.hexdigest()[:16]}"


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
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if run_device.startswith("cuda"):
        run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(run_device)
    if not dist.is_initialized():      # once per program: the models of an ensemble share it (main() ends it)
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    return True, rank, world_size, run_device


def agree(flags, ddp, run_device):
    """Each flag True if it is True in any process. Every process gets the same answer, so all stop at the same
    step (one that stopped alone would leave the others waiting for it in the next gradient all-reduce)."""
    if not ddp:
        return [bool(f) for f in flags]
    values = torch.tensor([int(bool(f)) for f in flags], device=run_device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what Colab and Kaggle send when a runtime ends) asks the training loop to save
    a checkpoint after the current step and stop; a second one stops at once."""

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


@dataclass
class Run:
    """What the set-up steps and the loop share about this process: its place among the processes, its device,
    precision and clock."""
    ddp: bool                     # several processes under torchrun, their gradients averaged by DDP
    rank: int                     # this process, 0 .. world_size - 1; rank 0 logs, evaluates and saves
    world_size: int
    device: str                   # "cpu", "cuda" or "cuda:N"
    precision_name: str           # autocast precision: bf16, fp16 (with a gradient scaler) or fp32
    precision_reason: str         # why choose_precision chose it
    stop_request: StopRequest     # Ctrl-C or SIGTERM received
    start: float                  # time.time() when this run started
    deadline: float               # when --max_minutes is up (math.inf without a limit)
    seconds_before: float = 0.0   # the training time of the runs this one resumes

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def master_process(self):
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.master_process:
            print(*args, **kwargs)

    def seconds(self):
        """Training seconds so far, those of the resumed runs included."""
        return self.seconds_before + time.time() - self.start


def start_run(ddp, rank, world_size, run_device, stop_request, out_dir):
    """Set-up step 1: the clock, the CUDA build check, deterministic algorithms, the precision; out_dir is checked
    for writing before any long work."""
    start = time.time()
    deadline = start + max_minutes * 60 if max_minutes > 0 else math.inf
    if run_device.split(":")[0] == "cuda":
        check_cuda_build()
    set_deterministic(deterministic)
    precision_name, reason = choose_precision(precision, run_device.split(":")[0])
    check_writable(out_dir)
    return Run(ddp, rank, world_size, run_device, precision_name, reason, stop_request, start, deadline)


def check_saved_run(run, records, mlm_records, out_dir):
    """Set-up step 2: this run's configuration against what out_dir holds: ckpt.pt (to resume), or with pre-training
    and no ckpt.pt yet, pretrain.pt. A saved run that this one cannot continue stops here, before anything is
    written. -> (config, checkpoint or None, pretrain checkpoint or None)."""
    config = {name: globals()[name] for name in TRAIN_KEYS}
    config["train_data"] = fingerprint(records)
    config["mlm_texts"] = fingerprint(mlm_records, with_labels=False) if pretrain_epochs and mlm_records else ""
    config["processes"] = run.world_size
    checkpoint_path, pretrain_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "pretrain.pt")
    checkpoint = load_checkpoint(checkpoint_path, run.device) if os.path.exists(checkpoint_path) else None
    pretrain_checkpoint = (load_checkpoint(pretrain_path, run.device) if pretrain_epochs and checkpoint is None and
                           os.path.exists(pretrain_path) else None)
    saved, saved_path = (checkpoint, checkpoint_path) if checkpoint else (pretrain_checkpoint, pretrain_path)
    if saved is not None:
        for key in compare_config(saved_path, saved["config"], config):
            run.log(f"note: {key} = {config[key]!r} differs from {saved_path}'s {saved['config'].get(key)!r}: "
                    f"continuing with the new value")
    return config, checkpoint, pretrain_checkpoint


def count_steps_per_epoch(n_examples, world_size):
    """Each process takes every world_size-th batch; the batches left over at the end of an epoch are dropped."""
    return math.ceil(n_examples / batch_size) // world_size


def prepare_data(run, records, config, saved, out_dir):
    """Set-up step 3: the stratified validation split, the vocabulary from the training part only (or the saved
    run's, which never changes), both parts as token ids. -> (vocab, (train ids, labels), (val ids, labels))."""
    labels = [r["label"] for r in records]
    train_idx, val_idx = stratified_split(labels, val_frac, seed)
    tokens = [record_tokens(r, config) for r in records]
    vocab = Vocab(saved["vocab"]) if saved else \
        Vocab.build((t for i in train_idx for t in tokens[i]), min_freq=min_freq, max_size=max_vocab)
    train_split = encode_pairs([tokens[i] for i in train_idx], vocab, max_len), [labels[i] for i in train_idx]
    val_split = encode_pairs([tokens[i] for i in val_idx], vocab, max_len), [labels[i] for i in val_idx]
    if run.master_process and saved is None:
        vocab.save(os.path.join(out_dir, "vocab.json.tmp"))        # a readable copy; the checkpoints hold the real one
        os.replace(os.path.join(out_dir, "vocab.json.tmp"), os.path.join(out_dir, "vocab.json"))
    run.log(f"data: {len(train_idx)} train, {len(val_idx)} validation, vocabulary {len(vocab)} "
            f"({time.time() - run.start:.1f} s)")
    if not val_idx:
        run.log("no validation split (val_frac=0, or no class has two records): each epoch's model becomes best.pt")
    if count_steps_per_epoch(len(train_idx), run.world_size) == 0:
        raise SystemExit(f"error: {len(train_idx)} training records make no batch for each of {run.world_size} "
                         f"processes")
    return vocab, train_split, val_split


def init_model(run, config, vocab, fresh):
    """Set-up step 4: the classifier, initialised from the seed, and on a fresh run from the GloVe file if given
    (a resumed run loads its weights in its phase)."""
    torch.manual_seed(seed)
    model = build_model(config, len(vocab)).to(run.device)
    if embeddings and fresh:
        run.log(f"embeddings: {load_glove(embeddings, vocab, model.embedding, stem)} rows initialised from "
                f"{embeddings}")
    run.log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
            f"{ {key: config[key] for key in MODEL_KEYS} }")
    run.log(f"precision: {run.precision_name} ({run.precision_reason}); deterministic algorithms "
            f"{'on' if deterministic else 'off'}")
    return model


def new_grad_scaler(run):
    """fp16's loss scaling (disabled, a no-op, in bf16 and fp32): the loss is multiplied before backward so that
    small gradients do not underflow to 0 in float16, and the gradients divided back before clipping."""
    return torch.amp.GradScaler(run.device_type, init_scale=GRAD_SCALER_INIT, enabled=run.precision_name == "fp16")


def restore_state(saved, model, optimizer, scaler):
    """The weights, the optimizer's moments and the scaler's scale of a saved phase: it continues exactly."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler.is_enabled() and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])


# A phase is what train_loop trains: its model, optimizer and gradient scaler, its examples (encoded), its schedule
# (peak_lr, steps_per_epoch, total_steps, start_step), its own deadline, and three methods: batch_loss, end_epoch and
# save (its checkpoint, in path).
class Pretraining:
    """Phase 1: masked-language modelling (BERT, Devlin et al. 2019, 3.1). The classifier's own embedding and encoder
    learn to restore masked tokens of the training texts and of mlm_records' (the test texts; never their labels).
    Checkpoint: pretrain.pt; done once it is finished, or stopped at its share of --max_minutes."""
    name, log_prefix, lr_option, seed_offset = "pre-training", "pre-training ", "--pretrain_lr", 7777

    def __init__(self, run, classifier, records, mlm_records, vocab, config, saved, out_dir):
        self.run, self.vocab, self.config = run, vocab, config
        self.path = os.path.join(out_dir, "pretrain.pt")
        self.model = MaskedLanguageModel(classifier).to(run.device)
        texts = records + list(mlm_records or [])
        self.encoded = encode_records(texts, vocab, config)
        self.steps_per_epoch = count_steps_per_epoch(len(self.encoded), run.world_size)
        self.total_steps = pretrain_epochs * self.steps_per_epoch
        self.peak_lr = pretrain_lr
        self.deadline = run.start + pretrain_share * max_minutes * 60 if max_minutes > 0 else math.inf
        # fused: AdamW's update of all parameters in one kernel (CPU since PyTorch 2.4, and CUDA); the 6M-weight
        # embedding makes the per-tensor update a third of a CPU step
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model.named_parameters()), lr=pretrain_lr,
                                           fused=True)
        self.scaler = new_grad_scaler(run)
        self.start_step, self.history, self.done = 0, [], False
        if saved is not None:
            restore_state(saved, self.model, self.optimizer, self.scaler)
            self.start_step, self.history, self.done = saved["step"], saved["history"], saved["done"]
            run.log(f"resuming pre-training from {self.path} at step {self.start_step}" if not self.done else
                    f"pre-training done ({self.path}, step {self.start_step}): fine-tuning from its encoder")
        if not self.done:
            run.log(f"pre-training: masked-language model on {len(texts)} texts ({len(records)} training"
                    f"{f', {len(mlm_records)} test' if mlm_records else ''}), {pretrain_epochs} epochs, "
                    f"{self.total_steps} steps")

    def batch_loss(self, net, batch, step):
        """Cross-entropy at the masked positions. The masking depends only on (seed, step, rank): exact on resume."""
        ids, _ = collate(self.encoded, batch)
        generator = torch.Generator().manual_seed(seed * 1000003 + step * self.run.world_size + self.run.rank)
        inputs, targets = mask_tokens(ids, len(self.vocab), generator, mask_prob)
        logits, chosen_targets = net(inputs.to(self.run.device), targets.to(self.run.device))
        if chosen_targets.numel() == 0:      # nothing chosen in this batch: a zero loss that reaches every weight
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), chosen_targets)

    def end_epoch(self, epoch, step, train_loss):
        self.history.append({"epoch": epoch + 1, "step": step, "mlm_loss": train_loss,
                             "minutes": self.run.seconds() / 60})
        self.run.log(f"pre-training epoch {epoch + 1}: masked-language loss {train_loss:.4f}")

    def save(self, step, stop_reason):
        if self.run.master_process:
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "step": step, "done": stop_reason == "share" or
                         step >= self.total_steps, "history": self.history, "seconds": self.run.seconds(),
                         "config": self.config, "vocab": self.vocab.itos}, self.path)


class Classification:
    """Phase 2 (the only one without pre-training): the classifier learns the labels of the training split. After
    every epoch it is evaluated on the validation split and the best epoch is kept in best.pt. Checkpoint: ckpt.pt."""
    name, log_prefix, lr_option, seed_offset = "training", "", "--lr", 0

    def __init__(self, run, model, vocab, config, train_split, val_split, saved, from_pretrained, out_dir):
        self.run, self.model, self.vocab, self.config, self.out_dir = run, model, vocab, config, out_dir
        (self.encoded, self.labels), (self.val_encoded, self.val_labels) = train_split, val_split
        self.path, self.best_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
        self.steps_per_epoch = count_steps_per_epoch(len(self.encoded), run.world_size)
        self.total_steps = epochs * self.steps_per_epoch
        self.peak_lr, self.deadline, self.from_pretrained = lr, math.inf, from_pretrained
        # fine-tuning may give the pre-trained encoder a fraction of the new head's learning rate
        lr_scale_of = (lambda name: 1.0 if name.startswith("head.") else encoder_lr_frac) if from_pretrained \
            else (lambda name: 1.0)
        self.optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), lr_scale_of), lr=lr, fused=True)
        self.scaler = new_grad_scaler(run)
        self.start_step, self.history, self.best_accuracy = 0, [], -1.0
        if saved is not None:
            restore_state(saved, model, self.optimizer, self.scaler)
            self.start_step, self.history, self.best_accuracy = saved["step"], saved["history"], saved["best_accuracy"]
            run.log(f"resuming from {self.path} at step {self.start_step} "
                    f"(epoch {self.start_step // self.steps_per_epoch + 1})")
        elif from_pretrained:
            run.log(f"fine-tuning from the pre-trained encoder (encoder learning rate {encoder_lr_frac} x lr)")

    def batch_loss(self, net, batch, step):
        """Cross-entropy with label smoothing (Szegedy et al. 2016, section 7): the target gives 1 - label_smoothing
        to the true class and spreads label_smoothing evenly over all classes, so the loss stops rewarding an ever
        larger gap between the true class's logit and the others (overconfidence)."""
        ids, targets = collate(self.encoded, batch, self.labels)
        return F.cross_entropy(net(ids.to(self.run.device)).float(), targets.to(self.run.device),
                               label_smoothing=label_smoothing)

    def validation_metrics(self):
        """Loss, accuracy and macro-F1 on the validation split; {} without one."""
        if not self.val_labels:
            return {}
        return evaluate(self.model, self.val_encoded, self.val_labels, self.run.device, self.run.precision_name)

    def save_if_best(self, metrics, epoch, first=False):
        """Keep the model in best.pt if it beats the best so far on validation (without a validation split: always,
        the latest model is the one to keep; first: there is no best.pt yet). -> whether it was kept."""
        if not (first or not self.val_labels or metrics["accuracy"] > self.best_accuracy):
            return False
        self.best_accuracy = metrics.get("accuracy", self.best_accuracy)
        save_atomic({"model": self.model.state_dict(), "config": self.config, "vocab": self.vocab.itos,
                     "epoch": epoch, "metrics": metrics}, self.best_path)
        return True

    def keep_if_best(self, step, stop_reason):
        """On rank 0, when training stopped inside an epoch (--max_minutes), or there is no best.pt yet: save_if_best
        with the weights reached. An ensemble model cut short near the end of its schedule, where the learning rate
        is already low, is then kept as it is, not as it was an epoch earlier. A new best accuracy is saved in the
        checkpoint too: a resumed run compares against it."""
        best_before = self.best_accuracy
        metrics = self.validation_metrics()
        if self.save_if_best(dict(metrics, step=step), step / self.steps_per_epoch,
                             first=not os.path.exists(self.best_path)):
            self.run.log(f"best.pt: the weights at step {step}"
                         + (f", val accuracy {metrics['accuracy']:.4f}" if self.val_labels else ""))
        if self.best_accuracy != best_before:
            self.save(step, stop_reason)

    def end_epoch(self, epoch, step, train_loss):
        """On rank 0: evaluate and log; keep the model in best.pt if it is the best so far (without a validation
        split: every epoch's); write history.json and the learning curve."""
        if not self.run.master_process:
            return
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "minutes": self.run.seconds() / 60}
        metrics.update(self.validation_metrics())
        if self.val_labels:
            self.run.log(f"epoch {epoch + 1}: train loss {train_loss:.4f} val loss {metrics['loss']:.4f} "
                         f"val accuracy {metrics['accuracy']:.4f} val macro-F1 {metrics['macro_f1']:.4f}", flush=True)
        else:
            self.run.log(f"epoch {epoch + 1}: train loss {train_loss:.4f} (no validation split)", flush=True)
        self.history.append(metrics)
        self.save_if_best(metrics, epoch + 1)
        with open(os.path.join(self.out_dir, "history.json.tmp"), "w") as f:
            json.dump(self.history, f, indent=1)
        os.replace(os.path.join(self.out_dir, "history.json.tmp"), os.path.join(self.out_dir, "history.json"))
        plot_learning_curve(self.history, os.path.join(self.out_dir, "learning_curve.png"))   # in the extras

    def save(self, step, stop_reason):
        if self.run.master_process:
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "step": step, "history": self.history,
                         "best_accuracy": self.best_accuracy, "seconds": self.run.seconds(),
                         "pretrained": self.from_pretrained, "config": self.config, "vocab": self.vocab.itos},
                        self.path)


def stop_for_nonfinite(run, phase, step, loss_value):
    last = (f"the last good checkpoint {phase.path} (step {load_checkpoint(phase.path)['step']}) is kept"
            if os.path.exists(phase.path) else "nothing was saved")
    message = (f"error: the {phase.name} loss is {loss_value} at step {step + 1}: training stopped; {last}. "
               f"Lower {phase.lr_option} (now {phase.peak_lr}) or try --precision=fp32")
    raise SystemExit(message if run.master_process else 1)


def stop_for_signal(run, step, path):
    if run.master_process:
        print(f"stopped by {run.stop_request.name} at step {step}: checkpoint saved in {path}; run the same command "
              f"to resume", file=sys.stderr, flush=True)
    if run.ddp:
        dist.barrier()
    raise SystemExit(128 + run.stop_request.number)


def train_loop(run, phase):
    """Train phase from phase.start_step to phase.total_steps; save its checkpoint after every epoch and when it
    stops early. -> (the step reached, None when done, or why it stopped early: "time" (--max_minutes) or "share"
    (pre-training's share of it)). A non-finite loss or a signal ends the program here."""
    net = DistributedDataParallel(phase.model, device_ids=[run.device] if run.device_type == "cuda" else None) \
        if run.ddp else phase.model
    step, skipped_steps = phase.start_step, 0
    while step < phase.total_steps:
        epoch = step // phase.steps_per_epoch
        # this process's batches of the epoch, in an order that depends only on (seed, epoch): a resumed run skips
        # those it did
        batches = make_batches([len(e) for e in phase.encoded], batch_size,
                               random.Random(seed + phase.seed_offset + epoch), bucket)
        batches = batches[run.rank:phase.steps_per_epoch * run.world_size:run.world_size]
        net.train()
        tick, examples_seen, loss_sum, loss_count, stop_reason = time.time(), 0, 0.0, 0, None
        for batch in batches[step - epoch * phase.steps_per_epoch:]:
            # dropout masks from (seed, step, rank): the same on resume
            torch.manual_seed(seed + phase.seed_offset + step * run.world_size + run.rank)
            # determine and set the learning rate for this iteration
            step_lr = learning_rate(step, phase.total_steps, phase.peak_lr)
            for group in phase.optimizer.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            # forward
            with autocast(run.device_type, run.precision_name):
                loss = phase.batch_loss(net, batch, step)
            loss_value = loss.item()
            # termination conditions, agreed by every process, so that all stop after the same step
            now = time.time()
            nonfinite, time_up, share_up, signalled = agree([not math.isfinite(loss_value), now > run.deadline,
                                                             now > phase.deadline, run.stop_request.name],
                                                            run.ddp, run.device)
            if nonfinite:
                stop_for_nonfinite(run, phase, step, loss_value)
            # backward (in fp16 of the scaled loss)
            phase.optimizer.zero_grad(set_to_none=True)
            phase.scaler.scale(loss).backward()
            # clip the gradient (the true one, unscaled first)
            phase.scaler.unscale_(phase.optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            # update the weights; the scaler skips a step whose gradients hold inf or NaN, and lowers its scale
            scale_before = phase.scaler.get_scale() if phase.scaler.is_enabled() else 0.0
            phase.scaler.step(phase.optimizer)
            phase.scaler.update()
            skipped_steps += phase.scaler.is_enabled() and phase.scaler.get_scale() < scale_before
            step += 1
            examples_seen += len(batch) * run.world_size
            loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
            # logging
            if step % log_every == 0:
                examples_per_second = examples_seen / max(1e-9, time.time() - tick)
                minutes_left = (phase.total_steps - step) * batch_size * run.world_size / examples_per_second / 60
                skipped = f"; {skipped_steps} steps skipped by the gradient scaler" if skipped_steps else ""
                run.log(f"{phase.log_prefix}epoch {epoch + 1} step {step}/{phase.total_steps} loss "
                        f"{loss_sum / loss_count:.4f} lr {step_lr:.2e} {examples_per_second:.0f} examples/s, about "
                        f"{minutes_left:.1f} min left{skipped}", flush=True)
            if time_up or share_up or signalled:
                stop_reason = "signal" if signalled else "time" if time_up else "share"
                break
        # end of the epoch, or of this run: check the weights, finish a whole epoch, save the checkpoint
        if not all(bool(p.detach().isfinite().all()) for p in net.parameters()):
            stop_for_nonfinite(run, phase, step, "finite, but the weights are not")
        if step % phase.steps_per_epoch == 0 or step == phase.total_steps:
            phase.end_epoch(epoch, step, loss_sum / max(1, loss_count))
        phase.save(step, stop_reason)
        if stop_reason == "signal":
            stop_for_signal(run, step, phase.path)
        if stop_reason:
            return step, stop_reason
    return step, None


def train_model(records, out_dir, mlm_records=None):
    """Train on records (a stratified val_frac of them validates), resuming from out_dir if it holds a run. With
    pretrain_epochs > 0: first masked-language pre-training on the texts of records and of mlm_records (unlabelled,
    the test texts), then fine-tuning from that encoder. Returns the history: one dict per finished epoch (on rank 0;
    [] when --max_minutes ran out during pre-training)."""
    ddp, rank, world_size, run_device = setup_distributed()
    stop_request = StopRequest()
    try:
        run = start_run(ddp, rank, world_size, run_device, stop_request, out_dir)
        config, checkpoint, pretrain_checkpoint = check_saved_run(run, records, mlm_records, out_dir)
        saved = checkpoint or pretrain_checkpoint
        run.seconds_before = saved.get("seconds", 0.0) if saved else 0.0
        vocab, train_split, val_split = prepare_data(run, records, config, saved, out_dir)
        model = init_model(run, config, vocab, fresh=saved is None)
        from_pretrained = bool(pretrain_epochs) and (checkpoint is None or checkpoint.get("pretrained", False))

        if pretrain_epochs and checkpoint is None:    # phase 1; loading pretrain.pt sets the classifier's encoder too
            phase = Pretraining(run, model, records, mlm_records, vocab, config, pretrain_checkpoint, out_dir)
            if not phase.done:
                step, stop_reason = train_loop(run, phase)
                if stop_reason == "time":
                    run.log(f"stopped after {max_minutes} minutes in pre-training at step {step}/{phase.total_steps}; "
                            f"checkpoint saved, run the same command to resume")
                    if ddp:
                        dist.barrier()
                    return []
                if stop_reason == "share":
                    run.log(f"pre-training stopped at step {step}/{phase.total_steps}, its share ({pretrain_share}) "
                            f"of --max_minutes: fine-tuning starts")

        phase = Classification(run, model, vocab, config, train_split, val_split, checkpoint, from_pretrained,
                               out_dir)
        step, stop_reason = train_loop(run, phase)
        if stop_reason == "time":
            run.log(f"stopped after {max_minutes} minutes at step {step}/{phase.total_steps}; checkpoint saved, "
                    f"run the same command to resume")
        if run.master_process and (stop_reason == "time" or not os.path.exists(phase.best_path)):
            phase.keep_if_best(step, stop_reason)     # stopped inside an epoch: its weights may be the best yet
        if ddp:
            dist.barrier()                         # rank 0's last saves are done before any process leaves
        return phase.history
    finally:
        stop_request.restore()


def member_dir(out_dir, k):
    """Where model k (from 0) of the ensemble lives: the first in out_dir itself (as with ensemble = 1), the others
    in out_dir/member_2, out_dir/member_3, ..."""
    return out_dir if k == 0 else os.path.join(out_dir, f"member_{k + 1}")


def train_ensemble(records, out_dir, mlm_records=None):
    """`ensemble` models, one after another, each a whole train_model() run with its own seed: its own validation
    split, initial weights, batch order and dropout masks. Their mistakes differ, so the average of their logits is
    right more often than any one of them (Dietterich 2000, "Ensemble Methods in Machine Learning"). With
    ensemble_alternate_stem, every second model also reads the text with the other `stem` setting (whole words
    instead of Porter stems): models that see the text differently disagree more, and their average gains more
    (README, on the bench's split: three models that differ only in the seed 78.5 % held-out, two of them with a
    whole-words model instead 79.0 %; the default command's four 79.5 %, its models alone 77.8-78.3 %).
    --max_minutes is one budget: each model gets an equal share of what is left when it starts. Running the same
    command again skips the finished models and resumes the stopped one."""
    global seed, max_minutes, stem
    base_seed, budget, base_stem = seed, max_minutes, stem
    deadline = time.time() + budget * 60
    try:
        for k in range(ensemble):
            seed = base_seed + k
            stem = base_stem != (ensemble_alternate_stem and k % 2 == 1)
            if budget > 0:    # (never 0, which would mean no limit, when the budget is spent)
                max_minutes = budget / ensemble if k == 0 else max(1e-6, (deadline - time.time()) / 60 / (ensemble - k))
            if ensemble > 1 and int(os.environ.get("RANK", 0)) == 0:     # under torchrun: rank 0 only
                print(f"ensemble model {k + 1}/{ensemble}: seed {seed}, stem {stem}, in {member_dir(out_dir, k)}"
                      + (f", {max_minutes:.1f} minutes" if budget > 0 else ""), flush=True)
            train_model(records, member_dir(out_dir, k), mlm_records)
    finally:
        seed, max_minutes, stem = base_seed, budget, base_stem


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


def load_ensemble(out_dir, run_device):
    """out_dir's models as load_trained gives them, each loaded once: as many as the first one was trained with
    (its `ensemble`; 1 before ensembles). A missing one stops here, before any other work."""
    first = load_trained(out_dir, run_device)
    return [first] + [load_trained(member_dir(out_dir, k), run_device) for k in range(1, first[2].get("ensemble", 1))]


def ensemble_logits(models, records, run_device, precision_name):
    """The mean of the models' logits for records, each model with its own vocabulary and preprocessing (from its
    checkpoint)."""
    return sum(predict_logits(model, encode_records(records, vocab, config), run_device, precision_name)
               for model, vocab, config in models) / len(models)


def write_submission(out_dir, test_file, submission):
    """`id,label` for every record of test_file, in id order, written atomically; returns the predicted labels.
    With labels in the file, also the accuracy. The submission's folder is checked before any work."""
    check_writable(submission, is_folder=False)
    run_device = default_device()
    models = load_ensemble(out_dir, run_device)     # every model there before the test file is read
    records = sorted(load_news(test_file, require_label=False), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise NewsFormatError(f"{os.path.basename(test_file)}: id {next(i for i in ids if ids.count(i) > 1)} "
                              f"appears more than once")
    precision_name, _ = choose_precision(precision, run_device.split(":")[0])
    predictions = ensemble_logits(models, records, run_device, precision_name).argmax(1).tolist()
    with open(submission + ".tmp", "w") as f:
        f.write("id,label\n")
        f.writelines(f"{i},{p}\n" for i, p in zip(ids, predictions))
    os.replace(submission + ".tmp", submission)     # a kill never leaves half a submission, nor loses the old one
    print(f"wrote {len(records)} predictions to {submission}"
          + (f" (the mean logits of {len(models)} models)" if len(models) > 1 else ""))
    if all("label" in r for r in records):
        metrics = classification_metrics(predictions, [r["label"] for r in records])
        print(f"accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
    return predictions


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
            train_ensemble(records, out_dir, mlm_records)
        if predict:
            write_submission(out_dir, test_file, submission)
        if attention:
            draw_attention(attention, out_dir)         # in the extras below
        if bench:
            check_writable(out_dir)
            run_bench(data_dir, out_dir)               # in the extras below
        if not (train or predict or attention or bench):
            print(__doc__)
    except NewsFormatError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: {e.filename or ''}: {e.strerror or e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# =============================================================================================================
# EXTRAS, not the lesson: the charts drawn by hand with PIL (training's learning curve, --attention's maps) and
# --bench (the training speed, and this model beside fastText and TF-IDF + logistic regression). Above, only
# Classification.end_epoch (plot_learning_curve) and main() (draw_attention, run_bench) call into this part.
# =============================================================================================================

# ----------------------------------------------------------------------------- charts (PIL only)
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
    """--attention: classify one "headline | description" with the best checkpoint and draw its attention maps."""
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
    for name, folder_name, phase_epochs in [("Transformer, no MLM", "bench_no_mlm", 0),
                                            (f"Transformer, MLM {mlm_epochs} ep", "bench_mlm", mlm_epochs)]:
        folder = os.path.join(out_dir, folder_name)
        globals()["pretrain_epochs"], kept_value = phase_epochs, pretrain_epochs
        try:
            train_ensemble(train_records, folder, test_records if phase_epochs and pretrain_test else None)
        finally:
            globals()["pretrain_epochs"] = kept_value
        models = load_ensemble(folder, run_device)
        logits = ensemble_logits(models, test_records, run_device, precision_name)
        seconds = sum(load_checkpoint(os.path.join(member_dir(folder, k), "ckpt.pt"))["seconds"]
                      for k in range(len(models)))
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


if __name__ == "__main__":
    main(sys.argv[1:])
