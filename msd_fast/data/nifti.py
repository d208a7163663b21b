"""NIfTI volumes (``.nii``, ``.nii.gz``) -> 2-D slices in an :class:`ImageSet` (nibabel; headers up front).

Every volume is, in order:

1. read with its scaling (``scl_slope``/``scl_inter``) applied, as float32; a 4-D volume is refused (a trailing
   dimension of 1 is dropped);
2. reoriented to the closest canonical orientation, RAS+ (nibabel's ``as_closest_canonical``: array axes 0, 1, 2
   point to the patient's Right, Anterior, Superior);
3. windowed (``window=``, see :mod:`msd_fast.data.window`; default: the ``[P0.5, P99.5]`` percentile window of the
   volume, so all slices of one volume share one intensity map);
4. cut into 2-D slices along ``axis``, each shown in the radiological convention DICOM viewers use:

   * ``"axial"`` (default; one slice per z, inferior to superior): rows anterior -> posterior, columns patient
     right -> left; ``slice[r, c] = volume[X-1-c, Y-1-r, k]``, shape ``(Y, X)``;
   * ``"coronal"`` (one per y, posterior to anterior): rows superior -> inferior, columns right -> left;
     ``slice[r, c] = volume[X-1-c, j, Z-1-r]``, shape ``(Z, X)``;
   * ``"sagittal"`` (one per x, right to left): rows superior -> inferior, columns anterior -> posterior;
     ``slice[r, c] = volume[i, Y-1-c, Z-1-r]``, shape ``(Z, Y)``.

NIfTI carries no patient identity: every slice's split group is its volume (slices of one volume never land on
both sides of a split); a CSV manifest's ``patient_id`` column groups volumes by patient.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .convert import Size, check_channels, parse_size
from .imageset import DataError, ImageSet
from .sources import MultiImageFileReader, Source, assemble, is_nifti, walk_files
from .window import PERCENTILE, apply_window, parse_window, percentile_window

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
DEFAULT_AXIS = "axial"
# (flip of each RAS axis, transpose to [slice, row, column]) for each slicing axis, as in the module docstring
_SLICING = {0: ((False, True, True), (0, 2, 1)), 1: ((True, False, True), (1, 2, 0)),
            2: ((True, True, False), (2, 1, 0))}


def _nibabel():
    try:
        import nibabel
    except ImportError:  # declared as a dependency; a broken install still gets one clear line
        raise DataError("reading NIfTI needs the nibabel package (pip install nibabel)") from None
    return nibabel


def check_axis(axis: Optional[str]) -> int:
    """``"axial"``/``"coronal"``/``"sagittal"`` (None: axial) -> the RAS array axis 2/1/0."""
    if axis is None:
        return AXES[DEFAULT_AXIS]
    if not isinstance(axis, str) or axis.lower() not in AXES:
        raise DataError(f"axis={axis!r}: expected one of {', '.join(AXES)}")
    return AXES[axis.lower()]


def _open(path: str):
    nibabel = _nibabel()
    try:
        image = nibabel.load(path)
    except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise DataError(f"{path}: not a readable NIfTI file ({type(error).__name__}: {error})") from None
    if not isinstance(image, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
        raise DataError(f"{path}: is a {type(image).__name__}, not a NIfTI-1/2 image")
    return image


def _spatial_shape(image, path: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        extra = " (a 4-D series: split it into 3-D volumes, e.g. with fslsplit)" if len(shape) == 4 else ""
        raise DataError(f"{path}: is {len(shape)}-D with shape {shape}; a 3-D volume is needed{extra}")
    if image.get_data_dtype().fields is not None:
        raise DataError(f"{path}: has RGB/structured voxels ({image.get_data_dtype()}); scalar volumes only")
    return shape


def scan_nifti(path: str, axis: int) -> Source:
    """The :class:`Source` (one image per slice along ``axis``) of one volume, from its header."""
    nibabel = _nibabel()
    image = _open(path)
    shape = _spatial_shape(image, path)
    orientation = nibabel.io_orientation(image.affine)
    canonical = [0, 0, 0]
    for axis_in, (axis_out, _) in enumerate(orientation):
        canonical[int(axis_out)] = shape[axis_in]
    X, Y, Z = canonical
    height, width = {0: (Z, Y), 1: (Z, X), 2: (Y, X)}[axis]
    return Source(path, canonical[axis], height, width, False, group=f"volume:{path}")


def volume_slices(path: str, axis: int, window) -> torch.Tensor:
    """All slices of one volume along ``axis`` as uint8 ``[n, 1, H, W]`` (steps 1-4 of the module docstring)."""
    nibabel = _nibabel()
    image = _open(path)
    _spatial_shape(image, path)
    try:
        canonical = nibabel.as_closest_canonical(image)
        volume = np.asarray(canonical.get_fdata(dtype=np.float32)).reshape(canonical.shape[:3])
    except (OSError, EOFError, ValueError, MemoryError) as error:
        raise DataError(f"{path}: cannot read the voxels ({type(error).__name__}: {error})") from None
    flips, order = _SLICING[axis]
    volume = volume[tuple(slice(None, None, -1) if f else slice(None) for f in flips)].transpose(order)
    windowed = apply_window(volume, percentile_window(volume) if window in (None, PERCENTILE) else window)
    return torch.from_numpy(np.ascontiguousarray(windowed[:, None]))


def nifti_reader_factory(window, axis: int):
    """A reader factory for :func:`~msd_fast.data.sources.assemble` with this (parsed) window and axis."""
    return lambda sources, geometry, size: MultiImageFileReader(
        sources, geometry, size, lambda path: volume_slices(path, axis, window), "NIfTI")


def nifti_files(folder: str) -> list[str]:
    """The ``.nii``/``.nii.gz`` files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    return walk_files(folder, is_nifti)


def load_nifti(path, *, size: Size = None, channels: Optional[int] = None, window=None,
               axis: Optional[str] = None) -> ImageSet:
    """A NIfTI volume, or a folder of them (searched recursively), as an unlabeled, lazily read :class:`ImageSet` of
    2-D slices (see the module docstring). Slices of one volume must share one size across volumes unless ``size``
    resizes them. To attach labels or patients, list the volumes in a CSV manifest."""
    path = os.fspath(path)
    size, channels = parse_size(size), check_channels(channels)
    window, axis_index = parse_window(window), check_axis(axis)
    if os.path.isdir(path):
        paths = nifti_files(path)
        if not paths:
            raise DataError(f"{path}: no NIfTI volumes found (.nii, .nii.gz)")
        description = f"NIfTI folder {path}"
    else:
        paths, description = [path], f"NIfTI volume {path}"
    sources = [scan_nifti(p, axis_index) for p in paths]
    return assemble([(nifti_reader_factory(window, axis_index), sources)], size=size, channels=channels,
                    description=f"{description} ({'axial' if axis is None else axis.lower()} slices)")


__all__ = ["AXES", "load_nifti", "nifti_files", "volume_slices"]
