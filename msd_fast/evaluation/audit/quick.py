"""A quick audit of ONE encryption configuration (the one a run used): :func:`quick_audit`.

Runs only the attacks that apply to that :class:`~msd_fast.protocol.encryption.EncryptionSpec` and returns one leakage line
per attack, the attack's success next to chance, e.g.
``"statistics attack (shard + same-domain public images): 24.9 dB PSNR / SSIM 0.85 vs chance 21.0 dB / 0.72"``.
Sized for a demo: a few hundred 32x32 images at patch 8 take seconds on one thread.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import torch

from ...protocol.encryption import EncryptionSpec
from ...keys import Key, require_key
from .assignment import single_thread
from .dense_study import known_plaintext_rows, public_split, set_psnr, statistics_rows, true_orders
from .jigsaw import check_images, jigsaw_attack
from .known_plaintext import recover_key_tables
from .metrics import ssim

KNOWN_PAIRS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass
class QuickAudit:
    """``lines``: one leakage line per attack; ``results``: JSON-ready numbers (``attacks``: one dict per line);
    ``seconds``: wall time."""

    lines: list
    results: dict
    seconds: float

    def to_dict(self) -> dict:
        def clean(value):
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value
        return clean(dict(self.results, lines=self.lines, seconds=self.seconds))


def _db(value: float) -> str:
    return "exact" if math.isinf(value) else f"{value:.1f} dB"


def quick_audit(images: torch.Tensor, key: Key, spec: EncryptionSpec, patch_size: int, *,
                public: Optional[torch.Tensor] = None, cipher: Optional[torch.Tensor] = None,
                sample_ids: Optional[torch.Tensor] = None, natural: bool = True, max_known: int = 32,
                backend: str = "auto", method: str = "ssd",
                log: Optional[Callable[[str], None]] = None) -> QuickAudit:
    """Audit one configuration.

    Args:
        images: uint8 ``[B, C, H, W]``: the plain images of the shard (ground truth; the attacks never see them,
            except the first ``k`` as known pairs).
        key: the key (encrypts and scores; no attack receives it).
        spec: the configuration to audit.
        patch_size: the block size.
        public: uint8 same-domain public images (disjoint from ``images``) for the dense statistics attack; None:
            the last quarter of ``images`` is held out as the public set (and not attacked).
        cipher: the server's view of ``images`` (e.g. a shard's items); None: encrypted here with ``spec``.
        sample_ids: int64 ``[B]`` per-sample ids (default ``0..B-1``).
        natural: also run the statistics attack with the natural-photo prior.
        max_known: the largest ``k`` of the known-plaintext sweep (stops at the first ``k`` that recovers the key).
        backend: the encryption backend.

    Returns:
        :class:`QuickAudit`.
    """
    require_key(key)
    if not isinstance(spec, EncryptionSpec):
        raise TypeError(f"spec must be an EncryptionSpec, got {type(spec).__name__}")
    images = check_images(images, "images", patch_size)
    log = log or (lambda line: None)
    started = time.perf_counter()
    with single_thread():
        if spec.scheme == "dense" and public is None and cipher is None:
            images, public = public_split(images)
        B = images.shape[0]
        ids = torch.arange(B, dtype=torch.int64) if sample_ids is None else sample_ids
        if cipher is None:
            cipher = spec.encrypt(images, key, patch_size, sample_ids=ids, backend=backend)
        known = [k for k in KNOWN_PAIRS if k <= min(max_known, B // 2)] or [1]
        heldout = torch.arange(max(known), min(B, max(known) + 256))
        config = spec.describe()
        attacks = []
        if spec.scheme == "dense":
            rows = statistics_rows(images, cipher, key, spec, patch_size, sample_ids=ids, public=public,
                                   natural=natural, method=method, config=config, log=log)
            for row in rows:
                attacks.append(dict(attack=f"statistics attack (shard + {row['prior']})", psnr=row["psnr"],
                                    ssim=row["ssim"], chance_psnr=row["chance_psnr"], chance_ssim=row["chance_ssim"],
                                    detail=f"blocks in their true places {_db(row['content_psnr'])}; block-mean "
                                           f"thumbnail {_db(row['thumbnail_psnr'])}; k={row['components']}",
                                    row=row))
            kpa = known_plaintext_rows(images, cipher, key, spec, patch_size, sample_ids=ids, known_pairs=known,
                                       heldout=heldout, method=method, config=config, stop_when_recovered=True,
                                       log=log)
            last = kpa[-1]
            attacks.append(dict(attack=f"known plaintext ({last['k']} pairs)", psnr=last["psnr"], ssim=last["ssim"],
                                chance_psnr=rows[0]["chance_psnr"], chance_ssim=rows[0]["chance_ssim"],
                                detail=f"key matrix {'recovered' if last['recovered'] else 'not recovered'} from "
                                       f"{last['independent_blocks']}/{last['block_values']} independent blocks "
                                       f"(|A_hat - A|/|A| = {last['matrix_error']:.1e}); the known span holds "
                                       f"{100 * last['coverage']:.1f} % of the held-out ciphertext's energy",
                                sweep=kpa))
        else:
            N = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
            mean_image = images.double().mean(0).expand_as(images).contiguous()
            chance = (set_psnr(mean_image, images), float(ssim(mean_image, images).mean()))
            if spec.block_scramble:
                from .report import score_reassembly
                L = images.shape[1] * patch_size * patch_size
                result = jigsaw_attack(cipher, patch_size, pixel_shuffle=spec.pixel_shuffle, negpos=spec.negpos,
                                       per_sample=spec.per_sample, method=method)
                row, _ = score_reassembly(result, images, patch_size, true_orders(key, spec, N, ids),
                                          key.pixel_permutation(L), key.negpos_mask(L) if spec.negpos else None,
                                          pixel_shuffle=spec.pixel_shuffle, negpos=spec.negpos)
                attacks.append(dict(attack="jigsaw attack (shard only)", psnr=row["psnr"], ssim=row["ssim"],
                                    chance_psnr=chance[0], chance_ssim=chance[1],
                                    detail=f"blocks in place {100 * row['direct']:.0f} %", row=row))
            k = known[0]
            tables = recover_key_tables(images[:k], cipher[:k], patch_size, block_scramble=spec.block_scramble,
                                        pixel_shuffle=spec.pixel_shuffle, negpos=spec.negpos,
                                        per_sample=spec.per_sample)
            decrypted = tables.decrypt(cipher[heldout], patch_size)
            victims = images[heldout]
            attacks.append(dict(attack=f"known plaintext ({k} pair)", psnr=set_psnr(decrypted, victims),
                                ssim=float(ssim(decrypted, victims).mean()), chance_psnr=chance[0],
                                chance_ssim=chance[1], detail="held-out images decrypted with the recovered tables"
                                + (" (blocks left in received order: per-sample)" if spec.per_sample else "")))
    lines = [f"{a['attack']}: {_db(a['psnr'])} PSNR / SSIM {a['ssim']:.2f} vs chance {_db(a['chance_psnr'])} / "
             f"{a['chance_ssim']:.2f} ({a['detail']})" for a in attacks]
    for line in lines:
        log(line)
    seconds = time.perf_counter() - started
    results = dict(encryption=spec.to_metadata(), description=spec.describe(), images=int(images.shape[0]),
                   public_images=None if public is None else int(public.shape[0]), patch_size=patch_size,
                   key_fingerprint=key.fingerprint, attacks=attacks)
    return QuickAudit(lines=lines, results=results, seconds=seconds)
