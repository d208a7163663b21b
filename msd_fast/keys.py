"""The consortium key: generation, derivation of sub-keys and permutations, safe storage.

A :class:`Key` holds a 32-byte secret. Independent sub-keys are derived from it with keyed BLAKE2b, one per
purpose (block scrambling, pixel shuffling, negative-positive, per-sample blocks, per-sample tokens, the dense
block matrix); each
permutation is the stable argsort of a SHAKE-256 keystream of 64-bit words seeded by a sub-key and the geometry
(and sample id). Only ``hashlib`` and ``numpy`` are involved, so one secret gives the same permutations on every
machine, backend and torch version.

Permutations use the *gather* convention: ``perm[i]`` is the source index of output position ``i``.

The secret never appears in ``repr``/``str``, exceptions or pickles (pickling is refused); ``fingerprint`` is a
public one-way digest that is safe to print and to store in shards.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import stat
import struct
import warnings
import weakref
from collections import OrderedDict
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .atomic import atomic_write, refuse_existing

SECRET_BYTES = 32
KEY_FILE_FORMAT = "msd_fast.key"
KEY_FILE_VERSION = 1
_TABLE_CACHE_SIZE = 64

_handles = itertools.count(1)
_live_keys: "weakref.WeakValueDictionary[int, Key]" = weakref.WeakValueDictionary()

SampleIds = Union[torch.Tensor, Iterable[int]]


def sample_ids_list(sample_ids: SampleIds, name: str = "sample_ids") -> list[int]:
    """Validate per-sample ids (a 1-D integer tensor or a sequence of ints >= 0) and return them as ints."""
    if isinstance(sample_ids, torch.Tensor):
        if sample_ids.dim() != 1 or sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {sample_ids.dtype} of shape {tuple(sample_ids.shape)}")
        ids = sample_ids.tolist()
    else:
        ids = [int(i) for i in sample_ids]
    if any(i < 0 or i >= 2**63 for i in ids):
        raise ValueError(f"{name} must be in [0, 2**63)")
    return ids



def _parse_key_file(raw: bytes) -> tuple[Optional[str], Optional[bytes], Optional[str]]:
    """``(problem, secret, fingerprint)`` of a key file's bytes; ``problem`` is None when the record is well formed.
    Never raises, so that no traceback frame (which error reporters record with its locals) holds the secret."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not an msd_fast key file", None, None
    if not (isinstance(record, dict) and record.get("format") == KEY_FILE_FORMAT):
        return "not an msd_fast key file", None, None
    if record.get("version") != KEY_FILE_VERSION:
        return f"unsupported key file version {str(record.get('version'))[:20]!r}", None, None
    try:
        secret = bytes.fromhex(record["secret"])
    except (KeyError, TypeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        return "key file is corrupted (bad secret field)", None, None
    return None, secret, record.get("fingerprint")

class Key:
    """A secret consortium key. Create with :meth:`generate`, :meth:`from_secret` or :meth:`load`."""

    __slots__ = ("_secret", "_handle", "_tables", "__weakref__")

    def __init__(self, secret: bytes, *, _internal: bool = False):
        if not _internal:
            raise TypeError("create keys with Key.generate(), Key.from_secret(...) or Key.load(path)")
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise ValueError(f"a key secret is {SECRET_BYTES} bytes")
        self._secret = secret
        self._handle = next(_handles)
        self._tables: OrderedDict = OrderedDict()
        _live_keys[self._handle] = self

    # ---- creation ---------------------------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> "Key":
        """A fresh key from the operating system's entropy source."""
        return cls(os.urandom(SECRET_BYTES), _internal=True)

    @classmethod
    def from_secret(cls, secret: Union[bytes, str]) -> "Key":
        """Derive a key deterministically from a shared secret (bytes, or str encoded as UTF-8).

        The secret should carry enough entropy (e.g. 32 random bytes shared out of band); BLAKE2b is fast, so a
        guessable passphrase is guessable here too.
        """
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"secret must be bytes or str, got {type(secret).__name__}")
        if len(secret) == 0:
            raise ValueError("secret must not be empty")
        return cls(hashlib.blake2b(bytes(secret), digest_size=SECRET_BYTES, person=b"msd_fast-master").digest(),
                   _internal=True)

    # ---- public identity ----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Public one-way digest of the secret (16 hex digits); safe to print and to store."""
        return hashlib.blake2b(self._secret, digest_size=8, person=b"msd_fast-fprint").hexdigest()

    def __repr__(self) -> str:
        return f"Key(fingerprint='{self.fingerprint}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):
        raise TypeError("Key objects are not picklable (that would write the secret); use key.save(path)")

    def __copy__(self) -> "Key":
        return self

    def __deepcopy__(self, memo) -> "Key":
        return self

    # ---- storage ------------------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        """Write the key to ``path`` atomically with file mode 0600; refuse to replace a file unless ``overwrite``."""
        path = os.fspath(path)
        if not overwrite:
            refuse_existing(path)
        payload = json.dumps({"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION,
                              "fingerprint": self.fingerprint, "secret": self._secret.hex()}).encode()
        with atomic_write(path, overwrite=overwrite, file_mode=0o600) as handle:  # created 0600, never readable
            handle.write(payload)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Key":
        """Read a key written by :meth:`save`; raises ``ValueError`` (naming the file, not its content) if invalid."""
        path = os.fspath(path)
        with open(path, "rb") as handle:
            problem, secret, fingerprint = _parse_key_file(handle.read(4096))
        if problem is not None:  # raised here, where no local holds the file's content
            raise ValueError(f"{path}: {problem}") from None
        key = cls(secret, _internal=True)
        del secret
        if fingerprint != key.fingerprint:
            del key
            raise ValueError(f"{path}: key file is corrupted (fingerprint does not match)") from None
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"key file {path} is readable by other users (mode {stat.filemode(mode)}); chmod 600 it",
                          stacklevel=2)
        return key

    # ---- derived material ---------------------------------------------------------------------------------------
    def _subkey(self, purpose: str) -> bytes:
        return hashlib.blake2b(purpose.encode(), key=self._secret, digest_size=32, person=b"msd_fast-subkey").digest()

    def digest(self, purpose: str, data: bytes) -> str:
        """A keyed digest of ``data`` (BLAKE2b-256 under the ``purpose`` sub-key), hex: equal data gives equal
        digests, and without the key it reveals nothing about the data (no guess can be confirmed) or the key."""
        return hashlib.blake2b(data, key=self._subkey("digest:" + purpose), digest_size=32).hexdigest()

    def _keystream(self, purpose: str, n_words: int, *context: int) -> np.ndarray:
        seed = self._subkey(purpose) + struct.pack(f"<{len(context)}Q", *context)
        return np.frombuffer(hashlib.shake_256(seed).digest(8 * n_words), dtype="<u8")

    def _permutation(self, purpose: str, n: int, *context: int) -> np.ndarray:
        return np.argsort(self._keystream(purpose, n, n, *context), kind="stable")

    def block_permutation(self, n_blocks: int) -> torch.Tensor:
        """Block scrambling permutation of ``n_blocks`` patches: int64 ``[n_blocks]`` (gather convention)."""
        return torch.from_numpy(self._permutation("block", _positive(n_blocks, "n_blocks")))

    def pixel_permutation(self, n_values: int) -> torch.Tensor:
        """Pixel shuffling permutation of the ``C*p*p`` values of a block: int64 ``[n_values]``."""
        return torch.from_numpy(self._permutation("pixel", _positive(n_values, "n_values")))

    def negpos_mask(self, n_values: int) -> torch.Tensor:
        """Negative-positive mask over the ``C*p*p`` values of a block: bool ``[n_values]``, True = flipped."""
        words = self._keystream("negpos", _positive(n_values, "n_values"), n_values)
        return torch.from_numpy((words & 1).astype(np.bool_))

    def sample_block_permutations(self, n_blocks: int, sample_ids: SampleIds) -> torch.Tensor:
        """Per-sample block permutations: int64 ``[len(sample_ids), n_blocks]``, row b from ``sample_ids[b]``."""
        n_blocks = _positive(n_blocks, "n_blocks")
        rows = [self._permutation("sample-block", n_blocks, i) for i in sample_ids_list(sample_ids)]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, n_blocks, dtype=torch.int64)

    def token_permutations(self, n_tokens: int, sample_ids: SampleIds) -> torch.Tensor:
        """Per-sample token permutations (p-FeSTA mode): int64 ``[len(sample_ids), n_tokens]``."""
        n_tokens = _positive(n_tokens, "n_tokens")
        rows = [self._permutation("sample-token", n_tokens, i) for i in sample_ids_list(sample_ids)]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, n_tokens, dtype=torch.int64)

    def uniform(self, purpose: str, n_values: int, *context: int) -> torch.Tensor:
        """``n_values`` key-derived numbers, uniform in ``[-1, 1)``: float64 ``[n_values]``, exact on every machine
        (53 keystream bits per value, scaled by a power of two). ``purpose`` names the use (e.g. an embedder's
        weight); different purposes or ``context`` integers give independent streams."""
        n_values = _positive(n_values, "n_values")
        words = self._keystream("uniform:" + purpose, n_values, n_values, *context)
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0)

    def block_matrix(self, n_values: int) -> torch.Tensor:
        """The dense block transform of the ``L = C*p*p`` values of a block: a random orthogonal matrix, float64
        ``[n_values, n_values]`` (Haar-distributed: the Q of a QR factorisation of a key-derived Gaussian matrix, the
        signs fixed by R's diagonal). Orthogonal by construction, so never singular or ill-conditioned (condition
        number 1); its inverse is its transpose. The Gaussians come from the keystream through Box-Muller; the
        matrix is the same on every machine up to float64 rounding (LAPACK), far below any ciphertext precision."""
        n_values = _positive(n_values, "n_values")
        return self.cached(("block-matrix", n_values), lambda: self._orthogonal(n_values))

    def _orthogonal(self, n: int) -> torch.Tensor:
        words = self._keystream("block-matrix", n * n + (n * n) % 2, n)
        uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53   # in (0, 1), never 0
        radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
        angle = 2.0 * np.pi * uniform[1::2]
        gaussian = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n * n].reshape(n, n)
        q, r = np.linalg.qr(gaussian)
        return torch.from_numpy(np.ascontiguousarray(q * np.where(np.diag(r) < 0, -1.0, 1.0)))

    def cached(self, slot: tuple, build):
        """``build()``, memoised per key under the hashable ``slot`` (small LRU); for per-geometry tables."""
        table = self._tables.get(slot)
        if table is None:
            table = build()
            self._tables[slot] = table
            if len(self._tables) > _TABLE_CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(slot)
        return table


def key_from_handle(handle: int) -> Key:
    """The live :class:`Key` registered under ``handle`` (how compiled graphs refer to a key without its secret)."""
    key = _live_keys.get(handle)
    if key is None:
        raise RuntimeError(f"no live msd_fast.Key with handle {handle}; keep the Key object alive while using it")
    return key


def require_key(key: object, name: str = "key") -> Key:
    """Check that ``key`` is a :class:`Key` (raising ``TypeError`` naming the argument)."""
    if not isinstance(key, Key):
        raise TypeError(f"{name} must be an msd_fast.Key, got {type(key).__name__}")
    return key


def check_key_matches(key: object, fingerprint: str, what: str) -> Key:
    """Raise unless ``key`` is a :class:`Key` with the public ``fingerprint`` that ``what`` records (e.g. ``"x.shard
    was encoded"``): ``TypeError`` for a non-key, ``ValueError`` for another key. The one wrong-key message of the
    package; it names both fingerprints, never a secret."""
    require_key(key)
    if key.fingerprint != fingerprint:
        raise ValueError(f"{what} with key fingerprint {fingerprint}, not with this key ({key.fingerprint})")
    return key


def _positive(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return int(n)
