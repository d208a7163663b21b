"""The client side: make a consortium key, encrypt a dataset once, write the one shard a client uploads.

:func:`encode_dataset` streams an :class:`~msd_fast.data.ImageSet` batch by batch through the encryption into
:func:`~msd_fast.protocol.shards.write_shard` (a temporary file renamed into place when complete), so data larger than memory
works and nothing half-written is ever left at the output path. Two modes:

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

import argparse
import os
import secrets
import sys
import warnings
from typing import Iterator, Optional

import torch

from ..data import SPEC_HELP, DataError, ImageSet, check_patch_size, load_dataset, split_clients
from ..data.convert import check_image_size
from ..protocol.encryption import CIPHER_DTYPES, SCHEMES, EncryptionSpec
from ..keys import Key, require_key
from ..ops.token_permutation import permute_tokens, unpermute_tokens
from ..protocol.shards import Shard, ShardMetadata, open_shard, shard_metadata, write_shard
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
                   backend: str = "auto") -> ShardMetadata:
    """Encrypt every image of ``images`` once and write the shard ``out``; returns its metadata (with checksum).

    Args:
        images: the client's images (uint8 ``[n, C, H, W]``, read in batches); labels, if any, are ignored.
        key: the consortium key.
        out: the shard file to create (refused if it exists, unless ``overwrite``).
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

    def encrypted_batches() -> Iterator[torch.Tensor]:
        from tqdm.auto import tqdm

        start = 0
        with tqdm(total=count, desc=f"encode {os.path.basename(out)}", unit="img", file=sys.stderr,
                  disable=None if progress is None else not progress, dynamic_ncols=True) as bar:
            for batch in images.batches(batch_size):
                ids = torch.arange(sample_id_start + start, sample_id_start + start + len(batch), dtype=torch.int64)
                yield transform(batch.to(device), ids).cpu()
                start += len(batch)
                bar.update(len(batch))

    return write_shard(out, encrypted_batches(), meta, overwrite=overwrite)


def _integer_indices(indices) -> torch.Tensor:
    """``indices`` as int64, refusing what a cast would silently change: floats (0.5 -> 0) and booleans."""
    values = torch.as_tensor(indices)
    if values.numel() and (values.dtype == torch.bool or values.is_floating_point() or values.is_complex()):
        raise ValueError(f"indices must be integers (an int, a sequence or an integer tensor), got "
                         f"{str(values.dtype).replace('torch.', '')} values")
    return values.to(torch.int64)


def decrypt_shard(shard, key: Key, indices=None) -> torch.Tensor:
    """Undo :func:`encode_dataset` for the items at ``indices`` (default all) of a shard (a path or an opened
    :class:`~msd_fast.protocol.shards.Shard`): image mode -> the original uint8 images ``[b, C, H, W]``; token mode -> the
    key-embedded tokens in their original order ``[b, N, D]`` (the shard's dtype); a single int index gives that one
    item without the batch dimension. Needs the shard's key."""
    require_key(key)
    shard = shard if isinstance(shard, Shard) else open_shard(shard)
    shard.check_key(key)
    meta = shard.metadata
    rows = torch.arange(len(shard)) if indices is None else _integer_indices(indices)
    if rows.dim() == 0:  # one item: decrypted as a batch of one, returned without the batch dimension
        return decrypt_shard(shard, key, rows.view(1))[0]
    items = shard[rows]
    ids = meta.encryption.get("sample_id_start", 0) + rows
    if meta.mode == "token":
        return unpermute_tokens(items, key, ids)
    return EncryptionSpec.from_metadata(meta.encryption).decrypt(items, key, meta.patch_size, sample_ids=ids)


# ---- command line --------------------------------------------------------------------------------------------------

def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="key file to write (mode 0600)")
    parser.add_argument("--secret-file", default=None,
                        help="derive the key from this file's exact bytes (same file -> same key on every client); "
                             "default: a fresh random key")
    parser.add_argument("--force", action="store_true", help="replace an existing key file")


def run_keygen(args: argparse.Namespace) -> int:
    key = make_key(args.out, secret_file=args.secret_file, overwrite=args.force)
    print(f"wrote consortium key {args.out} (fingerprint {key.fingerprint}); share it with the other clients only, "
          "never with the server")
    return 0


def _image_size(text: str):
    """``S`` or ``HxW`` -> int or (H, W)."""
    height, sep, width = text.lower().partition("x")
    try:
        return (int(height), int(width)) if sep else int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW (e.g. 64 or 64x96), got {text!r}") from None


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, help="the consortium key file")
    parser.add_argument("--data", required=True,
                        help=SPEC_HELP)
    parser.add_argument("--out", required=True, help="the shard file to write")
    parser.add_argument("--patch-size", type=int, default=16, help="the ViT's patch size (default 16)")
    parser.add_argument("--image-size", type=_image_size, default=None,
                        help="resize to S or HxW, at most 8192 per side (synthetic data: the generated size, "
                             "default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to gray (1) or RGB (3)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"),
                        help=".npz split / folder split / synthetic draw (default train)")
    parser.add_argument("--mode", choices=MODES, default="image",
                        help="image: encrypted pixels; token: key-embedded, per-image permuted tokens")
    add_encryption_arguments(parser)
    parser.add_argument("--embed-dim", type=int, default=DEFAULT_EMBED_DIM,
                        help=f"token mode: token width D, must equal the ViT's (default {DEFAULT_EMBED_DIM})")
    parser.add_argument("--token-dtype", choices=sorted(TOKEN_DTYPES), default="float16")
    parser.add_argument("--sample-id-start", type=int, default=None,
                        help="first per-image id (per-sample / token mode; default random)")
    parser.add_argument("--client", default=None, help="client name stored in the shard (default: the file name)")
    parser.add_argument("--clients", type=int, default=None,
                        help="simulate a consortium: split the data among N clients and encode one of them")
    parser.add_argument("--client-index", type=int, default=None, help="which simulated client (0..N-1)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="non-IID simulation: Dirichlet concentration over classes (default IID)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated client split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="where to encrypt (cpu, cuda, ...)")
    parser.add_argument("--force", action="store_true", help="replace an existing shard")


def add_encryption_arguments(parser: argparse.ArgumentParser) -> None:
    """The image-mode encryption flags (one :class:`~msd_fast.protocol.encryption.EncryptionSpec`), shared by ``encode``
    and ``demo``."""
    parser.add_argument("--scheme", choices=SCHEMES, default="dense",
                        help="dense: the key's orthogonal transform of every block (default); permute: block "
                             "scrambling + pixel shuffling (+ negative-positive), broken by the audit, for comparison")
    parser.add_argument("--per-sample", action=argparse.BooleanOptionalAction, default=True,
                        help="a different block order for every image (default; --no-per-sample: one key-wide "
                             "order, weaker: see SECURITY.md)")
    parser.add_argument("--no-block-scramble", dest="block_scramble", action="store_false",
                        help="keep every block in place (needs --no-per-sample; weak: see SECURITY.md)")
    parser.add_argument("--no-pixel-shuffle", dest="pixel_shuffle", action="store_false",
                        help="--scheme permute without pixel shuffling")
    parser.add_argument("--negpos", action="store_true", help="--scheme permute: add negative-positive")
    parser.add_argument("--cipher-dtype", choices=sorted(CIPHER_DTYPES), default="float16",
                        help="--scheme dense: the ciphertext's storage type (default float16: 2 bytes per value)")


def encryption_from_arguments(args: argparse.Namespace) -> Optional[EncryptionSpec]:
    """The spec the encryption flags describe (None in token mode); warns when the audit breaks it."""
    if getattr(args, "mode", "image") != "image":
        changed = [flag for flag, on in (("--scheme permute", args.scheme != "dense"),
                                         ("--no-block-scramble", not args.block_scramble), ("--negpos", args.negpos))
                   if on]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply to --mode image")
        return None
    if args.scheme == "dense" and args.negpos:
        raise ValueError("--negpos belongs to --scheme permute; the dense transform already mixes every value")
    spec = EncryptionSpec(scheme=args.scheme, block_scramble=args.block_scramble, per_sample=args.per_sample,
                          pixel_shuffle=args.scheme == "permute" and args.pixel_shuffle, negpos=args.negpos,
                          cipher_dtype=args.cipher_dtype)
    warn_if_weak(spec)
    return spec


def warn_if_weak(spec: EncryptionSpec) -> None:
    """One warning line naming what the privacy audit recovers from ``spec``, when it is weaker than the default."""
    weakness = spec.weakness()
    if weakness is not None:
        warnings.warn(f"weak encryption ({spec.describe()}): {weakness}; see SECURITY.md", stacklevel=2)


def run_encode(args: argparse.Namespace) -> int:
    simulate = args.clients is not None or args.client_index is not None or args.alpha is not None
    if simulate and (args.clients is None or args.client_index is None):
        raise ValueError("--clients N and --client-index i go together (and --alpha needs both)")
    check_image_size(args.image_size, "--image-size")
    key = Key.load(args.key)  # before reading any data: a wrong key path fails at once
    images = load_dataset(args.data, size=args.image_size, channels=args.channels, split=args.split)
    if simulate:
        images = client_subset(images, args.clients, args.client_index, alpha=args.alpha, seed=args.seed)
    client = args.client if args.client is not None else os.path.splitext(os.path.basename(args.out))[0]
    meta = encode_dataset(images, key, args.out, patch_size=args.patch_size, mode=args.mode,
                          encryption=encryption_from_arguments(args), embed_dim=args.embed_dim, token_dtype=args.token_dtype,
                          sample_id_start=args.sample_id_start, client=client, batch_size=args.batch_size,
                          overwrite=args.force, device=args.device)
    shape = "x".join(map(str, meta.item_shape))
    how = EncryptionSpec.from_metadata(meta.encryption).describe() if meta.mode == "image" else "token mode"
    print(f"encoded {meta.count} images ({'x'.join(map(str, images.geometry))} uint8) of {images.description} with "
          f"{how} (patch {meta.patch_size}) -> {args.out}")
    print(f"  items {shape} {meta.dtype}, {os.path.getsize(args.out):,} bytes, sha256 {meta.checksum}, "
          f"key fingerprint {meta.key_fingerprint}, client '{meta.client}'; no labels written")
    return 0
