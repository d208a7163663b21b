"""The client side: make a consortium key, encrypt a dataset once, write the shard (or shard set) a client uploads.

:func:`encode_dataset` streams an :class:`~msd_fast.data.ImageSet` batch by batch through the encryption into
:func:`~msd_fast.protocol.shards.write_shard` (a temporary file renamed into place when complete), so data larger than memory
works and nothing half-written is ever left at the output path. Data larger than ``max_shard_size`` becomes a folder
of numbered parts (:mod:`~msd_fast.protocol.shard_sets`), written part by part; running the same encoding again after
an interruption continues after the last complete part. Two modes:

* ``image``: the :class:`~msd_fast.protocol.encryption.EncryptionSpec` -- by default the key's dense orthogonal block
  transform with one key-wide block order (``per_sample``: one per image), float16 ``[n, C, H, W]``; the older
  permutation scheme (block scrambling, pixel shuffling, negative-positive; uint8) stays available for comparison.
* ``token``: the key-derived :class:`~msd_fast.protocol.token_embedding.TokenEmbedder` embeds each image into ``N`` tokens
  (patch + position embedding) and :func:`~msd_fast.permute_tokens` shuffles every image's tokens with its own
  key-derived order (p-FeSTA). ``[n, N, D]`` float16 (or float32).

Labels are never written: a shard holds the encrypted pixels or tokens and public metadata only (geometry, options,
the key's fingerprint, a checksum). Per-image orders derive from *sample ids* ``sample_id_start + i``; the start is
random by default, so two clients never share orders, and it is recorded in the metadata (it is not secret: without
the key an id says nothing) so the client can decrypt its own shard with :func:`decrypt_shard`.
"""
from __future__ import annotations

import os
import secrets
import struct
import sys
import warnings
from typing import Iterator, Optional

import torch

from ..data import DataError, ImageSet, check_patch_size, split_clients
from ..protocol.encryption import EncryptionSpec
from ..keys import Key, require_key
from ..ops.token_permutation import permute_tokens, unpermute_tokens
from ..protocol.shard_sets import (DEFAULT_MAX_SHARD_SIZE, ConcatenatedShards, ShardSetIndex, is_shard_set,
                                   open_shards, parse_size, plan_parts, remove_shard_set, write_shard_set)
from ..protocol.shards import Shard, ShardMetadata, shard_metadata, write_shard
from ..protocol.token_embedding import TokenEmbedder

MODES = ("image", "token")
TOKEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_VALUE = 255.0  # clients encode uint8 pixels
DEFAULT_EMBED_DIM = 192  # ViT-Tiny's width, the pretraining default architecture


def make_key(out: str, *, secret_file: Optional[str] = None, overwrite: bool = False) -> Key:
    """Write a new consortium key to ``out`` (atomic, mode 0600; an existing file is kept unless ``overwrite``).

    With ``secret_file`` the key is derived from that file's exact bytes (``Key.from_secret``), so every client with
    the same file gets the same key; otherwise it is fresh randomness (share the key file out of band).
    """
    if secret_file is not None:
        with open(secret_file, "rb") as handle:
            secret = handle.read()
        if not secret:
            raise ValueError(f"secret file {secret_file} is empty")
        key = Key.from_secret(secret)
    else:
        key = Key.generate()
    key.save(out, overwrite=overwrite)
    return key


def client_subset(images: ImageSet, n_clients: int, client_index: int, *, alpha: Optional[float] = None,
                  seed: int = 0) -> ImageSet:
    """Simulate client ``client_index`` of ``n_clients``: its part of :func:`~msd_fast.data.split_clients` (IID, or
    Dirichlet(``alpha``) over the labels)."""
    if isinstance(client_index, bool) or not isinstance(client_index, int) or not 0 <= client_index < n_clients:
        raise ValueError(f"client_index must be in [0, {n_clients}), got {client_index!r}")
    labels_or_n = images.labels if alpha is not None else len(images)
    if alpha is not None and labels_or_n is None:
        raise DataError("a Dirichlet (non-IID) client split needs labels; this dataset has none (drop --alpha)")
    return images.subset(split_clients(labels_or_n, n_clients, alpha=alpha, seed=seed,
                                       groups=images.groups)[client_index])


def encode_dataset(images: ImageSet, key: Key, out: str, *, patch_size: int = 16, mode: str = "image",
                   encryption: Optional[EncryptionSpec] = None, embed_dim: int = DEFAULT_EMBED_DIM,
                   token_dtype: str = "float16",
                   sample_id_start: Optional[int] = None, client: str = "", batch_size: int = 64,
                   progress: Optional[bool] = None, overwrite: bool = False, device: str = "cpu",
                   backend: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> ShardMetadata:
    """Encrypt every image of ``images`` once and write the shard ``out``; returns its metadata (with checksum).

    ``out`` is one shard file when it fits in ``max_shard_size``, else a folder of numbered shards with an
    ``index.json`` (:mod:`~msd_fast.protocol.shard_sets`; the returned metadata then covers every item, its
    checksum is over the parts'). An unfinished folder is resumed: the same call continues after its last complete
    part (with ``sample_id_start=None`` it reuses the folder's), after checking that the written parts come from
    the same key, encryption, sample-id range and data; a mismatch is refused with a ``ValueError`` naming it.

    Args:
        images: the client's images (uint8 ``[n, C, H, W]``, read in batches); labels, if any, are ignored.
        key: the consortium key.
        out: the shard file (or shard-set folder) to create (refused if it exists, unless ``overwrite``; an
            unfinished shard set is resumed).
        patch_size: the ViT's patch size; must divide ``H`` and ``W`` (a :class:`DataError` suggests a resize).
        mode: ``"image"`` (encrypted pixels) or ``"token"`` (key-embedded, per-image permuted tokens).
        encryption: the image-mode :class:`~msd_fast.protocol.encryption.EncryptionSpec` (default: the dense transform
            with a key-wide block order, float16); recorded in the shard's metadata.
        embed_dim, token_dtype: token mode: the token width ``D`` (must equal the pretrained ViT's) and storage type.
        sample_id_start: first sample id for per-image orders (per-sample / token mode); random when None.
        client: a public name stored in the metadata.
        batch_size: images per batch (memory use is a few batches).
        progress: tqdm bar on stderr; None shows it on terminals only.
        device: where the encryption runs (``"cpu"``, ``"cuda"``); the shard is always written from the CPU.
        backend: kernel backend for the encryption ops.
        max_shard_size: the largest shard file, bytes or text (``"2GB"``, ``"500MB"``).
    """
    if not isinstance(images, ImageSet):
        raise TypeError(f"images must be an msd_fast.data.ImageSet, got {type(images).__name__}")
    require_key(key)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    grid = check_patch_size(images, patch_size)
    C, H, W = images.geometry
    count = len(images)
    max_bytes = parse_size(max_shard_size)
    if sample_id_start is None:
        sample_id_start = _unfinished_sample_id_start(out, overwrite)
    if sample_id_start is None:
        sample_id_start = secrets.randbits(62)
    if isinstance(sample_id_start, bool) or not isinstance(sample_id_start, int) or \
            not 0 <= sample_id_start <= 2**63 - 1 - count:
        raise ValueError(f"sample_id_start must be an int in [0, 2**63 - {count + 1}], got {sample_id_start!r}")

    if mode == "image":
        spec = EncryptionSpec() if encryption is None else encryption
        if not isinstance(spec, EncryptionSpec):
            raise TypeError(f"encryption must be an EncryptionSpec, got {type(spec).__name__}")
        record = spec.to_metadata()
        if spec.per_sample:
            record["sample_id_start"] = sample_id_start
        meta = shard_metadata(mode="image", count=count, item_shape=(C, H, W), dtype=spec.shard_dtype,
                              patch_size=patch_size, image_size=(H, W), channels=C, key_fingerprint=key.fingerprint,
                              encryption=record, client=client)

        def transform(batch: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return spec.encrypt(batch, key, patch_size, sample_ids=ids, backend=backend)
    else:
        if encryption is not None:
            raise ValueError("encryption only applies to mode='image' (token mode embeds, then permutes every "
                             "image's tokens)")
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {sorted(TOKEN_DTYPES)}, got {token_dtype!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        embedder = TokenEmbedder.from_key(key, patch_size=patch_size, in_chans=C, image_size=(H, W),
                                          embed_dim=embed_dim, max_value=MAX_VALUE).to(device)
        meta = shard_metadata(mode="token", count=count, item_shape=(grid[0] * grid[1], embed_dim),
                              dtype=token_dtype, patch_size=patch_size, image_size=(H, W), channels=C,
                              key_fingerprint=key.fingerprint,
                              encryption={"embed_dim": embed_dim, "sample_id_start": sample_id_start}, client=client)

        def transform(batch: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                tokens = permute_tokens(embedder(batch), key, ids, backend=backend)
            return tokens.to(TOKEN_DTYPES[token_dtype])

    from tqdm.auto import tqdm

    with tqdm(total=count, desc=f"encode {os.path.basename(os.path.normpath(out))}", unit="img", file=sys.stderr,
              disable=None if progress is None else not progress, dynamic_ncols=True) as bar:
        def encrypted_batches(first: int, n: int) -> Iterator[torch.Tensor]:
            """Items ``[first, first + n)`` encrypted, in batches that start at ``first`` (so a resumed part is
            cut, and therefore computed, exactly as in an uninterrupted run)."""
            for start in range(first, first + n, batch_size):
                size = min(batch_size, first + n - start)
                batch = next(images.batches(size, indices=range(start, start + size)))
                ids = torch.arange(sample_id_start + start, sample_id_start + start + size, dtype=torch.int64)
                yield transform(batch.to(device), ids).cpu()
                bar.update(size)

        def data_check(first: int, n: int) -> str:
            """A keyed digest of a part's size and its first and last plain images (what a resume compares)."""
            ends = next(images.batches(2, indices=[first, first + n - 1]))
            return key.digest("shard-set-data", struct.pack("<QQ", first, n) + ends.numpy().tobytes())

        def resumed(done: int) -> None:
            if done:
                bar.update(done)
                bar.write(f"resuming {out}: {done} of {count} images were already encoded", file=sys.stderr)

        if len(plan_parts(meta, max_bytes)) == 1 and (overwrite or not is_shard_set(out)):
            if is_shard_set(out):
                remove_shard_set(out)
            return write_shard(out, encrypted_batches(0, count), meta, overwrite=overwrite)
        return write_shard_set(out, meta, max_bytes, encrypted_batches, data_check, overwrite=overwrite,
                               resumed=resumed)


def _unfinished_sample_id_start(out: str, overwrite: bool) -> Optional[int]:
    """The sample-id start of the unfinished shard set at ``out`` (what a resumed run continues with), else None."""
    if overwrite or not is_shard_set(out):
        return None
    index = ShardSetIndex.read(out)
    return None if index.complete else index.metadata.encryption.get("sample_id_start")


def _integer_indices(indices) -> torch.Tensor:
    """``indices`` as int64, refusing what a cast would silently change: floats (0.5 -> 0) and booleans."""
    values = torch.as_tensor(indices)
    if values.numel() and (values.dtype == torch.bool or values.is_floating_point() or values.is_complex()):
        raise ValueError(f"indices must be integers (an int, a sequence or an integer tensor), got "
                         f"{str(values.dtype).replace('torch.', '')} values")
    return values.to(torch.int64)


def decrypt_shard(shard, key: Key, indices=None) -> torch.Tensor:
    """Undo :func:`encode_dataset` for the items at ``indices`` (default all) of a shard -- a path (a shard file or
    a shard-set folder), an opened :class:`~msd_fast.protocol.shards.Shard` or
    :class:`~msd_fast.protocol.shard_sets.ConcatenatedShards` -- : image mode -> the original uint8 images
    ``[b, C, H, W]``; token mode -> the key-embedded tokens in their original order ``[b, N, D]`` (the shard's
    dtype); a single int index gives that one item without the batch dimension. Needs the shard's key."""
    if isinstance(shard, Shard):
        source = ConcatenatedShards([shard])
    elif isinstance(shard, ConcatenatedShards):
        source = shard
    else:
        source = ConcatenatedShards(*open_shards([shard]))
    source.shards[0].check_key(key)  # compatible shards share one key fingerprint
    meta = source.metadata
    rows = torch.arange(len(source)) if indices is None else _integer_indices(indices)
    if rows.dim() == 0:  # one item: decrypted as a batch of one, returned without the batch dimension
        return decrypt_shard(source, key, rows.view(1))[0]
    items, ids = source.take(rows), source.sample_ids(rows)
    if meta.mode == "token":
        return unpermute_tokens(items, key, ids)
    return EncryptionSpec.from_metadata(meta.encryption).decrypt(items, key, meta.patch_size, sample_ids=ids)


def warn_if_weak(spec: EncryptionSpec) -> None:
    """One warning line naming what the privacy audit recovers from ``spec``, when it is weaker than the default."""
    weakness = spec.weakness()
    if weakness is not None:
        warnings.warn(f"weak encryption ({spec.describe()}): {weakness}; see SECURITY.md", stacklevel=2)
