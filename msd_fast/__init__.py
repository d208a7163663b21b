"""msd_fast: fused kernels for privacy-preserving, single-round masked sampling distillation of ViTs.

Public API (each op takes ``backend="auto"``; see :func:`backends`):

* :class:`Key` -- the consortium key (generate, derive, save/load, fingerprint).
* :func:`encrypt_blocks` / :func:`decrypt_blocks` -- the dense key-derived block transform (the default encryption).
* :func:`encrypt_patches` / :func:`decrypt_patches` -- block-wise permutation encryption (weaker; for comparison).
* :class:`EncryptionSpec` -- one description of a client's encryption (scheme and options), stored in shards.
* :func:`permute_tokens` / :func:`unpermute_tokens` -- per-sample token permutation (p-FeSTA mode).
* :func:`encrypt_vit` / :func:`decrypt_vit` -- the exact model-side key transform of a timm ViT.
* :func:`sample_views` / :func:`masked_gather` -- masked-sampling views: random kept-token indices, and one fused
  gather + position embedding + prefix tokens per call; :func:`forward_views` runs a timm ViT on them.
* :func:`dino_loss` / :class:`DINOLoss` -- the fused DINO self-distillation loss and its module (center, schedule).
* :func:`dino_head_loss` / :class:`LastLayerInput` -- the DINO head's last layer fused with the loss (the logits are
  never stored whole); ``DINOLoss`` takes ``LastLayerInput`` in place of logits to use it.
"""
from . import _moved
from .backends import BackendStatus, BackendUnavailableError, backends
from .server.dino import DINOLoss
from .protocol.encryption import EncryptionSpec
from .keys import Key
from .ops.block_mixing import decrypt_blocks, encrypt_blocks
from .ops.dino_head_loss import LastLayerInput, dino_head_loss
from .ops.dino_loss import dino_loss
from .ops.masked_gather import masked_gather, sample_views
from .ops.patch_encryption import decrypt_patches, encrypt_patches
from .ops.token_permutation import permute_tokens, unpermute_tokens
from .vit import decrypt_vit, encrypt_vit, forward_views

__version__ = "0.1.0"

_moved.install()

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "DINOLoss",
    "EncryptionSpec",
    "Key",
    "LastLayerInput",
    "backends",
    "decrypt_blocks",
    "decrypt_patches",
    "decrypt_vit",
    "dino_head_loss",
    "dino_loss",
    "encrypt_blocks",
    "encrypt_patches",
    "encrypt_vit",
    "forward_views",
    "masked_gather",
    "permute_tokens",
    "sample_views",
    "unpermute_tokens",
]
