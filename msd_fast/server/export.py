"""Export the pretrained backbone as a timm-loadable safetensors state dict plus the metadata needed to use it.

The exported model is the EMA teacher's backbone (DINO evaluates the teacher). In image mode the server's input
standardisation is folded into the patch embedding, so the exported model takes *raw encrypted* images (pixel
values in ``[0, max_value]``, as float): the client turns it into a plain-image model with
``decrypt_vit(model, key, **encryption options)`` — exactly. In token mode it takes the key-derived
:class:`~msd_fast.protocol.token_embedding.TokenEmbedder`'s tokens (its own patch and position embedding are unused).
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from timm.models.vision_transformer import VisionTransformer

from ..atomic import atomic_write, refuse_existing
from ..vit import build_vit
from .checkpoint import load_checkpoint
from .model import create_backbone

EXPORT_FORMAT = "msd_fast.backbone"
EXPORT_VERSION = 1


def fold_standardization(backbone: VisionTransformer, mean: float, std: float) -> bool:
    """Make ``backbone(x)`` equal ``backbone_before((x - mean) / std)`` by rescaling the patch embedding (float64).
    Returns whether a patch-embedding bias had to be added (models built without one, e.g. ``pre_norm``)."""
    proj = backbone.patch_embed.proj
    added_bias = proj.bias is None
    weight = proj.weight.detach().double()
    bias = proj.bias.detach().double() if proj.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    if proj.bias is None:
        proj.bias = torch.nn.Parameter(torch.zeros(weight.shape[0], dtype=proj.weight.dtype))
    with torch.no_grad():
        proj.weight.copy_(weight / std)
        proj.bias.copy_(bias - mean / std * weight.sum(dim=(1, 2, 3)))
    return added_bias


def export_backbone(checkpoint: str, out: str, *, overwrite: bool = False) -> dict:
    """Write the teacher backbone of ``checkpoint`` to ``out`` (safetensors, atomically); returns the metadata."""
    if not overwrite:
        refuse_existing(out)
    state = load_checkpoint(checkpoint)
    config, data = state["config"], state["data"]
    token_mode = data["mode"] == "token"
    overrides = {k: config[k] for k in ("depth", "embed_dim", "num_heads") if config[k] is not None}
    if token_mode:
        overrides["embed_dim"] = data["item_shape"][1]
    model_kwargs = dict(img_size=list(data["image_size"]), patch_size=data["patch_size"], in_chans=data["channels"],
                        num_classes=0, **overrides, **({"pos_embed": "none"} if token_mode else {}))
    backbone = create_backbone(config["arch"], image_size=data["image_size"], patch_size=data["patch_size"],
                               in_chans=data["channels"], token_mode=token_mode, **overrides)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state["teacher"].items() if k.startswith(prefix)})
    added_bias = not token_mode and fold_standardization(backbone, *state["input_stats"])
    metadata = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "arch": config["arch"],
                "model_kwargs": model_kwargs, "mode": data["mode"], "patch_size": data["patch_size"],
                "image_size": list(data["image_size"]), "channels": data["channels"],
                "key_fingerprint": data["key_fingerprint"], "encryption": data["encryption"],
                "patch_embed_bias_added": added_bias, "epochs": state["epoch"],
                "input": ("tokens of the key-derived TokenEmbedder" if token_mode
                          else "raw encrypted images, values in [0, max_value]")}
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_write(out, overwrite=overwrite) as handle:
        handle.write(safetensors_bytes(tensors, metadata={"msd_fast": json.dumps(metadata)}))
    return metadata


def read_export_metadata(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get("msd_fast")
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError (not a ValueError) for foreign files
        raise ValueError(f"{path} is not a safetensors file (an msd_fast exported backbone): {error}") from None
    if raw is None:
        raise ValueError(f"{path} is not an msd_fast exported backbone")
    metadata = json.loads(raw)
    if metadata.get("format") != EXPORT_FORMAT or metadata.get("version") != EXPORT_VERSION:
        raise ValueError(f"{path}: unsupported export format/version")
    return metadata


def load_exported(path: str) -> tuple[VisionTransformer, dict]:
    """``(timm VisionTransformer with the pretrained weights, metadata)`` of an exported backbone."""
    from safetensors.torch import load_file

    metadata = read_export_metadata(path)
    model = build_vit(metadata["arch"], **metadata["model_kwargs"])
    if metadata["patch_embed_bias_added"] and model.patch_embed.proj.bias is None:
        model.patch_embed.proj.bias = torch.nn.Parameter(torch.zeros(model.embed_dim))
    model.load_state_dict(load_file(path), strict=True)
    return model, metadata
