"""The embedded synthetic dataset: determinism, balance, any size, and that its classes differ in spatial findings
(shape, count, texture, organ size, laterality) rather than in global pixel statistics."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from msd_fast.data import CLASS_NAMES, DataError, load_dataset, synthetic_dataset
from msd_fast.data.synthetic import DEFAULT_SIZE

# sha256 of synthetic_dataset(40, size=32) images + labels. Pixel arithmetic is IEEE-exact and the randomness is
# PCG64's raw stream, so this must hold on every machine and NumPy version; if it changes, the dataset changed.
GOLDEN_SHA256 = "7ed7cf7d963a83b27ad4b462651150ec3dcbb41727dfa45be2c142ec58eec653"


def _digest(dataset) -> str:
    return hashlib.sha256(dataset.to_tensor().numpy().tobytes() + dataset.labels.numpy().tobytes()).hexdigest()


def test_same_bytes_every_call_and_machine():
    first, second = synthetic_dataset(40, size=32), synthetic_dataset(40, size=32)
    assert _digest(first) == _digest(second)
    assert _digest(first) == GOLDEN_SHA256


def test_seed_and_split_change_the_images():
    base = synthetic_dataset(20).to_tensor()
    assert not torch.equal(base, synthetic_dataset(20, seed=1).to_tensor())
    assert not torch.equal(base, synthetic_dataset(20, split="test").to_tensor())
    assert not torch.equal(base, synthetic_dataset(20, split="val").to_tensor())


def test_default_geometry_labels_and_balance():
    assert DEFAULT_SIZE == 32 and len(CLASS_NAMES) == 7
    data = synthetic_dataset(103)
    assert data.geometry == (1, 32, 32) and len(data) == 103
    images = data.to_tensor()
    assert images.dtype == torch.uint8 and images.shape == (103, 1, 32, 32)
    assert data.labels.dtype == torch.int64 and data.class_names == list(CLASS_NAMES)
    counts = torch.bincount(data.labels, minlength=len(CLASS_NAMES))
    assert counts.max() - counts.min() <= 1
    assert data.labels[:20].unique().numel() > 2, "labels are shuffled, not in blocks"
    assert images.float().std() > 20, "the images are not blank"
    four = synthetic_dataset(50, n_classes=4)
    assert four.class_names == list(CLASS_NAMES[:4]) and int(four.labels.max()) == 3
    assert torch.bincount(four.labels).tolist() == [13, 13, 12, 12]


@pytest.mark.parametrize("size", [16, 48, 64])
def test_any_size_draws_the_same_anatomy(size):
    # Coordinates are in [-1, 1], so the anatomy covers the same share of the image at every size: the mean image,
    # brought to 16x16, matches the one drawn at 32x32 (anti-aliased edges keep areas right even at 16x16).
    def mean_image(images):
        return F.adaptive_avg_pool2d(images.float().mean(0, keepdim=True) / 255, 16)[0, 0]

    data = synthetic_dataset(200, size=size)
    assert data.geometry == (1, size, size) and data.to_tensor().float().std() > 20
    difference = (mean_image(data.to_tensor()) - mean_image(synthetic_dataset(200, size=32).to_tensor())).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.1, (difference.mean(), difference.max())


def test_rgb_replicates_the_gray_scan():
    gray, rgb = synthetic_dataset(6).to_tensor(), synthetic_dataset(6, channels=3).to_tensor()
    assert rgb.shape == (6, 3, 32, 32)
    assert all(torch.equal(rgb[:, c:c + 1], gray) for c in range(3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be"), (dict(size=8), "size must be"), (dict(n_classes=8), "n_classes"),
    (dict(n_classes=1), "n_classes"), (dict(channels=2), "channels"), (dict(split="dev"), "split"),
    (dict(seed=-1), "seed"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_dataset(**{"n": 4, **kwargs})


def test_load_dataset_synthetic_specs():
    data = load_dataset("synthetic:12", size=32, channels=3, split="val")
    assert len(data) == 12 and data.geometry == (3, 32, 32)
    assert torch.equal(data.to_tensor(), synthetic_dataset(12, size=32, channels=3, split="val").to_tensor())
    assert len(load_dataset("synthetic", size=16)) == 2000
    for bad in ("synthetic:", "synthetic:x", "synthetic:0"):
        with pytest.raises(DataError, match="synthetic:N"):
            load_dataset(bad)
    with pytest.raises(DataError, match="square"):
        load_dataset("synthetic:4", size=(32, 48))


# ---- fairness: global pixel statistics carry little class information, spatial structure carries it all -----------

def _ridge_accuracy(train, test, n_classes: int) -> float:
    """Held-out accuracy of a ridge-regression classifier on standardised features (closed form, deterministic)."""
    (a, y_a), (b, y_b) = train, test
    mean, std = a.mean(0), a.std(0) + 1e-9
    a = torch.cat([(a - mean) / std, torch.ones(len(a), 1)], 1).double()
    b = torch.cat([(b - mean) / std, torch.ones(len(b), 1)], 1).double()
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    weights = torch.linalg.solve(a.T @ a + 1e-2 * len(a) * eye, a.T @ F.one_hot(y_a, n_classes).double())
    return ((b @ weights).argmax(1) == y_b).double().mean().item()


def _pixel_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean, std and the 5/25/50/75/95 % quantiles -- functions of the pixel values alone."""
    flat = x.flatten(1)
    quantiles = torch.quantile(flat, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=1).T
    return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), quantiles], 1)


def _spatial_features(x: torch.Tensor) -> torch.Tensor:
    """Fixed random zero-mean 5x5 filters, ReLU, pooled over a 3x3 grid and globally (max): a cheap, untrained
    stand-in for a spatial model."""
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(32, 1, 5, 5, generator=generator)
    response = F.relu(F.conv2d(x, filters - filters.mean((2, 3), keepdim=True), padding=2))
    return torch.cat([F.adaptive_avg_pool2d(response, 3).flatten(1), F.adaptive_max_pool2d(response, 1).flatten(1)], 1)


@pytest.fixture(scope="module")
def split_data():
    train, test = synthetic_dataset(700, seed=3), synthetic_dataset(350, seed=3, split="test")
    return (train.to_tensor().float() / 255, train.labels), (test.to_tensor().float() / 255, test.labels)


def test_pixel_statistics_are_far_below_a_spatial_model(split_data):
    (x_a, y_a), (x_b, y_b) = split_data
    n = len(CLASS_NAMES)
    stats = _ridge_accuracy((_pixel_statistics(x_a), y_a), (_pixel_statistics(x_b), y_b), n)
    spatial = _ridge_accuracy((_spatial_features(x_a), y_a), (_spatial_features(x_b), y_b), n)
    # 350 test images, chance 1/7 = 0.14 (std 0.019). Measured: statistics 0.44, spatial 0.98 (the first version,
    # with a 5x wider window jitter that hid the statistics more: 0.32 and 0.96).
    assert stats < 0.52, stats
    assert spatial > stats + 0.4, (spatial, stats)


@pytest.mark.parametrize("cls", range(1, len(CLASS_NAMES)))
def test_every_finding_is_distinguishable_from_a_normal_scan(split_data, cls):
    (x_a, y_a), (x_b, y_b) = split_data
    keep_a, keep_b = (y_a == 0) | (y_a == cls), (y_b == 0) | (y_b == cls)
    accuracy = _ridge_accuracy((_spatial_features(x_a[keep_a]), (y_a[keep_a] == cls).long()),
                               (_spatial_features(x_b[keep_b]), (y_b[keep_b] == cls).long()), 2)
    assert accuracy > 0.85, (CLASS_NAMES[cls], accuracy)  # measured 0.96-1.0 (100 test images)


def test_laterality_horizontal_flips_change_the_label(split_data):
    # The heart sits at the image right (the patient's left) in every class but dextrocardia, where it is mirrored:
    # a horizontally flipped normal scan looks like dextrocardia, so flips are not label-preserving here.
    (x, y), _ = split_data
    normal, dextro = x[y == CLASS_NAMES.index("normal")], x[y == CLASS_NAMES.index("dextrocardia")]

    def right_minus_left(images):  # brightness beside the midline where the heart sits (32x32): right minus left
        return images[:, 0, 10:18, 16:21].mean((1, 2)) - images[:, 0, 10:18, 11:16].mean((1, 2))

    train = (torch.cat([right_minus_left(normal), right_minus_left(dextro)])[:, None],
             torch.cat([torch.zeros(len(normal)), torch.ones(len(dextro))]).long())
    flipped = (right_minus_left(normal.flip(-1))[:, None], torch.ones(len(normal), dtype=torch.long))
    # One fixed window, so pose jitter blurs it; measured 0.88 and 0.83 (chance 0.5).
    assert _ridge_accuracy(train, train, 2) > 0.7
    assert _ridge_accuracy(train, flipped, 2) > 0.7, "a flipped normal scan should read as dextrocardia"
