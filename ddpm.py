"""
Denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020, "DDPM") on 64x64 CelebA faces (homework part
2-2): noise schedule, UNet, training (Algorithm 1), sampling (Algorithm 2, and DDIM by Song et al. 2021), a
figure of 5 images being denoised, and 1,000 samples 1.jpg..1000.jpg zipped flat into submission.zip.

    python ddpm.py --train --data_dir=data/celeba --out_dir=out/ddpm --preset=gpu     # or --preset=cpu
    python ddpm.py --sample --out_dir=out/ddpm --n=1000 --sampler=ddim --steps=100 --submission=submission.zip
    python ddpm.py --denoise_figure --out_dir=out/ddpm                                # out_dir/denoising.png
    python ddpm.py --sample ... --fid --fid_ref=data/celeba                           # + FID and KID (fid.py)
    torchrun --nproc_per_node=4 ddpm.py --train ...                                   # DDP, as nanoGPT does it

Training keeps out_dir/ckpt.pt (model, EMA, optimizer, step, config; written atomically), samples_<step>.png
grids, loss.csv and loss.png. Run the same --train command again to resume.
"""
import copy
import io
import math
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fid import FIDInputError, list_images, parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
train = False           # Algorithm 1 on data_dir
sample = False          # n samples with the EMA weights -> images_dir and submission
denoise_figure = False  # out_dir/denoising.png: 5 images from x_T to x_0
bench = False           # images/s of training steps of the preset on random images (no data needed)
data_dir = "data/celeba"  # a folder of images, a .zip, or a uint8 .npy of shape (N, 64, 64, 3)
out_dir = "out/ddpm"
preset = "cpu"          # "gpu" or "cpu": the UNet size and batch below (see PRESETS); explicit flags win
# forward process
timesteps = 1000        # T
schedule = "linear"     # "linear" (Ho et al. 4: 1e-4..0.02) or "cosine" (Nichol & Dhariwal 2021, eq. 17)
beta_start = 1e-4
beta_end = 0.02
# UNet (the cpu preset's values; --preset=gpu replaces those not given on the command line)
channels = 32           # base width
channel_mults = "1,2,2,2"  # width multiplier per resolution level: 64, 32, 16, 8
num_res_blocks = 1      # residual blocks per level
attn_resolutions = "16"  # self-attention at these feature-map sizes
dropout = 0.0
# training
batch_size = 32
lr = 2e-4
warmup_steps = 1000     # linear learning-rate warmup (Ho et al. use 5000)
grad_clip = 1.0
ema_decay = 0.9995      # EMA of the weights, used for sampling (Ho et al. use 0.9999 over 800k steps)
max_steps = 100000
max_minutes = 0.0       # stop cleanly (checkpoint saved) after this long; 0 = no limit
log_every = 50
sample_every = 2000     # steps between sample grids (DDIM, 50 steps)
ckpt_every = 500
seed = 1337
device = ""             # "" = cuda if available, else cpu
amp = True              # bfloat16 autocast on CUDA
compile = False         # torch.compile the UNet (CUDA)
num_threads = 2         # CPU threads per process
# sampling
n = 1000                # images to generate
sampler = "ddim"        # "ddpm" (Algorithm 2, T steps) or "ddim" (steps, eta)
steps = 100             # DDIM steps S
eta = 0.0               # DDIM: 0 = deterministic, 1 = DDPM's posterior variance
variance = "beta"       # DDPM sigma_t^2: "beta" (beta_t) or "posterior" (beta~_t); Ho et al. 3.2 found both similar
sample_batch = 100
images_dir = ""         # where 1.jpg..n.jpg go; "" = out_dir/images
submission = "submission.zip"
fid = False             # after sampling: FID and KID against fid_ref through fid.py
fid_ref = ""            # a folder, zip or statistics .npz; "" = data_dir
fid_weights = ""        # the FID Inception weights file; "" = torch hub cache, else download (see fid.py)
fid_dims = 2048         # Inception feature size: 2048 is the standard FID (64, 192, 768 for quick looks)
# -----------------------------------------------------------------------------

PRESETS = {
    # close to the CelebA-64 model of the DDIM paper (Song et al. 2021, appendix D.1): 128 channels,
    # multipliers 1,2,2,2,4, 2 blocks per level, attention at 16x16, dropout 0.1
    "gpu": dict(channels=128, channel_mults="1,2,2,2,4", num_res_blocks=2, attn_resolutions="16", dropout=0.1,
                batch_size=64, lr=2e-4, ema_decay=0.9999, warmup_steps=1000, sample_every=5000),
    # small enough for a 2-core CPU (see the README for its images/s)
    "cpu": dict(channels=32, channel_mults="1,2,2,2", num_res_blocks=1, attn_resolutions="16", dropout=0.0,
                batch_size=32, lr=2e-4, ema_decay=0.9995, warmup_steps=1000, sample_every=2000),
}
IMAGE_SIZE = 64


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
    """A random batch scaled to [-1, 1] with random horizontal flips (Ho et al. appendix B)."""
    indices = torch.randint(len(images), (batch,), generator=generator)
    x = images[indices].float() / 127.5 - 1
    flip = torch.rand(batch, generator=generator) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


# ----------------------------------------------------------------------------- forward process
def make_betas(schedule, timesteps, beta_start=1e-4, beta_end=0.02):
    if schedule == "linear":                      # Ho et al. section 4: linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":                      # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0)
        s = 0.008
        steps_ = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps_ + s) / (1 + s) * math.pi / 2) ** 2
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

    @staticmethod
    def gather(buffer, t, x):
        """buffer[t] for a batch of steps t, shaped to broadcast over images like x, in x's dtype."""
        return buffer.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4, reparameterised)."""
        return self.gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
        mean = self.gather(self.posterior_mean_coef1, t, xt) * x0 + self.gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self.gather(self.posterior_variance, t, xt)

    def predict_x0(self, xt, t, eps):
        return self.gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self.gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def loss(self, model, x0, generator):
        """Algorithm 1: t ~ Uniform, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2 (L_simple, eq. 14)."""
        t = torch.randint(self.timesteps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t).float(), noise)

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

    @torch.no_grad()
    def ddim_sample(self, model, shape, generator, steps=100, eta=0.0, record=()):
        """DDIM with `steps` evenly spaced steps of the T (eta = 1 and steps = T give Algorithm 2 with beta~_t)."""
        if not 1 <= steps <= self.timesteps:
            raise SystemExit(f"DDIM steps must be between 1 and T={self.timesteps}, got {steps}")
        device = next(model.parameters()).device
        x = torch.randn(shape, generator=generator).to(device)
        sequence = np.linspace(0, self.timesteps - 1, steps).round().astype(int).tolist()
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


def default_device():
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_eps(model, x, t):
    with autocast(x.device.type):
        return model(x, t).float()


def autocast(device_type):
    use = amp and device_type == "cuda"
    return torch.autocast("cuda" if use else "cpu", dtype=torch.bfloat16, enabled=use)


# ----------------------------------------------------------------------------- UNet (Ho et al. appendix B)
def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step (Transformer positional encoding, Vaswani et al. 3.5)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)   # 32 groups, as in the paper, when the width allows


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; the time embedding added; GroupNorm, SiLU, dropout, 3x3 conv; a skip path."""

    def __init__(self, in_channels, out_channels, time_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = nn.Linear(time_dim, out_channels)
        self.norm2, self.dropout = group_norm(out_channels), nn.Dropout(dropout)
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

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)   # (b, hw, c) each
        attended = F.scaled_dot_product_attention(q, k, v)            # softmax(q k^T / sqrt(c)) v
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, channels, channel_mults, num_res_blocks, attn_resolutions, dropout, image_size=IMAGE_SIZE):
        super().__init__()
        time_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        # down path: num_res_blocks blocks per level, then a stride-2 conv; every output is kept for a skip
        self.down = nn.ModuleList()
        skip_channels, width, resolution = [channels], channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResidualBlock(width, channels * mult, time_dim, dropout)]))
                width = channels * mult
                if resolution in attn_resolutions:
                    self.down[-1].append(SelfAttention(width))
                skip_channels.append(width)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skip_channels.append(width)
                resolution //= 2
        self.middle = nn.ModuleList([ResidualBlock(width, width, time_dim, dropout), SelfAttention(width),
                                     ResidualBlock(width, width, time_dim, dropout)])
        # up path: num_res_blocks + 1 blocks per level, each taking one skip, then nearest upsampling + conv
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResidualBlock(width + skip_channels.pop(), channels * mult,
                                                             time_dim, dropout)]))
                width = channels * mult
                if resolution in attn_resolutions:
                    self.up[-1].append(SelfAttention(width))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(width, width, 3, padding=1)]))
                resolution *= 2
        self.norm_out, self.conv_out = group_norm(width), nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t):
        time_embedding = self.time_mlp(timestep_embedding(t, self.channels))
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, time_embedding) if isinstance(layer, ResidualBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, time_embedding) if isinstance(layer, ResidualBlock) else layer(h)
        for layers in self.up:
            if isinstance(layers[0], ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, time_embedding) if isinstance(layer, ResidualBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def model_config():
    return dict(channels=channels, channel_mults=[int(m) for m in channel_mults.split(",")],
                num_res_blocks=num_res_blocks, attn_resolutions=[int(r) for r in attn_resolutions.split(",") if r],
                dropout=dropout, schedule=schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end)


def build(config):
    model = UNet(config["channels"], config["channel_mults"], config["num_res_blocks"], config["attn_resolutions"],
                 config["dropout"])
    diffusion = Diffusion(make_betas(config["schedule"], config["timesteps"], config["beta_start"], config["beta_end"]))
    return model, diffusion


# ----------------------------------------------------------------------------- training (Algorithm 1)
def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)   # an interrupted save never leaves a half-written checkpoint


def train_model(data_dir, out_dir):
    ddp = int(os.environ.get("RANK", -1)) != -1                     # launched by torchrun, as in nanoGPT
    run_device = default_device()
    rank, world_size = 0, 1
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if run_device.startswith("cuda"):
            run_device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(run_device)
        dist.init_process_group(backend="nccl" if run_device.startswith("cuda") else "gloo")
    master = rank == 0
    os.makedirs(out_dir, exist_ok=True)
    images = load_images(data_dir)
    config = model_config()
    torch.manual_seed(seed)
    model, diffusion = build(config)
    model.to(run_device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step = 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        checkpoint = torch.load(ckpt_path, map_location=run_device, weights_only=False)
        if checkpoint["config"] != config:
            raise SystemExit(f"{ckpt_path} was trained with another configuration; use another --out_dir")
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    if master:
        print(f"{len(images)} images from {data_dir}; UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"parameters; {config}; batch {batch_size} x {world_size} process(es) on {run_device}")
    raw_model = model
    if compile and run_device.startswith("cuda"):
        model = torch.compile(model)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[run_device] if run_device.startswith("cuda") else None)

    def save():
        save_atomic({"model": raw_model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": config}, ckpt_path)

    start, loss_sum, loss_count, start_step = time.time(), 0.0, 0, step
    deadline = start + max_minutes * 60 if max_minutes > 0 else float("inf")
    loss_log = open(os.path.join(out_dir, "loss.csv"), "a") if master else None
    while step < max_steps:
        # every random draw of a step comes from (seed, step, rank): a resumed run repeats it exactly
        generator = torch.Generator().manual_seed(seed + step * world_size + rank)
        torch.manual_seed(seed + step * world_size + rank)          # dropout masks, too
        x0 = training_batch(images, batch_size, generator).to(run_device)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup_steps)
        with autocast(run_device.split(":")[0]):
            loss = diffusion.loss(model, x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        # EMA with a decay that starts low and rises to ema_decay, so early averages are not dominated by noise
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), raw_model.parameters()):
                ema_p.lerp_(p.detach(), 1 - decay)
        step += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if master and (step % log_every == 0 or step == max_steps):
            rate = (step - start_step) * batch_size * world_size / (time.time() - start)
            left = min((max_steps - step) * batch_size * world_size / rate, deadline - time.time())
            print(f"step {step}/{max_steps} loss {loss_sum / loss_count:.4f} lr {optimizer.param_groups[0]['lr']:.1e} "
                  f"{rate:.1f} images/s, {(time.time() - start) / 60:.1f} min so far, about {left / 60:.1f} min left",
                  flush=True)
            loss_log.write(f"{step},{loss_sum / loss_count:.6f}\n")
            loss_log.flush()
            loss_sum, loss_count = 0.0, 0
        if master and step % sample_every == 0:
            grid, _ = diffusion.ddim_sample(ema, (16, 3, IMAGE_SIZE, IMAGE_SIZE), torch.Generator().manual_seed(seed),
                                            steps=min(50, diffusion.timesteps))
            save_grid(grid, os.path.join(out_dir, f"samples_{step:07d}.png"), columns=4)
        out_of_time = time.time() > deadline
        if master and (step % ckpt_every == 0 or step == max_steps or out_of_time):
            save()
        if out_of_time:
            if master:
                print(f"stopped after {max_minutes} minutes at step {step}; checkpoint saved, run the same command "
                      f"to resume")
            break
    if master:
        loss_log.close()
        plot_loss(os.path.join(out_dir, "loss.csv"), os.path.join(out_dir, "loss.png"))
    if ddp:
        dist.destroy_process_group()
    return step


# ----------------------------------------------------------------------------- sampling and outputs
def load_ema(out_dir, run_device):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: train first (python ddpm.py --train --out_dir={out_dir})")
    checkpoint = torch.load(path, map_location=run_device, weights_only=False)
    model, diffusion = build(checkpoint["config"])
    model.load_state_dict(checkpoint["ema"])
    return model.to(run_device).eval(), diffusion


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(model, diffusion, count, generator):
    """count images in batches of sample_batch, with the sampler chosen above."""
    outputs = []
    for s in range(0, count, sample_batch):
        shape = (min(sample_batch, count - s), 3, IMAGE_SIZE, IMAGE_SIZE)
        if sampler == "ddpm":
            x, _ = diffusion.ddpm_sample(model, shape, generator, variance)
        elif sampler == "ddim":
            x, _ = diffusion.ddim_sample(model, shape, generator, steps, eta)
        else:
            raise SystemExit(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        outputs.append(to_uint8(x))
        print(f"generated {s + shape[0]}/{count}", flush=True)
    return np.concatenate(outputs)


def write_submission(images, folder, zip_path):
    """1.jpg..N.jpg (64x64 RGB JPEG) into folder, and the same files at the root of zip_path, nothing else."""
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, array in enumerate(images, 1):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "JPEG", quality=95)
            with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
                f.write(buffer.getvalue())
            archive.writestr(f"{i}.jpg", buffer.getvalue())


def sample_command(out_dir):
    run_device = default_device()
    model, diffusion = load_ema(out_dir, run_device)
    start = time.time()
    images = generate(model, diffusion, n, torch.Generator().manual_seed(seed))
    folder = images_dir or os.path.join(out_dir, "images")
    write_submission(images, folder, submission)
    print(f"{n} images ({sampler}, {steps if sampler == 'ddim' else diffusion.timesteps} steps) in "
          f"{time.time() - start:.0f} s: {folder}/1.jpg..{n}.jpg and {submission}")
    if fid:
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
    return fid_value


def denoising_figure(out_dir, columns=10):
    """5 images (rows) from x_T to x_0 (columns at evenly spaced steps), with the sampler chosen above."""
    run_device = default_device()
    model, diffusion = load_ema(out_dir, run_device)
    generator = torch.Generator().manual_seed(seed)
    shape = (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    if sampler == "ddpm":
        record = set(np.linspace(0, diffusion.timesteps, columns).round().astype(int).tolist())
        _, kept = diffusion.ddpm_sample(model, shape, generator, variance, record=record)
    else:
        sequence = np.linspace(0, diffusion.timesteps - 1, steps).round().astype(int)
        record = set(sequence[np.linspace(0, steps - 1, columns - 1).round().astype(int)].tolist()) | {diffusion.timesteps}
        _, kept = diffusion.ddim_sample(model, shape, generator, steps, eta, record=record)
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


def run_bench(n_steps=10):
    """Training-step throughput of the current configuration: forward, backward and Adam on random images."""
    run_device = default_device()
    torch.manual_seed(seed)
    model, diffusion = build(model_config())
    model.to(run_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(run_device) * 2 - 1
    for i in range(n_steps + 2):                       # two warm-up steps, then the timed ones
        if i == 2:
            if run_device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.time()
        with autocast(run_device.split(":")[0]):
            loss = diffusion.loss(model, x0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if run_device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.time() - start) / n_steps
    print(f"preset {preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, batch {batch_size}, "
          f"{seconds:.3f} s/step, {batch_size / seconds:.1f} images/s on {run_device} ({num_threads} threads)")


def apply_preset(argv):
    """--preset=gpu|cpu sets the UNet and batch constants it lists, except those given on the command line."""
    if preset not in PRESETS:
        raise SystemExit(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    explicit = {arg[2:].partition("=")[0] for arg in argv}
    globals().update({k: v for k, v in PRESETS[preset].items() if k not in explicit})


if __name__ == "__main__":
    parse_overrides(sys.argv[1:], globals())
    apply_preset(sys.argv[1:])
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
