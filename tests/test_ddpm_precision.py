"""ddpm.py's GPU paths, exercised on the CPU: the precision policy for mocked GPUs and CPUs, the PyTorch-build check
for mocked arch lists, fp16 autocast + GradScaler training for real (with a skipped inf-gradient step and an exact
resume), the EMA in eval mode, NaN stops that keep the last good checkpoint, and a 2-process run that stops
together."""
import os
import subprocess
import sys

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

    def build_with_an_inf_gradient(config):
        model, diffusion = build(config)

        def poison(grad):                     # the 2nd backward pass overflows in one weight's gradient
            backward_calls.append(1)
            return grad * float("inf") if len(backward_calls) == 2 else grad
        model.conv_in.weight.register_hook(poison)
        return model, diffusion
    monkeypatch.setattr(ddpm, "build", build_with_an_inf_gradient)
    assert ddpm.train_model(faces_npy, str(tmp_path / "out")) == 4            # training went on to the end
    checkpoint = load(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["scaler"]["scale"] == 65536.0 / 2                        # the scaler halved its scale once
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {3.0}                                                 # 4 steps, 1 skipped by the scaler
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_fp16_resume_with_scaler_state_is_bit_identical(tiny, faces_npy, tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm, "precision", "fp16")
    monkeypatch.setattr(ddpm, "max_steps", 5)
    assert ddpm.train_model(faces_npy, str(tmp_path / "straight")) == 5
    monkeypatch.setattr(ddpm, "max_minutes", 1e-9)                 # out of time after every step
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed")) == 1
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed")) == 2
    monkeypatch.setattr(ddpm, "max_minutes", 0.0)
    assert ddpm.train_model(faces_npy, str(tmp_path / "resumed")) == 5
    a, b = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    for part in ("model", "ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    rows = open(tmp_path / "resumed" / "loss.csv").read().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]           # no duplicate rows after resuming


def test_bf16_autocast_training_runs_and_resumes_on_the_cpu(tiny, faces_npy, tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm, "precision", "bf16")
    assert ddpm.train_model(faces_npy, str(tmp_path / "a")) == 4
    assert ddpm.train_model(faces_npy, str(tmp_path / "b")) == 4
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])     # same command, same weights


def test_ema_samples_in_eval_mode_so_same_seed_grids_are_identical(tiny, faces_npy, tmp_path, monkeypatch):
    """dropout 0.1: a grid sampled twice with the same seed during training must be the same picture."""
    monkeypatch.setattr(ddpm, "sample_every", 2)
    grids, original = [], ddpm.Diffusion.ddim_sample

    def sample_twice(self, model, shape, generator, **options):
        first, kept = original(self, model, shape, torch.Generator().manual_seed(7), **options)
        second, _ = original(self, model, shape, torch.Generator().manual_seed(7), **options)
        grids.append((model.training, torch.equal(first, second)))
        return first, kept
    monkeypatch.setattr(ddpm.Diffusion, "ddim_sample", sample_twice)
    ddpm.train_model(faces_npy, str(tmp_path / "out"))
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
    all-reduced, so both ranks leave the loop at the same step and exit 0."""
    port = 29540 + (precision == "fp16")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "ddpm.py", "--train", f"--data_dir={faces_npy}",
                             f"--out_dir={tmp_path / 'out'}", *TINY_FLAGS, "--sample_every=1", "--max_minutes=0.05",
                             f"--precision={precision}", "--log_every=1"],
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
