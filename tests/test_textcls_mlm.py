"""textcls.py's masked-language pre-training (issue 14): BERT's masking rule, the tied output layer, the MLM loss
falling, fine-tuning that starts from the pre-trained encoder, and exact resume inside each phase."""
import os

import pytest
import torch
import torch.nn.functional as F

import textcls
from test_textcls import TINY, make_records, train
from test_textcls import one_thread  # noqa: F401  (a fixture)
from test_textcls_robust import tiny  # noqa: F401  (a fixture)
from tokenizer import Vocab

N_SPECIALS = len(Vocab.SPECIALS)


def test_masking_follows_berts_proportions_and_never_touches_specials():
    generator = torch.Generator().manual_seed(0)
    vocab_size = 5000
    ids = torch.randint(N_SPECIALS, vocab_size, (400, 250), generator=generator)
    ids[:, 0] = Vocab.cls_id
    ids[:, 100] = Vocab.sep_id
    ids[::3, 200:] = Vocab.pad_id
    ids[:, 50] = Vocab.unk_id
    inputs, labels = textcls.mask_tokens(ids, vocab_size, torch.Generator().manual_seed(1), 0.15)
    special = ids < N_SPECIALS
    chosen = labels != -100
    assert not (chosen & special).any()                       # specials are never chosen
    assert torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])            # the target is the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])          # what is not chosen is not changed
    n = chosen.sum().item()
    assert n / (~special).sum().item() == pytest.approx(0.15, abs=0.003)
    masked = (inputs[chosen] == Vocab.mask_id).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = ((inputs[chosen] != ids[chosen]) & (inputs[chosen] != Vocab.mask_id)).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)                # (a random draw equal to the original: 1 in 5,000)
    assert replaced == pytest.approx(0.1, abs=0.01)
    assert (inputs[chosen] >= N_SPECIALS).logical_or(inputs[chosen] == Vocab.mask_id).all()   # random: no specials
    again, _ = textcls.mask_tokens(ids, vocab_size, torch.Generator().manual_seed(1), 0.15)
    assert torch.equal(inputs, again)                          # the generator decides everything: exact resume


def tiny_classifier(vocab_size=60):
    torch.manual_seed(0)
    return textcls.TransformerClassifier(vocab_size, 16, 2, 32, 2, 0.0, 32, "sinusoidal", "mean")


def test_output_layer_is_tied_to_the_token_embedding():
    classifier = tiny_classifier()
    mlm = textcls.MaskedLanguageModel(classifier).eval()
    assert mlm.embedding.weight is classifier.embedding.weight and mlm.encoder is classifier.encoder
    n_own = sum(p.numel() for n, p in mlm.named_parameters() if n.startswith(("transform.", "bias")))
    assert sum(p.numel() for p in mlm.parameters()) == \
        sum(p.numel() for n, p in classifier.named_parameters() if not n.startswith("head.")) + n_own
    ids = torch.tensor([[2, 7, 8, 9, 3, 10, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[0, 5] = 8, 10
    logits, targets = mlm(ids, labels)
    states, _ = mlm.encode(ids)
    expected = mlm.transform(states[0, [2, 5]]) @ classifier.embedding.weight.T + mlm.bias
    torch.testing.assert_close(logits, expected)
    assert targets.tolist() == [8, 10]
    # the loss reaches the embedding rows of tokens that are not in the input, through the output layer alone
    F.cross_entropy(logits, targets).backward()
    assert classifier.embedding.weight.grad[40].abs().sum() > 0


def test_mlm_loss_falls_on_a_tiny_corpus():
    torch.manual_seed(0)
    classifier = textcls.TransformerClassifier(30, 32, 2, 64, 2, 0.0, 16, "sinusoidal", "mean")
    mlm = textcls.MaskedLanguageModel(classifier)
    # four sentences, each a fixed sequence: every masked token can be inferred from its neighbours
    corpus = torch.tensor([[2] + [5 + (k * 3 + i) % 25 for i in range(12)] + [3] for k in range(4)]).repeat(8, 1)
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        inputs, labels = textcls.mask_tokens(corpus, 30, generator, 0.15)
        logits, targets = mlm(inputs, labels)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert first > 2.5 and last < 0.5, (first, last)


@pytest.fixture
def mlm_run(tiny, monkeypatch):
    monkeypatch.setattr(textcls, "pretrain_epochs", 1)
    monkeypatch.setattr(textcls, "pretrain_lr", 3e-3)


def test_fine_tuning_starts_from_the_pretrained_encoder(tmp_path, mlm_run, monkeypatch, capsys):
    seen = {}
    forward = textcls.TransformerClassifier.forward

    def capture(self, ids):                  # the first classifier forward in training mode: fine-tuning's step 1
        if self.training and not seen:
            seen.update({k: v.detach().clone() for k, v in self.state_dict().items()})
        return forward(self, ids)
    monkeypatch.setattr(textcls.TransformerClassifier, "forward", capture)
    monkeypatch.setattr(textcls, "epochs", 1)
    records, test_texts = make_records(160), make_records(40, seed=7, labelled=False)
    train(records, str(tmp_path), test_texts)
    out = capsys.readouterr().out
    assert "pre-training epoch 1: masked-language loss" in out and "epoch 1: train loss" in out
    pretrained = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    torch.manual_seed(TINY["seed"])
    initial = textcls.build_model(pretrained["config"], len(pretrained["vocab"])).state_dict()
    assert pretrained["step"] == 13                                         # 200 texts in batches of 16
    encoder_keys = [k for k in seen if not k.startswith("head.")]
    assert encoder_keys and all(k in pretrained["model"] for k in encoder_keys)
    for key in encoder_keys:
        assert torch.equal(seen[key], pretrained["model"][key]), key
    assert len(initial) == len(seen) and initial["embedding.weight"].shape == seen["embedding.weight"].shape
    assert not torch.equal(initial["embedding.weight"], seen["embedding.weight"])   # pre-training changed it
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["pretrain_epochs"] == 1


def test_resume_inside_each_phase_is_exact(tmp_path, mlm_run, monkeypatch):
    records, test_texts = make_records(120), make_records(40, seed=7, labelled=False)
    train(records, str(tmp_path / "straight"), test_texts)
    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(textcls, "max_minutes", 1e-9)          # the deadline passes after every step
    phases = []
    for _ in range(13):                                         # 10 pre-training steps, then 3 of fine-tuning
        train(records, interrupted, test_texts)
        if os.path.exists(os.path.join(interrupted, "ckpt.pt")):
            phases.append(("fine-tuning", torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)["step"]))
        else:
            phases.append(("pre-training", torch.load(os.path.join(interrupted, "pretrain.pt"),
                                                      weights_only=True)["step"]))
    assert phases == [("pre-training", s) for s in range(1, 11)] + [("fine-tuning", s) for s in (1, 2, 3)]
    monkeypatch.setattr(textcls, "max_minutes", 0.0)
    train(records, interrupted, test_texts)
    for name in ("pretrain.pt", "ckpt.pt"):
        straight = torch.load(tmp_path / "straight" / name, weights_only=True)
        resumed = torch.load(os.path.join(interrupted, name), weights_only=True)
        assert resumed["step"] == straight["step"]
        for key, tensor in straight["model"].items():
            assert torch.equal(tensor, resumed["model"][key]), (name, key)
        assert resumed["history"] == straight["history"], name    # each epoch's mean loss and scores, exactly


@pytest.mark.parametrize("run_device, waited", [("cuda", "cuda"), ("cuda:1", "cuda"), ("mps", "mps"), ("cpu", None)])
def test_bench_waits_for_the_gpu_before_reading_the_clock(monkeypatch, run_device, waited):
    """CUDA and mps run behind the Python loop: the bench's clock is read after their queued work, on the CPU at
    once. (The two GPU calls are mocked: no GPU here.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    textcls.synchronize(run_device)
    assert calls == ([waited] if waited else [])


def test_bench_speed_measures_fp32_and_bf16(tiny):
    speeds = textcls.bench_speed(make_records(400), "cpu", steps=5, rounds=1)
    assert set(speeds) == {"fp32", "bf16"} and all(v > 0 for v in speeds.values())
    # a training split of fewer batches than the warm-up: timed from the last batch (before, a stack trace)
    speeds = textcls.bench_speed(make_records(40), "cpu", ("fp32",), steps=5, rounds=1)     # 3 batches of 16
    assert list(speeds) == ["fp32"] and speeds["fp32"] > 0
