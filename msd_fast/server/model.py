"""The networks of masked sampling distillation: a timm ViT backbone and DINO's projection head.

``MaskedSamplingNet`` is what the server trains (student) and averages (teacher): raw inputs (encrypted images or
client-embedded tokens) -> patch tokens -> one fused :func:`~msd_fast.forward_views` per view group -> class-token
features -> :class:`DINOHead` logits, all views concatenated view-major. Wrapping the whole step in one module's
``forward`` is what lets ``DistributedDataParallel`` see it. With ``compiled=True`` the forward runs the features
(patch embedding, ``masked_gather``, blocks, norm) through :func:`compiled_features`; the module itself is not
wrapped, so its ``state_dict`` keys stay those of the eager network.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..ops.dino_head_loss import LastLayerInput
from ..ops.masked_gather import mark_index_range
from ..vit import build_vit, forward_views


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose batch statistics cover every process's batch (gloo or NCCL, CPU or GPU), so a DDP run
    normalises exactly like one process holding the global batch. Statistics are computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        values = x.float()
        # the count is filled on the device: new_tensor([...]) would copy from the host and synchronise the stream
        stats = torch.cat([values.sum(0), (values * values).sum(0), values.new_full((1,), values.shape[0])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = dist_nn.all_reduce(stats)  # differentiable: the backward all-reduces the gradient too
        d = values.shape[1]
        count = stats[-1]
        mean = stats[:d] / count
        var = (stats[d:2 * d] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
            self.num_batches_tracked += 1
        y = (values - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


class NormalizedLinear(nn.Module):
    """DINO's weight-normalised last layer: ``y = normalize(x) @ (g * v / |v|).T`` with one gain per output.
    ``g`` starts at 1 and is frozen when ``norm_last_layer`` (DINO's default)."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def inputs(self, x: torch.Tensor) -> LastLayerInput:
        """What the layer multiplies: ``normalize(x) [M, in_dim]`` and the weight ``g * v / |v| [out_dim, in_dim]``."""
        return LastLayerInput(nn.functional.normalize(x, dim=-1),
                              self.weight_g * nn.functional.normalize(self.weight_v, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(*self.inputs(x))


class DINOHead(nn.Module):
    """DINO projection head: MLP (``n_layers`` linear layers, GELU, optional BatchNorm) to a ``bottleneck_dim``
    feature, L2-normalised, then a weight-normalised linear layer to ``out_dim`` logits. ``[M, in_dim] -> [M, out]``."""

    def __init__(self, in_dim: int, out_dim: int, *, use_bn: bool = True, norm_last_layer: bool = True,
                 n_layers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            hidden = i < n_layers - 1
            # A bias right before BatchNorm is removed by it (its gradient is exactly zero): leave it out.
            layers.append(nn.Linear(a, b, bias=not (hidden and use_bn)))
            if hidden:
                layers += ([GlobalBatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, x: torch.Tensor, last_layer: bool = True):
        """Logits ``[M, out_dim]``, or with ``last_layer=False`` the last layer's :class:`LastLayerInput`."""
        hidden = self.mlp(x)
        return self.last_layer(hidden) if last_layer else self.last_layer.inputs(hidden)


def create_backbone(arch: str, *, image_size: Sequence[int], patch_size: int, in_chans: int, token_mode: bool,
                    drop_path_rate: float = 0.0, **overrides) -> VisionTransformer:
    """A timm ViT by name without classifier (``num_classes=0``), for this geometry. In token mode the clients
    already added a (key-derived) position embedding, so the model has none (``pos_embed='none'``)."""
    kwargs = dict(num_classes=0, img_size=tuple(image_size), patch_size=patch_size, in_chans=in_chans,
                  drop_path_rate=drop_path_rate, **overrides)
    if token_mode:
        kwargs["pos_embed"] = "none"
    model = build_vit(arch, **kwargs)
    if model.cls_token is None or model.global_pool != "token":
        raise ValueError(f"--arch {arch!r}: masked sampling distillation uses the class token (global_pool='token')")
    return model


class MaskedSamplingNet(nn.Module):
    """Backbone + DINO head run on masked-sampling views.

    ``forward(inputs, views)``: ``inputs`` is ``[B, C, H, W]`` raw encrypted images (any dtype; standardised with
    the fixed scalars ``input_mean``/``input_std``) or, in token mode, ``[B, N, D]`` tokens; ``views`` a list of
    ``[V_i, B, K_i]`` index tensors. Returns ``[sum_i V_i * B, out_dim]`` float logits, view-major, or with
    ``last_layer=False`` the head's :class:`~msd_fast.ops.dino_head_loss.LastLayerInput` (features in the autocast
    dtype when autocast is on, else float32), for the fused head + loss. ``backend`` is the
    :func:`~msd_fast.masked_gather` backend; ``compiled`` runs ``forward``'s features under
    :func:`compiled_features` (direct :meth:`features` calls, e.g. the monitors', stay eager).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead, *, token_mode: bool, input_mean: float = 0.0,
                 input_std: float = 1.0, backend: str = "auto", compiled: bool = False):
        super().__init__()
        self.backbone, self.head, self.token_mode, self.backend = backbone, head, token_mode, backend
        self.compiled = compiled
        self.register_buffer("input_mean", torch.tensor(float(input_mean)))
        self.register_buffer("input_std", torch.tensor(float(input_std)))

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` patch tokens (before the position embedding) of a batch."""
        if self.token_mode:
            return inputs.float()
        x = (inputs.float() - self.input_mean) / self.input_std
        tokens = self.backbone.patch_embed(x)
        return tokens.flatten(1, 2) if tokens.dim() == 4 else tokens

    def all_tokens(self, batch_size: int, num_tokens: int, device) -> torch.Tensor:
        """The view that keeps every token: ``[1, batch_size, num_tokens]``, marked in range."""
        every = torch.arange(num_tokens, device=device).expand(1, batch_size, num_tokens)
        return mark_index_range(every, num_tokens)

    def features(self, inputs: torch.Tensor, views: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Class-token features of the backbone ``[sum_i V_i * B, D]`` on ``views`` (default: all tokens)."""
        tokens = self.tokens(inputs)
        if views is None:
            views = [self.all_tokens(tokens.shape[0], tokens.shape[1], tokens.device)]
        return torch.cat([forward_views(self.backbone, tokens, idx, backend=self.backend) for idx in views])

    def forward(self, inputs: torch.Tensor, views: Sequence[torch.Tensor], last_layer: bool = True):
        features = compiled_features()(self, inputs, views) if self.compiled else self.features(inputs, views)
        if last_layer:
            return self.head(features).float()
        head_input = self.head(features, last_layer=False)
        device = features.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        return LastLayerInput(head_input.features.to(dtype), head_input.weight)


@functools.cache
def compiled_features() -> Callable:
    """``MaskedSamplingNet.features`` under ``torch.compile`` (static shapes: a run's batch and view sizes are fixed),
    built once per process. Call as ``compiled_features()(net, inputs, views)``; the custom ops (``masked_gather``)
    are nodes of its graph, not graph breaks. The head stays eager: its BatchNorm all-reduces across processes."""
    return torch.compile(MaskedSamplingNet.features, dynamic=False)
