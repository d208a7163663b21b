"""DICOM files and folders -> :class:`ImageSet` (pydicom; read lazily: headers up front, pixels per batch).

What happens to the pixels, in order:

1. decode (compressed transfer syntaxes need a decoder package; a missing one is named when the dataset is opened);
   a multi-frame file gives one image per frame, in frame order;
2. monochrome images: the modality transform (Rescale Slope/Intercept, or a Modality LUT; in enhanced multi-frame
   files each frame's Pixel Value Transformation) to physical units -- Hounsfield units for CT;
3. the intensity window (``window=``, see :mod:`msd_fast.data.window`): by default the file's Window Center/Width
   tags (enhanced files: each frame's Frame VOI LUT), else the ``[P0.5, P99.5]`` percentile window of the file;
4. MONOCHROME1 (white = low values) is inverted after windowing, so that bright always means high;
5. colour (RGB, YBR_* converted to RGB, PALETTE COLOR through its lookup table) is scaled from Bits Stored to
   8 bits; windows do not apply to colour images.

A folder is searched recursively for DICOM files (``.dcm``/``.dicom`` or the ``DICM`` magic at byte 128; hidden
entries skipped), in sorted path order; files without pixel data in a folder (DICOMDIR, SR, RTSTRUCT, ...) are
skipped with a warning. Patient ID and Study Instance UID are kept as the set's metadata (never written to shards);
the split group is the patient, else the study, else the series, else the file.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .convert import Size, check_channels, parse_size
from .imageset import DataError, ImageSet
from .sources import MultiImageFileReader, Source, assemble, walk_files
from .window import PERCENTILE, Window, apply_window, parse_window, percentile_window

DICOM_EXTENSIONS = (".dcm", ".dicom")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pydicom():
    try:
        import pydicom
    except ImportError:  # declared as a dependency; a broken install still gets one clear line
        raise DataError("reading DICOM needs the pydicom package (pip install pydicom)") from None
    return pydicom


def is_dicom_file(path: str) -> bool:
    """``.dcm``/``.dicom`` or the ``DICM`` magic after the 128-byte preamble."""
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str) -> list[str]:
    """The DICOM files under ``folder`` (recursive, sorted by relative path, hidden entries skipped)."""
    return walk_files(folder, is_dicom_file)


def _read(path: str, *, pixels: bool):
    pydicom = _pydicom()
    try:
        if pixels:
            return pydicom.dcmread(path)
        return pydicom.dcmread(path, defer_size="1 KB")  # large values (the pixels) are skipped, not read
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as error:
        raise DataError(f"{path}: cannot read the DICOM file ({type(error).__name__}: {error})") from None


def _text(dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip()


def _check_decoder(dataset, path: str) -> None:
    """A one-line :class:`DataError` naming the packages that would decode this transfer syntax, if none is here."""
    from pydicom.pixels import get_decoder

    meta = getattr(dataset, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        return  # no file meta: pydicom assumes an uncompressed syntax
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DataError(f"{path}: transfer syntax {uid} ({getattr(uid, 'name', 'unknown')}) has no pixel data "
                        "decoder in pydicom") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DataError(f"{path}: pixel data is compressed as {uid.name} and no installed package decodes it "
                        f"(install one: {needs})")


def _frames(dataset, path: str) -> int:
    value = dataset.get("NumberOfFrames", 1)
    try:
        frames = int(value if value not in (None, "") else 1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: Number of Frames is {value!r}, not a positive integer") from None
    if frames < 1:
        raise DataError(f"{path}: Number of Frames is {frames}")
    return frames


def scan_dicom(path: str, window, *, in_folder: bool) -> Optional[Source]:
    """The :class:`Source` of one DICOM file from its header, checking everything that can be checked without
    decoding. In a folder, a file without pixel data gives None (skipped); given alone it is an error."""
    dataset = _read(path, pixels=False)
    if not any(tag in dataset for tag in _PIXEL_TAGS):
        if in_folder:
            return None
        kind = _text(dataset, "Modality") or _text(dataset, "SOPClassUID") or "object"
        raise DataError(f"{path}: has no pixel data (a DICOM {kind}, not an image)")
    photometric = _text(dataset, "PhotometricInterpretation")
    if photometric not in MONOCHROME + COLOUR:
        raise DataError(f"{path}: unsupported photometric interpretation {photometric or '(missing)'!r} (supported: "
                        f"{', '.join(MONOCHROME + COLOUR)})")
    colour = photometric in COLOUR
    if colour and window is not None:
        raise DataError(f"{path}: is a {photometric} colour image; window= applies to monochrome images only")
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not rows or not columns:
        raise DataError(f"{path}: has no Rows/Columns (image size) in its header")
    _check_decoder(dataset, path)
    modality = _text(dataset, "Modality")
    if isinstance(window, Window) and window.preset and modality not in ("CT", ""):
        warnings.warn(f"window preset '{window.preset}' is in Hounsfield units (CT) but {modality} images have other "
                      "units; 'C,W' in the images' own units or 'percentile' fits them", stacklevel=2)
    patient, study, series = (_text(dataset, k) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"))
    group = (f"patient:{patient}" if patient else f"study:{study}" if study else f"series:{series}" if series
             else f"file:{path}")
    return Source(path, _frames(dataset, path), int(rows), int(columns), colour, patient, study, group)


def _functional_item(dataset, frame: int, sequence: str):
    """The first item of ``sequence`` for ``frame`` of an enhanced multi-frame file: its per-frame functional group,
    else the shared one; None when neither has it (or the file is not enhanced)."""
    for holder, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = dataset.get(holder)
        if groups is not None and index < len(groups) and groups[index].get(sequence):
            return groups[index].get(sequence)[0]
    return None


def _first(value) -> float:
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def file_window(dataset, path: str, frame: int = 0) -> Optional[Window]:
    """The window of the file's first Window Center/Width values (top level, else ``frame``'s Frame VOI LUT of an
    enhanced multi-frame file) with its VOI LUT Function; None if the file has none."""
    holder = dataset if "WindowCenter" in dataset else _functional_item(dataset, frame, "FrameVOILUTSequence")
    if holder is None or "WindowCenter" not in holder or "WindowWidth" not in holder:
        return None
    function = _text(holder, "VOILUTFunction").upper() or "LINEAR"
    try:
        return Window(_first(holder.WindowCenter), _first(holder.WindowWidth), function)
    except (TypeError, ValueError, IndexError) as error:
        raise DataError(f"{path}: bad Window Center/Width tags ({error})") from None


def physical_values(dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored monochrome values ``[frames, H, W]`` -> physical units (float64): the Modality LUT or Rescale
    Slope/Intercept at the top level, else each frame's Pixel Value Transformation (enhanced multi-frame files)."""
    from pydicom.pixels import apply_modality_lut

    if "RescaleSlope" in dataset or dataset.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float64)
    values = pixels.astype(np.float64)
    for frame in range(len(values)):
        item = _functional_item(dataset, frame, "PixelValueTransformationSequence")
        if item is not None:
            values[frame] = values[frame] * _first(item.get("RescaleSlope", 1) or 1) + _first(
                item.get("RescaleIntercept", 0) or 0)
    return values


def decode_dicom(path: str, window) -> torch.Tensor:
    """All images of one DICOM file as uint8 ``[frames, C, H, W]`` (``C`` = 1 monochrome, 3 colour), processed as
    the module docstring says. ``window``: a parsed window option (None, ``"percentile"`` or a :class:`Window`)."""
    from pydicom.pixels import apply_color_lut

    dataset = _read(path, pixels=True)
    photometric = _text(dataset, "PhotometricInterpretation")
    frames = _frames(dataset, path)
    try:
        pixels = dataset.pixel_array
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, dataset)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: cannot decode the pixel data ({type(error).__name__}: {error})") from None
    colour = photometric in COLOUR
    per_frame = pixels.shape[-3 if colour else -2:]
    if pixels.size != frames * int(np.prod(per_frame)):
        raise DataError(f"{path}: pixel data of shape {pixels.shape} do not hold the {frames} frames its header "
                        "announces")
    pixels = pixels.reshape((frames, *per_frame))
    if colour:
        bits = (int(dataset.RedPaletteColorLookupTableDescriptor[2]) if photometric == "PALETTE COLOR"
                else int(dataset.get("BitsStored", 8) or 8))
        image = (pixels.astype(np.uint8) if bits == 8 else
                 np.floor(np.clip(pixels * (255.0 / (2 ** bits - 1)), 0, 255) + 0.5).astype(np.uint8))
        return torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    values = physical_values(dataset, pixels)
    if isinstance(window, Window):
        windows = [window] * frames
    else:
        windows = [None if window == PERCENTILE else file_window(dataset, path, frame) for frame in range(frames)]
        if any(w is None for w in windows):  # the percentile window over all frames of the file
            fallback = percentile_window(values)
            windows = [fallback if w is None else w for w in windows]
    image = np.stack([apply_window(values[frame], windows[frame]) for frame in range(frames)])
    if photometric == "MONOCHROME1":
        image = 255 - image
    return torch.from_numpy(np.ascontiguousarray(image[:, None]))


def dicom_reader_factory(window):
    """A reader factory for :func:`~msd_fast.data.sources.assemble` with this (parsed) window."""
    return lambda sources, geometry, size: MultiImageFileReader(
        sources, geometry, size, lambda path: decode_dicom(path, window), "DICOM")


def scan_dicom_paths(paths: Sequence[str], window, *, in_folder: bool, what: str) -> list[Source]:
    """Sources of ``paths``, warning once about files without pixel data that were skipped."""
    sources, skipped = [], []
    for path in paths:
        source = scan_dicom(path, window, in_folder=in_folder)
        (sources if source is not None else skipped).append(source if source is not None else path)
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} DICOM files without pixel data (e.g. {skipped[0]})",
                      stacklevel=3)
    if not sources:
        raise DataError(f"{what}: no DICOM files with pixel data")
    return sources


def load_dicom(path, *, size: Size = None, channels: Optional[int] = None, window=None) -> ImageSet:
    """A DICOM file or a folder of DICOM files (searched recursively) as an unlabeled, lazily read
    :class:`ImageSet`: one image per frame, patient/study IDs as metadata. ``window``: see
    :mod:`msd_fast.data.window`. To attach labels, list the files (or series folders) in a CSV manifest."""
    path = os.fspath(path)
    size, channels, window = parse_size(size), check_channels(channels), parse_window(window)
    if os.path.isdir(path):
        paths = dicom_files(path)
        if not paths:
            raise DataError(f"{path}: no DICOM files found (.dcm, .dicom, or files with the 'DICM' marker)")
        sources = scan_dicom_paths(paths, window, in_folder=True, what=path)
        description = f"DICOM folder {path}"
    else:
        sources = [scan_dicom(path, window, in_folder=False)]
        description = f"DICOM file {path}"
    return assemble([(dicom_reader_factory(window), sources)], size=size, channels=channels, description=description)


__all__ = ["DICOM_EXTENSIONS", "decode_dicom", "dicom_files", "is_dicom_file", "load_dicom"]
