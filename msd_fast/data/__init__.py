"""Datasets for msd_fast: uint8 images in an :class:`ImageSet`, from the embedded synthetic scans or real data.

* :func:`synthetic_dataset` -- deterministic chest-CT-like slices in seven radiological classes (no download).
* :func:`load_dataset` -- one entry point: ``"synthetic[:N]"``, an image folder, a MedMNIST ``.npz``, a ``.npy``;
  :func:`from_arrays` for numpy arrays; :func:`check_patch_size` for the ViT's patch size.
* :func:`split_clients` (IID / Dirichlet non-IID), :func:`train_test_split`, :func:`label_fraction_subset`.

Errors about the data itself are :class:`DataError` (a ``ValueError``) naming the file and the problem.
"""
from .convert import convert_channels, resize_images, to_uint8
from .imageset import DataError, ImageSet
from .loaders import (IMAGE_EXTENSIONS, check_patch_size, decode_image, from_arrays, load_dataset, load_folder,
                      load_npy, load_npz)
from .splits import label_fraction_subset, split_clients, train_test_split
from .synthetic import CLASS_NAMES, synthetic_dataset

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "check_patch_size",
    "convert_channels",
    "decode_image",
    "from_arrays",
    "label_fraction_subset",
    "load_dataset",
    "load_folder",
    "load_npy",
    "load_npz",
    "resize_images",
    "split_clients",
    "synthetic_dataset",
    "to_uint8",
    "train_test_split",
]
