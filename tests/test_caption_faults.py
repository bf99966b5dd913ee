"""caption.py against faults (issue 16) and through its command line (issue 13): crafted pickles on every load
path, a kill inside the resume-point swap, a NaN loss, SIGTERM, a one-row training file, unwritable outputs found
before the work, a submission written whole or not at all, damaged state files, checked overrides, --help, and the
adapter's own settings used by --predict without touching the module's globals."""
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
from test_caption import write_parquet


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
    for name, value in caption.settings().items():
        monkeypatch.setattr(caption, name, value)


def step_of(folder):
    return torch.load(os.path.join(folder, "state.pt"), weights_only=True)["step"]


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


def test_a_crafted_resume_state_never_runs(tiny, data_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    (out_dir / "last").mkdir(parents=True)
    craft(out_dir / "last" / "state.pt", tmp_path / "marker")
    with pytest.raises(SystemExit) as stop:
        caption.train_model(data_dir, str(out_dir))
    assert not (tmp_path / "marker").exists()
    assert str(stop.value).startswith(f"error: {out_dir / 'last' / 'state.pt'} is damaged or not a caption.py "
                                      f"resume state (UnpicklingError")
    assert "\n" not in str(stop.value)
    assert caption.state_step(str(out_dir / "last")) == "?" and not (tmp_path / "marker").exists()


def crafted_adapter(folder, marker):
    """A real adapter folder whose weights are a crafted adapter_model.bin (peft falls back to .bin)."""
    model, _, _ = caption.load_model(trainable=False)
    model.save_pretrained(folder)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    craft(os.path.join(folder, "adapter_model.bin"), marker)


def test_a_crafted_adapter_never_runs_on_predict_or_resume(tiny, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    crafted_adapter(str(out_dir / "adapter"), tmp_path / "marker")
    with pytest.raises(SystemExit, match=r"^error: cannot load the adapter in .*adapter \(UnpicklingError"):
        caption.write_submission(data_dir, str(out_dir), str(tmp_path / "s.json"))
    assert not (tmp_path / "marker").exists() and not (tmp_path / "s.json").exists()
    # a resume point whose state is fine but whose adapter weights are crafted
    shutil.copytree(out_dir / "adapter", out_dir / "last")
    torch.save({"step": 1, "best_bleu": 0.0, "optimizer": {"state": {}, "param_groups": []}},
               out_dir / "last" / "state.pt")
    with pytest.raises(SystemExit, match=r"^error: cannot load the adapter in .*last \(UnpicklingError"):
        caption.train_model(data_dir, str(out_dir))
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_a_damaged_state_file_is_one_line_naming_it(tiny, data_dir, tmp_path, damage):
    out_dir = tmp_path / "out"
    last = out_dir / "last"
    last.mkdir(parents=True)
    buffer = tmp_path / "good.pt"
    torch.save({"step": 2, "best_bleu": 1.0, "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}}}, buffer)
    data = {"empty": b"", "truncated": buffer.read_bytes()[:300], "text": b"step = 2\n"}[damage]
    (last / "state.pt").write_bytes(data)
    with pytest.raises(SystemExit) as stop:
        caption.train_model(data_dir, str(out_dir))
    message = str(stop.value)
    assert message.startswith(f"error: {last / 'state.pt'} is damaged") and "\n" not in message
    assert f"delete {last} to start again from step 0" in message


def test_a_damaged_settings_file_is_one_line_naming_it(tiny, data_dir, tmp_path):
    adapter = tmp_path / "out" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / caption.CONFIG_FILE).write_text('{"model_name": ')
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(adapter / caption.CONFIG_FILE))} is damaged"):
        caption.write_submission(data_dir, str(tmp_path / "out"), str(tmp_path / "s.json"))


# ----------------------------------------------------------------------------- the resume point
def test_recover_keeps_a_complete_resume_point_at_every_moment_of_the_swap(tmp_path):
    folder = str(tmp_path / "last")

    def make(path, step, complete=True):
        os.makedirs(path)
        pathlib.Path(path, "adapter_model.safetensors").write_text(str(step))
        if complete:
            torch.save({"step": step}, os.path.join(path, "state.pt"))

    # killed while writing last.tmp: last/ is the good one, the partial last.tmp goes
    make(folder, 2)
    make(folder + ".tmp", 4, complete=False)
    caption.recover(folder)
    assert step_of(folder) == 2 and not os.path.exists(folder + ".tmp")
    # killed after last -> last.old, before last.tmp -> last: the new one wins
    os.replace(folder, folder + ".old")
    make(folder + ".tmp", 4)
    caption.recover(folder)
    assert step_of(folder) == 4 and not os.path.exists(folder + ".tmp") and not os.path.exists(folder + ".old")
    # killed after the swap, before last.old was deleted
    make(folder + ".old", 2)
    caption.recover(folder)
    assert step_of(folder) == 4 and not os.path.exists(folder + ".old")
    # killed before last.tmp was complete, with last/ already moved aside (cannot happen with swap_in's order,
    # but a half-deleted folder can look like it): the old one comes back
    os.replace(folder, folder + ".old")
    make(folder + ".tmp", 6, complete=False)
    caption.recover(folder)
    assert step_of(folder) == 4


def test_every_moment_of_the_swap_has_a_complete_resume_point(tmp_path, monkeypatch):
    """save_adapter's own order of file operations: before and after each one, a kill would leave a complete
    folder among last/, last.tmp/, last.old/ that recover() picks, and it is the newest complete one written."""
    folder = str(tmp_path / "last")

    class Model:   # what save_adapter needs of a model
        def __init__(self, step):
            self.step = step

        def save_pretrained(self, path):
            os.makedirs(path)
            pathlib.Path(path, "adapter_model.safetensors").write_text(str(self.step))
    c = {key: 0 for key in caption.RESUME_KEYS}
    caption.save_adapter(Model(2), folder, c, {"step": 2})
    moments = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def snapshot():
        copies = [p for p in (folder, folder + ".tmp", folder + ".old") if caption.is_complete(p)]
        moments.append(max(step_of(p) for p in copies) if copies else None)
    monkeypatch.setattr(caption.os, "replace", lambda a, b: (snapshot(), real_replace(a, b), snapshot()))
    monkeypatch.setattr(caption.shutil, "rmtree", lambda p, **k: (snapshot(), real_rmtree(p, **k), snapshot()))
    caption.save_adapter(Model(4), folder, c, {"step": 4})
    assert None not in moments and moments[0] == 2 and moments[-1] == 4
    assert moments == sorted(moments)                     # never back to an older point once the new one is there
    monkeypatch.undo()
    assert step_of(folder) == 4 and os.listdir(tmp_path) == ["last"]


def test_a_kill_inside_the_swap_resumes_from_the_new_point_and_keeps_the_best_adapter(tiny, data_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    out_dir = str(tmp_path / "out")
    real_swap = caption.swap_in
    swaps = []

    def killed_in_the_window(folder):
        swaps.append(os.path.basename(folder))
        if os.path.basename(folder) == "last" and swaps.count("last") == 2:   # the resume point of step 4
            os.replace(folder, folder + ".old")
            raise KeyboardInterrupt("killed between the two renames")
        real_swap(folder)
    monkeypatch.setattr(caption, "swap_in", killed_in_the_window)
    with pytest.raises(KeyboardInterrupt):
        caption.train_model(data_dir, out_dir)
    last = os.path.join(out_dir, "last")
    assert not os.path.exists(last) and step_of(last + ".tmp") == 4 and step_of(last + ".old") == 2
    adapter_files = {p.name: p.read_bytes() for p in pathlib.Path(out_dir, "adapter").iterdir()}
    monkeypatch.setattr(caption, "swap_in", real_swap)
    capsys.readouterr()
    caption.train_model(data_dir, out_dir)
    out = capsys.readouterr().out
    assert f"recovered {last} from {last}.tmp" in out and f"resuming from {last} at step 4" in out
    assert "step 0: validation" not in out
    assert step_of(last) == 4 and not os.path.exists(last + ".tmp") and not os.path.exists(last + ".old")
    assert {p.name: p.read_bytes() for p in pathlib.Path(out_dir, "adapter").iterdir()} == adapter_files


def test_a_nan_loss_stops_without_touching_the_resume_point(tiny, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(caption, "save_every", 1)
    real_loss = caption.training_loss
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(caption, "training_loss", poisoned)
    out_dir = str(tmp_path / "out")
    with pytest.raises(SystemExit) as stop:
        caption.train_model(data_dir, out_dir)
    last = os.path.join(out_dir, "last")
    assert str(stop.value).startswith("error: the loss is nan at step 3 (precision fp32); stopped without saving: "
                                      f"{last} keeps step 2")
    assert step_of(last) == 2 and not os.path.exists(last + ".tmp")
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last, "adapter_model.safetensors")).values())


def test_sigterm_saves_a_resume_point_at_the_step_reached(tiny, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(caption, "save_every", 100)
    real_loss = caption.training_loss
    calls = []

    def terminated(model, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(model, batch)
    monkeypatch.setattr(caption, "training_loss", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    out_dir = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"^stopped by SIGTERM at step 2/4: resume point saved"):
        caption.train_model(data_dir, out_dir)
    assert step_of(os.path.join(out_dir, "last")) == 2 and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is handler


# ----------------------------------------------------------------------------- inputs and outputs
def test_a_one_row_training_file_trains(tiny, tmp_path):
    write_parquet(tmp_path / "train_data.parquet", 1)
    write_parquet(tmp_path / "valid_data.parquet", 1)
    caption.max_steps = 0        # one epoch of one image at batch_size 2: one step
    assert caption.train_model(str(tmp_path), str(tmp_path / "out")) >= 0
    assert step_of(str(tmp_path / "out" / "last")) == 1


def test_an_unwritable_out_dir_stops_before_any_work(tiny, data_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(caption, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match=r"^error: out_dir '.*a_file/out' is not writable \(Not a directory\)$"):
        caption.train_model(data_dir, str(tmp_path / "a_file" / "out"))


def test_an_unwritable_submission_stops_before_any_work(tiny, data_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(caption, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match=r"^error: the folder of --submission '.*a_file' is not writable"):
        caption.write_submission(data_dir, str(tmp_path), str(tmp_path / "a_file" / "s.json"))
    with pytest.raises(SystemExit, match=r"^error: --submission '.*' is a folder"):
        caption.write_submission(data_dir, str(tmp_path), str(tmp_path))


def test_the_submission_is_written_whole_or_not_at_all(tiny, data_dir, tmp_path, monkeypatch, restore_globals):
    out_dir = tmp_path / "out"
    model, _, _ = caption.load_model(trainable=False)
    model.save_pretrained(out_dir / "adapter")
    target = tmp_path / "submission.json"
    target.write_text("the previous submission")

    def disk_full(obj, f, **kwargs):
        f.write('[{"idx": 0, "out')
        raise OSError(28, "No space left on device", str(target) + ".tmp")
    monkeypatch.setattr(caption.json, "dump", disk_full)
    with pytest.raises(SystemExit, match=r"^error: .*submission.json.tmp: No space left on device$"):
        caption.main(["--predict", "--tiny", "--backend=transformers", "--load_in_4bit=False", "--precision=fp32",
                      f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--submission={target}"])
    assert target.read_text() == "the previous submission" and not os.path.exists(str(target) + ".tmp")


# ----------------------------------------------------------------------------- command line (issue 13)
@pytest.mark.parametrize("argv, message", [
    (["--tiny=ture"], "error: --tiny takes True or False (like False), got 'ture'"),
    (["--train=ture"], "error: --train takes True or False (like False), got 'ture'"),
    (["--batch_size=0"], "error: --batch_size must be an integer >= 1, got 0"),
    (["--grad_accum=-1"], "error: --grad_accum must be an integer >= 1, got -1"),
    (["--backend=unslot"], "error: --backend must be one of 'auto', 'unsloth', 'transformers', got 'unslot'"),
    (["--optimizer_name=sgd"], "error: --optimizer_name must be one of 'adamw', 'adamw_8bit', got 'sgd'"),
    (["--precision=fp8"], "error: --precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"),
    (["--lora_dropout=1.5"], "error: --lora_dropout must be a number in [0, 1), got 1.5"),
    (["--save_every=0"], "error: --save_every must be an integer >= 1, got 0"),
    (["--max_steps=1e3"], "error: --max_steps takes an integer (like 250), got '1e3'"),
    (["--epochs=three"], "error: --epochs takes an integer (like 1), got 'three'"),
    (["--modle_name=x"], "error: unknown option --modle_name (did you mean --model_name?)"),
    (["--math=1"], "error: unknown option --math"),
    (["--out_dir", "/x"], "error: --out_dir needs a value: --out_dir=VALUE"),
    (["--train", "data/caption"], "error: caption.py takes no positional arguments, got 'data/caption'"),
])
def test_bad_overrides_stop_with_one_line(restore_globals, argv, message):
    with pytest.raises(SystemExit) as stop:
        caption.main(argv)
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_model_is_a_short_name_for_model_name(restore_globals, capsys):
    caption.main(["--model=some/local-folder"])
    out = capsys.readouterr().out
    assert caption.model_name == "some/local-folder"
    assert "overriding: model_name = 'some/local-folder'" in out and "choose --train or --predict" in out


def test_help_prints_the_docstring_and_every_constant():
    result = subprocess.run([sys.executable, "caption.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(caption.__doc__.strip().splitlines()[0])
    names = [name for name, _ in config_block(str(ROOT / "caption.py")) if name]
    assert names == list(caption.settings()) and len(names) > 30
    for name in names:
        assert re.search(rf"^\s+{name} = ", result.stdout, re.MULTILINE), name
    assert "save_every = 20" in result.stdout and "# steps between resume points" in result.stdout


def test_a_bad_override_from_the_shell_is_one_line_and_no_work():
    result = subprocess.run([sys.executable, "caption.py", "--train", "--tiny=ture"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == "error: --tiny takes True or False (like False), got 'ture'"


def test_predict_uses_the_adapters_settings_without_touching_the_globals(tiny, data_dir, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(caption, "instruction", "Name the colour.")
    monkeypatch.setattr(caption, "seed", 11)
    out_dir = str(tmp_path / "out")
    caption.max_steps = 1
    caption.train_model(data_dir, out_dir)
    saved = json.loads(pathlib.Path(out_dir, "adapter", caption.CONFIG_FILE).read_text())
    assert saved["instruction"] == "Name the colour." and saved["seed"] == 11 and saved["lora_r"] == 8
    # a later session with other constants at the top of the file
    monkeypatch.setattr(caption, "instruction", "Write a poem.")
    monkeypatch.setattr(caption, "seed", 3)
    prompts, seeds = [], []
    real_make_batch, real_build = caption.make_batch, caption.build_tiny_model
    monkeypatch.setattr(caption, "make_batch", lambda processor, images, captions=None, text_instruction=None: (
        prompts.append(text_instruction), real_make_batch(processor, images, captions, text_instruction))[1])
    monkeypatch.setattr(caption, "build_tiny_model", lambda model_seed=None: (
        seeds.append(model_seed), real_build(model_seed))[1])
    caption.write_submission(data_dir, out_dir, str(tmp_path / "s.json"))
    assert set(prompts) == {"Name the colour."} and seeds == [11]
    assert "using the adapter's settings: instruction = 'Name the colour.', seed = 11" in capsys.readouterr().out
    assert caption.instruction == "Write a poem." and caption.seed == 3


def test_resuming_with_other_model_settings_names_the_differing_keys(tiny, data_dir, tmp_path, monkeypatch):
    out_dir = str(tmp_path / "out")
    caption.max_minutes = 1e-9       # stop after one step
    caption.train_model(data_dir, out_dir)
    monkeypatch.setattr(caption, "lora_r", 4)
    monkeypatch.setattr(caption, "batch_size", 1)
    with pytest.raises(SystemExit, match=r"^error: .*last was trained with other settings: lora_r = 8 there, 4 now, "
                                         r"batch_size = 2 there, 1 now; use the same values, or another --out_dir$"):
        caption.train_model(data_dir, out_dir)
