"""Every setting of server-side pretraining, with its default and help text: one dataclass that is also the CLI.

Defaults follow DINO's (facebookresearch/dino) where they carry over, scaled for small medical datasets where a
measurement said so (see DESIGN.md): BatchNorm in the head (short runs collapse without it), a smaller ``out_dim``,
a faster teacher momentum for runs of hundreds rather than hundreds of thousands of steps, and masked-sampling views
(2 global views keeping 60 % of the tokens, 8 local views keeping 25 %) instead of image crops.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from ..checks import require
from ..settings import flag


@dataclass
class PretrainConfig:
    shards: list = flag(None, "shard files or shard-set folders uploaded by the clients (same geometry and key "
                              "fingerprint)", positional=True)
    out: str = flag("pretrain_out", "output folder: checkpoint.pt, log.jsonl, loss_curve.png")
    arch: str = flag("vit_tiny_patch16_224", "any timm VisionTransformer name (patch and image size come from "
                                           "the shards)")
    depth: Optional[int] = flag(None, "override the architecture's depth", default_text="--arch's")
    embed_dim: Optional[int] = flag(None, "override the embedding width (token mode: must equal the shards' D)",
                                default_text="--arch's")
    num_heads: Optional[int] = flag(None, "override the number of attention heads", default_text="--arch's")
    drop_path: float = flag(0.1, "stochastic depth rate of the student")
    out_dim: int = flag(4096, "DINO head output size K (DINO: 65536; smaller suits small datasets)")
    head_hidden_dim: int = flag(2048, "DINO head MLP width")
    head_bottleneck_dim: int = flag(256, "DINO head bottleneck width")
    head_layers: int = flag(3, "DINO head MLP depth")
    use_bn_in_head: bool = flag(True, "BatchNorm in the head MLP (needed for short runs to not collapse)")
    norm_last_layer: bool = flag(True, "freeze the weight-norm gain of the last layer (DINO default)")
    global_views: int = flag(2, "global masked views (seen by teacher and student)")
    global_keep: float = flag(0.6, "fraction of patch tokens a global view keeps")
    local_views: int = flag(8, "local masked views (student only; 0 for none)")
    local_keep: float = flag(0.25, "fraction of patch tokens a local view keeps")
    teacher_views: str = flag("global", "what the teacher sees: the global views (DINO) or all tokens (MSN-style)",
                              choices=("global", "all"))
    contrast: float = flag(0.0, "student inputs: contrast scaled about mid-grey by a random factor in [1-c, 1+c] "
                                "per image (commutes with the encryption)")
    noise: float = flag(0.0, "student inputs: i.i.d. Gaussian noise, std as a fraction of the value range")
    embed_optimizer: str = flag("rowwise", "second moment of the patch-embedding weight: rowwise (shared per output "
                                           "row: the update does not depend on the key's basis) or adamw",
                                choices=("rowwise", "adamw"))
    epochs: int = flag(30, "training epochs")
    batch_size: int = flag(64, "global batch size (split evenly over processes)")
    lr: float = flag(5e-4, "peak learning rate at batch size 256, scaled linearly with the batch size (DINO)")
    min_lr: float = flag(1e-6, "final learning rate of the cosine schedule")
    warmup_epochs: Optional[int] = flag(None, "linear learning-rate warm-up epochs", default_text="min(3, --epochs)")
    weight_decay: float = flag(0.04, "initial weight decay (cosine schedule)")
    weight_decay_end: float = flag(0.4, "final weight decay")
    momentum_teacher: float = flag(0.99, "initial teacher EMA momentum, cosine to 1 (DINO: 0.996 for long runs)")
    teacher_temp: float = flag(0.04, "teacher temperature after warm-up")
    warmup_teacher_temp: float = flag(0.04, "initial teacher temperature")
    warmup_teacher_temp_epochs: int = flag(0, "teacher temperature warm-up epochs")
    student_temp: float = flag(0.1, "student temperature")
    center_momentum: float = flag(0.9, "EMA momentum of the teacher center")
    centering: str = flag("ema", "teacher centering", choices=("ema", "sinkhorn_knopp"))
    fused_head: bool = flag(False, "run the DINO head's last layer inside the loss, over chunks of samples, so the "
                                   "[views x batch x out_dim] logits are never stored whole (the same loss; less "
                                   "memory at a large --out-dim)")
    clip_grad: float = flag(3.0, "clip the gradient norm to this (0: no clipping)")
    freeze_last_layer: int = flag(1, "epochs during which the head's last layer is not updated")
    precision: str = flag("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16", choices=("auto", "fp32",
                                                                                                  "bf16"))
    compile: bool = flag(False, "torch.compile the student's and teacher's backbone on the views (patch embedding, "
                                "fused masked_gather, blocks, norm; the head stays eager): the first steps compile "
                                "(seconds to a minute), later ones run the fused graphs; the weights match eager "
                                "training up to float rounding, but drop path draws from the compiler's own random "
                                "stream")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    seed: int = flag(0, "seed of data order, views and initialisation")
    log_every: int = flag(10, "log every N steps; the steps' losses are read from the device (one sync) and checked "
                                "to be finite only then")
    resume: bool = flag(False, "continue from OUT/checkpoint.pt (exactly: same result as an uninterrupted run)")
    progress: bool = flag(True, "tqdm progress bar (on terminals, rank 0)")

    def __post_init__(self):
        """Refuse settings that cannot train, naming the flag (before any work); resolve the default warm-up."""
        self._check_shards()
        for name in ("epochs", "batch_size", "global_views", "out_dim", "head_hidden_dim", "head_bottleneck_dim",
                     "head_layers", "log_every"):
            require(self, name, lambda v: v >= 1, ">= 1")
        for name in ("depth", "embed_dim", "num_heads"):
            require(self, name, lambda v: v is None or v >= 1, ">= 1")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"--embed-dim {self.embed_dim} must be divisible by --num-heads {self.num_heads}")
        for name in ("local_views", "freeze_last_layer"):
            require(self, name, lambda v: v >= 0, ">= 0")
        for name in ("lr", "teacher_temp", "warmup_teacher_temp", "student_temp"):
            require(self, name, lambda v: 0 < v < math.inf, "a positive finite number")
        for name in ("min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            require(self, name, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        for name in ("global_keep", "local_keep"):
            require(self, name, lambda v: 0 < v <= 1, "in (0, 1]")
        for name in ("momentum_teacher", "center_momentum", "noise"):
            require(self, name, lambda v: 0 <= v <= 1, "in [0, 1]")
        for name in ("drop_path", "contrast"):
            require(self, name, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.teacher_views not in ("global", "all"):
            raise ValueError(f"--teacher-views must be 'global' or 'all', got {self.teacher_views!r}")
        if self.warmup_epochs is None:
            self.warmup_epochs = min(3, self.epochs)
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            require(self, name, lambda v: 0 <= v <= self.epochs, f"in [0, --epochs {self.epochs}]")

    def _check_shards(self) -> None:
        if not self.shards:
            raise ValueError("shards: give at least one shard file")
        seen = {}
        for path in self.shards:
            real = os.path.realpath(path)
            if real in seen:
                raise ValueError(f"shards: {seen[real]} and {path} are the same file; give each shard once")
            seen[real] = path

    def model_overrides(self) -> dict:
        """Architecture overrides passed to ``timm.create_model``."""
        return {k: getattr(self, k) for k in ("depth", "embed_dim", "num_heads") if getattr(self, k) is not None}

    # Settings that may change on --resume without changing the result.
    RUNTIME_ONLY = ("out", "device", "resume", "progress", "log_every")
