"""Shard sets: one client's upload as a folder of numbered shards of bounded size, resumable while it is written.

The contract of an encoding written to ``out`` with a ``max_shard_size``:

* when the whole shard fits (:func:`~msd_fast.protocol.shards.shard_file_size` <= ``max_shard_size``), ``out`` is
  one shard file, exactly as without a limit;
* otherwise ``out`` is a folder holding ``part-00000.shard``, ``part-00001.shard``, ... and ``index.json``. Every part
  is an ordinary, self-describing shard (its own count and SHA-256; ``sample_id_start`` is the set's plus the part's
  first item, so :func:`~msd_fast.client.encode.decrypt_shard` works on a part alone). All parts but the last hold
  the same number of items; every part file is at most ``max_shard_size`` bytes.

Writing (:func:`write_shard_set`): the index is written first (``complete: false``, the plan of parts), then each
part atomically (temporary file, renamed when complete), then the part's checksum is recorded in the index (itself
replaced atomically); ``complete: true`` comes last. An interruption therefore leaves complete parts and an index
that lists exactly the verified ones, never a half-written part under a part's name. Running the same encoding
again resumes after the last recorded part, once it has checked that the folder was made with the same key
fingerprint, encryption, geometry, sample-id range, plan and data (a caller-supplied ``data_check`` digest of each
part's input, keyed so that it says nothing to the server); anything else is refused with one line naming what
differs. Readers (:func:`shard_files`, :func:`open_shard_set`) accept only complete sets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..atomic import refuse_existing, remove_stale_temporaries, write_text
from .shards import (Shard, ShardError, ShardMetadata, check_compatible, open_shard, read_metadata,
                     shard_file_size, write_shard)

SET_FORMAT = "msd_fast.shard_set"
SET_VERSION = 1
INDEX_NAME = "index.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"  # below FAT32's 4 GiB and the 5 GB single-request upload limit of object stores
_PART = re.compile(r"^part-(\d{5,})\.shard$")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_size(value: Union[int, str], name: str = "max_shard_size") -> int:
    """Bytes from an int or a text like ``2GB``, ``500MB``, ``1.5GiB``, ``100kB`` (decimal units: 1 GB = 10**9
    bytes; ``KiB``/``MiB``/``GiB`` are binary). ``ValueError`` naming ``name`` for anything else or a size < 1."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size such as 2GB or 500MB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value).lower())
        if not match or match[2] not in _UNITS:
            raise ValueError(f"{name} must be a size such as 2GB or 500MB (units B, kB, MB, GB, TB, KiB, MiB, "
                             f"GiB, TiB), got {value!r}")
        size = int(float(match[1]) * _UNITS[match[2]])
    if size < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value!r}")
    return size


def part_name(index: int) -> str:
    return f"part-{index:05d}.shard"


def part_metadata(meta: ShardMetadata, start: int, count: int) -> ShardMetadata:
    """The metadata of the part holding items ``[start, start + count)`` of the set described by ``meta``: its own
    count, no checksum yet, and its first item's sample id (when the encryption uses sample ids)."""
    encryption = dict(meta.encryption)
    if "sample_id_start" in encryption:
        encryption["sample_id_start"] += start
    return dataclasses.replace(meta, count=count, encryption=encryption, checksum="")


def plan_parts(meta: ShardMetadata, max_bytes: int) -> list[tuple[int, int]]:
    """``(start, count)`` of every part of the set ``meta`` when no part file may exceed ``max_bytes``: one part
    ``[(0, count)]`` when the single shard fits; ``ValueError`` when not even one item fits."""
    if shard_file_size(meta) <= max_bytes:
        return [(0, meta.count)]
    item_bytes = meta.nbytes // meta.count
    one = shard_file_size(part_metadata(meta, meta.count - 1, 1))  # the longest sample id: the widest header
    per_part = (max_bytes - (one - item_bytes)) // item_bytes
    if per_part < 1:
        raise ValueError(f"max_shard_size must hold at least one item: {max_bytes} bytes is less than {one} (one "
                         f"{'x'.join(map(str, meta.item_shape))} {meta.dtype} item and the shard header)")
    return [(start, min(per_part, meta.count - start)) for start in range(0, meta.count, per_part)]


@dataclasses.dataclass
class PartRecord:
    """One part in the index: its file, its items ``[start, start + count)`` of the set, and once written its
    data SHA-256 (``checksum``) and the writer's ``data_check`` digest of its input."""

    file: str
    start: int
    count: int
    checksum: str = ""
    data_check: str = ""

    @property
    def written(self) -> bool:
        return bool(self.checksum)


@dataclasses.dataclass
class ShardSetIndex:
    """``index.json``: the set's metadata (``count`` = all items; ``checksum`` = SHA-256 over the parts' checksums
    once complete), the ``max_shard_size`` it was planned with, its parts, and whether every part is written."""

    metadata: ShardMetadata
    max_shard_size: int
    parts: list
    complete: bool = False

    def to_json(self) -> str:
        record = {"format": SET_FORMAT, "version": SET_VERSION, "complete": self.complete,
                  "max_shard_size": self.max_shard_size, "metadata": json.loads(self.metadata.to_json()),
                  "parts": [dataclasses.asdict(part) for part in self.parts]}
        return json.dumps(record, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: str) -> "ShardSetIndex":
        """Parse ``folder/index.json``; :class:`ShardError` naming the file when it is not a valid index."""
        path = os.path.join(folder, INDEX_NAME)
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (UnicodeDecodeError, ValueError):
            raise ShardError(f"{path} is not a shard-set index (not JSON)") from None
        if not isinstance(record, dict) or record.get("format") != SET_FORMAT:
            raise ShardError(f"{path} is not an msd_fast shard-set index")
        if record.get("version") != SET_VERSION:
            raise ShardError(f"{path}: unsupported shard-set version {record.get('version')!r} (this msd_fast reads "
                             f"version {SET_VERSION})")
        try:
            meta = ShardMetadata.from_json(json.dumps(record["metadata"]), path)
            parts = [PartRecord(**part) for part in record["parts"]]
            index = cls(meta, int(record["max_shard_size"]), parts, bool(record["complete"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ShardError(f"{path}: invalid shard-set index ({error})") from None
        expected = [(p.start, p.count) for p in parts]
        if not parts or expected != plan_parts(meta, index.max_shard_size) or \
                [p.file for p in parts] != [part_name(i) for i in range(len(parts))]:
            raise ShardError(f"{path}: the parts do not cover the set's {meta.count} items as planned")
        return index

    def write(self, folder: str) -> None:
        write_text(os.path.join(folder, INDEX_NAME), self.to_json())

    def set_checksum(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(part.checksum.encode())
        return digest.hexdigest()


def is_shard_set(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a folder with a shard-set index (complete or not)."""
    return os.path.isfile(os.path.join(os.fspath(path), INDEX_NAME))


def _written_part(folder: str, record: PartRecord, meta: ShardMetadata) -> bool:
    """Whether the part file exists, is complete (header and length) and is the one the index recorded."""
    try:
        found, _ = read_metadata(os.path.join(folder, record.file))
    except (OSError, ShardError):
        return False
    return found == dataclasses.replace(part_metadata(meta, record.start, record.count), checksum=record.checksum)


def _part_files(folder: str) -> list[str]:
    """The part files of the complete shard set ``folder``, in order, each checked against the index (header and
    length; the data's SHA-256 is checked when the part is opened)."""
    index = ShardSetIndex.read(folder)
    if not index.complete:
        done = sum(part.written for part in index.parts)
        raise ShardError(f"{folder} is an unfinished shard set ({done} of {len(index.parts)} parts written); run "
                         f"the encode command that made it again to finish it")
    for record in index.parts:
        if not _written_part(folder, record, index.metadata):
            raise ShardError(f"{os.path.join(folder, record.file)} is missing or is not the part {folder}/"
                             f"{INDEX_NAME} records")
    return [os.path.join(folder, record.file) for record in index.parts]


def open_shard_set(folder: Union[str, os.PathLike], *, verify: bool = True) -> list[Shard]:
    """Open every part of the complete shard set ``folder``, in order (each checked against the index and as by
    :func:`~msd_fast.protocol.shards.open_shard`)."""
    return [open_shard(path, verify=verify) for path in _part_files(os.fspath(folder))]


def shard_files(paths: Sequence[Union[str, os.PathLike]]) -> list[str]:
    """The shard files that ``paths`` (shard files and shard-set folders) name, folders expanded to their parts in
    order; :class:`ShardError` for a folder that is not a complete set, or a file named twice (directly and through
    its folder)."""
    files: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            if not is_shard_set(path):
                raise ShardError(f"{path} is a folder without {INDEX_NAME}: not a shard set")
            files += _part_files(path)
        else:
            files.append(path)
    seen: dict[str, str] = {}
    for path in files:
        real = os.path.realpath(path)
        if real in seen:
            raise ShardError(f"{path} is given twice (also as {seen[real]}); give each shard once")
        seen[real] = path
    return files


class ConcatenatedShards:
    """Compatible shards read as one sequence of items (a client's set, or every client's uploads on the server).

    ``len()``, ``sizes`` (items per shard), ``metadata`` (the common geometry: the first shard's),
    :meth:`take` and :meth:`sample_ids`. Nothing is loaded until asked for: :meth:`take` reads just the rows it
    returns (:meth:`Shard.read <msd_fast.protocol.shards.Shard.read>`) into one preallocated output.
    """

    def __init__(self, shards: Sequence[Shard], metadata: Optional[ShardMetadata] = None):
        self.shards = list(shards)
        self.metadata = check_compatible(self.shards) if metadata is None else metadata
        self.sizes = [len(s) for s in self.shards]
        self._starts = np.cumsum([0] + self.sizes)

    @classmethod
    def open(cls, paths: Sequence[Union[str, os.PathLike]], *, verify: bool = True):
        """Open and verify shard files and shard-set folders; ``ShardError`` on corrupt or mismatched shards."""
        shards, metadata = open_shards(paths, verify=verify)
        return cls(shards, metadata)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, row)`` int64 numpy arrays of global ``indices`` (``IndexError`` outside ``[0, len)``)."""
        flat = np.asarray(torch.as_tensor(indices, dtype=torch.int64).reshape(-1))
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items: indices must be in [0, {len(self)})")
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        return shard, flat - self._starts[shard]

    def take(self, indices) -> torch.Tensor:
        """Items at global ``indices`` (int64 ``[b]``, any order), in that order: ``[b, *item_shape]``."""
        shard, rows = self.locate(indices)
        meta = self.metadata
        out = np.empty((len(rows), *meta.item_shape), dtype=self.shards[0].read(rows[:0]).dtype)
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            out[mine] = self.shards[s].read(rows[mine])
        return torch.from_numpy(out)

    def sample_ids(self, indices) -> torch.Tensor:
        """The per-image ids the encryption used for global ``indices``: int64 ``[b]`` (each shard's
        ``sample_id_start`` plus the row; 0-based rows when the encryption uses no ids)."""
        shard, rows = self.locate(indices)
        starts = np.array([s.metadata.encryption.get("sample_id_start", 0) for s in self.shards], dtype=np.int64)
        return torch.from_numpy(starts[shard] + rows)



def open_shards(paths: Sequence[str | os.PathLike], *, verify: bool = True) -> tuple[list[Shard], ShardMetadata]:
    """Open and verify several shards and check they can be trained on together. A path may be a shard file or a
    shard-set folder (:mod:`~msd_fast.protocol.shard_sets`: its parts, in order); no file may come twice."""
    shards = [open_shard(p, verify=verify) for p in shard_files(paths)]
    return shards, check_compatible(shards)


def check_shard_output(out: Union[str, os.PathLike], *, overwrite: bool) -> None:
    """Refuse an ``out`` an encoding may not write: an existing shard file or complete set (unless ``overwrite``),
    or a folder that is not a shard set (never replaced). An unfinished set passes: it is resumed."""
    out = os.fspath(out)
    if os.path.isdir(out):
        if not is_shard_set(out):
            if [name for name in os.listdir(out) if not name.startswith(".msd_fast-")]:
                raise FileExistsError(f"{out} is a folder that is not a shard set; refusing to write into it")
            return
        if not overwrite and ShardSetIndex.read(out).complete:
            refuse_existing(out)
    elif not overwrite:
        refuse_existing(out)


def remove_shard_set(folder: Union[str, os.PathLike]) -> None:
    """Delete a shard set: its parts, its index and the folder. A folder that holds anything else is left as it is
    (``FileExistsError`` naming what)."""
    folder = os.fspath(folder)
    remove_stale_temporaries(folder)
    names = os.listdir(folder)
    foreign = sorted(name for name in names if not (_PART.match(name) or name == INDEX_NAME))
    if foreign:
        raise FileExistsError(f"{folder} holds files that are not part of its shard set ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); refusing to delete it")
    for name in names:
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def _mismatch(old: ShardSetIndex, new: ShardSetIndex) -> list[str]:
    """What differs between an unfinished set and the encoding asked for now, in a user's words."""
    a, b = old.metadata, new.metadata
    what = []
    if a.key_fingerprint != b.key_fingerprint:
        what.append(f"key (fingerprint {a.key_fingerprint[:16]}..., not {b.key_fingerprint[:16]}...)")
    strip = {"sample_id_start"}
    if a.mode != b.mode or {k: v for k, v in a.encryption.items() if k not in strip} != \
            {k: v for k, v in b.encryption.items() if k not in strip}:
        what.append("encryption")
    if (a.item_shape, a.dtype, a.patch_size, a.image_size, a.channels) != \
            (b.item_shape, b.dtype, b.patch_size, b.image_size, b.channels):
        what.append("geometry")
    if a.count != b.count:
        what.append(f"data ({a.count} images, not {b.count})")
    if a.encryption.get("sample_id_start") != b.encryption.get("sample_id_start"):
        what.append(f"sample-id range (start {a.encryption.get('sample_id_start')}, not "
                    f"{b.encryption.get('sample_id_start')})")
    if a.client != b.client:
        what.append(f"client name ({a.client!r}, not {b.client!r})")
    if not what and old.max_shard_size != new.max_shard_size:
        what.append(f"max_shard_size ({old.max_shard_size} bytes, not {new.max_shard_size})")
    return what


def write_shard_set(folder: Union[str, os.PathLike], meta: ShardMetadata, max_shard_size: Union[int, str],
                    batches: Callable[[int, int], Iterable[torch.Tensor]], data_check: Callable[[int, int], str], *,
                    overwrite: bool = False, resumed: Optional[Callable[[int], None]] = None) -> ShardMetadata:
    """Write the items ``meta`` describes as the shard set ``folder`` (see the module docstring), resuming an
    unfinished one made by the same encoding; returns the set's metadata (``checksum``: over the parts').

    Args:
        meta: the whole set's metadata (all ``count`` items; ``encryption["sample_id_start"]`` of item 0, if any).
        max_shard_size: the largest part file, in bytes or as text (``"2GB"``).
        batches: ``batches(start, count)`` yields the encoded items ``[start, start + count)`` in batches.
        data_check: ``data_check(start, count)`` -> a digest of those items' input, equal only for the same data
            (recorded per part; on resume every written part's digest must match).
        overwrite: replace an existing shard file or set (a complete set is refused otherwise; an unfinished one is
            resumed when it matches and refused when it does not).
        resumed: called once with the number of items already written (before any new part).
    """
    folder = os.fspath(folder)
    max_bytes = parse_size(max_shard_size)
    check_shard_output(folder, overwrite=overwrite)
    wanted = ShardSetIndex(dataclasses.replace(meta, checksum=""), max_bytes,
                           [PartRecord(part_name(i), start, count)
                            for i, (start, count) in enumerate(plan_parts(meta, max_bytes))])
    if os.path.isfile(folder):  # overwrite=True, checked above
        os.unlink(folder)
    if is_shard_set(folder):
        old = None
        try:
            old = ShardSetIndex.read(folder)
        except ShardError:
            if not overwrite:
                raise
        if old is not None and not overwrite:
            differing = _mismatch(old, wanted)
            for record, mine in zip(old.parts, wanted.parts):
                if differing:
                    break
                if record.written and _written_part(folder, record, old.metadata):
                    if record.data_check != data_check(record.start, record.count):
                        differing.append(f"data (items {record.start}..{record.start + record.count - 1} differ)")
                    else:
                        mine.checksum, mine.data_check = record.checksum, record.data_check
            if differing:
                raise ValueError(f"{folder} holds an unfinished encoding made with a different "
                                 f"{', '.join(differing)}; run the same encoding again to finish it, or replace it "
                                 f"(--force; overwrite=True)")
    os.makedirs(folder, exist_ok=True)
    wanted.write(folder)
    if resumed is not None:
        resumed(sum(part.count for part in wanted.parts if part.written))
    for part in wanted.parts:
        if part.written:
            continue
        part.data_check = data_check(part.start, part.count)
        written = write_shard(os.path.join(folder, part.file), batches(part.start, part.count),
                              part_metadata(meta, part.start, part.count), overwrite=True)
        part.checksum = written.checksum
        wanted.write(folder)
    planned = {part.file for part in wanted.parts}
    for name in os.listdir(folder):  # parts of an older, longer set that this one replaced
        if _PART.match(name) and name not in planned:
            os.unlink(os.path.join(folder, name))
    wanted.complete = True
    wanted.metadata = dataclasses.replace(wanted.metadata, checksum=wanted.set_checksum())
    wanted.write(folder)
    return wanted.metadata


__all__ = ["ConcatenatedShards", "DEFAULT_MAX_SHARD_SIZE", "INDEX_NAME", "PartRecord", "SET_FORMAT", "SET_VERSION", "ShardSetIndex",
           "check_shard_output", "is_shard_set", "open_shard_set", "parse_size", "part_metadata", "plan_parts",
           "remove_shard_set", "shard_files", "write_shard_set"]
