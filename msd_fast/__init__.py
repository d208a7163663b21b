"""msd_fast: fused kernels for privacy-preserving, single-round masked sampling distillation of ViTs.

Public API (each op takes ``backend="auto"``; see :func:`backends`):

* :class:`Key` -- the consortium key (generate, derive, save/load, fingerprint).
* :func:`encrypt_patches` / :func:`decrypt_patches` -- block-wise image encryption for ViTs.
* :func:`permute_tokens` / :func:`unpermute_tokens` -- per-sample token permutation (p-FeSTA mode).
* :func:`encrypt_vit` / :func:`decrypt_vit` -- the exact model-side key transform of a timm ViT.
* :func:`dino_loss` / :class:`DINOLoss` -- the fused DINO self-distillation loss and its module (center, schedule).
"""
from .backends import BackendStatus, BackendUnavailableError, backends
from .dino import DINOLoss
from .keys import Key
from .ops.dino_loss import dino_loss
from .ops.patch_encryption import decrypt_patches, encrypt_patches

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "DINOLoss",
    "Key",
    "backends",
    "decrypt_patches",
    "dino_loss",
    "encrypt_patches",
]
