"""
Denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020, "DDPM") on 64x64 CelebA faces (homework part
2-2): noise schedule, UNet, training (Algorithm 1), sampling (Algorithm 2, DDIM by Song et al. 2021 and
DPM-Solver++(2M) by Lu et al. 2022, with autoguidance by Karras et al. 2024), a figure of 5 images being denoised,
and 1,000 samples 1.jpg..1000.jpg zipped flat into submission.zip.

    python ddpm.py --train --data_dir=data/celeba --out_dir=out/ddpm          # the model below, for a GPU
    python ddpm.py --train --preset=cpu --max_minutes=60                      # a small model for a 2-core CPU,
    python ddpm.py --sample --preset=cpu                                      # and its 1,000 samples (9 min)
    python ddpm.py --sample --out_dir=out/ddpm --n_samples=1000 --submission=submission.zip
    python ddpm.py --denoise_figure --out_dir=out/ddpm                        # out_dir/denoising.png
    python ddpm.py --sample ... --run_fid --fid_ref=data/celeba               # + FID and KID (fid.py)
    torchrun --nproc_per_node=2 ddpm.py --train ...                           # DDP, as nanoGPT does it

Training keeps out_dir/ckpt.pt (model, EMA, optimizer, gradient scaler, step, configuration, the guide; written
atomically), samples_<step>.png grids, loss.csv and loss.png. Run the same --train command again to resume;
Ctrl-C or SIGTERM saves a checkpoint first. python ddpm.py --help lists every constant below.
"""
import copy
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import fid
from fid import parse_overrides   # the configurator, shared with fid.py

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
prediction = "eps"      # the UNet's output: "eps" (Ho et al.) or "v" = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
# UNet: the CelebA-64 model of the DDIM paper (Song et al. 2021, appendix D.1), 78.7 M parameters
channels = 128          # base width
channel_mults = "1,2,2,2,4"  # width multiplier per resolution level: 64, 32, 16, 8, 4
num_res_blocks = 2      # residual blocks per level
attn_resolutions = "16"  # self-attention at these feature-map sizes
dropout = 0.1
norm_groups = 32        # GroupNorm groups (fewer where the width is not a multiple)
patch_size = 1          # 2: the UNet works on 2x2 patches, 32x32x12 (pixel unshuffle; Hoogeboom et al. 2023, 3.2)
# training
batch_size = 64
lr = 2e-4
warmup_steps = 1000     # linear learning-rate warmup (Ho et al. use 5000)
grad_clip = 1.0
min_snr_gamma = 0.0     # > 0: Min-SNR-gamma loss weights (Hang et al. 2023 use 5); 0 = L_simple, as Ho et al.
t_sampling = "uniform"  # "uniform" (Algorithm 1) or "sqrt_weight": t drawn in proportion to sqrt(loss weight)
ema_decay = 0.9999      # EMA of the weights, used for sampling (Ho et al.: 0.9999 over 800k steps)
guide_step = 0          # > 0: keep the EMA of this step as the guide of autoguidance (see guidance); 0 = none
max_steps = 500000
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this long; 0 = no limit
log_every = 50
sample_every = 5000     # steps between sample grids (DDIM, 50 steps)
ckpt_every = 500
seed = 1337
device = ""             # "" = cuda if available, else mps (Apple silicon), else cpu
precision = "auto"      # auto | bf16 | fp16 | fp32: auto = bf16 where native, fp16 + scaler on older GPUs, else fp32
compile = False         # torch.compile the UNet's training (CUDA capability >= 8.0, or a CPU with a C++ compiler)
channels_last = False   # NHWC memory layout for the convolutions (--bench measures both)
num_threads = 2         # CPU threads per process
# sampling
n_samples = 1000        # images to generate
sampler = "ddim"        # "ddpm" (Algorithm 2, T steps), "ddim" (sample_steps, eta) or "dpm" (DPM-Solver++(2M))
sample_steps = 100      # steps S of ddim and dpm
eta = 0.0               # DDIM: 0 = deterministic, 1 = DDPM's posterior variance
variance = "beta"       # DDPM sigma_t^2: "beta" (beta_t) or "posterior" (beta~_t); Ho et al. 3.2 found both similar
guidance = 1.0          # autoguidance weight w (Karras et al. 2024): > 1 steers away from the guide's errors; 1 = off
guide_t_min = 0         # guide only the steps t in [guide_t_min, guide_t_max] of 0..T-1 (0, 999: all of T = 1000):
guide_t_max = 999       # each guided step costs a second UNet evaluation, and the trajectory's ends gain nothing
sample_batch = 100
images_dir = ""         # where 1.jpg..N.jpg go; "" = out_dir/images
submission = "submission.zip"
run_fid = False         # after sampling: FID and KID against fid_ref through fid.py
fid_ref = ""            # a folder, zip or statistics .npz; "" = data_dir
fid_weights = ""        # the FID Inception weights file; "" = torch hub cache, else download (see fid.py)
fid_dims = 2048         # Inception feature size: 2048 is the standard FID (64, 192, 768 for quick looks)
# -----------------------------------------------------------------------------

# --preset=cpu: a small UNet for a 2-core CPU, and how to train and sample it in an hour; each value chosen by
# measurement at equal training minutes in fp32 (its speed and samples: docs/results.md, part 2-2). The UNet works on
# 2x2 patches (32x32x12): nothing runs at 64x64, where GroupNorm and SiLU are memory-bound; it predicts v, whose x_0
# guesses stay sane at high noise where eps's are multiplied by up to 150; batches of 16 make twice the steps of
# 32 from the same images in the hour, and better samples; t is drawn where the Min-SNR weights are large (see
# Diffusion.loss); DPM-Solver++ samples in 16 steps, guided away from the EMA of step 1,000 (see Autoguided) at the
# 10 steps of the middle: the largest gain of all, for 10 more UNet evaluations.
CPU_PRESET = dict(channels=64, channel_mults="1,2,2", num_res_blocks=1, attn_resolutions="16", dropout=0.0,
                  norm_groups=8, patch_size=2, prediction="v", batch_size=16, lr=1e-3, warmup_steps=200,
                  ema_decay=0.999, min_snr_gamma=5.0, t_sampling="sqrt_weight", guide_step=1000, sample_every=1000,
                  sampler="dpm", sample_steps=16, guidance=2.0, guide_t_min=36, guide_t_max=862)
IMAGE_SIZE = 64
# values with a fixed set of choices or a range, checked before any work (see parse_overrides)
CHECKS = {
    "preset": ("", "cpu"), "schedule": ("linear", "cosine"), "sampler": ("ddpm", "ddim", "dpm"), "patch_size": (1, 2),
    "prediction": ("eps", "v"), "t_sampling": ("uniform", "sqrt_weight"), "variance": ("beta", "posterior"),
    "precision": ("auto", "bf16", "fp16", "fp32"), "fid_dims": (2048, 768, 192, 64),
    "channel_mults": (lambda v: re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", v) and
                      IMAGE_SIZE // patch_size % 2 ** v.count(",") == 0,      # each level but the last halves
                      "comma-separated integers >= 1, like 1,2,2,2, and at most 7 levels (6 with --patch_size=2): "
                      "each level but the last halves the 64/patch_size grid"),
    "attn_resolutions": (lambda v: re.fullmatch(r"([1-9]\d*(,[1-9]\d*)*)?", v),
                         "comma-separated sizes like 16, or empty"),
    **{name: (lambda v: v >= 1, "an integer >= 1") for name in
       ("timesteps", "channels", "num_res_blocks", "norm_groups", "batch_size", "max_steps", "log_every",
        "sample_every", "ckpt_every", "num_threads", "n_samples", "sample_steps", "sample_batch")},
    **{name: (lambda v: v >= 0, "a number >= 0") for name in ("warmup_steps", "max_minutes", "eta", "min_snr_gamma",
                                                              "guide_step", "guide_t_min", "guide_t_max")},
    "guidance": (lambda v: v >= 1, "a number >= 1 (1 = no guidance)"),
    **{name: (lambda v: v > 0, "a number > 0") for name in ("lr", "grad_clip")},
    **{name: (lambda v: 0 <= v < 1, "a number in [0, 1)") for name in ("dropout", "ema_decay")},
    **{name: (lambda v: 0 < v < 1, "a number in (0, 1)") for name in ("beta_start", "beta_end")},
}
if __name__ == "__main__":  # the configurator: --preset=cpu first (it sets the small model), then every --name=value
    preset_flags = [arg for arg in sys.argv[1:] if arg.partition("=")[0] == "--preset"]
    parse_overrides(preset_flags, globals(), {"preset": CHECKS["preset"]})
    if preset == "cpu":
        globals().update(CPU_PRESET)
        print("preset cpu: " + ", ".join(f"{name} = {value!r}" for name, value in CPU_PRESET.items()))
    unexpected = parse_overrides([arg for arg in sys.argv[1:] if arg not in preset_flags], globals(), CHECKS)
    if unexpected:
        sys.exit(f"error: unexpected argument {unexpected[0]!r} (options are --name=value; --help lists them)")
    torch.set_num_threads(num_threads)


# ----------------------------------------------------------------------------- system
def setup_system(distributed=False):
    """nanoGPT's system block, run once by main: the device (cuda, then mps, then cpu, unless `device` names one),
    torchrun's process group when `distributed` (one process per GPU with nccl, or CPU processes with gloo), the
    precision and its autocast context `ctx`. -> system = (run_device, precision name, ctx, rank, world_size),
    what the entry points below take."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))   # set by torchrun
    ddp = distributed and "RANK" in os.environ
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    run_device = device or ("cuda" if cuda else "mps" if mps else "cpu")
    why_device = "--device" if device else "a CUDA GPU" if cuda else "no CUDA GPU; Apple's mps" if mps else "no GPU"
    if run_device.startswith("cuda"):
        check_cuda_build()
        torch.backends.cudnn.benchmark = True      # fixed input shapes: let cuDNN pick its fastest kernels once
        if ddp:                                    # one GPU per process
            run_device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(run_device)
    if ddp:
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    precision_name, why_precision = choose_precision(precision, run_device.split(":")[0])
    ctx = torch.autocast(run_device.split(":")[0], dtype=torch.float16 if precision_name == "fp16" else torch.bfloat16,
                         enabled=precision_name != "fp32")
    if rank == 0:
        print(f"device {run_device} ({why_device}); precision {precision_name} ({why_precision})")
    return run_device, precision_name, ctx, rank, world_size


def memory_format():   # for the convolutions: NHWC with --channels_last, else PyTorch's default NCHW
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------- data
def load_images(path):
    """All images of a folder, zip or uint8 .npy as a uint8 tensor (N, 3, 64, 64), read by fid.py's reader. A
    non-64x64 image is resized (with a note); one that cannot be read is an error naming it."""
    names = fid.list_images(path)
    if not names:
        raise ValueError(f"{path}: no images found")
    images, resized = [], 0
    for name in names:
        image = fid.read_image(path, name)                             # float (3, H, W) in [0, 1]
        if image.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            image = F.interpolate(image[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                                  antialias=True, align_corners=False)[0].clamp(0, 1)
            resized += 1
        images.append((image * 255).round().to(torch.uint8))
    if resized:
        print(f"note: {resized} of {len(names)} images were not {IMAGE_SIZE}x{IMAGE_SIZE} and were resized")
    return torch.stack(images)


def training_batch(images, batch, generator):
    """A random batch scaled to [-1, 1] with random horizontal flips (Ho et al. appendix B), made on the device
    that holds the uint8 images and the generator (on a GPU nothing crosses the bus)."""
    indices = torch.randint(len(images), (batch,), generator=generator, device=generator.device)
    x = images[indices].float() / 127.5 - 1
    flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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
        # (batch, heads, tokens, dim) with one head, the layout the fused attention kernels take
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)   # (b, 1, hw, c)
        attended = F.scaled_dot_product_attention(q, k, v)            # softmax(q k^T / sqrt(c)) v
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, channels, channel_mults, num_res_blocks, attn_resolutions, dropout, image_size=IMAGE_SIZE,
                 norm_groups=32, patch_size=1):
        super().__init__()
        # the UNet sees (3 p^2, 64/p, 64/p): each p x p patch of pixels is one vector
        self.channels, self.patch_size = channels, patch_size
        time_dim = 4 * channels
        block = lambda c_in, c_out: ResidualBlock(c_in, c_out, time_dim, dropout, norm_groups)
        attend = lambda level: image_size // patch_size // 2 ** level in attn_resolutions   # at this level's size?
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(3 * patch_size ** 2, channels, 3, padding=1)
        # down path: num_res_blocks blocks per level, then a stride-2 conv; every output is kept for a skip
        self.down = nn.ModuleList()
        skip_channels, width = [channels], channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([block(width, channels * mult)]))
                width = channels * mult
                if attend(level):
                    self.down[-1].append(SelfAttention(width, norm_groups))
                skip_channels.append(width)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skip_channels.append(width)
        self.middle = nn.ModuleList([block(width, width), SelfAttention(width, norm_groups), block(width, width)])
        # up path: num_res_blocks + 1 blocks per level, each taking one skip, then nearest upsampling + conv
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([block(width + skip_channels.pop(), channels * mult)]))
                width = channels * mult
                if attend(level):
                    self.up[-1].append(SelfAttention(width, norm_groups))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(width, width, 3, padding=1)]))
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 3 * patch_size ** 2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t):
        time_embedding = self.time_mlp(timestep_embedding(t, self.channels))

        def run(layers, h):   # one stage: residual blocks also take the step's embedding, the other layers do not
            for layer in layers:
                h = layer(h, time_embedding) if isinstance(layer, ResidualBlock) else layer(h)
            return h
        # the skips are a stack: every down stage pushes its output, every up block pops one (the last pushed
        # first), so each up block meets the down output of its own resolution; up-sampling stages take none
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size))   # (b, 3, 64, 64) -> (b, 3 p^2, 64/p, 64/p)
        skips = [h]
        for layers in self.down:
            h = run(layers, h)
            skips.append(h)
        h = run(self.middle, h)
        for layers in self.up:
            if isinstance(layers[0], ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = run(layers, h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch_size)   # back to pixels


# ----------------------------------------------------------------------------- forward process, loss and samplers
def make_betas(schedule, timesteps, beta_start=1e-4, beta_end=0.02):
    if schedule == "linear":                      # Ho et al. section 4: linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    # cosine, the only other schedule CHECKS allows: Nichol & Dhariwal eq. 17, alpha_bar(t) = f(t) / f(0)
    s = 0.008
    t_over_T = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t_over_T + s) / (1 + s) * math.pi / 2) ** 2
    alphas_bar = f / f[0]
    return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)   # beta_t clipped at 0.999 (their 3.2)


class Diffusion:
    """The forward process and its posterior, every buffer computed once in float64 and moved to `device` (they stay
    float64 there, but on mps, which has no float64). Time steps are 0-based here: t = 0..T-1 stands for the
    paper's 1..T."""

    def __init__(self, betas, prediction="eps", device="cpu"):
        self.timesteps, self.prediction = len(betas), prediction
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
        # mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
        #         + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        # lambda_t = log(alpha_t / sigma_t) = log(alpha_bar_t / (1 - alpha_bar_t)) / 2, the log signal-to-noise ratio
        self.log_snr = 0.5 * torch.log(self.alphas_cumprod / (1 - self.alphas_cumprod))   # DPM-Solver
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device, torch.float32 if device == "mps" else value.dtype))

    @staticmethod
    def gather(buffer, t, x):
        """buffer[t] for a batch of steps t, shaped to broadcast over images like x, in x's dtype."""
        return buffer.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4, reparameterised)."""
        return (self.gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self.gather(self.posterior_mean_coef1, t, xt) * x0 + self.gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self.gather(self.posterior_variance, t, xt)

    def predict_x0(self, xt, t, eps):
        return (self.gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def eps(self, model, xt, t):
        """eps_theta(x_t, t) in float32, whatever the UNet predicts. With v-prediction (Salimans & Ho 2022, 4) the
        UNet outputs v = alpha eps - sigma x_0 (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)), and
        eps = sigma x_t + alpha v. Why v: x_0 = (x_t - sigma eps) / alpha multiplies an eps error by sigma / alpha,
        about 150 at t = T with the linear schedule, so a young eps model's x_0 guesses at high noise are far off
        (clipped, they give the colour casts of a short training); x_0 = alpha x_t - sigma v never amplifies."""
        out = model(xt, t).float()
        if self.prediction == "eps":
            return out
        alpha = self.gather(self.sqrt_alphas_cumprod, t, xt)
        return self.gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * xt + alpha * out

    def loss(self, model, x0, generator, min_snr_gamma=0.0, t_sampling="uniform"):
        """Algorithm 1: t ~ Uniform, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2 (L_simple, eq. 14). t and eps
        come from the generator, on its device. min_snr_gamma > 0 weights each image's error by
        w_t = min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR-gamma, Hang et al. 2023,
        3.4, for eps-prediction): the many nearly clean steps, whose noise is easy to predict but whose gradients
        fight the others', count less, and a short training reaches the same loss in fewer steps.
        t_sampling="sqrt_weight" draws t with p_t proportional to sqrt(w_t) and divides each error by T p_t
        (importance sampling): the expected loss, sum_t p_t w_t e_t / (T p_t) = (1/T) sum_t w_t e_t, is uniform
        t's, but with Min-SNR-5 on v 40 % of uniform draws land at t > 600, where w_t < 0.03 (1 % of the total
        weight): each costs a full forward and backward pass and moves the weights by almost nothing. Drawn this
        way, 6.5 % land there, and the batch's weights are more even (effective sample size 85 % of the batch,
        against 38 % for uniform t), so each step's gradient is less noisy."""
        weights = torch.ones_like(self.alphas_cumprod)                  # w_t: 1 = L_simple
        if min_snr_gamma > 0:   # for v: min(SNR_t, gamma) / (SNR_t + 1), the same weights on the x_0 error
            snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
            weights = snr.clamp(max=min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        if t_sampling == "sqrt_weight":
            p = (weights.sqrt() / weights.sqrt().sum()).float().to(generator.device)
            t = torch.multinomial(p, len(x0), replacement=True, generator=generator)
            weights = weights / (self.timesteps * p.to(weights))        # w_t / (T p_t)
        elif t_sampling == "uniform":
            t = torch.randint(self.timesteps, (len(x0),), generator=generator, device=generator.device)
        else:
            raise ValueError(f"t_sampling must be 'uniform' or 'sqrt_weight', got {t_sampling!r}")
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        target = noise if self.prediction == "eps" else (self.gather(self.sqrt_alphas_cumprod, t, x0) * noise
                                                         - self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)
        error = (model(self.q_sample(x0, t, noise), t).float() - target).pow(2).mean(dim=(1, 2, 3))   # per image
        return (error * self.gather(weights, t, error)).mean()

    # ------------------------------------------------------------------------- sampling
    def sequence(self, sampler, steps):
        """The steps t a sampler visits, in rising order. ddpm: all T. ddim: `steps` evenly spaced over 0..T-1
        (Song et al. 4.2, "linear" tau). dpm: evenly spaced in lambda_t ("logSNR" spacing, which Lu et al.
        recommend for low-resolution images), so every step has the same h and the second-order correction stays
        small; steps that round to the same t are visited once."""
        if sampler == "ddpm":
            return list(range(self.timesteps))
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"--sample_steps={steps}: {sampler} takes 1 to the model's T={self.timesteps} steps")
        if sampler == "ddim" and steps == 1:   # one step, from t = T-1 where x_T is noise (linspace would give 0)
            return [self.timesteps - 1]
        if sampler == "ddim":
            return np.linspace(0, self.timesteps - 1, steps).round().astype(int).tolist()
        lambdas = self.log_snr.cpu().numpy()                                  # falling with t
        targets = np.linspace(lambdas[-1], lambdas[0], steps)
        ts = np.interp(targets, lambdas[::-1], np.arange(self.timesteps)[::-1]).round().astype(int)
        return sorted(set(ts.tolist()))

    def ddim_step(self, xt, t, t_prev, x0, eta):
        """One DDIM update (Song et al. eq. 12) from step t to t_prev (-1 = the end), given the clipped x_0 guess.
        sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eq. 16). Returns (mean, sigma)."""
        alpha_bar = self.gather(self.alphas_cumprod, t, xt)
        alpha_bar_prev = self.gather(self.alphas_cumprod, t_prev.clamp(min=0), xt)
        alpha_bar_prev = torch.where(t_prev.view_as(alpha_bar) >= 0, alpha_bar_prev, torch.ones_like(alpha_bar_prev))
        eps = (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()     # the eps that goes with the clipped x_0
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        mean = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return mean, sigma

    def dpm_step(self, xt, x0, s, s_next, previous):
        """One step of DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) from step s to s_next: DDIM's update
        (DPM-Solver++'s first order) made second order by reusing the previous step's x_0 guess, so fewer steps
        reach the same images. With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t),
        h = lambda_next - lambda_t and r = h_previous / h:
            x_next = sigma_next / sigma_t x_t - alpha_next (e^-h - 1) D,   D = (1 + 1/2r) x0_t - 1/2r x0_previous
        D = x0_t at the first step (previous = None); the last step (to s_next = -1, sigma = 0) gives x0_t itself.
        -> (x_next, (x0_t, h) for the next step)"""
        if s_next < 0:
            return x0, None
        alpha_bar, alpha_bar_next = self.alphas_cumprod[s].item(), self.alphas_cumprod[s_next].item()
        h = (self.log_snr[s_next] - self.log_snr[s]).item()
        d = x0 if previous is None else x0 + (x0 - previous[0]) * h / (2 * previous[1])   # 1/2r = h/2h_previous
        x = math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * xt - math.sqrt(alpha_bar_next) * math.expm1(-h) * d
        return x, (x0, h)

    @torch.no_grad()
    def sample(self, model, shape, generator, sampler="ddim", steps=100, eta=0.0, variance="beta", record=()):
        """Images from x_T ~ N(0, I) by a sampler: "ddpm" (Algorithm 2, all T steps), "ddim" (`steps` of them, eta;
        eta = 1 and steps = T give Algorithm 2 with beta~_t) or "dpm" (DPM-Solver++(2M), `steps`). Every step
        predicts x_0 from eps_theta and clips it to [-1, 1], as Ho et al.'s code does. record: steps t at which to
        keep x_t, after the step from t (T: x_T), for the denoising figure. Runs inside the caller's `with ctx:`;
        eps_theta comes back as float32 for the sampler's own arithmetic. -> (x_0, {t: x_t})"""
        device = next(model.parameters()).device
        x = torch.randn(shape, generator=generator).to(device)
        kept = {self.timesteps: x.cpu()} if self.timesteps in record else {}
        sequence = self.sequence(sampler, steps)
        previous = None                                             # dpm: (x_0 guess, h) of the step before
        for i in reversed(range(len(sequence))):
            s, s_next = sequence[i], sequence[i - 1] if i > 0 else -1   # from step s to s_next (-1: the end)
            t = torch.full((shape[0],), s, device=device, dtype=torch.long)
            x0 = self.predict_x0(x, t, self.eps(model, x, t)).clamp(-1, 1)
            if sampler == "dpm":                                    # deterministic: no noise is drawn
                x, previous = self.dpm_step(x, x0, s, s_next, previous)
            else:
                if sampler == "ddpm":   # x_{t-1} ~ q(x_{t-1} | x_t, x_0), sigma_t^2 = beta_t or beta~_t (3.2)
                    mean, posterior_variance = self.q_posterior(x0, x, t)
                    sigma = (self.gather(self.betas, t, x) if variance == "beta" else posterior_variance).sqrt()
                else:
                    mean, sigma = self.ddim_step(x, t, torch.full_like(t, s_next), x0, eta)
                noise = torch.randn(shape, generator=generator).to(device)
                x = mean + sigma * noise if i > 0 else mean           # no noise at the last step
            if s in record:
                kept[s] = x.cpu()
        return x, kept


def model_config():
    """The constants that define the model and its diffusion: saved in every checkpoint, and all that --sample
    and --denoise_figure build from (they never read the constants above for it)."""
    mults, attention = [int(m) for m in channel_mults.split(",")], [int(r) for r in attn_resolutions.split(",") if r]
    return dict(channels=channels, channel_mults=mults, num_res_blocks=num_res_blocks,
                attn_resolutions=attention, dropout=dropout, norm_groups=norm_groups, patch_size=patch_size,
                schedule=schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end, prediction=prediction)


def build(config, run_device, layout=torch.contiguous_format):
    """The UNet (in the memory layout `layout`) and its Diffusion of a model_config(), on run_device; a checkpoint
    from before norm_groups, patch_size and prediction existed gets their old values."""
    model = UNet(config["channels"], config["channel_mults"], config["num_res_blocks"], config["attn_resolutions"],
                 config["dropout"], norm_groups=config.get("norm_groups", 32), patch_size=config.get("patch_size", 1))
    diffusion = Diffusion(make_betas(config["schedule"], config["timesteps"], config["beta_start"], config["beta_end"]),
                          config.get("prediction", "eps"), run_device)
    return model.to(run_device, memory_format=layout), diffusion


# ----------------------------------------------------------------------------- training (Algorithm 1)
def start_or_resume(config, system, ckpt_path):
    """The model, its EMA copy (eval mode: it only samples), the optimizer and the gradient scaler (fp16 only: see
    choose_precision), resumed from ckpt_path where it exists, and the guide (see Autoguided) if one was kept.
    -> (model, diffusion, ema, optimizer, scaler, step, guide)"""
    run_device, precision_name, _, rank, _ = system
    torch.manual_seed(seed)
    model, diffusion = build(config, run_device, memory_format())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=run_device.startswith("cuda"))
    scaler = torch.amp.GradScaler(run_device.split(":")[0], enabled=precision_name == "fp16")
    if not os.path.exists(ckpt_path):
        return model, diffusion, ema, optimizer, scaler, 0, None
    checkpoint = load_checkpoint(ckpt_path, run_device, ("model", "ema", "optimizer", "step", "config"))
    saved = {"norm_groups": 32, "patch_size": 1, "prediction": "eps", **checkpoint["config"]}
    differing = [f"{k} = {saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v]
    if differing:
        raise ValueError(f"{ckpt_path} was trained with another configuration ({'; '.join(differing)}): run with its "
                         f"values, or use another --out_dir")
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):   # {} from a run without the fp16 scaler: this one then starts fresh
        scaler.load_state_dict(checkpoint["scaler"])
    if rank == 0:
        print(f"resuming from {ckpt_path} at step {checkpoint['step']}")
    if checkpoint.get("precision", precision_name) != precision_name and rank == 0:
        print(f"note: {ckpt_path} was trained in {checkpoint['precision']}; resuming in {precision_name}")
    return model, diffusion, ema, optimizer, scaler, checkpoint["step"], checkpoint.get("guide")


def wrap_for_training(model, run_device, rank):
    """torch.compile and DistributedDataParallel around the model; the EMA and the checkpoints use the bare one.
    Where compile cannot run (see compile_blocker) training goes on in eager mode, with a note."""
    why_not = compile_blocker(run_device) if compile else ""
    if compile and not why_not:
        model = torch.compile(model)
    elif compile and rank == 0:
        print(f"note: --compile {why_not}; training in eager mode")
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[run_device] if run_device != "cpu" else None)
    return model


def any_rank(flag, run_device):
    """True if `flag` is True in any process: every process gets the same answer, so all stop at the same step."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=run_device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def cut_csv(path, step):
    """loss.csv cut back to the rows up to `step`, the step a resumed run starts from, written to path.tmp and renamed
    (an interruption leaves the old file). Rows a crash left unreadable (half a row, NUL bytes) go, with a note."""
    rows = open(path, errors="replace").read().splitlines() if os.path.exists(path) else []
    good = [row for row in rows if re.fullmatch(r"\d+,(nan|inf|\d+\.\d+)", row)]
    if len(good) < len(rows):
        print(f"note: {path}: {len(rows) - len(good)} unreadable row(s) dropped (left by a crash)")
    with open(path + ".tmp", "w") as f:
        f.writelines(row + "\n" for row in good if int(row.split(",")[0]) <= step)
    os.replace(path + ".tmp", path)


def log_progress(csv_path, step, mean_loss, step_lr, steps_per_s, world_size, deadline):
    """The progress line (step, loss, speed, time left) and its row of loss.csv."""
    minutes_left = min((max_steps - step) / steps_per_s, deadline - time.time()) / 60
    print(f"step {step}/{max_steps} loss {mean_loss:.4f} lr {step_lr:.1e} {steps_per_s * batch_size * world_size:.1f} "
          f"images/s, about {minutes_left:.1f} min left", flush=True)
    with open(csv_path, "a") as f:
        f.write(f"{step},{mean_loss:.6f}\n")


def finish(out_dir, step, deadline, rank):
    """After the training loop: the process group closed, loss.png drawn, and how the run ended. -> step"""
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        plot_loss(os.path.join(out_dir, "loss.csv"), os.path.join(out_dir, "loss.png"))
    if stop_signal:
        sys.exit(f"stopped by {stop_signal[0]} at step {step}; checkpoint saved, run the same command to resume")
    if rank == 0 and time.time() > deadline:
        print(f"stopped after {max_minutes} minutes at step {step}; checkpoint saved, run the same command to resume")
    return step


def train_model(data_dir, out_dir, system):
    """Algorithm 1 on the images of data_dir, resumed from out_dir/ckpt.pt where it exists. -> the step reached."""
    run_device, precision_name, ctx, rank, world_size = system
    check_writable(out_dir)
    images = load_images(data_dir).to(run_device)   # uint8 on the device: each batch is made there
    config, ckpt_path, csv_path = model_config(), os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "loss.csv")
    raw_model, diffusion, ema, optimizer, scaler, step, guide = start_or_resume(config, system, ckpt_path)
    model = wrap_for_training(raw_model, run_device, rank)
    if rank == 0:
        print(f"{len(images)} images from {data_dir}; UNet {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}"
              f" M parameters; {config}; batch {batch_size} x {world_size} process(es) on {run_device}")
        cut_csv(csv_path, step)   # the steps after the resumed one are trained, and logged, again
    loss_sum, finite_steps = torch.zeros((), device=run_device), torch.zeros((), device=run_device)
    start, start_step, stopping = time.time(), step, False
    deadline = start + max_minutes * 60 if max_minutes > 0 else float("inf")
    while step < max_steps and not stopping:
        # every random draw of a step comes from (seed, step, rank): a resumed run repeats it exactly
        generator = torch.Generator(run_device).manual_seed(seed + step * world_size + rank)
        torch.manual_seed(seed + step * world_size + rank)                  # dropout masks, too
        for group in optimizer.param_groups:                              # linear warmup (Ho et al. appendix B)
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        # forward backward update (Algorithm 1), the gradient scaled in fp16 (see choose_precision), clipped unscaled
        x0 = training_batch(images, batch_size, generator).contiguous(memory_format=memory_format())
        with ctx:
            loss = diffusion.loss(model, x0, generator, min_snr_gamma, t_sampling)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        # EMA of the weights, its decay rising from 0.1 to ema_decay (TensorFlow's EMA, in Ho et al.'s code)
        decay = min(ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - decay)
        step += 1
        guide = copy.deepcopy(ema.state_dict()) if step == guide_step else guide   # autoguidance's (see Autoguided)
        # timing and logging: the mean loss since the last line, summed on the device without fp16's skipped steps
        loss_sum += torch.where(torch.isfinite(loss.detach()), loss.detach(), 0.0)
        finite_steps += torch.isfinite(loss.detach())
        logged = step % log_every == 0 or step == max_steps
        if logged and rank == 0 and finite_steps.item():
            log_progress(csv_path, step, loss_sum.item() / finite_steps.item(), optimizer.param_groups[0]["lr"],
                         (step - start_step) / (time.time() - start), world_size, deadline)
        if step % sample_every == 0 and rank == 0:   # a grid of EMA samples now and then
            save_grid(diffusion, ema, ctx, os.path.join(out_dir, f"samples_{step:07d}.png"))
        # stop, all processes at one step: on NaN before a checkpoint keeps it, on the clock or a signal after one
        stopping = any_rank(time.time() > deadline or bool(stop_signal), run_device)
        saving = step % ckpt_every == 0 or step == max_steps or stopping
        if (logged or saving) and any_rank(logged and not finite_steps.item() or not weights_finite(raw_model),
                                           run_device):
            sys.exit(f"error: the loss or the weights stopped being finite numbers (NaN or inf) by step {step}: "
                     f"{ckpt_path} keeps the last good state. Try a lower --lr (now {lr:g}) or --precision=fp32")
        if logged:
            loss_sum, finite_steps = torch.zeros_like(loss_sum), torch.zeros_like(finite_steps)
        if saving and rank == 0:
            save_atomic(dict(model=raw_model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), step=step, config=config, precision=precision_name,
                             guide=guide), ckpt_path)
    return finish(out_dir, step, deadline, rank)


# ----------------------------------------------------------------------------- sampling (Algorithm 2, DDIM, DPM-Solver)
class Autoguided(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the UNet's
    output moved away from that of a weaker copy of itself, the guide (here its own EMA from early in training),
        D_w(x_t, t) = D_guide(x_t, t) + w (D(x_t, t) - D_guide(x_t, t)),   w >= 1.
    Where both models err alike, the errors cancel in the difference; what the guide gets wrong and the model
    gets right is amplified, which pulls samples toward the well-learned, typical images. It acts on the
    output, v or eps: x_0 and eps are affine in it, so they are guided alike. Only for steps t in t_range."""

    def __init__(self, model, guide, weight, t_range):
        super().__init__()
        self.model, self.guide, self.weight, self.t_range = model, guide, weight, t_range

    def forward(self, x, t):
        out = self.model(x, t)
        if self.t_range[0] <= t[0].item() <= self.t_range[1]:   # every image of a batch is at the same t
            out = out + (self.weight - 1) * (out - self.guide(x, t))
        return out


def load_ema(out_dir, run_device):
    """The EMA weights of out_dir/ckpt.pt, built from the configuration saved with them (not the constants
    above), wrapped in Autoguided with --guidance > 1 and a guide kept in the checkpoint."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: train first (python ddpm.py --train --out_dir={out_dir})")
    checkpoint = load_checkpoint(path, "cpu")
    model, diffusion = build(checkpoint["config"], run_device, memory_format())
    model.load_state_dict(checkpoint["ema"])
    if guidance > 1 and checkpoint.get("guide") is None:
        print(f"note: {path} keeps no guide (training keeps the EMA of step guide_step, and this one has none): "
              f"sampling without autoguidance")
    elif guidance > 1:
        guide = copy.deepcopy(model)                 # the same UNet, with the weights of step guide_step
        guide.load_state_dict(checkpoint["guide"])
        model = Autoguided(model, guide, guidance, (guide_t_min, guide_t_max))   # .eval() below reaches both
        print(f"autoguidance: w = {guidance:g} at the steps {guide_t_min} <= t <= {guide_t_max}, guide from {path}")
    return model.eval(), diffusion


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
            Image.fromarray(array).save(os.path.join(folder, f"{i}.jpg"), "JPEG", quality=95)
            archive.write(os.path.join(folder, f"{i}.jpg"), f"{i}.jpg")
    os.replace(zip_path + ".tmp", zip_path)


def evaluate_fid(generated, reference, run_device):
    """FID (and KID, unless the reference is a statistics .npz) of the generated images through fid.py. With
    1,000 images FID is biased upwards (see fid.py); KID is not."""
    inception = fid.load_inception(fid_dims, fid_weights, run_device)
    generated_features = fid.extract_features(inception, generated, 50, run_device)
    if fid.is_statistics(reference):
        reference_stats = fid.load_statistics(reference, fid_dims)
    else:
        reference_features = fid.extract_features(inception, reference, 50, run_device)
        reference_stats = fid.statistics(reference_features, reference)
        kid_mean, kid_std = fid.kernel_inception_distance(generated_features, reference_features, 100, 1000, seed)
        print(f"KID: {kid_mean:.6f} +- {kid_std:.6f}")
    print(f"FID: {fid.frechet_distance(*fid.statistics(generated_features, generated), *reference_stats)}")


def sample_images(out_dir, system):
    """n_samples images with the EMA weights, 1.jpg..N.jpg into images_dir and submission.zip (+ FID, KID)."""
    run_device, precision_name, ctx, _, _ = system
    folder = images_dir or os.path.join(out_dir, "images")
    check_writable(os.path.dirname(os.path.abspath(submission)), create=False)   # every output path, before
    check_writable(folder)                                                       # the first image
    if run_fid and not os.path.exists(fid_ref or data_dir):
        raise FileNotFoundError(f"--fid_ref={fid_ref or data_dir} not found (a folder, zip or statistics .npz)")
    model, diffusion = load_ema(out_dir, run_device)
    outputs, start, generator = [], time.time(), torch.Generator().manual_seed(seed)
    for first in range(0, n_samples, sample_batch):
        shape = (min(sample_batch, n_samples - first), 3, IMAGE_SIZE, IMAGE_SIZE)
        with ctx:
            x, _ = diffusion.sample(model, shape, generator, sampler, sample_steps, eta, variance)
        outputs.append(to_uint8(x))
        done = first + shape[0]
        print(f"generated {done}/{n_samples}, {done / (time.time() - start):.2f} images/s, "
              f"about {(n_samples - done) / done * (time.time() - start) / 60:.1f} min left", flush=True)
    write_submission(np.concatenate(outputs), folder, submission)
    print(f"{n_samples} images ({sampler}, {diffusion.timesteps if sampler == 'ddpm' else sample_steps} steps, "
          f"{precision_name}) in {time.time() - start:.0f} s: {folder}/1.jpg..{n_samples}.jpg and {submission}")
    if run_fid:
        evaluate_fid(submission, fid_ref or data_dir, run_device)


def denoising_figure(out_dir, system, columns=10):
    """out_dir/denoising.png: 5 images (rows) from x_T to x_0, columns at evenly spaced steps of the sampler."""
    run_device, _, ctx, _, _ = system
    model, diffusion = load_ema(out_dir, run_device)
    # the steps to show: evenly spaced over the steps the sampler visits, x_T included
    if sampler == "ddpm":
        record = set(np.linspace(0, diffusion.timesteps, columns).round().astype(int).tolist())
    else:
        sequence = diffusion.sequence(sampler, sample_steps)
        record = {sequence[i] for i in np.linspace(0, len(sequence) - 1, columns - 1).round().astype(int)}
        record.add(diffusion.timesteps)
    with ctx:
        _, kept = diffusion.sample(model, (5, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(seed),
                                   sampler, sample_steps, eta, variance, record)
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


# ----------------------------------------------------------------------------- main
def main():
    if not (train or sample or denoise_figure or bench):
        return print(__doc__)
    system = setup_system(distributed=train)
    run_device, _, _, rank, _ = system
    if train:   # Ctrl-C, and SIGTERM (what Colab and Kaggle send): a checkpoint after the current step, then stop
        previous = [signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)]
        train_model(data_dir, out_dir, system)
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):   # sampling stops at once
            signal.signal(s, handler)
    if sample and rank == 0:   # under torchrun only rank 0 samples and draws
        sample_images(out_dir, system)
    if denoise_figure and rank == 0:
        denoising_figure(out_dir, system)
    if bench and rank == 0:
        run_bench(run_device)


# --- robustness (read last) ---
stop_signal = []   # the name of the signal (Ctrl-C, SIGTERM) that asked training to save and stop


def on_signal(signum, frame):
    if stop_signal:   # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    stop_signal.append(signal.Signals(signum).name)
    print(f"\n{stop_signal[0]}: saving a checkpoint after this step, then stopping", flush=True)


def save_atomic(checkpoint, path):
    """torch.save to path.tmp, then renamed over path: an interrupted save never leaves a half-written file."""
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location, needs=("ema", "config")):
    """A checkpoint of this script holding the keys in `needs` (sampling's; resuming also needs the model, optimizer
    and step). weights_only=True: tensors, numbers and strings only, so a file from elsewhere cannot run code on
    loading; a damaged or foreign file is a one-line error that says what to do."""
    try:
        with warnings.catch_warnings():     # torch warns about a foreign pickle before it refuses it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        missing = [key for key in needs if key not in checkpoint]
        assert not missing, f"no {', '.join(missing)} inside"
        return checkpoint
    except Exception as e:   # truncated, empty, not a checkpoint, or a pickle that asks for code
        previous = f"the previous state may be in {path}.tmp; " if os.path.exists(path + ".tmp") else ""
        raise ValueError(f"{path} is damaged or not a ddpm.py checkpoint ({type(e).__name__}: "
                         f"{(str(e).strip() or 'no data').splitlines()[0][:60]}); {previous}delete it to start again")


def check_writable(folder, create=True):
    """Files can be written in folder (created first if `create`): checked before any long work, not after."""
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".write_test_{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".write_test_{os.getpid()}"))
    except OSError as e:
        raise OSError(f"cannot write to {folder}: {e.strerror}") from None


def weights_finite(model):
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


# --- extras (not the lesson) ---
# The precision policy and the GPU checks (compatibility with the GPUs students get), the sample grids and the loss
# chart that training draws, and --bench.
def choose_precision(requested, device_type):
    """The autocast precision for `precision` on this device, and why: auto is bf16 where the hardware computes it
    natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16), fp16 with a gradient
    scaler on older GPUs (a T4, 7.5, only emulates bf16: its convolutions then skip cuDNN and the tensor cores),
    and fp32 elsewhere (mps included: its autocast is not measured here)."""
    major, minor = torch.cuda.get_device_capability() if device_type == "cuda" else (0, 0)
    if device_type == "cuda" and requested == "bf16" and major < 8:
        sys.exit(f"error: --precision=bf16 needs CUDA capability 8.0 or newer, this GPU has {major}.{minor}: use "
                 f"--precision=fp16 (with a gradient scaler; --precision=auto picks it)")
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda" and major >= 8:
        return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
    if device_type == "cuda":
        return "fp16", f"CUDA capability {major}.{minor} has no native bfloat16: float16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return "bf16", "this CPU computes bfloat16 natively (AMX or AVX512-BF16)"
    return "fp32", f"no native bfloat16 on this {device_type}"


def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively: AMX or AVX512-BF16 in Linux's /proc/cpuinfo."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""   # Linux only
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compile_blocker(run_device):
    """Why torch.compile cannot run on run_device ("" where it can): its inductor writes Triton kernels for a GPU
    (this script asks capability >= 8.0, its bf16 path) and C++ for a CPU, which needs a compiler (g++ on Linux,
    clang++ with Apple's command-line tools; Windows rarely has one)."""
    if run_device.startswith("cuda"):
        major = torch.cuda.get_device_capability()[0]
        return "" if major >= 8 else "needs a CUDA GPU of capability >= 8.0 (Triton, bf16)"
    if run_device == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        return "" if any(shutil.which(c) for c in compilers if c) else "needs a C++ compiler on a CPU (g++ or clang++)"
    return f"is not used on {run_device}"


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
        sys.exit(f"error: this PyTorch {torch.__version__} has GPU kernels for {' '.join(archs)}, none for "
                 f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a PyTorch build that lists "
                 f"sm_{major}{minor} (see the README, 'On a GPU'), or choose another GPU")


def save_grid(diffusion, ema, ctx, path):
    """A 4x4 grid of 16 EMA samples (DDIM, 50 steps, the same seed each time) into path."""
    with ctx:
        x, _ = diffusion.sample(ema, (16, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(seed), "ddim",
                                min(50, diffusion.timesteps))
    grid = Image.new("RGB", (4 * IMAGE_SIZE, 4 * IMAGE_SIZE))
    for i, array in enumerate(to_uint8(x)):
        grid.paste(Image.fromarray(array), ((i % 4) * IMAGE_SIZE, (i // 4) * IMAGE_SIZE))
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


def run_bench(run_device):
    """Training-step throughput of the configured UNet on random images, in each precision this device offers and
    in both memory layouts: forward, backward and Adam, after one warm-up step. No bf16 on CUDA below 8.0."""
    device_type = run_device.split(":")[0]
    for name in bench_precisions(device_type):
        for layout_name, layout in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            torch.manual_seed(seed)
            model, diffusion = build(model_config(), run_device, layout)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device_type == "cuda")
            scaler = torch.amp.GradScaler(device_type, enabled=name == "fp16")
            ctx = torch.autocast(device_type, dtype=torch.float16 if name == "fp16" else torch.bfloat16,
                                 enabled=name != "fp32")
            generator = torch.Generator(run_device).manual_seed(seed)
            x0 = (torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, device=run_device) * 2 - 1
                  ).contiguous(memory_format=layout)
            timed, start = -1, None
            while timed < 3 or (time.time() - start < 20 and timed < 20):   # >= 3 timed steps, up to 20 s
                if timed == 0:
                    synchronize(device_type)
                    start = time.time()
                with ctx:
                    loss = diffusion.loss(model, x0, generator)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                timed += 1
            synchronize(device_type)
            seconds = (time.time() - start) / timed
            print(f"{'preset ' + preset if preset else 'constants'}: "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, batch {batch_size}, {name}, "
                  f"{layout_name}: {seconds:.3f} s/step, {batch_size / seconds:.1f} images/s on {run_device} "
                  f"({num_threads} threads)", flush=True)


def bench_precisions(device_type):
    """The precisions --bench measures: fp32 and bf16, and fp16 on CUDA; no bf16 below CUDA capability 8.0."""
    if device_type != "cuda":
        return ["fp32", "bf16"]
    if torch.cuda.get_device_capability()[0] >= 8:
        return ["fp32", "bf16", "fp16"]
    print("note: no bf16 on a GPU below CUDA capability 8.0 (it has no bfloat16 units): fp32 and fp16 only")
    return ["fp32", "fp16"]


def synchronize(device_type):   # wait for the GPU's queued work before reading the clock
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:   # Ctrl-C outside training (sampling, the figure), or a second one in it: one line
        sys.exit("\nstopped by Ctrl-C")
