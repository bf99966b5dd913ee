"""
Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") computed by hand, giving the numbers of the standard tool, pytorch-fid: the same
Inception-v3 network ported from TensorFlow, the same weights, the same preprocessing, the same statistics.

    python fid.py generated/ data/celeba                 # two folders (or .zip, .npy/.npz, stats .npz)
    python fid.py submission.zip data/celeba --kid       # also KID, less biased for 1,000 images
    python fid.py data/celeba --save_stats=celeba.npz    # statistics of one set, to reuse
    python fid.py submission.zip data/celeba --nearest=data/celeba  # + memorization check (needs images, not .npz)

The last line printed is `FID: <value>` (with --save_stats, where the statistics went). As a library:
compute_fid("samples/", "data/celeba"), or step by step as ddpm.py --run_fid does: load_inception,
extract_features, statistics (or path_statistics), frechet_distance, kernel_inception_distance. Each step maps
onto a function of pytorch-fid, named in its docstring.
"""
import ast
import difflib
import functools
import io
import os
import sys
import time
import warnings
import zipfile
from tokenize import COMMENT, generate_tokens

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
batch_size = 50         # images per forward pass
device = ""             # "" = cuda if available, else cpu
dims = 2048             # feature size: 2048 (pool3, the standard), 768, 192 or 64
weights = ""            # path of pt_inception-2015-12-05-6726825d.pth; "" = torch hub cache, else download
save_stats = ""         # write mu and sigma of the first path to this .npz and stop
kid = False             # also print the Kernel Inception Distance
kid_subsets = 100       # KID: number of random subsets ...
kid_subset_size = 1000  # ... and their size (clipped to the smaller set)
nearest = ""            # a training set: report how close the first path's images come to it
seed = 0                # for KID's subsets
# -----------------------------------------------------------------------------

# values with a fixed set of choices or a range, checked before any work (see parse_overrides)
CHECKS = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1"), "dims": (2048, 768, 192, 64),
    "kid_subsets": (lambda v: v >= 1, "an integer >= 1"), "kid_subset_size": (lambda v: v >= 2, "an integer >= 2"),
    "save_stats": (lambda v: v == "" or v.endswith(".npz"), "a file name ending in .npz")
}
# pytorch-fid's weights file; its name ends in the first 8 hex digits of its sha256, checked after a download
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the files read from a folder or a .zip


# ----------------------------------------------------------------------------- reading images
# Every fault of an input is a ValueError or OSError whose message is one line naming the file; main prints it.
def list_images(path):
    """The images of `path` in reading order: a folder's image files (not its subfolders), a zip's image entries,
    or the rows of a uint8 .npy/.npz array (as indices). macOS metadata (__MACOSX/, ._*) is never an image."""
    path = str(path)
    if os.path.isdir(path):
        return [n for n in sorted(os.listdir(path)) if is_image_name(n) and os.path.isfile(os.path.join(path, n))]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(".zip"):
        return sorted(n for n in open_file(path).namelist() if is_image_name(n))
    if path.endswith((".npy", ".npz")):
        return list(range(len(load_array(path))))
    raise ValueError(f"{path}: not a folder, .zip, .npy or .npz")


def is_image_name(name):
    """An image's file name, and not one of the files macOS adds beside them: __MACOSX/ (resource forks) and
    ._NAME (AppleDouble metadata that a Mac writes next to every file on a FAT or exFAT drive)."""
    parts = name.split("/")
    return name.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in parts and not parts[-1].startswith("._")


def read_image(path, name):
    """One image of list_images(path) as a float tensor (3, H, W) in [0, 1], read as pytorch-fid reads it: RGB
    through PIL."""
    path = str(path)
    if isinstance(name, int):  # a row of a uint8 array
        return torch.from_numpy(load_array(path)[name]).permute(2, 0, 1).float() / 255
    try:
        file = os.path.join(path, name) if os.path.isdir(path) else io.BytesIO(open_file(path).read(name))
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:  # an unreadable file, a bad CRC in a zip, a broken image: each library raises its kinds
        raise ValueError(f"{os.path.join(path, name)}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def open_file(path):
    """A .zip as an open ZipFile, or a .npy/.npz as a dict of its arrays, opened once for all its images
    (reopening a zip per image re-reads its whole directory); a file written again is opened again."""
    return open_version(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def open_version(path, modified):
    try:
        if path.endswith(".zip"):
            return zipfile.ZipFile(path)
        data = np.load(path)  # pickled objects are never loaded (allow_pickle=False)
        if isinstance(data, np.ndarray):
            return {"": data}
        with data:
            return dict(data)
    except Exception as e:  # truncated, not a zip or numpy file, a damaged array: each library raises its kinds
        reason = (str(e) or "no data").splitlines()[0]
        raise ValueError(f"{path}: not a readable {path[-3:]} file ({reason}); a truncated download or copy?") from None


def load_array(path):
    """The uint8 images (N, H, W, 3) of a .npy, or of the first array of an .npz without statistics."""
    arrays = open_file(path)
    if "mu" in arrays or "sigma" in arrays or not arrays:
        raise ValueError(f"{path}: no images but {', '.join(arrays) or 'no arrays'}; KID, --nearest and "
                         f"--save_stats need images, not statistics (mu, sigma)")
    images = next(iter(arrays.values()))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected a uint8 array of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def is_statistics(path):
    """True for an .npz that holds statistics (a mu or a sigma) rather than images."""
    return str(path).endswith(".npz") and any(key in open_file(str(path)) for key in ("mu", "sigma"))


def load_statistics(path, dims=None):
    """mu (d,), sigma (d, d) of a statistics .npz, checked: both present, of matching sizes, of `dims` features
    when given, finite."""
    arrays = open_file(str(path))
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or len(mu) != (dims or len(mu)):
        raise ValueError(f"{path}: holds {', '.join(f'{k} {v.shape}' for k, v in arrays.items()) or 'nothing'}; "
                         f"statistics are mu (d,) and sigma (d, d), d = {dims or 'the feature size'} (python fid.py "
                         f"IMAGES --save_stats=OUT.npz writes them; --dims=d picks the feature size)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: the statistics hold NaN or inf values; recompute them")
    return mu.astype(np.float64), sigma.astype(np.float64)


# ----------------------------------------------------------------------------- the network
# Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision") as in
# TensorFlow's 2015-12-05 graph, which the original FID code (Heusel et al.'s TTUR) used. pytorch-fid ported it;
# its module names are kept so that pytorch-fid's weights file loads with strict=True. Three details differ
# from the Inception-v3 of torchvision, and each changes the features:
#   1. the average pools inside the blocks do not count the zero padding (count_include_pad=False);
#   2. the last block (Mixed_7c) pools its branch_pool with a max pool, not an average pool;
#   3. the classifier has 1008 outputs (unused for FID, but its weights are in the file).
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 0.001, as TF) -> ReLU"""

    def __init__(self, in_channels, out_channels, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):  # detail 1: the average is over the real pixels only, also at the border
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d: 1x1, 5x5, double 3x3 and pool branches, side by side
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        five = self.branch5x5_2(self.branch5x5_1(x))
        return torch.cat([self.branch1x1(x), five, double, self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionB(nn.Module):  # Mixed_6a: halves the grid 35 -> 17
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):  # Mixed_6b..6e: 7x7 convolutions factored into 1x7 and 7x1
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        return torch.cat([self.branch1x1(x), seven, double, self.branch_pool(avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):  # Mixed_7a: halves the grid 17 -> 8
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        seven = x
        for i in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{i}")(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):  # Mixed_7b, 7c: 3x3 convolutions split into parallel 1x3 and 3x1
    def __init__(self, in_channels, max_pool_branch):
        super().__init__()
        self.max_pool_branch = max_pool_branch  # detail 2: True for Mixed_7c
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool_branch else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(three), self.branch3x3_2b(three),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)], dim=1)


class InceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> features (N, dims), dims 2048 (pool3, standard), 768, 192 or 64.
    pytorch-fid's InceptionV3 (use_fid_inception=True), whose FIDInceptionA, C, E_1 and E_2 are patched
    torchvision blocks; here the details above are written into InceptionA, C and E."""
    BLOCK_OF_DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}  # features are taken after this block

    def __init__(self, dims=2048):
        super().__init__()
        self.dims = dims
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)  # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)            # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)            # (after a max pool: 73)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)           # -> 71
        self.Mixed_5b = InceptionA(192, pool_features=32)                  # (after a max pool: 35)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)                                    # -> 17
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)                                    # -> 8
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(2048, 1008)                                    # detail 3 (not used for FID)

    def blocks(self):
        """The four stages after which features can be taken (pytorch-fid's 64/192/768/2048 outputs)."""
        pool = lambda x: F.max_pool2d(x, kernel_size=3, stride=2)
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def forward(self, images):
        # the standard preprocessing (pytorch-fid's resize_input and normalize_input): bilinear resize to
        # 299x299 (align_corners=False, no antialiasing), then [0, 1] -> [-1, 1], the TF network's input range
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for block in self.blocks()[: self.BLOCK_OF_DIMS[self.dims] + 1]:
            for layer in block:
                x = layer(x)
        return x.mean(dim=(2, 3))  # global average pool over the grid ("pool3" for 2048)

def load_inception(dims=2048, weights="", device="cpu"):
    """The network with pytorch-fid's weights file (its fid_inception_v3 loads the same file): `weights`, or the
    copy in the torch hub cache, downloaded there once (its sha256 checked against the prefix in its name). The
    file is read with weights_only=True: a plain state_dict of tensors loads, a pickle that would run code is
    refused and never runs."""
    model = InceptionV3(dims)
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
    try:
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location="cpu", check_hash=True,
                                                       weights_only=True)
        shapes = {k: getattr(v, "shape", None) for k, v in state.items()}  # a state_dict: a dict of tensors
        wrong = [k for k, v in model.state_dict().items() if shapes.pop(k, None) != v.shape] + list(shapes)
    except Exception as e:  # no such file, no network, cut short, not torch's, a pickle of more than tensors
        reason = (str(e) or "no data").splitlines()[0].split(". ")[0][:100]
        raise ValueError(f"{path}: cannot load the FID weights ({type(e).__name__}: {reason}); only a plain state_dict "
                         f"of tensors is loaded: give one with --weights=PATH, or delete a damaged download") from None
    if wrong:
        raise ValueError(f"{path}: not the FID Inception weights (pt_inception-2015-12-05): {len(wrong)} missing, "
                         f"unexpected or mis-shaped entries, e.g. {wrong[0]}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


# ----------------------------------------------------------------------------- features and statistics
@torch.no_grad()
def extract_features(model, path, batch_size=50, device="cpu", progress=True):
    """(N, dims) float64 features of every image of `path` (pytorch-fid's get_activations), batch_size images
    per forward pass; with `progress`, a line on stderr every 10 s."""
    names = list_images(path)
    if not names:
        raise ValueError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    features, last_print = [], time.time()
    for first in range(0, len(names), batch_size):
        batch = [read_image(path, name) for name in names[first:first + batch_size]]
        if len({t.shape for t in batch}) > 1:  # mixed sizes: resize each first, as the model would
            batch = [F.interpolate(t[None], size=(299, 299), mode="bilinear", align_corners=False)[0] for t in batch]
        features.append(model(torch.stack(batch).to(device)).double().cpu())
        if progress and time.time() - last_print > 10:
            print(f"  {path}: {first + len(batch)}/{len(names)} images", file=sys.stderr)
            last_print = time.time()
    return torch.cat(features).numpy()


def too_few_images(name, n):
    return (f"{name}: {n} image{'s' * (n != 1)}; a covariance needs at least 2, and FID needs thousands for a "
            f"stable number (10,000 is the usual; fewer bias it upwards)")


def statistics(features, name="the features"):
    """Mean and covariance of the features, as pytorch-fid's calculate_activation_statistics: np.cov with
    rowvar=False (divides by N-1). Checked first: fewer than 2 rows, or a NaN/inf feature, would give a NaN
    covariance, and scipy's sqrtm loops for minutes on one."""
    features = np.atleast_2d(features)
    if len(features) < 2:
        raise ValueError(too_few_images(name, len(features)))
    if not np.isfinite(features).all():
        raise ValueError(f"{name}: the Inception features hold NaN or inf values (NaN weights, or NaN images?)")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def path_statistics(path, model, batch_size=50, device="cpu"):
    """mu, sigma of `path` (pytorch-fid's compute_statistics_of_path): read from a statistics .npz (keys mu and
    sigma, checked against model.dims), or computed from its images (at least 2)."""
    if is_statistics(path):
        return load_statistics(path, model.dims)
    return statistics(extract_features(model, path, batch_size, device), path)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet (2-Wasserstein)
    distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982); between Gaussians
    fitted to Inception features it is the FID (Heusel et al. 2017). pytorch-fid's calculate_frechet_distance."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:  # (d,) * 2 = (d, d)
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} sigma {sigma1.shape} against "
                         f"mu {mu2.shape} sigma {sigma2.shape}")
    # checked before sqrtm, which on a NaN matrix of 192 or more rows loops for minutes instead of failing
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the statistics hold NaN or inf values (a set of one image? NaN features?)")
    diff = mu1 - mu2
    product = sigma1 @ sigma2
    covmean = linalg.sqrtm(product)
    # With fewer samples than dimensions (1,000 images, 2,048 features) both covariances are singular, and
    # so is their product. sqrtm then may fail (inf or nan), or return a root that does not square back to
    # the product. Either way add eps to the diagonals and take the root again: pytorch-fid's remedy, which it
    # applies only to the first case (the second here too, as a wrong root would give a wrong FID silently).
    if not np.isfinite(covmean).all() or \
            np.abs(covmean @ covmean - product).max() > 1e-3 * max(np.abs(product).max(), 1e-12):
        warnings.warn(f"fid: sqrtm of a singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # The product of two covariance matrices has real, non-negative eigenvalues, so its root is real up to
    # rounding: a small imaginary part is dropped, a large one means the statistics are wrong.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm: bad statistics?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_fid(path1, path2, batch_size=50, device=None, dims=2048, weights=""):
    """FID between two sets of images (folders, zips, uint8 arrays) or saved statistics (pytorch-fid's
    calculate_fid_given_paths)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_inception(dims, weights, device)
    mu1, sigma1 = path_statistics(path1, model, batch_size, device)
    mu2, sigma2 = path_statistics(path2, model, batch_size, device)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------- main
def main(paths):
    """The command line's work: FID of two paths (and KID with --kid, the memorization check with --nearest), or
    the statistics of one path (--save_stats). The output and every input are checked before the first feature."""
    if len(paths) != (1 if save_stats else 2):
        raise ValueError("usage: python fid.py PATH1 PATH2 [--kid] [--nearest=TRAIN]  or  "
                         "python fid.py PATH --save_stats=OUT.npz")
    if save_stats:
        check_writable(save_stats)
    for path in paths + ([nearest] if nearest else []):
        if is_statistics(path) and not (kid or nearest or save_stats):
            load_statistics(path, dims)
        elif len(list_images(path)) < 2:  # a statistics .npz is no image set: list_images says so
            raise ValueError(too_few_images(path, len(list_images(path))))
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_inception(dims, weights, run_device)
    if save_stats:
        save_statistics(save_stats, *path_statistics(paths[0], model, batch_size, run_device))
        print(f"saved mu and sigma of {paths[0]} to {save_stats}")
        return
    # the features themselves (KID and --nearest need them), or a statistics file's mu and sigma
    features = [None if is_statistics(p) else extract_features(model, p, batch_size, run_device) for p in paths]
    stats = [load_statistics(p, dims) if f is None else statistics(f, p) for p, f in zip(paths, features)]
    if nearest:
        report_nearest(paths[0], features[0], nearest, extract_features(model, nearest, batch_size, run_device))
    if kid:
        kid_mean, kid_std = kernel_inception_distance(*features, kid_subsets, kid_subset_size, seed)
        print(f"KID: {kid_mean:.6f} +- {kid_std:.6f}")
    print(f"FID: {frechet_distance(*stats[0], *stats[1])}")


# --- robustness (read last) ---
def check_writable(path):
    """Before any long work: a file can be written at `path` (tried as path.tmp); an OSError naming it if not."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--save_stats={path}: is a folder; give a file name such as {path}/stats.npz")
    open(path + ".tmp", "wb").close()  # its OSError names the file: no such folder, no permission
    os.remove(path + ".tmp")


def save_statistics(path, mu, sigma):
    """mu and sigma to `path` (.npz, as pytorch-fid's save_fid_stats writes them), whole or not at all: written to
    path.tmp, then renamed over path, so that a kill or a full disk leaves the previous file as it was."""
    path = str(path)
    try:
        with open(path + ".tmp", "wb") as f:  # a file object: numpy would otherwise append .npz to the name
            np.savez_compressed(f, mu=mu, sigma=sigma)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise OSError(f"{path}: cannot write the statistics ({e.strerror or e}); the previous file, if any, is "
                      f"unchanged") from None
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


# --- extras (not the lesson) ---
def kernel_inception_distance(features1, features2, n_subsets=100, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared MMD (Gretton et
    al. 2012, "A Kernel Two-Sample Test") with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
    over random subsets. Unlike FID it has no bias that grows as the sample shrinks, so 1,000 images give an
    honest number. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = features1.shape[1]
    m = min(subset_size, len(features1), len(features2))
    if m < 2:  # the unbiased estimate divides by m (m - 1)
        raise ValueError(too_few_images("KID", m))
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3
    estimates = []
    for _ in range(n_subsets):
        x = features1[rng.choice(len(features1), m, replace=False)]
        y = features2[rng.choice(len(features2), m, replace=False)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        # MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2
        within_sets = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within_sets - 2 * k_xy.sum() / m ** 2)
    return float(np.mean(estimates)), float(np.std(estimates))


def nearest_neighbours(generated, training):
    """For each generated feature, the Euclidean distance to its nearest training feature and that image's
    index; and, as the yardstick, each training feature's distance to its nearest other training feature."""
    def squared_distances(a, b):
        return np.maximum((a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None, :], 0)
    gen_to_train = squared_distances(generated, training)
    train_to_train = squared_distances(training, training)
    np.fill_diagonal(train_to_train, np.inf)
    return np.sqrt(gen_to_train.min(1)), gen_to_train.argmin(1), np.sqrt(train_to_train.min(1))


def report_nearest(gen_path, gen_features, train_path, train_features):
    """Prints how close the generated images come to the training images, and lists (up to 10) those closer to
    one than 99% of training images are to their nearest neighbour: likely copied."""
    distance, index, yardstick = nearest_neighbours(gen_features, train_features)
    threshold = np.percentile(yardstick, 1)
    close = np.flatnonzero(distance < threshold)
    print(f"nearest training image: median distance {np.median(distance):.2f} (training images to each other: "
          f"median {np.median(yardstick):.2f}, 1st percentile {threshold:.2f})")
    print(f"{len(close)} of {len(distance)} generated images are closer to a training image than 99% of "
          f"training images are to their nearest neighbour" + (" -- possible memorization:" if len(close) else ""))
    gen_names, train_names = list_images(gen_path), list_images(train_path)
    for i in close[np.argsort(distance[close])][:10]:
        print(f"  {gen_path}/{gen_names[i]}  ~  {train_path}/{train_names[index[i]]}  (distance {distance[i]:.2f})")


# ----------------------------------------------------------------------------- command line
# nanoGPT's configurator, checked: --name=value overrides a constant of the configuration block at the top. The same
# lines stand in tokenizer.py, fid.py and bleu.py (a test keeps them identical), so that every script is one file.
def config_block(path):
    """[(name, comment)] for each line between '# configuration' and the next '# ---' line of a script's source:
    `name = value  # comment` gives its name, a comment line alone is a heading, (None, heading)."""
    block = open(path, encoding="utf-8").read().split("\n# configuration", 1)[1].split("\n# ---", 1)[0]
    entries = []
    for line in block.splitlines()[1:]:
        tokens = list(generate_tokens(io.StringIO(line).readline))  # Python's own reading of the line
        comment = next((t.string[1:].strip() for t in tokens if t.type == COMMENT), "")
        entries.append((tokens[0].string if tokens[1].string == "=" else None, comment))
    return entries


def parse_value(flag, text, default):
    """text as the type of the default: True/true/1 or False/false/0 for a bool, a Python literal for a number
    (an int is fine where a float is expected), anything for a string (a quoted one is unquoted)."""
    if isinstance(default, bool) and text in ("True", "true", "1", "False", "false", "0"):
        return text in ("True", "true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, str):
        return value if isinstance(value, str) else text
    if type(value) is not type(default) and (type(default), type(value)) != (float, int):
        kind = {bool: "True or False", int: "an integer", float: "a number"}[type(default)]
        raise SystemExit(f"error: {flag} takes {kind} (like {default!r}), got {text!r}")
    return type(default)(value)


def parse_overrides(argv, config, checks=None):
    """Set config[name] (a script's globals()) for every --name=value in argv and return the other arguments.
    -h/--help prints the docstring and every constant with the value a run would use, then exits.
    checks: {name: allowed values, or (predicate, "what it accepts")}, tested after the overrides so that an edited
    constant is checked too. Every mistake stops with one line naming the flag, before any work starts."""
    entries = config_block(config["__file__"])
    names = [name for name, _ in entries if name]
    positional = [arg for arg in argv if not arg.startswith("--") and arg != "-h"]
    for name, has_value, text in [arg[2:].partition("=") for arg in argv if arg.startswith("--") and arg != "--help"]:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean --{close[0]}?" if close else "--help lists the options"
            raise SystemExit(f"error: unknown option --{name} ({hint})")
        if not has_value and not isinstance(config[name], bool):
            raise SystemExit(f"error: --{name} needs a value: --{name}=VALUE (now {config[name]!r})")
        config[name] = parse_value(f"--{name}", text, config[name]) if has_value else True
        print(f"overriding: {name} = {config[name]!r}")
    if "-h" in argv or "--help" in argv:
        print(config["__doc__"].strip() + "\n\noptions (--name=value; a bare --name sets a bool to True):")
        for name, comment in entries:
            print(f"  {name} = {config[name]!r}".ljust(40) + f"# {comment}" if name else f"\n  {comment}")
        raise SystemExit(0)
    for name, rule in (checks or {}).items():
        if callable(rule[0]) and not rule[0](config[name]):
            raise SystemExit(f"error: --{name} must be {rule[1]}, got {config[name]!r}")
        if not callable(rule[0]) and config[name] not in rule:
            raise SystemExit(f"error: --{name} must be one of {', '.join(map(repr, rule))}, got {config[name]!r}")
    return positional


if __name__ == "__main__":
    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    args = parse_overrides(sys.argv[1:], globals(), CHECKS)
    try:
        main(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # nothing to save: the only output, --save_stats, is written whole at the end
        sys.exit("interrupted: nothing written")
