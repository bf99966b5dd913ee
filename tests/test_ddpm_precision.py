"""ddpm.py's GPU paths, exercised on the CPU: the precision policy for mocked GPUs and CPUs, the PyTorch-build check
for mocked arch lists, fp16 autocast + GradScaler training for real (with a skipped inf-gradient step and an exact
resume), the EMA in eval mode, NaN stops that keep the last good checkpoint, and a 2-process run that stops
together."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import ddpm
from conftest import ROOT

TINY = dict(channels=8, channel_mults="1,2,2", num_res_blocks=1, attn_resolutions="16", dropout=0.1, batch_size=4,
            warmup_steps=2, max_steps=4, log_every=1, sample_every=1000, ckpt_every=100, max_minutes=0.0,
            timesteps=10, device="cpu", seed=0, sample_batch=3, precision="fp32")
TINY_FLAGS = ["--channels=8", "--channel_mults=1,2,2", "--num_res_blocks=1", "--attn_resolutions=16",
              "--timesteps=20", "--device=cpu", "--batch_size=2", "--num_threads=1"]


@pytest.fixture
def tiny(monkeypatch):
    for name, value in TINY.items():
        monkeypatch.setattr(ddpm, name, value)


@pytest.fixture
def faces_npy(tmp_path):
    np.save(tmp_path / "faces.npy", np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8))
    return str(tmp_path / "faces.npy")


def load(path):
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- the policy
@pytest.mark.parametrize("capability, expected", [((6, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_mocked_gpus(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    chosen, why = ddpm.choose_precision("auto", "cuda")
    assert chosen == expected and f"{capability[0]}.{capability[1]}" in why
    assert ddpm.choose_precision("fp32", "cuda")[0] == "fp32"        # an explicit choice is kept


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpus_with_and_without_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(ddpm, "cpu_has_bf16", lambda: native)
    assert ddpm.choose_precision("auto", "cpu")[0] == expected


def test_cpu_bf16_flag_is_read_from_cpuinfo():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert ddpm.cpu_has_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


@pytest.mark.parametrize("archs, capability, runs", [
    (["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], (6, 0), False),   # Kaggle's P100 under a build for sm_70+
    (["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], (7, 5), True),    # T4
    (["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], (8, 9), True),    # L4 runs the sm_86 cubin
    (["sm_50", "sm_60", "sm_70", "compute_70"], (9, 0), True),        # H100 through the compute_70 PTX
    (["sm_80", "sm_90a"], (7, 5), False),
    (["sm_50", "sm_60", "sm_61"], (6, 0), True),
])
def test_build_without_kernels_for_the_gpu_stops_with_one_line(monkeypatch, archs, capability, runs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mock GPU")
    if runs:
        ddpm.check_cuda_build()
    else:
        with pytest.raises(SystemExit) as stop:
            ddpm.check_cuda_build()
        message = str(stop.value)
        assert message.startswith("error: ") and f"sm_{capability[0]}{capability[1]}" in message
        assert "\n" not in message


# ----------------------------------------------------------------------------- fp16 + GradScaler, for real on the CPU
def test_fp16_training_skips_an_inf_gradient_step_and_continues(tiny, faces_npy, tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm, "precision", "fp16")
    backward_calls = []
    build = ddpm.build

    def build_with_an_inf_gradient(*args):
        model, diffusion = build(*args)

        def poison(grad):                     # the 2nd backward pass overflows in one weight's gradient
            backward_calls.append(1)
            return grad * float("inf") if len(backward_calls) == 2 else grad
        model.conv_in.weight.register_hook(poison)
        return model, diffusion
    monkeypatch.setattr(ddpm, "build", build_with_an_inf_gradient)
    assert ddpm.train_model(faces_npy, str(tmp_path / "out"), ddpm.setup_system()) == 4   # trained on to the end
    checkpoint = load(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["scaler"]["scale"] == 65536.0 / 2                        # the scaler halved its scale once
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {3.0}                                                 # 4 steps, 1 skipped by the scaler
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_fp16_resume_with_scaler_state_is_bit_identical(tiny, faces_npy, tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm, "precision", "fp16")
    monkeypatch.setattr(ddpm, "max_steps", 5)
    assert ddpm.train_model(faces_npy, str(tmp_path / "straight"), ddpm.setup_system()) == 5
    monkeypatch.setattr(ddpm, "max_minutes", 1e-9)                 # out of time after every step
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed"), ddpm.setup_system()) == 1
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed"), ddpm.setup_system()) == 2
    monkeypatch.setattr(ddpm, "max_minutes", 0.0)
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed"), ddpm.setup_system()) == 5
    a, b = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    rows = open(tmp_path / "resumed" / "loss.csv").read().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]           # no duplicate rows after resuming


def test_bf16_autocast_training_runs_and_resumes_on_the_cpu(tiny, faces_npy, tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm, "precision", "bf16")
    assert ddpm.train_model(faces_npy, str(tmp_path / "a"), ddpm.setup_system()) == 4
    assert ddpm.train_model(faces_npy, str(tmp_path / "b"), ddpm.setup_system()) == 4
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])     # same command, same weights


def test_ema_samples_in_eval_mode_so_same_seed_grids_are_identical(tiny, faces_npy, tmp_path, monkeypatch):
    """dropout 0.1: a grid sampled twice with the same seed during training must be the same picture."""
    monkeypatch.setattr(ddpm, "sample_every", 2)
    grids, original = [], ddpm.Diffusion.sample

    def sample_twice(self, model, shape, generator, *options):
        first, kept = original(self, model, shape, torch.Generator().manual_seed(7), *options)
        second, _ = original(self, model, shape, torch.Generator().manual_seed(7), *options)
        grids.append((model.training, torch.equal(first, second)))
        return first, kept
    monkeypatch.setattr(ddpm.Diffusion, "sample", sample_twice)
    ddpm.train_model(faces_npy, str(tmp_path / "out"), ddpm.setup_system())
    assert grids == [(False, True), (False, True)]


# ----------------------------------------------------------------------------- non-finite losses
def test_a_huge_learning_rate_stops_and_keeps_the_last_good_checkpoint(faces_npy, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "ddpm.py", "--train", f"--data_dir={faces_npy}", f"--out_dir={out}", *TINY_FLAGS,
               "--precision=fp32", "--log_every=1", "--sample_every=1000"]
    good = subprocess.run(command + ["--max_steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    before = load(out / "ckpt.pt")
    bad = subprocess.run(command + ["--max_steps=200", "--lr=1e6", "--ckpt_every=1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0
    message = bad.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "NaN" in message and "--lr" in message
    after = load(out / "ckpt.pt")
    assert all(torch.isfinite(v).all() for v in after["model"].values())      # never overwritten with NaN
    assert after["step"] < 200
    if after["step"] == before["step"]:
        assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


# ----------------------------------------------------------------------------- several processes
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_processes_stop_together_on_max_minutes(faces_npy, tmp_path, precision):
    """rank 0 samples a grid every step (rank-only work) and each rank has its own clock: the stop decision is
    all-reduced, so both ranks leave the loop at the same step and exit 0. fp16 runs channels_last: the CPU's fp16
    convolution in NCHW has no fast kernel (aten::_slow_conv2d_forward, 25 times fp32's time), and the grid's 16
    images of 20 steps took 45 s of this test's 53 (docs/results.md)."""
    port = 29540 + (precision == "fp16")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "ddpm.py", "--train", f"--data_dir={faces_npy}",
                             f"--out_dir={tmp_path / 'out'}", *TINY_FLAGS, "--sample_every=1", "--max_minutes=0.05",
                             f"--precision={precision}", "--log_every=1", f"--channels_last={precision == 'fp16'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["step"] >= 1 and "stopped after 0.05 minutes" in result.stdout


def test_bench_measures_each_precision_and_layout(tmp_path):
    result = subprocess.run([sys.executable, "ddpm.py", "--bench", *TINY_FLAGS], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "images/s" in line]
    assert len(lines) == 4
    for expected in ("fp32, NCHW", "fp32, channels_last", "bf16, NCHW", "bf16, channels_last"):
        assert sum(expected in line for line in lines) == 1


@pytest.mark.parametrize("device_type", ["cuda", "mps", "cpu"])
def test_bench_waits_for_the_gpu_before_reading_the_clock(monkeypatch, device_type):
    """CUDA and mps run behind the Python loop: the bench's clock is read after their queued work, on the CPU at
    once. (The two GPU calls are mocked: no GPU here.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    ddpm.synchronize(device_type)
    assert calls == ([] if device_type == "cpu" else [device_type])


# ----------------------------------------------------------------------------- other precisions, GPUs and devices
@pytest.mark.parametrize("first", ["bf16", "fp32"])
def test_a_run_resumes_under_fp16_after_another_precision(tiny, faces_npy, tmp_path, monkeypatch, capsys, first):
    """A run started where auto picks bf16 or fp32 (an A100, a CPU) and resumed where it picks fp16 (a T4): its
    checkpoint has no scaler state, so the scaler starts fresh, with one line saying so, and training goes on."""
    out = tmp_path / "out"
    monkeypatch.setattr(ddpm, "precision", first)
    monkeypatch.setattr(ddpm, "max_steps", 2)
    assert ddpm.train_model(faces_npy, str(out), ddpm.setup_system()) == 2
    before = load(out / "ckpt.pt")
    assert before["scaler"] == {} and before["precision"] == first
    monkeypatch.setattr(ddpm, "precision", "fp16")
    monkeypatch.setattr(ddpm, "max_steps", 4)
    capsys.readouterr()
    assert ddpm.train_model(faces_npy, str(out), ddpm.setup_system()) == 4
    printed = capsys.readouterr().out
    assert f"note: {out / 'ckpt.pt'} was trained in {first}; resuming in fp16" in printed
    assert f"resuming from {out / 'ckpt.pt'} at step 2" in printed
    after = load(out / "ckpt.pt")
    assert after["step"] == 4 and after["precision"] == "fp16" and after["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in after["model"].values())
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in after["model"])   # it trained on
    rows = open(out / "loss.csv").read().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]


def test_an_fp16_run_resumes_under_fp32(tiny, faces_npy, tmp_path, monkeypatch, capsys):
    """The other way: the saved scaler state is not needed (the scaler is off) and does not stop the resume."""
    out = tmp_path / "out"
    monkeypatch.setattr(ddpm, "precision", "fp16")
    monkeypatch.setattr(ddpm, "max_steps", 2)
    assert ddpm.train_model(faces_npy, str(out), ddpm.setup_system()) == 2
    assert load(out / "ckpt.pt")["scaler"]["scale"] > 0
    monkeypatch.setattr(ddpm, "precision", "fp32")
    monkeypatch.setattr(ddpm, "max_steps", 3)
    assert ddpm.train_model(faces_npy, str(out), ddpm.setup_system()) == 3
    assert "was trained in fp16; resuming in fp32" in capsys.readouterr().out
    assert load(out / "ckpt.pt")["scaler"] == {}


def mock_gpu(monkeypatch, capability, archs=("sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)          # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Mock GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability[0] >= 8)   # asked by autocast


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])
def test_bf16_is_never_run_below_capability_8(monkeypatch, capsys, capability):
    mock_gpu(monkeypatch, capability)
    # an explicit --precision=bf16 stops at the start, with one line that names fp16
    monkeypatch.setattr(ddpm, "device", "cuda")
    monkeypatch.setattr(ddpm, "precision", "bf16")
    with pytest.raises(SystemExit) as stop:
        ddpm.setup_system()
    message = str(stop.value)
    assert message.startswith("error: --precision=bf16 needs CUDA capability 8.0") and "--precision=fp16" in message
    assert f"{capability[0]}.{capability[1]}" in message and "\n" not in message
    # auto picks fp16; --bench measures fp32 and fp16 only, with a note
    monkeypatch.setattr(ddpm, "precision", "auto")
    assert ddpm.setup_system()[1] == "fp16"
    capsys.readouterr()
    assert ddpm.bench_precisions("cuda") == ["fp32", "fp16"]
    assert "note: no bf16 on a GPU below CUDA capability 8.0" in capsys.readouterr().out
    # --compile runs in eager mode, with a note
    monkeypatch.setattr(ddpm, "compile", True)
    model = torch.nn.Linear(2, 2)
    assert ddpm.wrap_for_training(model, "cuda", 0) is model
    assert "note: --compile needs a CUDA GPU of capability >= 8.0" in capsys.readouterr().out


def test_bf16_and_compile_from_capability_8(monkeypatch, capsys):
    mock_gpu(monkeypatch, (8, 0))
    assert ddpm.choose_precision("bf16", "cuda") == ("bf16", "asked for")
    assert ddpm.bench_precisions("cuda") == ["fp32", "bf16", "fp16"]
    monkeypatch.setattr(ddpm, "compile", True)
    model = torch.nn.Linear(2, 2)
    assert ddpm.wrap_for_training(model, "cuda", 0) is not model                  # torch.compile wrapped it
    assert "eager" not in capsys.readouterr().out


def test_compile_on_a_cpu_needs_a_cpp_compiler(monkeypatch, capsys):
    """Inductor writes C++ for a CPU: with a compiler on PATH the model is compiled, without one training runs
    eagerly with a note (Windows without Visual Studio's tools, a Mac without Xcode's)."""
    monkeypatch.setattr(ddpm, "compile", True)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(ddpm.shutil, "which", lambda name: "/usr/bin/" + name if name == "clang++" else None)
    assert ddpm.wrap_for_training(model, "cpu", 0) is not model
    assert "eager" not in capsys.readouterr().out
    monkeypatch.setattr(ddpm.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert ddpm.wrap_for_training(model, "cpu", 0) is model
    assert "note: --compile needs a C++ compiler on a CPU" in capsys.readouterr().out
    assert ddpm.wrap_for_training(model, "mps", 0) is model
    assert "note: --compile is not used on mps" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["train", "sample", "denoise_figure", "bench"])
def test_the_cuda_build_check_runs_on_every_gpu_entry_point(monkeypatch, tmp_path, entry):
    """Kaggle's P100 (6.0) under a PyTorch build for sm_70 and newer: every entry point stops in main's
    setup_system, before any work."""
    mock_gpu(monkeypatch, (6, 0), archs=("sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))
    monkeypatch.setattr(ddpm, "device", "")
    monkeypatch.setattr(ddpm, entry, True)                                        # main, as --train etc. run it
    monkeypatch.setattr(ddpm, "data_dir", str(tmp_path / "no_data"))
    monkeypatch.setattr(ddpm, "out_dir", str(tmp_path / "out"))
    with pytest.raises(SystemExit) as stop:
        ddpm.main()
    assert str(stop.value).startswith("error: this PyTorch") and "none for Mock GPU (sm_60)" in str(stop.value)
    assert not (tmp_path / "out").exists()                                        # before any work


def test_device_picks_cuda_then_mps_then_cpu_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(ddpm, "device", "")
    monkeypatch.setattr(ddpm, "precision", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: True, raising=False)   # torch 2.6 asks
    run_device, precision_name, ctx, rank, world_size = ddpm.setup_system()
    assert (run_device, precision_name, rank, world_size) == ("mps", "fp32", 0, 1)   # fp32 on mps
    assert capsys.readouterr().out.strip() == "device mps (no CUDA GPU; Apple's mps); precision fp32 (no native " \
                                               "bfloat16 on this mps)"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert ddpm.setup_system()[0] == "cpu" and "device cpu (no GPU)" in capsys.readouterr().out
    mock_gpu(monkeypatch, (8, 0), archs=("sm_80",))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda *a: True, raising=False)   # torch 2.6 asks
    assert ddpm.setup_system()[:2] == ("cuda", "bf16") and "device cuda (a CUDA GPU)" in capsys.readouterr().out


def test_attention_hands_sdpa_batch_heads_tokens_dim(monkeypatch):
    """The fused attention kernels take (batch, heads, tokens, dim); the result is single-head attention over the
    pixels, as written out by hand here."""
    torch.manual_seed(0)
    attention = ddpm.SelfAttention(16, 8)
    torch.nn.init.normal_(attention.out.weight, std=0.1)
    x = torch.randn(2, 16, 4, 4)
    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: shapes.append(tuple(q.shape)) or sdpa(q, k, v))
    with torch.no_grad():
        y = attention(x)
        q, k, v = attention.qkv(attention.norm(x)).reshape(2, 3, 16, 16).unbind(1)       # (b, c, hw) each
        weights = torch.softmax(q.transpose(1, 2) @ k / 16 ** 0.5, dim=-1)                # (b, hw, hw)
        expected = x + attention.out((v @ weights.transpose(1, 2)).reshape(2, 16, 4, 4))
    assert shapes == [(2, 1, 16, 16)]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_two_process_train_and_sample_writes_one_submission(faces_npy, tmp_path):
    """torchrun --train --sample: both ranks train, only rank 0 samples and writes the zip and the images."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29543", "ddpm.py", "--train", "--sample", f"--data_dir={faces_npy}",
                             f"--out_dir={out}", *TINY_FLAGS, "--max_steps=2", "--sample_every=1000", "--n_samples=3",
                             "--sample_steps=2", f"--submission={tmp_path / 'submission.zip'}", "--precision=fp32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("3 images (ddim, 2 steps") == 1 and result.stdout.count("generated 3/3") == 1
    with zipfile.ZipFile(tmp_path / "submission.zip") as archive:
        assert sorted(archive.namelist()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert sorted(os.listdir(out / "images")) == ["1.jpg", "2.jpg", "3.jpg"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert load(out / "ckpt.pt")["step"] == 2
