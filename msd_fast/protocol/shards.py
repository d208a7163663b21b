"""Shards: the one file a client uploads (encrypted images or permuted tokens, never labels, never the key).

A shard is a valid safetensors file holding one tensor ``data`` (``[count, *item_shape]``) and, in the header's
``__metadata__``, one JSON record (:class:`ShardMetadata`): format and version, mode, geometry, dtype, the key's
public fingerprint, the encryption options and a SHA-256 of the data bytes. :func:`write_shard` streams batches to
disk (datasets larger than memory work): it reserves the header, writes the data while hashing it, then fills in the
checksum, all in a temporary file renamed into place at the end. :func:`open_shard` checks the header, the file
length and (by default) the checksum before anything is used; items are then read on demand (positional reads, never
the whole file). A client's data larger than ``max_shard_size`` is several shards in one folder
(:mod:`~msd_fast.protocol.shard_sets`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..atomic import atomic_write, refuse_existing
from ..keys import check_key_matches

SHARD_FORMAT = "msd_fast.shard"
SHARD_VERSION = 1
MODES = ("image", "token")
DATA_NAME = "data"
_DTYPES = {"uint8": ("U8", np.uint8, torch.uint8), "float16": ("F16", np.float16, torch.float16),
           "float32": ("F32", np.float32, torch.float32)}
_MAX_HEADER = 1 << 20
_CHECKSUM_PLACEHOLDER = "0" * 64
_CHUNK = 1 << 24


class ShardError(ValueError):
    """A shard file that is not one, is truncated or tampered with, or does not match the others."""


@dataclasses.dataclass(frozen=True)
class ShardMetadata:
    """What a shard holds. ``item_shape`` is ``[C, H, W]`` (image mode) or ``[N, D]`` (token mode).

    ``encryption`` records the public options (image mode: :meth:`EncryptionSpec.to_metadata
    <msd_fast.protocol.encryption.EncryptionSpec.to_metadata>` and ``sample_id_start``; token mode: the embedder geometry) -- everything needed to use the key later, nothing
    secret. ``key_fingerprint`` is the key's public one-way digest.
    """

    mode: str
    count: int
    item_shape: tuple
    dtype: str
    patch_size: int
    image_size: tuple
    channels: int
    key_fingerprint: str
    encryption: dict
    client: str = ""
    checksum: str = ""
    format: str = SHARD_FORMAT
    version: int = SHARD_VERSION

    def __post_init__(self):
        if self.mode not in MODES:
            raise ShardError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ShardError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.count < 1:
            raise ShardError(f"a shard holds at least one item, got count={self.count}")
        object.__setattr__(self, "item_shape", tuple(int(s) for s in self.item_shape))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str) -> "ShardMetadata":
        try:
            record = json.loads(text)
        except ValueError:
            raise ShardError(f"{path}: shard metadata is not valid JSON") from None
        if not isinstance(record, dict) or record.get("format") != SHARD_FORMAT:
            raise ShardError(f"{path} is not an msd_fast shard")
        if record.get("version") != SHARD_VERSION:
            raise ShardError(f"{path}: unsupported shard version {record.get('version')!r} (this msd_fast reads "
                             f"version {SHARD_VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(record) != fields:
            raise ShardError(f"{path}: shard metadata fields differ from version {SHARD_VERSION}")
        try:
            return cls(**record)
        except (TypeError, ValueError) as error:
            raise ShardError(f"{path}: invalid shard metadata ({error})") from None

    @property
    def nbytes(self) -> int:
        return self.count * int(np.prod(self.item_shape)) * np.dtype(_DTYPES[self.dtype][1]).itemsize

    def geometry(self) -> dict:
        """The fields that must agree between shards trained on together: everything but count, client, checksum
        and ``encryption["sample_id_start"]`` (each client numbers its own images, so per-image orders differ)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("count", "client", "checksum")}
        fields["encryption"] = {k: v for k, v in fields["encryption"].items() if k != "sample_id_start"}
        return fields


def _header_bytes(meta: ShardMetadata) -> bytes:
    dtype_code = _DTYPES[meta.dtype][0]
    header = {"__metadata__": {"msd_fast": meta.to_json()},
              DATA_NAME: {"dtype": dtype_code, "shape": [meta.count, *meta.item_shape],
                          "data_offsets": [0, meta.nbytes]}}
    raw = json.dumps(header, sort_keys=True).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment


def shard_file_size(meta: ShardMetadata) -> int:
    """The exact size in bytes of the file :func:`write_shard` makes for ``meta`` (length prefix, header, data)."""
    return 8 + len(_header_bytes(dataclasses.replace(meta, checksum=_CHECKSUM_PLACEHOLDER))) + meta.nbytes


def write_shard(path: str | os.PathLike, batches: Iterable[torch.Tensor], meta: ShardMetadata, *,
                overwrite: bool = False) -> ShardMetadata:
    """Stream ``batches`` (tensors ``[b, *meta.item_shape]`` of ``meta.dtype``, ``meta.count`` items in all) into a
    new shard at ``path``; returns the metadata with its checksum. Atomic: a temporary file in the same folder is
    renamed into place only when complete; an existing file is kept unless ``overwrite``."""
    path = os.fspath(path)
    if not overwrite:
        refuse_existing(path)
    meta = dataclasses.replace(meta, checksum=_CHECKSUM_PLACEHOLDER)
    placeholder = _header_bytes(meta)
    torch_dtype = _DTYPES[meta.dtype][2]
    digest, written = hashlib.sha256(), 0
    with atomic_write(path, overwrite=overwrite) as handle:
        handle.write(struct.pack("<Q", len(placeholder)) + placeholder)
        for batch in batches:
            if batch.dtype != torch_dtype or tuple(batch.shape[1:]) != meta.item_shape:
                raise ShardError(f"batches must be [b, {', '.join(map(str, meta.item_shape))}] {meta.dtype}, got "
                                 f"{tuple(batch.shape)} {batch.dtype}")
            written += batch.shape[0]
            if written > meta.count:
                raise ShardError(f"more than count={meta.count} items were written")
            data = batch.detach().cpu().contiguous().numpy().tobytes()
            digest.update(data)
            handle.write(data)
        if written != meta.count:
            raise ShardError(f"{written} items were written, the metadata says count={meta.count}")
        meta = dataclasses.replace(meta, checksum=digest.hexdigest())
        final = _header_bytes(meta)
        assert len(final) == len(placeholder), "the checksum has a fixed width"
        handle.seek(8)
        handle.write(final)
    return meta


class Shard:
    """An opened, verified shard: ``metadata``, ``len(shard)``, ``shard[i:j]`` / ``shard[rows]`` (a tensor copy of
    those items), :meth:`read` and :meth:`batches`.

    Items are read on demand with positional reads (``pread``) into fresh buffers; nothing is memory-mapped or
    cached, so a shard larger than memory is fine and reading every item once (an epoch) keeps the process's
    resident memory at one batch. (A memory map would count every page it touched in the process's RSS: an epoch over
    10 GB of shards would show 10 GB resident, which schedulers and the OOM killer charge to the job.) The file stays
    open until :meth:`close` (or garbage collection); positional reads are safe to share with forked workers."""

    def __init__(self, path: str, meta: ShardMetadata, offset: int):
        self.path, self.metadata = path, meta
        self._offset = offset
        self._np_dtype = np.dtype(_DTYPES[meta.dtype][1])
        self._item_bytes = int(np.prod(meta.item_shape)) * self._np_dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def close(self, _close=os.close) -> None:
        """Close the file (idempotent); reads after it raise ``ValueError``."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            _close(fd)  # bound at definition: still callable while the interpreter shuts down

    def __del__(self):
        self.close()

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Items at ``rows`` (int64 numpy ``[b]``, each in ``[0, len)``, any order, repeats allowed), as a new numpy
        array ``[b, *item_shape]``: one positional read per run of consecutive rows."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: shard is closed")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.metadata.item_shape), dtype=self._np_dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            _pread_exactly(self._fd, memoryview(flat[first:end]).cast("B"),
                           self._offset + int(rows[first]) * self._item_bytes, self.path)
        return out

    def check_key(self, key) -> None:
        """Raise unless ``key`` is the :class:`~msd_fast.Key` this shard was encoded with (compared by public
        fingerprint: :func:`~msd_fast.keys.check_key_matches`)."""
        check_key_matches(key, self.metadata.key_fingerprint, f"{self.path} was encoded")

    def __len__(self) -> int:
        return self.metadata.count

    def __getitem__(self, index) -> torch.Tensor:
        """Items as a tensor copy: an int, a slice, or a sequence/tensor of indices in ``[0, len)``."""
        if isinstance(index, slice):
            return torch.from_numpy(self.read(np.arange(len(self))[index]))
        rows = torch.as_tensor(index, dtype=torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"shard index out of range for {len(self)} items")
        items = self.read(rows.numpy().reshape(-1))
        return torch.from_numpy(items.reshape(*rows.shape, *self.metadata.item_shape))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]

    def __repr__(self) -> str:
        m = self.metadata
        return (f"Shard({self.path!r}, mode={m.mode}, count={m.count}, item_shape={m.item_shape}, dtype={m.dtype}, "
                f"key_fingerprint={m.key_fingerprint[:16]}...)")


def _pread_exactly(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` (looping over short reads); a file that ends early is an error."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:done + _CHUNK]], offset + done)
        if n == 0:
            raise ShardError(f"{path}: file ended early (was it truncated after it was opened?)")
        done += n


def read_metadata(path: str | os.PathLike) -> tuple[ShardMetadata, int]:
    """Parse and check a shard's header and length (not the checksum); returns ``(metadata, data offset)``."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ShardError(f"{path} is not an msd_fast shard (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ShardError(f"{path} is not an msd_fast shard (bad header length)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        meta_text = header["__metadata__"]["msd_fast"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise ShardError(f"{path} is not an msd_fast shard") from None
    meta = ShardMetadata.from_json(meta_text, path)
    entry = header.get(DATA_NAME, {})
    if (set(header) != {"__metadata__", DATA_NAME} or entry.get("shape") != [meta.count, *meta.item_shape]
            or entry.get("data_offsets") != [0, meta.nbytes] or entry.get("dtype") != _DTYPES[meta.dtype][0]):
        raise ShardError(f"{path}: tensor header does not match the shard metadata")
    offset = 8 + header_len
    if size != offset + meta.nbytes:
        state = "truncated" if size < offset + meta.nbytes else "longer than its header says"
        raise ShardError(f"{path}: file is {state} ({size} bytes, expected {offset + meta.nbytes})")
    return meta, offset


def open_shard(path: str | os.PathLike, *, verify: bool = True) -> Shard:
    """Open a shard after checking format, version, length and (``verify``) the SHA-256 of its data."""
    path = os.fspath(path)
    meta, offset = read_metadata(path)
    if verify:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != meta.checksum:
            raise ShardError(f"{path}: checksum mismatch: the data was modified or corrupted after it was written")
    return Shard(path, meta, offset)


def check_compatible(shards: Sequence[Shard]) -> ShardMetadata:
    """Raise :class:`ShardError` unless every shard has the same geometry, encryption and key fingerprint;
    returns the first shard's metadata."""
    if not shards:
        raise ShardError("no shards given")
    first = shards[0].metadata.geometry()
    for shard in shards[1:]:
        other = shard.metadata.geometry()
        differing = sorted(k for k in first if first[k] != other[k])
        if differing:
            what = "key fingerprint" if differing == ["key_fingerprint"] else ", ".join(differing)
            raise ShardError(f"{shard.path} does not match {shards[0].path}: {what} differ"
                             + (" (encoded with a different key)" if "key_fingerprint" in differing else ""))
    return shards[0].metadata


def shard_metadata(*, mode: str, count: int, item_shape: Sequence[int], dtype: str, patch_size: int,
                   image_size: Sequence[int], channels: int, key_fingerprint: str, encryption: dict,
                   client: str = "") -> ShardMetadata:
    """Build the metadata for :func:`write_shard` (the checksum is filled in by the writer)."""
    return ShardMetadata(mode=mode, count=count, item_shape=tuple(item_shape), dtype=dtype, patch_size=patch_size,
                         image_size=tuple(image_size), channels=channels, key_fingerprint=key_fingerprint,
                         encryption=dict(encryption), client=client)


__all__ = ["SHARD_FORMAT", "SHARD_VERSION", "Shard", "ShardError", "ShardMetadata", "check_compatible",
           "open_shard", "read_metadata", "shard_file_size", "shard_metadata", "write_shard"]
