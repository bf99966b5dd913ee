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
extract_features, statistics (or load_statistics), frechet_distance, kernel_inception_distance. Each step maps
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
from collections import OrderedDict
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
CHECKS = {"batch_size": (lambda v: v >= 1, "an integer >= 1"), "kid_subsets": (lambda v: v >= 1, "an integer >= 1"),
          "kid_subset_size": (lambda v: v >= 2, "an integer >= 2"), "dims": (2048, 768, 192, 64),
          "save_stats": (lambda v: v == "" or v.endswith(".npz"), "a file name ending in .npz")}
# pytorch-fid's weights file; its name ends in the first 8 hex digits of its sha256, checked after a download
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the files read from a folder or a .zip


# ----------------------------------------------------------------------------- reading images
# Every fault of an input is a ValueError or OSError whose one-line message names the file; main prints it.
@functools.lru_cache(maxsize=4)
def open_version(path, modified):
    """A .zip as an open ZipFile, a .npy/.npz as its uint8 images (N, H, W, 3) (of an .npz, its first array), or a
    statistics .npz as a dict of its arrays. Read once for all its images (reopening a zip per image re-reads its
    whole directory); `modified`, the file's time, is part of the cache's key: a file written again is read again."""
    try:
        if path.endswith(".zip"):
            return zipfile.ZipFile(path)
        data = np.load(path)  # pickled objects are never loaded (allow_pickle=False)
        arrays = {"": data} if isinstance(data, np.ndarray) else dict(data)  # an .npz's file closes as it goes
    except Exception as e:  # truncated, not a zip or numpy file, a damaged array: each library raises its kinds
        reason = (str(e) or "no data").splitlines()[0]
        raise ValueError(f"{path}: not a readable {path[-3:]} file ({reason}); a truncated download or copy?") from None
    if "mu" in arrays or "sigma" in arrays:
        return arrays
    images = next(iter(arrays.values()), np.zeros(0))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected a uint8 array of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def open_file(path):
    """open_version(path) of a .zip, .npy or .npz that exists; any other path is a one-line error naming it."""
    modified = os.stat(path).st_mtime_ns  # its OSError names a missing file or folder
    if not str(path).endswith((".zip", ".npy", ".npz")):
        raise ValueError(f"{path}: not a folder, .zip, .npy or .npz")
    return open_version(str(path), modified)


def is_statistics(path):
    """True for an .npz that holds statistics (a mu or a sigma) rather than images."""
    return str(path).endswith(".npz") and isinstance(open_file(path), dict)


def load_statistics(path, dims=None):
    """mu (d,), sigma (d, d) of a statistics .npz, checked: both present, of matching sizes, of `dims` features
    when given, finite."""
    arrays = open_file(path)
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or len(mu) != (dims or len(mu)):
        raise ValueError(f"{path}: holds {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}; statistics are "
                         f"mu (d,) and sigma (d, d), d = {dims or 'the feature size'} (--save_stats writes them)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: the statistics hold NaN or inf values; recompute them")
    return mu.astype(np.float64), sigma.astype(np.float64)


def list_images(path):
    """The images of `path` in reading order: a folder's image files (not its subfolders), a zip's image entries,
    or the rows of a uint8 .npy/.npz array (as indices). The files macOS adds beside images are never images:
    __MACOSX/ (resource forks) and ._NAME (AppleDouble metadata, written next to every file on a FAT drive)."""
    if os.path.isdir(path):
        names = [n for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
    elif str(path).endswith(".zip"):
        names = sorted(open_file(path).namelist())
    elif is_statistics(path):
        raise ValueError(f"{path}: statistics (mu, sigma), not images; KID, --nearest and --save_stats need images")
    else:
        return list(range(len(open_file(path))))
    return [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in n.split("/")
            and not n.split("/")[-1].startswith("._")]


def read_image(path, name):
    """One image of list_images(path) as a float tensor (3, H, W) in [0, 1], read as pytorch-fid reads it: RGB
    through PIL."""
    if isinstance(name, int):  # a row of a uint8 array
        return torch.from_numpy(open_file(path)[name]).permute(2, 0, 1).float() / 255
    try:
        file = os.path.join(path, name) if os.path.isdir(path) else io.BytesIO(open_file(path).read(name))
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as e:  # an unreadable file, a bad CRC in a zip, a broken image: each library raises its kinds
        raise ValueError(f"{os.path.join(path, name)}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


# ----------------------------------------------------------------------------- the network
# Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision") as in
# TensorFlow's 2015-12-05 graph, which the original FID code (Heusel et al.'s TTUR) used. pytorch-fid ported it;
# its module names are kept so that pytorch-fid's weights file loads with strict=True. Three details differ
# from the Inception-v3 of torchvision, and each changes the features:
#   1. the average pools inside the blocks do not count the zero padding (count_include_pad=False);
#   2. the last block (Mixed_7c) pools its branch_pool with a max pool, not an average pool;
#   3. the classifier has 1008 outputs (unused for FID, but its weights are in the file).
def conv_bn_relu(in_channels, out_channels, **conv_args):
    """conv (no bias) -> batch norm (eps 0.001, as TF) -> ReLU: pytorch-fid's BasicConv2d, its parts named as there"""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, bias=False, **conv_args),
                                     bn=nn.BatchNorm2d(out_channels, eps=0.001), relu=nn.ReLU()))


# The 3x3 pools of the blocks, by the names their tables give them: "avg" and "max" keep the grid, "max/2" halves it
POOLS = {"avg": nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),  # detail 1: only real pixels count
         "max": nn.MaxPool2d(3, stride=1, padding=1),                             # detail 2: Mixed_7c's branch_pool
         "max/2": nn.MaxPool2d(3, stride=2)}


# The Inception blocks (pytorch-fid's InceptionA to E) as tables. A block runs its branches side by side on its
# input and concatenates their outputs along the channels. A branch is an optional pool, then a chain of
# convolutions (name, out channels, kernel[, stride]): at stride 1 one pads to keep the grid (TF's "SAME"), at
# stride 2 it does not ("VALID"). Branches that start with the same steps share them: they run once (InceptionE).
def inception_a(pool_features):  # Mixed_5b..5d: 1x1, 5x5, double 3x3 and pool branches
    return [[("branch1x1", 64, 1)],
            [("branch5x5_1", 48, 1), ("branch5x5_2", 64, 5)],
            [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3), ("branch3x3dbl_3", 96, 3)],
            ["avg", ("branch_pool", pool_features, 1)]]


def inception_b():  # Mixed_6a: halves the grid 35 -> 17
    return [[("branch3x3", 384, 3, 2)],
            [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3), ("branch3x3dbl_3", 96, 3, 2)],
            ["max/2"]]


def inception_c(c7):  # Mixed_6b..6e: 7x7 convolutions factored into 1x7 and 7x1, c7 channels between them
    return [[("branch1x1", 192, 1)],
            [("branch7x7_1", c7, 1), ("branch7x7_2", c7, (1, 7)), ("branch7x7_3", 192, (7, 1))],
            [("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, (7, 1)), ("branch7x7dbl_3", c7, (1, 7)),
             ("branch7x7dbl_4", c7, (7, 1)), ("branch7x7dbl_5", 192, (1, 7))],
            ["avg", ("branch_pool", 192, 1)]]


def inception_d():  # Mixed_7a: halves the grid 17 -> 8
    return [[("branch3x3_1", 192, 1), ("branch3x3_2", 320, 3, 2)],
            [("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, (1, 7)), ("branch7x7x3_3", 192, (7, 1)),
             ("branch7x7x3_4", 192, 3, 2)],
            ["max/2"]]


def inception_e(pool_kind):  # Mixed_7b, 7c: 3x3 convolutions split into a 1x3 and a 3x1 side by side
    three, double = ("branch3x3_1", 384, 1), [("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, 3)]
    return [[("branch1x1", 320, 1)],
            [three, ("branch3x3_2a", 384, (1, 3))], [three, ("branch3x3_2b", 384, (3, 1))],
            [*double, ("branch3x3dbl_3a", 384, (1, 3))], [*double, ("branch3x3dbl_3b", 384, (3, 1))],
            [pool_kind, ("branch_pool", 192, 1)]]


class Mixed(nn.Module):
    """One Inception block, built from its table: a conv_bn_relu per convolution, named as in pytorch-fid."""

    def __init__(self, in_channels, branches):
        super().__init__()
        self.branches = branches
        for branch in branches:
            channels = in_channels
            for name, out_channels, kernel, *stride in [step for step in branch if not isinstance(step, str)]:
                stride = stride[0] if stride else 1
                setattr(self, name, conv_bn_relu(channels, out_channels, kernel_size=kernel, stride=stride,
                                                 padding="same" if stride == 1 else 0))
                channels = out_channels

    def forward(self, x):
        done = {}  # the output of each step; a step that two branches share (InceptionE's) runs once
        for branch in self.branches:
            y = x
            for step in branch:
                if step not in done:
                    done[step] = POOLS[step](y) if isinstance(step, str) else getattr(self, step[0])(y)
                y = done[step]
        return torch.cat([done[branch[-1]] for branch in self.branches], dim=1)  # each branch's last step


class InceptionV3(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> features (N, dims), dims 2048 (pool3, standard), 768, 192 or 64.
    pytorch-fid's InceptionV3 (use_fid_inception=True), whose FIDInceptionA, C, E_1 and E_2 are patched
    torchvision blocks; here the details above are written into the tables."""
    LAST_LAYER = {64: "maxpool1", 192: "maxpool2", 768: "Mixed_6e", 2048: "Mixed_7c"}  # pytorch-fid's outputs

    def __init__(self, dims=2048):
        super().__init__()
        self.dims = dims
        self.Conv2d_1a_3x3 = conv_bn_relu(3, 32, kernel_size=3, stride=2)  # 299 -> 149
        self.Conv2d_2a_3x3 = conv_bn_relu(32, 32, kernel_size=3)            # -> 147
        self.Conv2d_2b_3x3 = conv_bn_relu(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2)                           # -> 73
        self.Conv2d_3b_1x1 = conv_bn_relu(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv_bn_relu(80, 192, kernel_size=3)           # -> 71
        self.maxpool2 = nn.MaxPool2d(3, stride=2)                           # -> 35
        self.Mixed_5b = Mixed(192, inception_a(pool_features=32))
        self.Mixed_5c = Mixed(256, inception_a(pool_features=64))
        self.Mixed_5d = Mixed(288, inception_a(pool_features=64))
        self.Mixed_6a = Mixed(288, inception_b())                          # -> 17
        self.Mixed_6b = Mixed(768, inception_c(c7=128))
        self.Mixed_6c = Mixed(768, inception_c(c7=160))
        self.Mixed_6d = Mixed(768, inception_c(c7=160))
        self.Mixed_6e = Mixed(768, inception_c(c7=192))
        self.Mixed_7a = Mixed(768, inception_d())                          # -> 8
        self.Mixed_7b = Mixed(1280, inception_e(pool_kind="avg"))
        self.Mixed_7c = Mixed(2048, inception_e(pool_kind="max"))         # detail 2
        self.fc = nn.Linear(2048, 1008)                                    # detail 3 (not used for FID)

    def forward(self, images):
        # the standard preprocessing (pytorch-fid's resize_input and normalize_input): bilinear resize to
        # 299x299 (align_corners=False, no antialiasing), then [0, 1] -> [-1, 1], the TF network's input range
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name, layer in self.named_children():  # the layers in the order they are made above
            x = layer(x)
            if name == self.LAST_LAYER[self.dims]:
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
        model.load_state_dict(state, strict=True)  # every name and shape of pt_inception-2015-12-05, no other
    except Exception as e:  # no such file, no network, cut short, not torch's, a pickle of more than tensors
        reason = " ".join((str(e) or "no data").split()).split(". ")[0][:150]  # its first sentence, on one line
        raise ValueError(f"{path}: cannot load the FID weights ({type(e).__name__}: {reason}); only a plain state_dict "
                         f"of tensors is loaded: give one with --weights=PATH, or delete a damaged download") from None
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


def statistics(features, name="the features"):
    """Mean and covariance of the features, as pytorch-fid's calculate_activation_statistics: np.cov with
    rowvar=False (divides by N-1). Checked first: fewer than 2 rows would give a NaN covariance, on which scipy's
    sqrtm loops for minutes (frechet_distance checks for NaN, from NaN images or weights, as well)."""
    if len(features) < 2:
        raise ValueError(f"{name}: {len(features)} image{'s' * (len(features) != 1)}; a covariance needs at least 2, "
                         f"and FID needs thousands for a stable number (10,000 is the usual; fewer bias it upwards)")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet (2-Wasserstein)
    distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982); between Gaussians
    fitted to Inception features it is the FID (Heusel et al. 2017). pytorch-fid's calculate_frechet_distance."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:  # (d,) * 2 = (d, d)
        raise ValueError(f"statistics of different sizes: {mu1.shape} {sigma1.shape}, {mu2.shape} {sigma2.shape}")
    # checked before sqrtm, which on a NaN matrix of 192 or more rows loops for minutes instead of failing
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the statistics hold NaN or inf values (a set of one image? NaN features?)")
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
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_fid(path1, path2, batch_size=50, device=None, dims=2048, weights=""):
    """FID between two sets of images (folders, zips, uint8 arrays) or saved statistics (pytorch-fid's
    calculate_fid_given_paths, whose compute_statistics_of_path is the loop's line)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_inception(dims, weights, device)
    stats = [load_statistics(path, dims) if is_statistics(path) else
             statistics(extract_features(model, path, batch_size, device), path) for path in (path1, path2)]
    return frechet_distance(*stats[0], *stats[1])


# ----------------------------------------------------------------------------- main
def main(paths):
    """The command line's work: FID of two paths (and KID with --kid, the memorization check with --nearest), or
    the statistics of one path (--save_stats). The output and every input are checked before the first feature."""
    if len(paths) != (1 if save_stats else 2):
        raise ValueError("usage: fid.py PATH1 PATH2 [--kid] [--nearest=TRAIN]  or  fid.py PATH --save_stats=OUT.npz")
    if save_stats:
        check_writable(save_stats)
    for k, path in enumerate(paths + ([nearest] if nearest else [])):   # images: for KID all, for --nearest and
        if is_statistics(path) and not (kid or save_stats or (nearest and k != 1)):   # --save_stats not the 2nd
            load_statistics(path, dims)
        elif len(list_images(path)) < 2:  # a statistics .npz is no image set: list_images says so
            raise ValueError(f"{path}: {len(list_images(path))} image(s); FID needs at least 2, and thousands")
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_inception(dims, weights, run_device)
    # the features themselves (KID and --nearest need them), or a statistics file's mu and sigma
    features = [None if is_statistics(p) else extract_features(model, p, batch_size, run_device) for p in paths]
    stats = [load_statistics(p, dims) if f is None else statistics(f, p) for p, f in zip(paths, features)]
    if save_stats:
        save_statistics(save_stats, *stats[0])
        print(f"saved mu and sigma of {paths[0]} to {save_stats}")
        return
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
    try:
        with open(f"{path}.tmp", "wb") as f:  # a file object: numpy would otherwise append .npz to the name
            np.savez_compressed(f, mu=mu, sigma=sigma)
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        raise OSError(f"{path}: cannot write the statistics ({e.strerror or e}); the previous file, if any, is "
                      f"unchanged") from None
    finally:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")


# --- extras (not the lesson) ---
def kernel_inception_distance(features1, features2, n_subsets=100, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared MMD (Gretton et
    al. 2012, "A Kernel Two-Sample Test") with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
    over random subsets. Unlike FID it has no bias that grows as the sample shrinks, so 1,000 images give an
    honest number. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(features1), len(features2))
    if m < 2:  # the unbiased estimate divides by m (m - 1)
        raise ValueError(f"KID: {m} image(s) in the smaller set; the unbiased estimate needs at least 2")
    kernel = lambda a, b: (a @ b.T / features1.shape[1] + 1) ** 3  # d = features1.shape[1]
    estimates = []
    for _ in range(n_subsets):
        x = features1[rng.choice(len(features1), m, replace=False)]
        y = features2[rng.choice(len(features2), m, replace=False)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        # MMD^2_u = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2
        within_sets = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates.append(within_sets - 2 * k_xy.sum() / m ** 2)
    return float(np.mean(estimates)), float(np.std(estimates))


def squared_distances(a, b):  # |a_i - b_j|^2 = |a_i|^2 - 2 a_i.b_j + |b_j|^2, all pairs at once
    return np.maximum((a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None, :], 0)


def report_nearest(gen_path, generated, train_path, training):
    """Prints how close the generated images come to the training images, and lists (up to 10) those closer to
    one than 99% of training images are to their nearest neighbour: likely copied. For each generated feature:
    the Euclidean distance to its nearest training feature and that image's index; the yardstick: each training
    feature's distance to its nearest other training feature."""
    gen_to_train = squared_distances(generated, training)
    train_to_train = squared_distances(training, training)
    np.fill_diagonal(train_to_train, np.inf)
    distance, index, yardstick = np.sqrt(gen_to_train.min(1)), gen_to_train.argmin(1), np.sqrt(train_to_train.min(1))
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
        kind = {bool: "True or False", int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
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
    try:
        main(parse_overrides(sys.argv[1:], globals(), CHECKS))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # nothing to save: the only output, --save_stats, is written whole at the end
        sys.exit("interrupted: nothing written")
