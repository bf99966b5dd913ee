"""
Denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020, "DDPM") on 64x64 CelebA faces (homework part
2-2): noise schedule, UNet, training (Algorithm 1), sampling (Algorithm 2, and DDIM by Song et al. 2021), a
figure of 5 images being denoised, and 1,000 samples 1.jpg..1000.jpg zipped flat into submission.zip.

    python ddpm.py --train --data_dir=data/celeba --out_dir=out/ddpm          # the model below, for a GPU
    python ddpm.py --train --preset=cpu --max_minutes=60                      # a small model for a 2-core CPU,
    python ddpm.py --sample --preset=cpu                                      # and its 1,000 samples in ~13 min
    python ddpm.py --sample --out_dir=out/ddpm --n_samples=1000 --submission=submission.zip
    python ddpm.py --denoise_figure --out_dir=out/ddpm                        # out_dir/denoising.png
    python ddpm.py --sample ... --run_fid --fid_ref=data/celeba               # + FID and KID (fid.py)
    torchrun --nproc_per_node=2 ddpm.py --train ...                           # DDP, as nanoGPT does it

Training keeps out_dir/ckpt.pt (model, EMA, optimizer, gradient scaler, step, configuration; written
atomically), samples_<step>.png grids, loss.csv and loss.png. Run the same --train command again to resume;
Ctrl-C or SIGTERM saves a checkpoint first. python ddpm.py --help lists every constant below.
"""
import copy
import io
import math
import os
import shutil
import re
import signal
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fid import FIDInputError, list_images, parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
# what to do
train = False           # Algorithm 1 on data_dir
sample = False          # n_samples samples with the EMA weights -> images_dir and submission
denoise_figure = False  # out_dir/denoising.png: 5 images from x_T to x_0
bench = False           # images/s of training steps on random images, in each precision (no data needed)
data_dir = "data/celeba"  # a folder of images, a .zip, or a uint8 .npy of shape (N, 64, 64, 3)
out_dir = "out/ddpm"
preset = ""             # "cpu": the small model of CPU_PRESET below, applied before the other overrides
# forward process
timesteps = 1000        # T
schedule = "linear"     # "linear" (Ho et al. 4: 1e-4..0.02) or "cosine" (Nichol & Dhariwal 2021, eq. 17)
beta_start = 1e-4
beta_end = 0.02
# UNet: the CelebA-64 model of the DDIM paper (Song et al. 2021, appendix D.1), 78.7 M parameters
channels = 128          # base width
channel_mults = "1,2,2,2,4"  # width multiplier per resolution level: 64, 32, 16, 8, 4
num_res_blocks = 2      # residual blocks per level
attn_resolutions = "16"  # self-attention at these feature-map sizes
dropout = 0.1
norm_groups = 32        # GroupNorm groups (fewer where the width is not a multiple)
# training
batch_size = 64
lr = 2e-4
warmup_steps = 1000     # linear learning-rate warmup (Ho et al. use 5000)
grad_clip = 1.0
min_snr_gamma = 0.0     # > 0: Min-SNR-gamma loss weights (Hang et al. 2023; they use 5); 0 = L_simple, as Ho et al.
ema_decay = 0.9999      # EMA of the weights, used for sampling (Ho et al.: 0.9999 over 800k steps)
max_steps = 500000
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this long; 0 = no limit
log_every = 50
sample_every = 5000     # steps between sample grids (DDIM, 50 steps)
ckpt_every = 500
seed = 1337
device = ""             # "" = cuda if available, else cpu
precision = "auto"      # auto | bf16 | fp16 | fp32: auto = bf16 where native (GPU capability >= 8.0, AMX/AVX512-BF16 CPUs), fp16 + gradient scaler on older GPUs, else fp32
compile = False         # torch.compile the UNet (CUDA capability >= 7.0, where Triton runs)
channels_last = False   # NHWC memory layout for the convolutions (--bench measures both)
num_threads = 2         # CPU threads per process
# sampling
n_samples = 1000        # images to generate
sampler = "ddim"        # "ddpm" (Algorithm 2, T steps) or "ddim" (ddim_steps, eta)
ddim_steps = 100        # DDIM steps S
eta = 0.0               # DDIM: 0 = deterministic, 1 = DDPM's posterior variance
variance = "beta"       # DDPM sigma_t^2: "beta" (beta_t) or "posterior" (beta~_t); Ho et al. 3.2 found both similar
sample_batch = 100
images_dir = ""         # where 1.jpg..N.jpg go; "" = out_dir/images
submission = "submission.zip"
run_fid = False         # after sampling: FID and KID against fid_ref through fid.py
fid_ref = ""            # a folder, zip or statistics .npz; "" = data_dir
fid_weights = ""        # the FID Inception weights file; "" = torch hub cache, else download (see fid.py)
fid_dims = 2048         # Inception feature size: 2048 is the standard FID (64, 192, 768 for quick looks)
# -----------------------------------------------------------------------------

# --preset=cpu: a small UNet for a 2-core CPU, and how to train and sample it in an hour; each value chosen by
# measurement (README, "The cpu preset": images/s and FD-face of every variant at equal minutes)
CPU_PRESET = dict(channels=32, channel_mults="1,2,2,2", num_res_blocks=1, attn_resolutions="16", dropout=0.0,
                  norm_groups=8, batch_size=32, lr=1e-3, warmup_steps=200, ema_decay=0.999, min_snr_gamma=5.0,
                  sample_every=1000, ddim_steps=50)
IMAGE_SIZE = 64


def _int_list(text):
    return [int(part) for part in text.split(",") if part.strip()]


# values with a fixed set of choices or a range, checked before any work (see parse_overrides)
CHECKS = {
    "preset": ("", "cpu"), "schedule": ("linear", "cosine"), "sampler": ("ddpm", "ddim"),
    "variance": ("beta", "posterior"), "precision": ("auto", "bf16", "fp16", "fp32"),
    "fid_dims": (2048, 768, 192, 64),
    "channel_mults": (lambda v: re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", v), "comma-separated integers >= 1, like 1,2,2,2"),
    "attn_resolutions": (lambda v: re.fullmatch(r"([1-9]\d*(,[1-9]\d*)*)?", v), "comma-separated sizes like 16 (or empty)"),
    **{name: (lambda v: v >= 1, "an integer >= 1") for name in
       ("timesteps", "channels", "num_res_blocks", "norm_groups", "batch_size", "max_steps", "log_every",
        "sample_every", "ckpt_every", "num_threads", "n_samples", "ddim_steps", "sample_batch")},
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"), "max_minutes": (lambda v: v >= 0, "a number >= 0"),
    "lr": (lambda v: v > 0, "a number > 0"), "grad_clip": (lambda v: v > 0, "a number > 0"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"), "ema_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eta": (lambda v: v >= 0, "a number >= 0"), "min_snr_gamma": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "beta_start": (lambda v: 0 < v < 1, "a number in (0, 1)"), "beta_end": (lambda v: 0 < v < 1, "a number in (0, 1)"),
}


# ----------------------------------------------------------------------------- data
def load_images(path):
    """All images of a folder, zip or uint8 .npy as a uint8 tensor (N, 3, 64, 64). A non-64x64 image is
    resized (with a note); an unreadable one is an error naming it (fid.py's reader)."""
    entries = list_images(path)
    if not entries:
        raise FIDInputError(f"{path}: no images found")
    images, resized = [], 0
    for name, load in entries:
        image = load()                                              # float (3, H, W) in [0, 1]
        if image.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            image = F.interpolate(image[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                                  antialias=True, align_corners=False)[0].clamp(0, 1)
            resized += 1
        images.append((image * 255).round().to(torch.uint8))
    if resized:
        print(f"note: {resized} of {len(entries)} images were not {IMAGE_SIZE}x{IMAGE_SIZE} and were resized")
    return torch.stack(images)


def training_batch(images, batch, generator):
    """A random batch scaled to [-1, 1] with random horizontal flips (Ho et al. appendix B), made on the device
    that holds the uint8 images and the generator (on a GPU nothing crosses the bus)."""
    indices = torch.randint(len(images), (batch,), generator=generator, device=generator.device)
    x = images[indices].float() / 127.5 - 1
    flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- device and precision
def default_device():
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively: AMX or AVX512-BF16 in Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(requested, device_type):
    """The autocast precision for `precision` on this device, and why: auto is bf16 where the hardware computes it
    natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16), fp16 with a gradient
    scaler on older GPUs (a T4, 7.5, only emulates bf16: its convolutions then skip cuDNN and the tensor cores),
    and fp32 elsewhere."""
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
        return "fp16", f"CUDA capability {major}.{minor} has no native bfloat16: float16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return "bf16", "this CPU computes bfloat16 natively (AMX or AVX512-BF16)"
    return "fp32", f"no native bfloat16 on this {device_type}"


def check_cuda_build():
    """Stop at once where this PyTorch build has no kernels for the GPU (Kaggle's P100, sm_60, under a build for
    sm_70 and newer), rather than with a CUDA error from deep inside. A cubin sm_XY runs on capability X.y for
    y >= Y; PTX compute_XY is compiled for any capability >= X.Y."""
    major, minor = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()

    def version(arch):  # "sm_86" -> (8, 6), "sm_90a" -> (9, 0), "compute_120" -> (12, 0)
        digits = "".join(char for char in arch.split("_")[-1] if char.isdigit())
        return int(digits[:-1]), int(digits[-1])
    runs = any((arch.startswith("sm_") and version(arch)[0] == major and version(arch)[1] <= minor) or
               (arch.startswith("compute_") and version(arch) <= (major, minor)) for arch in archs)
    if archs and not runs:
        raise SystemExit(f"error: this PyTorch {torch.__version__} has GPU kernels for {' '.join(archs)}, none for "
                         f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a PyTorch build that lists "
                         f"sm_{major}{minor} (see the README, 'On a GPU'), or choose another GPU")


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
run_precision = "fp32"  # set once by use_precision(); the samplers and the training step read it


def use_precision(name):
    """Set the precision that autocast() and model_eps() use from now on."""
    global run_precision
    run_precision = name


def autocast(device_type):
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(run_precision, torch.bfloat16),
                          enabled=run_precision in AUTOCAST_DTYPES)


def model_eps(model, x, t):
    """eps_theta(x_t, t) under the run's precision, returned in float32 for the sampler's arithmetic."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device.type):
        return model(x, t).float()


# ----------------------------------------------------------------------------- forward process, loss and samplers
def make_betas(schedule, timesteps, beta_start=1e-4, beta_end=0.02):
    if schedule == "linear":                      # Ho et al. section 4: linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":                      # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0)
        s = 0.008
        t_over_T = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t_over_T + s) / (1 + s) * math.pi / 2) ** 2
        alphas_bar = f / f[0]
        return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)   # beta_t clipped at 0.999 (their 3.2)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


class Diffusion:
    """The forward process and its posterior, every buffer computed once in float64 (then float32 copies).
    Time steps are 0-based here: t = 0..T-1 stands for the paper's 1..T."""

    def __init__(self, betas):
        self.timesteps = len(betas)
        self.betas = betas                                              # beta_t
        self.alphas = 1 - betas                                         # alpha_t = 1 - beta_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)             # alpha_bar_t = prod_s alpha_s (eq. 4)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=betas.dtype), self.alphas_cumprod[:-1]])
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)                        (eq. 4)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0  (used in eq. 15)
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)                                          (eqs. 6-7)
        # beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t)(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    def to(self, device):
        """Every buffer moved to the device once (they stay float64 there)."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    @staticmethod
    def gather(buffer, t, x):
        """buffer[t] for a batch of steps t, shaped to broadcast over images like x, in x's dtype."""
        return buffer.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4, reparameterised)."""
        return self.gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self.gather(self.posterior_mean_coef1, t, xt) * x0 + self.gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self.gather(self.posterior_variance, t, xt)

    def predict_x0(self, xt, t, eps):
        return self.gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def loss(self, model, x0, generator, min_snr_gamma=0.0):
        """Algorithm 1: t ~ Uniform, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2 (L_simple, eq. 14). t and eps
        come from the generator, on its device. min_snr_gamma > 0 weights each image's error by
        min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR-gamma, Hang et al. 2023, 3.4,
        for eps-prediction): the many nearly clean steps, whose noise is easy to predict but whose gradients
        fight the others', count less, and a short training reaches the same loss in fewer steps."""
        t = torch.randint(self.timesteps, (len(x0),), generator=generator, device=generator.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        error = (model(self.q_sample(x0, t, noise), t).float() - noise).pow(2).mean(dim=(1, 2, 3))   # per image
        if min_snr_gamma > 0:
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            error = error * (snr.clamp(max=min_snr_gamma) / snr).float()
        return error.mean()

    # ------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def ddpm_sample(self, model, shape, generator, variance="beta", record=()):
        """Algorithm 2 (ancestral sampling). Each step predicts x_0 from eps, clips it to [-1, 1] (as Ho et al.'s
        code does), and draws x_{t-1} from the posterior mean with sigma_t^2 = beta_t or beta~_t (section 3.2).
        record: steps t at which to keep x_t (for the denoising figure). Returns x_0 and {t: x_t}."""
        device = next(model.parameters()).device
        x = torch.randn(shape, generator=generator).to(device)
        kept = {self.timesteps: x.cpu()} if self.timesteps in record else {}
        sigma2 = self.betas if variance == "beta" else self.posterior_variance
        for step in reversed(range(self.timesteps)):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0 = self.predict_x0(x, t, model_eps(model, x, t)).clamp(-1, 1)
            mean, _ = self.q_posterior(x0, x, t)
            noise = torch.randn(shape, generator=generator).to(device)
            x = mean + (self.gather(sigma2, t, x).sqrt() * noise if step > 0 else 0)   # no noise at the last step
            if step in record:
                kept[step] = x.cpu()
        return x, kept

    def ddim_step(self, xt, t, t_prev, eps, eta):
        """One DDIM update (Song et al. eq. 12) from step t to t_prev (-1 = the end), with x_0 clipped to [-1, 1].
        sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eq. 16). Returns (mean, sigma)."""
        alpha_bar = self.gather(self.alphas_cumprod, t, xt)
        alpha_bar_prev = self.gather(self.alphas_cumprod, t_prev.clamp(min=0), xt)
        alpha_bar_prev = torch.where(t_prev.view_as(alpha_bar) >= 0, alpha_bar_prev, torch.ones_like(alpha_bar_prev))
        x0 = self.predict_x0(xt, t, eps).clamp(-1, 1)
        eps = (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()     # the eps that goes with the clipped x_0
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        mean = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return mean, sigma

    def ddim_sequence(self, steps):
        """The S time steps DDIM visits: evenly spaced over 0..T-1 (Song et al. 4.2, "linear" tau)."""
        return np.linspace(0, self.timesteps - 1, steps).round().astype(int).tolist()

    @torch.no_grad()
    def ddim_sample(self, model, shape, generator, steps=100, eta=0.0, record=()):
        """DDIM with `steps` evenly spaced steps of the T (eta = 1 and steps = T give Algorithm 2 with beta~_t)."""
        if not 1 <= steps <= self.timesteps:
            raise SystemExit(f"DDIM steps must be between 1 and T={self.timesteps}, got {steps}")
        device = next(model.parameters()).device
        x = torch.randn(shape, generator=generator).to(device)
        sequence = self.ddim_sequence(steps)
        kept = {self.timesteps: x.cpu()} if self.timesteps in record else {}
        for i in reversed(range(len(sequence))):
            t = torch.full((shape[0],), sequence[i], device=device, dtype=torch.long)
            t_prev = torch.full_like(t, sequence[i - 1] if i > 0 else -1)
            mean, sigma = self.ddim_step(x, t, t_prev, model_eps(model, x, t), eta)
            noise = torch.randn(shape, generator=generator).to(device)
            x = mean + sigma * noise if i > 0 else mean
            if sequence[i] in record:
                kept[sequence[i]] = x.cpu()
        return x, kept


# ----------------------------------------------------------------------------- UNet (Ho et al. appendix B)
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step: Ho et al.'s code concatenates [sin | cos] of geometric frequencies from 1 to
    1/10000 (Vaswani et al. 3.5 interleave them instead; the two differ only by a fixed permutation)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels, groups):
    return nn.GroupNorm(math.gcd(groups, channels), channels)   # `groups` (the paper: 32) where the width allows


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the time embedding added; GroupNorm, SiLU, dropout, 3x3 conv; a skip path."""

    def __init__(self, in_channels, out_channels, time_dim, dropout, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels, groups), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = nn.Linear(time_dim, out_channels)
        self.norm2, self.dropout = group_norm(out_channels, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity (the paper's code: init_scale ~ 0)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, time_embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_projection(F.silu(time_embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)   # (b, hw, c) each
        attended = F.scaled_dot_product_attention(q, k, v)            # softmax(q k^T / sqrt(c)) v
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, channels, channel_mults, num_res_blocks, attn_resolutions, dropout, image_size=IMAGE_SIZE,
                 norm_groups=32):
        super().__init__()
        block = lambda c_in, c_out: ResidualBlock(c_in, c_out, 4 * channels, dropout, norm_groups)
        attention = lambda width: SelfAttention(width, norm_groups)
        time_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        # down path: num_res_blocks blocks per level, then a stride-2 conv; every output is kept for a skip
        self.down = nn.ModuleList()
        skip_channels, width, resolution = [channels], channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([block(width, channels * mult)]))
                width = channels * mult
                if resolution in attn_resolutions:
                    self.down[-1].append(attention(width))
                skip_channels.append(width)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skip_channels.append(width)
                resolution //= 2
        self.middle = nn.ModuleList([block(width, width), attention(width), block(width, width)])
        # up path: num_res_blocks + 1 blocks per level, each taking one skip, then nearest upsampling + conv
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([block(width + skip_channels.pop(), channels * mult)]))
                width = channels * mult
                if resolution in attn_resolutions:
                    self.up[-1].append(attention(width))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(width, width, 3, padding=1)]))
                resolution *= 2
        self.norm_out, self.conv_out = group_norm(width, norm_groups), nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t):
        time_embedding = self.time_mlp(timestep_embedding(t, self.channels))

        def run(layers, h):   # one stage: residual blocks also take the step's embedding, the other layers do not
            for layer in layers:
                h = layer(h, time_embedding) if isinstance(layer, ResidualBlock) else layer(h)
            return h
        # the skips are a stack: every down stage pushes its output, every up block pops one (the last pushed
        # first), so each up block meets the down output of its own resolution; up-sampling stages take none
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = run(layers, h)
            skips.append(h)
        h = run(self.middle, h)
        for layers in self.up:
            if isinstance(layers[0], ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = run(layers, h)
        return self.conv_out(F.silu(self.norm_out(h)))


def model_config():
    """The constants that define the model and its diffusion: saved in every checkpoint, and all that --sample
    and --denoise_figure build from (they never read the constants above for it)."""
    return dict(channels=channels, channel_mults=_int_list(channel_mults), num_res_blocks=num_res_blocks,
                attn_resolutions=_int_list(attn_resolutions), dropout=dropout, norm_groups=norm_groups,
                schedule=schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end)


def build(config):
    model = UNet(config["channels"], config["channel_mults"], config["num_res_blocks"], config["attn_resolutions"],
                 config["dropout"], norm_groups=config.get("norm_groups", 32))
    diffusion = Diffusion(make_betas(config["schedule"], config["timesteps"], config["beta_start"], config["beta_end"]))
    return model, diffusion


# ----------------------------------------------------------------------------- checkpoints and output paths
def load_checkpoint(path, map_location):
    """A checkpoint of this script. weights_only=True: tensors, numbers and strings only, so a file from elsewhere
    cannot run code on loading; a damaged file is a one-line error that says what to do."""
    try:
        with warnings.catch_warnings():     # torch warns about a foreign pickle before it refuses it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # truncated, empty, not a checkpoint, or a pickle that asks for code
        previous = f"the previous state may be in {path}.tmp; " if os.path.exists(path + ".tmp") else ""
        raise SystemExit(f"error: {path} is damaged or not a ddpm.py checkpoint ({type(e).__name__}: "
                         f"{(str(e).strip() or 'no data').splitlines()[0][:60]}); {previous}delete it to start again")


def check_writable(folder):
    """Make sure files can be written in folder (creating it) before any long work, not after."""
    folder = folder or "."
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {folder}: {e.strerror}")


def weights_finite(model):
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


# ----------------------------------------------------------------------------- training (Algorithm 1)
def setup_distributed():
    """-> (ddp, rank, world_size, device). Under torchrun (RANK and WORLD_SIZE set, as in nanoGPT) one process per
    GPU with nccl, or several CPU processes with gloo; otherwise one process."""
    run_device = default_device()
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, run_device
    import torch.distributed as dist
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if run_device.startswith("cuda"):
        run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(run_device)
    dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    return True, rank, world_size, run_device


def any_rank(flag, ddp, run_device):
    """True if `flag` is True in any process. Every process gets the same answer, so all stop at the same step
    (one that stopped alone would leave the others waiting for it in the next gradient all-reduce)."""
    if not ddp:
        return flag
    import torch.distributed as dist
    value = torch.tensor([int(flag)], device=run_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what Colab and Kaggle send when a runtime ends) asks the training loop to
    save a checkpoint after the current step and stop; a second Ctrl-C stops at once."""

    def __init__(self):
        self.name = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.name:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\n{self.name}: saving a checkpoint after this step, then stopping", flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class ProgressLog:
    """The mean loss between log lines (summed on the device: the host reads it at log steps only), the progress
    line and loss.csv, which is cut back to the resumed step (the steps after it are trained, and logged, again)."""

    def __init__(self, path, step, run_device, master, deadline):
        self.master, self.deadline, self.start, self.start_step = master, deadline, time.time(), step
        self.loss_sum, self.finite_steps = torch.zeros((), device=run_device), torch.zeros((), device=run_device)
        self.csv = None
        if master:
            rows = open(path).read().splitlines() if os.path.exists(path) else []
            with open(path, "w") as f:
                f.writelines(row + "\n" for row in rows if row and int(row.split(",")[0]) <= step)
            self.csv = open(path, "a")

    def add(self, loss):
        finite = torch.isfinite(loss)     # the fp16 scaler's overflowed steps are not counted
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.finite_steps += finite

    def report(self, step, step_lr, images_per_step):
        """Print and record the mean loss since the last report; -> how many of those steps had a finite loss."""
        count = int(self.finite_steps.item())
        if self.master and count:
            mean, elapsed = self.loss_sum.item() / count, time.time() - self.start
            rate = (step - self.start_step) * images_per_step / elapsed
            left = min((max_steps - step) * images_per_step / rate, self.deadline - time.time())
            print(f"step {step}/{max_steps} loss {mean:.4f} lr {step_lr:.1e} {rate:.1f} images/s, "
                  f"{elapsed / 60:.1f} min so far, about {left / 60:.1f} min left", flush=True)
            self.csv.write(f"{step},{mean:.6f}\n")
            self.csv.flush()
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        return count

    def close(self):
        if self.csv:
            self.csv.close()


def start_or_resume(config, run_device, device_type, ckpt_path):
    """The model, its EMA copy, the optimizer and the gradient scaler for `precision`, resumed from ckpt_path if
    it is there. -> (model, diffusion, ema, optimizer, scaler, step)"""
    torch.manual_seed(seed)
    model, diffusion = build(config)
    model.to(run_device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    diffusion.to(run_device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)     # only ever samples: eval mode, no dropout
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=run_precision == "fp16")   # fp16 only: see choose_precision
    if not os.path.exists(ckpt_path):
        return model, diffusion, ema, optimizer, scaler, 0
    checkpoint = load_checkpoint(ckpt_path, run_device)
    saved = {"norm_groups": 32, **checkpoint["config"]}
    differing = [f"{k} = {saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v]
    if differing:
        raise SystemExit(f"error: {ckpt_path} was trained with another configuration ({'; '.join(differing)}): "
                         f"run with its values, or use another --out_dir")
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint.get("scaler", {}))
    return model, diffusion, ema, optimizer, scaler, checkpoint["step"]


def wrap_for_training(model, ddp, run_device, device_type, master):
    """torch.compile and DistributedDataParallel around the model; the EMA and the checkpoints use the bare one."""
    if compile:
        if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 7:
            model = torch.compile(model)
        elif master:
            print("note: --compile needs a CUDA GPU of capability >= 7.0 (Triton); training in eager mode")
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[run_device] if device_type == "cuda" else None)
    return model


def train_model(data_dir, out_dir):
    ddp, rank, world_size, run_device = setup_distributed()
    device_type, master = run_device.split(":")[0], rank == 0
    check_writable(out_dir)
    if device_type == "cuda":
        check_cuda_build()
        torch.backends.cudnn.benchmark = True       # fixed input shapes: let cuDNN pick its fastest kernels once
    images = load_images(data_dir).to(run_device)   # uint8 on the device: each batch is made there
    chosen, why = choose_precision(precision, device_type)
    use_precision(chosen)
    config, ckpt_path = model_config(), os.path.join(out_dir, "ckpt.pt")
    raw_model, diffusion, ema, optimizer, scaler, step = start_or_resume(config, run_device, device_type, ckpt_path)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        print(f"{len(images)} images from {data_dir}; UNet {n_params / 1e6:.2f} M parameters; {config}; "
              f"batch {batch_size} x {world_size} process(es) on {run_device}")
        print(f"precision: {chosen} ({why})" + (f"; resuming from {ckpt_path} at step {step}" if step else ""))
        if device_type == "cpu" and n_params > 20e6:
            print(f"note: no GPU: this {n_params / 1e6:.0f} M-parameter UNet trains at about 1 image/s on a 2-core CPU "
                  f"(README); --preset=cpu is a small model made for CPUs")
    model = wrap_for_training(raw_model, ddp, run_device, device_type, master)
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())

    def save():   # to a .tmp file, then renamed: an interrupted save never leaves a half-written checkpoint
        torch.save({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "config": config}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    deadline = time.time() + max_minutes * 60 if max_minutes > 0 else float("inf")
    progress = ProgressLog(os.path.join(out_dir, "loss.csv"), step, run_device, master, deadline)
    stop = StopRequest()
    try:
        while step < max_steps:
            # every random draw of a step comes from (seed, step, rank): a resumed run repeats it exactly
            generator = torch.Generator(run_device).manual_seed(seed + step * world_size + rank)
            torch.manual_seed(seed + step * world_size + rank)                  # dropout masks, too
            # set the learning rate for this step: linear warmup, then constant (Ho et al. appendix B)
            step_lr = lr * min(1.0, (step + 1) / max(1, warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            # forward and backward (Algorithm 1); in fp16 the scaler multiplies the loss so that small
            # gradients do not underflow, and skips the update when a gradient overflowed
            x0 = training_batch(images, batch_size, generator)
            if channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with autocast(device_type):
                loss = diffusion.loss(model, x0, generator, min_snr_gamma)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # clip the true (unscaled) gradient, then update
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            # EMA of the weights, its decay rising from 0.1 to ema_decay: min(decay, (1 + n) / (10 + n)), the
            # warm-up of TensorFlow's ExponentialMovingAverage(num_updates) that Ho et al.'s code uses
            torch._foreach_lerp_(ema_params, model_params, 1 - min(ema_decay, (1 + step) / (10 + step)))
            step += 1
            progress.add(loss.detach())
            # log, and stop on a loss that is no longer a number (the scaler's skipped fp16 steps aside)
            if step % log_every == 0 or step == max_steps:
                finite_count = progress.report(step, step_lr, batch_size * world_size)
                if any_rank(finite_count == 0 or not weights_finite(raw_model), ddp, run_device):
                    raise FloatingPointError
            # a grid of EMA samples now and then (save_grid: with the figures at the end of the file)
            if master and step % sample_every == 0:
                grid, _ = diffusion.ddim_sample(ema, (16, 3, IMAGE_SIZE, IMAGE_SIZE),
                                                torch.Generator().manual_seed(seed), steps=min(50, diffusion.timesteps))
                save_grid(grid, os.path.join(out_dir, f"samples_{step:07d}.png"), columns=4)
            # termination conditions, agreed by every process; a checkpoint first
            stopping = any_rank(time.time() > deadline or stop.name is not None, ddp, run_device)
            if step % ckpt_every == 0 or step == max_steps or stopping:
                if not weights_finite(raw_model):    # never overwrite the last good checkpoint with NaN weights
                    raise FloatingPointError         # (every rank sees the same weights: DDP keeps them equal)
                if master:
                    save()
            if stopping:
                break
    except FloatingPointError:
        raise SystemExit(f"error: the loss or the weights stopped being finite numbers (NaN or inf) by step {step}: "
                         f"training stopped; {ckpt_path} keeps the last good state. Try a lower --lr (now {lr:g}) "
                         f"or --precision=fp32")
    finally:
        stop.restore()
        progress.close()
        if master:
            plot_loss(os.path.join(out_dir, "loss.csv"), os.path.join(out_dir, "loss.png"))
        if ddp:
            import torch.distributed as dist
            dist.destroy_process_group()
    if stop.name:
        raise SystemExit(f"stopped by {stop.name} at step {step}; checkpoint saved, run the same command to resume")
    if master and time.time() > deadline:
        print(f"stopped after {max_minutes} minutes at step {step}; checkpoint saved, run the same command to resume")
    return step   # the step reached (the tests compare interrupted and straight runs by it)


# ----------------------------------------------------------------------------- sampling and outputs
def load_ema(out_dir, run_device):
    """The EMA weights of out_dir/ckpt.pt, built from the configuration saved with them (not the constants above),
    ready to sample in this run's precision."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: train first (python ddpm.py --train --out_dir={out_dir})")
    checkpoint = load_checkpoint(path, "cpu")
    model, diffusion = build(checkpoint["config"])
    model.load_state_dict(checkpoint["ema"])
    model.to(run_device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    use_precision(choose_precision(precision, run_device.split(":")[0])[0])
    return model.eval(), diffusion.to(run_device)


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def run_sampler(model, diffusion, shape, generator, record=()):
    """The sampler chosen above (`sampler` is one of the two: CHECKS): Algorithm 2 or DDIM. -> (x_0, {t: x_t})."""
    if sampler == "ddpm":
        return diffusion.ddpm_sample(model, shape, generator, variance, record)
    return diffusion.ddim_sample(model, shape, generator, ddim_steps, eta, record)


def generate(model, diffusion, count, generator):
    """count images in batches of sample_batch, with the sampler chosen above."""
    outputs, start = [], time.time()
    for first in range(0, count, sample_batch):
        shape = (min(sample_batch, count - first), 3, IMAGE_SIZE, IMAGE_SIZE)
        x, _ = run_sampler(model, diffusion, shape, generator)
        outputs.append(to_uint8(x))
        done = first + shape[0]
        print(f"generated {done}/{count}, {done / (time.time() - start):.2f} images/s, "
              f"about {(count - done) / done * (time.time() - start) / 60:.1f} min left", flush=True)
    return np.concatenate(outputs)


def write_submission(images, folder, zip_path):
    """1.jpg..N.jpg (64x64 RGB JPEG) into folder, and the same files at the root of zip_path, nothing else. The zip
    is written beside its place and renamed into it, so a killed run leaves the previous one whole; numbered
    images of an earlier, larger run are removed from folder."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".jpg") and name[:-4].isdigit():
            os.remove(os.path.join(folder, name))
    with zipfile.ZipFile(zip_path + ".tmp", "w", zipfile.ZIP_DEFLATED) as archive:
        for i, array in enumerate(images, 1):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "JPEG", quality=95)
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(buffer.getvalue())
            archive.writestr(f"{i}.jpg", buffer.getvalue())
    os.replace(zip_path + ".tmp", zip_path)


def sample_command(out_dir):
    run_device = default_device()
    folder = images_dir or os.path.join(out_dir, "images")
    # every output path checked before the first image is generated
    if not os.path.isdir(os.path.dirname(os.path.abspath(submission))):
        raise SystemExit(f"error: the folder of --submission={submission} does not exist")
    check_writable(os.path.dirname(os.path.abspath(submission)))
    check_writable(folder)
    if run_fid and not os.path.exists(fid_ref or data_dir):
        raise SystemExit(f"error: --fid_ref={fid_ref or data_dir} not found (a folder, zip or statistics .npz)")
    model, diffusion = load_ema(out_dir, run_device)
    if sampler == "ddim" and ddim_steps > diffusion.timesteps:
        raise SystemExit(f"error: --ddim_steps={ddim_steps} is more than the model's T={diffusion.timesteps}")
    start = time.time()
    images = generate(model, diffusion, n_samples, torch.Generator().manual_seed(seed))
    write_submission(images, folder, submission)
    print(f"{n_samples} images ({sampler}, {ddim_steps if sampler == 'ddim' else diffusion.timesteps} steps, "
          f"{run_precision}) in {time.time() - start:.0f} s: {folder}/1.jpg..{n_samples}.jpg and {submission}")
    if run_fid:
        evaluate_fid(submission, fid_ref or data_dir, run_device)


def evaluate_fid(generated, reference, run_device):
    """FID (and KID, unless the reference is a statistics .npz) of the generated images through fid.py. With
    1,000 images FID is biased upwards (see fid.py); KID is not."""
    from fid import extract_features, frechet_distance, kernel_inception_distance, load_inception, path_statistics, statistics
    inception = load_inception(fid_dims, fid_weights, run_device)
    generated_features = extract_features(inception, generated, 50, run_device)
    if reference.endswith(".npz"):
        reference_stats = path_statistics(reference, inception, 50, run_device)
    else:
        reference_features = extract_features(inception, reference, 50, run_device)
        reference_stats = statistics(reference_features)
        kid_mean, kid_std = kernel_inception_distance(generated_features, reference_features, 100, 1000, seed)
        print(f"KID: {kid_mean:.6f} +- {kid_std:.6f}")
    fid_value = frechet_distance(*statistics(generated_features), *reference_stats)
    print(f"FID: {fid_value}")


# =============================================================================================================
# FIGURES AND THE BENCHMARK: the denoising figure of the homework, the sample grids and loss chart that training
# draws (save_grid, plot_loss), and --bench. Above, only train_model and main() call into this part.
# =============================================================================================================
def denoising_figure(out_dir, columns=10):
    """5 images (rows) from x_T to x_0 (columns at evenly spaced steps), with the sampler chosen above."""
    run_device = default_device()
    model, diffusion = load_ema(out_dir, run_device)
    generator = torch.Generator().manual_seed(seed)
    shape = (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    # the steps to show: evenly spaced over the steps the sampler visits, x_T included
    if sampler == "ddpm":
        record = set(np.linspace(0, diffusion.timesteps, columns).round().astype(int).tolist())
    else:
        sequence = diffusion.ddim_sequence(ddim_steps)
        record = {sequence[i] for i in np.linspace(0, ddim_steps - 1, columns - 1).round().astype(int)} | {diffusion.timesteps}
    _, kept = run_sampler(model, diffusion, shape, generator, record)
    order = sorted(kept, reverse=True)                      # x_T first
    label_height, size = 16, IMAGE_SIZE
    figure = Image.new("RGB", (len(order) * (size + 2), 5 * (size + 2) + label_height), "white")
    draw = ImageDraw.Draw(figure)
    for column, t in enumerate(order):
        draw.text((column * (size + 2) + 2, 2), "x_T" if t == diffusion.timesteps else f"t={t}", fill="black")
        for row, array in enumerate(to_uint8(kept[t])):
            figure.paste(Image.fromarray(array), (column * (size + 2), label_height + row * (size + 2)))
    path = os.path.join(out_dir, "denoising.png")
    figure.save(path)
    print(f"denoising figure ({sampler}, columns at t = {order}) in {path}")


def save_grid(x, path, columns=4):
    arrays = to_uint8(x)
    rows = math.ceil(len(arrays) / columns)
    grid = Image.new("RGB", (columns * IMAGE_SIZE, rows * IMAGE_SIZE))
    for i, array in enumerate(arrays):
        grid.paste(Image.fromarray(array), ((i % columns) * IMAGE_SIZE, (i // columns) * IMAGE_SIZE))
    grid.save(path)


def plot_loss(csv_path, png_path, width=640, height=320, margin=50):
    """loss.csv (step, mean loss since the previous line) as a line chart, log-scaled loss."""
    data = np.loadtxt(csv_path, delimiter=",", ndmin=2)
    if len(data) < 2:
        return
    x, y = data[:, 0], np.log10(data[:, 1])
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    px = margin + (x - x.min()) / max(1e-9, x.max() - x.min()) * (width - 2 * margin)
    py = height - margin - (y - y.min()) / max(1e-9, y.max() - y.min()) * (height - 2 * margin)
    draw.rectangle((margin, margin, width - margin, height - margin), outline="black")
    draw.line(list(zip(px.tolist(), py.tolist())), fill=(31, 119, 180), width=2)
    draw.text((margin, 10), "training loss (log scale) per logged step", fill="black")
    draw.text((2, margin - 6), f"{10 ** y.max():.4f}", fill="black")
    draw.text((2, height - margin - 6), f"{10 ** y.min():.4f}", fill="black")
    draw.text((margin, height - margin + 8), f"step {int(x.min())}", fill="black")
    draw.text((width - margin - 70, height - margin + 8), f"step {int(x.max())}", fill="black")
    image.save(png_path)


def run_bench():
    """Training-step throughput of the configured UNet on random images, in each precision this device offers and
    in both memory layouts: forward, backward and Adam, after one warm-up step."""
    run_device = default_device()
    device_type = run_device.split(":")[0]
    precisions = ["fp32", "bf16"] + (["fp16"] if device_type == "cuda" else [])
    for name, layout in [(p, l) for p in precisions for l in (torch.contiguous_format, torch.channels_last)]:
        use_precision(name)
        torch.manual_seed(seed)
        model, diffusion = build(model_config())
        model.to(run_device, memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device_type == "cuda")
        scaler = torch.amp.GradScaler(device_type, enabled=name == "fp16")
        generator = torch.Generator(run_device).manual_seed(seed)
        x0 = (torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, device=run_device) * 2 - 1
              ).contiguous(memory_format=layout)
        timed, start = -1, None
        while timed < 3 or (time.time() - start < 20 and timed < 20):   # >= 3 timed steps, up to 20 s
            if timed == 0:
                if device_type == "cuda":
                    torch.cuda.synchronize()
                start = time.time()
            with autocast(device_type):
                loss = diffusion.loss(model, x0, generator)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            timed += 1
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.time() - start) / timed
        print(f"{'preset ' + preset if preset else 'constants'}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} "
              f"M parameters, batch {batch_size}, {name}, {'channels_last' if layout == torch.channels_last else 'NCHW'}: "
              f"{seconds:.3f} s/step, {batch_size / seconds:.1f} images/s on {run_device} ({num_threads} threads)",
              flush=True)


if __name__ == "__main__":
    # --preset=cpu first (it sets the small model's constants), then every other override on top of it
    preset_flags = [arg for arg in sys.argv[1:] if arg.partition("=")[0] == "--preset"]
    parse_overrides(preset_flags, globals(), {"preset": CHECKS["preset"]})
    if preset == "cpu":
        globals().update(CPU_PRESET)
        print("preset cpu: " + ", ".join(f"{name} = {value!r}" for name, value in CPU_PRESET.items()))
    unexpected = parse_overrides([arg for arg in sys.argv[1:] if arg not in preset_flags], globals(), CHECKS)
    if unexpected:
        sys.exit(f"error: unexpected argument {unexpected[0]!r} (options are --name=value; --help lists them)")
    torch.set_num_threads(num_threads)
    try:
        if train:
            train_model(data_dir, out_dir)
        if sample:
            sample_command(out_dir)
        if denoise_figure:
            denoising_figure(out_dir)
        if bench:
            run_bench()
        if not (train or sample or denoise_figure or bench):
            print(__doc__)
    except (FIDInputError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
