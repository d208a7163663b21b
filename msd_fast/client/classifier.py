"""Client-side classifiers built from an exported backbone (or from scratch, for the baselines).

An :class:`ImageClassifier` takes raw uint8-range images ``[B, C, H, W]`` and returns logits ``[B, n_classes]``:

* ``plain`` domain (default): the model trained on encrypted images is turned into a plain-image model with
  :func:`~msd_fast.decrypt_vit` (exact), with the client's input standardisation folded in.
* ``encrypted`` domain: the model is kept as trained; the classifier encrypts its inputs with the key first.
* token mode: the key-derived :class:`~msd_fast.protocol.token_embedding.TokenEmbedder` feeds the exported blocks.
* random init (baselines): the same architecture, freshly initialised, on standardised plain images.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..protocol.encryption import EncryptionSpec
from ..keys import Key, check_key_matches
from ..server.export import load_exported
from ..protocol.token_embedding import TokenEmbedder
from ..vit import build_vit, decrypt_vit, forward_views

DOMAINS = ("plain", "encrypted")


class ImageClassifier(nn.Module):
    """``logits = vit(standardise(prepare(x)))``; ``features(x)`` gives the pooled backbone features instead."""

    def __init__(self, vit: VisionTransformer, *, mean: float = 0.0, std: float = 1.0,
                 encryption: Optional[EncryptionSpec] = None, patch_size: Optional[int] = None,
                 embedder: Optional[TokenEmbedder] = None, key: Optional[Key] = None):
        super().__init__()
        self.vit, self.embedder, self._encryption, self._key = vit, embedder, encryption, key
        self._patch_size = patch_size
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def _tokens_forward(self, x: torch.Tensor, head: bool) -> torch.Tensor:
        tokens = self.embedder(x)
        B, N, _ = tokens.shape
        every_token = torch.arange(N, device=tokens.device).expand(1, B, N)
        saved, self.vit.head = self.vit.head, (self.vit.head if head else nn.Identity())
        try:
            return forward_views(self.vit, tokens, every_token)
        finally:
            self.vit.head = saved

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self._encryption is not None:
            x = self._encryption.encrypt(x, self._key, self._patch_size)
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedder is not None:
            return self._tokens_forward(x, head=True)
        return self.vit(self._prepare(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (class-token) features ``[B, D]`` of the backbone."""
        if self.embedder is not None:
            return self._tokens_forward(x, head=False)
        return self.vit.forward_head(self.vit.forward_features(self._prepare(x)), pre_logits=True)


def checked_export(path: str, key: Key) -> tuple[VisionTransformer, dict]:
    """``load_exported(path)``: the exported backbone and its metadata; ``ValueError`` if ``key`` is not the one it
    was pretrained with (:func:`~msd_fast.keys.check_key_matches`; ``TypeError`` if it is no key)."""
    vit, metadata = load_exported(path)
    check_key_matches(key, metadata["key_fingerprint"], f"{path} was pretrained")
    return vit, metadata


def token_embedder(metadata: dict, key: Key, embed_dim: int) -> TokenEmbedder:
    """The consortium's key-derived :class:`TokenEmbedder` for a token-mode export's geometry."""
    H, W = metadata["image_size"]
    return TokenEmbedder.from_key(key, patch_size=metadata["patch_size"], in_chans=metadata["channels"],
                                  image_size=(H, W), embed_dim=embed_dim)


def decrypted_backbone(path: str, key: Key, *, mean: float, std: float) -> tuple[VisionTransformer, dict]:
    """``(plain-image ViT, metadata)`` of an image-mode export: :func:`~msd_fast.decrypt_vit` with the key (exact),
    taking ``(x - mean) / std`` of raw pixel values ``x``; no classifier (``num_classes=0``). ``ValueError`` for a
    wrong key or a token-mode export (its plain model needs the key-derived embedder: see
    :func:`~msd_fast.client.timm_export.plain_vit`)."""
    vit, metadata = checked_export(path, key)
    if metadata["mode"] == "token":
        raise ValueError(f"{path} is a token-mode export: its plain model is the key-derived embedder plus the "
                         "exported blocks")
    return _decrypt(vit, metadata, key, mean, std), metadata


def _decrypt(vit: VisionTransformer, metadata: dict, key: Key, mean: float, std: float) -> VisionTransformer:
    spec = EncryptionSpec.from_metadata(metadata["encryption"])
    return decrypt_vit(vit, key, metadata["patch_size"], **spec.vit_options(), mean=mean, std=std)


def pretrained_classifier(path: str, key: Key, n_classes: int, *, mean: float, std: float,
                          domain: str = "plain", seed: int = 0) -> ImageClassifier:
    """The client's classifier from an exported backbone (see the module docstring); a fresh linear head with
    ``n_classes`` outputs, initialised from ``seed`` (so a fine-tuning run is reproducible, and the plain and
    encrypted domains start from the same head). ``mean``/``std``: the client's scalar input standardisation (raw
    pixel units); unused in token mode, where the key-derived embedder scales its inputs itself. Raises
    ``ValueError`` if ``key`` is not the one the backbone was pretrained with (``TypeError`` if it is no key)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    vit, metadata = checked_export(path, key)
    if metadata["mode"] == "token":
        embedder = token_embedder(metadata, key, vit.embed_dim)
        torch.manual_seed(seed)
        vit.reset_classifier(n_classes)
        return ImageClassifier(vit, embedder=embedder)
    spec = EncryptionSpec.from_metadata(metadata["encryption"])
    if domain == "plain":
        classifier = ImageClassifier(_decrypt(vit, metadata, key, mean, std), mean=mean, std=std)
    elif spec.per_sample:
        raise ValueError(f"{path} was pretrained on per-sample block orders: its encrypted domain has no fixed "
                         "order to encrypt new images with; use the plain domain")
    else:  # the exported model takes raw ciphertext
        classifier = ImageClassifier(vit, encryption=spec, patch_size=metadata["patch_size"], key=key)
    torch.manual_seed(seed)
    classifier.vit.reset_classifier(n_classes)
    return classifier


def random_classifier(arch: str, n_classes: int, *, image_size, patch_size: int, in_chans: int, mean: float,
                      std: float, seed: int = 0, **model_kwargs) -> ImageClassifier:
    """The fine-tuning-only baseline: the same timm ViT, randomly initialised (seeded), on standardised images.
    ``image_size`` is ``(H, W)``; ``model_kwargs`` go to :func:`~msd_fast.vit.build_vit` (e.g. depth, embed_dim, num_heads)."""
    torch.manual_seed(seed)
    vit = build_vit(arch, num_classes=n_classes, img_size=tuple(image_size), patch_size=patch_size, in_chans=in_chans,
                    **model_kwargs)
    return ImageClassifier(vit, mean=mean, std=std)


def exported_architecture(metadata: dict) -> dict:
    """The ``random_arch`` of :func:`~msd_fast.evaluation.build_classifier` for the network of an exported backbone
    (its ``metadata``, see :func:`~msd_fast.server.load_exported`), so a random-init baseline is the same ViT.
    A token-mode backbone has no position embedding of its own (the key-derived embedder adds one); its baseline,
    which sees plain images, keeps timm's learned position embedding."""
    kwargs = {k: v for k, v in metadata["model_kwargs"].items()
              if k not in ("img_size", "patch_size", "in_chans", "num_classes", "pos_embed")}
    return dict(arch=metadata["arch"], image_size=tuple(metadata["image_size"]), patch_size=metadata["patch_size"],
                in_chans=metadata["channels"], **kwargs)
