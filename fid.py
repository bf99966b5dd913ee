"""
Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") computed by hand, giving the numbers of the standard tool, pytorch-fid: the same
Inception-v3 network ported from TensorFlow, the same weights, the same preprocessing, the same statistics.

    python fid.py generated/ data/celeba                 # two folders (or .zip, .npy/.npz, stats .npz)
    python fid.py submission.zip data/celeba --kid       # also KID, less biased for 1,000 images
    python fid.py data/celeba --save_stats=celeba.npz    # statistics of one set, to reuse
    python fid.py submission.zip data/celeba --nearest=data/celeba  # + memorization check (needs images, not .npz)

The last line printed is `FID: <value>` (with --save_stats, where the statistics went). As a library:
    from fid import compute_fid
    fid = compute_fid("samples/", "data/celeba")
ddpm.py --run_fid calls the steps one by one (load_inception, extract_features, statistics, path_statistics,
frechet_distance), so that KID (kernel_inception_distance) reuses the features; ddpm.py reads images with
list_images. Each step maps onto a function of pytorch-fid, named in its docstring.
"""
import ast
import difflib
import hashlib
import io
import os
import pickle
import shutil
import sys
import time
import urllib.request
import warnings
import zipfile
import zlib
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
WEIGHTS_SHA256_PREFIX = "6726825d"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the files read from a folder or a .zip


# ----------------------------------------------------------------------------- reading images
class FIDInputError(ValueError):
    """A file that cannot be read, or written, as asked; the message is one line naming it."""


MIN_IMAGES = 2  # a covariance needs two samples; a FID worth reading needs thousands (see too_few_images)


def too_few_images(name, n):
    return FIDInputError(f"{name}: {n} image{'s' if n != 1 else ''}; a covariance needs at least {MIN_IMAGES}, and "
                         f"FID needs thousands for a stable number (10,000 is the usual; fewer bias it upwards)")


def decode_image(data, name):
    """Bytes of an image file -> float tensor (3, H, W) in [0, 1], as pytorch-fid reads them: RGB via PIL."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:  # PIL raises several kinds for a broken file
        raise FIDInputError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def is_mac_metadata(name):
    """Entries that macOS adds to the zips and folders it writes: __MACOSX/ (resource forks) and ._NAME
    (AppleDouble files, 4 KB of metadata next to every image on a FAT/exFAT drive). Never images."""
    parts = name.replace("\\", "/").split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._")


def _file_loader(file):
    """A function that reads and decodes one image file when called (see list_images)."""
    def load():
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:  # a broken link, no permission
            raise FIDInputError(f"{file}: cannot read ({e.strerror or e})") from None
        return decode_image(data, file)
    return load


def _zip_read(archive, name, path):
    """archive.read(name), a damaged entry being one line naming it (a function: a lambda cannot hold a try)."""
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:  # bad CRC, cut short
        raise FIDInputError(f"{path}/{name}: damaged zip entry ({e})") from None


def _first_line(error):
    """The first line of an exception's message (numpy's can run to several), or its type when it has none."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _np_load(path):
    """np.load, with every way a file can be damaged or foreign (truncated, not numpy, pickled objects, which
    are never loaded) turned into one line naming it."""
    try:
        return np.load(path)
    except FileNotFoundError:
        raise FIDInputError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDInputError(f"{path}: not a readable numpy file ({_first_line(e)})") from None


def _npz_arrays(path, data, keys):
    """The arrays `keys` of an open .npz, a damaged member (bad CRC, cut short) being one line naming it."""
    try:
        return [data[key] for key in keys]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise FIDInputError(f"{path}: damaged array in the .npz ({_first_line(e)})") from None


def load_array(path):
    """A uint8 array (N, H, W, 3) from .npy, or the first array of an .npz that has no mu/sigma."""
    data = _np_load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "mu" in data.files or "sigma" in data.files:
                raise FIDInputError(f"{path}: holds statistics ({', '.join(data.files)}), not images; KID and "
                                    f"--nearest need images")
            if not data.files:
                raise FIDInputError(f"{path}: an empty .npz: neither images nor statistics (mu, sigma)")
            data = _npz_arrays(path, data, data.files[:1])[0]
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        raise FIDInputError(f"{path}: expected a uint8 array of shape (N, H, W, 3), got {data.dtype} {data.shape}")
    return data


_noted_folders = set()  # folders whose skipped subfolders were already reported


def list_images(path):
    """The images of a folder, a .zip or a uint8 .npy/.npz array, as (name, loader) pairs in name order (an
    array's: in index order); an image is decoded only when its loader is called, so that one batch at a time is
    in memory as floats.
    A folder is read without its subfolders (one named like an image, 'x.jpg/', is skipped with a note);
    macOS metadata (__MACOSX/, ._*) is skipped; a damaged zip or array is a FIDInputError naming it."""
    path = str(path)
    if os.path.isdir(path):
        names, skipped = [], []
        for name in sorted(os.listdir(path)):
            if not name.lower().endswith(IMAGE_EXTENSIONS) or is_mac_metadata(name):
                continue
            (skipped if os.path.isdir(os.path.join(path, name)) else names).append(name)
        if skipped and path not in _noted_folders:  # once per folder, though it is listed more than once
            _noted_folders.add(path)
            print(f"note: {path}: skipped {len(skipped)} folder{'s' if len(skipped) > 1 else ''} named like an "
                  f"image ({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}): subfolders are not read",
                  file=sys.stderr)
        return [(os.path.join(path, n), _file_loader(os.path.join(path, n))) for n in names]
    if path.endswith(".zip"):
        # one open archive for all its images: reopening it per image re-reads its whole directory each time
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise FIDInputError(f"{path}: no such file") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # truncated, not a zip, a folder's name
            raise FIDInputError(f"{path}: not a readable zip file ({e}); a truncated download or copy?") from None
        names = sorted(n for n in archive.namelist()
                       if n.lower().endswith(IMAGE_EXTENSIONS) and not is_mac_metadata(n))
        return [(f"{path}/{n}", (lambda n=n: decode_image(_zip_read(archive, n, path), f"{path}/{n}")))
                for n in names]
    if path.endswith((".npy", ".npz")):
        array = load_array(path)
        return [(f"{path}[{i}]", (lambda i=i: torch.from_numpy(array[i]).permute(2, 0, 1).float() / 255))
                for i in range(len(array))]
    if not os.path.exists(path):
        raise FIDInputError(f"{path}: no such file or folder")
    raise FIDInputError(f"{path}: not a folder, .zip, .npy or .npz")


def is_statistics(path):
    """True for an .npz that holds statistics (a mu or a sigma) rather than images."""
    path = str(path)
    if not path.endswith(".npz"):
        return False
    data = _np_load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        return False  # a .npy under an .npz name: load_array reads it as images
    with data:
        return "mu" in data.files or "sigma" in data.files


def load_statistics(path, dims=None):
    """mu (d,), sigma (d, d) of a statistics .npz, checked: both present, of matching sizes, of `dims`
    features when given, finite. Every fault is one line naming the file."""
    path = str(path)
    data = _np_load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise FIDInputError(f"{path}: a single array, not statistics (an .npz holding mu and sigma)")
    with data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise FIDInputError(f"{path}: no {' and no '.join(missing)}: a statistics .npz holds both mu and sigma "
                                f"(python fid.py IMAGES --save_stats=OUT.npz writes one); it has "
                                f"{', '.join(data.files) or 'no arrays'}")
        mu, sigma = _npz_arrays(path, data, ("mu", "sigma"))
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit: expected (d,) and (d, d)")
    if dims is not None and len(mu) != dims:
        raise FIDInputError(f"{path}: statistics of {len(mu)} features, but the other side has {dims} "
                            f"(--dims={dims}): use statistics of the same feature size, or --dims={len(mu)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDInputError(f"{path}: the statistics hold NaN or inf values; recompute them")
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
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):  # Mixed_6a: halves the grid 35 -> 17
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


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
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> features (N, dims), dims 2048 (pool3, standard), 768, 192 or 64.
    pytorch-fid's InceptionV3 (use_fid_inception=True), whose FIDInceptionA, C, E_1 and E_2 are patched
    torchvision blocks; here the details above are written into InceptionA, C and E."""
    BLOCK_OF_DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}  # features are taken after this block

    def __init__(self, dims=2048):
        super().__init__()
        if dims not in self.BLOCK_OF_DIMS:
            raise ValueError(f"dims must be one of {list(self.BLOCK_OF_DIMS)}, got {dims}")
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


def weights_path(path=""):
    """The weights file: `path` if given, else pytorch-fid's copy in the torch hub cache, else downloaded
    there once, checked against its sha256 prefix."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--weights={path}: no such file")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    print(f"downloading the FID Inception weights (95 MB) to {cached}", file=sys.stderr)
    try:
        with urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise RuntimeError(f"cannot download the FID weights from {WEIGHTS_URL} ({e}); download the file on "
                           f"a machine with internet and pass --weights=PATH or put it at {cached}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise RuntimeError(f"the downloaded weights have sha256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...")
    with open(cached + ".part", "wb") as f:
        f.write(data)
    os.replace(cached + ".part", cached)  # atomic: an interrupted download leaves no half file behind
    return cached


def load_inception(dims=2048, weights="", device="cpu"):
    """The network with the weights file's state_dict (pytorch-fid's fid_inception_v3, which loads the same file).
    The file is read with weights_only=True: a plain state_dict of tensors loads, a pickle that would run code is
    refused (one line) and never runs."""
    model = InceptionV3(dims)
    path = weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: a crafted or foreign file
        reason = next((line.strip().split(". ")[0] for line in str(e).splitlines() if "Unsupported" in line),
                      "it holds more than tensors, numbers and strings")
        raise FIDInputError(f"{path}: not a plain state_dict of tensors; refused to load it ({reason})") from None
    except Exception as e:  # truncated, empty, not written by torch.save: torch raises many kinds
        first_sentence = _first_line(e).split(". ")[0][:120]
        raise FIDInputError(f"{path}: not a readable weights file ({type(e).__name__}: {first_sentence}); a truncated "
                            f"download? delete it to download it again") from None
    if not isinstance(state, dict):
        raise FIDInputError(f"{path}: holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    if missing or unexpected or wrong:
        raise FIDInputError(f"{path}: not the FID Inception weights (pt_inception-2015-12-05): {len(missing)} "
                            f"missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped entries, e.g. "
                            f"{(missing + unexpected + wrong)[0]}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


# ----------------------------------------------------------------------------- features and statistics
@torch.no_grad()
def extract_features(model, path, batch_size=50, device="cpu", progress=True):
    """(N, dims) float64 features of every image under `path` (pytorch-fid's get_activations), batch_size images
    per forward pass; with `progress`, a line on stderr every 10 s."""
    images = list_images(path)
    if len(images) == 0:
        raise FIDInputError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    features, start, last_print = [], time.time(), 0.0
    for i in range(0, len(images), batch_size):
        batch = [load() for _, load in images[i: i + batch_size]]
        if len({tuple(t.shape) for t in batch}) > 1:  # mixed sizes: resize each first, as the model would
            batch = [F.interpolate(t[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
                     for t in batch]
        features.append(model(torch.stack(batch).to(device)).double().cpu())
        done, elapsed = min(i + batch_size, len(images)), time.time() - start
        if progress and (time.time() - last_print > 10 or done == len(images)):
            rate = done / max(elapsed, 1e-9)
            print(f"  {path}: {done}/{len(images)} images, {rate:.1f} images/s, "
                  f"{(len(images) - done) / rate:.0f} s left", file=sys.stderr)
            last_print = time.time()
    return torch.cat(features).numpy()


def statistics(features, name="the features"):
    """Mean and covariance of the features, as pytorch-fid's calculate_activation_statistics: np.cov with
    rowvar=False (divides by N-1).
    Fewer than 2 rows, or a NaN/inf feature, is a FIDInputError: a NaN covariance would otherwise send
    scipy's sqrtm into a loop of minutes."""
    features = np.atleast_2d(features)
    if len(features) < MIN_IMAGES:
        raise too_few_images(name, len(features))
    if not np.isfinite(features).all():
        raise FIDInputError(f"{name}: the Inception features hold NaN or inf values (NaN weights, or NaN "
                            f"images in a float array?)")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def path_statistics(path, model, batch_size=50, device="cpu"):
    """mu, sigma of `path` (pytorch-fid's compute_statistics_of_path): read from a statistics .npz (keys mu and
    sigma, checked against model.dims), or computed from its images (at least 2)."""
    path = str(path)
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
        raise FIDInputError(f"statistics of different sizes: mu {mu1.shape} sigma {sigma1.shape} against "
                            f"mu {mu2.shape} sigma {sigma2.shape}")
    # checked before sqrtm, which on a NaN matrix of 192 or more rows loops for minutes instead of failing
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise FIDInputError("the statistics hold NaN or inf values (a set of one image? NaN features?)")
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
            raise FIDInputError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm: bad statistics?")
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


# ----------------------------------------------------------------------------- saving statistics (--save_stats)
def check_output(path, flag="--save_stats", need_bytes=0):
    """Before any expensive work: `path` can be written (its folder exists, it is not a folder, a file can be
    created next to it) and its disk has need_bytes free. Each fault is one line naming the path."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FIDInputError(f"{flag}={path}: is a folder; give a file name such as {os.path.join(path, 'stats.npz')}")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FIDInputError(f"{flag}={path}: the folder {folder} {what}; create it first")
    probe = path + ".tmp"
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise FIDInputError(f"{flag}={path}: cannot write in {folder} ({e.strerror or e})") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise FIDInputError(f"{flag}={path}: {free / 2**20:.1f} MB free in {folder}, the file needs about "
                            f"{need_bytes / 2**20:.1f} MB")


def save_statistics(path, mu, sigma):
    """mu and sigma to `path` (.npz, as pytorch-fid's save_fid_stats writes them) atomically: written to path.tmp,
    then renamed over path, so that a kill or a full disk leaves the previous file whole (and no half file)."""
    path, tmp = str(path), str(path) + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a file object: numpy would otherwise append .npz to a name without it
            np.savez_compressed(f, mu=mu, sigma=sigma)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C: no half file stays behind, the previous one is untouched
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        raise FIDInputError(f"{path}: cannot write the statistics ({e.strerror or e}); the previous file, if any, "
                            f"is unchanged") from None


# =============================================================================================================
# extras, beyond the standard tool (pytorch-fid has neither): KID (--kid) and the memorization check (--nearest)
# =============================================================================================================
def kernel_inception_distance(features1, features2, n_subsets=100, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared MMD (Gretton et
    al. 2012, "A Kernel Two-Sample Test") with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
    over random subsets. Unlike FID it has no bias that grows as the sample shrinks, so 1,000 images give an
    honest number. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = features1.shape[1]
    m = min(subset_size, len(features1), len(features2))
    if m < 2:  # the unbiased estimate divides by m (m - 1)
        raise too_few_images("KID", m)
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


def report_nearest(gen_names, gen_features, train_names, train_features):
    """Prints how close the generated images come to the training images, and lists (up to 10) those closer to
    one than 99% of training images are to their nearest neighbour: likely copied."""
    distance, index, yardstick = nearest_neighbours(gen_features, train_features)
    threshold = np.percentile(yardstick, 1)
    close = np.flatnonzero(distance < threshold)
    print(f"nearest training image: median distance {np.median(distance):.2f} (training images to each other: "
          f"median {np.median(yardstick):.2f}, 1st percentile {threshold:.2f})")
    print(f"{len(close)} of {len(distance)} generated images are closer to a training image than 99% of "
          f"training images are to their nearest neighbour" + (" -- possible memorization:" if len(close) else ""))
    for i in close[np.argsort(distance[close])][:10]:
        print(f"  {gen_names[i]}  ~  {train_names[index[i]]}  (distance {distance[i]:.2f})")


# ======================================================================================== end of the extras


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


def preflight(paths):
    """Every check that needs no network and no feature, before the first one is extracted: each input can be
    listed and has >= 2 images, each statistics .npz is whole, finite, of `dims` features and not given where
    images are needed (--kid, --nearest, --save_stats), and the output of --save_stats can be written."""
    if save_stats:  # mu and sigma in float64, and a megabyte to spare
        check_output(save_stats, "--save_stats", need_bytes=8 * (dims * dims + dims) + 2**20)
    for path in paths:
        if is_statistics(path):
            if kid or nearest or save_stats:
                raise FIDInputError(f"{path}: holds statistics (mu, sigma), not images; "
                                    f"{'--save_stats needs' if save_stats else 'KID and --nearest need'} images")
            load_statistics(path, dims)
            continue
        n = len(list_images(path))
        if n == 0:
            raise FIDInputError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
        if n < MIN_IMAGES:
            raise too_few_images(path, n)


def main(paths):
    """The command line's work: FID of two paths (and KID with --kid, the memorization check with --nearest), or
    the statistics of one path (--save_stats)."""
    if len(paths) != (1 if save_stats else 2):
        raise FIDInputError("usage: python fid.py PATH1 PATH2 [--kid] [--nearest=TRAIN]  or  "
                            "python fid.py PATH --save_stats=OUT.npz")
    preflight(paths + ([nearest] if nearest else []))
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_inception(dims, weights, run_device)
    if save_stats:
        save_statistics(save_stats, *path_statistics(paths[0], model, batch_size, run_device))
        print(f"saved mu and sigma of {paths[0]} to {save_stats}")
        return
    if kid or nearest:  # these need the features themselves, not only the statistics
        features = [extract_features(model, p, batch_size, run_device) for p in paths]
        stats = [statistics(f, p) for f, p in zip(features, paths)]
    else:
        stats = [path_statistics(p, model, batch_size, run_device) for p in paths]
    if nearest:
        train_features = extract_features(model, nearest, batch_size, run_device)
        report_nearest([n for n, _ in list_images(paths[0])], features[0],
                       [n for n, _ in list_images(nearest)], train_features)
    if kid:
        kid_mean, kid_std = kernel_inception_distance(*features, kid_subsets, kid_subset_size, seed)
        print(f"KID: {kid_mean:.6f} +- {kid_std:.6f}")
    print(f"FID: {frechet_distance(*stats[0], *stats[1])}")


if __name__ == "__main__":
    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    args = parse_overrides(sys.argv[1:], globals(), CHECKS)
    try:
        main(args)
    except (FIDInputError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # nothing to save: the only output, --save_stats, is written whole at the end
        print("interrupted: nothing written", file=sys.stderr)
        sys.exit(130)
