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
with), pretrain.pt (with pretrain_epochs > 0), vocab.json, history.json and learning_curve.png.
"""
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
from torch.nn.parallel import DistributedDataParallel
from PIL import Image, ImageDraw

from tokenizer import Vocab, parse_overrides, preprocess, stem as porter_stem

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
val_frac = 0.0          # stratified validation split, e.g. 0.05; 0 = train on all (best.pt = the last epoch)
bucket = True           # batches of similar length (less padding, faster); False = fully random batches
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this many minutes of training; 0 = no limit
ensemble = 4            # models trained one after another (seeds seed, seed+1, ...); --predict averages their logits
ensemble_alternate_stem = True  # models 2, 4, ... of an ensemble read the text with the other `stem` setting
seed = 1337
device = ""             # "" = cuda if available, else mps (Apple), else cpu; or "cpu", "cuda", "cuda:N", "mps"
precision = "auto"      # auto | bf16 | fp16 | fp32 (auto: bf16 where native, fp16 + scaler on older GPUs, else fp32)
deterministic = True    # deterministic algorithms, cuBLAS workspace, cuDNN flags: same command, same numbers
num_threads = 2         # CPU threads per process
log_every = 200         # steps between progress lines
# benchmark
holdout_frac = 0.1      # --bench: stratified held-out split that no model trains on
bench_pretrain_epochs = 2  # --bench: MLM epochs of its "with MLM" run when pretrain_epochs is 0
# -----------------------------------------------------------------------------

CHECKS = {"pos_encoding": ("sinusoidal", "learned"), "pooling": ("mean", "cls"),
          "precision": ("auto", "bf16", "fp16", "fp32"),
          "max_vocab": (lambda v: v > len(Vocab.SPECIALS), f"an integer > {len(Vocab.SPECIALS)} (the special tokens)"),
          "max_len": (lambda v: v >= 3, "an integer >= 3 (<cls>, <sep> and one token)"),
          "d_model": (lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
          "device": (lambda v: v in ("", "cpu", "cuda", "mps") or v.startswith("cuda:"), '"", cpu, cuda[:N] or mps'),
          "mask_prob": (lambda v: 0 < v < 1, "a number in (0, 1)"),
          "holdout_frac": (lambda v: 0 < v < 1, "a number in (0, 1)")}
# counts that must be >= 1, numbers that must be > 0 or >= 0, and fractions
AT_LEAST_ONE = "min_freq nhead d_hid nlayers epochs batch_size ensemble num_threads log_every bench_pretrain_epochs"
POSITIVE = "pretrain_lr lr grad_clip pretrain_share"
NOT_NEGATIVE = "pretrain_epochs warmup_steps encoder_lr_frac weight_decay max_minutes min_lr_frac"
CHECKS.update({name: (lambda v: v >= 1, "an integer >= 1") for name in AT_LEAST_ONE.split()})
CHECKS.update({name: (lambda v: v > 0, "a number > 0") for name in POSITIVE.split()})
CHECKS.update({name: (lambda v: v >= 0, "a number >= 0") for name in NOT_NEGATIVE.split()})
CHECKS.update({name: (lambda v: 0 <= v < 1, "a number in [0, 1)") for name in ["dropout", "label_smoothing",
                                                                                 "val_frac"]})

NUM_CLASSES = 15
LABEL_NAMES = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING",
               "HEALTHY LIVING", "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS",
               "BLACK VOICES", "HOME & LIVING", "PARENTS"]


# ----------------------------------------------------------------------------- system: processes, device, precision
def setup_system():
    """nanoGPT's system block, run by every entry point: the processes (under torchrun, RANK and WORLD_SIZE set: one
    per GPU with nccl, or CPU processes with gloo), the device and the autocast precision, each with why.
    -> (ddp, rank, world_size, device, precision name, autocast context)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    run_device, why = pick_device(device)                                  # (the compatibility helpers are
    if ddp and run_device.startswith("cuda"):                              # in the extras at the end)
        run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(run_device)
    if run_device.startswith("cuda"):
        check_cuda_build()
    if ddp and not dist.is_initialized():      # once per program: the models of an ensemble share it
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    precision_name, reason = choose_precision(precision, run_device.split(":")[0])
    set_deterministic(deterministic)
    ctx = torch.autocast(run_device.split(":")[0], dtype=DTYPES[precision_name], enabled=precision_name != "fp32")
    if rank == 0:
        print(f"device: {run_device} ({why}); precision: {precision_name} ({reason}); deterministic algorithms "
              f"{'on' if deterministic else 'off'}")
    return ddp, rank, world_size, run_device, precision_name, ctx


# ----------------------------------------------------------------------------- data
def read_utf8(path):
    """The whole text of a file; bytes that are not UTF-8 are an error naming file, line and byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{os.path.basename(path)}: line {line}: byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start} is not UTF-8 (save the file as UTF-8)") from None


def check_record(obj, where, require_label):
    """obj itself if it is a valid record; otherwise a ValueError naming `where` (file and record)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    fields = [("id", int), ("headline", str), ("short_description", str)]
    for field, kind in fields + ([("label", int)] if require_label or "label" in obj else []):
        if field not in obj:
            raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(obj[field], kind) or isinstance(obj[field], bool):
            raise ValueError(f"{where}: field '{field}' must be {kind.__name__}, got {obj[field]!r}")
    if "label" in obj and not 0 <= obj["label"] < NUM_CLASSES:
        raise ValueError(f"{where}: label {obj['label']} is outside 0..{NUM_CLASSES - 1}")
    return obj


def load_news(path, require_label=True):
    """A News_*.json file as a list of dicts {id, headline, short_description[, label]}. Accepts a JSON array
    or JSON lines (one object a line); anything malformed is a ValueError naming file and record."""
    name, text = os.path.basename(path), read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            objects = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        where = [f"{name}: record {i}" for i in range(len(objects))]
    else:
        objects, where = [], []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objects.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{name}: line {line_number}: invalid JSON: {e.msg}") from None
                where.append(f"{name}: line {line_number}")
    if not objects:
        raise ValueError(f"{name}: no records")
    return [check_record(obj, w, require_label) for obj, w in zip(objects, where)]


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


def encode_records(records, vocab, config):
    """Records -> `<cls> headline <sep> description` ids, with config's preprocessing, cut to max_len longest-first."""
    return [vocab.encode(a, max_len=config["max_len"], tokens_b=b) for a, b in (record_tokens(r, config)
                                                                                 for r in records)]


def make_batches(lengths, batch_size, rng, bucket):
    """Lists of example indices. With bucketing, shuffle, then sort each window of 50 batches by length and
    cut it into batches: each batch holds similar lengths (little padding); the batches are shuffled again, so
    their order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        window = batch_size * 50
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


class TransformerClassifier(nn.Module):
    def __init__(self, vocab_size, d_model, nhead, d_hid, nlayers, dropout, max_len, pos_encoding, pooling):
        super().__init__()
        self.d_model, self.pooling = d_model, pooling
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=Vocab.pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)    # see embed() for this scale
        with torch.no_grad():
            self.embedding.weight[Vocab.pad_id].zero_()
        positional = {"sinusoidal": SinusoidalPositionalEncoding, "learned": LearnedPositionalEncoding}
        self.positional = positional[pos_encoding](d_model, max_len)
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
        return self.positional(self.embedding(ids) * math.sqrt(self.d_model))

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
    layer."""
    embed, encode = TransformerClassifier.embed, TransformerClassifier.encode    # the classifier's, on these modules

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
        x, _ = self.encode(ids)
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
                raise ValueError(f"{os.path.basename(path)}: line {line_number}: {len(values)} numbers, "
                                 f"but d_model is {embedding.embedding_dim}")
            for token in {word, porter_stem(word) if use_stems and word.isalpha() else word}:
                index = vocab.stoi.get(token)
                if index is not None and index >= len(Vocab.SPECIALS) and index not in matched:
                    embedding.weight[index] = torch.tensor([float(v) for v in values])
                    matched.add(index)
    return len(matched)


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
        with torch.autocast(run_device.split(":")[0], dtype=DTYPES[precision_name], enabled=precision_name != "fp32"):
            logits[indices] = model(ids.to(run_device)).float().cpu()
    return logits


def evaluate(model, encoded, labels, run_device, precision_name):
    """Accuracy, macro-F1 and the loss (plain cross-entropy, without label smoothing) on labelled examples;
    {} without any."""
    if not labels:
        return {}
    logits = predict_logits(model, encoded, run_device, precision_name)
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
        groups.setdefault((decays, lr_scale_of(name)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), ps in groups.items()]


def mlm_loss(net, ids, vocab_size, generator, run_device):
    """Cross-entropy at the masked positions (BERT 3.1), the masking drawn from generator."""
    inputs, targets = mask_tokens(ids, vocab_size, generator, mask_prob)
    logits, chosen_targets = net(inputs.to(run_device), targets.to(run_device))
    if chosen_targets.numel() == 0:      # nothing chosen in this batch: a zero loss that reaches every weight
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), chosen_targets)


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


def prepare_data(records, config, saved, out_dir, rank, world_size):
    """The stratified validation split, the vocabulary from the training part only (or the saved run's, which never
    changes), both parts as token ids. -> (vocab, (train ids, labels), (validation ids, labels))."""
    check_writable(out_dir)                                        # before the long work
    labels = [r["label"] for r in records]
    train_idx, val_idx = stratified_split(labels, config["val_frac"], config["seed"])
    tokens = [record_tokens(r, config) for r in records]
    vocab = Vocab(saved["vocab"]) if saved else \
        Vocab.build((t for i in train_idx for t in tokens[i]), min_freq=min_freq, max_size=max_vocab)
    split = lambda indices: ([vocab.encode(tokens[i][0], max_len=max_len, tokens_b=tokens[i][1]) for i in indices],
                             [labels[i] for i in indices])
    if rank == 0 and saved is None:
        vocab.save(os.path.join(out_dir, "vocab.json.tmp"))        # a readable copy; the checkpoints hold the real one
        os.replace(os.path.join(out_dir, "vocab.json.tmp"), os.path.join(out_dir, "vocab.json"))
    if rank == 0:
        print(f"data: {len(train_idx)} train, {len(val_idx)} validation, vocabulary {len(vocab)}"
              + ("" if val_idx else " (no validation split: each epoch's model becomes best.pt)"))
    if math.ceil(len(train_idx) / batch_size) < world_size:
        raise ValueError(f"{len(train_idx)} training records make no batch for each of {world_size} processes")
    return vocab, split(train_idx), split(val_idx)


def agree(flags, ddp, run_device):
    """Each flag True if it is True in any process. Every process gets the same answer, so all stop at the same
    step (one that stopped alone would leave the others waiting for it in the next gradient all-reduce)."""
    values = torch.tensor([int(bool(f)) for f in flags], device=run_device if ddp else "cpu")
    if ddp:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def end_epoch(model, checkpoint, record, epochs_done, stop, val, path, system):
    """After a whole epoch: pre-training logs its loss; fine-tuning (on rank 0) evaluates on the validation split,
    logs, and writes history.json and the learning curve. Then (fine-tuning, on rank 0) best.pt takes the model if it
    validates better than the best so far; without a validation split always: the latest model is the one to keep.
    After a stop inside an epoch the same holds for the weights reached: an ensemble model cut short near the end of
    its schedule, where the learning rate is already low, is kept as it is, not as it was an epoch earlier."""
    rank, run_device, precision_name, epoch_done = system[1], system[3], system[4], float(epochs_done).is_integer()
    if not all(bool(p.detach().isfinite().all()) for p in model.parameters()):
        raise nonfinite_error("pre-training" if val is None else "training", "finite, but the weights are not",
                              record["step"], path, checkpoint)
    if epoch_done:
        checkpoint["history"].append(record)
    if val is None and epoch_done and rank == 0:
        print(f"pre-training epoch {record['epoch']}: masked-language loss {record['mlm_loss']:.4f}")
    if val is None or rank != 0 or not (epoch_done or stop == "--max_minutes"):
        return
    out_dir, best = os.path.dirname(path), os.path.join(os.path.dirname(path), "best.pt")
    metrics = evaluate(model, *val, run_device, precision_name)
    if epoch_done:
        record.update(metrics)
        scores = (f"val loss {record['loss']:.4f} val accuracy {record['accuracy']:.4f} val macro-F1 "
                  f"{record['macro_f1']:.4f}" if val[1] else "(no validation split)")
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} {scores}", flush=True)
        with open(os.path.join(out_dir, "history.json"), "w") as f:    # a readable copy of the checkpoint's history
            json.dump(checkpoint["history"], f, indent=1)
        plot_learning_curve(checkpoint["history"], os.path.join(out_dir, "learning_curve.png"))   # in the extras
    if "accuracy" not in metrics or metrics["accuracy"] > checkpoint["best_accuracy"] or not os.path.exists(best):
        checkpoint["best_accuracy"] = metrics.get("accuracy", checkpoint["best_accuracy"])
        save_atomic({"model": model.state_dict(), "config": checkpoint["config"], "vocab": checkpoint["vocab"],
                     "epoch": record["epoch"] if epoch_done else epochs_done,
                     "metrics": record if epoch_done else dict(metrics, step=record["step"])}, best)
        if not epoch_done:
            print(f"best.pt: the weights at step {record['step']}"
                  + (f", val accuracy {metrics['accuracy']:.4f}" if metrics else ""))


def resume(checkpoint, model, optimizer, path, precision_name, rank):
    """-> fp16's gradient scaler (disabled, a no-op, in bf16 and fp32: the loss is multiplied before backward so that
    small gradients do not underflow to 0 in float16). A saved phase restores the weights, the optimizer's moments and
    the scaler's scale: it continues exactly; one saved in another precision continues with a fresh scaler."""
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=precision_name == "fp16")
    if "model" in checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        fresh = " with a fresh gradient scaler" if scaler.is_enabled() else ""
        other = f" (saved in {checkpoint['precision']}, continuing in {precision_name}{fresh})"
        if rank == 0:
            print(f"resuming from {path} at step {checkpoint['step']}"
                  + (other if checkpoint["precision"] != precision_name else ""))
    return scaler


def nonfinite_error(phase, value, step, path, checkpoint):
    """The one-line error for a loss (or weights) turned inf or NaN: the checkpoint on disk is the last good one
    (the weights are checked before every save)."""
    kept = (f"the last good checkpoint {path} (step {checkpoint['step']}) is kept" if os.path.exists(path)
            else "nothing was saved")
    return ValueError(f"the {phase} loss is {value} at step {step}: training stopped; {kept}. Lower "
                      f"{'--pretrain_lr' if phase == 'pre-training' else '--lr'} or try --precision=fp32")


def train_loop(model, optimizer, batch_loss, encoded, labels, n_epochs, seed, started, deadlines, checkpoint, path,
               system, val=None):
    """Both phases' loop (pre-training: labels None; fine-tuning: val = the validation split), from checkpoint's step
    to n_epochs; saves checkpoint to path after each epoch or stop. -> None when done, or the deadline that stopped."""
    ddp, rank, world_size, run_device, precision_name, ctx = system
    phase = "pre-training" if val is None else "training"
    scaler = resume(checkpoint, model, optimizer, path, precision_name, rank)    # (fp16's loss scaling)
    net = DistributedDataParallel(model, device_ids=[run_device] if "cuda" in run_device else None) if ddp else model
    steps_per_epoch = math.ceil(len(encoded) / batch_size) // world_size   # each process takes every world_size-th
    step, total_steps, skipped, stop = checkpoint["step"], n_epochs * steps_per_epoch, 0, None
    while step < total_steps and not checkpoint.get("done") and not stop:
        epoch = step // steps_per_epoch
        # this process's batches of the epoch, in an order from (seed, epoch) only: a resumed run skips those it did
        batches = make_batches([len(e) for e in encoded], batch_size, random.Random(seed + epoch), bucket)
        net.train()
        tick, seen, loss_sum, loss_count = time.time(), 0, 0.0, 0
        for batch in batches[rank:steps_per_epoch * world_size:world_size][step - epoch * steps_per_epoch:]:
            torch.manual_seed(seed + step * world_size + rank)    # dropout masks from (seed, step, rank): as on resume
            step_lr = learning_rate(step, total_steps, optimizer.defaults["lr"])
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            ids, targets = collate(encoded, batch, labels)                 # forward
            with ctx:
                loss = batch_loss(net, ids, targets, step)
            loss_value = loss.item()
            # termination conditions, agreed by every process, so that all stop after the same step
            nonfinite, signalled, *late = agree([not math.isfinite(loss_value), STOP] +
                                                [time.time() > t for t in deadlines.values()], ddp, run_device)
            if nonfinite:
                raise nonfinite_error(phase, loss_value, step + 1, path, checkpoint)
            # backward (scaled), clip the true gradient, update; the scaler skips steps with inf/NaN gradients
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped, step = skipped + (scaler.get_scale() < scale), step + 1
            seen, loss_sum, loss_count = seen + len(batch), loss_sum + loss_value, loss_count + 1
            # logging
            if step % log_every == 0 and rank == 0:
                speed = seen * world_size / max(1e-9, time.time() - tick)          # examples/s of all processes
                print(f"{'pre-training ' if val is None else ''}epoch {epoch + 1} step {step}/{total_steps} loss "
                      f"{loss_sum / loss_count:.4f} lr {step_lr:.2e} {speed:.0f} examples/s, about "
                      f"{(total_steps - step) * batch_size * world_size / speed / 60:.1f} min left"
                      + (f"; {skipped} steps skipped by the gradient scaler" if skipped else ""), flush=True)
            stop = "signal" if signalled else next((reason for reason, up in zip(deadlines, late) if up), None)
            if stop:
                break
        # end of the epoch, or of this run: check the weights, evaluate a whole epoch, save the checkpoint
        record = {"epoch": epoch + 1, "step": step, "train_loss" if val else "mlm_loss": loss_sum / max(1, loss_count),
                  "minutes": (time.time() - started) / 60}
        end_epoch(model, checkpoint, record, step / steps_per_epoch, stop, val, path, system)
        checkpoint.update(step=step, done=stop == "its share of --max_minutes" or (val is None and step >= total_steps),
                          seconds=time.time() - started)
        if rank == 0:
            save_atomic({**checkpoint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "precision": precision_name}, path)
    return announce_stop(stop, phase, step, total_steps, path, ddp, rank)


def announce_stop(stop, phase, step, total_steps, path, ddp, rank):
    """Say why the loop stopped early (None: it did not). A signal ends the program here (each process with 128 +
    the signal's number), after rank 0's checkpoint. -> stop."""
    message = f"{phase} stopped by {stop} at step {step}/{total_steps}; checkpoint saved"
    if stop == "signal":
        message = (f"stopped by {signal.Signals(STOP[0]).name if STOP else 'a signal'} at step {step}: checkpoint "
                   f"saved in {path}; run the same command to resume")
    if stop and rank == 0:
        print(message, file=sys.stderr if stop == "signal" else sys.stdout, flush=True)
    if stop == "signal":
        if ddp:
            dist.barrier()
        sys.exit(128 + (STOP[0] if STOP else 0))
    return stop


def train_model(records, out_dir, mlm_records, mlm_epochs, seed, use_stems, minutes, system):
    """One model on records (a stratified val_frac validates), resuming out_dir's run; with mlm_epochs, masked-language
    pre-training on the texts of records and mlm_records first. -> the history (rank 0; [] if stopped in MLM)."""
    ddp, rank, world_size, run_device = system[:4]
    start = time.time()
    deadline = start + minutes * 60 if minutes > 0 else math.inf
    config = {name: globals()[name] for name in TRAIN_KEYS}                  # what this run is, its data included
    config.update(seed=seed, stem=use_stems, pretrain_epochs=mlm_epochs, train_data=fingerprint(records),
                  mlm_texts=fingerprint(mlm_records, False) if mlm_epochs and mlm_records else "", processes=world_size)
    checkpoint = check_resume(os.path.join(out_dir, "ckpt.pt"), config, run_device, rank)
    pretrained = None if checkpoint or not mlm_epochs else \
        check_resume(os.path.join(out_dir, "pretrain.pt"), config, run_device, rank)
    saved = checkpoint or pretrained
    started = start - (saved or {}).get("seconds", 0.0)       # the training seconds of the runs resumed count too
    vocab, (encoded, labels), val = prepare_data(records, config, saved, out_dir, rank, world_size)
    torch.manual_seed(seed)
    model = build_model(config, len(vocab)).to(run_device)
    glove_rows = load_glove(embeddings, vocab, model.embedding, use_stems) if embeddings and not saved else 0
    if rank == 0:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{ {key: config[key] for key in MODEL_KEYS} }"
              + (f"; {glove_rows} embedding rows from {embeddings}" if glove_rows else ""))
    fresh = {"step": 0, "history": [], "config": config, "vocab": vocab.itos}
    if mlm_epochs and checkpoint is None:     # phase 1: masked-language modelling (BERT 3.1) with the same encoder
        mlm = MaskedLanguageModel(model).to(run_device)
        texts = encode_records(records + list(mlm_records or []), vocab, config)
        optimizer = torch.optim.AdamW(parameter_groups(mlm.named_parameters()), lr=pretrain_lr, fused=True)
        if rank == 0 and not (pretrained or {}).get("done"):
            print(f"pre-training: masked-language model on {len(texts)} texts ({len(records)} training"
                  f"{f', {len(mlm_records)} test' if mlm_records else ''}), {mlm_epochs} epochs")
        # the masking depends only on (seed, step, rank): exact on resume
        loss = lambda net, ids, _, step: mlm_loss(net, ids, len(vocab), torch.Generator().manual_seed(
            seed * 1000003 + step * world_size + rank), run_device)
        share = {"its share of --max_minutes": start + pretrain_share * minutes * 60} if minutes > 0 else {}
        stop = train_loop(mlm, optimizer, loss, texts, None, mlm_epochs, seed + 7777, started,
                          {"--max_minutes": deadline, **share}, pretrained or dict(fresh),
                          os.path.join(out_dir, "pretrain.pt"), system)
        if stop == "--max_minutes":          # nothing to fine-tune yet
            if ddp:
                dist.barrier()
            return []

    # phase 2: the classifier learns the labels, with label smoothing (Szegedy et al. 2016, 7): the target gives 1 -
    # label_smoothing to the true class and spreads label_smoothing evenly over all classes (no overconfidence)
    from_pretrained = bool(mlm_epochs) and (checkpoint or {"pretrained": True}).get("pretrained", False)
    scale_of = (lambda name: 1.0 if name.startswith("head.") or not from_pretrained else encoder_lr_frac)
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), scale_of), lr=lr, fused=True)
    if from_pretrained and checkpoint is None and rank == 0:
        print(f"fine-tuning from the pre-trained encoder (encoder learning rate {encoder_lr_frac} x lr)")
    loss = lambda net, ids, targets, step: F.cross_entropy(net(ids.to(run_device)).float(), targets.to(run_device),
                                                           label_smoothing=label_smoothing)
    checkpoint = checkpoint or dict(fresh, history=[], best_accuracy=-1.0, pretrained=from_pretrained)
    train_loop(model, optimizer, loss, encoded, labels, epochs, seed, started, {"--max_minutes": deadline}, checkpoint,
               os.path.join(out_dir, "ckpt.pt"), system, val)
    if rank == 0 and not os.path.exists(os.path.join(out_dir, "best.pt")):    # a finished run's, deleted since
        save_atomic({"model": model.state_dict(), "config": config, "vocab": vocab.itos, "epoch": epochs,
                     "metrics": evaluate(model, *val, run_device, system[4])}, os.path.join(out_dir, "best.pt"))
    if ddp:
        dist.barrier()                         # rank 0's last saves are done before any process leaves
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
    (docs/results.md: the default command's four models score 79.5 % held-out, one model alone 77.9 %).
    --max_minutes is one budget: each model gets an equal share of what is left when it starts. Running the same
    command again skips the finished models and resumes the stopped one."""
    deadline = time.time() + max_minutes * 60
    for k in range(ensemble):
        use_stems = stem != (ensemble_alternate_stem and k % 2 == 1)
        minutes = max(1e-6, (deadline - time.time()) / 60 / (ensemble - k)) if k else max_minutes / ensemble
        minutes = minutes if max_minutes > 0 else 0.0        # (never 0, which means no limit, when the budget is spent)
        if ensemble > 1 and system[1] == 0:
            print(f"ensemble model {k + 1}/{ensemble}: seed {seed + k}, stem {use_stems}, in {member_dir(out_dir, k)}"
                  + (f", {minutes:.1f} minutes" if max_minutes > 0 else ""), flush=True)
        train_model(records, member_dir(out_dir, k), mlm_records, mlm_epochs, seed + k, use_stems, minutes, system)


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
    (its `ensemble`; 1 before ensembles). A missing one stops here, before any other work."""
    first = load_trained(out_dir, run_device)
    return [first] + [load_trained(member_dir(out_dir, k), run_device) for k in range(1, first[2].get("ensemble", 1))]


def ensemble_logits(models, records, run_device, precision_name):
    """The mean of the models' logits for records, each model with its own vocabulary and preprocessing (from its
    checkpoint)."""
    return sum(predict_logits(model, encode_records(records, vocab, config), run_device, precision_name)
               for model, vocab, config in models) / len(models)


def write_submission(out_dir, test_file, submission, system):
    """`id,label` for every record of test_file, in id order, written atomically; returns the predicted labels.
    With labels in the file, also the accuracy. The submission's folder is checked before any work."""
    check_writable(submission, is_folder=False)
    run_device, precision_name = system[3], system[4]
    models = load_ensemble(out_dir, run_device)     # every model there before the test file is read
    records = sorted(load_news(test_file, require_label=False), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{os.path.basename(test_file)}: id {next(i for i in ids if ids.count(i) > 1)} "
                         f"appears more than once")
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


# ----------------------------------------------------------------------------- main
def main(argv):
    positional = parse_overrides(argv, globals(), CHECKS)
    if positional:
        sys.exit(f"error: textcls.py takes only --name=value options, got {positional[0]!r} (--help lists them)")
    if d_model % nhead:
        sys.exit(f"error: --d_model={d_model} must be a multiple of --nhead={nhead}")
    if not (train or predict or attention or bench):
        return print(__doc__)
    torch.set_num_threads(num_threads)
    rank = int(os.environ.get("RANK", 0))
    try:
        system = setup_system()
        if train:                                  # (MLM reads test_file's texts too, unless --pretrain_test=False)
            mlm_records = load_news(test_file, require_label=False) if pretrain_epochs and pretrain_test else None
            train_ensemble(load_news(os.path.join(data_dir, "News_train.json")), out_dir, mlm_records,
                           pretrain_epochs, system)
        if predict and rank == 0:                  # under torchrun: one submission, written by rank 0
            write_submission(out_dir, test_file, submission, system)
        if attention and rank == 0:
            draw_attention(attention, out_dir)     # in the extras below
        if bench:
            run_bench(data_dir, out_dir, system)   # in the extras below
    except (ValueError, OSError) as e:            # the one error path: one line, naming the file and the record
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        sys.exit(f"error: {message}" if rank == 0 else 1)
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
    from elsewhere cannot run code on loading; a damaged file is a one-line error that says what to do."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # objects weights_only refuses; or truncated, empty, not a zip
        if "weights only" in str(e).lower().replace("_", " "):
            raise ValueError(f"{path} holds objects other than tensors, numbers and strings, so it was not written "
                             f"by textcls.py; refused to load it (weights_only=True)") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        previous = f"the previous state may be in {path}.tmp, or " if os.path.exists(path + ".tmp") else ""
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {reason}); {previous}delete it to start again") \
            from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "vocab"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of this textcls.py (no model, configuration and vocabulary "
                         f"inside; older versions kept the vocabulary apart): train into another --out_dir")
    return checkpoint


def check_resume(path, config, run_device, rank):
    """The checkpoint in path, or None if there is none. A run that cannot continue it (another configuration,
    other data) stops here, naming every differing key; the RESUMABLE keys continue with the new value."""
    if not os.path.exists(path):
        return None
    saved = load_checkpoint(path, run_device)
    was = {key: saved["config"].get(key, "(not saved)") for key in config}
    differ = [key for key in config if was[key] != config[key]]
    refused = [key for key in differ if key not in RESUMABLE]
    if refused:
        raise ValueError(f"{path} was trained with {', '.join(f'{k}={was[k]!r}' for k in refused)}; this run has "
                         f"{', '.join(f'{k}={config[k]!r}' for k in refused)}: run with the checkpoint's values to "
                         f"resume it, or train into another --out_dir")
    for key in differ if rank == 0 else []:
        print(f"note: {key} = {config[key]!r} differs from {path}'s {was[key]!r}: continuing with the new value")
    return saved


def check_writable(path, is_folder=True):
    """Make sure out_dir (created if missing) or a file's folder takes new files, before any long work."""
    folder = path if is_folder else (os.path.dirname(path) or ".")
    try:
        if is_folder:
            os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".write_test_{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".write_test_{os.getpid()}"))
        if not is_folder and os.path.isdir(path):
            raise IsADirectoryError(21, "is a folder")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None


STOP = []   # the signals received: the training loop saves a checkpoint after its current step and stops


def on_signal(signum, frame):
    if STOP:                                      # a second one stops at once
        raise KeyboardInterrupt
    STOP.append(signum)
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping", flush=True)


# --- extras (not the lesson) ---
# ----------------------------------------------------------------------------- devices and precisions
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(requested):
    """The device for --device ("" picks: a CUDA GPU, else Apple's mps, else the CPU), and why."""
    if requested:
        return requested, "asked for"
    if torch.cuda.is_available():
        return "cuda", "a CUDA GPU is available"
    if torch.backends.mps.is_available():
        return "mps", "no CUDA GPU; Apple's Metal (mps) is available"
    return "cpu", "no CUDA GPU or Apple mps"


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
    if device_type == "cuda":
        if major >= 8:
            return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
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
                         f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a PyTorch build that lists "
                         f"sm_{major}{minor} (see the README, 'On a GPU'), or choose another GPU")


def set_deterministic(on):
    """The same command gives the same numbers on the same GPU (the homework asks "fully reproducible"):
    deterministic algorithms only (an op without one stops with an error instead of varying), the cuBLAS
    workspace setting those need, and cuDNN without its run-time kernel search. A no-op cost on the CPU."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before the first cuBLAS call
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, not on


# ----------------------------------------------------------------------------- charts (PIL only)
def plot_learning_curve(history, path):
    """Two panels over the epochs: train and validation loss; validation accuracy and macro-F1 (empty without a
    validation split). Each panel's scale runs from its lowest value (bottom) to its highest (top), both written."""
    image = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(image)
    for left, names in [(60, ["train_loss", "loss"]), (510, ["accuracy", "macro_f1"])]:
        series = {name: [h[name] for h in history] for name in names if all(name in h for h in history)}
        values = [v for ys in series.values() for v in ys] or [0.0]
        low, high = min(values), max(values) + 1e-9
        draw.rectangle((left, 30, left + 370, 320), outline="black")
        draw.text((left - 55, 30), f"{high:.3f}", fill="black")
        draw.text((left - 55, 310), f"{low:.3f}", fill="black")
        for k, (name, ys) in enumerate(series.items()):
            colour = [(31, 119, 180), (255, 127, 14)][k]
            points = [(left + 370 * i / max(1, len(ys) - 1), 320 - 290 * (y - low) / (high - low)) for i, y in
                      enumerate(ys)]
            draw.line(points + points[-1:], fill=colour, width=2)
            draw.text((left + 130 * k, 12), ("" if name == "train_loss" else "val ") + name, fill=colour)
    draw.text((60, 330), f"epoch 1 .. {history[-1]['epoch']}", fill="black")
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def draw_attention(sentence, out_dir, cell=28):
    """--attention: classify one "headline | description" with the best checkpoint and draw one heat map per layer
    (averaged over heads): row = query token, column = key token, darker = more attention."""
    model, vocab, config = load_trained(out_dir, "cpu")
    headline, _, description = sentence.partition("|")   # "headline | description" gives two segments
    record = {"headline": headline, "short_description": description}
    ids = torch.tensor(encode_records([record], vocab, config))          # as --predict encodes a record
    with torch.no_grad():
        probabilities = model(ids).softmax(-1)[0]
    tokens, maps = vocab.decode(ids[0].tolist()), model.attention_maps(ids)
    n, label = len(tokens), 8 * max(len(t) for t in tokens) + 10
    image = Image.new("RGB", ((label + n * cell + 20) * len(maps), label + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    for layer, weights in enumerate(maps):
        weights = weights[0].mean(0)                    # first example, mean over heads: (query, key)
        x0, y0 = layer * (label + n * cell + 20) + label, label + 20
        draw.text((x0, 2), f"layer {layer + 1} (mean over heads)", fill="black")
        for q in range(n):
            draw.text((x0 - label + 2, y0 + q * cell + 8), tokens[q], fill="black")
            draw.text((x0 + q * cell + 2, y0 - 14 - 10 * (q % 2)), tokens[q][:4], fill="black")   # keys, staggered
            for k in range(n):
                shade = int(255 * (1 - float(weights[q, k]) / float(weights.max())))
                draw.rectangle((x0 + k * cell, y0 + q * cell, x0 + (k + 1) * cell - 1, y0 + (q + 1) * cell - 1),
                               fill=(shade, shade, 255))
    image.save(os.path.join(out_dir, "attention.png"))
    print(f"{sentence!r} -> {LABEL_NAMES[int(probabilities.argmax())]} ({float(probabilities.max()):.2f}); "
          f"attention maps in {os.path.join(out_dir, 'attention.png')}")


# ----------------------------------------------------------------------------- benchmark
def bench_speed(records, run_device, names=("fp32", "bf16"), steps=40, rounds=2):
    """Training examples/s of the configured model on this device in each precision of names, on the same batches
    in the same run. The rounds alternate them and the best round of each counts (other work on a shared machine
    slows some rounds down)."""
    config = {key: globals()[key] for key in MODEL_KEYS}
    vocab = Vocab.build((segment for r in records for segment in record_tokens(r, config)), min_freq, max_vocab)
    encoded, labels = encode_records(records, vocab, config), [r["label"] for r in records]
    batches = make_batches([len(e) for e in encoded], batch_size, random.Random(seed), bucket)[:steps + 5]
    best = {}
    for name in list(names) * rounds:
        torch.manual_seed(seed)
        model = build_model(config, len(vocab)).to(run_device).train()
        optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters()), lr=lr)
        tick, seen = time.perf_counter(), 0
        for i, batch in enumerate(batches):
            if i == 5:                      # the first steps warm up (allocations, kernel choice)
                tick, seen = time.perf_counter(), 0
            ids, targets = collate(encoded, batch, labels)
            with torch.autocast(run_device.split(":")[0], dtype=DTYPES[name], enabled=name != "fp32"):
                loss = F.cross_entropy(model(ids.to(run_device)).float(), targets.to(run_device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(batch)
        best[name] = max(best.get(name, 0.0), seen / (time.perf_counter() - tick))
    return best


def run_bench(data_dir, out_dir, system):
    """On one stratified held-out split: the training speed in each precision, then this Transformer with the
    constants above without and with masked-language pre-training (the held-out texts, never their labels, play the
    test texts that MLM may read). max_minutes applies to each run."""
    run_device, precision_name = system[3], system[4]
    check_writable(out_dir)
    records = load_news(os.path.join(data_dir, "News_train.json"))
    kept, held_out = stratified_split([r["label"] for r in records], holdout_frac, seed + 1)
    train_records, test_records = [records[i] for i in kept], [records[i] for i in held_out]
    fit_idx, _ = stratified_split([r["label"] for r in train_records], val_frac, seed)  # what train_model uses
    names = ["fp32", "bf16"]
    if run_device.startswith("cuda") and torch.cuda.get_device_capability()[0] < 8:
        names = ["fp32"]
        print("note: no bf16 speed on this GPU (CUDA capability below 8.0 has no native bfloat16)")
    speeds = bench_speed([train_records[i] for i in fit_idx], run_device, names)
    print(f"training speed on {run_device}, batch {batch_size}: "
          + ", ".join(f"{name} {speed:.0f} examples/s" for name, speed in speeds.items())
          + f"; the runs below use {precision_name}", flush=True)
    print(f"held-out split: {len(test_records)} records ({holdout_frac:.0%} stratified, seed {seed + 1}); "
          f"training records: {len(fit_idx)}")
    mlm_epochs = pretrain_epochs or bench_pretrain_epochs
    for name, folder, phase_epochs in [("Transformer, no MLM", "bench_no_mlm", 0),
                                       (f"Transformer, MLM {mlm_epochs} ep", "bench_mlm", mlm_epochs)]:
        folder = os.path.join(out_dir, folder)
        train_ensemble(train_records, folder, test_records if phase_epochs and pretrain_test else None, phase_epochs,
                       system)
        models = load_ensemble(folder, run_device)
        predictions = ensemble_logits(models, test_records, run_device, precision_name).argmax(1).tolist()
        metrics = classification_metrics(predictions, [r["label"] for r in test_records])
        seconds = sum(load_checkpoint(os.path.join(member_dir(folder, k), "ckpt.pt"))["seconds"]
                      for k in range(len(models)))
        print(f"{name}: held-out accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}, "
              f"{seconds / 60:.1f} training minutes", flush=True)


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGTERM):     # Ctrl-C, or what Colab and Kaggle send when a runtime ends
        signal.signal(s, on_signal)
    main(sys.argv[1:])
