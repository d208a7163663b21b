"""The client's decrypted model as a timm hub folder: ``config.json`` + ``model.safetensors``, loadable anywhere with
plain timm (no msd_fast)::

    model = timm.create_model("local-dir:<folder>", pretrained=True, num_classes=N)

The folder holds the *plain-image* backbone (no classifier): in image mode the export is decrypted with the key
(:func:`~msd_fast.decrypt_vit`: the position and patch-embedding transforms undone, exactly); in token mode the
key-derived :class:`~msd_fast.protocol.token_embedding.TokenEmbedder` becomes the ViT's own patch embedding and
position embedding (``no_embed_class=True``: the class token has none, as during pretraining). The input
normalisation is *recorded*, in timm's units: ``pretrained_cfg.mean/std`` apply to images scaled to ``[0, 1]``
(``uint8 / 255``), so timm's ``resolve_data_config`` + ``create_transform`` feed the model exactly what msd_fast's
decrypted model computes on the raw pixels.

``config.json`` follows timm's hub layout (``timm.models._hub.load_model_config_from_path``): ``architecture``,
``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (every constructor argument that differs from the
architecture's defaults, read from the built model, plus ``num_classes=0`` so a plain load is the backbone) and
``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``first_conv``,
``classifier``...), plus an ``msd_fast`` record of provenance (format, key fingerprint, encryption options; never the
key). Before anything is written, the folder's model is rebuilt from ``model_args`` with timm alone and the weights
loaded strictly, so a folder that timm would load differently is never written.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, Union

import timm
import torch
from safetensors.torch import save as safetensors_bytes
from timm.models.vision_transformer import VisionTransformer

from ..atomic import atomic_folder, refuse_existing
from ..keys import Key
from ..protocol.encryption import MAX_VALUE
from ..protocol.token_embedding import INPUT_SCALE
from ..server.export import read_export_metadata
from ..vit import build_vit
from .classifier import checked_export, decrypted_backbone, token_embedder

TIMM_FORMAT = "msd_fast.timm"
TIMM_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"  # the names timm's local-dir loader looks for
Stats = Union[float, Sequence[float]]


def _model_args(vit: VisionTransformer, metadata: dict) -> dict:
    """Constructor arguments that rebuild ``vit`` from ``metadata["arch"]`` (the architecture's own defaults fill the
    rest: mlp ratio, qkv bias, norms)."""
    args = {k: v for k, v in metadata["model_kwargs"].items() if k not in ("num_classes", "pos_embed")}
    first = vit.blocks[0]
    args.update(img_size=list(vit.patch_embed.img_size), patch_size=vit.patch_embed.patch_size[0],
                in_chans=vit.patch_embed.proj.in_channels, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                num_heads=first.attn.num_heads, class_token=vit.cls_token is not None,
                reg_tokens=vit.num_reg_tokens, no_embed_class=vit.no_embed_class, global_pool=vit.global_pool,
                pos_embed="none" if vit.pos_embed is None else "learn", num_classes=0)
    return args


def _fold_token_embedder(vit: VisionTransformer, metadata: dict, key: Key) -> VisionTransformer:
    """A plain timm ViT equal to ``embedder`` + the token-mode blocks: the embedder's weight becomes the patch
    embedding (zero bias), its position embedding the ViT's (patch rows only, ``no_embed_class=True``); inputs are
    normalised with mean 0.5, std 1/INPUT_SCALE in [0, 1] units, which is the embedder's own scaling."""
    embedder = token_embedder(metadata, key, vit.embed_dim)
    kwargs = dict(metadata["model_kwargs"], pos_embed="learn", no_embed_class=True, num_classes=0)
    plain = build_vit(metadata["arch"], **kwargs)
    if plain.patch_embed.proj.bias is None:
        raise ValueError(f"--arch {metadata['arch']!r} has no patch-embedding bias (pre_norm): timm cannot hold the "
                         "folded embedder")
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("patch_embed.")}
    state.update({"patch_embed.proj.weight": embedder.weight.clone(),
                  "patch_embed.proj.bias": torch.zeros(vit.embed_dim), "pos_embed": embedder.pos[None].clone()})
    plain.load_state_dict(state, strict=True)
    return plain


def plain_vit(path: str, key: Key, *, mean: Stats, std: Stats) -> tuple[VisionTransformer, dict, tuple, tuple]:
    """``(plain-image backbone, export metadata, timm mean, timm std)`` of an exported backbone ``path``.

    ``mean``/``std``: the input normalisation the model should expect, in raw pixel units (``[0, 255]``; scalar or
    one per channel; image mode only -- the fold is exact for any values, they set the scale fine-tuning starts
    from). The returned timm statistics are per channel, in ``[0, 1]`` units. ``ValueError`` for a wrong key."""
    metadata = read_export_metadata(path)
    channels = metadata["channels"]
    if metadata["mode"] == "token":
        vit, metadata = checked_export(path, key)
        return (_fold_token_embedder(vit, metadata, key), metadata, (0.5,) * channels,
                (1.0 / INPUT_SCALE,) * channels)
    timm_stats = []
    for name, value in (("mean", mean), ("std", std)):
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if len(values) == 1:
            values *= channels
        if len(values) != channels or not all(torch.isfinite(torch.tensor(values))):
            raise ValueError(f"{name} must be one finite number or {channels} (one per channel), got {value!r}")
        if name == "std" and any(v <= 0 for v in values):
            raise ValueError(f"std must be > 0, got {value!r}")
        timm_stats.append(tuple(v / MAX_VALUE for v in values))
    vit, metadata = decrypted_backbone(path, key, mean=list(mean) if isinstance(mean, (list, tuple)) else mean,
                                       std=list(std) if isinstance(std, (list, tuple)) else std)
    return vit, metadata, timm_stats[0], timm_stats[1]


def timm_config(vit: VisionTransformer, metadata: dict, mean: tuple, std: tuple) -> dict:
    """The ``config.json`` of the hub folder (see the module docstring)."""
    channels, (H, W) = vit.patch_embed.proj.in_channels, vit.patch_embed.img_size
    return {
        "architecture": metadata["arch"],
        "num_classes": 0,
        "num_features": vit.num_features,
        "global_pool": vit.global_pool,
        "model_args": _model_args(vit, metadata),
        "pretrained_cfg": {
            "tag": "msd_fast", "custom_load": False, "input_size": [channels, H, W], "fixed_input_size": True,
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "mean": list(mean),
            "std": list(std), "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
            "classifier": "head"},
        "msd_fast": {
            "format": TIMM_FORMAT, "version": TIMM_VERSION, "pretraining": "MS-DINO (masked sampling distillation)",
            "mode": metadata["mode"], "key_fingerprint": metadata["key_fingerprint"],
            "encryption": metadata["encryption"], "epochs": metadata["epochs"],
            "input": "plain images; timm's mean/std apply to pixel values / 255 (uint8 images, as encoded)"},
    }


def _check_rebuilds(config: dict, tensors: dict) -> None:
    """Rebuild the model from ``config`` with timm alone and load ``tensors`` strictly (``ValueError`` if not)."""
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--arch {config['architecture']!r}: timm does not rebuild the decrypted model from its "
                         f"arguments ({str(error).splitlines()[0]})") from None


def export_timm(path: str, key: Key, out: str, *, mean: Stats = 127.5, std: Stats = 63.75,
                overwrite: bool = False) -> dict:
    """Write the decrypted model of the exported backbone ``path`` as a timm hub folder ``out`` (atomically: a
    temporary folder renamed into place); returns the ``config.json`` dictionary. ``mean``/``std``: see
    :func:`plain_vit` (the defaults are timm's 0.5 / 0.25 in ``[0, 1]`` units). Refuses an existing ``out``
    (``FileExistsError``) unless ``overwrite``."""
    if not overwrite:
        refuse_existing(out)
    vit, metadata, timm_mean, timm_std = plain_vit(path, key, mean=mean, std=std)
    config = timm_config(vit, metadata, timm_mean, timm_std)
    tensors = {k: v.detach().float().contiguous() for k, v in vit.state_dict().items()}
    _check_rebuilds(config, tensors)
    with atomic_folder(out, overwrite=overwrite) as folder:
        with open(os.path.join(folder, WEIGHTS_NAME), "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
        with open(os.path.join(folder, CONFIG_NAME), "w") as handle:
            json.dump(config, handle, indent=2)
    return config
