"""
News classification into 15 categories with a Transformer encoder built from PyTorch's own blocks
(homework part 2-1): tokenizer.py's preprocessing, `<cls> headline <sep> description`, nn.TransformerEncoder,
a hand-written training loop, and the competition's submission.csv.

    python textcls.py --train --data_dir=data/news --out_dir=out/textcls --max_minutes=20
    python textcls.py --predict --out_dir=out/textcls --test_file=data/news/News_test.json --submission=submission.csv
    python textcls.py --attention="Stocks fall as Fed raises rates" --out_dir=out/textcls   # attention-map PNG
    python textcls.py --bench --data_dir=data/news        # beside fastText and TF-IDF + LR on one held-out split
    torchrun --nproc_per_node=2 textcls.py --train ...    # several processes (DDP), as nanoGPT does it

Training writes into out_dir: vocab.json, ckpt.pt (the latest state, to resume), best.pt (best validation
accuracy), history.json and learning_curve.png. Run the same --train command again to resume.
"""
import json
import math
import os
import random
import sys
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
bench = False           # the benchmark: this model beside fastText and TF-IDF + LR on one held-out split
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
nhead = 4               # attention heads
d_hid = 256             # feed-forward size inside each layer
nlayers = 2             # encoder layers
dropout = 0.1
pos_encoding = "sinusoidal"  # "sinusoidal" (Vaswani et al. 2017, section 3.5) or "learned"
pooling = "mean"        # "mean" (masked mean over tokens) or "cls" (the <cls> position)
embeddings = ""         # GloVe-format text file (word v1 ... vd, d = d_model) to initialise matching rows
# training
epochs = 3
batch_size = 64
lr = 1e-3               # peak learning rate, after warmup
min_lr_frac = 0.05      # cosine decay ends at lr * min_lr_frac
warmup_steps = 300
weight_decay = 0.01     # AdamW, on weight matrices only (not biases, norms or embeddings)
grad_clip = 1.0
label_smoothing = 0.1
val_frac = 0.05         # stratified validation split of the training file
bucket = True           # batches of similar length (less padding, faster); False = fully random batches
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this many minutes of training; 0 = no limit
seed = 1337
device = ""             # "" = cuda if available, else cpu
amp = True              # bfloat16 autocast on CUDA
num_threads = 2         # CPU threads per process
log_every = 200         # steps between progress lines
# benchmark
holdout_frac = 0.1      # --bench: stratified held-out split that no model trains on
# -----------------------------------------------------------------------------

NUM_CLASSES = 15
LABEL_NAMES = ["POLITICS", "WELLNESS", "ENTERTAINMENT", "TRAVEL", "STYLE & BEAUTY", "PARENTING",
               "HEALTHY LIVING", "QUEER VOICES", "FOOD & DRINK", "BUSINESS", "COMEDY", "SPORTS",
               "BLACK VOICES", "HOME & LIVING", "PARENTS"]


# ----------------------------------------------------------------------------- data
class NewsFormatError(ValueError):
    """Bad input; the message names the file and the record."""


def load_news(path, require_label=True):
    """A News_*.json file as a list of dicts {id, headline, short_description[, label]}. Accepts a JSON array
    or JSON lines (one object a line); anything malformed is a NewsFormatError naming file and record."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
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


def record_tokens(record):
    """The two segments of one record as token lists (tokenizer.py's pipeline)."""
    return (preprocess(record["headline"], remove_stop, stem),
            preprocess(record["short_description"], remove_stop, stem))


def encode_pairs(token_pairs, vocab):
    """(headline tokens, description tokens) pairs -> `<cls> a <sep> b` ids, cut to max_len longest-first."""
    return [vocab.encode(a, max_len=max_len, tokens_b=b) for a, b in token_pairs]


def encode_records(records, vocab):
    return encode_pairs(map(record_tokens, records), vocab)


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
        padding = ids == Vocab.pad_id              # True where attention must not look
        # embeddings scaled by sqrt(d_model) so the positional signal does not swamp them (section 3.4)
        x = self.dropout(self.positional(self.embedding(ids) * math.sqrt(self.d_model)))
        x = self.encoder(x, src_key_padding_mask=padding)
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


def build_model(config, vocab_size):
    return TransformerClassifier(vocab_size, config["d_model"], config["nhead"], config["d_hid"],
                                 config["nlayers"], config["dropout"], config["max_len"],
                                 config["pos_encoding"], config["pooling"])


def load_glove(path, vocab, embedding):
    """Initialise the embedding rows of tokens found in a GloVe text file. Vocabulary tokens are Porter stems
    when stem=True, so a GloVe word also matches through its stem; GloVe lists frequent words first, so the
    most frequent word of each stem wins. Returns the number of rows set."""
    matched = set()
    with open(path, encoding="utf-8") as f, torch.no_grad():
        for line_number, line in enumerate(f, 1):
            word, *values = line.rstrip().split(" ")
            if len(values) != embedding.embedding_dim:
                raise NewsFormatError(f"{os.path.basename(path)}: line {line_number}: {len(values)} numbers, "
                                      f"but d_model is {embedding.embedding_dim}")
            for token in {word, porter_stem(word) if stem and word.isalpha() else word}:
                index = vocab.stoi.get(token)
                if index is not None and index >= len(Vocab.SPECIALS) and index not in matched:
                    embedding.weight[index] = torch.tensor([float(v) for v in values])
                    matched.add(index)
    return len(matched)


# ----------------------------------------------------------------------------- evaluation
def default_device():
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def autocast(run_device):
    """bfloat16 mixed precision on CUDA (amp); a no-op context on the CPU."""
    use = amp and run_device.startswith("cuda")
    return torch.autocast("cuda" if use else "cpu", dtype=torch.bfloat16, enabled=use)


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
def predict_logits(model, encoded, run_device, batch=256):
    """Logits for every example, in order (batches of similar length for speed, then put back in order)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits = torch.empty(len(encoded), NUM_CLASSES)
    for s in range(0, len(order), batch):
        indices = order[s:s + batch]
        ids, _ = collate(encoded, indices)
        with autocast(run_device):
            logits[indices] = model(ids.to(run_device)).float().cpu()
    return logits


def evaluate(model, encoded, labels, run_device):
    logits = predict_logits(model, encoded, run_device)
    metrics = classification_metrics(logits.argmax(1).tolist(), labels)
    metrics["loss"] = F.cross_entropy(logits, torch.tensor(labels)).item()
    return metrics


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps):
    """Linear warmup to lr, then cosine decay to lr * min_lr_frac at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_config():
    names = ["remove_stop", "stem", "max_len", "d_model", "nhead", "d_hid", "nlayers", "dropout",
             "pos_encoding", "pooling"]
    return {name: globals()[name] for name in names}


def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def train_model(records, out_dir):
    """Train on records (a stratified val_frac of them validates), resuming from out_dir/ckpt.pt if present.
    Returns the history: one dict per finished epoch."""
    # DDP when launched by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), as in nanoGPT's train.py
    ddp = int(os.environ.get("RANK", -1)) != -1
    run_device = default_device()
    rank, world_size = 0, 1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if run_device.startswith("cuda"):
            run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(run_device)
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    os.makedirs(out_dir, exist_ok=True)

    # data: validation split, vocabulary from the training part only
    start = time.time()
    labels = [r["label"] for r in records]
    train_idx, val_idx = stratified_split(labels, val_frac, seed)
    tokens = [record_tokens(r) for r in records]
    vocab = Vocab.build((t for i in train_idx for t in tokens[i]), min_freq=min_freq, max_size=max_vocab)
    train_encoded = encode_pairs([tokens[i] for i in train_idx], vocab)
    val_encoded = encode_pairs([tokens[i] for i in val_idx], vocab)
    train_labels, val_labels = [labels[i] for i in train_idx], [labels[i] for i in val_idx]
    if master:
        vocab.save(os.path.join(out_dir, "vocab.json"))
    log(f"data: {len(train_idx)} train, {len(val_idx)} validation, vocabulary {len(vocab)} "
        f"({time.time() - start:.1f} s)")

    torch.manual_seed(seed)
    config = model_config()
    model = build_model(config, len(vocab)).to(run_device)
    if embeddings:
        log(f"embeddings: {load_glove(embeddings, vocab, model.embedding)} rows initialised from {embeddings}")
    decays = lambda name, p: p.dim() >= 2 and "embedding" not in name and ".pe." not in name
    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {config}")

    steps_per_epoch = math.ceil(len(train_idx) / batch_size) // world_size
    total_steps = epochs * steps_per_epoch
    step, history, best_accuracy = 0, [], -1.0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        checkpoint = torch.load(ckpt_path, map_location=run_device, weights_only=False)
        if checkpoint["config"] != config or checkpoint["vocab_size"] != len(vocab):
            raise SystemExit(f"{ckpt_path} was trained with another configuration; use another --out_dir")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history, best_accuracy = checkpoint["step"], checkpoint["history"], checkpoint["best_accuracy"]
        log(f"resuming from {ckpt_path} at step {step} (epoch {step // steps_per_epoch + 1})")
    raw_model = model
    if ddp:
        model = DistributedDataParallel(model, device_ids=[run_device] if run_device.startswith("cuda") else None)

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history, "best_accuracy": best_accuracy, "config": config, "vocab_size": len(vocab)}

    def save_best(metrics, epoch):
        save_atomic({"model": raw_model.state_dict(), "config": config, "vocab_size": len(vocab),
                     "epoch": epoch, "metrics": metrics}, os.path.join(out_dir, "best.pt"))

    lengths = [len(e) for e in train_encoded]
    deadline = start + max_minutes * 60 if max_minutes > 0 else float("inf")
    stopped_early = False
    while step < total_steps and not stopped_early:
        epoch = step // steps_per_epoch
        # the batch order of an epoch depends only on (seed, epoch): a resumed run skips what it already did
        batches = make_batches(lengths, batch_size, random.Random(seed + epoch), bucket)
        batches = batches[rank:steps_per_epoch * world_size:world_size]
        model.train()
        tick, seen, loss_sum, loss_count = time.time(), 0, 0.0, 0
        for batch in batches[step - epoch * steps_per_epoch:]:
            torch.manual_seed(seed + step * world_size + rank)   # dropout masks repeat on resume
            ids, targets = collate(train_encoded, batch, train_labels)
            ids, targets = ids.to(run_device), targets.to(run_device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps)
            with autocast(run_device):
                loss = F.cross_entropy(model(ids).float(), targets, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            seen += len(batch) * world_size
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            if step % log_every == 0 and master:
                elapsed = time.time() - tick
                rate = seen / elapsed
                left = (total_steps - step) * batch_size * world_size / rate
                print(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss_sum / loss_count:.4f} "
                      f"lr {learning_rate(step, total_steps):.2e} {rate:.0f} examples/s, "
                      f"about {left / 60:.1f} min left")
            if time.time() > deadline:
                stopped_early = True
                break
        if step % steps_per_epoch == 0 or step == total_steps:   # a whole epoch done: evaluate, keep the best
            if master:
                metrics = evaluate(raw_model, val_encoded, val_labels, run_device)
                metrics.update(epoch=epoch + 1, step=step, train_loss=loss_sum / max(1, loss_count),
                               minutes=(time.time() - start) / 60)
                history.append(metrics)
                log(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.4f} val loss {metrics['loss']:.4f} "
                    f"val accuracy {metrics['accuracy']:.4f} val macro-F1 {metrics['macro_f1']:.4f}")
                if metrics["accuracy"] > best_accuracy:
                    best_accuracy = metrics["accuracy"]
                    save_best(metrics, epoch + 1)
                with open(os.path.join(out_dir, "history.json"), "w") as f:
                    json.dump(history, f, indent=1)
                plot_learning_curve(history, os.path.join(out_dir, "learning_curve.png"))
        if master:
            save_atomic(checkpoint_state(), ckpt_path)
    if stopped_early:
        log(f"stopped after {max_minutes} minutes at step {step}/{total_steps}; checkpoint saved, "
            f"run the same command to resume")
    if not os.path.exists(os.path.join(out_dir, "best.pt")) and master:   # stopped before the first epoch ended
        save_best(evaluate(raw_model, val_encoded, val_labels, run_device), 0)
    if ddp:
        dist.destroy_process_group()
    return history


# ----------------------------------------------------------------------------- prediction
def load_trained(out_dir, run_device):
    """The best checkpoint with its vocabulary; its preprocessing settings become this run's."""
    path = os.path.join(out_dir, "best.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train first (python textcls.py --train --out_dir={out_dir})")
    checkpoint = torch.load(path, map_location=run_device, weights_only=False)
    globals().update(remove_stop=checkpoint["config"]["remove_stop"], stem=checkpoint["config"]["stem"],
                     max_len=checkpoint["config"]["max_len"])
    vocab = Vocab.load(os.path.join(out_dir, "vocab.json"))
    model = build_model(checkpoint["config"], len(vocab)).to(run_device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), vocab


def write_submission(out_dir, test_file, submission):
    """`id,label` for every record of test_file, in id order. With labels in the file, also the accuracy."""
    run_device = default_device()
    model, vocab = load_trained(out_dir, run_device)
    records = sorted(load_news(test_file, require_label=False), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise NewsFormatError(f"{os.path.basename(test_file)}: id {next(i for i in ids if ids.count(i) > 1)} "
                              f"appears more than once")
    predictions = predict_logits(model, encode_records(records, vocab), run_device).argmax(1).tolist()
    with open(submission, "w") as f:
        f.write("id,label\n")
        f.writelines(f"{i},{p}\n" for i, p in zip(ids, predictions))
    print(f"wrote {len(records)} predictions to {submission}")
    if all("label" in r for r in records):
        metrics = classification_metrics(predictions, [r["label"] for r in records])
        print(f"accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f}")


# ----------------------------------------------------------------------------- figures (PIL only)
def plot_learning_curve(history, path):
    """Two panels: train and validation loss per epoch; validation accuracy and macro-F1 per epoch."""
    epochs_done = [h["epoch"] for h in history]
    image = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(image)
    draw_chart(draw, (60, 30, 430, 320), epochs_done, {"train loss": [h["train_loss"] for h in history],
                                                       "val loss": [h["loss"] for h in history]}, "loss")
    draw_chart(draw, (510, 30, 880, 320), epochs_done, {"val accuracy": [h["accuracy"] for h in history],
                                                        "val macro-F1": [h["macro_f1"] for h in history]}, "score")
    image.save(path)


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
    model, vocab = load_trained(out_dir, "cpu")
    headline, _, description = sentence.partition("|")   # "headline | description" gives two segments
    ids = vocab.encode(preprocess(headline, remove_stop, stem), max_len=max_len,
                       tokens_b=preprocess(description, remove_stop, stem) if description else None)
    ids = torch.tensor([ids])
    with torch.no_grad():
        probabilities = model(ids).softmax(-1)[0]
    path = os.path.join(out_dir, "attention.png")
    plot_attention(vocab.decode(ids[0].tolist()), model.attention_maps(ids), path)
    print(f"{sentence!r} -> {LABEL_NAMES[int(probabilities.argmax())]} ({float(probabilities.max()):.2f}); "
          f"attention maps in {path}")


# ----------------------------------------------------------------------------- benchmark
def run_bench(data_dir, out_dir):
    """On one stratified held-out split: fastText (supervised, word bigrams, 10 epochs), TF-IDF word 1-2-grams
    + logistic regression, and this Transformer trained with the constants above (max_minutes applies).
    The baselines see the same training records as the Transformer (its validation part excluded).
    fastText and scikit-learn are needed here only: pip install fasttext-wheel scikit-learn."""
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
    results = {}

    start = time.time()   # first, so that its --max_minutes budget is not shared with anything else
    train_model(train_records, out_dir)
    model, vocab = load_trained(out_dir, default_device())
    logits = predict_logits(model, encode_records(test_records, vocab), default_device())
    results["Transformer (this file)"] = (classification_metrics(logits.argmax(1).tolist(), test_labels),
                                          time.time() - start)
    print(f"Transformer: held-out accuracy {results['Transformer (this file)'][0]['accuracy']:.4f}", flush=True)

    start = time.time()
    with open(os.path.join(out_dir, "fasttext_train.txt"), "w") as f:
        f.writelines(f"__label__{r['label']} {text(r)}\n" for r in fit_records)
    ft = fasttext.train_supervised(os.path.join(out_dir, "fasttext_train.txt"), wordNgrams=2, epoch=10,
                                   thread=num_threads, seed=seed, verbose=0)
    predictions = [int(labels[0].removeprefix("__label__")) for labels in ft.predict([text(r) for r in test_records])[0]]
    results["fastText (bigrams, 10 epochs)"] = (classification_metrics(predictions, test_labels), time.time() - start)

    start = time.time()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, token_pattern=r"\S+")
    features = vectorizer.fit_transform([text(r) for r in fit_records])
    classifier = LogisticRegression(C=10, max_iter=1000).fit(features, [r["label"] for r in fit_records])
    predictions = classifier.predict(vectorizer.transform([text(r) for r in test_records])).tolist()
    results["TF-IDF 1-2-grams + LR"] = (classification_metrics(predictions, test_labels), time.time() - start)

    print(f"held-out split: {len(test_records)} records ({holdout_frac:.0%} stratified, seed {seed + 1}); "
          f"training records: {len(fit_records)}")
    for name, (metrics, seconds) in results.items():
        print(f"{name:32s} accuracy {metrics['accuracy']:.4f} macro-F1 {metrics['macro_f1']:.4f} "
              f"({seconds / 60:.1f} min)")


if __name__ == "__main__":
    parse_overrides(sys.argv[1:], globals())
    torch.set_num_threads(num_threads)
    try:
        if train:
            train_model(load_news(os.path.join(data_dir, "News_train.json")), out_dir)
        if predict:
            write_submission(out_dir, test_file, submission)
        if attention:
            draw_attention(attention, out_dir)
        if bench:
            os.makedirs(out_dir, exist_ok=True)
            run_bench(data_dir, out_dir)
        if not (train or predict or attention or bench):
            print(__doc__)
    except (NewsFormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
