"""CSV manifests -> :class:`ImageSet`: a list of image files, DICOM files or series folders and NIfTI volumes.

Format: a header row naming the columns, then one row per file; UTF-8 (a byte-order mark is fine)::

    path,label,patient_id
    scans/p001/ct.nii.gz,tumour,P001
    scans/p002/IM0001.dcm,normal,P002
    scans/p003/series1,normal,P003      <- a folder: all the DICOM files under it
    photos/derm_17.png,tumour,P004

* ``path`` (required): relative to the CSV's folder (or absolute): an image file (PNG, JPEG, TIFF, BMP; see
  :func:`~msd_fast.data.decode_image`), a DICOM file, a folder of DICOM files, or a NIfTI volume. Every image the
  row stands for (all frames of a DICOM file, all slices of a volume, all files of a folder) gets the row's label
  and patient.
* ``label`` (optional column): a class name, or an integer >= 0. When all labels are integers they are the
  labels; otherwise the sorted distinct names are the classes (label = index in that list). Integers and names
  cannot be mixed; an empty cell is an error.
* ``patient_id`` (optional column): the patient; replaces a DICOM file's own PatientID and is the split group.
  Empty cells fall back to the file's own group (DICOM patient/study, or the NIfTI volume, or the image file).

Other columns are ignored. Images are in row order. Window and slicing axis options apply to every DICOM and
NIfTI row (see :func:`~msd_fast.data.load_dataset`).
"""
from __future__ import annotations

import csv
import os
import re
from typing import Optional

from .convert import Size, check_channels, check_high_bit_depth, parse_size
from .dicom import dicom_files, dicom_reader_factory, is_dicom_file, scan_dicom, scan_dicom_paths
from .imageset import DataError, ImageSet
from .nifti import check_axis, nifti_reader_factory, scan_nifti
from .sources import Source, assemble, is_nifti, with_metadata
from .window import parse_window

_INTEGER = re.compile(r"[+-]?\d+")


def _columns(fieldnames, path: str) -> dict[str, str]:
    """Known column name -> the header's spelling (case and surrounding spaces ignored)."""
    if not fieldnames:
        raise DataError(f"{path}: empty manifest (expected a header row 'path,label[,patient_id]')")
    found = {name.strip().lower(): name for name in fieldnames if name is not None}
    if "path" not in found:
        raise DataError(f"{path}: the header row {','.join(fieldnames)!r} has no 'path' column (expected "
                        "'path,label[,patient_id]')")
    return {key: found[key] for key in ("path", "label", "patient_id") if key in found}


def _labels(raw: list[tuple[int, str]], path: str) -> tuple[list[int], Optional[list[str]]]:
    """Row labels (line number, text) -> integer labels and class names (None for integer labels)."""
    for line, text in raw:
        if not text:
            raise DataError(f"{path}, line {line}: empty label (every row needs one, or drop the label column)")
    integers = [bool(_INTEGER.fullmatch(text)) for _, text in raw]
    if all(integers):
        values = [int(text) for _, text in raw]
        for (line, text), value in zip(raw, values):
            if value < 0:
                raise DataError(f"{path}, line {line}: bad label {text!r} (labels are class names or integers >= 0)")
        return values, None
    if any(integers):
        line, text = raw[integers.index(True)]
        other = raw[integers.index(False)][1]
        raise DataError(f"{path}, line {line}: bad label {text!r}: the manifest mixes integer labels and class "
                        f"names (e.g. {other!r}); use one kind")
    names = sorted({text for _, text in raw})
    return [names.index(text) for _, text in raw], names


def load_manifest(path, *, size: Size = None, channels: Optional[int] = None, window=None,
                  axis: Optional[str] = None, high_bit_depth: str = "per_image") -> ImageSet:
    """A CSV manifest (format in the module docstring) as a lazily read :class:`ImageSet` with labels (when the
    manifest has a label column) and patient IDs/groups as metadata. Headers of every file are read up front."""
    from .loaders import FileReader, IMAGE_EXTENSIONS, _read_header

    path = os.fspath(path)
    size, channels = parse_size(size), check_channels(channels)
    high_bit_depth, window, axis_index = check_high_bit_depth(high_bit_depth), parse_window(window), check_axis(axis)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = _columns(reader.fieldnames, path)
            rows = [(reader.line_num, {key: (row.get(name) or "").strip() for key, name in columns.items()})
                    for row in reader]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{path}: the manifest lists no files (only a header row)")
    labels, class_names = (_labels([(line, row["label"]) for line, row in rows], path)
                           if "label" in columns else ([None] * len(rows), None))

    kinds = {"image": lambda sources, geometry, size_: FileReader([s.path for s in sources], geometry, size_,
                                                                   high_bit_depth, path),
             "dicom": dicom_reader_factory(window), "nifti": nifti_reader_factory(window, axis_index)}
    runs: list[tuple[str, list[Source]]] = []
    for (line, row), label in zip(rows, labels):
        where = f"{path}, line {line}"
        if not row["path"]:
            raise DataError(f"{where}: empty path")
        target = row["path"] if os.path.isabs(row["path"]) else os.path.join(folder, row["path"])
        if not os.path.exists(target):
            raise DataError(f"{where}: {row['path']}: no such file or folder (paths are relative to the manifest's "
                            "folder)")
        if os.path.isdir(target):
            files = dicom_files(target)
            if not files:
                raise DataError(f"{where}: {row['path']}: a folder row must hold DICOM files; this one has none")
            kind, found = "dicom", scan_dicom_paths(files, window, in_folder=True, what=f"{where}: {row['path']}")
        elif is_nifti(target):
            kind, found = "nifti", [scan_nifti(target, axis_index)]
        elif target.lower().endswith(IMAGE_EXTENSIONS):
            height, width, colour = _read_header(target)
            kind, found = "image", [Source(target, 1, height, width, colour, group=f"file:{target}")]
        elif is_dicom_file(target):
            kind, found = "dicom", [scan_dicom(target, window, in_folder=False)]
        else:
            raise DataError(f"{where}: {row['path']}: unsupported file (expected an image "
                            f"({', '.join(IMAGE_EXTENSIONS)}), a DICOM file or folder, or a .nii/.nii.gz volume)")
        found = [with_metadata(source, label=label, patient_id=row.get("patient_id", "")) for source in found]
        if runs and runs[-1][0] == kind:
            runs[-1][1].extend(found)
        else:
            runs.append((kind, found))
    if window is not None and not any(kind in ("dicom", "nifti") for kind, _ in runs):
        raise DataError(f"{path}: window= applies to DICOM and NIfTI data; this manifest lists image files only")
    return assemble([(kinds[kind], sources) for kind, sources in runs], size=size, channels=channels,
                    description=f"manifest {path}", class_names=class_names)


__all__ = ["load_manifest"]
