"""`ImageSet`: images (uint8 ``[n, C, H, W]``, in memory or read lazily) with optional integer labels.

Pixel data is uint8 everywhere in msd_fast's pipeline. An :class:`ImageSet` reads its images through a *reader*
(an object with ``geometry``, ``__len__`` and ``read(rows) -> uint8 [len(rows), C, H, W]``): an in-memory tensor,
files decoded batch by batch, or a memory-mapped array converted batch by batch, so data larger than memory streams.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

Indices = Union[torch.Tensor, np.ndarray, Sequence[int], range]


class DataError(ValueError):
    """A dataset that cannot be used as given: unreadable or empty input, mixed sizes, wrong keys or shapes.
    The message names the file (or argument) and the problem, and what to pass to fix it where there is a fix."""


class TensorReader:
    """Reader over an in-memory uint8 tensor ``[n, C, H, W]``."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    @property
    def geometry(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, rows: np.ndarray) -> torch.Tensor:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
            return self.images[int(rows[0]):int(rows[-1]) + 1]
        return self.images[torch.from_numpy(rows)]

    def describe(self) -> str:
        return "in-memory tensor"


class ImageSet:
    """Images plus optional labels.

    Args:
        images: a uint8 tensor ``[n, C, H, W]`` (kept, not copied), or a reader (see the module docstring).
        labels: optional integer labels ``[n]`` (stored as an int64 tensor, values >= 0).
        class_names: optional names, one per class (``labels < len(class_names)``).
        description: a short, human-readable origin shown in ``repr``.
        patient_ids, study_ids: optional per-image identifiers (``[n]`` strings; ``""`` where unknown), e.g. DICOM's
            PatientID and StudyInstanceUID. Metadata for splitting and bookkeeping on the client only: nothing in
            msd_fast writes them into a shard, a checkpoint or a log, and ``repr`` does not show them.
        groups: optional ``[n]`` strings naming what a split must keep together (images of one group go to one
            side of :func:`~msd_fast.data.train_test_split` and to one client of
            :func:`~msd_fast.data.split_clients`); default: ``patient_ids`` where given.

    ``len(s)``, ``s.geometry == (C, H, W)``, ``s.channels``/``height``/``width``; :meth:`batches` streams uint8
    ``[b, C, H, W]`` in order; :meth:`subset` selects images without loading them; :meth:`to_tensor` loads all.
    """

    def __init__(self, images, labels: Optional[Indices] = None, class_names: Optional[Sequence[str]] = None, *,
                 description: Optional[str] = None, patient_ids: Optional[Sequence[str]] = None,
                 study_ids: Optional[Sequence[str]] = None, groups: Optional[Sequence[str]] = None,
                 _rows: Optional[np.ndarray] = None):
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DataError(f"images must be a uint8 tensor [n, C, H, W], got {images.dtype} of shape "
                                f"{tuple(images.shape)} (use msd_fast.data.from_arrays for other layouts/dtypes)")
            reader = TensorReader(images)
        elif all(hasattr(images, name) for name in ("read", "geometry", "__len__")):
            reader = images
        else:
            raise TypeError(f"images must be a uint8 tensor [n, C, H, W] or a reader, got {type(images).__name__}")
        self._reader = reader
        self._rows = _rows  # positions in the reader, or None for all of them in order
        n = len(self)
        if n == 0:
            raise DataError("an ImageSet needs at least one image")
        self._labels = None if labels is None else _check_labels(labels, n)
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if self._labels is not None and self._labels.numel() and int(self._labels.max()) >= len(class_names):
                raise DataError(f"labels go up to {int(self._labels.max())} but only {len(class_names)} class_names "
                                "were given")
        self._class_names = class_names
        self._patient_ids = _check_ids(patient_ids, n, "patient_ids")
        self._study_ids = _check_ids(study_ids, n, "study_ids")
        self._groups = _check_ids(groups, n, "groups") if groups is not None else self._patient_ids
        self.description = description or reader.describe()

    # ---- what it holds ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._reader) if self._rows is None else len(self._rows)

    @property
    def geometry(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(int(v) for v in self._reader.geometry)

    @property
    def channels(self) -> int:
        return self.geometry[0]

    @property
    def height(self) -> int:
        return self.geometry[1]

    @property
    def width(self) -> int:
        return self.geometry[2]

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """int64 ``[n]`` or None (unlabeled)."""
        return self._labels

    @property
    def class_names(self) -> Optional[list[str]]:
        return None if self._class_names is None else list(self._class_names)

    @property
    def patient_ids(self) -> Optional[np.ndarray]:
        """``[n]`` strings (``""`` where unknown) or None: client-side metadata, never written into a shard."""
        return self._patient_ids

    @property
    def study_ids(self) -> Optional[np.ndarray]:
        """``[n]`` strings (``""`` where unknown) or None: client-side metadata, never written into a shard."""
        return self._study_ids

    @property
    def groups(self) -> Optional[np.ndarray]:
        """``[n]`` strings or None: the unit a split keeps on one side (the patient, where known)."""
        return self._groups

    @property
    def n_classes(self) -> Optional[int]:
        """``len(class_names)`` if known, else ``max(label) + 1``; None without labels."""
        if self._class_names is not None:
            return len(self._class_names)
        return None if self._labels is None else int(self._labels.max()) + 1

    def __repr__(self) -> str:
        C, H, W = self.geometry
        labels = "unlabeled" if self._labels is None else f"{self.n_classes} classes"
        return f"ImageSet({len(self)} images, {C}x{H}x{W} uint8, {labels}, from {self.description})"

    # ---- access -----------------------------------------------------------------------------------------------------
    def batches(self, batch_size: int, indices: Optional[Indices] = None) -> Iterator[torch.Tensor]:
        """Yield uint8 ``[b, C, H, W]`` batches (the last may be smaller) of the images at ``indices`` (positions in
        this set, default all) in that order. Lazy sets read only the batch being yielded."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        positions = np.arange(len(self)) if indices is None else _check_indices(indices, len(self))
        rows = positions if self._rows is None else self._rows[positions]
        for start in range(0, len(rows), int(batch_size)):
            yield self._reader.read(rows[start:start + batch_size])

    def subset(self, indices: Indices) -> "ImageSet":
        """The images (and labels) at ``indices`` (positions in this set, any order, repeats allowed), unloaded."""
        positions = _check_indices(indices, len(self))
        if len(positions) == 0:
            raise DataError("subset needs at least one index")
        rows = positions if self._rows is None else self._rows[positions]
        labels = None if self._labels is None else self._labels[torch.from_numpy(positions)]
        patients, studies, groups = (None if ids is None else ids[positions]
                                     for ids in (self._patient_ids, self._study_ids, self._groups))
        return ImageSet(self._reader, labels, self._class_names, description=self.description,
                        patient_ids=patients, study_ids=studies, groups=groups, _rows=rows)

    def to_tensor(self, batch_size: int = 1024) -> torch.Tensor:
        """All images as one uint8 ``[n, C, H, W]`` tensor (for an in-memory set in its original order, the stored
        tensor itself -- do not modify it in place)."""
        if isinstance(self._reader, TensorReader) and self._rows is None:
            return self._reader.images
        return torch.cat(list(self.batches(batch_size)))


def _check_indices(indices: Indices, n: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    positions = np.asarray(indices)
    if positions.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {positions.shape}")
    if positions.size == 0:
        return positions.astype(np.int64)
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {positions.dtype}")
    positions = positions.astype(np.int64)
    if positions.min() < 0 or positions.max() >= n:
        raise IndexError(f"indices must be in [0, {n}), got values in [{positions.min()}, {positions.max()}]")
    return positions


def _check_ids(ids: Optional[Sequence[str]], n: int, name: str) -> Optional[np.ndarray]:
    """``[n]`` identifiers as a numpy unicode array (a private copy), or None."""
    if ids is None:
        return None
    values = np.asarray(ids)
    if values.ndim != 1 or values.shape[0] != n:
        raise DataError(f"{name} must have shape [{n}] (one per image), got {values.shape}")
    if values.dtype.kind not in "UO":
        raise DataError(f"{name} must be strings, got dtype {values.dtype}")
    return values.astype(str)


def _check_labels(labels: Indices, n: int) -> torch.Tensor:
    values = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 1 or values.shape[0] != n:
        raise DataError(f"labels must have shape [{n}] (one per image), got {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise DataError(f"labels must be integers, got {values.dtype}")
    values = values.to(torch.int64)
    if values.numel() and int(values.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(values.min())}")
    return values.contiguous()
