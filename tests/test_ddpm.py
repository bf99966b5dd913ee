"""ddpm.py on CPU: the schedule and posterior against their closed forms, q_sample's moments, DDIM(eta=1, S=T)
against Algorithm 2, seeded sampling, a tiny UNet overfitting, exact resume, the submission zip, the data reader."""
import io
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from conftest import ROOT, real_data_path

TINY_UNET = dict(channels=8, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    model = ddpm.UNet(**TINY_UNET, image_size=16)
    # the output conv starts at zero (eps = 0 everywhere); give it weights so the sampler tests see a real model
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    return model.eval()


# ----------------------------------------------------------------------------- schedule and posterior
def test_linear_schedule_closed_forms():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    betas = diffusion.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    # alpha_bar_t = prod (1 - beta_s); with a linear schedule, log alpha_bar_T ~ -(T/2)(beta_1 + beta_T) to first order
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-12)
    assert math.log(diffusion.alphas_cumprod[-1].item()) == pytest.approx(-500 * (1e-4 + 0.02), rel=0.01)
    assert diffusion.alphas_cumprod[-1].item() < 5e-5                 # x_T is essentially pure noise
    assert torch.allclose(diffusion.sqrt_alphas_cumprod ** 2 + diffusion.sqrt_one_minus_alphas_cumprod ** 2,
                          torch.ones(1000, dtype=torch.float64))


def test_cosine_schedule_follows_nichol_and_dhariwal():
    T, s = 1000, 0.008
    diffusion = ddpm.Diffusion(ddpm.make_betas("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 250, 500, 900):                                   # 0-based index t is the paper's t + 1
        assert diffusion.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert diffusion.betas.max().item() == pytest.approx(0.999)         # clipped at the very end only
    assert (diffusion.betas[:-1] < 0.999).sum() >= 990


def test_posterior_is_the_product_of_gaussians():
    """q(x_{t-1}|x_t, x_0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions add, means weight by precision."""
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    generator = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    mean, var = diffusion.q_posterior(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        alpha, beta = diffusion.alphas[step].item(), diffusion.betas[step].item()
        alpha_bar_prev = diffusion.alphas_cumprod[step - 1].item()
        precision = alpha / beta + 1 / (1 - alpha_bar_prev)
        expected_mean = (math.sqrt(alpha) / beta * xt[i] + math.sqrt(alpha_bar_prev) / (1 - alpha_bar_prev) * x0[i]) / precision
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-9)
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-9, atol=1e-12)
    # at the first step the posterior collapses onto x_0 (alpha_bar_0 = 1: no noise yet)
    mean, var = diffusion.q_posterior(x0, xt, torch.zeros(6, dtype=torch.long))
    assert var.abs().max() == 0
    torch.testing.assert_close(mean, x0)


def test_q_sample_moments_on_a_large_batch():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    generator = torch.Generator().manual_seed(1)
    x0 = torch.full((200000, 1), 0.7)
    for step in (0, 100, 500, 999):
        t = torch.full((len(x0),), step)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
        alpha_bar = diffusion.alphas_cumprod[step].item()
        assert xt.mean().item() == pytest.approx(0.7 * math.sqrt(alpha_bar), abs=0.006)
        assert xt.var().item() == pytest.approx(1 - alpha_bar, abs=0.006 + 0.01 * (1 - alpha_bar))


def test_predict_x0_inverts_q_sample():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(diffusion.predict_x0(diffusion.q_sample(x0, t, noise), t, noise), x0, atol=2e-3, rtol=0)


def test_ddim_step_with_eta_1_is_the_ddpm_posterior():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    generator = torch.Generator().manual_seed(2)
    xt = torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 50, 400, 800, 999])
    x0 = diffusion.predict_x0(xt, t, eps).clamp(-1, 1)
    mean, sigma = diffusion.ddim_step(xt, t, t - 1, x0, eta=1.0)
    expected_mean, expected_var = diffusion.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean, expected_mean, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(sigma ** 2, expected_var.expand_as(sigma), atol=1e-12, rtol=1e-9)
    _, sigma0 = diffusion.ddim_step(xt, t, t - 1, x0, eta=0.0)
    assert sigma0.abs().max() == 0                                      # eta = 0: deterministic


def test_ddim_eta_1_all_steps_samples_like_algorithm_2():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 40, 1e-3, 0.2))
    model = tiny_unet()
    ancestral, _ = diffusion.sample(model, (3, 3, 16, 16), torch.Generator().manual_seed(5), "ddpm",
                                    variance="posterior")
    ddim, _ = diffusion.sample(model, (3, 3, 16, 16), torch.Generator().manual_seed(5), "ddim", steps=40, eta=1.0)
    torch.testing.assert_close(ddim, ancestral, atol=1e-4, rtol=0)
    other, _ = diffusion.sample(model, (3, 3, 16, 16), torch.Generator().manual_seed(5), "ddpm", variance="beta")
    assert not torch.allclose(other, ancestral, atol=1e-3)              # the variance choice matters


def test_same_seed_same_samples_and_recorded_steps():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 30))
    model = tiny_unet()
    a, kept = diffusion.sample(model, (2, 3, 16, 16), torch.Generator().manual_seed(9), "ddim", steps=10, eta=0.5,
                               record={30, 29, 0})
    b, _ = diffusion.sample(model, (2, 3, 16, 16), torch.Generator().manual_seed(9), "ddim", steps=10, eta=0.5)
    c, _ = diffusion.sample(model, (2, 3, 16, 16), torch.Generator().manual_seed(10), "ddim", steps=10, eta=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert sorted(kept) == [0, 29, 30] and torch.equal(kept[0], a)


# ----------------------------------------------------------------------------- UNet
def test_timestep_embedding_closed_form():
    embedding = ddpm.timestep_embedding(torch.tensor([0, 7]), 8)
    frequencies = [10000 ** (-i / 3) for i in range(4)]
    expected = [[math.sin(7 * f) for f in frequencies] + [math.cos(7 * f) for f in frequencies]]
    torch.testing.assert_close(embedding[1:], torch.tensor(expected), atol=1e-6, rtol=0)
    assert embedding[0].tolist() == [0.0] * 4 + [1.0] * 4


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_presets_build_a_unet_of_the_right_shape(preset):
    """gpu: the constants as written at the top of ddpm.py; cpu: CPU_PRESET."""
    config = dict(ddpm.CPU_PRESET) if preset == "cpu" else {k: getattr(ddpm, k) for k in ddpm.CPU_PRESET}
    model = ddpm.UNet(config["channels"], [int(m) for m in config["channel_mults"].split(",")],
                      config["num_res_blocks"], [16], config["dropout"], patch_size=config["patch_size"])
    attention = sum(isinstance(m, ddpm.SelfAttention) for m in model.modules())
    levels = len(config["channel_mults"].split(","))
    # attention at 16x16 only: one per block there going down and up, plus the middle one
    assert attention == config["num_res_blocks"] + (config["num_res_blocks"] + 1) + 1
    assert levels >= 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x, torch.tensor([10])).shape == (1, 3, 64, 64)
    if preset == "gpu":
        assert 30e6 < sum(p.numel() for p in model.parameters()) < 120e6


def test_patch_unet_works_at_32x32_and_gives_back_64x64():
    """--patch_size=2 (Hoogeboom et al. 2023): pixel unshuffle to 32x32x12, so the levels are 32, 16, 8 and the
    attention at 16 sits one level down; the output is shuffled back to 64x64 pixels."""
    model = ddpm.UNet(16, [1, 2, 2], 1, [16], 0.0, norm_groups=8, patch_size=2)
    assert model.conv_in.in_channels == 12 and model.conv_out.out_channels == 12
    sizes = []
    model.down[0][0].register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[-1]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), torch.tensor([3, 700]))
    assert out.shape == (2, 3, 64, 64) and sizes == [32]                   # the first level is 32x32
    assert sum(isinstance(m, ddpm.SelfAttention) for m in model.modules()) == 1 + 2 + 1   # down, up, middle at 16


def test_tiny_unet_overfits_a_handful_of_images():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    torch.manual_seed(0)
    model = ddpm.UNet(16, [1, 2], 1, [8], 0.0, image_size=16)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    fixed = torch.Generator().manual_seed(3)
    t_eval = torch.randint(1000, (64,), generator=fixed)
    noise_eval = torch.randn(64, 3, 16, 16, generator=fixed)
    x_eval = images.repeat(16, 1, 1, 1)

    def eval_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(diffusion.q_sample(x_eval, t_eval, noise_eval), t_eval), noise_eval).item()

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(4)
    for _ in range(200):
        loss = diffusion.loss(model, images.repeat(4, 1, 1, 1), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before == pytest.approx(1.0, abs=0.05)            # zero-initialised output: eps_theta = 0 at the start
    assert eval_loss() < 0.25 * before


# ----------------------------------------------------------------------------- training, resume, outputs
@pytest.fixture
def tiny_config(monkeypatch):
    settings = dict(channels=8, channel_mults="1,2,2", num_res_blocks=1, attn_resolutions="16", dropout=0.1,
                    batch_size=4, warmup_steps=2, max_steps=5, log_every=1, sample_every=4, ckpt_every=100,
                    max_minutes=0.0, timesteps=10, device="cpu", seed=0, sample_batch=3, precision="fp32")
    for name, value in settings.items():
        monkeypatch.setattr(ddpm, name, value)


@pytest.fixture
def faces_npy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "faces.npy", images)
    return str(tmp_path / "faces.npy")


@pytest.mark.parametrize("t_sampling", ["uniform", "sqrt_weight"])
def test_resume_continues_exactly(tiny_config, faces_npy, tmp_path, monkeypatch, t_sampling):
    if t_sampling == "sqrt_weight":                          # the cpu preset's draws of t, from the same generator
        monkeypatch.setattr(ddpm, "t_sampling", t_sampling)
        monkeypatch.setattr(ddpm, "min_snr_gamma", 5.0)
    monkeypatch.setattr(ddpm, "guide_step", 2)               # kept by the run that stops at step 2, then resumed
    straight = str(tmp_path / "straight")
    assert ddpm.train_model(faces_npy, straight, ddpm.setup_system()) == 5
    interrupted = str(tmp_path / "interrupted")
    ddpm.max_minutes = 1e-9                                  # out of time after every step
    assert ddpm.train_model(faces_npy, interrupted, ddpm.setup_system()) == 1
    assert ddpm.train_model(faces_npy, interrupted, ddpm.setup_system()) == 2
    ddpm.max_minutes = 0.0
    assert ddpm.train_model(faces_npy, interrupted, ddpm.setup_system()) == 5
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(interrupted, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 5
    for part in ("model", "ema", "guide"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    assert os.path.exists(os.path.join(straight, "samples_0000004.png"))
    assert os.path.exists(os.path.join(straight, "loss.png"))


def test_training_passes_the_presets_t_sampling_to_the_loss(tiny_config, faces_npy, tmp_path, monkeypatch):
    """--preset=cpu draws t by sqrt(Min-SNR weight): train_model hands its min_snr_gamma and t_sampling to
    Diffusion.loss at every step (a dropped argument would train the preset with uniform t, silently)."""
    for name in ("min_snr_gamma", "t_sampling", "max_steps"):
        monkeypatch.setattr(ddpm, name, {**ddpm.CPU_PRESET, "max_steps": 2}[name])
    calls, loss = [], ddpm.Diffusion.loss
    monkeypatch.setattr(ddpm.Diffusion, "loss", lambda self, *args: calls.append(args[3:]) or loss(self, *args))
    assert ddpm.train_model(faces_npy, str(tmp_path / "out"), ddpm.setup_system()) == 2
    assert calls == [(5.0, "sqrt_weight")] * 2
    with pytest.raises(ValueError, match="t_sampling"):
        loss(ddpm.Diffusion(ddpm.make_betas("linear", 10)), None, torch.zeros(1, 3, 8, 8), torch.Generator(), 5.0,
             "sqrt")                                          # not a choice: an error, not uniform t in silence


def test_autoguidance_moves_the_output_away_from_the_guide():
    """D_w = D_guide + w (D - D_guide) at the guided steps, D itself elsewhere, and w = 1 is no guidance."""
    model, guide = tiny_unet(0), tiny_unet(1)
    x, inside, outside = torch.randn(2, 3, 16, 16), torch.full((2,), 5), torch.full((2,), 9)
    guided = ddpm.Autoguided(model, guide, 2.5, (3, 7))
    with torch.no_grad():
        expected = guide(x, inside) + 2.5 * (model(x, inside) - guide(x, inside))
        assert not torch.allclose(expected, model(x, inside), atol=1e-3)      # the two models differ
        assert torch.allclose(guided(x, inside), expected, atol=1e-5)
        assert torch.equal(guided(x, outside), model(x, outside))
        assert torch.equal(ddpm.Autoguided(model, guide, 1.0, (0, 9))(x, inside), model(x, inside))


def test_training_keeps_the_ema_of_guide_step_and_sampling_uses_it(tiny_config, faces_npy, tmp_path, monkeypatch,
                                                                     capsys):
    """The guide in the checkpoint is the EMA of step guide_step (that of a run stopped there), none with
    guide_step = 0; sampling with --guidance > 1 wraps the EMA in Autoguided, and says so where no guide was kept."""
    monkeypatch.setattr(ddpm, "guide_step", 2)
    monkeypatch.setattr(ddpm, "max_steps", 2)
    assert ddpm.train_model(faces_npy, str(tmp_path / "two"), ddpm.setup_system()) == 2
    monkeypatch.setattr(ddpm, "max_steps", 3)
    assert ddpm.train_model(faces_npy, str(tmp_path / "three"), ddpm.setup_system()) == 3
    monkeypatch.setattr(ddpm, "guide_step", 0)
    assert ddpm.train_model(faces_npy, str(tmp_path / "none"), ddpm.setup_system()) == 3
    two, three = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("two", "three"))
    assert all(torch.equal(two["ema"][name], three["guide"][name]) for name in two["ema"])
    assert not all(torch.equal(three["ema"][name], three["guide"][name]) for name in two["ema"])
    assert torch.load(tmp_path / "none" / "ckpt.pt", weights_only=True)["guide"] is None
    monkeypatch.setattr(ddpm, "guidance", 2.0)
    model, _ = ddpm.load_ema(str(tmp_path / "three"), "cpu")
    assert isinstance(model, ddpm.Autoguided) and model.weight == 2.0
    assert all(torch.equal(two["ema"][name], value) for name, value in model.guide.state_dict().items())
    capsys.readouterr()
    model, _ = ddpm.load_ema(str(tmp_path / "none"), "cpu")
    assert isinstance(model, ddpm.UNet) and "keeps no guide" in capsys.readouterr().out


def test_submission_zip_is_flat_1_to_n(tmp_path):
    ramp = np.linspace(0, 255, 64)
    images = np.stack([np.stack([np.add.outer(ramp, ramp * k / 7) / 2, np.tile(ramp, (64, 1)),
                                 np.full((64, 64), 30.0 * k)], -1) for k in range(7)]).round().astype(np.uint8)
    ddpm.write_submission(images, str(tmp_path / "images"), str(tmp_path / "submission.zip"))
    with zipfile.ZipFile(tmp_path / "submission.zip") as archive:
        names = archive.namelist()
        assert sorted(names) == sorted(f"{i}.jpg" for i in range(1, 8))
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
    with Image.open(tmp_path / "images" / "3.jpg") as image:        # JPEG q95 keeps the picture
        assert np.abs(np.asarray(image).astype(int) - images[2]).mean() < 3


def test_command_line_train_sample_and_figure(faces_npy, tmp_path):
    out = tmp_path / "out"
    tiny = ["--channels=8", "--channel_mults=1,2,2", "--num_res_blocks=1", "--attn_resolutions=16",
            "--timesteps=20", "--device=cpu"]
    commands = [
        ["--train", f"--data_dir={faces_npy}", "--max_steps=2", "--batch_size=2", "--sample_every=1000", *tiny],
        ["--sample", "--n_samples=5", "--sampler=ddim", "--sample_steps=4", f"--submission={tmp_path / 's.zip'}", "--sample_batch=2"],
        ["--sample", "--n_samples=3", "--sampler=ddpm", f"--submission={tmp_path / 'd.zip'}"],
        ["--denoise_figure", "--sampler=ddpm"],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "ddpm.py", f"--out_dir={out}", *command], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "s.zip") as archive:
        assert sorted(archive.namelist()) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg"]
    with zipfile.ZipFile(tmp_path / "d.zip") as archive:
        assert sorted(archive.namelist()) == ["1.jpg", "2.jpg", "3.jpg"]
    with Image.open(out / "denoising.png") as figure:
        assert figure.size[1] == 16 + 5 * 66                      # 5 rows of 64x64 images under a label line
        assert figure.size[0] >= 8 * 66


def test_data_reader_resizes_with_a_note_and_names_a_broken_file(tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a.jpg")
    Image.new("RGB", (128, 100), (10, 200, 10)).save(folder / "b.png")
    images = ddpm.load_images(str(folder))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert "1 of 2 images were not 64x64" in capsys.readouterr().out
    assert abs(int(images[1, 1].float().mean()) - 200) <= 2
    (folder / "c.jpg").write_bytes(b"this is not a jpeg")
    result = subprocess.run([sys.executable, "ddpm.py", "--train", f"--data_dir={folder}", f"--out_dir={tmp_path / 'o'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: ") and "c.jpg: cannot read image" in result.stderr.strip()
    assert len(result.stderr.strip().splitlines()) == 1


def test_training_batch_is_scaled_and_flipped():
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    images[..., :32] = 255                                   # left half white
    batch = ddpm.training_batch(images, 200, torch.Generator().manual_seed(0))
    assert batch.min() == -1 and batch.max() == 1
    left_white = (batch[:, 0, 0, 0] == 1).float().mean().item()
    assert 0.35 < left_white < 0.65                          # about half of them flipped


@pytest.mark.slow
def test_reads_the_shared_faces():
    celeba = real_data_path("celeba")
    if celeba is None:
        pytest.skip("DL_DATA not set")
    images = ddpm.load_images(celeba)
    assert images.shape == (10000, 3, 64, 64)
    batch = ddpm.training_batch(images, 8, torch.Generator().manual_seed(0))
    assert -1 <= batch.min() < -0.9 and 0.9 < batch.max() <= 1


def test_two_process_ddp_training_on_cpu(faces_npy, tmp_path):
    options = ["--channels=8", "--channel_mults=1,2,2", "--num_res_blocks=1", "--attn_resolutions=16",
               "--timesteps=20", "--device=cpu", "--max_steps=3", "--batch_size=2", "--sample_every=1000",
               "--num_threads=1"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                             "ddpm.py", "--train", f"--data_dir={faces_npy}", f"--out_dir={tmp_path / 'out'}", *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 3
    assert "batch 2 x 2 process(es)" in result.stdout and result.stdout.count("step 3/3") == 1   # rank 0 logs


def test_sample_with_fid_and_kid_through_fid_py(faces_npy, tmp_path):
    """The evaluation path with random Inception weights of the real file's layout (the real ones cannot be
    downloaded here): FID and KID of 4 samples against 5 training images, equal to fid.py's own answer."""
    import fid
    from test_fid import random_weights_float32
    reference = str(tmp_path / "reference.npy")
    np.save(reference, np.load(faces_npy)[:5])
    torch.save(random_weights_float32(), tmp_path / "inception.pth")
    out = tmp_path / "out"
    tiny = ["--channels=8", "--channel_mults=1,2,2", "--num_res_blocks=1", "--attn_resolutions=16", "--timesteps=10",
            "--device=cpu"]
    for command in (["--train", f"--data_dir={faces_npy}", "--max_steps=1", "--batch_size=2", *tiny],
                    ["--sample", "--n_samples=4", "--sample_steps=5", f"--submission={tmp_path / 's.zip'}", "--run_fid",
                     f"--fid_ref={reference}", f"--fid_weights={tmp_path / 'inception.pth'}", "--fid_dims=64"]):
        result = subprocess.run([sys.executable, "ddpm.py", f"--out_dir={out}", *command], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("KID: ") and lines[-1].startswith("FID: ")
    expected = fid.compute_fid(str(tmp_path / "s.zip"), reference, device="cpu", dims=64,
                               weights=str(tmp_path / "inception.pth"))
    assert float(lines[-1].split()[1]) == pytest.approx(expected, rel=1e-6) and expected > 0
    assert float(lines[-2].split()[1]) != 0


class OracleEps(torch.nn.Module):
    """The exact noise predictor for a data set of one image x0: eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t).
    With it, every sampler must land on x0: a check of the samplers that needs no training. With prediction="v" it
    outputs v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 instead, for a Diffusion that expects v."""

    def __init__(self, diffusion, x0, prediction="eps"):
        super().__init__()
        self.diffusion, self.x0, self.prediction = diffusion, x0, prediction
        self.unused = torch.nn.Parameter(torch.zeros(1))   # the samplers read the device from the parameters

    def forward(self, x, t):
        alpha_bar = self.diffusion.gather(self.diffusion.alphas_cumprod, t, x)
        eps = (x - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()
        return eps if self.prediction == "eps" else alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * self.x0


@pytest.mark.parametrize("sampler, options", [("ddpm", {"variance": "beta"}), ("ddpm", {"variance": "posterior"}),
                                              ("ddim", {"steps": 50, "eta": 0.0}), ("ddim", {"steps": 20, "eta": 1.0}),
                                              ("dpm", {"steps": 20}), ("dpm", {"steps": 5}),
                                              ("ddpm v", {"variance": "beta"}), ("dpm v", {"steps": 20})])
def test_samplers_land_on_the_data_with_the_exact_noise_predictor(sampler, options):
    sampler, _, prediction = sampler.partition(" ")
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000), prediction or "eps")
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    oracle = OracleEps(diffusion, x0, prediction or "eps")
    x, kept = diffusion.sample(oracle, x0.shape, torch.Generator().manual_seed(1), sampler, record=set(range(1001)),
                               **options)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)
    # half-way, x_t is the data plus noise of the forward process' size: std sqrt(1 - alpha_bar_t)
    middle = sorted(kept)[len(kept) // 2]
    residual = kept[middle] - diffusion.sqrt_alphas_cumprod[middle].float() * x0
    assert residual.std().item() == pytest.approx(diffusion.sqrt_one_minus_alphas_cumprod[middle].item(), rel=0.2)


class GaussianEps(torch.nn.Module):
    """The exact noise predictor for data ~ N(0, s^2 I): x_t ~ N(0, v_t I) with v_t = alpha_bar_t s^2 + 1 - alpha_bar_t,
    and E[eps | x_t] = sqrt(1 - alpha_bar_t) x_t / v_t. Its probability-flow ODE (what DDIM and DPM-Solver solve) is
    linear, so the exact end point of x_T is known: x_0 = x_T s / sqrt(v_T)."""

    def __init__(self, diffusion, s):
        super().__init__()
        self.diffusion, self.s = diffusion, s
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        alpha_bar = self.diffusion.gather(self.diffusion.alphas_cumprod, t, x)
        return (1 - alpha_bar).sqrt() * x / (alpha_bar * self.s ** 2 + 1 - alpha_bar)


def test_dpm_solver_is_second_order_on_the_gaussian_ode():
    """DPM-Solver++(2M) (Lu et al. 2022) against the exact ODE solution: 10x closer than DDIM (first order) at the
    same number of steps, and its error falls over 3x when the steps double (second order: 4x), DDIM's about 2x."""
    diffusion, s = ddpm.Diffusion(ddpm.make_betas("linear", 1000)), 0.2   # s = 0.2: x_0 stays inside the clip
    model = GaussianEps(diffusion, s)
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).double()   # what the samplers draw
    exact = x_T * s / (diffusion.alphas_cumprod[-1] * s ** 2 + 1 - diffusion.alphas_cumprod[-1]).sqrt()
    errors = {}
    for name in ("ddim", "dpm"):
        for steps in (20, 40):
            x, _ = diffusion.sample(model, x_T.shape, torch.Generator().manual_seed(0), name, steps=steps)
            errors[name, steps] = (x.double() - exact).abs().max().item()
    assert errors["dpm", 20] < errors["ddim", 20] / 10
    assert errors["dpm", 20] / errors["dpm", 40] > 3 and errors["ddim", 20] / errors["ddim", 40] < 2.5


def test_dpm_sequence_is_even_in_log_snr():
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    sequence = diffusion.sequence("dpm", 20)
    assert sequence[0] == 0 and sequence[-1] == 999 and len(sequence) == 20
    steps = diffusion.log_snr[sequence].diff().abs()
    assert steps.max() / steps.min() < 1.5          # the t are whole numbers: h is even to rounding
    assert len(diffusion.sequence("dpm", 200)) < 200   # near t = 0 steps round to the same t and are visited once


def test_one_step_samplers_start_from_pure_noise_at_t_minus_1():
    """With --sample_steps=1 the one UNet call is at t = T-1 (x_T is noise there), not at t = 0."""
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000))
    assert diffusion.sequence("ddim", 1) == diffusion.sequence("dpm", 1) == [999]
    assert diffusion.sequence("ddim", 2) == [0, 999] and diffusion.sequence("ddim", 3) == [0, 500, 999]


def test_channel_mults_has_at_most_one_level_per_halving_of_the_grid(monkeypatch):
    check, _ = ddpm.CHECKS["channel_mults"]
    assert check("1,1,1,1,1,1,1") and not check("1,1,1,1,1,1,1,1")      # 64 -> 1 pixel in 6 halvings
    monkeypatch.setattr(ddpm, "patch_size", 2)
    assert check("1,1,1,1,1,1") and not check("1,1,1,1,1,1,1")          # 32 -> 1 in 5


def test_cut_csv_drops_the_later_and_the_unreadable_rows_whole(tmp_path, capsys):
    """A resumed run cuts loss.csv back to its step. Rows a crash left half-written go, with a note; the file is
    written to loss.csv.tmp and renamed (before, it was rewritten in place and a bad row stopped the resume)."""
    path = tmp_path / "loss.csv"
    path.write_bytes(b"1,0.500000\n2,0.400000\n3\x00\x00\n4,0.300000\n5,nan\n")
    ddpm.cut_csv(str(path), 4)
    assert path.read_text() == "1,0.500000\n2,0.400000\n4,0.300000\n" and not (tmp_path / "loss.csv.tmp").exists()
    assert "1 unreadable row(s) dropped" in capsys.readouterr().out


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_targets_and_min_snr_weights(prediction):
    """Algorithm 1's loss: zero for the exact predictor of a one-image data set (eps, or v = alpha eps - sigma x0);
    for a UNet that outputs zeros, the mean of w_t |target|^2 with the same draws of t and eps, where w_t is 1, or
    Min-SNR-5's min(SNR_t, 5) / SNR_t for eps and min(SNR_t, 5) / (SNR_t + 1) for v (Hang et al. 2023)."""
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000), prediction)
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = OracleEps(diffusion, x0, prediction)
    exact = diffusion.loss(oracle, x0.expand(64, -1, -1, -1), torch.Generator().manual_seed(1))
    assert exact.item() < 1e-8
    zero = lambda x, t: torch.zeros_like(x)
    x0 = x0.expand(256, -1, -1, -1)
    for gamma in (0.0, 5.0):
        loss = diffusion.loss(zero, x0, torch.Generator().manual_seed(2), gamma)
        generator = torch.Generator().manual_seed(2)                    # the loss's own draws, in its order
        t = torch.randint(1000, (256,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        alpha = diffusion.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        sigma = diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        target = noise if prediction == "eps" else alpha * noise - sigma * x0
        snr = (alpha / sigma).flatten() ** 2
        weight = torch.ones(256) if gamma == 0 else snr.clamp(max=5) / (snr if prediction == "eps" else snr + 1)
        expected = (weight * target.pow(2).mean(dim=(1, 2, 3))).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_t_drawn_by_sqrt_weight_keeps_uniform_ts_expected_loss(prediction):
    """t_sampling="sqrt_weight" (the cpu preset's): t ~ p_t = sqrt(w_t) / sum_s sqrt(w_s), each image's error times
    w_t / (T p_t). A model whose error at step t is a known e_t (the exact predictor plus f(t) on every pixel:
    e_t = f(t)^2) shows each piece: the loss is mean_i w_t e_t / (T p_t) over the loss's own draws of t, so its
    expectation is sum_t p_t w_t e_t / (T p_t) = (1/T) sum_t w_t e_t, uniform t's; a batch of 65,536 lands there
    within its spread (for eps without the reweighting it would not); for v, t > 600 (w_t < 0.03, 1 % of the
    weight) is drawn 6.5 % of the time, not 40 %; the same seed draws the same t."""
    diffusion = ddpm.Diffusion(ddpm.make_betas("linear", 1000), prediction)
    x0 = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = OracleEps(diffusion, x0, prediction)
    f = lambda t: 0.1 + t.double() / 1000
    model = lambda x, t: oracle(x, t) + f(t).view(-1, 1, 1, 1).to(x.dtype)
    snr = diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod)
    w = snr.clamp(max=5) / (snr if prediction == "eps" else snr + 1)
    p = w.sqrt() / w.sqrt().sum()
    n, x0 = 65536, x0.expand(65536, -1, -1, -1)
    loss = diffusion.loss(model, x0, torch.Generator().manual_seed(3), 5.0, "sqrt_weight")
    t = torch.multinomial(p.float(), n, replacement=True, generator=torch.Generator().manual_seed(3))
    per_image = w[t] / (1000 * p[t]) * f(t) ** 2
    assert loss.item() == pytest.approx(per_image.mean().item(), rel=1e-4)
    uniform = (w * f(torch.arange(1000)) ** 2).mean().item()            # (1/T) sum_t w_t e_t
    assert abs(loss.item() - uniform) < 4 * per_image.std().item() / n ** 0.5
    if prediction == "v":
        assert w[601:].max() < 0.03 and w[601:].sum() < 0.01 * w.sum()
        assert p[601:].sum().item() == pytest.approx(0.065, abs=0.001)
        assert (t > 600).double().mean().item() == pytest.approx(0.065, abs=0.015)
    again = diffusion.loss(model, x0, torch.Generator().manual_seed(3), 5.0, "sqrt_weight")
    assert again.item() == loss.item()
