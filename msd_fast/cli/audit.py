"""``msd-fast audit``: play the honest-but-curious server against encrypted data (:mod:`msd_fast.evaluation.audit`).

Without ``--scheme`` / a dense ``--shard``: the full audit of every configuration (``audit.md``, ``audit.png``,
``audit.json``, :func:`~msd_fast.evaluation.audit.run_audit`); with them: only the attacks that apply to that one
configuration (``quick_audit.json``, :func:`~msd_fast.evaluation.audit.quick_audit`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from ..checks import is_positive_int, require
from ..data import SPEC_HELP
from ..protocol.encryption import CIPHER_DTYPES, SCHEMES, EncryptionSpec
from ..settings import flag, quick_flag
from .flags import int_list

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
DEFAULT_DATA = "synthetic:256"
# --quick: the sizes of a smoke test (the images are also capped at QUICK_IMAGES).
QUICK_IMAGES = 32
QUICK = dict(known_pairs=(1, 4), token_dims=(48,), max_heldout=16, figure_rows=2)


@dataclasses.dataclass
class AuditConfig:
    key: Optional[str] = flag(None, "the consortium key file (the attacks never use it, it only encrypts and scores)",
                              default_text="a fresh key")
    data: str = flag(DEFAULT_DATA, f"the plain images: {SPEC_HELP}")
    shard: Optional[str] = flag(None, "a shard encoded from --data with --key: attack the server's actual view (its "
                                      "options and patch size)", default_text="simulate the encryption")
    patch_size: int = flag(16, "block size without --shard")
    images: Optional[int] = flag(None, "use only the first N images (N >= 1)", default_text="all")
    known_pairs: tuple = flag((1, 10, 100), "k values of the known-plaintext study (comma-separated)", parse=int_list)
    token_dims: tuple = flag((192, 384), "token widths D audited in token mode (comma-separated)", parse=int_list)
    method: str = flag("ssd", "jigsaw edge dissimilarity", choices=("ssd", "mgc"))
    out: str = flag("audit_out", "output folder: audit.md, audit.png, audit.json (or quick_audit.json)")
    quick: bool = quick_flag(f"{QUICK_IMAGES} images, k = 1,4, D = 48")
    scheme: Optional[str] = flag(None, "audit only this configuration (one leakage line per attack, writes "
                                       "quick_audit.json); with --shard the shard's own configuration is audited",
                                 choices=SCHEMES, default_text="every configuration")
    per_sample: bool = flag(True, "with --scheme: per-sample block orders (as encode; --no-per-sample: one key-wide "
                                  "order)")
    cipher_dtype: str = flag("float16", "with --scheme dense: the ciphertext dtype", choices=sorted(CIPHER_DTYPES))
    public: Optional[str] = flag(None, "with --scheme/--shard: same-domain public images (a data spec) for the "
                                       "statistics attack", default_text="the last quarter of --data, not attacked")
    backend: str = flag("auto", "kernel backend that encrypts with the dense scheme", choices=BACKENDS)

    def __post_init__(self):
        for name in ("images", "patch_size"):
            require(self, name, lambda v: v is None or is_positive_int(v), "a positive integer")
        for name in ("known_pairs", "token_dims"):
            require(self, name, lambda v: len(v) > 0 and all(is_positive_int(k) for k in v), "positive integers")

    def limit(self) -> Optional[int]:
        """How many of the first images are audited (None: all)."""
        return min(self.images or QUICK_IMAGES, QUICK_IMAGES) if self.quick else self.images


def run_audit(config: AuditConfig) -> int:
    from ..data import load_dataset
    from ..evaluation.audit import run_audit as full_audit
    from ..keys import Key
    from ..protocol.shards import open_shard

    key = Key.load(config.key) if config.key else Key.generate()
    settings = dict(known_pairs=config.known_pairs, token_dims=config.token_dims, max_heldout=256, figure_rows=3)
    if config.quick:
        settings.update(QUICK)
    limit = config.limit()
    data = config.data
    if config.quick and data == DEFAULT_DATA:
        data = f"synthetic:{limit}"
    dataset = load_dataset(data)
    images = dataset.to_tensor()[:limit] if limit else dataset.to_tensor()
    shard = open_shard(config.shard) if config.shard else None
    spec = None
    if shard is not None and shard.metadata.mode == "image":
        spec = EncryptionSpec.from_metadata(shard.metadata.encryption)
        spec = spec if spec.scheme == "dense" or config.scheme else None
    elif config.scheme:
        spec = EncryptionSpec(scheme=config.scheme, per_sample=config.per_sample,
                              cipher_dtype=config.cipher_dtype if config.scheme == "dense" else "float16",
                              pixel_shuffle=config.scheme == "permute", negpos=config.scheme == "permute")
    if spec is not None:
        return _run_quick_audit(config, spec, images, key, shard, dataset.description)
    print(f"audit: {len(images)} images of {dataset.description}, key fingerprint {key.fingerprint}"
          f"{' (fresh key)' if not config.key else ''}" + (f", shard {config.shard}" if shard else ""))
    report = full_audit(images, key, patch_size=config.patch_size, method=config.method, shard=shard,
                        data_description=dataset.description + (f" (first {len(images)})" if limit else ""),
                        log=lambda line: print(line, flush=True), **settings)
    paths = report.write(config.out)
    print(f"audit: {report.setup['seconds']:.0f} s; wrote " + ", ".join(paths.values()))
    return 0


def _run_quick_audit(config: AuditConfig, spec: EncryptionSpec, images: torch.Tensor, key, shard,
                     description: str) -> int:
    from ..atomic import write_text
    from ..data import load_dataset
    from ..evaluation.audit.quick import quick_audit
    from ..evaluation.audit.report import NOT_THESE_IMAGES

    patch_size, cipher, ids, public = config.patch_size, None, None, None
    if config.public:
        public = load_dataset(config.public).to_tensor()
    if shard is not None:
        shard.check_key(key)
        meta = shard.metadata
        patch_size, count = meta.patch_size, min(meta.count, len(images))
        images, cipher = images[:count], shard[0:count]
        start = int(meta.encryption.get("sample_id_start", 0))
        ids = torch.arange(start, start + count, dtype=torch.int64)
        expected = spec.encrypt(images[:2], key, patch_size, sample_ids=ids[:2], backend=config.backend)
        if not torch.allclose(expected.double(), cipher[:2].double(), atol=1e-2):
            raise ValueError(NOT_THESE_IMAGES)
        if public is None and spec.scheme == "dense":
            count = len(images) - max(1, len(images) // 4)
            images, public, cipher, ids = images[:count], images[count:], cipher[:count], ids[:count]
    print(f"audit ({spec.describe()}): {len(images)} images of {description}, key fingerprint {key.fingerprint}")
    result = quick_audit(images, key, spec, patch_size, public=public, cipher=cipher, sample_ids=ids,
                         backend=config.backend, method=config.method, log=lambda line: print(line, flush=True))
    os.makedirs(config.out, exist_ok=True)
    path = os.path.join(config.out, "quick_audit.json")
    write_text(path, json.dumps(result.to_dict(), indent=1, sort_keys=True) + "\n")
    print(f"audit: {result.seconds:.1f} s; wrote {path}")
    return 0
