"""The audit of the dense block transform: run its attacks (which never see the key) and score them (with it).

* :func:`statistics_rows` -- the ciphertext-only statistics attack (:mod:`~msd_fast.evaluation.audit.statistics_attack`) with
  a same-domain public prior and a natural-photo prior; decoded blocks scored in their true places ("content leak",
  an upper bound on what leaks) and after the jigsaw reassembly (what an attacker gets), next to chance (the public
  mean image, the unattacked ciphertext) and to the block-mean thumbnail (the low-frequency reference).
* :func:`known_plaintext_rows` -- the known-plaintext sweep over ``k`` (:mod:`~msd_fast.evaluation.audit.dense_known_plaintext`).

Like the permutation audit, the statistics attack's answer is defined only up to symmetries the statistics cannot
see: a symmetry of the square inside each block (when the data's block statistics are nearly symmetric) and the
polarity of the block mean and of the detail. The 32 candidates are scored on up to 64 images and the best kept (the
attacker looks once at each); the row names the one kept.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch

from ...protocol.encryption import EncryptionSpec
from ...keys import Key
from ...ops.patch_encryption import blocks_to_image, image_to_blocks
from .dense_known_plaintext import recover_block_matrix
from .jigsaw import solve_block_order
from .metrics import DIHEDRAL, direct_accuracy, ssim
from .statistics_attack import (cipher_blocks, natural_image_blocks, public_blocks_from_images, statistics_attack,
                                to_pixels)

K_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 768)
_SELECT_IMAGES = 64


def set_psnr(reconstruction: torch.Tensor, reference: torch.Tensor, max_value: float = 255.0) -> float:
    """Whole-set PSNR in dB (``inf`` when exact)."""
    mse = float((reconstruction.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(max_value**2 / mse)


def _scores(recon: torch.Tensor, plain: torch.Tensor) -> tuple[float, float]:
    return set_psnr(recon, plain), float(ssim(recon, plain).mean())


def true_orders(key: Key, spec: EncryptionSpec, n_blocks: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, N]``: received block ``n`` of image ``b`` is plain block ``[b, n]`` (scoring only: uses the key)."""
    B = sample_ids.numel()
    if not spec.block_scramble:
        return torch.arange(n_blocks).expand(B, n_blocks)
    if spec.per_sample:
        return key.sample_block_permutations(n_blocks, sample_ids)
    return key.block_permutation(n_blocks).expand(B, n_blocks)


def place(blocks: torch.Tensor, placement: torch.Tensor, geometry: tuple, patch_size: int) -> torch.Tensor:
    """Blocks ``[B, N, L]`` (received order) into images: cell ``n`` gets block ``placement[b, n]``."""
    B, N, L = blocks.shape
    ordered = torch.gather(blocks, 1, placement[:, :, None].expand(B, N, L))
    return blocks_to_image(ordered, *geometry, patch_size)


def _candidates(patch_size: int, channels: int):
    """(name, function on unit blocks [..., L]) for the 32 symmetries the statistics cannot resolve."""
    out = []
    for name, g in DIHEDRAL.items():
        for dc in (1.0, -1.0):
            for detail in (1.0, -1.0):
                def transform(x, g=g, dc=dc, detail=detail):
                    shape = x.shape
                    mean = x.mean(-1, keepdim=True)
                    moved = (detail * (x - mean) + dc * mean).reshape(-1, channels, patch_size, patch_size)
                    return g(moved).reshape(shape)
                label = name + ("" if dc > 0 else ", mean inverted") + ("" if detail > 0 else ", detail inverted")
                out.append((label, transform))
    return out


def _look_once(decoded: torch.Tensor, truth_order: torch.Tensor, plain: torch.Tensor, patch_size: int):
    """The candidate (see the module docstring) with the best content PSNR on up to 64 images."""
    B, C, H, W = plain.shape
    pick = torch.linspace(0, B - 1, min(B, _SELECT_IMAGES)).round().long().unique()
    best = None
    for label, transform in _candidates(patch_size, C):
        image = place(to_pixels(transform(decoded[pick])), truth_order[pick], (C, H, W), patch_size)
        value = set_psnr(image, plain[pick])
        if best is None or value > best[0]:
            best = (value, label, transform)
    return best[1], best[2]


def statistics_rows(plain: torch.Tensor, cipher: torch.Tensor, key: Key, spec: EncryptionSpec, patch_size: int, *,
                    sample_ids: torch.Tensor, public: Optional[torch.Tensor], natural: bool = True,
                    method: str = "ssd", config: str = "", sweep: Sequence[int] = K_SWEEP, figure: Optional[list] = None,
                    figure_rows: int = 3, log: Callable[[str], None] = lambda line: None) -> list:
    """Run the statistics attack on ``cipher`` (the shard; the attack sees only it and the public blocks) with each
    prior, and score it against ``plain`` (uint8 ``[B, C, H, W]``). ``public``: uint8 same-domain public images
    (disjoint from ``plain``) or None; ``natural``: also the natural-photo prior. One dict per prior."""
    B, C, H, W = plain.shape
    p = patch_size
    N, L = (H // p) * (W // p), C * p * p
    truth = true_orders(key, spec, N, sample_ids)
    truth_place = torch.argsort(truth, -1)                   # cell n holds received block truth_place[b, n]
    received = cipher_blocks(cipher, p)
    priors = []
    if public is not None:
        priors.append(("same-domain public images", public_blocks_from_images(public, p)))
    if natural:
        priors.append(("natural photos", natural_image_blocks(p, C)))
    reference_mean = (public if public is not None else plain).double().mean(0)
    chance_psnr, chance_ssim = _scores(reference_mean.expand_as(plain).contiguous(), plain)
    received_psnr, received_ssim = _scores(to_pixels(cipher.double()), plain)
    plain_blocks = image_to_blocks(plain, p).double()
    thumbnail = blocks_to_image(plain_blocks.mean(-1, keepdim=True).expand(-1, -1, L), C, H, W, p)
    thumb_psnr, thumb_ssim = _scores(thumbnail, plain)
    rows = []
    for prior_name, prior in priors:
        t = time.perf_counter()
        result = statistics_attack(cipher, p, prior)
        attack_seconds = time.perf_counter() - t
        decoded = result.decode(received)
        symmetry, transform = _look_once(decoded, truth_place, plain, p)
        pixels = to_pixels(transform(decoded))
        content = place(pixels, truth_place, (C, H, W), p)
        content_psnr, content_ssim = _scores(content, plain)
        if spec.block_scramble:
            placement, _ = solve_block_order(pixels.reshape(B, N, C, p, p), H // p, W // p,
                                             per_sample=spec.per_sample, method=method)
            attacked = place(pixels, placement, (C, H, W), p)
            grid = torch.gather(truth, 1, placement).view(B, H // p, W // p)
            direct = float(direct_accuracy(grid).mean())
        else:
            attacked, direct = content, 1.0
        psnr_value, ssim_value = _scores(attacked, plain)
        swept = {}
        for k in sorted({k for k in sweep if k <= L} | {L}):
            image = place(to_pixels(transform(result.decode(received, k))), truth_place, (C, H, W), p)
            swept[k] = set_psnr(image, plain)
        row = dict(config=config, prior=prior_name, scheme=spec.scheme, per_sample=spec.per_sample,
                   block_scramble=spec.block_scramble, cipher_dtype=spec.cipher_dtype, components=result.components,
                   symmetry=symmetry, psnr=psnr_value, ssim=ssim_value, direct=direct,
                   content_psnr=content_psnr, content_ssim=content_ssim, dc_only_psnr=swept[1],
                   k_sweep={str(k): v for k, v in swept.items()}, best_k=max(swept, key=swept.get),
                   best_k_psnr=max(swept.values()), chance_psnr=chance_psnr, chance_ssim=chance_ssim,
                   received_psnr=received_psnr, received_ssim=received_ssim, thumbnail_psnr=thumb_psnr,
                   thumbnail_ssim=thumb_ssim, matrix_error=float((result.matrix - key.block_matrix(L)).norm() /
                                                                 math.sqrt(L)),
                   attack_seconds=attack_seconds, seconds=time.perf_counter() - t)
        rows.append(row)
        if figure is not None:
            figure.append((f"statistics attack, {prior_name} ({config})",
                           attacked[:figure_rows].round().to(torch.uint8)))
        log(f"dense statistics attack ({config}, {prior_name}): k={result.components}, PSNR {psnr_value:.1f} dB / "
            f"SSIM {ssim_value:.3f} after the jigsaw; content {content_psnr:.1f} dB; chance {chance_psnr:.1f} dB "
            f"({row['seconds']:.1f} s)")
    return rows


def known_plaintext_rows(plain: torch.Tensor, cipher: torch.Tensor, key: Key, spec: EncryptionSpec,
                         patch_size: int, *, sample_ids: torch.Tensor, known_pairs: Sequence[int], heldout: torch.Tensor,
                         method: str = "ssd", config: str = "", stop_when_recovered: bool = False,
                         figure: Optional[list] = None, figure_rows: int = 3,
                         log: Callable[[str], None] = lambda line: None) -> list:
    """The known-plaintext sweep: for each ``k``, recover ``A`` from the first ``k`` pairs, decode the ``heldout``
    images (int64 indices into ``plain``), put their blocks in order (the recovered key-wide order; per-sample: the
    jigsaw per image) and score. One dict per ``k``."""
    B, C, H, W = plain.shape
    p = patch_size
    N, L = (H // p) * (W // p), C * p * p
    A = key.block_matrix(L)
    truth = true_orders(key, spec, N, sample_ids)
    victims = plain[heldout]
    received = cipher_blocks(cipher[heldout], p)
    rows = []
    for k in sorted(set(int(k) for k in known_pairs)):
        t = time.perf_counter()
        found = recover_block_matrix(plain[:k], cipher[:k], p, per_sample=spec.per_sample)
        pixels = to_pixels(received @ found.matrix)
        coverage = float((received @ found.matrix).norm() / received.norm().clamp(min=1e-300))
        if not spec.block_scramble:
            placement = torch.argsort(truth[heldout], -1)
        elif spec.per_sample:
            placement, _ = solve_block_order(pixels.reshape(-1, N, C, p, p), H // p, W // p, per_sample=True,
                                             method=method)
        else:
            placement = torch.argsort(found.src_block).expand(len(heldout), N)
        decoded = place(pixels, placement, (C, H, W), p)
        psnr_value, ssim_value = _scores(decoded, victims)
        pair_truth = truth[:k]
        row = dict(config=config, k=k, blocks=k * N, independent_blocks=found.rank, block_values=L,
                   recovered=found.recovered, residual=found.residual, coverage=coverage,
                   matrix_error=float((found.matrix - A).norm() / A.norm()),
                   pair_block_order=float((found.pair_src_block == pair_truth).double().mean()),
                   psnr=psnr_value, ssim=ssim_value,
                   exact_pixels=float((decoded.round() == victims.double()).double().mean()),
                   direct=float(direct_accuracy(torch.gather(truth[heldout], 1, placement).view(-1, H // p, W // p))
                                .mean()),
                   seconds=time.perf_counter() - t)
        rows.append(row)
        log(f"dense known plaintext ({config}), k={k}: {found.rank}/{L} independent blocks, recovered "
            f"{found.recovered}, |A_hat - A|/|A| {row['matrix_error']:.2e}, held-out PSNR {psnr_value:.1f} dB")
        if figure is not None and (found.recovered or k == max(known_pairs)):
            figure.append((f"known plaintext k={k} ({config})", decoded[:figure_rows].round().to(torch.uint8)))
            figure = None
        if stop_when_recovered and found.recovered:
            break
    return rows


def public_split(images: torch.Tensor, public_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``images`` into (shard, same-domain public images): the last ``public_fraction`` (at least 1, at most
    half) are the attacker's public images, disjoint from the shard."""
    B = images.shape[0]
    n_public = min(max(1, int(round(B * public_fraction))), B // 2) if B > 1 else 0
    return images[:B - n_public], images[B - n_public:]
