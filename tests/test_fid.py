"""fid.py: the network against the standard weights' manifest and an independent functional forward, the
distance against closed forms, and the inputs (folder, zip, npy, stats) against each other."""
import json
import subprocess
import sys
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
        monkeypatch.setattr(fid, "avg_pool_3x3", lambda x: F.avg_pool2d(x, 3, stride=1, padding=1))
    elif mutation == "avg pool in Mixed_7c":
        monkeypatch.setattr(model.Mixed_7c, "max_pool_branch", False)
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
    state = random_weights(seed=2)
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    full = fid.InceptionV3(2048).double().eval()
    full.load_state_dict(state)
    for dims, n_blocks in ((64, 1), (192, 2), (768, 3)):
        small = fid.InceptionV3(dims).double().eval()
        small.load_state_dict(state)
        with torch.no_grad():
            x = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1
            for block in full.blocks()[:n_blocks]:
                for layer in block:
                    x = layer(x)
            torch.testing.assert_close(small(images), x.mean(dim=(2, 3)))
            assert small(images).shape == (2, dims)


def test_weights_load_strictly_from_a_file(tmp_path):
    state = random_weights_float32()
    torch.save(state, tmp_path / "weights.pth")
    model = fid.load_inception(weights=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        fid.weights_path(str(tmp_path / "missing.pth"))


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    def refuse(*args, **kwargs):
        raise OSError("no route to host")
    monkeypatch.setattr(fid.urllib.request, "urlopen", refuse)
    with pytest.raises(RuntimeError, match="cannot download the FID weights .* --weights=PATH"):
        fid.weights_path()


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


def test_nearest_neighbours_finds_a_copied_image():
    rng = np.random.default_rng(7)
    training = rng.normal(size=(50, 16))
    generated = np.vstack([rng.normal(size=(5, 16)), training[17] + 1e-3])
    distance, index, yardstick = fid.nearest_neighbours(generated, training)
    assert index[-1] == 17 and distance[-1] < 1e-2 < yardstick.min()


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
    stats = [fid.path_statistics(p, small_model, batch_size=4) for p in
             (folder, tmp_path / "images.zip", tmp_path / "images.npy", tmp_path / "images.npz")]
    for mu, sigma in stats[1:]:
        np.testing.assert_array_equal(mu, stats[0][0])
        np.testing.assert_array_equal(sigma, stats[0][1])


def test_stats_npz_round_trip(tmp_path, small_model):
    np.save(tmp_path / "images.npy", np.stack(sample_images()))
    mu, sigma = fid.path_statistics(tmp_path / "images.npy", small_model)
    fid.save_statistics(tmp_path / "stats.npz", mu, sigma)
    mu2, sigma2 = fid.path_statistics(tmp_path / "stats.npz", small_model)
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
    with pytest.raises(fid.FIDInputError, match="broken.jpg: cannot read image"):
        fid.extract_features(small_model, tmp_path, progress=False)


def test_bad_paths_are_clear_errors(tmp_path, small_model):
    with pytest.raises(fid.FIDInputError, match="images.tar: no such file or folder"):
        fid.list_images(tmp_path / "images.tar")
    (tmp_path / "images.tar").write_bytes(b"not an image set")
    with pytest.raises(fid.FIDInputError, match="images.tar: not a folder, .zip, .npy or .npz"):
        fid.list_images(tmp_path / "images.tar")
    np.save(tmp_path / "floats.npy", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(fid.FIDInputError, match="expected a uint8 array"):
        fid.list_images(tmp_path / "floats.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fid.FIDInputError, match="no images found"):
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
