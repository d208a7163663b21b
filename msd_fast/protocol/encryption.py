"""One description of how a client encrypts its images: :class:`EncryptionSpec`.

The spec travels as one object from the command line to the shard's metadata and back to the model-side key
transform, instead of loose keyword arguments. Two schemes:

* ``"dense"`` (the default): every block becomes ``A (x/M - 1/2)`` with ``A`` the key's random orthogonal
  ``[C*p*p, C*p*p]`` matrix (:func:`~msd_fast.ops.block_mixing.encrypt_blocks`), then the blocks are reordered with
  one order per image (``per_sample``, the default) or one key-wide order. Floating-point ciphertext (float16 by
  default). The default is the strongest configuration whose demo accuracy matches the weakest one (SECURITY.md).
* ``"permute"``: block scrambling, pixel shuffling and negative-positive
  (:func:`~msd_fast.encrypt_patches`); uint8 ciphertext. Kept for comparison: our own audit breaks it (see
  :meth:`EncryptionSpec.weakness` and SECURITY.md).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..keys import Key, SampleIds
from ..ops.block_mixing import decrypt_blocks, encrypt_blocks
from ..ops.patch_encryption import decrypt_patches, encrypt_patches

SCHEMES = ("dense", "permute")
CIPHER_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_VALUE = 255.0  # clients encrypt uint8 images


@dataclasses.dataclass(frozen=True)
class EncryptionSpec:
    """How images are encrypted (public: stored in every shard; the key is the only secret).

    Attributes:
        scheme: ``"dense"`` (key-derived orthogonal block transform) or ``"permute"`` (pixel tables).
        block_scramble: reorder the blocks with the key (both schemes).
        per_sample: a different block order per image (needs ``block_scramble``; default on).
        pixel_shuffle, negpos: the ``"permute"`` scheme's value transforms (ignored by, and refused with, dense).
        cipher_dtype: the dense ciphertext's storage type, ``"float16"`` or ``"float32"``.
    """

    scheme: str = "dense"
    block_scramble: bool = True
    per_sample: bool = True
    pixel_shuffle: bool = False
    negpos: bool = False
    cipher_dtype: str = "float16"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"encryption scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.cipher_dtype not in CIPHER_DTYPES:
            raise ValueError(f"cipher dtype must be one of {sorted(CIPHER_DTYPES)}, got {self.cipher_dtype!r}")
        if self.per_sample and not self.block_scramble:
            raise ValueError("per-sample block orders need block scrambling (add --no-per-sample with "
                             "--no-block-scramble)")
        if self.scheme == "dense" and (self.pixel_shuffle or self.negpos):
            raise ValueError("pixel shuffling and negative-positive belong to the 'permute' scheme; the dense "
                             "transform already mixes every value of a block")
        if self.scheme == "permute" and not (self.block_scramble or self.pixel_shuffle or self.negpos):
            raise ValueError("block scrambling, pixel shuffling and negative-positive are all off: the shard would "
                             "hold plain images")

    # ---- what the server stores -------------------------------------------------------------------------------------
    @property
    def shard_dtype(self) -> str:
        """The dtype of the ciphertext items: uint8 for ``permute``, ``cipher_dtype`` for ``dense``."""
        return self.cipher_dtype if self.scheme == "dense" else "uint8"

    def to_metadata(self) -> dict:
        """The public record written into a shard (and an export)."""
        record = {"scheme": self.scheme, "block_scramble": self.block_scramble, "per_sample": self.per_sample,
                  "max_value": MAX_VALUE}
        if self.scheme == "dense":
            record["cipher_dtype"] = self.cipher_dtype
        else:
            record.update(pixel_shuffle=self.pixel_shuffle, negpos=self.negpos)
        return record

    @classmethod
    def from_metadata(cls, record: dict) -> "EncryptionSpec":
        """The spec a shard's or export's ``encryption`` record describes (records without ``scheme`` are the
        permutation scheme of earlier versions)."""
        scheme = record.get("scheme", "permute")
        fields = dict(scheme=scheme, block_scramble=bool(record["block_scramble"]),
                      per_sample=bool(record.get("per_sample", False)))
        if scheme == "dense":
            fields["cipher_dtype"] = record.get("cipher_dtype", "float32")
        else:
            fields.update(pixel_shuffle=bool(record["pixel_shuffle"]), negpos=bool(record["negpos"]))
        return cls(**fields)

    # ---- the transform ----------------------------------------------------------------------------------------------
    def encrypt(self, images: torch.Tensor, key: Key, patch_size: int, sample_ids: Optional[SampleIds] = None,
                backend: str = "auto") -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` images -> the ciphertext ``[B, C, H, W]`` (``shard_dtype``). ``sample_ids`` (the
        images' ids) is needed with ``per_sample`` and ignored otherwise."""
        ids = sample_ids if self.per_sample else None
        if self.scheme == "dense":
            return encrypt_blocks(images, key, patch_size, block_scramble=self.block_scramble,
                                  per_sample=self.per_sample, sample_ids=ids, max_value=MAX_VALUE,
                                  out_dtype=CIPHER_DTYPES[self.cipher_dtype], backend=backend)
        return encrypt_patches(images, key, patch_size, block_scramble=self.block_scramble,
                               pixel_shuffle=self.pixel_shuffle, negpos=self.negpos, max_value=MAX_VALUE,
                               per_sample=self.per_sample, sample_ids=ids, backend=backend)

    def decrypt(self, cipher: torch.Tensor, key: Key, patch_size: int, sample_ids: Optional[SampleIds] = None,
                backend: str = "auto") -> torch.Tensor:
        """Invert :meth:`encrypt`: the uint8 images (exact for both schemes and both cipher dtypes)."""
        ids = sample_ids if self.per_sample else None
        if self.scheme == "dense":
            return decrypt_blocks(cipher, key, patch_size, block_scramble=self.block_scramble,
                                  per_sample=self.per_sample, sample_ids=ids, max_value=MAX_VALUE,
                                  out_dtype=torch.uint8, backend=backend)
        return decrypt_patches(cipher, key, patch_size, block_scramble=self.block_scramble,
                               pixel_shuffle=self.pixel_shuffle, negpos=self.negpos, max_value=MAX_VALUE,
                               per_sample=self.per_sample, sample_ids=ids, backend=backend)

    def vit_options(self) -> dict:
        """The keyword arguments of :func:`~msd_fast.encrypt_vit` / :func:`~msd_fast.decrypt_vit` for this spec
        (inputs in raw pixel units, ``max_value`` 255)."""
        return dict(block_scramble=self.block_scramble, pixel_shuffle=self.pixel_shuffle, negpos=self.negpos,
                    mixing=self.scheme == "dense", max_value=MAX_VALUE, per_sample=self.per_sample)

    def ciphertext_units(self) -> tuple[float, float]:
        """``(mid-grey, pixel range)`` in ciphertext units, for the server's commuting augmentations: ``(M/2, M)``
        for the permutation scheme, ``(0, 1)`` for the dense one (``y = A (x/M - 1/2)``)."""
        return (0.0, 1.0) if self.scheme == "dense" else (MAX_VALUE / 2, MAX_VALUE)

    # ---- what it protects -------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """A short human name, e.g. ``"dense transform + per-sample block order (float16)"``."""
        order = ("per-sample block order" if self.per_sample else "key-wide block order") if self.block_scramble \
            else "no block scrambling"
        if self.scheme == "dense":
            return f"dense transform + {order} ({self.cipher_dtype})"
        values = [name for name, on in (("pixel shuffling", self.pixel_shuffle), ("negative-positive", self.negpos))
                  if on]
        return " + ".join([order] + values) + " (uint8)"

    def weakness(self) -> Optional[str]:
        """One line naming what our audit recovers from this configuration (measured, SECURITY.md), or None for the
        default's strength (dense transform with per-sample block orders)."""
        if self.scheme == "permute":
            if self.per_sample:
                return ("the permutation scheme's pixel tables are shared by every block: the audit recovers them "
                        "from the shard alone, leaving only each image's block order to guess")
            return ("the permutation scheme with one key-wide block order: the audit recovers the images from the "
                    "shard alone (exactly on real digits) and exactly from a single known plain/cipher pair")
        if not self.block_scramble:
            return ("the dense transform with every block in place: the statistics attack decodes each block from "
                    "the shard and same-domain public images (about 25-27 dB PSNR, against 13-21 dB for chance)")
        if not self.per_sample:
            return ("the dense transform with one key-wide block order: the statistics attack reassembles the images "
                    "from the shard and same-domain public images (about 25-27 dB PSNR, against 13-21 dB for chance)")
        return None
