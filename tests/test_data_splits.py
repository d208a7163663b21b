"""Client splits (IID, Dirichlet non-IID), stratified train/test split, stratified label-fraction subsets."""
import numpy as np
import pytest
import torch

from msd_fast.data import label_fraction_subset, split_clients, train_test_split

LABELS = torch.from_numpy(np.random.default_rng(0).integers(0, 5, 1000))


def _is_partition(parts, n):
    joined = torch.cat(parts)
    return joined.numel() == n and torch.equal(joined.sort().values, torch.arange(n))


def test_iid_split_partitions_evenly_and_reproducibly():
    parts = split_clients(1003, 4, seed=1)
    assert _is_partition(parts, 1003) and sorted(len(p) for p in parts) == [250, 251, 251, 251]
    assert all(p.dtype == torch.int64 and torch.equal(p, p.sort().values) for p in parts)
    assert all(torch.equal(a, b) for a, b in zip(parts, split_clients(1003, 4, seed=1)))
    assert not torch.equal(parts[0], split_clients(1003, 4, seed=2)[0])
    assert _is_partition(split_clients(LABELS, 3), len(LABELS))


def _skew(parts, labels, n_classes=5):
    """Mean total-variation distance between each client's class distribution and the global one."""
    overall = torch.bincount(labels, minlength=n_classes).double() / len(labels)
    distances = [0.5 * (torch.bincount(labels[p], minlength=n_classes).double() / len(p) - overall).abs().sum()
                 for p in parts]
    return float(torch.stack(distances).mean())


def test_dirichlet_split_partitions_and_skew_grows_as_alpha_shrinks():
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        per_seed = []
        for seed in range(3):
            parts = split_clients(LABELS, 8, alpha=alpha, seed=seed)
            assert _is_partition(parts, len(LABELS)) and all(len(p) > 0 for p in parts)
            per_seed.append(_skew(parts, LABELS))
        skews.append(np.mean(per_seed))
    assert skews[0] < 0.1 < skews[1] < skews[2], skews
    again = split_clients(LABELS, 8, alpha=0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(split_clients(LABELS, 8, alpha=0.1, seed=0), again))


def test_no_client_is_left_empty():
    labels = torch.tensor([0] * 30 + [1] * 30)
    for seed in range(10):
        parts = split_clients(labels, 20, alpha=0.01, seed=seed)
        assert _is_partition(parts, 60) and min(len(p) for p in parts) >= 1
    assert _is_partition(split_clients(torch.arange(5) % 2, 5, alpha=0.05), 5)


@pytest.mark.parametrize("args, kwargs, match", [
    ((3, 4), {}, "cannot give 4 clients"),
    ((100, 4), dict(alpha=1.0), "needs the labels"),
    ((LABELS, 4), dict(alpha=0.0), "alpha must be"),
    ((LABELS, 4), dict(alpha=float("inf")), "alpha must be"),
    ((LABELS, 0), {}, "n_clients must be"),
    ((torch.tensor([0, -1, 2]), 2), {}, "integers >= 0"),
    ((torch.tensor([0.5, 1.0]), 2), {}, "integers >= 0"),
    ((LABELS, 2), dict(seed=-1), "seed must be"),
])
def test_split_clients_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_clients(*args, **kwargs)


def test_train_test_split_is_stratified():
    train, test = train_test_split(LABELS, 0.2, seed=0)
    assert _is_partition([train, test], len(LABELS)) and len(test) == 200
    for c in range(5):
        share = (LABELS[test] == c).sum().item() / (LABELS == c).sum().item()
        assert abs(share - 0.2) < 0.01
    assert torch.equal(train_test_split(LABELS, 0.2, seed=0)[1], test)
    assert not torch.equal(train_test_split(LABELS, 0.2, seed=1)[1], test)
    _, unlabeled_test = train_test_split(50, 0.1)
    assert len(unlabeled_test) == 5
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(LABELS, 1.0)
    with pytest.raises(ValueError, match="empty split"):
        train_test_split(torch.tensor([0, 1]), 0.1)


def test_label_fraction_subset_keeps_every_class():
    labels = torch.tensor([0] * 500 + [1] * 30 + [2] * 3)
    subset = label_fraction_subset(labels, 0.01, seed=0)
    counts = torch.bincount(labels[subset], minlength=3).tolist()
    assert counts[0] == 5 and counts[1] >= 1 and counts[2] >= 1
    assert len(subset.unique()) == len(subset) and torch.equal(subset, subset.sort().values)
    assert torch.equal(label_fraction_subset(labels, 0.01, seed=0), subset)
    assert torch.equal(label_fraction_subset(labels, 1.0), torch.arange(len(labels)))
    with pytest.raises(ValueError, match="fraction"):
        label_fraction_subset(labels, 0)
