"""Datasets for msd_fast: uint8 images in an :class:`ImageSet`, from the embedded synthetic scans or real data.

* :func:`synthetic_dataset` -- deterministic chest-CT-like slices in seven radiological classes (no download).
* :func:`load_dataset` -- one entry point: ``"synthetic[:N]"``, an image folder, a MedMNIST ``.npz``, a ``.npy``,
  DICOM files/folders (:func:`load_dicom`), NIfTI volumes (:func:`load_nifti`), CSV manifests
  (:func:`load_manifest`), with ``?window=...&axis=...`` options; :func:`from_arrays` for numpy arrays;
  :func:`check_patch_size` for the ViT's patch size. Intensity windows: :mod:`msd_fast.data.window`.
* :func:`split_clients` (IID / Dirichlet non-IID), :func:`train_test_split`, :func:`label_fraction_subset`;
  with ``groups=`` (e.g. ``ImageSet.groups``, the patients) a group's images stay on one side.

Errors about the data itself are :class:`DataError` (a ``ValueError``) naming the file and the problem.
"""
from .convert import convert_channels, resize_images, to_uint8
from .dicom import load_dicom
from .imageset import DataError, ImageSet
from .loaders import (IMAGE_EXTENSIONS, SPEC_HELP, check_patch_size, decode_image, from_arrays, load_dataset,
                      load_folder, load_npy, load_npz)
from .manifest import load_manifest
from .nifti import load_nifti
from .splits import label_fraction_subset, split_clients, train_test_split
from .synthetic import CLASS_NAMES, synthetic_dataset
from .window import PRESETS as WINDOW_PRESETS

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "IMAGE_EXTENSIONS",
    "SPEC_HELP",
    "WINDOW_PRESETS",
    "ImageSet",
    "check_patch_size",
    "convert_channels",
    "decode_image",
    "from_arrays",
    "label_fraction_subset",
    "load_dataset",
    "load_dicom",
    "load_folder",
    "load_manifest",
    "load_nifti",
    "load_npy",
    "load_npz",
    "resize_images",
    "split_clients",
    "synthetic_dataset",
    "to_uint8",
    "train_test_split",
]
