"""Datasets assembled from files that each hold one or more 2-D images (DICOM frames, NIfTI slices, image files).

Loading is two-phase, so that only headers are read up front: every format *scans* its files into
:class:`Source` records (how many images, their native size, colour or not, the patient and study), one common
geometry is chosen, then every format builds a *reader* for its sources (``read(rows)`` decodes pixels only for the
rows asked for). :class:`ConcatReader` joins the readers of several formats in order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .convert import convert_channels, resize_images
from .imageset import DataError, ImageSet

NIFTI_EXTENSIONS = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Source:
    """One file's images as its header describes them: ``count`` images of ``height x width``; ``group`` is what a
    split keeps together (the patient where known, else the study, series or the file itself)."""

    path: str
    count: int
    height: int
    width: int
    colour: bool
    patient_id: str = ""
    study_id: str = ""
    group: str = ""
    label: Optional[int] = None


#: ``make_reader(sources, geometry (C, H, W), size or None) -> reader`` for one format.
ReaderFactory = Callable[[list, tuple, Optional[tuple]], object]


def resize_and_convert(images: torch.Tensor, geometry: tuple[int, int, int], size: Optional[tuple[int, int]],
                       path: str) -> torch.Tensor:
    """uint8 ``[b, C0, H0, W0]`` decoded from ``path`` -> ``[b, *geometry]`` (resized to ``size`` if given)."""
    images = convert_channels(resize_images(images, size), geometry[0])
    if tuple(images.shape[1:]) != tuple(geometry):
        raise DataError(f"{path}: decoded as {'x'.join(map(str, images.shape[1:]))}, expected "
                        f"{'x'.join(map(str, geometry))} (did the file change after the dataset was opened?)")
    return images


class MultiImageFileReader:
    """Reader over files that each hold ``source.count`` images (DICOM frames, NIfTI slices): ``decode(path)`` gives
    all images of one file as uint8 ``[count, C0, H0, W0]``; they are resized/converted to ``geometry`` and the last
    file decoded is cached, so reading a file's images in order decodes it once."""

    def __init__(self, sources: list, geometry: tuple, size: Optional[tuple], decode: Callable[[str], torch.Tensor],
                 kind: str):
        self.sources, self.geometry, self.size, self.decode, self.kind = sources, tuple(geometry), size, decode, kind
        self.starts = np.cumsum([0] + [s.count for s in sources])
        self._cached: tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, index: int) -> np.ndarray:
        if self._cached[0] != index:
            path = self.sources[index].path
            images = self.decode(path)
            if len(images) != self.sources[index].count:
                raise DataError(f"{path}: decoded {len(images)} images, its header announced "
                                f"{self.sources[index].count} (did the file change after the dataset was opened?)")
            self._cached = (index, resize_and_convert(images, self.geometry, self.size, path).numpy())
        return self._cached[1]

    def read(self, rows: np.ndarray) -> torch.Tensor:
        # numpy copies: per-row torch copies pay a thread synchronisation each (15 ms on a loaded 2-core machine)
        out = np.empty((len(rows), *self.geometry), dtype=np.uint8)
        files = np.searchsorted(self.starts, rows, side="right") - 1
        for i, (row, index) in enumerate(zip(rows, files)):
            out[i] = self._file(int(index))[int(row - self.starts[index])]
        return torch.from_numpy(out)

    def describe(self) -> str:
        return f"{len(self.sources)} {self.kind} files"


class ConcatReader:
    """Readers of consecutive row ranges joined into one reader (rows are global positions)."""

    def __init__(self, readers: Sequence, description: str):
        self.readers, self.description = list(readers), description
        self.offsets = np.cumsum([0] + [len(r) for r in self.readers])
        self.geometry = tuple(self.readers[0].geometry)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, rows: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(rows), *self.geometry), dtype=torch.uint8)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for index in np.unique(which):
            picked = np.flatnonzero(which == index)
            out[torch.from_numpy(picked)] = self.readers[index].read(rows[picked] - self.offsets[index])
        return out

    def describe(self) -> str:
        return self.description


def common_geometry(sources: Sequence[Source], size: Optional[tuple[int, int]], channels: Optional[int],
                    what: str) -> tuple[int, int, int]:
    """``(C, H, W)`` for all sources: one native size unless ``size`` resizes; ``C`` = ``channels``, else 3 if any
    source is colour, else 1."""
    sizes: dict[tuple[int, int], str] = {}
    for source in sources:
        sizes.setdefault((source.height, source.width), source.path)
    if size is None and len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(f"{what}: images have different sizes ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}"
                        f"{f', {len(sizes) - 2} more sizes' if len(sizes) > 2 else ''}); pass size= "
                        "(--image-size) to resize them all")
    height, width = size or next(iter(sizes))
    if channels is None:
        channels = 3 if any(source.colour for source in sources) else 1
    return channels, height, width


def assemble(runs: Sequence[tuple[ReaderFactory, list]], *, size: Optional[tuple[int, int]],
             channels: Optional[int], description: str, class_names: Optional[Sequence[str]] = None) -> ImageSet:
    """An :class:`ImageSet` from consecutive runs ``(make_reader, sources)``, in order. Labels come from the sources
    (all labelled or none); patient/study IDs and groups are kept as the set's metadata."""
    sources = [source for _, run in runs for source in run]
    if not sources or sum(source.count for source in sources) == 0:
        raise DataError(f"{description}: no images found")
    geometry = common_geometry(sources, size, channels, description)
    readers = [make_reader(run, geometry, size) for make_reader, run in runs if run]
    reader = readers[0] if len(readers) == 1 else ConcatReader(readers, description)
    counts = [source.count for source in sources]

    def per_image(field: str) -> np.ndarray:
        return np.repeat(np.array([getattr(source, field) for source in sources], dtype=str), counts)

    labelled = [source.label is not None for source in sources]
    if any(labelled) and not all(labelled):
        raise DataError(f"{description}: some images have labels and some do not")
    labels = np.repeat(np.array([s.label for s in sources], dtype=np.int64), counts) if all(labelled) else None
    patients, studies = per_image("patient_id"), per_image("study_id")
    return ImageSet(reader, labels, class_names, description=description,
                    patient_ids=patients if any(patients) else None, study_ids=studies if any(studies) else None,
                    groups=per_image("group"))


def with_metadata(source: Source, *, label: Optional[int], patient_id: str) -> Source:
    """``source`` labelled ``label``; ``patient_id`` (when not empty) replaces its patient and becomes its group."""
    if patient_id:
        return replace(source, label=label, patient_id=patient_id, group=f"patient:{patient_id}")
    return replace(source, label=label)


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_EXTENSIONS)


def walk_files(folder: str, keep: Callable[[str], bool]) -> list[str]:
    """Files under ``folder`` (recursive, hidden entries skipped) for which ``keep(path)``, in sorted path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and keep(os.path.join(root, f))]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))
