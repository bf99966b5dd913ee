"""ddpm.py under the faults that lose work or hand in a wrong file: a crafted or damaged checkpoint, SIGTERM in the
middle of training, an output folder that is missing, a rerun that writes fewer images, and the command line's
constants (edited in the file, a named preset, a checkpoint's own configuration)."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import ddpm
from conftest import ROOT

TINY_FLAGS = ["--channels=8", "--channel_mults=1,2,2", "--num_res_blocks=1", "--attn_resolutions=16",
              "--timesteps=20", "--device=cpu", "--batch_size=2", "--num_threads=1", "--precision=fp32"]


@pytest.fixture
def faces_npy(tmp_path):
    np.save(tmp_path / "faces.npy", np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8))
    return str(tmp_path / "faces.npy")


def run(*args, timeout=300, script="ddpm.py", cwd=ROOT):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def train_tiny(faces_npy, out, *extra):
    result = run("--train", f"--data_dir={faces_npy}", f"--out_dir={out}", *TINY_FLAGS, "--max_steps=2",
                 "--sample_every=1000", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class WritesAMarker:
    """A pickle that, if ever unpickled with weights_only=False, creates a file: code execution from a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", [["--train"], ["--sample", "--n_samples=1", "--sample_steps=2"], ["--denoise_figure"]])
def test_a_crafted_checkpoint_never_runs_code(faces_npy, tmp_path, command):
    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    with open(out / "ckpt.pt", "wb") as f:
        pickle.dump({"model": WritesAMarker(str(marker))}, f)
    result = run(*command, f"--data_dir={faces_npy}", f"--out_dir={out}", *TINY_FLAGS,
                 f"--submission={tmp_path / 's.zip'}")
    assert not marker.exists()
    assert "ckpt.pt is damaged or not a ddpm.py checkpoint" in one_line_error(result)


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "a bare state_dict"])
def test_a_damaged_checkpoint_is_one_line_naming_it(faces_npy, tmp_path, damage):
    out = tmp_path / "out"
    train_tiny(faces_npy, out)
    data = (out / "ckpt.pt").read_bytes()
    if damage == "a bare state_dict":   # loads with weights_only, but holds no step, EMA or configuration
        torch.save(torch.load(out / "ckpt.pt", weights_only=True)["ema"], out / "ckpt.pt")
    else:
        (out / "ckpt.pt").write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello"}[damage])
    for command in (["--train"], ["--sample", "--n_samples=1", f"--submission={tmp_path / 's.zip'}"]):
        message = one_line_error(run(*command, f"--data_dir={faces_npy}", f"--out_dir={out}", *TINY_FLAGS))
        assert str(out / "ckpt.pt") in message and "delete it to start again" in message


def test_a_checkpoint_kept_for_sampling_only_samples_but_does_not_resume(faces_npy, tmp_path):
    """tests/data/ddpm_cpu_hour.pt holds the EMA, the guide and the configuration, no model or optimizer: --sample
    takes it (test_fid_real.py), --train stops with one line naming what is missing."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "ddpm_cpu_hour.pt", out / "ckpt.pt")
    message = one_line_error(run("--train", "--preset=cpu", f"--data_dir={faces_npy}", f"--out_dir={out}",
                                 "--max_steps=1", "--num_threads=1"))
    assert "ckpt.pt is damaged or not a ddpm.py checkpoint (AssertionError: no model, optimizer inside)" in message


def test_sigterm_during_training_saves_the_step_reached(faces_npy, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "ddpm.py", "--train", f"--data_dir={faces_npy}", f"--out_dir={out}",
                                *TINY_FLAGS, "--max_steps=100000", "--ckpt_every=100000", "--log_every=1",
                                "--sample_every=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    logged = 0
    for line in process.stdout:                       # wait until a few steps are done
        if line.startswith("step "):
            logged = int(line.split()[1].split("/")[0])
            if logged >= 3:
                break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "stopped by SIGTERM at step" in stderr
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= logged >= 3                        # ckpt_every is never reached: the signal saved it
    assert f"stopped by SIGTERM at step {step};" in stderr
    resumed = run("--train", f"--data_dir={faces_npy}", f"--out_dir={out}", *TINY_FLAGS, f"--max_steps={step + 1}",
                  "--sample_every=1000")
    assert resumed.returncode == 0 and f"resuming from {out / 'ckpt.pt'} at step {step}" in resumed.stdout


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_sampling_stops_at_once(faces_npy, tmp_path, signal_number):
    """Only training saves and stops after its step. While sampling there is nothing to save: SIGTERM ends the
    process (before, its handler only printed that it would stop, and sampling went on), Ctrl-C is one line."""
    out = tmp_path / "out"
    train_tiny(faces_npy, out)
    process = subprocess.Popen([sys.executable, "-u", "ddpm.py", "--sample", f"--out_dir={out}", *TINY_FLAGS,
                                "--sampler=ddpm", "--n_samples=100000", "--sample_batch=1",
                                f"--submission={tmp_path / 's.zip'}"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                       # wait until sampling runs
        if line.startswith("generated "):
            break
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=30)
    if signal_number == signal.SIGTERM:
        assert process.returncode == -signal.SIGTERM
    else:
        assert process.returncode == 1 and stderr.strip().splitlines()[-1] == "stopped by Ctrl-C", stderr[-2000:]
    assert not (tmp_path / "s.zip").exists()


def test_sampling_to_a_missing_folder_fails_before_the_first_image(faces_npy, tmp_path):
    out = tmp_path / "out"
    train_tiny(faces_npy, out)
    result = run("--sample", f"--out_dir={out}", "--n_samples=50", "--sample_batch=1",
                 f"--submission={tmp_path / 'no' / 'such' / 'folder' / 's.zip'}")
    line = one_line_error(result)
    assert f"cannot write to {tmp_path / 'no' / 'such' / 'folder'}: No such file or directory" in line
    assert "generated" not in result.stdout
    if os.geteuid() != 0:                              # root writes anywhere: the read-only case needs a user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run("--sample", f"--out_dir={out}", "--n_samples=50", f"--submission={locked / 's.zip'}")
        assert "cannot write" in one_line_error(result) and "generated" not in result.stdout


def test_a_rerun_with_fewer_images_leaves_no_old_ones_and_a_whole_zip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    folder, archive = str(tmp_path / "images"), str(tmp_path / "submission.zip")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("mine")          # not a numbered image: kept
    ddpm.write_submission(images, folder, archive)
    ddpm.write_submission(images[:3], folder, archive)
    assert sorted(os.listdir(folder)) == ["1.jpg", "2.jpg", "3.jpg", "notes.txt"]
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert not os.path.exists(archive + ".tmp")


def test_a_killed_write_keeps_the_previous_zip(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    folder, archive = str(tmp_path / "images"), str(tmp_path / "submission.zip")
    ddpm.write_submission(images, folder, archive)
    before = open(archive, "rb").read()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ddpm.Image, "fromarray", killed)
    with pytest.raises(KeyboardInterrupt):
        ddpm.write_submission(images[:2], folder, archive)
    assert open(archive, "rb").read() == before and zipfile.ZipFile(archive).testzip() is None


def test_an_unwritable_out_dir_fails_before_training(faces_npy, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    result = run("--train", f"--data_dir={faces_npy}", f"--out_dir={blocker / 'out'}", *TINY_FLAGS)
    assert "cannot write" in one_line_error(result)


# ----------------------------------------------------------------------------- the constants rule (issue 13)
def test_an_edited_constant_is_what_runs(faces_npy, tmp_path):
    """Edit `channels = 128` to 16 in a copy of ddpm.py and run it: the model has width 16 (no preset replaces it)."""
    source = open(ROOT / "ddpm.py").read()
    assert "\nchannels = 128 " in source
    (tmp_path / "ddpm.py").write_text(source.replace("\nchannels = 128 ", "\nchannels = 16 ", 1))
    (tmp_path / "fid.py").write_text(open(ROOT / "fid.py").read())
    flags = [f for f in TINY_FLAGS if not f.startswith("--channels=")]
    result = run("--train", f"--data_dir={faces_npy}", f"--out_dir={tmp_path / 'out'}", *flags, "--max_steps=1",
                 "--sample_every=1000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["config"]["channels"] == 16 and checkpoint["model"]["conv_in.weight"].shape[0] == 16


def test_the_cpu_preset_applies_only_when_named_and_overrides_win(faces_npy, tmp_path):
    plain = run("--bench", "--help")
    assert "channels = 128" in plain.stdout                                # the constants as written
    named = run("--preset=cpu", "--help")
    assert "preset cpu: channels = 64" in named.stdout and "\n  channels = 64 " in named.stdout
    both = run("--preset=cpu", "--channels=16", "--help")                 # the preset first, then the flags
    assert "overriding: channels = 16" in both.stdout and "\n  channels = 16 " in both.stdout


def test_sample_uses_the_checkpoint_configuration_not_the_constants(faces_npy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train_tiny(faces_npy, out)                                              # channels 8, T = 20
    before = {k: getattr(ddpm, k) for k in ("channels", "timesteps", "channel_mults")}
    model, diffusion = ddpm.load_ema(str(out), "cpu")
    assert model.channels == 8 and diffusion.timesteps == 20
    assert {k: getattr(ddpm, k) for k in before} == before                 # module constants untouched


def test_resuming_with_another_configuration_names_the_keys(faces_npy, tmp_path):
    out = tmp_path / "out"
    train_tiny(faces_npy, out)
    flags = [f if not f.startswith("--channels=") else "--channels=16" for f in TINY_FLAGS]
    message = one_line_error(run("--train", f"--data_dir={faces_npy}", f"--out_dir={out}", *flags, "--dropout=0.2"))
    assert "channels = 8 there, 16 now" in message and "dropout = 0.1 there, 0.2 now" in message
