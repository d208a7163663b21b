"""The privacy audit: play the honest-but-curious server against encrypted data and report what it recovers.

:func:`run_audit` encrypts the given images with the key exactly as a client would (or takes the server's view from
a shard), runs every attack of this package *without* the key, and scores the result *with* it -- next to the
chance level and to what the server has without attacking. :class:`AuditReport` holds the numbers and writes
``audit.md`` (tables, threat model, what each attack assumes), ``audit.png`` (attacked reconstructions) and
``audit.json``, each atomically. Nothing secret is written: the key appears only as its public fingerprint, and
recovered key tables only as the fraction recovered.

Threat model: an honest-but-curious server. It follows the protocol, holds every uploaded shard with its public
metadata (geometry, encryption options, the key's fingerprint) and unlimited compute, and wants the images. It never
holds the key. Attacks: ciphertext-only (the shard alone), known-plaintext (``k`` images with their encryptions, e.g.
public or leaked studies also in the shard) and, in token mode, the case that the key-derived embedder leaks.

Structure: :func:`run_audit` checks its arguments into an :class:`AuditRun` (images, key, settings, the shard's
items) and runs every row of :data:`ATTACKS` that applies to it -- one function per attack family (jigsaw on the
shard, jigsaw reassembly, known-plaintext key tables, dense statistics attack, dense known plaintext, token attacks),
each returning the rows of one report section. A new attack is one such function plus one row of :data:`ATTACKS`
(a new section also needs an :class:`AuditReport` field and its table in :meth:`AuditReport.to_markdown`); the
attack itself goes into its own module of this package, the way ``jigsaw.py`` and ``token_attacks.py`` do.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ...checks import check_positive_int
from ...atomic import write_text
from ..image_grid import save_image_columns
from ...keys import Key, require_key
from ...ops.patch_encryption import blocks_to_image, encrypt_patches, image_to_blocks
from ...ops.token_permutation import permute_tokens
from ...protocol.token_embedding import INPUT_SCALE, TokenEmbedder
from ...protocol.encryption import EncryptionSpec
from .assignment import assign, single_thread
from .dense_study import known_plaintext_rows, public_split, statistics_rows
from .jigsaw import JigsawResult, check_images, invert_polarity, jigsaw_attack
from .known_plaintext import recover_key_tables
from .metrics import (DIHEDRAL, chance_direct_accuracy, chance_neighbour_accuracy, chance_position_accuracy,
                      direct_accuracy, neighbour_accuracy, ssim, symmetries)
from .token_attacks import (cluster_layout, cluster_token_positions, fit_token_inversion, label_clusters,
                            patch_prior, public_embedder_attack, symmetric_positions)

REPORT_FORMAT = "msd_fast.audit"
REPORT_VERSION = 1
FILES = ("audit.md", "audit.png", "audit.json")

# (row name, encryption options) of the ciphertext-only and known-plaintext studies.
JIGSAW_CONFIGS = (
    ("block scrambling", dict(pixel_shuffle=False, negpos=False, per_sample=False)),
    ("block + pixel shuffling", dict(pixel_shuffle=True, negpos=False, per_sample=False)),
    ("block + pixel + negative-positive", dict(pixel_shuffle=True, negpos=True, per_sample=False)),
    ("per-sample block scrambling", dict(pixel_shuffle=False, negpos=False, per_sample=True)),
    ("per-sample block + pixel + negative-positive", dict(pixel_shuffle=True, negpos=True, per_sample=True)),
)
KNOWN_PLAINTEXT_CONFIGS = (
    ("block scrambling", dict(pixel_shuffle=False, negpos=False, per_sample=False)),
    ("block + pixel shuffling", dict(pixel_shuffle=True, negpos=False, per_sample=False)),
    ("block + pixel + negative-positive", dict(pixel_shuffle=True, negpos=True, per_sample=False)),
    ("per-sample block + pixel + negative-positive", dict(pixel_shuffle=True, negpos=True, per_sample=True)),
)
DENSE_SPECS = (EncryptionSpec(scheme="dense", per_sample=False, cipher_dtype="float16"),
               EncryptionSpec(scheme="dense", per_sample=True, cipher_dtype="float16"))
NOT_THESE_IMAGES = ("the shard does not hold these images encrypted with this key in this order (pass the --data "
                    "it was encoded from)")
_SELECT_IMAGES = 64  # images used to pick the symmetry / polarity / channel order of a reassembly


# ---- small helpers -------------------------------------------------------------------------------------------------

def set_psnr(reconstruction: torch.Tensor, reference: torch.Tensor, max_value: float = 255.0) -> float:
    """PSNR of a whole set: ``10 log10(max^2 / MSE)`` with the MSE over every value of every image (dB; ``inf``
    when exact). Unlike a mean of per-image PSNRs it stays meaningful when some images are reconstructed exactly."""
    mse = float((reconstruction.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(max_value**2 / mse)


def _to_pixels(patches: torch.Tensor, max_value: float) -> torch.Tensor:
    """Embedder input units back to uint8 pixel values."""
    return ((patches / INPUT_SCALE + 0.5) * max_value).round().clamp(0, max_value).to(torch.uint8)


def _to_units(blocks: torch.Tensor, max_value: float) -> torch.Tensor:
    return (blocks.double() / max_value - 0.5) * INPUT_SCALE


def _assemble(patches: torch.Tensor, positions: torch.Tensor, geometry: tuple, patch_size: int) -> torch.Tensor:
    """Put token patches ``[B, N, L]`` at their (attacker-given, one-to-one) positions ``[B, N]``: ``[B, C, H, W]``."""
    B, N, L = patches.shape
    blocks = torch.empty_like(patches).scatter_(1, positions[:, :, None].expand(B, N, L), patches)
    return blocks_to_image(blocks, *geometry, patch_size)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "--"
    if isinstance(value, float):
        if math.isinf(value):
            return "exact"
        return f"{value:.{digits}f}"
    return str(value)


def _db(value) -> str:
    return "--" if value is None else ("exact" if math.isinf(value) else f"{value:.1f} dB")


def _percent(value) -> str:
    return "--" if value is None else f"{100 * value:.1f} %"


# ---- scoring (with the key: the attacker never runs these) ---------------------------------------------------------

def score_reassembly(result: JigsawResult, plain: torch.Tensor, patch_size: int, true_src_block: torch.Tensor,
                     true_src_elem: torch.Tensor, true_flip: Optional[torch.Tensor], *, pixel_shuffle: bool,
                     negpos: bool, max_value: float = 255.0) -> tuple[dict, torch.Tensor]:
    """Score a ciphertext-only reassembly against the truth.

    The attacker's layout of a block's values is defined up to a symmetry of the square (and its negative-positive
    mask up to the complement, channels up to a permutation), so every candidate is scored and the best one (by PSNR
    over up to 64 images) is kept -- as if the attacker looked at one image of each candidate and picked the natural
    one.

    Args:
        result: the attack's output; plain: uint8 ``[B, C, H, W]`` the truth; patch_size: ``p``.
        true_src_block: int64 ``[B, N]``: received block ``n`` of image ``b`` is plain block ``true_src_block[b, n]``.
        true_src_elem: int64 ``[L]``: the key's pixel permutation; true_flip: bool ``[L]`` or None: its mask.

    Returns:
        ``(row, reconstruction)``: the metrics (direct, neighbour, right_content, psnr, ssim, exact_images,
        pixel_layout, negpos_mask, symmetry, polarity_inverted) and the best candidate, uint8 ``[B, C, H, W]``.
    """
    B, C, H, W = plain.shape
    p = patch_size
    rows, cols = H // p, W // p
    grid = torch.gather(true_src_block, 1, result.placement).view(B, rows, cols)
    polarities = (False, True) if negpos else (False,)
    channel_orders = list(itertools.permutations(range(C))) if pixel_shuffle and 1 < C <= 4 else [tuple(range(C))]
    names = symmetries(H, W) if pixel_shuffle else ["identity"]
    pick = torch.linspace(0, B - 1, min(B, _SELECT_IMAGES)).round().long().unique()
    best = None
    for inverted in polarities:
        base = invert_polarity(result.reconstruction[pick], max_value) if inverted else result.reconstruction[pick]
        for order in channel_orders:
            for name in names:
                value = set_psnr(DIHEDRAL[name](base[:, list(order)]), plain[pick], max_value)
                if best is None or value > best[0]:
                    best = (value, inverted, order, name)
    _, inverted, order, name = best
    g = DIHEDRAL[name]
    recon = invert_polarity(result.reconstruction, max_value) if inverted else result.reconstruction
    recon = g(recon[:, list(order)])
    ids = g(grid)
    same_content = (image_to_blocks(recon, p) == image_to_blocks(plain, p)).all(2)
    row = dict(direct=float(direct_accuracy(ids).mean()), neighbour=float(neighbour_accuracy(ids).mean()),
               right_content=float(same_content.double().mean()), psnr=set_psnr(recon, plain, max_value),
               ssim=float(ssim(recon, plain, max_value).mean()),
               exact_images=float((recon == plain).flatten(1).all(1).double().mean()),
               pixel_layout=None, negpos_mask=None, symmetry=name, polarity_inverted=inverted)
    if pixel_shuffle:
        values = true_src_elem[result.value_order].view(C, p, p)[list(order)]
        row["pixel_layout"] = float((g(values) == torch.arange(C * p * p).view(C, p, p)).double().mean())
    if negpos and result.flip is not None and true_flip is not None:
        estimate = ~result.flip if inverted else result.flip
        row["negpos_mask"] = float((estimate == true_flip).double().mean())
    return row, recon


# ---- the report ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AuditReport:
    """The audit's numbers (``setup``, ``jigsaw``, ``known_plaintext``, ``tokens``: JSON-ready dicts/lists) and the
    reconstructions for the figure (``figure``: ``[(label, uint8 [R, C, H, W])]``, not serialised). Contains no
    secret: the key only as its fingerprint."""

    setup: dict
    jigsaw: list
    known_plaintext: list
    tokens: list
    figure: list = dataclasses.field(default_factory=list, repr=False)
    dense: list = dataclasses.field(default_factory=list)
    dense_known_plaintext: list = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        return (f"AuditReport(key_fingerprint='{self.setup.get('key_fingerprint')}', "
                f"images={self.setup.get('images')}, "
                f"jigsaw={len(self.jigsaw)} rows, known_plaintext={len(self.known_plaintext)} rows, "
                f"tokens={len(self.tokens)} rows)")

    def to_dict(self) -> dict:
        """JSON-ready: ``inf`` (exact reconstructions) is written as the string ``"inf"``."""
        def clean(value):
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value
        return clean({"format": REPORT_FORMAT, "version": REPORT_VERSION, "setup": self.setup,
                      "jigsaw": self.jigsaw, "known_plaintext": self.known_plaintext, "tokens": self.tokens,
                      "dense": self.dense, "dense_known_plaintext": self.dense_known_plaintext})

    def to_markdown(self, figure_name: Optional[str] = "audit.png") -> str:
        s = self.setup
        lines = [
            "# msd_fast privacy audit",
            "",
            f"{s['date']}, msd_fast {s['msd_fast']}, torch {s['torch']}, {s['threads']} CPU thread(s), "
            f"{s['seconds']:.0f} s. Data: {s['data']} -- {s['images']} images {s['image_shape']} uint8; patch size "
            f"{s['patch_size']} ({s['grid'][0]}x{s['grid'][1]} = {s['blocks']} blocks of {s['block_values']} values). "
            f"Key fingerprint {s['key_fingerprint']}.",
            "",
            "**Threat model.** An honest-but-curious server: it runs the protocol, holds every uploaded shard with its "
            "public metadata (geometry, encryption options, key fingerprint), has unlimited compute and wants the "
            "images; it never holds the key. *Ciphertext-only*: the shard alone. *Known-plaintext*: k images with "
            "their encryptions. *Public embedder*: token mode if the key-derived embedder leaked.",
            "",
            "## Ciphertext-only: jigsaw reassembly of encrypted images",
            "",
            f"All {s['jigsaw_images']} images of the shard; edge dissimilarity `{s['method']}`. Direct: blocks in "
            "their right cell; neighbour: right adjacent pairs; right content: cells holding the right pixels (a "
            "misplaced but identical block counts); PSNR over the whole set. Layout of the values in a block and the "
            "negative-positive mask are recovered only up to a symmetry of the square and the complement; the best "
            "of those few candidates is scored (the attacker looks once). Chance: a random arrangement.",
            "",
            "| encryption | direct | neighbour | right content | PSNR | SSIM | pixel layout | negpos mask | "
            "as received (PSNR / SSIM) | chance (direct / neighbour) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.jigsaw:
            lines.append(f"| {r['config']} | {_percent(r['direct'])} | {_percent(r['neighbour'])} | "
                         f"{_percent(r['right_content'])} | {_db(r['psnr'])} | {_fmt(r['ssim'])} | "
                         f"{_percent(r['pixel_layout'])} | {_percent(r['negpos_mask'])} | "
                         f"{_db(r['received_psnr'])} / {_fmt(r['received_ssim'])} | "
                         f"{_percent(r['chance_direct'])} / {_percent(r['chance_neighbour'])} |")
        lines += [
            "| plain upload (no encryption) | 100 % | 100 % | 100 % | exact | 1.000 | -- | -- | exact / 1.000 | -- |",
            "",
            "## Known plaintext: key-table recovery from k pairs",
            "",
            f"Pairs are the first k images; the recovered tables then decrypt {s['heldout_images']} other images "
            "(held out). Tables: fraction of entries equal to the key's. With per-sample keys the block order of "
            "other images is not recoverable from pairs; they are decrypted with the recovered pixel tables and then "
            "attacked with the per-image jigsaw.",
            "",
            "| encryption | k | block order | pixel permutation | negpos mask | held-out PSNR | held-out SSIM | "
            "held-out exact pixels | held-out images exact | as received (PSNR) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.known_plaintext:
            lines.append(f"| {r['config']} | {r['k']} | {_percent(r['block_order'])} | "
                         f"{_percent(r['pixel_permutation'])} | {_percent(r['negpos_mask'])} | {_db(r['psnr'])} | "
                         f"{_fmt(r['ssim'])} | {_percent(r['exact_pixels'])} | {_percent(r['exact_images'])} | "
                         f"{_db(r['received_psnr'])} |")
        lines += [
            "",
            "## Token mode: position recovery and inversion",
            "",
            f"{s['heldout_images']} images' tokens (per-image permuted); the attacker's public images / known pairs "
            f"are the first {s['attacker_images']} images. Position: tokens given their true position (chance "
            f"{_percent(chance_position_accuracy(s['blocks']))}; tokens sent in order: 100 %). Grouped: tokens "
            "grouped with the other images' tokens of the same position (best one-to-one naming of the groups). "
            "Patch PSNR: each token's patch wherever it goes; image PSNR/SSIM: patches at the attacker's positions; "
            "mean patch: the attacker's prior mean patch in the right place (no attack).",
            "",
            "| D | attacker has | position | grouped by position | patch PSNR | image PSNR | image SSIM | "
            "mean patch PSNR |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.tokens:
            attack = r["attack"] + (" (this shard)" if r.get("source") == "this shard" else "")
            lines.append(f"| {r['embed_dim']} | {attack} | {_percent(r['position'])} | {_percent(r['grouped'])} "
                         f"| {_db(r['patch_psnr'])} | {_db(r['image_psnr'])} | {_fmt(r['image_ssim'])} | "
                         f"{_db(r['mean_patch_psnr'])} |")
        lines += self._dense_markdown()
        lines += ["", "## What the attacks assume", ""] + [f"- {a}" for a in ASSUMPTIONS]
        if figure_name:
            lines += ["", f"![attacked reconstructions]({figure_name})", "",
                      "Columns: " + ", ".join(label for label, _ in self.figure) + "."]
        return "\n".join(lines) + "\n"

    def _dense_markdown(self) -> list:
        if not self.dense and not self.dense_known_plaintext:
            return []
        s = self.setup
        lines = [
            "", "## Dense transform: ciphertext-only statistics attack", "",
            f"Shard: {s.get('dense_images')} images; same-domain prior: {s.get('dense_public_images')} other images of "
            "the same set (not in the shard); natural prior: scikit-learn's two sample photos at 4 scales. Eigenvectors "
            "of the ciphertext block covariance paired by rank with the prior's; signs and near-degenerate groups "
            "resolved by third moments; k (components decoded) chosen without the key by a rehearsal on the public "
            "data. After jigsaw: the decoded blocks reassembled by the jigsaw solver; content: the decoded blocks in "
            "their true places (upper bound on what leaks). Chance: the public mean image; as received: the "
            "ciphertext read as pixels; thumbnail: every block replaced by its true mean (the low-frequency reference).",
            "", "| encryption | prior | k | after jigsaw (PSNR / SSIM) | blocks in place | content (PSNR / SSIM) | "
            "best k (content PSNR) | DC only | chance (PSNR / SSIM) | as received | thumbnail |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.dense:
            lines.append(f"| {r['config']} | {r['prior']} | {r['components']} | {_db(r['psnr'])} / {_fmt(r['ssim'])} | "
                         f"{_percent(r['direct'])} | {_db(r['content_psnr'])} / {_fmt(r['content_ssim'])} | "
                         f"{r['best_k']} ({_db(r['best_k_psnr'])}) | {_db(r['dc_only_psnr'])} | "
                         f"{_db(r['chance_psnr'])} / {_fmt(r['chance_ssim'])} | {_db(r['received_psnr'])} | "
                         f"{_db(r['thumbnail_psnr'])} |")
        lines += [
            "", "## Dense transform: known plaintext", "",
            "Cipher blocks matched to plain blocks by norm and Gram profile, A by orthogonal Procrustes on the span of "
            "the matched plain blocks (L independent blocks needed). Held-out images decoded with A_hat, blocks put in "
            "order with the recovered key-wide order (per-sample: the jigsaw per image).", "",
            "| encryption | k | independent blocks | recovered (attacker's verdict) | rel. error of A_hat | "
            "held-out PSNR | held-out SSIM | blocks in place |",
            "|---|---|---|---|---|---|---|---|"]
        for r in self.dense_known_plaintext:
            lines.append(f"| {r['config']} | {r['k']} | {r['independent_blocks']} / {r['block_values']} | "
                         f"{'yes' if r['recovered'] else 'no'} | {r['matrix_error']:.1e} | {_db(r['psnr'])} | "
                         f"{_fmt(r['ssim'])} | {_percent(r['direct'])} |")
        return lines

    def write(self, out_dir: str) -> dict:
        """Write ``audit.md``, ``audit.png`` and ``audit.json`` into ``out_dir`` (created), each atomically;
        returns their paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {name: os.path.join(out_dir, name) for name in FILES}
        write_text(paths["audit.md"], self.to_markdown("audit.png" if self.figure else None))
        write_text(paths["audit.json"], json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        if self.figure:
            save_image_columns(paths["audit.png"], self.figure)
        else:
            del paths["audit.png"]
        return paths


ASSUMPTIONS = (
    "Ciphertext-only, negative-positive: one mask for every block of every image; the sign pattern of the value "
    "correlations (leading eigenvector) gives it up to the complement; both polarities are tried.",
    "Ciphertext-only, pixel shuffling: one permutation for every block of every image; neighbouring pixels correlate "
    "across blocks, so the value positions are laid out on the p x p grid (Isomap + rank snapping + swaps), up to a "
    "symmetry of the square.",
    "Ciphertext-only, block scrambling: with one key-wide order, edge dissimilarities are summed over the whole shard "
    "and one puzzle is solved; with per-sample orders each image is solved alone. Greedy solver (best-buddy Kruskal "
    "merging, then confidence-ordered filling), no position prior from public images (not tried).",
    "Known plaintext: sorted folded values (min(v, 255 - v)) of a block survive pixel shuffling and "
    "negative-positive, so blocks match across pairs; then values and polarities are matched over all matched blocks.",
    "Token mode, public embedder: the attacker knows W and pos and has a Gaussian patch prior from public images of "
    "the same kind (here: the first images of the set); positions by a Gaussian classifier with one-to-one "
    "assignment per image, patches by the posterior mean (exact when D >= L).",
    "Token mode, secret embedder: position offsets are shared by all images, so constrained k-means groups tokens "
    "by position across images (this undoes the per-sample permutation up to one global relabelling); the groups are "
    "placed on the grid from their cross-covariance. With known pairs, the token-to-patch correspondence of the k "
    "pairs is assumed known (strongest case); they name the groups' positions and fit a ridge regression "
    "[token, one-hot group, 1] -> patch.",
)


@dataclasses.dataclass
class _TokenScene:
    """One token width ``D`` of the token-mode study: the victims' tokens as the server receives them
    (``received [B, N, D]``, per-image permuted), the attacker's known pairs, and the truth that scores an attack
    (``truth [B, N]``: received token ``i`` sat at position ``truth[b, i]``). :meth:`record` adds a scored row."""

    victims: torch.Tensor
    embedder: TokenEmbedder
    patch_size: int
    max_value: float
    received: torch.Tensor
    known_received: torch.Tensor
    truth: torch.Tensor
    known_truth: torch.Tensor
    known_units: torch.Tensor
    true_patches: torch.Tensor
    prior_mean: torch.Tensor
    prior_cov: torch.Tensor
    mean_patch_psnr: float  # no attack: the prior's mean patch at every position
    figure: list
    figure_rows: int
    log: Callable[[str], None]
    rows: list = dataclasses.field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return self.victims.shape[2] // self.patch_size, self.victims.shape[3] // self.patch_size

    @property
    def embed_dim(self) -> int:
        return self.embedder.weight.shape[0]

    def record(self, attack: str, k: Optional[int], position: float, grouped: Optional[float],
               patches: Optional[torch.Tensor], positions: Optional[torch.Tensor], label: Optional[str] = None) -> None:
        """Score one attack: ``position`` / ``grouped`` accuracies, and with ``patches [B, N, L]`` (embedder units)
        placed at ``positions [B, N]`` the patch and image PSNR / SSIM; ``label`` puts the images in the figure."""
        max_value, N = self.max_value, self.truth.shape[1]
        entry = dict(embed_dim=self.embed_dim, attack=attack, k=k, position=position, grouped=grouped,
                     patch_psnr=None, image_psnr=None, image_ssim=None, mean_patch_psnr=self.mean_patch_psnr,
                     chance_position=chance_position_accuracy(N))
        if patches is not None:
            pixels = _to_pixels(patches, max_value)
            entry["patch_psnr"] = set_psnr(pixels, _to_pixels(self.true_patches, max_value), max_value)
            image = _assemble(pixels, positions, tuple(self.victims.shape[1:]), self.patch_size)
            entry["image_psnr"] = set_psnr(image, self.victims, max_value)
            entry["image_ssim"] = float(ssim(image, self.victims, max_value).mean())
            if label:
                self.figure.append((label, image[:self.figure_rows]))
        self.rows.append(entry)
        self.log(f"  tokens D={self.embed_dim}: {attack}: position {_percent(position)}, patch PSNR "
                 f"{_db(entry['patch_psnr'])}")


def _token_scene(victims: torch.Tensor, known: torch.Tensor, key: Key, *, embed_dim: int, patch_size: int,
                 sample_ids: torch.Tensor, known_ids: torch.Tensor, max_value: float,
                 received: Optional[torch.Tensor], figure: list, figure_rows: int, log) -> _TokenScene:
    """Embed and permute ``victims`` (unless the shard's ``received`` tokens are given) and ``known`` with ``key``."""
    B, C, H, W = victims.shape
    p = patch_size
    N = (H // p) * (W // p)
    embedder = TokenEmbedder.from_key(key, patch_size=p, in_chans=C, image_size=(H, W), embed_dim=embed_dim,
                                      max_value=max_value)
    with torch.no_grad():
        if received is None:
            received = permute_tokens(embedder(victims), key, sample_ids)
        known_received = permute_tokens(embedder(known), key, known_ids)
    truth = key.token_permutations(N, sample_ids)
    plain_units = _to_units(image_to_blocks(victims, p), max_value)         # [B, N, L] in position order
    true_patches = torch.gather(plain_units, 1, truth[:, :, None].expand(-1, -1, plain_units.shape[2]))
    known_units = _to_units(image_to_blocks(known, p), max_value)
    prior_mean, prior_cov = patch_prior(known_units)
    mean_patch = _to_pixels(prior_mean.expand_as(true_patches), max_value)
    return _TokenScene(victims=victims, embedder=embedder, patch_size=p, max_value=max_value,
                       received=received.float(), known_received=known_received, truth=truth,
                       known_truth=key.token_permutations(N, known_ids), known_units=known_units,
                       true_patches=true_patches, prior_mean=prior_mean, prior_cov=prior_cov,
                       mean_patch_psnr=set_psnr(mean_patch, _to_pixels(true_patches, max_value), max_value),
                       figure=figure, figure_rows=figure_rows, log=log)


def _public_embedder_row(scene: _TokenScene) -> None:
    """The embedder leaked: positions by a Gaussian classifier, patches by the posterior mean."""
    D = scene.embed_dim
    public = public_embedder_attack(scene.received, scene.embedder.weight.reshape(D, -1), scene.embedder.pos,
                                    scene.prior_mean, scene.prior_cov)
    scene.record("public embedder + patch prior", None, float((public.positions == scene.truth).double().mean()),
                 None, public.patches, public.positions, f"tokens D={D}, public embedder")


def _secret_embedder_rows(scene: _TokenScene, known_pairs: Sequence[int]) -> None:
    """The embedder secret: tokens grouped by position across images (tokens only), then named and inverted with
    ``k`` known pairs."""
    rows, cols = scene.grid
    N, truth, n_known = scene.truth.shape[1], scene.truth, scene.known_received.shape[0]
    labels = cluster_token_positions(torch.cat([scene.known_received.float(), scene.received]))
    known_labels, labels = labels[:n_known], labels[n_known:]
    votes = torch.zeros(N, N, dtype=torch.float64)
    votes.index_put_((labels.reshape(-1), truth.reshape(-1)), torch.ones(labels.numel(), dtype=torch.float64),
                     accumulate=True)
    naming = assign(-votes)
    grouped = float((naming[labels] == truth).double().mean())
    cells = cluster_layout(scene.received, labels, rows, cols)
    absolute = max(float((symmetric_positions(cells, rows, cols, DIHEDRAL[name])[labels] == truth).double().mean())
                   for name in symmetries(rows, cols))
    scene.record("secret embedder, tokens only", None, absolute, grouped, None, None)
    known_units, known_truth = scene.known_units, scene.known_truth
    for k in known_pairs:
        if k > n_known:
            continue
        names = label_clusters(known_labels[:k], known_truth[:k])
        target = torch.gather(known_units[:k], 1, known_truth[:k, :, None].expand(-1, -1, known_units.shape[2]))
        model = fit_token_inversion(scene.known_received[:k].float(), known_labels[:k], target)
        positions = names[labels]
        scene.record(f"secret embedder + {k} known pairs", k, float((positions == truth).double().mean()), grouped,
                     model.predict(scene.received, labels), positions,
                     f"tokens D={scene.embed_dim}, {k} known pairs" if k == max(known_pairs) else None)


def _token_rows(victims: torch.Tensor, known: torch.Tensor, key: Key, *, embed_dim: int, patch_size: int,
                sample_ids: torch.Tensor, known_ids: torch.Tensor, known_pairs: Sequence[int], max_value: float,
                received: Optional[torch.Tensor], figure: list, figure_rows: int, log) -> list:
    """The token-mode rows of one width ``D``: public embedder, secret embedder (tokens only, ``k`` known pairs)."""
    scene = _token_scene(victims, known, key, embed_dim=embed_dim, patch_size=patch_size, sample_ids=sample_ids,
                         known_ids=known_ids, max_value=max_value, received=received, figure=figure,
                         figure_rows=figure_rows, log=log)
    _public_embedder_row(scene)
    _secret_embedder_rows(scene, known_pairs)
    return scene.rows


def run_audit(images: torch.Tensor, key: Key, *, patch_size: int = 16, known_pairs: Sequence[int] = (1, 10, 100),
              token_dims: Sequence[int] = (192, 384), method: str = "ssd", max_heldout: int = 256,
              figure_rows: int = 3, data_description: str = "in-memory images", shard=None,
              log: Optional[Callable[[str], None]] = None, backend: str = "auto") -> AuditReport:
    """Run every attack against ``images`` encrypted with ``key`` and score it.

    Args:
        images: uint8 ``[B, C, H, W]``, the plain images (ground truth), in shard order when ``shard`` is given.
        key: the consortium :class:`~msd_fast.Key` (used to encrypt and to score, never by an attack).
        patch_size: the block/patch size ``p`` (a shard's own patch size wins).
        known_pairs: the ``k`` values of the known-plaintext study (k above ``B / 2`` are skipped).
        token_dims: token widths ``D`` audited in token mode (a token shard's own ``D`` is always audited).
        method: edge dissimilarity of the jigsaw solver, ``"ssd"`` or ``"mgc"``.
        max_heldout: cap on the held-out images decrypted / inverted per known-plaintext and token row.
        figure_rows: images shown in the figure.
        data_description: where the images came from (for the report).
        shard: an opened :class:`~msd_fast.protocol.shards.Shard` holding ``images`` encoded with ``key``: its items are the
            server's view (image mode: a jigsaw row with the shard's options; token mode: the tokens of its ``D``).
        log: called with one line per finished step (e.g. ``print``); silent by default.
        backend: the kernel backend that encrypts with the dense scheme. The dense rows attack the first 3/4 of ``images``; the last 1/4 is the
            attacker's same-domain public set.

    Returns:
        :class:`AuditReport`.

    The attacks are loops of many small tensor operations, so the audit runs on one intra-op thread (restored
    afterwards): on a busy 2-core machine that is 2-3x faster than two threads.
    """
    with single_thread():
        audit = _prepare(images, key, patch_size=patch_size, known_pairs=known_pairs, token_dims=token_dims,
                         method=method, max_heldout=max_heldout, figure_rows=figure_rows,
                         data_description=data_description, shard=shard, log=log, backend=backend)
        return _run_attacks(audit)


@dataclasses.dataclass
class AuditRun:
    """What every attack of one audit reads: the plain ``images`` (uint8 ``[B, C, H, W]``, in shard order), the
    ``key`` (to encrypt and to score, never given to an attack), the study's settings, and -- with a shard -- the
    server's actual view ``shard_view``. Attacks add their reconstructions to ``figure`` and their facts to
    ``setup`` (the report's setup dict)."""

    images: torch.Tensor
    key: Key
    patch_size: int
    ids: torch.Tensor
    known_pairs: list
    token_dims: list
    method: str
    max_heldout: int
    figure_rows: int
    backend: str
    log: Callable[[str], None]
    shard: object
    shard_view: Optional[torch.Tensor]
    setup: dict
    figure: list
    dense_ciphers: dict = dataclasses.field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return self.images.shape[2] // self.patch_size, self.images.shape[3] // self.patch_size

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_values(self) -> int:
        return self.images.shape[1] * self.patch_size**2

    @property
    def n_attacker(self) -> int:
        """The attacker's known pairs / public images: the first ``max(known_pairs)`` images."""
        return max(self.known_pairs)

    @property
    def heldout(self) -> torch.Tensor:
        """The images decrypted / inverted by the known-plaintext and token attacks (never the attacker's)."""
        return torch.arange(self.n_attacker, min(len(self.images), self.n_attacker + self.max_heldout))

    def shard_mode(self) -> Optional[str]:
        return None if self.shard is None else self.shard.metadata.mode

    def dense_split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(shard images, their sample ids, same-domain public images)`` of the dense rows."""
        shard_images, public_images = public_split(self.images)
        return shard_images, self.ids[:shard_images.shape[0]], public_images

    def dense_cipher(self, spec: EncryptionSpec) -> torch.Tensor:
        """The dense rows' shard images encrypted with ``spec`` (once per audit)."""
        if spec not in self.dense_ciphers:
            shard_images, ids, _ = self.dense_split()
            self.dense_ciphers[spec] = spec.encrypt(shard_images, self.key, self.patch_size, sample_ids=ids,
                                                    backend=self.backend)
        return self.dense_ciphers[spec]


# ---- the attack families: one function each (rows of one report section), driven by ATTACKS -----------------------

def _jigsaw_row(audit: AuditRun, name: str, options: dict, encrypted: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Reassemble ``encrypted`` (ciphertext-only) and score it: ``(row, best reconstruction)``."""
    images, key, p = audit.images, audit.key, audit.patch_size
    B, N, L = len(images), audit.blocks, audit.block_values
    started = time.perf_counter()
    result = jigsaw_attack(encrypted, p, max_value=255.0, method=audit.method, **options)
    src = (key.sample_block_permutations(N, audit.ids) if options["per_sample"]
           else key.block_permutation(N).expand(B, N))
    scored, recon = score_reassembly(result, images, p, src, key.pixel_permutation(L),
                                     key.negpos_mask(L) if options["negpos"] else None,
                                     pixel_shuffle=options["pixel_shuffle"], negpos=options["negpos"])
    scored.update(config=name, block_scramble=True, **options, seconds=time.perf_counter() - started,
                  received_psnr=set_psnr(encrypted, images), received_ssim=float(ssim(encrypted, images).mean()),
                  chance_direct=chance_direct_accuracy(*audit.grid),
                  chance_neighbour=chance_neighbour_accuracy(*audit.grid))
    audit.log(f"jigsaw: {name}: direct {_percent(scored['direct'])}, neighbour {_percent(scored['neighbour'])}, "
              f"PSNR {_db(scored['psnr'])} ({scored['seconds']:.1f} s)")
    return scored, recon


def shard_jigsaw_rows(audit: AuditRun) -> list:
    """Ciphertext-only jigsaw on the shard's own items (the server's actual view), with the shard's options."""
    encryption = audit.shard.metadata.encryption
    if not encryption["block_scramble"]:
        raise ValueError("the shard does not scramble blocks: the jigsaw attack needs nothing to reassemble")
    options = dict(pixel_shuffle=bool(encryption["pixel_shuffle"]), negpos=bool(encryption["negpos"]),
                   per_sample=bool(encryption["per_sample"]))
    row, _ = _jigsaw_row(audit, f"this shard ({_describe(options)})", options, audit.shard_view)
    return [row]


def jigsaw_rows(audit: AuditRun) -> list:
    """Ciphertext-only jigsaw reassembly of the images encrypted with each of :data:`JIGSAW_CONFIGS`."""
    pick = audit.heldout[:audit.figure_rows]
    rows = []
    for name, options in JIGSAW_CONFIGS:
        encrypted = encrypt_patches(audit.images, audit.key, audit.patch_size, block_scramble=True, **options,
                                    sample_ids=audit.ids if options["per_sample"] else None)
        row, recon = _jigsaw_row(audit, name, options, encrypted)
        rows.append(row)
        if name == "block + pixel + negative-positive":
            audit.figure.append(("encrypted (block + pixel + negpos)", encrypted[pick]))
            audit.figure.append(("jigsaw attack, one key", recon[pick]))
        if name == "per-sample block + pixel + negative-positive":
            audit.figure.append(("jigsaw attack, per-sample keys", recon[pick]))
    return rows


def known_plaintext_table_rows(audit: AuditRun) -> list:
    """Key-table recovery from ``k`` known pairs for each of :data:`KNOWN_PLAINTEXT_CONFIGS`, scored by decrypting
    the held-out images (per-sample: recovered pixel tables, then the per-image jigsaw)."""
    images, key, p, ids, heldout = audit.images, audit.key, audit.patch_size, audit.ids, audit.heldout
    N, L, known_pairs = audit.blocks, audit.block_values, audit.known_pairs
    victims = images[heldout]
    rows = []
    for name, options in KNOWN_PLAINTEXT_CONFIGS:
        opts = dict(block_scramble=True, **options)
        encrypted = encrypt_patches(images, key, p, **opts, sample_ids=ids if options["per_sample"] else None)
        true_blocks = (key.sample_block_permutations(N, ids[:audit.n_attacker]) if options["per_sample"]
                       else key.block_permutation(N))
        for k in known_pairs:
            tables = recover_key_tables(images[:k], encrypted[:k], p, **opts)
            decrypted = tables.decrypt(encrypted[heldout], p)
            if options["per_sample"]:
                block_order = float((tables.pair_src_block == true_blocks[:k]).double().mean())
                decrypted = jigsaw_attack(decrypted, p, pixel_shuffle=False, negpos=False, per_sample=True,
                                          method=audit.method).reconstruction
            else:
                block_order = float((tables.src_block == true_blocks).double().mean())
            entry = dict(config=name, **opts, k=k, block_order=block_order,
                         pixel_permutation=float((tables.src_elem == key.pixel_permutation(L)).double().mean())
                         if options["pixel_shuffle"] else None,
                         negpos_mask=float((tables.flip == key.negpos_mask(L)).double().mean())
                         if options["negpos"] else None,
                         psnr=set_psnr(decrypted, victims), ssim=float(ssim(decrypted, victims).mean()),
                         exact_pixels=float((decrypted == victims).double().mean()),
                         exact_images=float((decrypted == victims).flatten(1).all(1).double().mean()),
                         received_psnr=set_psnr(encrypted[heldout], victims))
            rows.append(entry)
            if name == "block + pixel + negative-positive" and k in (known_pairs[0], known_pairs[-1]):
                audit.figure.append((f"known plaintext, k={k}", decrypted[:audit.figure_rows]))
            audit.log(f"known plaintext: {name}, k={k}: block order {_percent(block_order)}, held-out PSNR "
                      f"{_db(entry['psnr'])}")
    return rows


def dense_statistics_rows(audit: AuditRun) -> list:
    """Ciphertext-only statistics attack on the dense transform (each of :data:`DENSE_SPECS`), with the last
    quarter of the images as the attacker's same-domain public set."""
    shard_images, ids, public_images = audit.dense_split()
    audit.setup.update(dense_images=int(shard_images.shape[0]), dense_public_images=int(public_images.shape[0]))
    rows = []
    for spec in DENSE_SPECS:
        rows += statistics_rows(shard_images, audit.dense_cipher(spec), audit.key, spec, audit.patch_size,
                                sample_ids=ids, public=public_images, method=audit.method, config=spec.describe(),
                                figure_rows=audit.figure_rows, log=audit.log,
                                figure=audit.figure if not spec.per_sample else None)
    return rows


def dense_known_plaintext_table_rows(audit: AuditRun) -> list:
    """Known-plaintext recovery of the dense transform's block matrix, ``k`` swept up to the first ``k`` that
    recovers it."""
    shard_images, ids, _ = audit.dense_split()
    n = shard_images.shape[0]
    sweep = sorted({k for k in (1, 2, 4, 8, 16, 32) + tuple(audit.known_pairs) if k <= n // 2})
    heldout = torch.arange(max(sweep), min(n, max(sweep) + audit.max_heldout))
    rows = []
    for spec in DENSE_SPECS:
        rows += known_plaintext_rows(shard_images, audit.dense_cipher(spec), audit.key, spec, audit.patch_size,
                                     sample_ids=ids, known_pairs=sweep, heldout=heldout, method=audit.method,
                                     config=spec.describe(), log=audit.log, stop_when_recovered=True)
    return rows


def token_attack_rows(audit: AuditRun) -> list:
    """Token mode, for each width ``D``: position recovery and inversion with a public embedder, with a secret one
    (tokens only) and with ``k`` known pairs. A token shard's own ``D`` comes first, attacked on its items."""
    heldout, n_attacker = audit.heldout, audit.n_attacker
    dims = list(dict.fromkeys(int(d) for d in audit.token_dims))
    shard_tokens = None
    if audit.shard_mode() == "token":
        shard_dim = int(audit.shard.metadata.encryption["embed_dim"])
        dims = [shard_dim] + [d for d in dims if d != shard_dim]
        shard_tokens = audit.shard_view[heldout].float()
    rows = []
    for D in dims:
        from_shard = shard_tokens is not None and D == dims[0]
        rows_of_d = _token_rows(audit.images[heldout], audit.images[:n_attacker], audit.key, embed_dim=D,
                                patch_size=audit.patch_size, sample_ids=audit.ids[heldout],
                                known_ids=audit.ids[:n_attacker], known_pairs=audit.known_pairs, max_value=255.0,
                                received=shard_tokens if from_shard else None, figure=audit.figure,
                                figure_rows=audit.figure_rows, log=audit.log)
        for entry in rows_of_d:
            entry["source"] = "this shard" if from_shard else "simulated"
        rows += rows_of_d
    return rows


class Attack(NamedTuple):
    """One attack family of :func:`run_audit`: when ``applies_to(audit)``, ``run(audit)`` returns JSON-ready rows
    for the report's ``section`` list (an :class:`AuditReport` field); its time adds to
    ``setup["section_seconds"][timing or section]``."""

    name: str
    applies_to: Callable[[AuditRun], bool]
    run: Callable[[AuditRun], list]
    section: str
    timing: str = ""


def _always(audit: AuditRun) -> bool:
    return True


# In report order (the figure's columns follow it). A new attack: one function above and one row here (and, for a
# new section, a field of AuditReport and its table in to_markdown).
ATTACKS = (
    Attack("jigsaw on the shard's own items", lambda audit: audit.shard_mode() == "image", shard_jigsaw_rows,
           "jigsaw"),
    Attack("jigsaw reassembly", _always, jigsaw_rows, "jigsaw"),
    Attack("known-plaintext key tables", _always, known_plaintext_table_rows, "known_plaintext"),
    Attack("dense statistics attack", _always, dense_statistics_rows, "dense"),
    Attack("dense known plaintext", _always, dense_known_plaintext_table_rows, "dense_known_plaintext", "dense"),
    Attack("token attacks", _always, token_attack_rows, "tokens"),
)


def _run_attacks(audit: AuditRun) -> AuditReport:
    """Every row of :data:`ATTACKS` that applies to ``audit``, timed per section, into one report."""
    started = time.perf_counter()
    sections = {field.name: [] for field in dataclasses.fields(AuditReport) if field.name not in ("setup", "figure")}
    seconds = audit.setup["section_seconds"]
    for attack in ATTACKS:
        if attack.applies_to(audit):
            t0 = time.perf_counter()
            sections[attack.section] += attack.run(audit)
            timing = attack.timing or attack.section
            seconds[timing] = seconds.get(timing, 0.0) + time.perf_counter() - t0
    audit.setup["seconds"] = time.perf_counter() - started
    return AuditReport(setup=audit.setup, figure=audit.figure, **sections)


def _check_arguments(known_pairs, max_heldout: int, figure_rows: int) -> list:
    """The sorted distinct ``known_pairs``; raises ``ValueError`` naming a bad argument."""
    known_pairs = sorted({int(k) for k in known_pairs})
    if not known_pairs or known_pairs[0] < 1:
        raise ValueError(f"known_pairs must be positive ints, got {known_pairs!r}")
    for name, value in (("max_heldout", max_heldout), ("figure_rows", figure_rows)):
        check_positive_int(value, name)
    return known_pairs


def _shard_view(shard, images: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images of the shard, its items, first sample id)`` after checking that ``shard`` holds ``images``
    encoded with ``key``."""
    shard.check_key(key)
    meta = shard.metadata
    B, C, H, W = images.shape
    if meta.count > B or tuple(meta.image_size) != (H, W) or meta.channels != C:
        raise ValueError(f"shard holds {meta.count} items of {meta.channels}x{meta.image_size[0]}x"
                         f"{meta.image_size[1]} but images are {B} of {C}x{H}x{W}: pass the data it was "
                         "encoded from")
    sample_id_start = int(meta.encryption.get("sample_id_start", 0))
    images = images[:meta.count]
    items = shard[0:meta.count]
    _check_shard_matches(items, images, key, meta, sample_id_start)
    return images, items, sample_id_start


def _prepare(images, key, *, patch_size, known_pairs, token_dims, method, max_heldout, figure_rows,
             data_description, shard, log, backend) -> AuditRun:
    """Check the arguments (and the shard against ``images`` and ``key``) and set the audit up."""
    images = check_images(images, "images", patch_size if shard is None else shard.metadata.patch_size)
    require_key(key)
    known_pairs = _check_arguments(known_pairs, max_heldout, figure_rows)
    sample_id_start, shard_view = 0, None
    if shard is not None:
        images, shard_view, sample_id_start = _shard_view(shard, images, key)
        patch_size = shard.metadata.patch_size
    B, C, H, W = images.shape
    known_pairs = [k for k in known_pairs if k <= B // 2]
    if not known_pairs:
        raise ValueError(f"{B} images are too few for a known-plaintext study (k <= B / 2 is needed)")
    audit = AuditRun(images=images, key=key, patch_size=patch_size,
                       ids=torch.arange(sample_id_start, sample_id_start + B, dtype=torch.int64),
                       known_pairs=known_pairs, token_dims=list(token_dims), method=method, max_heldout=max_heldout,
                       figure_rows=figure_rows, backend=backend, log=log or (lambda line: None), shard=shard,
                       shard_view=shard_view, setup={}, figure=[])
    audit.figure.append(("plain", images[audit.heldout[:figure_rows]]))
    audit.setup.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), msd_fast=_version(),
        torch=torch.__version__, threads=torch.get_num_threads(), data=data_description, images=B,
        image_shape=[C, H, W], patch_size=patch_size, grid=list(audit.grid), blocks=audit.blocks,
        block_values=audit.block_values, key_fingerprint=key.fingerprint, known_pairs=known_pairs,
        token_dims=list(token_dims), method=method, jigsaw_images=B, attacker_images=audit.n_attacker,
        heldout_images=len(audit.heldout), shard=None if shard is None else os.path.basename(shard.path),
        seconds=0.0, section_seconds={})
    return audit


def _check_shard_matches(items: torch.Tensor, images: torch.Tensor, key: Key, meta, sample_id_start: int) -> None:
    """Refuse a shard that was not encoded from ``images`` with ``key`` in this order (its first items are
    re-encoded and compared: exactly for images, within float16 rounding for tokens)."""
    n = min(4, len(images))
    ids = torch.arange(sample_id_start, sample_id_start + n, dtype=torch.int64)
    e = meta.encryption
    if meta.mode == "image":
        expected = encrypt_patches(images[:n], key, meta.patch_size, block_scramble=e["block_scramble"],
                                   pixel_shuffle=e["pixel_shuffle"], negpos=e["negpos"], max_value=e["max_value"],
                                   per_sample=e["per_sample"], sample_ids=ids if e["per_sample"] else None)
        same = torch.equal(expected, items[:n])
    else:
        C, H, W = images.shape[1:]
        embedder = TokenEmbedder.from_key(key, patch_size=meta.patch_size, in_chans=C, image_size=(H, W),
                                          embed_dim=int(e["embed_dim"]), max_value=255.0)
        with torch.no_grad():
            expected = permute_tokens(embedder(images[:n]), key, ids)
        same = bool(torch.allclose(expected, items[:n].float(), rtol=1e-2, atol=2e-2))
    if not same:
        raise ValueError(NOT_THESE_IMAGES)


def _describe(options: dict) -> str:
    parts = ["per-sample block" if options["per_sample"] else "block"]
    if options["pixel_shuffle"]:
        parts.append("pixel")
    if options["negpos"]:
        parts.append("negative-positive")
    return " + ".join(parts)


def _version() -> str:
    from ... import __version__
    return __version__
