"""Real-data loaders: image folders, MedMNIST-format ``.npz``, ``.npy`` files and numpy arrays -> :class:`ImageSet`.

Nothing is downloaded. Folders are read lazily (only headers are read up front: sizes and colour modes are checked
before any pixel is decoded), ``.npy`` files are memory-mapped, so both stream data larger than memory. Pixel rules
(uint8, channels, resizing, 16-bit scaling) are in :mod:`msd_fast.data.convert`.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .convert import (Size, check_channels, check_high_bit_depth, convert_channels, parse_size, resize_images,
                      to_uint8)
from .imageset import DataError, ImageSet, Indices
from .sources import Source, common_geometry, resize_and_convert
from .synthetic import DEFAULT_COUNT, DEFAULT_SIZE, SPLITS, synthetic_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LAYOUTS = ("NHW", "NHWC", "NCHW")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
PathLike = Union[str, os.PathLike]


# ---- image files ---------------------------------------------------------------------------------------------------

def decode_image(path: str, high_bit_depth: str = "per_image") -> torch.Tensor:
    """Decode one image file to uint8 ``[1, C, H, W]`` with ``C`` = 1 (gray modes) or 3 (colour; alpha dropped).
    16-bit and 32-bit integer images follow ``high_bit_depth``; 32-bit float images are scaled per image."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in _SIXTEEN_BIT_MODES:
                pixels = to_uint8(np.array(image)[None], high_bit_depth, path, full_range_max=65535)
            elif mode == "F":
                pixels = to_uint8(np.array(image)[None], "per_image", path, floats_as_high_bit_depth=True)
            elif mode in _GRAY_MODES:
                pixels = np.array(image.convert("L"))[None]
            else:
                pixels = np.array(image if mode == "RGB" else image.convert("RGB"))[None]
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: cannot decode the image ({type(error).__name__}: {error})") from None
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    return tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def _read_header(path: str) -> tuple[int, int, bool]:
    """``(height, width, is_colour)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width, image.mode not in _GRAY_MODES
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None


class FileReader:
    """Reader decoding image files batch by batch into uint8 ``[b, C, H, W]`` (resized to ``size`` if given)."""

    def __init__(self, paths: list[str], geometry: tuple[int, int, int], size: Optional[tuple[int, int]],
                 high_bit_depth: str, root: str):
        self.paths, self.geometry, self.size = paths, geometry, size
        self.high_bit_depth, self.root = high_bit_depth, root

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(rows), *self.geometry), dtype=torch.uint8)
        for i, row in enumerate(rows):
            path = self.paths[int(row)]
            out[i] = resize_and_convert(decode_image(path, self.high_bit_depth), self.geometry, self.size, path)[0]
        return out

    def describe(self) -> str:
        return f"image folder {self.root}"


def _has_images(folder: str) -> bool:
    return any(_image_files(folder, recursive=True))


def _image_files(folder: str, *, recursive: bool) -> list[str]:
    """Image files under ``folder`` (sorted by relative path, hidden entries skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def split_folder(folder: str, split: str) -> str:
    """``folder/<split>`` when ``folder``'s sub-folders are split names (train, val, test), else ``folder`` (and
    then only ``split="train"`` is accepted)."""
    _check_split(split)
    subdirs = _subfolders(folder)
    if subdirs and set(subdirs) <= set(SPLITS):
        if split not in subdirs:
            raise DataError(f"{folder}: has split folders {subdirs} but no '{split}' folder")
        return os.path.join(folder, split)
    if split != "train":
        raise DataError(f"{folder}: split={split!r} needs train/val/test sub-folders; this folder has none")
    return folder


def load_folder(folder: PathLike, *, size: Size = None, channels: Optional[int] = None, split: str = "train",
                high_bit_depth: str = "per_image") -> ImageSet:
    """An image folder as an :class:`ImageSet` (lazy: pixels are decoded when batches are read).

    Layouts: ``folder/<class>/**/<image>`` (one sub-folder per class, labels = sorted sub-folder names) or
    ``folder/<image>`` (flat, unlabeled). If the sub-folders are split names (``train``, ``val``, ``test``),
    ``folder/<split>`` is used. Files ending in .png/.jpg/.jpeg/.tif/.tiff/.bmp are images, in sorted path order;
    hidden files and folders are skipped, other files are ignored. All images must have one size unless ``size``
    resizes them; ``channels`` defaults to 3 if any image is colour, else 1.
    """
    folder = os.fspath(folder)
    size, channels = parse_size(size), check_channels(channels)
    high_bit_depth = check_high_bit_depth(high_bit_depth)
    folder = split_folder(folder, split)
    subdirs = _subfolders(folder)
    loose = _image_files(folder, recursive=False)
    classes = [d for d in subdirs if _has_images(os.path.join(folder, d))]
    if loose and classes:
        raise DataError(f"{folder}: holds both images ({os.path.basename(loose[0])}, ...) and class sub-folders "
                        f"({', '.join(classes[:3])}, ...); use one layout")
    if classes:
        empty = [d for d in subdirs if d not in classes]
        if empty:
            raise DataError(f"{folder}: class folder '{empty[0]}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths, labels = [], []
        for index, name in enumerate(classes):
            files = _image_files(os.path.join(folder, name), recursive=True)
            paths += files
            labels += [index] * len(files)
        class_names, labels = classes, torch.tensor(labels, dtype=torch.int64)
    else:
        paths, labels, class_names = loose, None, None
    if not paths:
        raise DataError(f"{folder}: no images found ({', '.join(IMAGE_EXTENSIONS)})")

    headers = [Source(path, 1, *_read_header(path)) for path in paths]
    reader = FileReader(paths, common_geometry(headers, size, channels, folder), size, high_bit_depth, folder)
    return ImageSet(reader, labels, class_names)


# ---- arrays --------------------------------------------------------------------------------------------------------

def _infer_layout(shape: tuple, what: str) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        last, first = shape[3] in (1, 3, 4), shape[1] in (1, 3, 4)
        if last and not first:
            return "NHWC"
        if first and not last:
            return "NCHW"
        if first and last:
            raise DataError(f"{what}: shape {shape} could be [n, H, W, C] or [n, C, H, W]; pass layout='NHWC' or "
                            "'NCHW'")
    raise DataError(f"{what}: images must be [n, H, W], [n, H, W, C] or [n, C, H, W] with C in 1, 3 (RGB) or 4 "
                    f"(RGBA), got shape {shape}")


class ArrayReader:
    """Reader converting rows of a numpy array (possibly memory-mapped) to uint8 ``[b, C, H, W]`` per batch."""

    def __init__(self, array: np.ndarray, layout: str, size: Optional[tuple[int, int]], channels: Optional[int],
                 high_bit_depth: str, what: str):
        self.array, self.layout, self.size, self.high_bit_depth, self.what = array, layout, size, high_bit_depth, what
        shape = array.shape
        native_c = 1 if layout == "NHW" else (shape[3] if layout == "NHWC" else shape[1])
        native_hw = shape[1:3] if layout in ("NHW", "NHWC") else shape[2:4]
        if native_c not in (1, 3, 4):
            raise DataError(f"{what}: {native_c} channels; images need 1, 3 (RGB) or 4 (RGBA) channels")
        native_c = min(native_c, 3)  # RGBA: the alpha channel is dropped
        self.geometry = (channels or native_c,) + tuple(size or native_hw)

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, rows: np.ndarray) -> torch.Tensor:
        contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))
        block = self.array[int(rows[0]):int(rows[-1]) + 1] if contiguous else self.array[rows]
        # a private copy: never a view of the caller's array or of a read-only memory map
        pixels = torch.from_numpy(np.array(to_uint8(np.asarray(block), self.high_bit_depth, self.what), order="C"))
        if self.layout == "NHW":
            pixels = pixels[:, None]
        elif self.layout == "NHWC":
            pixels = pixels.permute(0, 3, 1, 2)
        pixels = pixels[:, :3]
        return convert_channels(resize_images(pixels, self.size), self.geometry[0]).contiguous()

    def describe(self) -> str:
        return self.what


def from_arrays(images, labels: Optional[Indices] = None, *, class_names: Optional[Sequence[str]] = None,
                layout: Optional[str] = None, size: Size = None, channels: Optional[int] = None,
                high_bit_depth: str = "per_image", description: str = "numpy arrays") -> ImageSet:
    """Images from an array (numpy, memory-mapped numpy, or a CPU torch tensor).

    Args:
        images: ``[n, H, W]``, ``[n, H, W, C]`` or ``[n, C, H, W]`` (``C`` in 1, 3, 4; alpha is dropped), uint8,
            float in [0, 1], bool, or wider integers (scaled per ``high_bit_depth``, see :mod:`.convert`).
        labels: optional integer labels ``[n]`` (or ``[n, 1]``).
        layout: ``"NHW"``, ``"NHWC"`` or ``"NCHW"``; when None, 4-D torch tensors are NCHW and numpy arrays are
            inferred from the shape (an error says when the shape is ambiguous).
        size, channels: resize to ``size`` (int or ``(H, W)``) and convert to ``channels`` (1 or 3) as batches are read.

    Returns:
        An :class:`ImageSet` converting lazily (a memory-mapped array is never loaded whole). Float ranges of
        in-memory arrays are checked here; of memory-mapped ones as batches are read.
    """
    if isinstance(images, torch.Tensor):
        if layout is None and images.dim() == 4:
            layout = "NCHW"  # torch's convention
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    size, channels = parse_size(size), check_channels(channels)
    high_bit_depth = check_high_bit_depth(high_bit_depth)
    if layout is None:
        layout = _infer_layout(images.shape, description)
    elif layout not in LAYOUTS or images.ndim != len(layout):
        raise DataError(f"{description}: layout must be one of {LAYOUTS} matching the array's {images.ndim} "
                        f"dimensions, got {layout!r}")
    if images.shape[0] == 0:
        raise DataError(f"{description}: no images (the array is empty)")
    if not isinstance(images, np.memmap):
        to_uint8(images[:0], high_bit_depth, description)  # dtype check
        if np.issubdtype(images.dtype, np.floating):
            to_uint8(images, high_bit_depth, description)  # range check, fails early
    reader = ArrayReader(images, layout, size, channels, high_bit_depth, description)
    if labels is not None:
        labels = _as_labels(labels, description)
    return ImageSet(reader, labels, class_names, description=description)


def _as_labels(labels, what: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    if isinstance(labels, (str, os.PathLike)):
        return _load_npy(os.fspath(labels), mmap=False)
    values = np.asarray(labels)
    if values.dtype == object:
        raise DataError(f"{what}: labels must be integers")
    return values


def _load_npy(path: str, *, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy file ({type(error).__name__}: {error})") from None


def load_npy(path: PathLike, *, labels=None, layout: Optional[str] = None, size: Size = None,
             channels: Optional[int] = None, high_bit_depth: str = "per_image") -> ImageSet:
    """A ``.npy`` file of images (memory-mapped); ``labels`` is an optional ``.npy`` path or array."""
    path = os.fspath(path)
    images = _load_npy(path, mmap=True)
    return from_arrays(images, labels, layout=layout, size=size, channels=channels, high_bit_depth=high_bit_depth,
                       description=path)


def load_npz(path: PathLike, *, split: str = "train", layout: Optional[str] = None, size: Size = None,
             channels: Optional[int] = None, high_bit_depth: str = "per_image") -> ImageSet:
    """A MedMNIST-format ``.npz``: ``{split}_images`` (``[n, H, W]`` or ``[n, H, W, 3]`` uint8) and
    ``{split}_labels`` (``[n, 1]``) for ``split`` in train/val/test; or a plain ``images`` (+ ``labels``) archive.
    Multi-label ``[n, k]`` labels (e.g. ChestMNIST) cannot be class labels: they are dropped with a warning."""
    path = os.fspath(path)
    _check_split(split)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: is a .npy array, not a .npz archive (rename it to .npy)")
    with archive:
        keys = list(archive.files)
        if f"{split}_images" in keys:
            image_key, label_key = f"{split}_images", f"{split}_labels"
        elif "images" in keys and split == "train" and not any(k.endswith("_images") for k in keys):
            image_key, label_key = "images", "labels"
        else:
            raise DataError(f"{path}: no '{split}_images' array (keys: {', '.join(keys) or 'none'}); MedMNIST files "
                            "hold train_images, train_labels, val_images, val_labels, test_images, test_labels")
        try:
            images = archive[image_key]
            labels = archive[label_key] if label_key in keys else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"{path}: cannot read '{image_key}' ({type(error).__name__}: {error})") from None
    if labels is not None and labels.ndim == 2 and labels.shape[1] > 1:
        warnings.warn(f"{path}: '{label_key}' has {labels.shape[1]} labels per image (multi-label); the images are "
                      "loaded without labels", stacklevel=2)
        labels = None
    return from_arrays(images, labels, layout=layout, size=size, channels=channels, high_bit_depth=high_bit_depth,
                       description=f"{path} [{split}]")


# ---- one entry point -----------------------------------------------------------------------------------------------

SPEC_OPTIONS = ("window", "axis")
#: What a data spec may be, for ``--data`` help texts.
SPEC_HELP = ("'synthetic[:N]', an image folder, a MedMNIST .npz, a .npy, DICOM files or a DICOM folder, a NIfTI "
             ".nii/.nii.gz (or a folder of them), or a .csv manifest (path,label[,patient_id]); DICOM/NIfTI options "
             "ride on the value: 'PATH?window=lung' (or percentile, C,W) '&axis=coronal'")


def load_dataset(spec, *, size: Size = None, channels: Optional[int] = None, split: str = "train", labels=None,
                 layout: Optional[str] = None, high_bit_depth: str = "per_image", window=None,
                 axis: Optional[str] = None) -> ImageSet:
    """Open a dataset from a spec.

    Args:
        spec: ``"synthetic"`` (the embedded dataset, 2000 images) or ``"synthetic:N"``; a folder of PNG/JPEG/TIFF
            (class sub-folders or flat, see :func:`load_folder`); a MedMNIST-format ``.npz``; a ``.npy`` of images;
            a DICOM file or a folder of DICOM files (:mod:`msd_fast.data.dicom`); a NIfTI volume ``.nii``/``.nii.gz``
            or a folder of them (:mod:`msd_fast.data.nifti`); a CSV manifest ``.csv`` (``path,label[,patient_id]``,
            :mod:`msd_fast.data.manifest`); or an array (see :func:`from_arrays`).
            A string spec may end in options ``?key=value[&key=value]`` -- ``window`` and ``axis`` below -- so that
            every command's ``--data`` takes them, e.g. ``--data ct_folder?window=lung`` or
            ``--data scans.csv?window=-600,1500&axis=coronal`` (quote it in a shell: ``?`` and ``&`` are special).
            A path that exists as written (``?`` included) is taken as a path.
        size: resize to this (int or ``(H, W)``); for the synthetic set, the generated side (default 32).
        channels: 1 or 3: convert gray <-> RGB (default: keep; synthetic: 1).
        split: ``"train"``, ``"val"`` or ``"test"``: the ``.npz`` split, the folder's split sub-folder (image,
            DICOM or NIfTI folders), or an independent synthetic draw.
        labels: labels for a ``.npy`` spec or array (a ``.npy`` path or an array).
        layout, high_bit_depth: see :func:`from_arrays` and :mod:`msd_fast.data.convert`.
        window: DICOM and NIfTI intensity window: None (DICOM: the file's Window Center/Width tags; NIfTI: a
            per-volume percentile window), ``"percentile"``, a CT preset (``lung``, ``mediastinum``, ``abdomen``,
            ``liver``, ``bone``, ``brain``, ``subdural``, ``stroke``) or ``"C,W"`` (see :mod:`msd_fast.data.window`).
        axis: NIfTI slicing axis after reorientation to RAS: ``"axial"`` (default), ``"coronal"`` or ``"sagittal"``.

    Returns:
        An :class:`ImageSet` (uint8); DICOM, NIfTI and manifest sets carry ``groups`` (and, where known,
        ``patient_ids``/``study_ids``) so that splits keep a patient's images together. Raises :class:`DataError`
        naming the file and the problem.
    """
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        _no_medical_options(window, axis, "an array")
        return from_arrays(spec, labels, layout=layout, size=size, channels=channels, high_bit_depth=high_bit_depth)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string, a path or an array, got {type(spec).__name__}")
    text, options = _spec_options(os.fspath(spec))
    for name, given in (("window", window), ("axis", axis)):
        if given is not None and name in options:
            raise DataError(f"{spec}: {name} is given twice (in the spec and as {name}=); keep one")
    window, axis = options.get("window", window), options.get("axis", axis)
    lower = text.lower()
    if labels is not None and not lower.endswith(".npy"):
        raise ValueError("labels= is only used with a .npy spec or an array (other formats carry their labels)")
    if text == "synthetic" or text.startswith("synthetic:"):
        _no_medical_options(window, axis, text)
        return _synthetic_spec(text, size, channels, split)
    if not os.path.exists(text):
        raise DataError(f"{text}: no such file or folder (a data spec is 'synthetic', 'synthetic:N', an image folder, "
                        "a .npz or .npy file, DICOM, NIfTI or a .csv manifest)")
    from . import dicom, manifest, nifti  # imported on use: pydicom and nibabel load only for medical data
    from .sources import is_nifti

    options = dict(size=size, channels=channels, high_bit_depth=high_bit_depth)
    medical = dict(size=size, channels=channels, window=window)
    kind = _medical_kind(text, dicom, nifti, is_nifti)
    if kind in ("DICOM", "NIfTI") and os.path.isdir(text):
        text, split = split_folder(text, split), "train"  # train/val/test sub-folders are splits, as for images
    if kind is not None and split != "train":
        raise DataError(f"{text}: {kind} data has no splits; split={split!r} needs a .npz or a folder with split "
                        "sub-folders (held-out sets of patients come from the patient-level split)")
    if kind == "manifest":
        return manifest.load_manifest(text, axis=axis, high_bit_depth=high_bit_depth, **medical)
    if kind == "NIfTI":
        return nifti.load_nifti(text, axis=axis, **medical)
    if axis is not None:
        raise DataError(f"{spec}: axis= applies to NIfTI volumes (and manifests listing them)")
    if kind == "DICOM":
        return dicom.load_dicom(text, **medical)
    _no_medical_options(window, axis, text)
    if os.path.isdir(text):
        return load_folder(text, split=split, **options)
    if lower.endswith(".npz"):
        return load_npz(text, split=split, layout=layout, **options)
    if lower.endswith(".npy"):
        if split != "train":
            raise DataError(f"{text}: a .npy file has no splits; split={split!r} needs a .npz or a folder")
        return load_npy(text, labels=labels, layout=layout, **options)
    raise DataError(f"{text}: unsupported data file (expected a folder, a .npz, .npy, DICOM, .nii/.nii.gz or .csv "
                    "file)")


def _spec_options(text: str) -> tuple[str, dict[str, str]]:
    """``"path?window=lung&axis=axial"`` -> ``("path", {"window": "lung", "axis": "axial"})``."""
    if "?" not in text or os.path.exists(text):
        return text, {}
    path, _, query = text.rpartition("?")
    options: dict[str, str] = {}
    for item in query.split("&"):
        name, equals, value = item.partition("=")
        name = name.strip().lower()
        if not equals or not value.strip():
            raise DataError(f"{text}: option {item!r} must be key=value (options: {', '.join(SPEC_OPTIONS)})")
        if name not in SPEC_OPTIONS:
            raise DataError(f"{text}: unknown option {name!r} (options: {', '.join(SPEC_OPTIONS)})")
        if name in options:
            raise DataError(f"{text}: option {name!r} is given twice")
        options[name] = value.strip()
    return path, options


def _medical_kind(text: str, dicom, nifti, is_nifti) -> Optional[str]:
    """``"manifest"``, ``"NIfTI"``, ``"DICOM"`` or None (image folder, array file) for an existing path. A folder is
    NIfTI or DICOM only when it holds no image files (.png, ...)."""
    if os.path.isdir(text):
        if _has_images(text):
            return None
        volumes, series = nifti.nifti_files(text), dicom.dicom_files(text)
        if volumes and series:
            raise DataError(f"{text}: holds both NIfTI volumes ({volumes[0]}) and DICOM files ({series[0]}); use one "
                            "kind per folder, or list them in a .csv manifest")
        return "NIfTI" if volumes else "DICOM" if series else None
    lower = text.lower()
    if lower.endswith(".csv"):
        return "manifest"
    if is_nifti(text):
        return "NIfTI"
    if not lower.endswith((".npz", ".npy")) and dicom.is_dicom_file(text):
        return "DICOM"
    return None


def _no_medical_options(window, axis, what: str) -> None:
    for name, value in (("window", window), ("axis", axis)):
        if value is not None:
            raise DataError(f"{what}: {name}= applies to DICOM and NIfTI data (and manifests listing them)")


def _synthetic_spec(text: str, size: Size, channels: Optional[int], split: str) -> ImageSet:
    count = DEFAULT_COUNT
    if text != "synthetic":
        _, _, value = text.partition(":")
        if not value.isdigit() or int(value) < 1:
            raise DataError(f"{text}: expected 'synthetic' or 'synthetic:N' with N a positive integer")
        count = int(value)
    shape = parse_size(size) or (DEFAULT_SIZE, DEFAULT_SIZE)
    if shape[0] != shape[1]:
        raise DataError(f"the synthetic dataset is square; got size={size!r}")
    _check_split(split)
    return synthetic_dataset(count, size=shape[0], channels=check_channels(channels) or 1, split=split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_patch_size(images, patch_size: int) -> tuple[int, int]:
    """Check that ``patch_size`` divides the images' height and width; returns the patch grid ``(H/p, W/p)``.

    ``images`` is an :class:`ImageSet` or a geometry ``(C, H, W)``/``(H, W)``. Raises :class:`DataError` suggesting
    the nearest size that works and how to resize (``size=`` / ``--image-size``).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    height, width = (images.height, images.width) if isinstance(images, ImageSet) else tuple(images)[-2:]
    p = int(patch_size)
    if height % p == 0 and width % p == 0:
        return height // p, width // p
    nearest = (max(p, round(height / p) * p), max(p, round(width / p) * p))
    suggestion = str(nearest[0]) if nearest[0] == nearest[1] else f"{nearest[0]}x{nearest[1]}"
    value = str(nearest[0]) if nearest[0] == nearest[1] else f"({nearest[0]}, {nearest[1]})"
    raise DataError(f"patch size {p} does not divide the image size {height}x{width}; resize the images to a multiple "
                    f"of {p}, e.g. size={value} (--image-size {suggestion}), or use a patch size that divides both")
