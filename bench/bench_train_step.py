"""End-to-end throughput: images/s of one masked-sampling-distillation (MS-DINO) training step, built only from the
public API, with our kernels (``backend="auto"``) vs the same loop with every op forced to ``"reference"``, in the
same run.

One step, as the server runs it on a batch of (encrypted) images ``[B, 3, 224, 224]``:
student and teacher patch embeddings -> ``sample_views`` (2 global views keeping 0.5, 8 local views keeping 0.2) ->
``forward_views`` (fused ``masked_gather`` + the timm ViT's blocks, norm, class token) -> DINO projection head ->
teacher on the global views, student on all views -> ``DINOLoss`` (fused ``dino_loss``, EMA center) -> backward ->
AdamW step -> EMA teacher update. GPU: ViT-S/16, B = 64, K = 65536, bfloat16 autocast (as DINO trains in mixed
precision). CPU: ViT-Ti/16, B = 4, K = 4096, float32 (a 2-core machine cannot run the GPU configuration in a
benchmark's time). ``items`` in ``extra_info`` is B, so the report shows images/s.

The model code is deliberately small; when the server pretraining loop (``msd_fast.pretrain``) lands, this benchmark
can time that loop instead.
"""
import contextlib
import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from msd_fast import DINOLoss, forward_views, sample_views
from msd_fast.backends import resolve_backend

from bench.common import DEVICE, describe, synchronize

if DEVICE == "cuda":
    ARCH, BATCH, OUT_DIM, AUTOCAST, ROUNDS = "vit_small_patch16_224", 64, 65536, torch.bfloat16, 10
else:
    ARCH, BATCH, OUT_DIM, AUTOCAST, ROUNDS = "vit_tiny_patch16_224", 4, 4096, None, 5
GLOBAL_VIEWS, GLOBAL_KEEP, LOCAL_VIEWS, LOCAL_KEEP = 2, 0.5, 8, 0.2
TEACHER_MOMENTUM = 0.996


class ProjectionHead(nn.Module):
    """DINO's projection head: 3-layer MLP (GELU) to a 256-d bottleneck, L2 normalisation, weight-normalised
    linear layer to ``out_dim`` logits. ``[rows, in_dim] -> [rows, out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MaskedDistillation(nn.Module):
    """A ViT backbone (timm, no classifier) and its projection head; ``forward(tokens, idx)`` runs the views."""

    def __init__(self, arch: str, out_dim: int, backend: str):
        super().__init__()
        self.vit = timm.create_model(arch, pretrained=False, num_classes=0)
        self.head = ProjectionHead(self.vit.embed_dim, out_dim)
        self.backend = backend

    def forward(self, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``tokens: [B, N, D]`` patch embeddings, ``idx: [V, B, K]`` -> logits ``[V * B, out_dim]``."""
        return self.head(forward_views(self.vit, tokens, idx, backend=self.backend))


def make_training_step(backend: str):
    """One MS-DINO training step on a fixed batch, every op on ``backend``; returns ``step() -> loss``."""
    torch.manual_seed(0)
    student = MaskedDistillation(ARCH, OUT_DIM, backend).to(DEVICE)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(OUT_DIM, GLOBAL_VIEWS + LOCAL_VIEWS, GLOBAL_VIEWS, n_epochs=1, backend=backend).to(DEVICE)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    images = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    n_tokens = student.vit.patch_embed.num_patches
    generator = torch.Generator(DEVICE).manual_seed(0)
    precision = (lambda: torch.autocast(DEVICE, dtype=AUTOCAST)) if AUTOCAST is not None else contextlib.nullcontext

    def step() -> torch.Tensor:
        global_idx = sample_views(BATCH, n_tokens, GLOBAL_VIEWS, GLOBAL_KEEP, generator=generator, device=DEVICE)
        local_idx = sample_views(BATCH, n_tokens, LOCAL_VIEWS, LOCAL_KEEP, generator=generator, device=DEVICE)
        with precision():
            with torch.no_grad():
                teacher_out = teacher(teacher.vit.patch_embed(images), global_idx)
            tokens = student.vit.patch_embed(images)
            student_out = torch.cat([student(tokens, global_idx), student(tokens, local_idx)])
            loss = loss_fn(student_out, teacher_out, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - TEACHER_MOMENTUM)
        synchronize()
        return loss.detach()

    return step


@pytest.mark.parametrize("provider", ["auto", "reference"])
def bench_train_step(benchmark, provider):
    step = make_training_step(provider)
    loss = step()  # warm-up: cuDNN/cuBLAS heuristics, Triton JIT, allocator
    assert torch.isfinite(loss)
    device = torch.device(DEVICE)
    resolved = {op: resolve_backend(provider, device, op) for op in ("masked_gather", "dino_loss")}
    describe(benchmark, op="train_step", mode="forward_backward",
             shape=f"{ARCH} B={BATCH} K={OUT_DIM} views={GLOBAL_VIEWS}x{GLOBAL_KEEP}+{LOCAL_VIEWS}x{LOCAL_KEEP}",
             dtype=f"{str(AUTOCAST).replace('torch.', '')} autocast" if AUTOCAST is not None else "float32",
             provider=provider, items=BATCH, resolved_backends=resolved)
    loss = benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
