"""textcls.py under issues 11, 13 and 16: the precision policy (mocked GPUs and CPUs), fp16 + GradScaler training run
for real on the CPU, exact resume with the scaler's state, the CUDA build check, determinism, processes that stop
together, non-finite losses, checked options, checkpoints that carry their configuration and vocabulary, untrusted
and damaged files, SIGTERM/Ctrl-C, missing validation splits and unwritable outputs."""
import functools
import hashlib
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

import textcls
from conftest import ROOT
from test_textcls import TINY, make_records, one_thread, submit, train, write_json  # noqa: F401  (one_thread: a fixture)

CONFIG_NAMES = [name for name, _ in __import__("tokenizer").config_block(textcls.__file__) if name]


@pytest.fixture
def tiny(monkeypatch):
    """TINY, in fp32 (the same numbers on every CPU), and every configuration constant restored afterwards (main()
    sets them from its arguments, as on the command line)."""
    for name in CONFIG_NAMES:
        monkeypatch.setattr(textcls, name, getattr(textcls, name))
    for name, value in TINY.items():
        monkeypatch.setattr(textcls, name, value)
    monkeypatch.setattr(textcls, "precision", "fp32")


def run_cli(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-u", "textcls.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()] + ["--num_threads=1"]


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(folder).iterdir())}


def weights(path):
    return torch.load(path, weights_only=True)["model"]


# ----------------------------------------------------------------------------- issue 11: precision policy
@pytest.mark.parametrize("capability, expected", [((6, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_policy_on_gpus(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    name, why = textcls.choose_precision("auto", "cuda")
    assert name == expected
    assert f"CUDA capability {capability[0]}.{capability[1]}" in why
    assert ("gradient scaler" in why) == (expected == "fp16")
    assert textcls.choose_precision("fp32", "cuda") == ("fp32", "asked for")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_policy_on_cpus(monkeypatch, native, expected):
    monkeypatch.setattr(textcls, "cpu_has_bf16", lambda: native)
    assert textcls.choose_precision("auto", "cpu")[0] == expected
    assert textcls.choose_precision("fp16", "cpu") == ("fp16", "asked for")


def test_cpu_bf16_detection_reads_the_cpu_flags():
    flags = set(open("/proc/cpuinfo").read().split())
    assert textcls.cpu_has_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.mark.parametrize("capability, archs, runs", [
    ((6, 0), ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"], False),   # Kaggle's P100 today
    ((6, 0), ["sm_50", "sm_60", "sm_70"], True),
    ((7, 5), ["sm_70", "sm_75", "sm_80"], True),                                     # T4
    ((8, 6), ["sm_80", "sm_90"], True),                                              # sm_80 cubin runs on 8.6
    ((9, 0), ["sm_80", "compute_80"], True),                                         # PTX is compiled for newer
    ((12, 0), ["sm_80", "sm_90"], False),
    ((7, 0), ["sm_75", "sm_80"], False),                                             # a cubin runs only upward
])
def test_cuda_build_check_with_mocked_arch_list(monkeypatch, capability, archs, runs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mocked GPU")
    if runs:
        textcls.check_cuda_build()
    else:
        with pytest.raises(ValueError) as stop:
            textcls.check_cuda_build()
        message = str(stop.value)
        assert message.startswith("this PyTorch ") and "\n" not in message
        assert f"sm_{capability[0]}{capability[1]}" in message and "Mocked GPU" in message


def test_setup_makes_torch_cublas_and_cudnn_deterministic(tiny, monkeypatch, capsys):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    textcls.setup_system()
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert "deterministic algorithms on" in capsys.readouterr().out


def test_fp16_with_grad_scaler_trains_for_real_on_the_cpu(tmp_path, tiny, monkeypatch, capsys):
    """fp16 autocast + GradScaler("cpu"): a start scale of 2^20 makes the first scaled gradients overflow fp16, the
    scaler skips those steps (inf gradients) and lowers its scale, and training goes on and learns."""
    monkeypatch.setattr(textcls, "precision", "fp16")
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    monkeypatch.setattr(textcls, "epochs", 4)
    monkeypatch.setattr(textcls, "log_every", 5)
    history = train(make_records(300), str(tmp_path))
    out = capsys.readouterr().out
    assert "precision: fp16 (asked for)" in out
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] < 2.0 ** 20              # it backed off: steps were skipped
    assert all(t.isfinite().all() for t in checkpoint["model"].values())
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert history[-1]["accuracy"] >= 0.3                          # chance is 1/15


def test_fp16_resume_with_scaler_state_is_bit_identical(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "precision", "fp16")
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 20))
    records = make_records(160)
    train(records, str(tmp_path / "straight"))
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    interrupted = str(tmp_path / "interrupted")
    monkeypatch.setattr(textcls, "max_minutes", 1e-9)          # the deadline passes after every step
    scales = []
    for expected_step in (1, 2, 3):
        train(records, interrupted)
        checkpoint = torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)
        assert checkpoint["step"] == expected_step
        scales.append(checkpoint["scaler"]["scale"])
    assert scales[0] > scales[-1]                              # the resumed runs carried on the scaler's back-off
    monkeypatch.setattr(textcls, "max_minutes", 0.0)
    train(records, interrupted)
    resumed = torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)
    assert resumed["step"] == straight["step"]
    assert resumed["scaler"] == straight["scaler"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_auto_precision_is_named_with_its_reason_at_the_start(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(textcls, "precision", "auto")
    monkeypatch.setattr(textcls, "epochs", 1)
    monkeypatch.setattr(textcls, "cpu_has_bf16", lambda: False)
    train(make_records(60), str(tmp_path / "a"))
    assert "precision: fp32 (no native bfloat16 on this cpu)" in capsys.readouterr().out
    monkeypatch.setattr(textcls, "cpu_has_bf16", lambda: True)
    train(make_records(60), str(tmp_path / "b"))
    assert "precision: bf16 (this CPU computes bfloat16 natively" in capsys.readouterr().out


def test_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """--lr=1e6 through the command line, resuming a good run: the loss turns non-finite, training stops with one
    line, and ckpt.pt and best.pt stay the good run's files (finite weights, same bytes)."""
    write_json(tmp_path / "News_train.json", make_records(160))
    common = ["--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS]
    good = run_cli(*common, "--epochs=1")
    assert good.returncode == 0, good.stderr[-2000:]
    before = file_hashes(tmp_path / "out")
    bad = run_cli(*common, "--epochs=3", "--lr=1e6")
    assert bad.returncode == 1, bad.stderr[-2000:]
    last_line = bad.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the training loss or weights turned inf or NaN") and "training stopped" in last_line
    assert f"{tmp_path / 'out' / 'ckpt.pt'} keeps step 10." in last_line and "Lower --lr" in last_line
    assert file_hashes(tmp_path / "out") == before
    assert all(t.isfinite().all() for t in weights(tmp_path / "out" / "ckpt.pt").values())


def test_two_processes_stop_together_and_resume(tmp_path):
    """2 gloo processes with a tiny --max_minutes: the stop decision is all-reduced, so both stop after the same
    step, rank 0 saves, and both exit 0. The same command then resumes and finishes."""
    write_json(tmp_path / "News_train.json", make_records(200))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               "textcls.py", "--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS,
               "--epochs=1", "--log_every=1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(command + ["--max_minutes=0.00001"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=environment)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "training stopped by --max_minutes at step 1/6" in stopped.stdout
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 1
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # 180 training records in batches of 16 = 12 batches, shared by 2 processes: 6 steps of 2 x 16 records
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 6
    assert finished.stdout.count("epoch 1: train loss") == 1       # only rank 0 evaluates and reports

    # the command-line contract for prediction, on a JSON-lines test file that carries labels
    test_file = write_json(tmp_path / "test.json", make_records(30, seed=4), lines=True)
    result = run_cli("--predict", f"--out_dir={tmp_path / 'out'}", f"--test_file={test_file}",
                     f"--submission={tmp_path / 'sub.csv'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 30 predictions" in result.stdout and "accuracy" in result.stdout
    rows = (tmp_path / "sub.csv").read_text().splitlines()
    assert rows[0] == "id,label" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(30))


# ----------------------------------------------------------------------------- issue 13: options and checkpoints
@pytest.mark.parametrize("args, message", [
    (["--pooling=max"], "error: --pooling must be one of 'mean', 'cls', got 'max'"),
    (["--pos_encoding=rope"], "error: --pos_encoding must be one of 'sinusoidal', 'learned', got 'rope'"),
    (["--batch_size=0"], "error: --batch_size must be an integer >= 1, got 0"),
    (["--precision=fp8"], "error: --precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"),
    (["--val_frac=1.5"], "error: --val_frac must be a number in [0, 1), got 1.5"),
    (["--mask_prob=0"], "error: --mask_prob must be a number in (0, 1), got 0.0"),
    (["--d_model=30", "--nhead=4"], "error: --nhead must be an integer >= 1 that divides --d_model, got 4"),
    (["--d_model=15", "--nhead=3"], "error: --d_model must be an even integer >= 2, got 15"),
    (["News_train.json"], "error: textcls.py takes only --name=value options, got 'News_train.json'"),
    (["--pooling"], "error: --pooling needs a value"),
    (["--bucket=False"], "error: unknown option --bucket (--help lists the options)"),   # knobs removed in #26
    (["--encoder_lr_frac=0.5"], "error: unknown option --encoder_lr_frac"),
])
def test_bad_options_stop_with_one_line_before_any_work(tiny, monkeypatch, args, message):
    monkeypatch.setattr(textcls, "load_news", lambda *a, **k: pytest.fail("work started before the checks"))
    with pytest.raises(SystemExit) as stop:
        textcls.main(["--train", "--data_dir=/nonexistent", *args])
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_prediction_uses_the_checkpoints_configuration_and_leaves_globals_alone(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    monkeypatch.setattr(textcls, "remove_stop", False)
    monkeypatch.setattr(textcls, "stem", False)
    monkeypatch.setattr(textcls, "max_len", 12)
    records = make_records(120)
    for r in records:
        r["headline"] = "The " + r["headline"]
    train(records, str(tmp_path))
    monkeypatch.setattr(textcls, "remove_stop", True)
    monkeypatch.setattr(textcls, "stem", True)
    monkeypatch.setattr(textcls, "max_len", 64)
    test_records = make_records(30, seed=5, labelled=False)
    test_records[0]["headline"] = "the " * 40 + "running senators"          # stop words, stems and length matter
    predictions = submit(str(tmp_path), write_json(tmp_path / "t.json", test_records),
                                           str(tmp_path / "s.csv"))
    assert (textcls.remove_stop, textcls.stem, textcls.max_len) == (True, True, 64)   # untouched
    model, vocab, config = textcls.load_trained(str(tmp_path), "cpu")
    assert (config["remove_stop"], config["stem"], config["max_len"]) == (False, False, 12)
    encoded = [vocab.encode(textcls.preprocess(r["headline"], False, False), max_len=12,
                            tokens_b=textcls.preprocess(r["short_description"], False, False)) for r in test_records]
    assert len(encoded[0]) == 12 and "the" in vocab.stoi
    expected = textcls.predict_logits(model, encoded, "cpu", torch.autocast("cpu", enabled=False)).argmax(1).tolist()
    assert predictions == expected


def test_resumed_run_with_another_configuration_names_the_keys(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    train(make_records(60), str(tmp_path))
    before = file_hashes(tmp_path)
    monkeypatch.setattr(textcls, "d_model", 32)
    monkeypatch.setattr(textcls, "pooling", "cls")
    with pytest.raises(ValueError) as stop:
        train(make_records(60), str(tmp_path))
    message = str(stop.value)
    assert "was trained with d_model=16, pooling='mean'; this run has d_model=32, pooling='cls'" in message
    monkeypatch.setattr(textcls, "d_model", 16)
    monkeypatch.setattr(textcls, "pooling", "mean")
    with pytest.raises(ValueError, match="train_data="):                # other training records
        train(make_records(61), str(tmp_path))
    assert file_hashes(tmp_path) == before


# ----------------------------------------------------------------------------- issue 16: faults
def test_rerun_with_another_seed_or_min_freq_leaves_the_trained_model_alone(tmp_path):
    write_json(tmp_path / "News_train.json", make_records(160))
    test_file = write_json(tmp_path / "test.json", make_records(45, seed=3))
    common = ["--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS, "--epochs=1"]
    predict = ["--predict", f"--out_dir={tmp_path / 'out'}", f"--test_file={test_file}", "--precision=fp32"]
    assert run_cli(*common).returncode == 0
    assert run_cli(*predict, f"--submission={tmp_path / 'before.csv'}").returncode == 0
    before = file_hashes(tmp_path / "out")
    for change, key in (("--seed=5", "seed="), ("--min_freq=3", "min_freq=")):
        rerun = run_cli(*common, change)
        assert rerun.returncode == 1 and key in rerun.stderr.strip().splitlines()[-1], rerun.stderr[-2000:]
        assert file_hashes(tmp_path / "out") == before, change
    assert run_cli(*predict, f"--submission={tmp_path / 'after.csv'}").returncode == 0
    assert (tmp_path / "after.csv").read_text() == (tmp_path / "before.csv").read_text()


class Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("name", ["ckpt.pt", "best.pt", "pretrain.pt"])
def test_a_crafted_pickle_never_runs(tmp_path, tiny, monkeypatch, name):
    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    torch.save({"model": Payload(marker), "config": {}, "vocab": []}, out / name)
    monkeypatch.setattr(textcls, "pretrain_epochs", 1 if name == "pretrain.pt" else 0)
    calls = {"best.pt": lambda: submit(str(out), write_json(tmp_path / "t.json", make_records(5)),
                                                         str(tmp_path / "s.csv")),
             "ckpt.pt": lambda: train(make_records(60), str(out)),
             "pretrain.pt": lambda: train(make_records(60), str(out))}
    with pytest.raises(ValueError, match=f"{name} is damaged or not a checkpoint of textcls.py .*Weights only"):
        calls[name]()
    with pytest.raises(ValueError):
        textcls.draw_attention("a headline", str(out)) if name == "best.pt" else calls[name]()
    assert not marker.exists()
    torch.load(out / name, weights_only=False)                         # the file is armed: loading it unsafely
    assert marker.exists()                                             # would have run its code


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_at_the_step_reached(tmp_path, signal_number):
    write_json(tmp_path / "News_train.json", make_records(200))
    process = subprocess.Popen([sys.executable, "-u", "textcls.py", "--train", f"--data_dir={tmp_path}",
                                f"--out_dir={tmp_path / 'out'}", *TINY_ARGS, "--epochs=500", "--log_every=1"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if " step 15/" in line:            # mid-epoch 2 (12 steps an epoch): after a save at step 12
            break
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"training stopped by {signal.Signals(signal_number).name} at step ")
    step = int(last.split(" at step ")[1].split("/")[0])
    assert step >= 15
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == step


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_predicting_stops_at_once(tmp_path, tiny, signal_number):
    """Only training saves and stops after its step. Predicting has nothing to save: SIGTERM ends the process
    (before, its handler printed that it would save a checkpoint, and predicting went on), Ctrl-C is one line. The
    test file is a pipe, so the signal comes while --predict is surely reading it."""
    train(make_records(60), tmp_path / "out")
    fifo = tmp_path / "News_test.json"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "-u", "textcls.py", "--predict", f"--out_dir={tmp_path / 'out'}",
                                f"--test_file={fifo}", f"--submission={tmp_path / 's.csv'}", *TINY_ARGS],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:                 # a writer's non-blocking open succeeds once the reader has the pipe open
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert process.poll() is None, process.communicate()
    process.send_signal(signal_number)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    os.close(writer)            # the old handler went on reading: it now meets an empty file and stops
    _, stderr = process.communicate(timeout=60)
    if signal_number == signal.SIGTERM:
        assert process.returncode == -signal.SIGTERM, stderr[-2000:]
    else:
        assert process.returncode == 1 and stderr.strip().splitlines()[-1] == "stopped by Ctrl-C", stderr[-2000:]
    assert "saving a checkpoint" not in stderr and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_one_line_that_says_what_to_do(tmp_path, tiny, monkeypatch, damage):
    monkeypatch.setattr(textcls, "epochs", 1)
    train(make_records(60), str(tmp_path))
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as stop:
        train(make_records(60), str(tmp_path))
    message = str(stop.value)
    assert message.startswith(f"{tmp_path / 'ckpt.pt'} is damaged") and "\n" not in message
    assert message.endswith("delete it to start again")
    (tmp_path / "ckpt.pt.tmp").write_bytes(data)                  # a save that was cut before its rename
    with pytest.raises(ValueError, match=r"the previous state may be in .*ckpt\.pt\.tmp"):
        train(make_records(60), str(tmp_path))
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"best\.pt is damaged"):
        textcls.load_trained(str(tmp_path), "cpu")


def test_invalid_utf8_is_one_line_naming_file_line_and_byte(tmp_path, tiny):
    good = b'[{"id": 0, "headline": "a", "short_description": "", "label": 1},\n{"id": 1, "headline": "caf'
    (tmp_path / "News_train.json").write_bytes(good + b'\xe9", "short_description": "", "label": 2}]')
    with pytest.raises(SystemExit) as stop:
        textcls.main(["--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    assert str(stop.value) == (f"error: News_train.json: line 2: byte 0xe9 at offset {len(good)} is not "
                              f"UTF-8 (save the file as UTF-8)")


@pytest.mark.parametrize("case", ["val_frac=0", "one record per class"])
def test_no_validation_split_trains_and_predicts(tmp_path, tiny, monkeypatch, capsys, case):
    records = make_records(15) if case == "one record per class" else make_records(120)
    if case == "val_frac=0":
        monkeypatch.setattr(textcls, "val_frac", 0.0)
    monkeypatch.setattr(textcls, "batch_size", 4)
    history = train(records, str(tmp_path))
    assert "no validation split" in capsys.readouterr().out
    assert [h["epoch"] for h in history] == [1, 2] and "accuracy" not in history[-1]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 2          # the last epoch's model
    assert (tmp_path / "learning_curve.png").exists()
    predictions = submit(str(tmp_path), write_json(tmp_path / "t.json", records[:10]),
                                           str(tmp_path / "s.csv"))
    assert len(predictions) == 10


def test_unwritable_outputs_are_found_before_any_work(tmp_path, tiny, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(textcls, "record_tokens", lambda *a: pytest.fail("tokenizing started"))
    with pytest.raises(ValueError, match=r"^cannot write .*a_file/out"):
        train(make_records(60), str(tmp_path / "a_file" / "out"))
    # --train --predict: a bad --submission stops the command before the training data is read
    monkeypatch.setattr(textcls, "load_news", lambda *a, **k: pytest.fail("training or prediction started"))
    for target, message in ((tmp_path / "a_file" / "s.csv", "^error: cannot write in .*a_file"),
                            (tmp_path, "^error: --submission=.* is a folder")):
        with pytest.raises(SystemExit, match=message):
            textcls.main(["--train", "--predict", f"--out_dir={tmp_path / 'out'}", f"--submission={target}"])


def test_a_test_file_with_a_repeated_id_is_one_line(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    train(make_records(60), str(tmp_path))
    records = make_records(6, labelled=False)
    records[4]["id"] = records[1]["id"]
    test_file = write_json(tmp_path / "t.json", records)
    with pytest.raises(ValueError, match=r"t.json: id 1 appears more than once"):
        submit(str(tmp_path), test_file, str(tmp_path / "s.csv"))
    assert not (tmp_path / "s.csv").exists()


def test_submission_is_replaced_atomically(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(textcls, "epochs", 1)
    train(make_records(60), str(tmp_path))
    (tmp_path / "s.csv").write_text("the old submission\n")
    test_file = write_json(tmp_path / "t.json", make_records(20, labelled=False))

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(textcls.os, "replace", crash)
    with pytest.raises(OSError):
        submit(str(tmp_path), test_file, str(tmp_path / "s.csv"))
    assert (tmp_path / "s.csv").read_text() == "the old submission\n"     # the old file survives a failed write
    monkeypatch.undo()
    monkeypatch.setattr(textcls, "precision", "fp32")
    submit(str(tmp_path), test_file, str(tmp_path / "s.csv"))
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "id,label" and not (tmp_path / "s.csv.tmp").exists()


# ----------------------------------------------------------------------------- precisions, GPUs, Macs, processes
@pytest.mark.parametrize("first", ["bf16", "fp32"])
def test_a_run_resumes_in_fp16_after_another_precision(tmp_path, first):
    """Started where auto picks bf16 or fp32 (an A100, an AMX CPU, a plain CPU), resumed where it picks fp16 (a T4):
    one line says so, the gradient scaler starts fresh (the checkpoint has none), and the run continues to its end."""
    write_json(tmp_path / "News_train.json", make_records(160))
    common = ["--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *TINY_ARGS]
    started = run_cli(*common, f"--precision={first}", "--max_minutes=1e-9")          # stops after step 1
    assert started.returncode == 0, started.stderr[-2000:]
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert (saved["step"], saved["precision"], saved["scaler"]) == (1, first, {})
    resumed = run_cli(*common, "--precision=fp16")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {tmp_path / 'out' / 'ckpt.pt'} at step 1 (saved in {first})" in resumed.stdout
    finished = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert finished["step"] == 20 and finished["precision"] == "fp16"                # 2 epochs of 10 steps
    assert finished["scaler"]["scale"] > 0 and "_growth_tracker" in finished["scaler"]
    assert all(t.isfinite().all() for t in finished["model"].values())
    assert "epoch 2: train loss" in resumed.stdout


@pytest.fixture
def mocked_gpu(monkeypatch):
    """torch.cuda as on a GPU of the capability given (a P100 is 6.0, a T4 7.5), with a build for every GPU."""
    def set_capability(capability, archs=()):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mocked GPU")
    return set_capability


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])
def test_explicit_bf16_below_capability_8_stops_with_one_line_naming_fp16(tiny, mocked_gpu, monkeypatch, capability):
    mocked_gpu(capability)
    monkeypatch.setattr(textcls, "load_news", lambda *a, **k: pytest.fail("work started before the check"))
    for entry in ("--train", "--predict", "--bench"):
        with pytest.raises(SystemExit) as stop:
            textcls.main([entry, "--precision=bf16", "--device="])
        message = str(stop.value)
        assert message.startswith("error: --precision=bf16 needs CUDA capability 8.0") and "\n" not in message
        assert f"this GPU has {capability[0]}.{capability[1]}: use --precision=fp16" in message
    assert textcls.choose_precision("auto", "cuda")[0] == "fp16"        # what auto picks there


class NeedsAGpu(Exception):
    pass


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])
def test_bench_skips_bf16_below_capability_8_with_a_note(tmp_path, tiny, mocked_gpu, monkeypatch, capsys, capability):
    mocked_gpu(capability)
    write_json(tmp_path / "News_train.json", make_records(150))
    asked = []

    def bench_speed(records, run_device, names=("fp32", "bf16"), **kwargs):
        asked.append((run_device, tuple(names)))
        raise NeedsAGpu("the speed runs need a real GPU")       # stop here: the rest is not the point
    monkeypatch.setattr(textcls, "bench_speed", bench_speed)
    with pytest.raises(NeedsAGpu):
        textcls.main(["--bench", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--device=",
                      "--precision=auto"])
    out = capsys.readouterr().out
    assert asked == [("cuda", ("fp32",))]
    assert "device: cuda (the first of cuda, mps, cpu found); precision: fp16 (CUDA capability" in out
    assert "note: no bf16 speed on this GPU (CUDA capability below 8.0 has no native bfloat16)" in out


def test_cuda_build_check_runs_on_every_gpu_entry_point(tmp_path, tiny, mocked_gpu, monkeypatch):
    """A P100 (6.0) under a build for sm_70 and newer: --train, --predict and --bench all stop with the one line
    before any work (loading data or checkpoints)."""
    mocked_gpu((6, 0), ["sm_70", "sm_75", "sm_80", "compute_80"])
    monkeypatch.setattr(textcls, "load_news", lambda *a, **k: pytest.fail("work started before the check"))
    monkeypatch.setattr(textcls, "load_checkpoint", lambda *a, **k: pytest.fail("work started before the check"))
    for entry in ("--train", "--predict", "--bench"):
        with pytest.raises(SystemExit) as stop:
            textcls.main([entry, "--device=", f"--out_dir={tmp_path}"])
        assert str(stop.value).startswith("error: this PyTorch ") and "none for Mocked GPU (sm_60)" in str(stop.value)


def test_device_picks_cuda_then_mps_then_cpu_and_says_why(tiny, mocked_gpu, monkeypatch, capsys):
    monkeypatch.setattr(textcls, "device", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert textcls.setup_system()[0] == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: True, raising=False)   # torch 2.6 asks
    assert textcls.setup_system()[:2] == ("mps", "fp32")
    assert "device: mps (the first of cuda, mps, cpu found); precision: fp32 (asked for)" in capsys.readouterr().out
    assert textcls.choose_precision("auto", "mps") == ("fp32", "no native bfloat16 on this mps")
    mocked_gpu((8, 0))
    assert textcls.setup_system()[0] == "cuda"
    monkeypatch.setattr(textcls, "device", "cpu")
    assert textcls.setup_system()[0] == "cpu" and "device: cpu (asked for)" in capsys.readouterr().out


def test_on_a_mac_the_run_goes_to_mps_in_fp32(tmp_path, tiny, monkeypatch, capsys):
    """device "" with mps available (mocked): the start line names mps and why, the precision is fp32, and the model
    goes to mps (where this CPU-only PyTorch build stops: it has no mps kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: True, raising=False)   # torch 2.6 asks
    write_json(tmp_path / "News_train.json", make_records(60))
    with pytest.raises(RuntimeError, match="mps"):
        textcls.main(["--train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--device=",
                      "--precision=auto"])
    assert "device: mps (the first of cuda, mps, cpu found); precision: fp32" in capsys.readouterr().out


def test_two_processes_train_and_predict_write_one_submission(tmp_path):
    """torchrun --train --predict with 2 gloo processes: both exit 0, and only rank 0 writes the submission (once)."""
    write_json(tmp_path / "News_train.json", make_records(200))
    test_file = write_json(tmp_path / "test.json", make_records(30, seed=4))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
               "textcls.py", "--train", "--predict", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}",
               f"--test_file={test_file}", f"--submission={tmp_path / 'sub.csv'}", *TINY_ARGS, "--epochs=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 30 predictions") == 1
    assert result.stdout.count("device: cpu (asked for)") == 1              # the start line, from rank 0
    rows = (tmp_path / "sub.csv").read_text().splitlines()
    assert rows[0] == "id,label" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(30))
    assert sorted(os.listdir(tmp_path)) == ["News_train.json", "out", "sub.csv", "test.json"]   # no .tmp left
