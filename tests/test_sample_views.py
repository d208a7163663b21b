"""sample_views: shapes, the kept count, unique sorted rows, reproducibility, uniformity and bad arguments."""
import pytest
import torch

from msd_fast import sample_views


@pytest.mark.parametrize("keep, N, K", [(0.5, 196, 98), (0.2, 196, 39), (1.0, 7, 7), (0.01, 10, 1), (3, 10, 3),
                                        (10, 10, 10), (1, 5, 1)])
def test_kept_count(keep, N, K):
    idx = sample_views(4, N, 3, keep)
    assert idx.shape == (3, 4, K) and idx.dtype == torch.int64 and idx.device.type == "cpu"


def test_rows_are_unique_sorted_and_in_range():
    idx = sample_views(16, 37, 5, 0.4, generator=torch.Generator().manual_seed(0))
    assert idx.min() >= 0 and idx.max() < 37
    assert bool((idx[..., 1:] > idx[..., :-1]).all())  # strictly ascending: sorted and unique
    assert sample_views(2, 9, 2, 1.0).tolist() == [[list(range(9))] * 2] * 2


def test_reproducible_from_the_generator():
    def draw(seed):
        return sample_views(8, 50, 4, 0.3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    views = draw(5)
    assert not torch.equal(views[0], views[1])  # views of one sample differ
    assert not torch.equal(views[:, 0], views[:, 1])  # samples differ


def test_every_token_is_kept_equally_often():
    # 2000 draws of K = 3 of N = 6: each token's count is Binomial(2000, 1/2); 6 sigma is about +-134.
    idx = sample_views(1000, 6, 2, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(idx.flatten(), minlength=6)
    assert counts.sum() == 6000
    assert bool(((counts - 1000).abs() < 134).all()), counts.tolist()


@pytest.mark.parametrize("args, error, message", [
    ((0, 10, 2, 0.5), ValueError, "batch_size must be a positive int"),
    ((2, 0, 2, 0.5), ValueError, "num_tokens must be a positive int"),
    ((2, 10, 0, 0.5), ValueError, "n_views must be a positive int"),
    ((2, 10, 2, 0.0), ValueError, "keep=0.0 must be a fraction in \\(0, 1\\]"),
    ((2, 10, 2, 1.5), ValueError, "keep=1.5 must be a fraction"),
    ((2, 10, 2, float("nan")), ValueError, "keep=nan"),
    ((2, 10, 2, 11), ValueError, "keep=11 must be a count in \\[1, num_tokens=10\\]"),
    ((2, 10, 2, 0), ValueError, "keep=0 must be a count"),
    ((2, 10, 2, True), TypeError, "keep must be an int count or a float fraction"),
    ((2, 10, 2, "half"), TypeError, "keep must be"),
])
def test_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        sample_views(*args)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_views(2, 10, 2, 0.5, generator=0)
    with pytest.raises(ValueError, match="generator is on cpu but device is meta"):
        sample_views(2, 10, 2, 0.5, generator=torch.Generator(), device="meta")


@pytest.mark.gpu
def test_on_gpu_from_a_cuda_generator():
    def draw():
        return sample_views(64, 196, 10, 0.2, generator=torch.Generator("cuda").manual_seed(0))

    idx = draw()
    assert idx.device.type == "cuda" and idx.shape == (10, 64, 39)
    assert bool((idx[..., 1:] > idx[..., :-1]).all()) and idx.max() < 196
    assert torch.equal(idx, draw())
