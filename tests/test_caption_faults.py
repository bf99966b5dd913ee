"""caption.py against faults and through its command line: crafted pickles on every load path, a kill at every
moment of a save, a NaN loss, SIGTERM, a one-row training file, unwritable outputs found before the work, a
submission written whole or not at all, damaged files, torchrun, checked overrides, --help, and --predict on the
model and prompt the adapter was trained with."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import caption
from bleu import config_block
from conftest import ROOT
from test_caption import rows_of_test_file, load, saved_folder, saved_state, write_parquet

NAMES = [name for name, _ in config_block(str(ROOT / "caption.py")) if name]


@pytest.fixture
def tiny(monkeypatch):
    settings = dict(tiny=True, backend="transformers", load_in_4bit=False, precision="fp32",
                    gradient_checkpointing=False, batch_size=2, grad_accum=1, lr=5e-3, warmup_steps=1, max_steps=4,
                    eval_every=100, save_every=2, val_samples=1, max_new_tokens=2, predict_batch_size=4, log_every=1,
                    max_minutes=0.0, lora_r=8, lora_alpha=16)
    for name, value in settings.items():
        monkeypatch.setattr(caption, name, value)


@pytest.fixture
def data_dir(tmp_path):
    write_parquet(tmp_path / "train_data.parquet", 4)
    write_parquet(tmp_path / "valid_data.parquet", 1)
    write_parquet(tmp_path / "test_data.parquet", 2, kind="test")
    return str(tmp_path)


@pytest.fixture
def restore_globals(monkeypatch):
    """caption.main sets the module's constants from the command line: put them back after the test."""
    for name in NAMES:
        monkeypatch.setattr(caption, name, getattr(caption, name))


def step_of(folder):
    return torch.load(os.path.join(folder, "state.pt"), weights_only=True)["step"]


def first_run(data_dir, out_dir, steps=1):
    """A real run stopped after `steps` steps: out_dir holds the pointer and step folders."""
    caption.max_steps, caption.max_minutes = steps, 0.0
    caption.train_model(data_dir, str(out_dir))
    caption.max_steps = 4


# ----------------------------------------------------------------------------- untrusted files
class Payload:
    """Unpickling this creates the marker file: the stand-in for any code a crafted checkpoint could run."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def craft(path, marker):
    torch.save({"step": 3, "best_bleu": 1.0, "optimizer": Payload(marker)}, path)


def test_the_crafted_pickle_is_live(tmp_path):
    """The control: loaded the unsafe way, the payload runs. The tests below must therefore see no marker."""
    craft(tmp_path / "x.pt", tmp_path / "marker")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_caption_py_loads_every_checkpoint_with_weights_only():
    source = (ROOT / "caption.py").read_text()
    loads = re.findall(r"torch\.load\((.*)", source)
    assert loads and all("weights_only=True" in line for line in loads)


def test_a_crafted_resume_state_never_runs(tiny, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir)
    state = pathlib.Path(saved_folder(str(out_dir))) / "state.pt"
    craft(state, tmp_path / "marker")
    with pytest.raises(ValueError) as stop:
        caption.train_model(data_dir, str(out_dir))
    assert not (tmp_path / "marker").exists()
    assert str(stop.value).startswith(f"{state} is damaged or not caption.py's; use another --out_dir "
                                      f"(UnpicklingError")


def crafted_adapter(folder, marker):
    """A real adapter folder whose weights are a crafted adapter_model.bin (peft falls back to .bin)."""
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    craft(os.path.join(folder, "adapter_model.bin"), marker)


def test_a_crafted_adapter_never_runs_on_predict_or_resume(tiny, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir)
    crafted_adapter(saved_folder(str(out_dir), "best"), tmp_path / "marker")
    with pytest.raises(ValueError, match=r"^cannot load the adapter in .*step_\d \(UnpicklingError"):
        caption.write_submission(rows_of_test_file(data_dir), str(out_dir), str(tmp_path / "s.json"))
    assert not (tmp_path / "marker").exists() and not (tmp_path / "s.json").exists()
    crafted_adapter(saved_folder(str(out_dir), "last"), tmp_path / "marker")   # the resume point's adapter
    with pytest.raises(ValueError, match=r"^cannot load the adapter in .*step_1 \(UnpicklingError"):
        caption.train_model(data_dir, str(out_dir))
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "foreign"])
def test_a_damaged_state_file_is_one_line_naming_it(tiny, data_dir, tmp_path, damage, restore_globals):
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir)
    state = pathlib.Path(saved_folder(str(out_dir))) / "state.pt"
    good = state.read_bytes()
    torch.save({"step": 2, "best_bleu": 1.0}, tmp_path / "foreign.pt")
    state.write_bytes({"empty": b"", "truncated": good[:300], "text": b"step = 2\n",
                       "foreign": (tmp_path / "foreign.pt").read_bytes()}[damage])
    with pytest.raises(SystemExit) as stop:
        caption.main(["--train", "--tiny", "--backend=transformers", "--load_in_4bit=False", "--precision=fp32",
                      f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--val_samples=1", "--max_new_tokens=2"])
    message = str(stop.value)
    assert message.startswith(f"error: {state} is damaged or not caption.py's; use another --out_dir (")
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "without settings"])
def test_a_damaged_pointer_file_is_one_line_naming_it(tiny, data_dir, tmp_path, damage):
    """out_dir/checkpoint.json names the steps and holds the settings they were trained with."""
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir)
    path = out_dir / "checkpoint.json"
    path.write_text('{"model_name": ' if damage == "truncated" else '{"last": "step_1", "best": "step_1"}')
    rows = rows_of_test_file(data_dir)
    for entry_point in (lambda: caption.write_submission(rows, str(out_dir), str(tmp_path / "s.json")),
                        lambda: caption.train_model(data_dir, str(out_dir))):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is damaged or not caption.py's"):
            entry_point()


# ----------------------------------------------------------------------------- saving steps
class Killed(Exception):
    """The stand-in for a kill: raised at the n-th file operation of a save."""


def test_a_kill_at_any_moment_of_a_save_leaves_a_complete_resume_point(tiny, data_dir, tmp_path, monkeypatch):
    """Every file operation of save_checkpoint (the adapter's files, the settings, state.pt, the pointer's
    temporary file and its rename, the deletion of old folders) is interrupted in turn; after each kill the pointer
    names complete folders (the step before or the new one, never a half-written one), and training resumes."""
    model, _, _ = load()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    caption.save_checkpoint(model, out_dir, optimizer, scaler, 2, 1.0, None, "fp32")
    real = {"save_pretrained": model.save_pretrained, "torch.save": torch.save, "open": open,
            "os.replace": os.replace, "shutil.rmtree": shutil.rmtree}
    moments = 0
    for kill_at in range(1, 40):
        calls = []

        def counted(name):
            def operation(*args, **kwargs):
                calls.append(name)
                if len(calls) == kill_at:
                    raise Killed(name)
                return real[name](*args, **kwargs)
            return operation
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model, "save_pretrained", counted("save_pretrained"))
            patch.setattr(caption.torch, "save", counted("torch.save"))
            patch.setattr(caption, "open", counted("open"), raising=False)
            patch.setattr(caption.os, "replace", counted("os.replace"))
            patch.setattr(caption.shutil, "rmtree", counted("shutil.rmtree"))
            try:
                caption.save_checkpoint(model, out_dir, optimizer, scaler, 4, 2.0, None, "fp32")
                finished = True
            except Killed:
                finished = False
        folder, state = caption.load_checkpoint(out_dir, "last")
        assert state["step"] in (2, 4) and os.path.exists(os.path.join(folder, "adapter_model.safetensors"))
        assert os.path.basename(folder) == f"step_{state['step']}"
        moments += 1
        shutil.rmtree(out_dir)           # the next kill starts from the same saved step 2
        os.makedirs(out_dir)
        caption.save_checkpoint(model, out_dir, optimizer, scaler, 2, 1.0, None, "fp32")
        if finished:
            break
    assert finished and moments >= 6, moments


def test_a_kill_during_a_save_resumes_from_the_step_before_and_keeps_the_best(tiny, data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    out_dir = str(tmp_path / "out")
    real_save = caption.save_checkpoint
    saves = []

    def killed(text, path):
        raise KeyboardInterrupt("killed")

    def killed_before_the_pointer(model, out_dir, optimizer, scaler, step, *rest):
        saves.append(step)
        if step == 4:   # the folder is written, the pointer not yet
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(caption, "save_atomic", killed)
                real_save(model, out_dir, optimizer, scaler, step, *rest)
        return real_save(model, out_dir, optimizer, scaler, step, *rest)
    monkeypatch.setattr(caption, "save_checkpoint", killed_before_the_pointer)
    with pytest.raises(KeyboardInterrupt):
        caption.train_model(data_dir, out_dir)
    assert step_of(saved_folder(out_dir)) == 2 and os.path.exists(os.path.join(out_dir, "step_4"))
    best = saved_folder(out_dir, "best")
    best_files = {p.name: p.read_bytes() for p in pathlib.Path(best).iterdir() if p.name != "state.pt"}
    monkeypatch.setattr(caption, "save_checkpoint", real_save)
    capsys.readouterr()
    caption.train_model(data_dir, out_dir)
    out = capsys.readouterr().out
    assert f"resuming from {os.path.join(out_dir, 'step_2')} at step 2" in out and "step 0: validation" not in out
    assert step_of(saved_folder(out_dir)) == 4
    if saved_folder(out_dir, "best") == best:     # no new best since: the best adapter is untouched
        assert {p.name: p.read_bytes() for p in pathlib.Path(best).iterdir() if p.name != "state.pt"} == best_files


def poison_the_loss(monkeypatch, at_call, action):
    """Run `action` in the forward pass of the at_call-th training batch (a forward hook on the loaded model)."""
    real_load = caption.load_model
    calls = []

    def hook(module, args, kwargs, output):
        if kwargs.get("labels") is not None:
            calls.append(1)
            if len(calls) == at_call:
                return action(output)
        return output

    def load_and_hook(*args, **kwargs):
        result = real_load(*args, **kwargs)
        result[0].register_forward_hook(hook, with_kwargs=True)
        return result
    monkeypatch.setattr(caption, "load_model", load_and_hook)
    return calls


class NanGradient(torch.autograd.Function):
    """The identity whose gradient is NaN: a finite loss with a poisoned backward."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("poisoned", ["loss", "gradient"])
def test_a_nan_loss_or_gradient_stops_without_touching_the_resume_point(tiny, data_dir, tmp_path, monkeypatch,
                                                                        poisoned):
    """A NaN loss, or a finite loss whose gradient is NaN (before, that step was saved as the resume point)."""
    monkeypatch.setattr(caption, "save_every", 1)

    def nan(output):
        output.loss = output.loss * float("nan") if poisoned == "loss" else NanGradient.apply(output.loss)
        return output
    poison_the_loss(monkeypatch, 3, nan)
    out_dir = str(tmp_path / "out")
    with pytest.raises(SystemExit) as stop:
        caption.train_model(data_dir, out_dir)
    assert str(stop.value) == "error: inf or NaN in the loss or gradient at step 3 (fp32); not saved"
    assert step_of(saved_folder(out_dir)) == 2 and not os.path.exists(os.path.join(out_dir, "step_3"))
    from safetensors.torch import load_file
    weights = load_file(os.path.join(saved_folder(out_dir), "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_sigterm_saves_the_step_reached_then_exits(data_dir, tmp_path):
    """The real signal, to the real command: it saves after the step it interrupts, then exits with one line."""
    out_dir = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "caption.py", "--train", "--tiny", "--backend=transformers", "--load_in_4bit=False",
         "--precision=fp32", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_steps=100000", "--log_every=1",
         "--save_every=100000", "--eval_every=100000", "--val_samples=1", "--max_new_tokens=2", "--num_threads=1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    rest, errors = process.communicate(timeout=300)
    assert process.returncode == 1, errors[-2000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/100000: saved; run the same command to go on",
                        errors.strip().splitlines()[-1])
    assert stopped and "SIGTERM: saving after this step, then exiting" in rest
    assert step_of(saved_folder(str(out_dir))) == int(stopped.group(1)) >= 2


CLI_TINY = ["--tiny", "--backend=transformers", "--load_in_4bit=False", "--precision=fp32", "--num_threads=1",
            "--predict_batch_size=1", "--max_new_tokens=48"]


def test_sigterm_during_validation_stops_the_captioning_and_saves(tmp_path):
    """Validation captions every validation image (5-7 minutes on a T4): a signal there stops the captioning at
    the image it reached, saves the step and exits (before, the whole validation and one more step ran first)."""
    write_parquet(tmp_path / "train_data.parquet", 4)
    write_parquet(tmp_path / "valid_data.parquet", 80)
    out_dir = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-u", "caption.py", "--train", *CLI_TINY, f"--data_dir={tmp_path}",
                                f"--out_dir={out_dir}", "--max_steps=10", "--val_samples=0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("backend transformers"):      # loaded: step 0's validation starts now
            process.send_signal(signal.SIGTERM)
            break
    rest, errors = process.communicate(timeout=300)
    assert process.returncode == 1, errors[-2000:]
    assert errors.strip().splitlines()[-1] == ("stopped by SIGTERM at step 0/10: saved; run the same command to "
                                               "go on")
    assert "validation BLEU" not in rest and step_of(saved_folder(str(out_dir))) == 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_predicting_after_training_stops_at_once(tmp_path, signal_number):
    """Only training saves and stops after its step: under --train --predict, a signal once training is done ends
    the process (SIGTERM) or is one line (Ctrl-C), and no submission is written (before, the handler said it would
    save, and captioning went on)."""
    write_parquet(tmp_path / "train_data.parquet", 4)
    write_parquet(tmp_path / "valid_data.parquet", 1)
    write_parquet(tmp_path / "test_data.parquet", 80, kind="test")
    process = subprocess.Popen([sys.executable, "-u", "caption.py", "--train", "--predict", *CLI_TINY,
                                f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1",
                                f"--submission={tmp_path / 's.json'}"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                           # training is done,
        if line.startswith("done:"):
            break
    for line in process.stdout:                           # and the model is loaded again for --predict
        if line.startswith("backend transformers"):
            break
    process.send_signal(signal_number)
    _, errors = process.communicate(timeout=300)
    if signal_number == signal.SIGTERM:
        assert process.returncode == -signal.SIGTERM, errors[-2000:]
    else:
        assert process.returncode == 1 and errors.strip().splitlines()[-1] == "stopped by Ctrl-C", errors[-2000:]
    assert not (tmp_path / "s.json").exists()


def test_a_resumed_run_trains_in_training_mode(tiny, data_dir, tmp_path, monkeypatch):
    """from_pretrained gives a model in evaluation mode, where gradient checkpointing is off (8 times the
    activations of the tiny model; out of memory on a T4 for the 11B). A fresh run switches after step 0's
    validation; a resumed run, which has none, must switch too."""
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir, steps=1)
    modes, real_load = [], caption.load_model

    def record_modes(module, args, kwargs):
        if kwargs.get("labels") is not None:
            modes.append(all(m.training for m in module.modules()))

    def load_and_watch(*args, **kwargs):
        result = real_load(*args, **kwargs)
        result[0].register_forward_pre_hook(record_modes, with_kwargs=True)
        return result
    monkeypatch.setattr(caption, "load_model", load_and_watch)
    caption.max_steps = 3
    caption.train_model(data_dir, str(out_dir))
    assert modes == [True, True]


def test_saving_deletes_only_its_own_step_folders(tiny, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir, steps=1)
    for name in ("step_1_backup", "step_plots", "step_1 (copy)"):
        (out_dir / name).mkdir()
    first_run(data_dir, out_dir, steps=2)
    names = {p.name for p in out_dir.iterdir()}
    assert {"step_1_backup", "step_plots", "step_1 (copy)", "step_2"} <= names and "step_1" not in names


def test_resuming_on_other_training_data_stops_and_a_new_weight_decay_applies(tiny, data_dir, tmp_path,
                                                                              monkeypatch):
    out_dir = str(tmp_path / "out")
    first_run(data_dir, out_dir, steps=1)
    decays, real_resume = [], caption.resume

    def resume_and_look(state, optimizer, *rest):
        result = real_resume(state, optimizer, *rest)
        decays.append(optimizer.param_groups[0]["weight_decay"])
        return result
    monkeypatch.setattr(caption, "resume", resume_and_look)
    monkeypatch.setattr(caption, "weight_decay", 0.5)
    first_run(data_dir, out_dir, steps=2)
    assert decays == [0.5]                          # before, the saved optimizer's 0.01 went on
    write_parquet(os.path.join(data_dir, "train_data.parquet"), 3)
    with pytest.raises(ValueError, match=r"step_2 was trained with other settings: training captions [0-9a-f]{16} "
                                         r"there, [0-9a-f]{16} now; use the same values, or another --out_dir$"):
        first_run(data_dir, out_dir, steps=3)


# ----------------------------------------------------------------------------- inputs and outputs
def test_a_one_row_training_file_trains(tiny, tmp_path):
    write_parquet(tmp_path / "train_data.parquet", 1)
    write_parquet(tmp_path / "valid_data.parquet", 1)
    caption.max_steps = 0        # one epoch of one image at batch_size 2: one step
    assert caption.train_model(str(tmp_path), str(tmp_path / "out")) >= 0
    assert step_of(saved_folder(str(tmp_path / "out"))) == 1


def test_an_unwritable_out_dir_stops_before_any_work(tiny, data_dir, tmp_path, monkeypatch, restore_globals):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(caption, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match=r"^error: out_dir '.*a_file/out' is not writable \(Not a directory\)$"):
        caption.main(["--train", "--predict", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'a_file' / 'out'}"])


def test_an_unwritable_submission_stops_before_any_work(tiny, data_dir, tmp_path, monkeypatch, restore_globals):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(caption, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(SystemExit, match=r"^error: the folder of --submission '.*a_file' is not writable"):
        caption.main(["--train", "--predict", f"--out_dir={tmp_path}", f"--submission={tmp_path / 'a_file' / 's.json'}"])
    for folder in (str(tmp_path), "", str(tmp_path / "no_such_folder") + "/"):   # the last two named no file
        with pytest.raises(SystemExit, match=r"^error: --submission '.*' is a folder"):
            caption.main(["--predict", f"--out_dir={tmp_path}", f"--submission={folder}"])


def test_train_predict_checks_the_test_file_before_training(tiny, data_dir, tmp_path, monkeypatch, restore_globals):
    os.remove(os.path.join(data_dir, "test_data.parquet"))
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match=r"^error: test_data.parquet: cannot read parquet \(FileNotFoundError"):
        caption.main(["--train", "--predict", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                      f"--submission={tmp_path / 's.json'}"])


def test_the_submission_is_written_whole_or_not_at_all(tiny, data_dir, tmp_path, monkeypatch, restore_globals):
    """A failure at the rename (a full disk) leaves the previous submission as it was (and submission.json.tmp)."""
    out_dir = tmp_path / "out"
    first_run(data_dir, out_dir)
    target = tmp_path / "submission.json"
    target.write_text("the previous submission")
    real_replace = os.replace

    def disk_full(source, destination):
        if str(destination) == str(target):
            raise OSError(28, "No space left on device", str(target) + ".tmp")
        return real_replace(source, destination)
    monkeypatch.setattr(caption.os, "replace", disk_full)
    with pytest.raises(SystemExit, match=r"^error: .*submission.json.tmp: No space left on device$"):
        caption.main(["--predict", "--tiny", "--backend=transformers", "--load_in_4bit=False", "--precision=fp32",
                      f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--submission={target}"])
    assert target.read_text() == "the previous submission"


def test_torchrun_is_refused_with_one_line(restore_globals, monkeypatch):
    """caption.py has no DDP: under torchrun every rank would train alone and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="^error: caption.py trains on one GPU; start it with python, not torchrun$"):
        caption.main(["--train"])


# ----------------------------------------------------------------------------- command line (issue 13)
@pytest.mark.parametrize("argv, message", [
    (["--tiny=ture"], "error: --tiny takes True or False (like False), got 'ture'"),
    (["--train=ture"], "error: --train takes True or False (like False), got 'ture'"),
    (["--batch_size=0"], "error: --batch_size must be an integer >= 1, got 0"),
    (["--grad_accum=-1"], "error: --grad_accum must be an integer >= 1, got -1"),
    (["--backend=unslot"], "error: --backend must be one of 'auto', 'unsloth', 'transformers', got 'unslot'"),
    (["--optimizer_name=adamw_8bit"], "error: unknown option --optimizer_name (--help lists the options)"),
    (["--precision=fp8"], "error: --precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"),
    (["--lora_dropout=1.5"], "error: --lora_dropout must be a number in [0, 1), got 1.5"),
    (["--save_every=0"], "error: --save_every must be an integer >= 1, got 0"),
    (["--max_steps=1e3"], "error: --max_steps takes an integer (like 250), got '1e3'"),
    (["--epochs=three"], "error: --epochs takes an integer (like 1), got 'three'"),
    (["--modle_name=x"], "error: unknown option --modle_name (did you mean --model_name?)"),
    (["--math=1"], "error: unknown option --math"),
    (["--out_dir", "/x"], "error: --out_dir needs a value: --out_dir=VALUE"),
    (["--train", "data/caption"], "error: caption.py takes --train and/or --predict and no positional arguments, "
                                   "got ['data/caption']"),
    (["--lr=0"], "error: --lr must be a number > 0, got 0"),
])
def test_bad_overrides_stop_with_one_line(restore_globals, argv, message):
    with pytest.raises(SystemExit) as stop:
        caption.main(argv)
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_no_work_asked_for_is_one_line(restore_globals, capsys, monkeypatch):
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded with nothing to do"))
    with pytest.raises(SystemExit, match=r"^error: caption.py takes --train and/or --predict and no positional "
                                         r"arguments, got \[\] \(--help lists the options\)$"):
        caption.main(["--model_name=some/local-folder"])
    assert caption.model_name == "some/local-folder"
    assert "overriding: model_name = 'some/local-folder'" in capsys.readouterr().out


def test_help_prints_the_docstring_and_every_constant():
    result = subprocess.run([sys.executable, "caption.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(caption.__doc__.strip().splitlines()[0])
    assert len(NAMES) > 30
    for name in NAMES:
        assert re.search(rf"^\s+{name} = ", result.stdout, re.MULTILINE), name
    assert "save_every = 20" in result.stdout and "# steps between saved steps" in result.stdout


def test_a_bad_override_from_the_shell_is_one_line_and_no_work():
    result = subprocess.run([sys.executable, "caption.py", "--train", "--tiny=ture"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == "error: --tiny takes True or False (like False), got 'ture'"


def test_predict_uses_the_training_prompt_and_names_other_settings(tiny, data_dir, tmp_path, monkeypatch):
    """--predict runs the best adapter on the base and prompt it was trained with: other model settings stop with
    one line naming them (before any model loads), the same ones caption with the training's prompt."""
    monkeypatch.setattr(caption, "instruction", "Name the colour.")
    monkeypatch.setattr(caption, "seed", 11)
    out_dir = str(tmp_path / "out")
    caption.max_steps = 1
    caption.train_model(data_dir, out_dir)
    pointer = json.loads(pathlib.Path(out_dir, "checkpoint.json").read_text())
    assert pointer["instruction"] == "Name the colour." and pointer["seed"] == 11 and pointer["lora_r"] == 8
    # a later session with other constants at the top of the file
    monkeypatch.setattr(caption, "instruction", "Write a poem.")
    monkeypatch.setattr(caption, "seed", 3)
    monkeypatch.setattr(caption, "batch_size", 1)        # not a model setting: predict does not care
    real_load = caption.load_model
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded with other settings"))
    with pytest.raises(ValueError, match=r"^.*step_\d was trained with other settings: instruction = "
                                         r"'Name the colour.' there, 'Write a poem.' now, seed = 11 there, 3 now; "
                                         r"use the same values, or another --out_dir$"):
        caption.write_submission(rows_of_test_file(data_dir), out_dir, str(tmp_path / "s.json"))
    assert not (tmp_path / "s.json").exists()
    monkeypatch.setattr(caption, "load_model", real_load)
    monkeypatch.setattr(caption, "instruction", "Name the colour.")
    monkeypatch.setattr(caption, "seed", 11)
    prompts = []
    real_build = caption.build_tiny_model

    def build_and_spy():
        model, processor = real_build()
        real_template = processor.apply_chat_template
        monkeypatch.setattr(processor, "apply_chat_template", lambda messages, **kwargs: (
            prompts.append(messages[0]["content"][1]["text"]), real_template(messages, **kwargs))[1])
        return model, processor
    monkeypatch.setattr(caption, "build_tiny_model", build_and_spy)
    caption.write_submission(rows_of_test_file(data_dir), out_dir, str(tmp_path / "s.json"))
    assert set(prompts) == {"Name the colour."} and len(json.loads((tmp_path / "s.json").read_text())) == 2


def test_resuming_with_other_model_settings_names_the_differing_keys(tiny, data_dir, tmp_path, monkeypatch):
    out_dir = str(tmp_path / "out")
    caption.max_minutes = 1e-9       # stop after one step
    caption.train_model(data_dir, out_dir)
    monkeypatch.setattr(caption, "lora_r", 4)
    monkeypatch.setattr(caption, "batch_size", 1)
    with pytest.raises(ValueError, match=r"^.*step_1 was trained with other settings: lora_r = 8 there, 4 now, "
                                         r"batch_size = 2 there, 1 now; use the same values, or another --out_dir$"):
        caption.train_model(data_dir, out_dir)
