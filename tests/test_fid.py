"""fid.py: the network against the standard weights' manifest and an independent functional forward, the
distance against closed forms, and the inputs (folder, zip, npy, stats) against each other."""
import ast
import difflib
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from conftest import ROOT, real_data_path


# ----------------------------------------------------------------------------- the network
def test_state_dict_matches_the_standard_weights_manifest():
    shapes = {k: list(v.shape) for k, v in fid.InceptionV3().state_dict().items()}
    manifest = real_data_path("fid")
    if manifest is not None:
        assert shapes == json.loads((manifest / "pt_inception_2015_12_05_shapes.json").read_text())
    else:  # a few entries of the manifest, for runs without $DL_DATA
        assert len(shapes) == 566
        assert shapes["fc.weight"] == [1008, 2048] and shapes["Mixed_7c.branch_pool.conv.weight"] == [192, 2048, 1, 1]
        assert shapes["Conv2d_1a_3x3.bn.num_batches_tracked"] == []


def random_weights(seed=0):
    """A state dict of the standard's keys and shapes, with He-initialised convolutions and random batch-norm
    statistics, so that activations neither vanish nor explode through the 94 layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in fid.InceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("conv.weight") or key == "fc.weight":
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator, dtype=torch.float64) * (2 / fan_in) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator, dtype=torch.float64)
        else:  # running_mean, bn.bias, fc.bias
            state[key] = 0.1 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
    return state


def random_weights_float32(seed=0):
    """random_weights as the real file stores them: float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in random_weights(seed).items()}


# An independent forward pass, written from TensorFlow's Inception-v3 graph with plain functions over the
# state dict: "VALID" convolutions have no padding, "SAME" ones pad by half the kernel; average pools divide
# by the number of real pixels in the window; Mixed_7c pools by maximum; the input is resized with half-pixel
# bilinear interpolation, written out by hand below.
def conv(state, name, x, stride=1, same=True):
    weight = state[f"{name}.conv.weight"]
    padding = (weight.shape[2] // 2, weight.shape[3] // 2) if same else 0
    x = F.conv2d(x, weight, stride=stride, padding=padding)
    scale = state[f"{name}.bn.weight"] / torch.sqrt(state[f"{name}.bn.running_var"] + 0.001)
    x = (x - state[f"{name}.bn.running_mean"][:, None, None]) * scale[:, None, None] + state[f"{name}.bn.bias"][:, None, None]
    return torch.clamp(x, min=0)


def avg_pool_real_pixels(x):
    window_sum = F.conv2d(x, torch.ones(x.shape[1], 1, 3, 3, dtype=x.dtype), padding=1, groups=x.shape[1])
    real_pixels = F.conv2d(torch.ones_like(x[:, :1]), torch.ones(1, 1, 3, 3, dtype=x.dtype), padding=1)
    return window_sum / real_pixels


def max_pool(x, stride, pad):
    x = F.pad(x, (pad,) * 4, value=-float("inf"))
    windows = x.unfold(2, 3, stride).unfold(3, 3, stride)
    return windows.amax(dim=(-1, -2))


def resize_half_pixel(images, size=299):
    def axis_weights(n_in):
        source = ((torch.arange(size, dtype=torch.float64) + 0.5) * n_in / size - 0.5).clamp(min=0)
        low = source.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        return low, high, source - low
    low_y, high_y, wy = axis_weights(images.shape[2])
    low_x, high_x, wx = axis_weights(images.shape[3])
    rows = images[:, :, low_y] * (1 - wy)[:, None] + images[:, :, high_y] * wy[:, None]
    return rows[..., low_x] * (1 - wx) + rows[..., high_x] * wx


def reference_features(state, images):
    s, x = state, 2 * resize_half_pixel(images) - 1
    x = conv(s, "Conv2d_1a_3x3", x, stride=2, same=False)
    x = conv(s, "Conv2d_2a_3x3", x, same=False)
    x = max_pool(conv(s, "Conv2d_2b_3x3", x), 2, 0)
    x = conv(s, "Conv2d_3b_1x1", x)
    x = max_pool(conv(s, "Conv2d_4a_3x3", x, same=False), 2, 0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        c = lambda branch, inp, **kw: conv(s, f"{name}.{branch}", inp, **kw)
        x = torch.cat([c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x)),
                       c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
                       c("branch_pool", avg_pool_real_pixels(x))], 1)
    c = lambda branch, inp, **kw: conv(s, f"Mixed_6a.{branch}", inp, **kw)
    x = torch.cat([c("branch3x3", x, stride=2, same=False),
                   c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)), stride=2, same=False),
                   max_pool(x, 2, 0)], 1)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        c = lambda branch, inp, **kw: conv(s, f"{name}.{branch}", inp, **kw)
        seven = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        double = x
        for i in range(1, 6):
            double = c(f"branch7x7dbl_{i}", double)
        x = torch.cat([c("branch1x1", x), seven, double, c("branch_pool", avg_pool_real_pixels(x))], 1)
    c = lambda branch, inp, **kw: conv(s, f"Mixed_7a.{branch}", inp, **kw)
    seven = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x)))
    x = torch.cat([c("branch3x3_2", c("branch3x3_1", x), stride=2, same=False),
                   c("branch7x7x3_4", seven, stride=2, same=False), max_pool(x, 2, 0)], 1)
    for name, pool in (("Mixed_7b", avg_pool_real_pixels), ("Mixed_7c", lambda t: max_pool(t, 1, 1))):
        c = lambda branch, inp, **kw: conv(s, f"{name}.{branch}", inp, **kw)
        three, double = c("branch3x3_1", x), c("branch3x3dbl_2", c("branch3x3dbl_1", x))
        x = torch.cat([c("branch1x1", x), c("branch3x3_2a", three), c("branch3x3_2b", three),
                       c("branch3x3dbl_3a", double), c("branch3x3dbl_3b", double), c("branch_pool", pool(x))], 1)
    return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def model_and_reference():
    state = random_weights()
    model = fid.InceptionV3().double().eval()
    model.load_state_dict(state, strict=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        reference = reference_features(state, images)
    return model, images, reference, state


def test_features_equal_the_independent_forward(model_and_reference):
    model, images, reference, _ = model_and_reference
    with torch.no_grad():
        ours = model(images)
    assert ours.shape == (2, 2048) and reference.std() > 1e-3  # the activations did not die out
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mutation", ["pool counts padding", "avg pool in Mixed_7c", "align_corners resize",
                                      "antialiased resize", "no [-1, 1] scaling"])
def test_the_check_catches_each_wrong_detail(model_and_reference, monkeypatch, mutation):
    """Each standard detail matters: a model with one of them wrong no longer equals the reference."""
    model, images, reference, state = model_and_reference
    interpolate = F.interpolate
    if mutation == "pool counts padding":
        monkeypatch.setitem(fid.POOLS, "avg", torch.nn.AvgPool2d(3, stride=1, padding=1))
    elif mutation == "avg pool in Mixed_7c":
        *branches, (pool, branch_pool) = model.Mixed_7c.branches  # the table's last branch: its pool, its conv
        assert pool == "max"
        monkeypatch.setattr(model.Mixed_7c, "branches", [*branches, ["avg", branch_pool]])
    elif mutation == "align_corners resize":
        monkeypatch.setattr(F, "interpolate", lambda x, **kw: interpolate(x, **{**kw, "align_corners": True}))
    elif mutation == "antialiased resize":  # antialiasing only changes a downsampling: use images above 299
        images = torch.rand(1, 3, 400, 360, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        with torch.no_grad():
            reference = reference_features(state, images)
            torch.testing.assert_close(model(images), reference, rtol=1e-9, atol=1e-9)
        monkeypatch.setattr(F, "interpolate", lambda x, **kw: interpolate(x, **kw, antialias=True))
    else:
        images = (images + 1) / 2  # what the network sees when 2x-1 is skipped: [0, 1] instead of [-1, 1]
    with torch.no_grad():
        mutated = model(images)
    assert (mutated - reference).abs().max() > 1e-4


def test_lower_dims_are_spatial_means_of_earlier_blocks():
    """dims 64, 192 and 768 are the grid means of the full network's activations after its first max pool, its
    second (the 3x3 pools that follow Conv2d_2b_3x3 and Conv2d_4a_3x3) and Mixed_6e: pytorch-fid's outputs."""
    state = random_weights(seed=2)
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    full = fid.InceptionV3(2048).double().eval()
    full.load_state_dict(state)
    seen = {}
    for name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_6e"):
        getattr(full, name).register_forward_hook(lambda module, inputs, output, name=name: seen.update({name: output}))
    with torch.no_grad():
        assert full(images).shape == (2, 2048)
    expected = {64: F.max_pool2d(seen["Conv2d_2b_3x3"], 3, stride=2),
                192: F.max_pool2d(seen["Conv2d_4a_3x3"], 3, stride=2), 768: seen["Mixed_6e"]}
    for dims, activations in expected.items():
        small = fid.InceptionV3(dims).double().eval()
        small.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(small(images), activations.mean(dim=(2, 3)))
            assert small(images).shape == (2, dims)


def test_weights_load_strictly_from_a_file(tmp_path):
    state = random_weights_float32()
    torch.save(state, tmp_path / "weights.pth")
    model = fid.load_inception(weights=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    with pytest.raises(ValueError, match=r"missing.pth: cannot load the FID weights \(FileNotFoundError"):
        fid.load_inception(weights=str(tmp_path / "missing.pth"))


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    def refuse(*args, **kwargs):
        raise OSError("no route to host")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(ValueError, match=r"cannot load the FID weights \(OSError: no route to host\).* --weights=PATH"):
        fid.load_inception()


# ----------------------------------------------------------------------------- the distance
def test_equal_covariances_give_the_squared_mean_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    sigma = a.T @ a / 50
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_identical_sets_give_zero():
    features = np.random.default_rng(2).normal(size=(300, 64))
    mu, sigma = fid.statistics(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def trace_sqrt_product(sigma1, sigma2):
    """Tr((sigma1 sigma2)^(1/2)) by the symmetric route: the eigenvalues of sqrt(s1) s2 sqrt(s1)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))


def test_singular_covariances_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(100, 256)), rng.normal(size=(100, 256)) * 1.1 + 0.2  # rank 99 < 256
    (mu1, sigma1), (mu2, sigma2) = fid.statistics(x), fid.statistics(y)
    assert np.linalg.matrix_rank(sigma1) < 256
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_failed_sqrtm_falls_back_to_the_eps_offset(monkeypatch):
    rng = np.random.default_rng(4)
    (mu1, sigma1), (mu2, sigma2) = fid.statistics(rng.normal(size=(40, 64))), fid.statistics(rng.normal(size=(40, 64)))
    sqrtm, calls = fid.linalg.sqrtm, []
    def failing_once(matrix):  # the first root fails, as sqrtm can on a singular product
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)
    monkeypatch.setattr(fid.linalg, "sqrtm", failing_once)
    with pytest.warns(UserWarning, match="singular product"):
        value = fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6)
    offset = np.eye(64) * 1e-6
    np.testing.assert_allclose(calls[1], (sigma1 + offset) @ (sigma2 + offset))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - \
        2 * trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    assert value == pytest.approx(expected, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(5)
    a, b, c = rng.normal(size=(400, 32)), rng.normal(size=(400, 32)), rng.normal(size=(400, 32)) + 0.5
    same, same_std = fid.kernel_inception_distance(a, b, n_subsets=20, subset_size=200)
    different, _ = fid.kernel_inception_distance(a, c, n_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and different > 10 * abs(same)


def test_kid_equals_the_unbiased_mmd_formula_on_one_subset():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.3
    k = lambda a, b: (np.dot(a, b) / 5 + 1) ** 3
    m = 30
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = fid.kernel_inception_distance(x, y, n_subsets=1, subset_size=30)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == 0


def test_nearest_finds_a_copied_image(tmp_path, monkeypatch, capsys, weights_file):
    """--nearest through main: of 6 generated images, the one copied from training image 17 is listed first."""
    rng = np.random.default_rng(7)
    training = rng.integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "train.npy", training)
    np.save(tmp_path / "gen.npy", np.concatenate([rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8),
                                                  training[17:18]]))
    for name, value in (("nearest", str(tmp_path / "train.npy")), ("weights", str(weights_file)), ("dims", 64),
                        ("device", "cpu")):
        monkeypatch.setattr(fid, name, value)
    fid.main([str(tmp_path / "gen.npy"), str(tmp_path / "train.npy")])
    lines = capsys.readouterr().out.strip().splitlines()
    report = next(i for i, line in enumerate(lines) if line.startswith("nearest training image: median distance "))
    assert " of 6 generated images are closer" in lines[report + 1] and lines[report + 1].endswith("memorization:")
    assert lines[report + 2] == f"  {tmp_path / 'gen.npy'}/5  ~  {tmp_path / 'train.npy'}/17  (distance 0.00)"
    assert lines[-1].startswith("FID: ")
    # the reference as a statistics .npz: --nearest reads only the first path's images (and the training set's)
    monkeypatch.setattr(fid, "save_stats", str(tmp_path / "train.npz"))
    fid.main([str(tmp_path / "train.npy")])
    monkeypatch.setattr(fid, "save_stats", "")
    capsys.readouterr()
    fid.main([str(tmp_path / "gen.npy"), str(tmp_path / "train.npz")])
    again = capsys.readouterr().out.strip().splitlines()
    assert again[again.index(lines[report]) + 2] == lines[report + 2] and again[-1] == lines[-1]


# ----------------------------------------------------------------------------- inputs
def sample_images(n=6):
    """Real CelebA faces when $DL_DATA is set, else random 64x64 images."""
    celeba = real_data_path("celeba")
    if celeba is not None:
        return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(celeba.glob("*.jpg"))[:n]]
    rng = np.random.default_rng(8)
    return [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def small_model():
    model = fid.InceptionV3(dims=64).eval()  # the first block only: fast, and the input path is the same
    model.load_state_dict(random_weights_float32())
    return model


def test_folder_zip_and_npy_give_the_same_statistics(tmp_path, small_model):
    images = sample_images()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i + 1}.png")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i in range(len(images)):
            archive.write(folder / f"{i + 1}.png", f"{i + 1}.png")
    np.save(tmp_path / "images.npy", np.stack(images))
    np.savez(tmp_path / "images.npz", images=np.stack(images))
    stats = [fid.statistics(fid.extract_features(small_model, p, batch_size=4, progress=False)) for p in
             (folder, tmp_path / "images.zip", tmp_path / "images.npy", tmp_path / "images.npz")]
    for mu, sigma in stats[1:]:
        np.testing.assert_array_equal(mu, stats[0][0])
        np.testing.assert_array_equal(sigma, stats[0][1])


def test_stats_npz_round_trip(tmp_path, small_model):
    np.save(tmp_path / "images.npy", np.stack(sample_images()))
    mu, sigma = fid.statistics(fid.extract_features(small_model, tmp_path / "images.npy", progress=False))
    fid.save_statistics(tmp_path / "stats.npz", mu, sigma)
    assert fid.is_statistics(tmp_path / "stats.npz") and not fid.is_statistics(tmp_path / "images.npy")
    mu2, sigma2 = fid.load_statistics(tmp_path / "stats.npz", small_model.dims)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert fid.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(0, abs=1e-6)


def test_mixed_image_sizes_are_resized_one_by_one(tmp_path, small_model):
    images = sample_images(2)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).resize((80, 48)).save(tmp_path / "b.png")
    features = fid.extract_features(small_model, tmp_path, batch_size=2, progress=False)
    with torch.no_grad():
        b = torch.from_numpy(np.array(Image.open(tmp_path / "b.png"))).permute(2, 0, 1)[None].float() / 255
        np.testing.assert_allclose(features[1], small_model(b)[0].double().numpy(), rtol=1e-5, atol=1e-6)


def test_corrupt_image_is_a_clear_error(tmp_path, small_model):
    Image.fromarray(sample_images(1)[0]).save(tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read image"):
        fid.extract_features(small_model, tmp_path, progress=False)


def test_bad_paths_are_clear_errors(tmp_path, small_model):
    with pytest.raises(OSError, match="No such file or directory: .*images.tar"):
        fid.list_images(tmp_path / "images.tar")
    (tmp_path / "images.tar").write_bytes(b"not an image set")
    with pytest.raises(ValueError, match="images.tar: not a folder, .zip, .npy or .npz"):
        fid.list_images(tmp_path / "images.tar")
    np.save(tmp_path / "floats.npy", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected a uint8 array"):
        fid.list_images(tmp_path / "floats.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        fid.extract_features(small_model, tmp_path / "empty")


def test_cli_prints_fid_and_kid_last(tmp_path):
    torch.save(random_weights_float32(), tmp_path / "weights.pth")
    rng = np.random.default_rng(9)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.integers(0, 128, size=(6, 32, 32, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, str(ROOT / "fid.py"), str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                             "--dims=64", "--kid", "--kid_subsets=3", f"--weights={tmp_path / 'weights.pth'}",
                             "--device=cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("KID: ") and " +- " in lines[-2]
    assert lines[-1].startswith("FID: ") and float(lines[-1].split()[1]) > 0


# ----------------------------------------------------------------------------- faults (issue 16)
# Each bad input stops with one line naming it, before any expensive work where it can be known in advance.
def run_fid(*args, timeout=120):
    """The real command line, in a child process with a time limit: a hang fails the test, it cannot stall it."""
    return subprocess.run([sys.executable, str(ROOT / "fid.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def run_fid_in_process(monkeypatch, *args):
    """The real command line (fid.py run as __main__) in this process: fast, and any exception other than the
    SystemExit of a one-line error propagates and fails the test. Returns the exit message."""
    monkeypatch.setattr(sys, "argv", ["fid.py", *map(str, args)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "fid.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A real state_dict file of the standard's keys and shapes (default initialisation), as --weights."""
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(fid.InceptionV3().state_dict(), path)
    return path


def write_images(folder, n, seed=10, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i + 1}.png")
    return folder


def test_one_image_stops_at_once_on_the_command_line(tmp_path, weights_file):
    """The case that hung: a NaN covariance of 192+ features sent sqrtm into a loop of minutes (at 64 it
    fails with a LinAlgError instead). Now: one line, within the seconds it takes to start Python."""
    write_images(tmp_path / "one", 1)
    np.save(tmp_path / "b.npy", np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8))
    start = time.time()
    result = run_fid(tmp_path / "one", tmp_path / "b.npy", "--dims=192", f"--weights={weights_file}",
                     "--device=cpu", timeout=90)
    line = one_line_error(result)
    assert f"{tmp_path / 'one'}: 1 image(s);" in line and "at least 2" in line and "thousands" in line
    assert time.time() - start < 60


def test_one_image_through_the_library_stops_before_sqrtm(tmp_path, weights_file):
    """compute_fid (no preflight): the check sits in statistics(), after the features and before sqrtm. At 64
    features the old code failed with a LinAlgError rather than looping, so this test cannot hang."""
    write_images(tmp_path / "one", 1)
    write_images(tmp_path / "three", 3)
    with pytest.raises(ValueError, match="one: 1 image; a covariance needs at least 2"):
        fid.compute_fid(tmp_path / "one", tmp_path / "three", device="cpu", dims=64, weights=str(weights_file))
    with pytest.raises(ValueError, match="0 images"):
        fid.statistics(np.zeros((0, 8)))
    with pytest.raises(ValueError, match="KID: 1 image"):
        fid.kernel_inception_distance(np.ones((1, 8)), np.ones((5, 8)))
    mu, sigma = fid.statistics(np.random.default_rng(0).normal(size=(2, 8)))  # two are enough for a number
    assert np.isfinite(sigma).all() and fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)


def test_non_finite_statistics_stop_at_once(tmp_path):
    """NaN or inf in features or statistics stops before sqrtm. Run in a child with a time limit, on the size
    that made sqrtm loop (192)."""
    features = np.array([[1.0, 2.0], [np.inf, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN or inf"), np.errstate(invalid="ignore"):  # inf - inf in np.cov
        fid.frechet_distance(*fid.statistics(features), *fid.statistics(features[[0, 2]]))
    code = ("import numpy as np, time, fid\n"
            "mu, sigma = np.zeros(192), np.full((192, 192), np.nan)\n"
            "start = time.time()\n"
            "try:\n"
            "    fid.frechet_distance(mu, sigma, mu, np.eye(192))\n"
            "except ValueError as e:\n"
            "    print(e, time.time() - start)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.startswith("the statistics hold NaN or inf values"), result.stdout + result.stderr
    assert float(result.stdout.split()[-1]) < 1


def test_save_stats_to_a_bad_path_fails_before_any_work(tmp_path):
    """The input holds a broken image and the weights file does not exist: had either been touched first, the
    error would name them. It names the output path instead."""
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / "3.jpg").write_bytes(b"broken")
    missing = tmp_path / "missing" / "stats.npz"
    line = one_line_error(run_fid(tmp_path / "images", f"--save_stats={missing}",
                                  f"--weights={tmp_path / 'no_weights.pth'}", "--dims=64"))
    assert line == f"error: [Errno 2] No such file or directory: '{missing}.tmp'"
    assert not missing.parent.exists()


@pytest.mark.parametrize("case", ["missing folder", "folder", "under a file", "no .npz", "read-only folder"])
def test_save_stats_output_checks(tmp_path, monkeypatch, case):
    write_images(tmp_path / "images", 2)
    (tmp_path / "a_file").write_text("x")
    target = {"missing folder": tmp_path / "missing" / "s.npz", "folder": tmp_path / "out.npz",
              "under a file": tmp_path / "a_file" / "s.npz", "no .npz": tmp_path / "stats.txt",
              "read-only folder": tmp_path / "ro" / "s.npz"}[case]
    expected = {"missing folder": "No such file or directory", "folder": "is a folder", "under a file": "Not a directory",
                "no .npz": "must be a file name ending in .npz", "read-only folder": "Permission denied"}[case]
    if case == "folder":
        (tmp_path / "out.npz").mkdir()
    if case == "read-only folder":
        target.parent.mkdir()
        target.parent.chmod(0o555)
        if os.access(target.parent, os.W_OK):  # root writes anyway: use a folder the kernel refuses
            target = pathlib.Path("/sys/stats.npz")
            try:
                open(target, "wb").close()
                pytest.skip("no read-only folder on this machine")
            except OSError:
                pass
    extracted = []
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: extracted.append(a))
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: extracted.append(a))
    message = run_fid_in_process(monkeypatch, tmp_path / "images", f"--save_stats={target}")
    assert expected in message and str(target) in message and extracted == []
    assert not os.path.exists(str(target) + ".tmp")


def test_save_stats_writes_atomically(tmp_path, monkeypatch, weights_file):
    np.save(tmp_path / "images.npy", np.random.default_rng(2).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "stats.npz"
    fid.save_statistics(out, np.zeros(3), np.eye(3))  # the previous statistics
    before = out.read_bytes()
    savez = np.savez_compressed
    def disk_full(file, **arrays):  # half the file, then the disk is full
        file.write(b"PK\x03\x04 half an npz")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="stats.npz: cannot write the statistics .No space left on device.; "
                                                "the previous file, if any, is unchanged"):
        fid.save_statistics(out, np.ones(3), np.eye(3))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "stats.npz"]
    def interrupted(file, **arrays):  # Ctrl-C in the middle of the write
        file.write(b"PK\x03\x04 half an npz")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fid.save_statistics(out, np.ones(3), np.eye(3))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "stats.npz"]
    monkeypatch.setattr(np, "savez_compressed", savez)
    # the whole command (main, in this process): the file appears whole, equal to the statistics of the images
    for name, value in (("save_stats", str(out)), ("weights", str(weights_file)), ("dims", 64), ("device", "cpu")):
        monkeypatch.setattr(fid, name, value)
    fid.main([str(tmp_path / "images.npy")])
    model = fid.load_inception(64, str(weights_file))
    mu, sigma = fid.statistics(fid.extract_features(model, tmp_path / "images.npy", progress=False))
    saved_mu, saved_sigma = fid.load_statistics(out, 64)
    np.testing.assert_array_equal(saved_mu, mu)
    np.testing.assert_array_equal(saved_sigma, sigma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.npy", "stats.npz"]


def damaged_input(tmp_path, case):
    """(paths, extra flags, the name the error must hold, a phrase it must hold) for one damaged input."""
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(3).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8))
    def stats(name, d, sigma=True, nan=False):
        arrays = {"mu": np.full(d, np.nan) if nan else np.zeros(d)}
        if sigma:
            arrays["sigma"] = np.eye(d)
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name
    write_images(tmp_path / "pngs", 3)
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as archive:
        for i in range(3):
            archive.write(tmp_path / "pngs" / f"{i + 1}.png", f"{i + 1}.png")
    data = (tmp_path / "good.zip").read_bytes()
    if case == "truncated zip":
        (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
        return [tmp_path / "cut.zip", images], [], "cut.zip", "not a readable zip file"
    if case == "non-zip .zip":
        (tmp_path / "page.zip").write_text("<html>404 Not Found</html>")
        return [tmp_path / "page.zip", images], [], "page.zip", "not a readable zip file"
    if case == "damaged zip entry":  # a flipped byte inside 2.png's compressed data: a bad CRC
        with zipfile.ZipFile(tmp_path / "good.zip") as archive:
            info = archive.getinfo("2.png")
        offset = info.header_offset + 30 + len(info.filename) + 10
        (tmp_path / "flip.zip").write_bytes(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:])
        return [tmp_path / "flip.zip", images], [], "flip.zip/2.png", "cannot read image (BadZipFile"
    if case == "undecodable image":
        (tmp_path / "pngs" / "2.png").write_bytes((tmp_path / "pngs" / "2.png").read_bytes()[:60])
        return [tmp_path / "pngs", images], [], str(tmp_path / "pngs" / "2.png"), "cannot read image"
    if case == "truncated .npy":
        (tmp_path / "cut.npy").write_bytes(images.read_bytes()[:100])
        return [tmp_path / "cut.npy", images], [], "cut.npy", "not a readable npy file"
    if case == "stats of 64 against 192 features":
        return [images, stats("s64.npz", 64)], ["--dims=192"], "s64.npz", "holds mu (64,), sigma (64, 64); statistics are mu (d,) and sigma (d, d), d = 192"
    if case == "two stats of different sizes":
        return [stats("s64.npz", 64), stats("s192.npz", 192)], ["--dims=64"], "s192.npz", "holds mu (192,), sigma (192, 192); statistics are mu (d,) and sigma (d, d), d = 64"
    if case == "stats without sigma":
        return [images, stats("mu_only.npz", 64, sigma=False)], ["--dims=64"], "mu_only.npz", "holds mu (64,); statistics are mu (d,) and sigma (d, d)"
    if case == "NaN stats":
        return [images, stats("nan.npz", 64, nan=True)], ["--dims=64"], "nan.npz", "NaN or inf"
    if case == "npz of neither":
        np.savez(tmp_path / "other.npz", mean=np.zeros(64))
        return [images, tmp_path / "other.npz"], ["--dims=64"], "other.npz", "expected a uint8 array"
    raise ValueError(case)


DAMAGED = ["truncated zip", "non-zip .zip", "damaged zip entry", "undecodable image", "truncated .npy",
           "stats of 64 against 192 features", "two stats of different sizes", "stats without sigma", "NaN stats",
           "npz of neither"]


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_input_gives_one_line_naming_it(tmp_path, monkeypatch, weights_file, case):
    paths, flags, name, phrase = damaged_input(tmp_path, case)
    message = run_fid_in_process(monkeypatch, *paths, *flags, f"--weights={weights_file}", "--device=cpu",
                                 "--batch_size=2")
    assert name in message and phrase in message, message


def test_damaged_zip_in_a_child_process(tmp_path, weights_file):
    """One case through a real `python fid.py`: the line printed, exit status 1, no traceback."""
    paths, flags, name, phrase = damaged_input(tmp_path, "truncated zip")
    line = one_line_error(run_fid(*paths, *flags, f"--weights={weights_file}"))
    assert name in line and phrase in line


def test_statistics_checks_through_the_library(tmp_path, small_model):
    np.savez(tmp_path / "s192.npz", mu=np.zeros(192), sigma=np.eye(192))
    with pytest.raises(ValueError, match=r"s192.npz: holds mu \(192,\), sigma \(192, 192\); statistics are mu \(d,\) and sigma \(d, d\), d = 64"):
        fid.load_statistics(tmp_path / "s192.npz", small_model.dims)
    with pytest.raises(ValueError, match=r"statistics of different sizes: \(64,\) \(64, 64\), \(192,\) \(192, 192\)"):
        fid.frechet_distance(np.zeros(64), np.eye(64), np.zeros(192), np.eye(192))
    np.savez(tmp_path / "sigma_only.npz", sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"sigma_only.npz: holds sigma \(4, 4\); statistics are mu"):
        fid.load_statistics(tmp_path / "sigma_only.npz", small_model.dims)
    np.savez(tmp_path / "bad_shapes.npz", mu=np.zeros(4), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"bad_shapes.npz: holds mu \(4,\), sigma \(5, 5\); statistics are mu \(d,\) and sigma \(d, d\)"):
        fid.load_statistics(tmp_path / "bad_shapes.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match=r"empty.npz: expected a uint8 array of shape \(N, H, W, 3\)"):
        fid.list_images(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="s192.npz: statistics .mu, sigma., not images"):
        fid.list_images(tmp_path / "s192.npz")


def test_a_folder_named_like_an_image_is_skipped(tmp_path, small_model):
    write_images(tmp_path / "set.jpg", 2)                # the set itself may be named anything
    write_images(tmp_path / "set.jpg" / "3.jpg", 2)      # a subfolder named like an image: not read
    assert fid.list_images(tmp_path / "set.jpg") == ["1.png", "2.png"]
    assert fid.extract_features(small_model, tmp_path / "set.jpg", progress=False).shape == (2, 64)
    (tmp_path / "only_folders").mkdir()
    (tmp_path / "only_folders" / "1.jpg").mkdir()
    with pytest.raises(ValueError, match="only_folders: no images found"):
        fid.extract_features(small_model, tmp_path / "only_folders")


def test_mac_metadata_in_zips_and_folders_is_skipped(tmp_path, small_model):
    write_images(tmp_path / "faces", 3)
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(100)  # an AppleDouble header
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as plain, zipfile.ZipFile(tmp_path / "mac.zip", "w") as mac:
        for i in range(1, 4):
            plain.write(tmp_path / "faces" / f"{i}.png", f"faces/{i}.png")
            mac.write(tmp_path / "faces" / f"{i}.png", f"faces/{i}.png")
            mac.writestr(f"__MACOSX/faces/._{i}.png", junk)
        mac.writestr("faces/._1.png", junk)
        mac.writestr("__MACOSX/faces/cover.jpg", junk)
    assert fid.list_images(tmp_path / "mac.zip") == [f"faces/{i}.png" for i in range(1, 4)]
    np.testing.assert_array_equal(fid.extract_features(small_model, tmp_path / "mac.zip", progress=False),
                                  fid.extract_features(small_model, tmp_path / "plain.zip", progress=False))
    (tmp_path / "faces" / "._1.png").write_bytes(junk)  # as a Mac leaves on a FAT or exFAT drive
    assert len(fid.list_images(tmp_path / "faces")) == 3


def crafted_pickle(path, marker):
    """A file that torch.save wrote, whose unpickling would call open(marker, "w"): code run from a file."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, path)


def test_a_crafted_pickle_as_weights_never_runs(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8))
    crafted_pickle(tmp_path / "evil.pth", tmp_path / "marker")
    line = one_line_error(run_fid(tmp_path / "a.npy", tmp_path / "a.npy", f"--weights={tmp_path / 'evil.pth'}",
                                  "--dims=64"))
    assert "evil.pth: cannot load the FID weights (UnpicklingError: Weights only load failed)" in line
    assert "only a plain state_dict of tensors is loaded" in line
    with pytest.raises(ValueError, match=r"evil.pth: cannot load the FID weights \(UnpicklingError"):
        fid.load_inception(64, str(tmp_path / "evil.pth"))
    assert not (tmp_path / "marker").exists()
    # the file is live: a load without weights_only runs it (the test above can fail)
    crafted_pickle(tmp_path / "evil2.pth", tmp_path / "marker2")
    torch.load(tmp_path / "evil2.pth", weights_only=False)
    assert (tmp_path / "marker2").exists()


def test_damaged_or_foreign_weights_files_give_one_line(tmp_path, weights_file):
    data = weights_file.read_bytes()
    cases = {"cut.pth": (data[: len(data) // 3], "cannot load the FID weights"),
             "empty.pth": (b"", "cannot load the FID weights"),
             "text.pth": (b"hello", "cannot load the FID weights")}
    for name, (content, phrase) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: {phrase}"):
            fid.load_inception(64, str(tmp_path / name))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"tensor.pth: cannot load the FID weights \(TypeError: Expected state_dict "
                                         r"to be dict-like"):
        fid.load_inception(64, str(tmp_path / "tensor.pth"))
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: cannot load the FID weights \(RuntimeError: .*Missing "
                                         r"key\(s\) in state_dict: \"Conv2d_1a_3x3.conv.weight\""):
        fid.load_inception(64, str(tmp_path / "other.pth"))
    state = fid.InceptionV3().state_dict()
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(ValueError, match=r"misshaped.pth: cannot load the FID weights \(RuntimeError: .*size "
                                         r"mismatch for Mixed_7c.branch_pool.conv.weight"):
        fid.load_inception(64, str(tmp_path / "misshaped.pth"))


def test_every_torch_load_in_fid_uses_weights_only():
    tree = ast.parse((ROOT / "fid.py").read_text())
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"]
    assert loads and all(any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords) for node in loads)


# ----------------------------------------------------------------------------- shared code
COMMAND_LINE_START = "# ----------------------------------------------------------------------------- command line"


def command_line_block(script):
    """The text of a script from the '... command line' heading to the end of parse_overrides."""
    lines = (ROOT / script).read_text(encoding="utf-8").splitlines()
    start = lines.index(COMMAND_LINE_START)
    definition = next(i for i in range(start, len(lines)) if lines[i].startswith("def parse_overrides("))
    end = next((i for i in range(definition + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    while not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])


def test_command_line_blocks_are_identical():
    blocks = {script: command_line_block(script) for script in ("tokenizer.py", "fid.py", "bleu.py")}
    assert "def config_block(" in blocks["fid.py"] and blocks["fid.py"].rstrip().endswith("return positional")
    for script, block in blocks.items():
        assert block == blocks["tokenizer.py"], "\n".join(difflib.unified_diff(
            blocks["tokenizer.py"].splitlines(), block.splitlines(), "tokenizer.py", script, lineterm=""))


def python_311_only_syntax(pattern, flags=0):
    """The Python-3.11-only constructs in a regular expression: atomic groups (?>...) and possessive
    quantifiers (*+, ++, ?+, {m,n}+), found in the parse tree (so '[*+]' or '\\++' are not mistaken for them)."""
    import re._constants as constants   # (Python 3.11 and newer: the test below compiles instead on 3.10)
    import re._parser as parser
    found = []
    def walk(items):
        for op, arg in items:
            if op in (constants.ATOMIC_GROUP, constants.POSSESSIVE_REPEAT):
                found.append(str(op))
            for part in (arg if isinstance(arg, (tuple, list)) else [arg]):
                if isinstance(part, parser.SubPattern):
                    walk(part)
                elif isinstance(part, (tuple, list)):
                    for sub in part:
                        if isinstance(sub, parser.SubPattern):
                            walk(sub)
    walk(parser.parse(pattern, flags))
    return found


def test_tokenizer_regexes_run_on_python_310():
    """tokenizer.py must import on Python 3.10 (Colab, Kaggle): no regex syntax that is new in 3.11. On 3.10 itself,
    compiling them is the check (3.10 refuses that syntax, as the first lines show)."""
    if sys.version_info < (3, 11):
        with pytest.raises(re.error):
            re.compile(r"a++")
    else:
        assert python_311_only_syntax(r"(?>a|b)c") == ["ATOMIC_GROUP"]
        assert python_311_only_syntax(r"x(?:a|b)*+y") == ["POSSESSIVE_REPEAT"]
        assert python_311_only_syntax(r"a++|b?+|c{1,3}+") == ["POSSESSIVE_REPEAT"] * 3
        assert python_311_only_syntax(r"[*+?]+\++(?:a)*") == []
    import tokenizer
    compiled = [value for value in vars(tokenizer).values() if isinstance(value, re.Pattern)]
    # and every pattern literal handed to re.* in the source, compiled at import or not
    tree = ast.parse((ROOT / "tokenizer.py").read_text(encoding="utf-8"))
    literals = [node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re" and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)]
    assert len(compiled) >= 3 and len(literals) >= 3  # HTML_TAG, POSSESSIVE, TOKEN at least
    for pattern in compiled:         # (on 3.10, importing tokenizer compiled them)
        assert sys.version_info < (3, 11) or python_311_only_syntax(pattern.pattern, pattern.flags) == [], pattern
    for literal in literals:
        if sys.version_info < (3, 11):
            re.compile(literal, re.VERBOSE)
        else:
            assert python_311_only_syntax(literal, re.VERBOSE) == [], literal
