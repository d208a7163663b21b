"""Loaders (folders, .npz, .npy, arrays), ImageSet access, pixel conversions and every error case."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msd_fast.data import (DataError, ImageSet, check_patch_size, from_arrays, load_dataset, resize_images,
                           synthetic_dataset)


def _gray(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


# ---- folders -------------------------------------------------------------------------------------------------------

def test_class_folders_gray_png(tmp_path):
    arrays = {("benign", "a.png"): _gray(0), ("benign", "b.png"): _gray(1), ("malignant", "x.png"): _gray(2),
              ("malignant", "sub", "y.png"): _gray(3)}
    for parts, array in arrays.items():
        _write(str(tmp_path.joinpath(*parts)), array)
    (tmp_path / "benign" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    data = load_dataset(str(tmp_path))
    assert data.geometry == (1, 16, 16) and len(data) == 4
    assert data.class_names == ["benign", "malignant"] and data.labels.tolist() == [0, 0, 1, 1]
    images = data.to_tensor()
    expected = [arrays[("benign", "a.png")], arrays[("benign", "b.png")], arrays[("malignant", "sub", "y.png")],
                arrays[("malignant", "x.png")]]  # sorted by relative path: 'sub/y.png' < 'x.png'
    for got, want in zip(images, expected):
        assert np.array_equal(got[0].numpy(), want)
    assert "image folder" in repr(data)


def test_flat_rgb_folder_is_unlabeled_and_sorted(tmp_path):
    for name, seed in (("img10.png", 0), ("img02.png", 1)):
        _write(str(tmp_path / name), _rgb(seed))
    data = load_dataset(tmp_path)
    assert data.labels is None and data.class_names is None and data.n_classes is None
    images = data.to_tensor()
    assert images.shape == (2, 3, 16, 16)
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), _rgb(1))  # img02 first


def test_jpeg_and_channel_conversion(tmp_path):
    _write(str(tmp_path / "a.jpg"), _rgb(0), quality=95)
    _write(str(tmp_path / "b.jpeg"), np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8), quality=100)
    data = load_dataset(tmp_path)
    assert data.geometry == (3, 16, 16)
    gray = load_dataset(tmp_path, channels=1).to_tensor()
    assert gray.shape == (2, 1, 16, 16)
    # ITU-R 601 luma of (200, 100, 50), within JPEG error
    assert abs(gray[1].float().mean().item() - (299 * 200 + 587 * 100 + 114 * 50) / 1000) < 3


def test_gray_and_colour_mixed_default_to_rgb(tmp_path):
    _write(str(tmp_path / "a.png"), _gray(0))
    _write(str(tmp_path / "b.png"), _rgb(1))
    data = load_dataset(tmp_path)
    images = data.to_tensor()
    assert data.channels == 3 and all(torch.equal(images[0, c], torch.from_numpy(_gray(0))) for c in range(3))


def test_sixteen_bit_png_is_scaled(tmp_path):
    values = np.linspace(1000, 5000, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "scan.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "scan.png") as check:
        assert check.mode.startswith("I")
    per_image = load_dataset(tmp_path).to_tensor()[0, 0].numpy()
    assert per_image.min() == 0 and per_image.max() == 255  # the image's own range -> [0, 255]
    expected = np.floor((values.astype(np.float64) - 1000) * 255 / 4000 + 0.5)
    assert np.array_equal(per_image, expected)
    full = load_dataset(tmp_path, high_bit_depth="full_range").to_tensor()[0, 0].numpy()
    assert np.array_equal(full, np.floor(values.astype(np.float64) * 255 / 65535 + 0.5))


def test_folder_resize_and_mixed_sizes(tmp_path):
    _write(str(tmp_path / "a.png"), _gray(0, 16, 16))
    _write(str(tmp_path / "b.png"), _gray(1, 20, 24))
    with pytest.raises(DataError, match=r"different sizes.*a\.png is 16x16.*b\.png is 20x24.*size=.*--image-size"):
        load_dataset(tmp_path)
    data = load_dataset(tmp_path, size=(8, 12))
    assert data.geometry == (1, 8, 12) and data.to_tensor().shape == (2, 1, 8, 12)


def test_folder_split_subfolders(tmp_path):
    _write(str(tmp_path / "train" / "cat" / "a.png"), _gray(0))
    _write(str(tmp_path / "test" / "cat" / "b.png"), _gray(1))
    _write(str(tmp_path / "test" / "dog" / "c.png"), _gray(2))
    assert len(load_dataset(tmp_path)) == 1
    test = load_dataset(tmp_path, split="test")
    assert len(test) == 2 and test.class_names == ["cat", "dog"]
    with pytest.raises(DataError, match="no 'val' folder"):
        load_dataset(tmp_path, split="val")


def test_folder_is_lazy_and_names_a_file_that_breaks_later(tmp_path):
    for i in range(5):
        _write(str(tmp_path / f"{i}.png"), _gray(i))
    data = load_dataset(tmp_path)
    (tmp_path / "3.png").write_bytes(b"not a png any more")
    first = next(data.batches(2))  # images 0 and 1 decode fine
    assert np.array_equal(first[1, 0].numpy(), _gray(1))
    with pytest.raises(DataError, match=r"3\.png: cannot decode"):
        list(data.batches(2))


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "no images found"),
    (lambda p: (p / "x.png").write_bytes(b"\x89PNG garbage"), r"x\.png: not a readable image"),
    (lambda p: (_write(str(p / "a.png"), _gray(0)), _write(str(p / "cls" / "b.png"), _gray(1))),
     "both images .* and class sub-folders"),
    (lambda p: (_write(str(p / "cls" / "b.png"), _gray(1)), (p / "empty").mkdir()), "'empty' has no images"),
])
def test_folder_errors(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path)


def test_truncated_file_is_named(tmp_path):
    _write(str(tmp_path / "a.png"), _gray(0, 64, 64))
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"a\.png"):
        load_dataset(tmp_path).to_tensor()


# ---- .npz / .npy / arrays ------------------------------------------------------------------------------------------

def _medmnist(path, rgb=False):
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, *shape), dtype=np.uint8) for s, n in
              (("train", 10), ("val", 3), ("test", 4))}
    arrays.update({f"{s}_labels": rng.integers(0, 3, (n, 1)) for s, n in (("train", 10), ("val", 3), ("test", 4))})
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_npz_splits(tmp_path, rgb):
    arrays = _medmnist(tmp_path / "organamnist.npz", rgb)
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        data = load_dataset(str(tmp_path / "organamnist.npz"), split=split)
        assert len(data) == n and data.geometry == ((3 if rgb else 1), 28, 28)
        assert data.labels.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
        images = data.to_tensor()
        want = arrays[f"{split}_images"]
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy() if rgb else images[:, 0].numpy(), want)
    resized = load_dataset(str(tmp_path / "organamnist.npz"), size=32, channels=3 - 2 * rgb)
    assert resized.geometry == ((1 if rgb else 3), 32, 32)


def test_npz_errors_and_multilabel(tmp_path):
    np.savez(tmp_path / "wrong.npz", pictures=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"wrong\.npz: no 'train_images' array \(keys: pictures\)"):
        load_dataset(str(tmp_path / "wrong.npz"))
    _medmnist(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset(str(tmp_path / "m.npz"), split="dev")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match=r"broken\.npz: not a readable \.npz"):
        load_dataset(str(tmp_path / "broken.npz"))
    np.savez(tmp_path / "chest.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 14)))
    with pytest.warns(UserWarning, match="multi-label"):
        assert load_dataset(str(tmp_path / "chest.npz")).labels is None


def test_npy_memory_mapped_with_labels(tmp_path):
    images = np.random.default_rng(0).random((7, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.arange(7) % 2)
    data = load_dataset(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))
    assert isinstance(data._reader.array, np.memmap)
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert np.array_equal(data.to_tensor()[:, 0].numpy(), np.floor(images * 255.0 + 0.5).astype(np.uint8))
    with pytest.raises(DataError, match=r"labels must have shape \[7\]"):
        load_dataset(str(tmp_path / "x.npy"), labels=np.zeros(3, np.int64))
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"bad\.npy: not a readable \.npy"):
        load_dataset(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "big.npy", images * 2)
    with pytest.raises(DataError, match=r"big\.npy: float images must lie in \[0, 1\]"):
        load_dataset(str(tmp_path / "big.npy")).to_tensor()  # memory-mapped: checked as batches are read


@pytest.mark.parametrize("shape, layout, channels", [
    ((4, 10, 12), None, 1), ((4, 10, 12, 3), None, 3), ((4, 3, 10, 12), None, 3), ((4, 10, 12, 1), None, 1),
    ((4, 10, 12, 4), None, 3), ((4, 3, 10, 3), "NCHW", 3), ((4, 3, 10, 3), "NHWC", 3),
])
def test_from_arrays_layouts(shape, layout, channels):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = from_arrays(array, layout=layout)
    images = data.to_tensor()
    assert data.channels == channels and images.shape[0] == 4
    effective = layout or ("NHW" if len(shape) == 3 else ("NCHW" if shape[1] in (1, 3, 4) and shape[3] not in
                                                          (1, 3, 4) else "NHWC"))
    if effective == "NHW":
        want = array[:, None]
    elif effective == "NHWC":
        want = array.transpose(0, 3, 1, 2)[:, :3]
    else:
        want = array[:, :3]
    assert np.array_equal(images.numpy(), want)


def test_from_arrays_dtypes_and_errors():
    floats = np.array([[[0.0, 0.5], [1.0, 0.25]]])
    assert from_arrays(floats).to_tensor().flatten().tolist() == [0, 128, 255, 64]
    assert from_arrays(np.array([[[True, False]]])).to_tensor().flatten().tolist() == [255, 0]
    wide = np.array([[[100, 300], [500, 100]]], dtype=np.uint16)
    assert from_arrays(wide).to_tensor().flatten().tolist() == [0, 128, 255, 0]
    assert from_arrays(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)).geometry == (1, 4, 4)
    with pytest.raises(DataError, match=r"must lie in \[0, 1\].*\[-1, 1\]"):
        from_arrays(np.array([[[-1.0, 1.0]]]))
    with pytest.raises(DataError, match="NaN"):
        from_arrays(np.array([[[np.nan, 1.0]]]))
    with pytest.raises(DataError, match="layout='NHWC' or 'NCHW'"):
        from_arrays(np.zeros((2, 3, 8, 3), np.uint8))
    with pytest.raises(DataError, match="got shape"):
        from_arrays(np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(DataError, match="empty"):
        from_arrays(np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(DataError, match="unsupported pixel dtype"):
        from_arrays(np.zeros((1, 2, 2), np.complex64))
    with pytest.raises(DataError, match="labels must be integers"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), labels=np.array([0.5, 1.0]))
    with pytest.raises(DataError, match="labels must be >= 0"):
        from_arrays(np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1]))


def test_load_dataset_spec_errors(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: no such file or folder.*synthetic"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "data.txt").write_text("1,2")
    with pytest.raises(DataError, match=r"data\.txt: unsupported data file"):
        load_dataset(str(tmp_path / "data.txt"))
    (tmp_path / "data.csv").write_text("1,2")  # a .csv is a manifest: it needs a header row with a path column
    with pytest.raises(DataError, match=r"data\.csv: the header row '1,2' has no 'path' column"):
        load_dataset(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="size must be"):
        load_dataset("synthetic:2", size="64")
    with pytest.raises(ValueError, match="channels must be"):
        load_dataset("synthetic:2", channels=2)
    with pytest.raises(ValueError, match="labels= is only used"):
        load_dataset("synthetic:2", labels=[0, 1])


# ---- ImageSet, patch size, conversions -----------------------------------------------------------------------------

def test_imageset_batches_subset_and_to_tensor():
    images = torch.arange(6 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(6, 1, 2, 2)
    data = ImageSet(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    assert [b.shape[0] for b in data.batches(4)] == [4, 2]
    assert torch.equal(torch.cat(list(data.batches(4, indices=[5, 0, 3]))), images[[5, 0, 3]])
    sub = data.subset(torch.tensor([4, 1, 1]))
    assert len(sub) == 3 and sub.labels.tolist() == [1, 1, 1] and torch.equal(sub.to_tensor(), images[[4, 1, 1]])
    assert torch.equal(sub.subset([0]).to_tensor(), images[[4]]) and sub.class_names == ["a", "b", "c"]
    assert data.to_tensor() is images
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        data.subset([6])
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))
    with pytest.raises(DataError, match="uint8 tensor"):
        ImageSet(images.float())
    with pytest.raises(DataError, match="class_names"):
        ImageSet(images, torch.tensor([0, 1, 2, 0, 1, 5]), ["a", "b", "c"])


def test_check_patch_size():
    data = synthetic_dataset(2, size=48)
    assert check_patch_size(data, 16) == (3, 3)
    with pytest.raises(DataError, match=r"patch size 20 does not divide the image size 48x48.*size=40 "
                                        r"\(--image-size 40\)"):
        check_patch_size(data, 20)
    with pytest.raises(DataError, match=r"size=\(32, 16\) \(--image-size 32x16\)"):
        check_patch_size((1, 30, 20), 16)
    with pytest.raises(ValueError, match="patch_size"):
        check_patch_size(data, 0)


def test_resize_images_keeps_uint8_and_constant_images():
    flat = torch.full((2, 3, 10, 14), 77, dtype=torch.uint8)
    out = resize_images(flat, (5, 7))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 5, 7) and bool((out == 77).all())
    assert resize_images(flat, (10, 14)) is flat


def test_warnings_are_not_raised_for_plain_loads(tmp_path):
    _medmnist(tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(str(tmp_path / "m.npz")).to_tensor()
