"""textcls.py: data loading and its errors, padding invariance, positional encoding, overfitting, exact resume,
submission format, and (with DL_DATA) the real files. The 2-process DDP run, precision, faults and options are
in test_textcls_robust.py, masked-language pre-training in test_textcls_mlm.py."""
import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import textcls
from conftest import ROOT, real_data_path
from tokenizer import Vocab

KEYWORDS = ["senate", "yoga", "movie", "beach", "dress", "toddler", "diet", "pride", "recipe", "stocks",
            "joke", "football", "culture", "garden", "mom"]
FILLER = ["today", "new", "people", "week", "story", "world", "life", "city", "report", "year", "change"]


def make_records(n, seed=0, labelled=True):
    """Records whose class is given away by one keyword among filler words: learnable by a tiny model."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = i % 15
        words = rng.sample(FILLER, 3) + [KEYWORDS[label]]
        rng.shuffle(words)
        record = {"id": i, "headline": " ".join(words[:2] + [KEYWORDS[label]]).title(),
                  "short_description": " ".join(words[2:]) if i % 4 else ""}
        if labelled:
            record["label"] = label
        records.append(record)
    return records


def write_json(path, records, lines=False):
    with open(path, "w") as f:
        if lines:        # JSON lines: one record a line
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


TINY = dict(d_model=16, nhead=2, d_hid=32, nlayers=1, dropout=0.1, batch_size=16, epochs=2, warmup_steps=5,
            lr=3e-3, min_freq=1, log_every=1000, max_minutes=0.0, seed=0, device="cpu", val_frac=0.1, precision="fp32",
            ensemble=1, ensemble_alternate_stem=True)


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny models run fastest on one thread; two spin against each other when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(monkeypatch):
    for name, value in TINY.items():
        monkeypatch.setattr(textcls, name, value)


def train(records, out_dir, mlm_records=None):
    """train_model with the module's constants, as main() passes them for one model."""
    return textcls.train_model(records, str(out_dir), mlm_records, textcls.pretrain_epochs, textcls.seed,
                               textcls.stem, textcls.max_minutes, textcls.setup_system())


def train_ensemble(records, out_dir, mlm_records=None):
    return textcls.train_ensemble(records, str(out_dir), mlm_records, textcls.pretrain_epochs,
                                  textcls.setup_system())


def submit(out_dir, test_file, submission):
    return textcls.write_submission(str(out_dir), test_file, submission, textcls.setup_system())


def tiny_model(pooling="mean", pos_encoding="sinusoidal", vocab_size=50):
    torch.manual_seed(0)
    return textcls.TransformerClassifier(vocab_size, 16, 2, 32, 2, 0.0, 64, pos_encoding, pooling).eval()


# ----------------------------------------------------------------------------- loading
def test_loads_a_json_array_and_json_lines_alike(tmp_path):
    """shared/data/README.md: the competition may ship either, and loaders must accept both."""
    records = make_records(30)
    assert textcls.load_news(write_json(tmp_path / "a.json", records)) == records
    assert textcls.load_news(write_json(tmp_path / "b.json", records, lines=True)) == records
    records[3]["headline"] = "Line\u2028separator and\x85next line inside a text"     # as News_train.json holds
    (tmp_path / "c.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                     encoding="utf-8")                                 # raw, not escaped
    assert textcls.load_news(str(tmp_path / "c.json")) == records


@pytest.mark.slow
def test_the_real_training_file_as_json_lines_loads_the_same_records(news_dir, tmp_path):
    """News_train.json holds 8 raw U+2028 inside its texts: written as JSON lines, it must load the same records."""
    if news_dir is None:
        pytest.skip("needs the shared news data: set DL_DATA (CI sets it to ../shared/data)")
    records = textcls.load_news(str(news_dir / "News_train.json"))
    lines = tmp_path / "News_train.json"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert "\u2028" in lines.read_text(encoding="utf-8") and textcls.load_news(str(lines)) == records


@pytest.mark.parametrize("content, message", [
    ('[{"id": 0, "headline": "a", "short_description": "", "label": 1},\n {"id": 1, ', "a.json: invalid JSON at line 2"),
    ('{"id": 0, "headline": "a", "short_description": "", "label": 1}\n\n{"id": 1 "x"}\n',
     "a.json: line 3: invalid JSON at column 10: Expecting ',' delimiter (expected a JSON array of records, or one"),
    ('{"id": 0, "headline": "a", "short_description": "", "label": 1}\n{"id": 1, "headline": "b", "label": 2}',
     "a.json: line 2: missing field 'short_description'"),
    ('{"id": 0, "headline": "a", "short_description": "", "label": 1}\n[1, 2]\n',
     "a.json: line 2: expected an object"),
    ('\n  \n', "a.json: no records"),
    ('[{"id": 0, "headline": "a", "short_description": "", "label": 1}, {"id": 1, "headline": "b", "label": 2}]',
     "a.json: record 1: missing field 'short_description'"),
    ('[{"id": 0, "headline": "a", "short_description": "", "label": 15}]', "a.json: record 0: label 15 is outside 0..14"),
    ('[{"id": 0, "headline": "a", "short_description": "", "label": -1}]', "label -1 is outside 0..14"),
    ('[{"id": 0, "headline": null, "short_description": "", "label": 3}]', "record 0: field 'headline' must be str"),
    ('[{"id": "7", "headline": "a", "short_description": "", "label": 3}]', "record 0: field 'id' must be int"),
    ('[{"id": 0, "headline": "a", "short_description": "", "label": 2.0}]', "field 'label' must be int"),
    ('[{"id": 0, "headline": "a", "short_description": ""}]', "record 0: missing field 'label'"),
    ('[[1, 2]]', "record 0: expected an object, got list"),
    ('[]', "a.json: no records"),
])
def test_bad_input_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "a.json").write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        textcls.load_news(str(tmp_path / "a.json"))


def test_test_file_needs_no_label_but_a_present_label_is_checked(tmp_path):
    records = make_records(5, labelled=False)
    assert textcls.load_news(write_json(tmp_path / "t.json", records), require_label=False) == records
    records[2]["label"] = 99
    with pytest.raises(ValueError, match="record 2: label 99"):
        textcls.load_news(write_json(tmp_path / "t.json", records), require_label=False)


def test_bad_training_file_is_a_one_line_error_from_the_command_line(tmp_path):
    (tmp_path / "News_train.json").write_text('[{"id": 0, "headline": "a", "label": 1}]')
    result = subprocess.run([sys.executable, "textcls.py", "--train", f"--data_dir={tmp_path}",
                             f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: News_train.json: record 0: missing field 'short_description'"


def test_stratified_split_holds_out_every_class_in_proportion():
    labels = [0] * 100 + [1] * 20 + [2] * 10
    kept, held_out = textcls.stratified_split(labels, 0.1, seed=3)
    assert sorted(kept + held_out) == list(range(130)) and not set(kept) & set(held_out)
    assert [sum(labels[i] == c for i in held_out) for c in range(3)] == [10, 2, 1]
    assert textcls.stratified_split(labels, 0.1, seed=3) == (kept, held_out)


# ----------------------------------------------------------------------------- model
def test_sinusoidal_encoding_is_the_closed_form():
    pe = textcls.sinusoids(50, 8)
    for pos in (0, 1, 7, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_padding_changes_nothing(pooling, pos_encoding):
    model = tiny_model(pooling, pos_encoding)
    ids = torch.tensor([[2, 7, 8, 9, 3, 10], [2, 11, 12, 0, 0, 0]])
    padded = torch.cat([ids, torch.zeros(2, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits, logits_padded = model(ids), model(padded)
        alone = model(ids[1:, :3])        # the second example without any padding at all
    torch.testing.assert_close(logits, logits_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1:], alone, rtol=0, atol=1e-5)
    # and the mask is what hides the padding: without it the real positions see the <pad> rows
    with torch.no_grad():
        x = model.embed(padded)
        masked, unmasked = model.encoder(x, src_key_padding_mask=padded == 0), model.encoder(x)
    assert not torch.allclose(masked[1, :3], unmasked[1, :3], atol=1e-3)


def test_attention_maps_are_distributions_that_ignore_padding():
    model = tiny_model()
    ids = torch.tensor([[2, 7, 8, 3, 9, 0, 0]])
    maps = model.attention_maps(ids)
    assert len(maps) == 2 and maps[0].shape == (1, 2, 7, 7)
    for weights in maps:
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 7))
        assert weights[..., 5:].abs().max() == 0


def test_learning_rate_warms_up_then_decays_to_the_floor(monkeypatch):
    monkeypatch.setattr(textcls, "warmup_steps", 10)
    monkeypatch.setattr(textcls, "min_lr_frac", 0.1)
    rates = [textcls.learning_rate(s, 110, 1e-3) for s in range(111)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5)   # half-way through the cosine
    assert rates[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_metrics_match_a_hand_computed_example():
    labels = [0, 0, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0]
    metrics = textcls.classification_metrics(predictions, labels)
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 0.8; class 2: F1 0; classes 3-14 absent
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)


def test_glove_rows_match_words_and_stems(tmp_path):
    vocab = Vocab(Vocab.SPECIALS + ["run", "cat", "zebra"])
    (tmp_path / "g.txt").write_text("running 1 2 3 4\nrun 9 9 9 9\ncat 5 6 7 8\nother 0 0 0 1\n")
    embedding = torch.nn.Embedding(len(vocab), 4)
    before = embedding.weight.detach().clone()
    assert textcls.load_glove(str(tmp_path / "g.txt"), vocab, embedding, True) == 2
    assert embedding.weight[5].tolist() == [1, 2, 3, 4]       # "running" -> stem "run", listed first
    assert embedding.weight[6].tolist() == [5, 6, 7, 8]
    torch.testing.assert_close(embedding.weight[7], before[7])   # no vector for "zebra": untouched
    (tmp_path / "bad.txt").write_text("cat 1 2 3\n")
    with pytest.raises(ValueError, match="bad.txt: line 1: 3 numbers, but d_model is 4"):
        textcls.load_glove(str(tmp_path / "bad.txt"), vocab, embedding, True)
    (tmp_path / "bad.txt").write_text("cat 1 2 3 4\nzebra 1 x 3 4\n")
    with pytest.raises(ValueError, match="bad.txt: line 2: could not convert string to float: 'x'"):
        textcls.load_glove(str(tmp_path / "bad.txt"), vocab, embedding, True)


# ----------------------------------------------------------------------------- training
def test_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = textcls.TransformerClassifier(40, 32, 2, 64, 2, 0.0, 16, "sinusoidal", "cls")
    ids = torch.randint(5, 40, (15, 10))
    ids[:, 0] = Vocab.cls_id
    ids[::3, 7:] = Vocab.pad_id
    labels = torch.arange(15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert (model.eval()(ids).argmax(1) == labels).all()


def test_training_learns_writes_its_files_and_predicts(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 6)
    history = train(make_records(600), str(tmp_path))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["accuracy"] > 0.9 and history[-1]["loss"] < history[0]["loss"]
    for name in ("vocab.json", "ckpt.pt", "best.pt", "learning_curve.png"):
        assert (tmp_path / name).exists(), name
    # submission: every record of the test file, in id order, header id,label
    test_records = make_records(45, seed=9, labelled=False)
    random.Random(1).shuffle(test_records)
    test_file = write_json(tmp_path / "News_test.json", test_records)
    submit(str(tmp_path), test_file, str(tmp_path / "submission.csv"))
    with open(tmp_path / "submission.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(45))
    predicted = [int(r[1]) for r in rows[1:]]
    assert sum(p == i % 15 for i, p in enumerate(predicted)) >= 40   # keyword records: nearly all right

    textcls.draw_attention("Senate votes on the budget | a long night", str(tmp_path))
    assert (tmp_path / "attention.png").exists()


def test_ensemble_trains_each_model_with_its_own_seed_and_predicts_their_mean_logits(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "ensemble", 2)
    records = make_records(300)
    train_ensemble(records, str(tmp_path))
    assert (textcls.seed, textcls.max_minutes, textcls.stem) == (TINY["seed"], TINY["max_minutes"], True)   # restored
    first, second = (textcls.load_checkpoint(str(folder / "ckpt.pt")) for folder in (tmp_path, tmp_path / "member_2"))
    assert (first["config"]["seed"], second["config"]["seed"]) == (TINY["seed"], TINY["seed"] + 1)
    assert (first["config"]["stem"], second["config"]["stem"]) == (True, False)       # ensemble_alternate_stem
    assert "peopl" in first["vocab"] and "people" in second["vocab"]          # Porter stems, then whole words
    assert not torch.equal(first["model"]["head.weight"], second["model"]["head.weight"])
    # the submission is the argmax of the two models' mean logits, each model with its own vocabulary
    test_records = make_records(40, seed=5, labelled=False)
    predicted = submit(str(tmp_path), write_json(tmp_path / "t.json", test_records),
                                         str(tmp_path / "s.csv"))
    logits = []
    for folder in (tmp_path, tmp_path / "member_2"):
        model, vocab, config = textcls.load_trained(str(folder), "cpu")
        encoded = textcls.encode_records(test_records, vocab, config)
        logits.append(textcls.predict_logits(model, encoded, "cpu", torch.autocast("cpu", enabled=False)))
    assert predicted == ((logits[0] + logits[1]) / 2).argmax(1).tolist()
    # the same command again: both models are finished, nothing changes
    train_ensemble(records, str(tmp_path))
    assert torch.equal(textcls.load_checkpoint(str(tmp_path / "member_2" / "ckpt.pt"))["model"]["head.weight"],
                       second["model"]["head.weight"])
    # prediction takes the number of models from the checkpoint, not from the constant; a missing one is one line
    monkeypatch.setattr(textcls, "ensemble", 1)
    assert submit(str(tmp_path), str(tmp_path / "t.json"), str(tmp_path / "s.csv")) == predicted
    os.remove(tmp_path / "member_2" / "best.pt")
    with pytest.raises(ValueError, match="member_2/best.pt not found"):
        submit(str(tmp_path), str(tmp_path / "t.json"), str(tmp_path / "s.csv"))


def test_prediction_averages_the_models_a_later_larger_ensemble_added(tmp_path, tiny, monkeypatch, capsys):
    """--ensemble=1 first, then the default ensemble into the same out_dir: model 1 is finished (its best.pt still
    says ensemble 1), model 2 is trained, and --predict averages both."""
    monkeypatch.setattr(textcls, "epochs", 1)
    records = make_records(160)
    train_ensemble(records, str(tmp_path))
    monkeypatch.setattr(textcls, "ensemble", 2)
    train_ensemble(records, str(tmp_path))
    assert textcls.load_checkpoint(str(tmp_path / "best.pt"))["config"]["ensemble"] == 1
    capsys.readouterr()
    submit(str(tmp_path), write_json(tmp_path / "t.json", make_records(20, seed=5, labelled=False)),
           str(tmp_path / "s.csv"))
    assert "from the mean logits of 2 model(s)" in capsys.readouterr().out


def test_ensemble_shares_max_minutes_between_its_models(tiny, monkeypatch):
    """Each model gets an equal share of what is left of --max_minutes when it starts: a model that finishes early
    leaves its time to the next ones."""
    clock, shares = [1000.0], []
    monkeypatch.setattr(textcls.time, "time", lambda: clock[0])

    def fake_train_model(records, folder, mlm_records, mlm_epochs, seed, use_stems, minutes, system):
        shares.append((seed, round(minutes, 6), folder, use_stems))   # model 1 uses its whole share, model 2 only 4
        clock[0] += 60 * (minutes if len(shares) == 1 else 4)
    monkeypatch.setattr(textcls, "train_model", fake_train_model)
    monkeypatch.setattr(textcls, "ensemble", 3)
    monkeypatch.setattr(textcls, "max_minutes", 30.0)
    train_ensemble(make_records(30), "out")
    assert shares == [(0, 10.0, "out", True), (1, 10.0, os.path.join("out", "member_2"), False),
                      (2, 16.0, os.path.join("out", "member_3"), True)]
    assert (textcls.seed, textcls.max_minutes) == (0, 30.0)


def test_vocabulary_excludes_validation_only_words(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    records = make_records(200)
    _, val_idx = textcls.stratified_split([r["label"] for r in records], TINY["val_frac"], TINY["seed"])
    records[val_idx[0]]["headline"] += " Xylophonist"
    train_only = [i for i in range(200) if i not in val_idx][0]
    records[train_only]["headline"] += " Harpsichordist"
    train(records, str(tmp_path))
    vocab = Vocab.load(str(tmp_path / "vocab.json"))
    assert "harpsichordist" in vocab.stoi and "xylophonist" not in vocab.stoi


def test_resume_continues_exactly_from_the_saved_step(tmp_path, tiny):
    records = make_records(160)
    train(records, str(tmp_path / "straight"))
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)

    interrupted = str(tmp_path / "interrupted")
    textcls.max_minutes = 1e-9                        # the deadline passes after every step
    train(records, interrupted)
    assert torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)["step"] == 1
    train(records, interrupted)
    assert torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)["step"] == 2
    textcls.max_minutes = 0.0
    train(records, interrupted)
    resumed = torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)
    train_idx, _ = textcls.stratified_split([r["label"] for r in records], TINY["val_frac"], TINY["seed"])
    steps_per_epoch = math.ceil(len(train_idx) / 16)
    assert resumed["step"] == straight["step"] == 2 * steps_per_epoch
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [h["accuracy"] for h in resumed["history"]] == [h["accuracy"] for h in straight["history"]]
    # the history too: epoch 1's mean train loss counts the steps before the stops (the saved sum goes on)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]


def test_a_changed_weight_decay_applies_to_the_resumed_run(tmp_path, tiny, monkeypatch):
    """weight_decay is one of the values a run may change when it resumes (MAY_CHANGE); the optimizer's saved
    groups hold the old one, so the resumed run must set it again (the embedding's group stays at 0)."""
    records = make_records(160)
    monkeypatch.setattr(textcls, "epochs", 1)
    train(records, str(tmp_path))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [0.0, textcls.weight_decay]
    monkeypatch.setattr(textcls, "epochs", 2)
    monkeypatch.setattr(textcls, "weight_decay", 0.5)
    train(records, str(tmp_path))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in saved] == [0.0, 0.5]


@pytest.mark.parametrize("val_frac", [0.0, 0.1])
def test_a_signal_at_an_epochs_last_step_still_validates_it_and_saves_best_pt(tmp_path, tiny, monkeypatch, val_frac):
    """A signal that arrives during the last step of an epoch ends a whole epoch: the resumed run starts after it,
    so that epoch is validated and best.pt saved now (before, --predict found no best.pt after one epoch)."""
    records = make_records(160)
    monkeypatch.setattr(textcls, "val_frac", val_frac)
    monkeypatch.setattr(textcls, "epochs", 1)
    train_idx, _ = textcls.stratified_split([r["label"] for r in records], val_frac, TINY["seed"])
    steps_per_epoch, calls = math.ceil(len(train_idx) / TINY["batch_size"]), []

    def signal_at_the_last_step(*args):
        calls.append(1)
        return "a signal" if len(calls) == steps_per_epoch else None
    monkeypatch.setattr(textcls, "agreed_stop", signal_at_the_last_step)
    with pytest.raises(SystemExit):
        train(records, str(tmp_path))
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert checkpoint["step"] == best["metrics"]["step"] == steps_per_epoch and best["epoch"] == 1.0
    assert all(torch.equal(best["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])
    assert ("accuracy" in checkpoint["history"][0]) == (val_frac > 0)


@pytest.mark.parametrize("stopped_accuracy", [1.0, 0.0])
def test_stopped_inside_an_epoch_best_pt_takes_the_weights_reached_only_if_better(tmp_path, tiny, monkeypatch,
                                                                                stopped_accuracy):
    """--max_minutes ends the run inside epoch 2: best.pt becomes the weights reached when they validate better than
    epoch 1's best, and stays epoch 1's otherwise; ckpt.pt records the best accuracy that a resumed run compares
    against."""
    records = make_records(160)
    monkeypatch.setattr(textcls, "epochs", 1)
    train(records, str(tmp_path))
    epoch_1 = torch.load(tmp_path / "best.pt", weights_only=True)
    monkeypatch.setattr(textcls, "epochs", 2)
    monkeypatch.setattr(textcls, "max_minutes", 1e-9)          # the deadline passes after the first step
    monkeypatch.setattr(textcls, "evaluate", lambda *a: {"accuracy": stopped_accuracy, "macro_f1": 0.5, "loss": 1.0})
    train(records, str(tmp_path))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    steps_per_epoch = checkpoint["step"] - 1
    kept = epoch_1 if stopped_accuracy == 0.0 else checkpoint
    assert all(torch.equal(best["model"][name], kept["model"][name]) for name in kept["model"])
    assert not all(torch.equal(epoch_1["model"][name], checkpoint["model"][name]) for name in checkpoint["model"])
    assert checkpoint["best_accuracy"] == best["metrics"]["accuracy"] == max(stopped_accuracy,
                                                                            epoch_1["metrics"]["accuracy"])
    if stopped_accuracy == 1.0:
        assert best["epoch"] == pytest.approx((steps_per_epoch + 1) / steps_per_epoch)


def test_stopped_inside_an_epoch_without_validation_best_pt_takes_the_weights_reached(tmp_path, tiny, monkeypatch):
    """Without a validation split best.pt is always the latest model: every epoch's, and the weights reached when
    --max_minutes stops a run inside an epoch."""
    records = make_records(160)
    monkeypatch.setattr(textcls, "val_frac", 0.0)
    monkeypatch.setattr(textcls, "epochs", 1)
    train(records, str(tmp_path))
    epoch_1 = torch.load(tmp_path / "best.pt", weights_only=True)
    monkeypatch.setattr(textcls, "epochs", 2)
    monkeypatch.setattr(textcls, "max_minutes", 1e-9)          # the deadline passes after the first step
    train(records, str(tmp_path))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == epoch_1["metrics"]["step"] + 1
    assert all(torch.equal(best["model"][name], checkpoint["model"][name]) for name in checkpoint["model"])
    assert not all(torch.equal(best["model"][name], epoch_1["model"][name]) for name in epoch_1["model"])


def test_same_command_same_numbers(tmp_path, tiny):
    records = make_records(120)
    first = train(records, str(tmp_path / "a"))
    second = train(records, str(tmp_path / "b"))
    assert [(h["loss"], h["accuracy"]) for h in first] == [(h["loss"], h["accuracy"]) for h in second]


def test_resume_with_another_configuration_is_refused(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    train(make_records(60), str(tmp_path))
    monkeypatch.setattr(textcls, "d_model", 32)
    with pytest.raises(ValueError, match="was trained with d_model=16; this run has d_model=32"):
        train(make_records(60), str(tmp_path))


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_files_load_and_predict(tmp_path, tiny, monkeypatch):
    news = real_data_path("news")
    if news is None:
        pytest.skip("DL_DATA not set")
    records = textcls.load_news(os.path.join(news, "News_train.json"))
    assert len(records) == 137122 and {r["label"] for r in records} == set(range(15))
    monkeypatch.setattr(textcls, "epochs", 1)
    monkeypatch.setattr(textcls, "min_freq", 2)
    train(records[:3000], str(tmp_path))
    submit(str(tmp_path), os.path.join(news, "News_test.json"), str(tmp_path / "s.csv"))
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.reader(f))
    with open(os.path.join(news, "sample_submission.csv")) as f:
        sample = list(csv.reader(f))
    assert rows[0] == sample[0] == ["id", "label"]
    assert [r[0] for r in rows] == [r[0] for r in sample]
    assert all(0 <= int(r[1]) < 15 for r in rows[1:])
