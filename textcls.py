"""
News classification into 15 categories with a Transformer encoder built from PyTorch's own blocks
(homework part 2-1): tokenizer.py's preprocessing, `<cls> headline <sep> description`, nn.TransformerEncoder,
optional masked-language pre-training of the same encoder (BERT's recipe), a hand-written training loop, an
ensemble of four such models whose logits are averaged, and the competition's submission.csv.

    python textcls.py --train --data_dir=data/news --out_dir=out/textcls --max_minutes=20
    python textcls.py --predict --out_dir=out/textcls --test_file=data/news/News_test.json --submission=submission.csv
    python textcls.py --attention="Stocks fall as Fed raises rates" --out_dir=out/textcls   # attention-map PNG
    python textcls.py --bench --data_dir=data/news        # speed per precision; held-out accuracy with and without MLM
    python textcls.py --train --pretrain_epochs=2 ...     # masked-language pre-training first, then fine-tuning
    torchrun --nproc_per_node=2 textcls.py --train ...    # several processes (DDP), as nanoGPT does it

Training writes into out_dir (model 2, 3, 4 of the ensemble into out_dir/member_2, ...): ckpt.pt (the latest state,
to resume; run the same command again, or after Ctrl-C/SIGTERM, which save first), best.pt (the model to predict
with), pretrain.pt (with pretrain_epochs > 0), vocab.json and learning_curve.png.
"""
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from tokenizer import Vocab, config_block, parse_overrides, preprocess, stem as porter_stem

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
# what to do
train = False           # train on data_dir/News_train.json
predict = False         # write submission for test_file
bench = False           # the benchmark: training speed per precision, held-out accuracy without and with MLM
attention = ""          # a sentence: draw its attention maps into out_dir/attention.png
data_dir = "data/news"
out_dir = "out/textcls"
test_file = "data/news/News_test.json"
submission = "submission.csv"
# preprocessing (tokenizer.py)
remove_stop = False     # drop the 179 stop words (kept: the Transformer reads word order)
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
# training
epochs = 2              # per model (each model of the ensemble)
batch_size = 128
lr = 2e-3               # peak learning rate, after warmup
min_lr_frac = 0.05      # cosine decay ends at lr * min_lr_frac
warmup_steps = 300      # linear warmup to lr over these steps, then cosine decay (learning_rate)
weight_decay = 0.01     # AdamW, on weight matrices only (not biases, norms or embeddings)
grad_clip = 1.0
label_smoothing = 0.1   # share of the target spread over all classes (Szegedy et al. 2016, section 7)
val_frac = 0.0          # stratified validation split, e.g. 0.05; 0 = train on all (best.pt = the last epoch)
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this many minutes of training; 0 = no limit
ensemble = 4            # models trained one after another (seeds seed, seed+1, ...); --predict averages their logits
ensemble_alternate_stem = True  # models 2, 4, ... of an ensemble read the text with the other `stem` setting
seed = 1337
device = ""             # "" = cuda if available, else mps (Apple), else cpu; or "cpu", "cuda", "cuda:N", "mps"
precision = "auto"      # auto | bf16 | fp16 | fp32 (auto: bf16 where native, fp16 + scaler on older GPUs, else fp32)
num_threads = 2         # CPU threads per process
log_every = 200         # steps between progress lines
# benchmark
holdout_frac = 0.1      # --bench: stratified held-out split that no model trains on (its MLM run: pretrain_epochs or 2)
# -----------------------------------------------------------------------------

# values with a fixed set of choices or a range, checked before any work (see parse_overrides)
CHECKS = {
    "pos_encoding": ("sinusoidal", "learned"), "pooling": ("mean", "cls"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "max_vocab": (lambda v: v > len(Vocab.SPECIALS), f"an integer > {len(Vocab.SPECIALS)} (the special tokens)"),
    "max_len": (lambda v: v >= 3, "an integer >= 3 (<cls>, <sep> and one token)"),
    "d_model": (lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
    "nhead": (lambda v: v >= 1 and d_model % v == 0, "an integer >= 1 that divides --d_model"),
    "device": (lambda v: v in ("", "cpu", "cuda", "mps") or v.startswith("cuda:"), '"", cpu, cuda[:N] or mps'),
    **dict.fromkeys("min_freq d_hid nlayers epochs batch_size ensemble num_threads log_every".split(),
                    (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys("pretrain_lr lr grad_clip".split(), (lambda v: v > 0, "a number > 0")),
    **dict.fromkeys("pretrain_epochs warmup_steps weight_decay max_minutes min_lr_frac".split(),
                    (lambda v: v >= 0, "a number >= 0")),
    **dict.fromkeys("dropout label_smoothing val_frac".split(), (lambda v: 0 <= v < 1, "a number in [0, 1)")),
    **dict.fromkeys("mask_prob holdout_frac".split(), (lambda v: 0 < v < 1, "a number in (0, 1)")),
}
NUM_CLASSES = 15
LABEL_NAMES = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING", "HEALTHY LIVING",
               "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS", "BLACK VOICES", "HOME & LIVING",
               "PARENTS"]


# ----------------------------------------------------------------------------- system
def setup_system():
    """nanoGPT's system block, run by every entry point: the processes (under torchrun, one per GPU with nccl, or CPU
    processes with gloo), the device, the autocast precision (see choose_precision) and deterministic algorithms:
    the same command gives the same numbers on the same GPU (an op without a deterministic kernel stops with an
    error instead of varying; cuBLAS needs its workspace setting for that, before its first call).
    -> (device, precision name, autocast context, rank, world_size)"""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    run_device = device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else
                            "cpu")
    if run_device.startswith("cuda"):
        check_cuda_build()
        if ddp:                                   # one GPU per process
            run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(run_device)
    if ddp and not dist.is_initialized():         # once per program: the models of an ensemble share it
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    precision_name, reason = choose_precision(precision, run_device.split(":")[0])
    ctx = torch.autocast(run_device.split(":")[0], dtype=torch.float16 if precision_name == "fp16" else torch.bfloat16,
                         enabled=precision_name != "fp32")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if rank == 0:
        print(f"device: {run_device} ({'asked for' if device else 'the first of cuda, mps, cpu found'}); precision: "
              f"{precision_name} ({reason}); deterministic algorithms on")
    return run_device, precision_name, ctx, rank, world_size


# ----------------------------------------------------------------------------- data
def read_utf8(path):
    """The whole text of a file; bytes that are not UTF-8 are an error naming file, line and byte."""
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{os.path.basename(path)}: line {line}: byte 0x{raw[e.start]:02x} at offset {e.start} is "
                         f"not UTF-8 (save the file as UTF-8)") from None


def load_news(path, require_label=True):
    """A News_*.json file as a list of dicts {id, headline, short_description[, label]}: a JSON array of records, or
    JSON lines (one record a line; the competition may ship either). Anything malformed is a ValueError naming the
    file and the record (in JSON lines, its line)."""
    name, text = os.path.basename(path), read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        places = [f"record {i}" for i in range(len(records))]
    else:
        records, places = [], []
        for number, line in enumerate(text.split("\n"), 1):   # not splitlines(): it also splits at U+2028 and
                                                              # U+0085, which News_train.json holds inside texts
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}: line {number}: invalid JSON at column {e.colno}: {e.msg} (expected "
                                     f"a JSON array of records, or one record a line)") from None
                places.append(f"line {number}")
    if not records:
        raise ValueError(f"{name}: no records")
    fields = {"id": int, "headline": str, "short_description": str, "label": int}
    for record, place in zip(records, places):
        where = f"{name}: {place}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        for field, kind in fields.items():
            if field not in record and (field != "label" or require_label):
                raise ValueError(f"{where}: missing field '{field}'")
            if field in record and type(record[field]) is not kind:   # type, not isinstance: True is not a label
                raise ValueError(f"{where}: field '{field}' must be {kind.__name__}, got {record[field]!r}")
        if not 0 <= record.get("label", 0) < NUM_CLASSES:
            raise ValueError(f"{where}: label {record['label']} is outside 0..{NUM_CLASSES - 1}")
    return records


def stratified_split(labels, frac, seed):
    """Indices (kept, held_out): frac of every class held out (at least one record of a class that has two),
    so rare classes are in both parts."""
    rng, kept, held_out = random.Random(seed), [], []
    for label in sorted(set(labels)):
        indices = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(indices)
        n_out = min(len(indices) - 1, max(1, round(len(indices) * frac))) if frac > 0 else 0
        held_out += indices[:n_out]
        kept += indices[n_out:]
    return sorted(kept), sorted(held_out)


@functools.lru_cache(maxsize=None)    # the models of an ensemble, and --bench, tokenize each text once per setting
def segments(headline, description, remove_stop, use_stems):
    """The two segments of a record as token lists, by tokenizer.py's pipeline."""
    return preprocess(headline, remove_stop, use_stems), preprocess(description, remove_stop, use_stems)


def record_tokens(record, config):
    return segments(record["headline"], record["short_description"], config["remove_stop"], config["stem"])


def encode_records(records, vocab, config):
    """Records -> `<cls> headline <sep> description` ids, with config's preprocessing, cut to max_len longest-first."""
    return [vocab.encode(a, config["max_len"], tokens_b=b) for a, b in (record_tokens(r, config) for r in records)]


def make_batches(lengths, batch_size, rng):
    """Lists of example indices, bucketed: shuffle, then sort each window of 50 batches by length and cut it into
    batches: each batch holds similar lengths (little padding, faster); the batches are shuffled again, so their
    order stays random."""
    order, window = list(range(len(lengths))), batch_size * 50
    rng.shuffle(order)
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded, indices, labels=None):
    """Pad to the longest example of this batch (not to a global maximum) with <pad> = 0. -> (ids, labels or None)."""
    ids = torch.full((len(indices), max(len(encoded[i]) for i in indices)), Vocab.pad_id, dtype=torch.long)
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
def sinusoids(max_len, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 2017, 3.5):
    one fixed vector per position, nothing to learn. -> (max_len, d_model)"""
    position = torch.arange(max_len).unsqueeze(1)
    inverse_frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(position * inverse_frequency)
    pe[:, 1::2] = torch.cos(position * inverse_frequency)
    return pe


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, d_hid, nlayers, dropout, max_len, pos_encoding, pooling):
        super().__init__()
        self.d_model, self.pooling = d_model, pooling
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=Vocab.pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)    # see embed() for this scale
        with torch.no_grad():
            self.embedding.weight[Vocab.pad_id].zero_()
        if pos_encoding == "learned":                                  # one learned vector per position
            self.pe = nn.Parameter(nn.init.normal_(torch.empty(max_len, d_model), std=0.02))
        else:                                                          # fixed: computed again, never saved
            self.register_buffer("pe", sinusoids(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        # Pre-norm layers (norm_first: LayerNorm at the start of each residual branch; Wang et al. 2019, Xiong et al.
        # 2020) keep the gradients well scaled from the start, so they train stably without the long warmup that
        # post-norm layers need (Xiong et al. 2020). Their stack's output is not normalised: a final LayerNorm is.
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def embed(self, ids):
        """Token embeddings times sqrt(d_model), plus positions. Vaswani et al. (2017, 3.4) scale the embedding by
        sqrt(d_model) without saying why; here the rows start with std d_model^-0.5 (about unit length), so the
        scaling brings their components to about 1, the size of the sinusoidal encoding's, and neither drowns the
        other."""
        return self.embedding(ids) * math.sqrt(self.d_model) + self.pe[: ids.size(1)]

    def encode(self, ids):
        """Embedding and positions, dropout, the encoder with the padding mask.
        -> (states (batch, length, d_model), padding (batch, length))."""
        padding = ids == Vocab.pad_id              # True where attention must not look
        return self.encoder(self.dropout(self.embed(ids)), src_key_padding_mask=padding), padding

    def forward(self, ids):
        x, padding = self.encode(ids)
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
        x = self.embed(ids)
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
    layer. The classifier's head is no part of it."""

    def __init__(self, classifier):
        super().__init__()
        self.embedding, self.pe = classifier.embedding, classifier.pe       # registered here too: trained, saved
        self.dropout, self.encoder = classifier.dropout, classifier.encoder
        self.encode = classifier.encode                                     # the classifier's, on these modules
        d_model = classifier.d_model
        self.transform = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.bias = nn.Parameter(torch.zeros(classifier.embedding.num_embeddings))

    def forward(self, ids, targets):
        """targets: mask_tokens' (-100 where not chosen). -> (logits over the vocabulary at the chosen positions,
        their targets)."""
        x, _ = self.encode(ids)
        chosen = targets != -100
        return F.linear(self.transform(x[chosen]), self.embedding.weight, self.bias), targets[chosen]


def build_model(config, vocab_size):
    return TransformerClassifier(vocab_size, config["d_model"], config["nhead"], config["d_hid"], config["nlayers"],
                                 config["dropout"], config["max_len"], config["pos_encoding"], config["pooling"])


def load_glove(path, vocab, embedding, use_stems):
    """Initialise the embedding rows of tokens found in a GloVe text file. Vocabulary tokens are Porter stems
    when stem=True, so a GloVe word also matches through its stem; GloVe lists frequent words first, so the
    most frequent word of each stem wins. Returns the number of rows set."""
    matched = set()
    with torch.no_grad():
        for line_number, line in enumerate(read_utf8(path).splitlines(), 1):
            word, *values = line.rstrip().split(" ")
            try:
                vector = torch.tensor([float(v) for v in values])
            except ValueError as e:
                raise ValueError(f"{os.path.basename(path)}: line {line_number}: {e}") from None
            if len(values) != embedding.embedding_dim:
                raise ValueError(f"{os.path.basename(path)}: line {line_number}: {len(values)} numbers, "
                                 f"but d_model is {embedding.embedding_dim}")
            for token in {word, porter_stem(word) if use_stems and word.isalpha() else word}:
                index = vocab.stoi.get(token)
                if index is not None and index >= len(Vocab.SPECIALS) and index not in matched:
                    embedding.weight[index] = vector
                    matched.add(index)
    return len(matched)


# ----------------------------------------------------------------------------- losses and metrics
def mlm_loss(net, ids, vocab_size, generator, run_device):
    """Cross-entropy at the masked positions (BERT 3.1), the masking drawn from generator."""
    inputs, targets = mask_tokens(ids, vocab_size, generator, mask_prob)
    logits, chosen_targets = net(inputs.to(run_device), targets.to(run_device))
    if chosen_targets.numel() == 0:      # nothing chosen in this batch: a zero loss that reaches every weight
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), chosen_targets)


def classification_metrics(predictions, labels):
    """Accuracy and macro-F1 (the mean over classes of 2PR/(P+R)), from the confusion matrix."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)), 1)
    true_positive, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    f1 = 2 * true_positive / np.maximum(1, predicted + actual)      # 0 for a class neither predicted nor present
    present = actual > 0
    return {"accuracy": float(true_positive.sum() / max(1, len(labels))),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


@torch.no_grad()
def predict_logits(model, encoded, run_device, ctx, examples_per_batch=256):
    """Logits for every example, in order (batches of similar length for speed, then put back in order)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits = torch.empty(len(encoded), NUM_CLASSES)
    for s in range(0, len(order), examples_per_batch):
        indices = order[s:s + examples_per_batch]
        ids, _ = collate(encoded, indices)
        with ctx:
            logits[indices] = model(ids.to(run_device)).float().cpu()
    return logits


def evaluate(model, encoded, labels, run_device, ctx):
    """Accuracy, macro-F1 and the loss (plain cross-entropy, without label smoothing) on labelled examples;
    {} without any."""
    if not labels:
        return {}
    logits = predict_logits(model, encoded, run_device, ctx)
    metrics = classification_metrics(logits.argmax(1).tolist(), labels)
    metrics["loss"] = F.cross_entropy(logits, torch.tensor(labels)).item()
    return metrics


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps, peak):
    """The learning rate of step (from 0): linear warmup over warmup_steps up to the peak (the Transformer's schedule
    warms up linearly too, Vaswani et al. 2017, 5.3), then cosine decay (Loshchilov & Hutter 2017, without
    restarts) down to peak * min_lr_frac at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(named_parameters):
    """AdamW's two parameter groups. Weight decay applies to weight matrices only: not to biases and LayerNorm gains,
    offsets and scales that have no reason to be small; not to the embeddings (tokens, learned positions): a row
    gets a gradient only in the steps whose batch holds its token, but AdamW's decay shrinks it at every step, so the
    rows of rare tokens would fade between their appearances (minGPT leaves embeddings undecayed too)."""
    decays = [(p.dim() >= 2 and "embedding" not in name and name != "pe", p) for name, p in named_parameters]
    return [{"params": [p for d, p in decays if d == group], "weight_decay": weight_decay if group else 0.0}
            for group in (False, True)]    # the embedding (no decay) comes first, as the parameters do


# Every checkpoint holds its run's configuration (and a fingerprint of its data). A run resumes it only with the same
# values, except for these: what to do and where, how to run it, and what may change between runs (more epochs, a
# lower learning rate...), which continue with the new value.
MAY_CHANGE = set("train predict bench attention data_dir out_dir test_file submission device precision num_threads "
                 "log_every max_minutes holdout_frac epochs lr min_lr_frac warmup_steps weight_decay grad_clip "
                 "label_smoothing dropout embeddings pretrain_lr ensemble ensemble_alternate_stem".split())


def fingerprint(records):
    """A short hash of the records: a resumed run must train on the same data."""
    return hashlib.sha1(json.dumps(records).encode()).hexdigest()[:16]


def resume(checkpoint, model, optimizer, path, precision_name, rank):
    """-> fp16's gradient scaler (disabled, a no-op, in bf16 and fp32: the loss is multiplied before backward so that
    small gradients do not underflow to 0 in float16). A saved phase restores the weights, the optimizer's moments and
    the scaler's scale: it continues exactly; one saved in another precision continues with a fresh scaler."""
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=precision_name == "fp16")
    if "model" in checkpoint:
        model.load_state_dict(checkpoint["model"])
        decays = [group["weight_decay"] for group in optimizer.param_groups]   # this run's (parameter_groups)
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, decay in zip(optimizer.param_groups, decays):              # not the saved run's
            group["weight_decay"] = decay
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        if rank == 0:
            print(f"resuming from {path} at step {checkpoint['step']} (saved in {checkpoint['precision']})")
    return scaler


def end_epoch(model, optimizer, scaler, checkpoint, record, epochs_done, stop, val, path, system):
    """After a whole epoch or a stop, in every process: a non-finite loss or weights stop the run, with the last good
    checkpoint kept (the weights are checked before every save); a whole epoch goes into the history. Then rank 0
    logs it, fine-tuning with its validation scores and the learning curve; best.pt takes the model if
    it validates better than the best so far, and always without a validation split: the latest model is the one to
    keep, also when --max_minutes cuts it short near the end of its schedule, where the learning rate is already low.
    Last, rank 0 saves the checkpoint to resume from."""
    run_device, precision_name, ctx, rank, _ = system
    if stop == "inf or NaN" or not all(bool(p.isfinite().all()) for p in model.parameters()):
        kept = f"{path} keeps step {checkpoint['step']}" if checkpoint["step"] else "nothing was saved"
        phase, rate = ("pre-training", "--pretrain_lr") if val is None else ("training", "--lr")
        raise ValueError(f"the {phase} loss or weights turned inf or NaN by step {record['step']}: training stopped; "
                         f"{kept}. Lower {rate} or try --precision=fp32")
    whole, out_dir = float(epochs_done).is_integer(), os.path.dirname(path)
    if whole:
        checkpoint["history"].append(record)
    if rank == 0 and whole and val is None:
        print(f"pre-training epoch {record['epoch']}: masked-language loss {record['mlm_loss']:.4f}")
    if rank == 0 and val is not None and (stop != "a signal" or whole):   # a signal mid-epoch: save and go
        metrics = evaluate(model, *val, run_device, ctx)
        record.update(metrics)
        if whole:
            scores = (f"val loss {metrics['loss']:.4f} val accuracy {metrics['accuracy']:.4f} val macro-F1 "
                      f"{metrics['macro_f1']:.4f}" if metrics else "(no validation split)")
            print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} {scores}", flush=True)
            plot_learning_curve(checkpoint["history"], os.path.join(out_dir, "learning_curve.png"))   # in the extras
        if not metrics or metrics["accuracy"] > checkpoint["best_accuracy"]:
            checkpoint["best_accuracy"] = metrics.get("accuracy", -1.0)
            save_atomic({"model": model.state_dict(), "config": checkpoint["config"], "vocab": checkpoint["vocab"],
                         "epoch": epochs_done, "metrics": record}, os.path.join(out_dir, "best.pt"))
    checkpoint["step"] = record["step"]
    if rank == 0:
        save_atomic({**checkpoint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "precision": precision_name}, path)


def agreed_stop(loss, deadline, run_device):
    """Why to stop after this step (a non-finite loss, a signal, the deadline), or None: agreed by every process, so
    that all stop after the same step."""
    flags = torch.tensor([not math.isfinite(loss.item()), bool(STOP), time.time() > deadline], device=run_device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, signalled, late = flags.tolist()
    return "inf or NaN" if nonfinite else "a signal" if signalled else "--max_minutes" if late else None


def train_loop(model, optimizer, batch_loss, data, n_epochs, seed, deadline, checkpoint, path, system, val=None):
    """Both phases' loop over data = (ids, labels), labels None in pre-training, from checkpoint's step to n_epochs.
    Fine-tuning evaluates on val. Saves checkpoint to path after each epoch and at a stop. -> why it stopped early, or
    None. A signal ends the program here, after the save."""
    run_device, precision_name, ctx, rank, world_size = system
    (encoded, labels), phase = data, "pre-training" if val is None else "training"
    scaler = resume(checkpoint, model, optimizer, path, precision_name, rank)    # (fp16's loss scaling)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[run_device] if "cuda" in run_device else None) \
        if dist.is_initialized() else model
    steps_per_epoch = math.ceil(len(encoded) / batch_size) // world_size   # each process takes every world_size-th
    step, total_steps, stop = checkpoint["step"], n_epochs * steps_per_epoch, None
    while step < total_steps and not stop:
        epoch = step // steps_per_epoch
        # this process's batches of the epoch, in an order from (seed, epoch) only: a resumed run skips those it did
        batches = make_batches([len(e) for e in encoded], batch_size, random.Random(seed + epoch))
        net.train()
        tick, first = time.time(), step
        # the epoch's loss so far (its sum, its steps): a run resumed within the epoch goes on from the saved one
        loss_sum, losses = checkpoint.get("epoch_loss", (0.0, 0)) if step > epoch * steps_per_epoch else (0.0, 0)
        for batch in batches[rank:steps_per_epoch * world_size:world_size][step - epoch * steps_per_epoch:]:
            torch.manual_seed(seed + step * world_size + rank)    # dropout masks from (seed, step, rank): as on resume
            step_lr = learning_rate(step, total_steps, optimizer.defaults["lr"])
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            # forward backward update: the loss scaled (fp16), the true gradient clipped; the scaler skips inf steps
            ids, targets = collate(encoded, batch, labels)
            with ctx:
                loss = batch_loss(net, ids, targets, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step, loss_sum, losses = step + 1, loss_sum + loss.item(), losses + 1
            # logging: the mean loss of this epoch so far, examples/s of all processes
            if step % log_every == 0 and rank == 0:
                speed = (step - first) * batch_size * world_size / max(1e-9, time.time() - tick)
                print(f"{'pre-training ' * (val is None)}epoch {epoch + 1} step {step}/{total_steps} loss "
                      f"{loss_sum / losses:.4f} lr {step_lr:.2e} {speed:.0f} examples/s", flush=True)
            stop = agreed_stop(loss, deadline, run_device)
            if stop:
                break
        # end of the epoch, or of this run
        record = {"epoch": epoch + 1, "step": step, "train_loss" if val else "mlm_loss": loss_sum / losses}
        checkpoint["epoch_loss"] = (loss_sum, losses)
        end_epoch(model, optimizer, scaler, checkpoint, record, step / steps_per_epoch, stop, val, path, system)
    if stop and rank == 0:
        name = signal.Signals(STOP[0]).name if stop == "a signal" and STOP else stop
        print(f"{phase} stopped by {name} at step {step}/{total_steps}; checkpoint saved",
              file=sys.stderr if stop == "a signal" else sys.stdout, flush=True)
    if dist.is_initialized():
        dist.barrier()                         # rank 0's last save is done before any process leaves
    if stop == "a signal":
        sys.exit(128 + (STOP[0] if STOP else 0))
    return stop


def train_model(records, out_dir, mlm_records, mlm_epochs, seed, use_stems, minutes, system):
    """One model on records (a stratified val_frac validates), resuming out_dir's run; with mlm_epochs, masked-language
    pre-training on the texts of records and mlm_records first. -> the history of its epochs (on rank 0)."""
    run_device, precision_name, ctx, rank, world_size = system
    start, mlm_records = time.time(), list(mlm_records or [])
    deadline = start + minutes * 60 if minutes > 0 else math.inf
    config = {name: globals()[name] for name, _ in config_block(__file__) if name}    # this run, its data included
    config.update(seed=seed, stem=use_stems, pretrain_epochs=mlm_epochs, processes=world_size,
                  train_data=fingerprint(records), mlm_texts=fingerprint(mlm_records) if mlm_epochs else "")
    ckpt_path, pretrain_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "pretrain.pt")
    checkpoint = check_resume(ckpt_path, config, run_device)
    pretrained = check_resume(pretrain_path, config, run_device) if mlm_epochs and not checkpoint else None
    saved = checkpoint or pretrained
    # the data: a stratified validation split, the vocabulary from the training part only (or the saved run's)
    check_writable(out_dir)
    labels = [r["label"] for r in records]
    train_idx, val_idx = stratified_split(labels, val_frac, seed)
    vocab = Vocab(saved["vocab"]) if saved else Vocab.build(
        (segment for i in train_idx for segment in record_tokens(records[i], config)), min_freq, max_vocab)
    encoded = encode_records(records, vocab, config)
    if rank == 0:
        vocab.save(os.path.join(out_dir, "vocab.json"))           # a readable copy; the checkpoints hold the real one
        print(f"data: {len(train_idx)} train, {len(val_idx)} validation, vocabulary {len(vocab)}"
              + ("" if val_idx else " (no validation split: each epoch's model becomes best.pt)"))
    if math.ceil(len(train_idx) / batch_size) < world_size:
        raise ValueError(f"{len(train_idx)} training records make no batch for each of {world_size} processes")
    torch.manual_seed(seed)
    model = build_model(config, len(vocab)).to(run_device)
    glove_rows = load_glove(embeddings, vocab, model.embedding, use_stems) if embeddings and not saved else 0
    if rank == 0:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
              + (f"; {glove_rows} embedding rows from {embeddings}" if glove_rows else ""))
    fresh = {"step": 0, "config": config, "vocab": vocab.itos, "history": []}
    if mlm_epochs and not checkpoint:     # phase 1: masked-language modelling (BERT 3.1) with the same encoder
        mlm = MaskedLanguageModel(model).to(run_device)
        texts = encode_records(records + mlm_records, vocab, config)
        optimizer = torch.optim.AdamW(parameter_groups(mlm.named_parameters()), lr=pretrain_lr, fused=True)
        # the masking depends only on (seed, step, rank): exact on resume
        loss = lambda net, ids, _, step: mlm_loss(net, ids, len(vocab), torch.Generator().manual_seed(
            seed * 1000003 + step * world_size + rank), run_device)
        share = start + minutes * 30 if minutes > 0 else math.inf   # half the budget, then fine-tuning starts
        stopped = train_loop(mlm, optimizer, loss, (texts, None), mlm_epochs, seed + 7777, share,
                             pretrained or dict(fresh), pretrain_path, system)
        if stopped and time.time() > deadline:      # the whole budget spent: nothing to fine-tune yet
            return []
    # phase 2: the classifier learns the labels, with label smoothing (Szegedy et al. 2016, 7): the target gives 1 -
    # label_smoothing to the true class and spreads label_smoothing evenly over all classes (no overconfidence).
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters()), lr=lr, fused=True)
    loss = lambda net, ids, targets, step: F.cross_entropy(net(ids.to(run_device)).float(), targets.to(run_device),
                                                           label_smoothing=label_smoothing)
    checkpoint = checkpoint or dict(fresh, history=[], best_accuracy=-1.0)
    split = lambda indices: ([encoded[i] for i in indices], [labels[i] for i in indices])
    train_loop(model, optimizer, loss, split(train_idx), epochs, seed, deadline, checkpoint, ckpt_path, system,
               split(val_idx))
    return checkpoint["history"]


def member_dir(out_dir, k):
    """Where model k (from 0) of the ensemble lives: the first in out_dir itself (as with ensemble = 1), the others
    in out_dir/member_2, out_dir/member_3, ..."""
    return out_dir if k == 0 else os.path.join(out_dir, f"member_{k + 1}")


def train_ensemble(records, out_dir, mlm_records, mlm_epochs, system):
    """`ensemble` models, one after another, each a whole train_model() run with its own seed: its own validation
    split, initial weights, batch order and dropout masks. Their mistakes differ, so the average of their logits is
    right more often than any one of them (Dietterich 2000, "Ensemble Methods in Machine Learning"). With
    ensemble_alternate_stem, every second model also reads the text with the other `stem` setting (whole words
    instead of Porter stems): models that see the text differently disagree more, and their average gains more
    (docs/results.md: the default command's four models score 79.4 % held-out, one model alone about 78 %).
    --max_minutes is one budget: each model gets an equal share of what is left when it starts (never 0, which
    means no limit, when the budget is spent). Running the same command again skips the finished models and resumes
    the stopped one."""
    deadline = time.time() + max_minutes * 60
    # Ctrl-C, and SIGTERM (what Colab and Kaggle send when a runtime ends): a checkpoint after the current step, then
    # stop (on_signal, below). Only while training: predicting or drawing has nothing to save and stops at once.
    previous = [signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        for k in range(ensemble):
            use_stems = stem != (ensemble_alternate_stem and k % 2 == 1)
            minutes = max(1e-6, (deadline - time.time()) / 60 / (ensemble - k)) if max_minutes > 0 else 0.0
            folder = member_dir(out_dir, k)
            if ensemble > 1 and system[3] == 0:
                print(f"ensemble model {k + 1}/{ensemble}: seed {seed + k}, stem {use_stems}, in {folder}"
                      + (f", {minutes:.1f} minutes" if max_minutes > 0 else ""), flush=True)
            train_model(records, folder, mlm_records, mlm_epochs, seed + k, use_stems, minutes, system)
    finally:
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- prediction
def load_trained(out_dir, run_device):
    """The best checkpoint: (model, vocabulary, the configuration it was trained with). The preprocessing settings
    come from the checkpoint and are passed on explicitly; this module's constants are left as they are."""
    path = os.path.join(out_dir, "best.pt")
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: train first (python textcls.py --train --out_dir={out_dir})")
    checkpoint = load_checkpoint(path, run_device)
    model = build_model(checkpoint["config"], len(checkpoint["vocab"])).to(run_device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), Vocab(checkpoint["vocab"]), checkpoint["config"]


def load_ensemble(out_dir, run_device):
    """out_dir's models as load_trained gives them, each loaded once: as many as the first one was trained with
    (its `ensemble`), and those a later run with a larger --ensemble added. A missing one stops here, before any
    other work."""
    first, count = load_trained(out_dir, run_device), 1
    while count < first[2]["ensemble"] or os.path.exists(os.path.join(member_dir(out_dir, count), "best.pt")):
        count += 1
    return [first] + [load_trained(member_dir(out_dir, k), run_device) for k in range(1, count)]


def ensemble_logits(models, records, run_device, ctx):
    """The mean of the models' logits for records, each model with its own vocabulary and preprocessing (from its
    checkpoint)."""
    return sum(predict_logits(model, encode_records(records, vocab, config), run_device, ctx)
               for model, vocab, config in models) / len(models)


def write_submission(out_dir, test_file, submission, system):
    """`id,label` for every record of test_file, in id order, written atomically (a kill never leaves half a
    submission, nor loses the old one); returns the predicted labels. With labels in the file, also the accuracy.
    main checks the submission's path before any work."""
    models = load_ensemble(out_dir, system[0])     # every model there before the test file is read
    records = sorted(load_news(test_file, require_label=False), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):   # a submission must name each id once
        raise ValueError(f"{test_file}: id {next(i for i in ids if ids.count(i) > 1)} appears more than once")
    predictions = ensemble_logits(models, records, system[0], system[2]).argmax(1).tolist()
    with open(submission + ".tmp", "w") as f:
        f.write("id,label\n")
        f.writelines(f"{r['id']},{p}\n" for r, p in zip(records, predictions))
    os.replace(submission + ".tmp", submission)
    print(f"wrote {len(records)} predictions to {submission} (from the mean logits of {len(models)} model(s))")
    if all("label" in r for r in records):
        metrics = classification_metrics(predictions, [r["label"] for r in records])
        print(f"accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")
    return predictions


# ----------------------------------------------------------------------------- main
def main(argv):
    positional = parse_overrides(argv, globals(), CHECKS)
    if positional:
        sys.exit(f"error: textcls.py takes only --name=value options, got {positional[0]!r} (--help lists them)")
    if not (train or predict or attention or bench):
        return print(__doc__)
    torch.set_num_threads(num_threads)
    rank = int(os.environ.get("RANK", 0))
    try:
        system = setup_system()
        if predict and os.path.isdir(submission):   # the submission's path, before any work (training included)
            raise ValueError(f"--submission={submission} is a folder: give a file name such as submission.csv")
        if predict:
            check_writable(os.path.dirname(submission) or ".")
        if train:                                  # (MLM reads test_file's texts too, unless --pretrain_test=False)
            mlm_records = load_news(test_file, require_label=False) if pretrain_epochs and pretrain_test else []
            train_ensemble(load_news(os.path.join(data_dir, "News_train.json")), out_dir, mlm_records,
                           pretrain_epochs, system)
        if predict and rank == 0:                  # under torchrun: one submission, written by rank 0
            write_submission(out_dir, test_file, submission, system)
        if attention and rank == 0:
            draw_attention(attention, out_dir)     # in the extras below
        if bench:
            run_bench(data_dir, out_dir, system)   # in the extras below
    except (ValueError, OSError) as e:            # the one error path: one line, naming the file and the record
        sys.exit(f"error: {e}" if rank == 0 else 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- robustness (read last) ---
def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint of this script. weights_only=True: tensors, numbers, strings, lists and dicts only, so a file
    from elsewhere cannot run code on loading; a damaged or foreign file is a one-line error that says what to do."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        assert {"model", "config", "vocab"} <= checkpoint.keys(), "no model, configuration and vocabulary inside"
    except Exception as e:   # truncated, empty, another program's, or a pickle that asks to run code
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        previous = f"the previous state may be in {path}.tmp, or " if os.path.exists(path + ".tmp") else ""
        raise ValueError(f"{path} is damaged or not a checkpoint of textcls.py ({type(e).__name__}: {reason}); "
                         f"{previous}delete it to start again") from None
    return checkpoint


def check_resume(path, config, run_device):
    """The checkpoint in path, or None if there is none. A run that cannot continue it (another configuration,
    other data) stops here, naming every differing key."""
    if not os.path.exists(path):
        return None
    saved = load_checkpoint(path, run_device)
    was = {key: saved["config"].get(key) for key in config if key not in MAY_CHANGE}
    now = {key: config[key] for key in was if was[key] != config[key]}
    if now:
        raise ValueError(f"{path} was trained with {', '.join(f'{k}={was[k]!r}' for k in now)}; this run has "
                         f"{', '.join(f'{k}={v!r}' for k, v in now.items())}: train into another --out_dir")
    return saved


def check_writable(folder):
    """folder (created if missing) takes new files: checked before any long work, not after it."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".write_test_{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".write_test_{os.getpid()}"))
    except OSError as e:
        raise ValueError(f"cannot write in {folder}: {e.strerror or e}") from None


STOP = []   # the signals received: the training loop saves a checkpoint after its current step and stops


def on_signal(signum, frame):
    if STOP:                                      # a second one stops at once
        raise KeyboardInterrupt
    STOP.append(signum)
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping", flush=True)


# --- extras (not the lesson) ---
# The precision policy and the GPU check (compatibility with the GPUs students get), the charts, --bench.
def choose_precision(requested, device_type):
    """The autocast precision for `precision` on this device, and why: auto is bf16 where the hardware computes it
    natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16), fp16 with a gradient
    scaler on older GPUs (a T4, 7.5, only emulates bf16: slow, and a P100 fails in cuBLAS), fp32 elsewhere (on
    Apple's mps too: its float16 and bfloat16 speed is not measured here)."""
    major, minor = torch.cuda.get_device_capability() if device_type == "cuda" else (0, 0)
    if requested == "bf16" and device_type == "cuda" and major < 8:
        raise ValueError(f"--precision=bf16 needs CUDA capability 8.0; this GPU has {major}.{minor}: use "
                         f"--precision=fp16 (or auto, which picks fp16 with a gradient scaler here)")
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda" and major >= 8:
        return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
    if device_type == "cuda":
        return "fp16", f"CUDA capability {major}.{minor} has no native bfloat16: float16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return "bf16", "this CPU computes bfloat16 natively (AMX or AVX512-BF16)"
    return "fp32", f"no native bfloat16 on this {device_type}"


def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively: AMX or AVX512-BF16 in Linux's /proc/cpuinfo."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def check_cuda_build():
    """Stop at once where this PyTorch build has no kernels for the GPU (Kaggle's P100, sm_60, under a build for
    sm_70 and newer), rather than with a CUDA error from deep inside. A cubin sm_XY runs on capability X.y for
    y >= Y; PTX compute_XY is compiled for any capability >= X.Y."""
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    # "sm_86" -> ("sm", 86), "sm_90a" -> ("sm", 90), "compute_120" -> ("compute", 120): capability 12.0 is 120
    built = [(arch.split("_")[0], int("".join(c for c in arch.split("_")[-1] if c.isdigit()))) for arch in archs]
    runs = any(v // 10 == major and v % 10 <= minor if kind == "sm" else v <= 10 * major + minor for kind, v in built)
    if archs and not runs:
        raise ValueError(f"this PyTorch {torch.__version__} has GPU kernels for {' '.join(archs)}, none for "
                         f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a build that lists it (README)")


def plot_learning_curve(history, path):
    """One line per series over the epochs: the train loss, and with a validation split its loss, accuracy and
    macro-F1. Each runs from its lowest value (bottom) to its highest (top), both written beside its name."""
    image = Image.new("RGB", (720, 330), "white")
    draw = ImageDraw.Draw(image)
    names = [name for name in ("train_loss", "loss", "accuracy", "macro_f1") if all(name in h for h in history)]
    for k, name in enumerate(names):
        ys, colour = [h[name] for h in history], [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)][k]
        low, high = min(ys), max(ys) + 1e-9
        points = [(40 + 640 * i / max(1, len(ys) - 1), 300 - 260 * (y - low) / (high - low)) for i, y in enumerate(ys)]
        draw.line(points + points[-1:], fill=colour, width=2)
        draw.text((40 + 170 * k, 10), f"{'val ' * (name != 'train_loss')}{name} {low:.3f}..{high:.3f}", fill=colour)
    draw.text((40, 310), f"epoch 1 .. {history[-1]['epoch']}", fill="black")
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def draw_attention(sentence, out_dir, cell=28):
    """--attention: classify one "headline | description" with the best checkpoint and draw one heat map per layer
    (averaged over heads): row = query token, column = key token, darker = more attention."""
    model, vocab, config = load_trained(out_dir, "cpu")
    headline, _, description = sentence.partition("|")   # "headline | description" gives two segments
    ids = torch.tensor(encode_records([{"headline": headline, "short_description": description}], vocab, config))
    with torch.no_grad():
        probabilities = model(ids).softmax(-1)[0]
    tokens, maps = vocab.decode(ids[0].tolist()), model.attention_maps(ids)
    n, label = len(tokens), 8 * max(len(t) for t in tokens) + 10
    image = Image.new("RGB", ((label + n * cell + 20) * len(maps), label + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    for layer, weights in enumerate(maps):
        weights = weights[0].mean(0)                    # first example, mean over heads: (query, key)
        shades = (255 * (1 - weights / weights.max())).to(torch.uint8).numpy()
        x0, y0 = layer * (label + n * cell + 20) + label, label + 20
        image.paste(Image.fromarray(shades).resize((n * cell, n * cell), Image.NEAREST), (x0, y0))
        draw.text((x0, 2), f"layer {layer + 1} (mean over heads)", fill="black")
        for q in range(n):
            draw.text((x0 - label + 2, y0 + q * cell + 8), tokens[q], fill="black")
            draw.text((x0 + q * cell + 2, y0 - 14 - 10 * (q % 2)), tokens[q][:4], fill="black")   # keys, staggered
    image.save(os.path.join(out_dir, "attention.png"))
    print(f"{sentence!r} -> {LABEL_NAMES[int(probabilities.argmax())]} ({float(probabilities.max()):.2f}); "
          f"attention maps in {os.path.join(out_dir, 'attention.png')}")


def bench_speed(records, run_device, names=("fp32", "bf16"), steps=40, rounds=2):
    """Training examples/s of the configured model on this device in each precision of names, on the same batches
    in the same run. The rounds alternate them and the best round of each counts (other work on a shared machine
    slows some rounds down)."""
    config = {name: globals()[name] for name, _ in config_block(__file__) if name}   # as train_model's, less the data
    vocab = Vocab.build((segment for r in records for segment in record_tokens(r, config)), min_freq, max_vocab)
    encoded, labels = encode_records(records, vocab, config), [r["label"] for r in records]
    batches = make_batches([len(e) for e in encoded], batch_size, random.Random(seed))[:steps + 5]
    warm = min(5, len(batches) - 1)    # the first steps warm up (allocations, kernel choice): not timed
    best = {}
    for name in list(names) * rounds:
        torch.manual_seed(seed)
        model = build_model(config, len(vocab)).to(run_device).train()
        optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters()), lr=lr)
        for i, batch in enumerate(batches):
            if i == warm:
                synchronize(run_device)
                tick = time.perf_counter()
            ids, targets = collate(encoded, batch, labels)
            with torch.autocast(run_device.split(":")[0], dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = F.cross_entropy(model(ids.to(run_device)).float(), targets.to(run_device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(run_device)
        best[name] = max(best.get(name, 0.0), sum(map(len, batches[warm:])) / (time.perf_counter() - tick))
    return best


def synchronize(run_device):   # wait for the GPU's queued work before reading the clock
    if run_device.startswith("cuda"):
        torch.cuda.synchronize(run_device)
    elif run_device == "mps":
        torch.mps.synchronize()


def run_bench(data_dir, out_dir, system):
    """On one stratified held-out split: the training speed in each precision, then this Transformer with the
    constants above without and with masked-language pre-training (the held-out texts, never their labels, play the
    test texts that MLM may read). max_minutes applies to each run."""
    run_device, precision_name, ctx = system[:3]
    check_writable(out_dir)
    records = load_news(os.path.join(data_dir, "News_train.json"))
    kept, held_out = stratified_split([r["label"] for r in records], holdout_frac, seed + 1)
    train_records, test_records = [records[i] for i in kept], [records[i] for i in held_out]
    names = ["fp32", "bf16"]
    if run_device.startswith("cuda") and torch.cuda.get_device_capability()[0] < 8:
        names = ["fp32"]
        print("note: no bf16 speed on this GPU (CUDA capability below 8.0 has no native bfloat16)")
    speeds = bench_speed(train_records, run_device, names)
    print(f"training speed on {run_device}, batch {batch_size}: "
          + ", ".join(f"{name} {speed:.0f} examples/s" for name, speed in speeds.items())
          + f"; the runs below use {precision_name}", flush=True)
    print(f"held-out split: {len(test_records)} records ({holdout_frac:.0%} stratified, seed {seed + 1}); "
          f"training records: {len(train_records)}")
    mlm_epochs = pretrain_epochs or 2
    for name, folder, epochs_of_mlm in [("Transformer, no MLM", "bench_no_mlm", 0),
                                        (f"Transformer, MLM {mlm_epochs} ep", "bench_mlm", mlm_epochs)]:
        tick = time.time()
        train_ensemble(train_records, os.path.join(out_dir, folder), test_records if pretrain_test else [],
                       epochs_of_mlm, system)
        models = load_ensemble(os.path.join(out_dir, folder), run_device)
        predictions = ensemble_logits(models, test_records, run_device, ctx).argmax(1).tolist()
        metrics = classification_metrics(predictions, [r["label"] for r in test_records])
        print(f"{name}: held-out accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}, "
              f"{(time.time() - tick) / 60:.1f} minutes of training (wall clock, tokenizing included)", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:   # Ctrl-C outside training (predicting, drawing), or a second one in it: one line
        sys.exit("\nstopped by Ctrl-C")
