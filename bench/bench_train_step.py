"""End-to-end throughput: images/s of one masked-sampling-distillation (MS-DINO) training step -- the server's own
networks (``msd_fast.server``: timm ViT + DINO head with BatchNorm, ``MaskedSamplingNet``) -- with our kernels
(``backend="auto"``) vs the same step with every op forced to ``"reference"``, in the same run.

One step, as ``msd-fast pretrain`` runs it on a batch of (encrypted) images ``[B, 3, 224, 224]``: ``sample_views``
(2 global views keeping 0.5, 8 local views keeping 0.2) -> student on all views and EMA teacher on the global views,
each through ``forward_views`` (fused ``masked_gather`` + the ViT's blocks, norm, class token) and the DINO head ->
``DINOLoss`` (fused ``dino_loss``, EMA center) -> backward -> AdamW (DINO's parameter groups) -> EMA teacher update.
GPU: ViT-S/16, B = 64, K = 65536, bfloat16 autocast (as the pretraining loop runs on GPUs). CPU: ViT-Ti/16, B = 4,
K = 4096, float32 (a 2-core machine cannot run the GPU configuration in a benchmark's time). ``items`` in
``extra_info`` is B, so the report shows images/s.
"""
import contextlib

import pytest
import torch

from msd_fast import DINOLoss, sample_views
from msd_fast.backends import resolve_backend
from msd_fast.server.model import DINOHead, MaskedSamplingNet, create_backbone
from msd_fast.server.trainer import parameter_groups

from bench.common import DEVICE, describe, synchronize

if DEVICE == "cuda":
    ARCH, BATCH, OUT_DIM, AUTOCAST, ROUNDS = "vit_small_patch16_224", 64, 65536, torch.bfloat16, 10
else:
    ARCH, BATCH, OUT_DIM, AUTOCAST, ROUNDS = "vit_tiny_patch16_224", 4, 4096, None, 5
GLOBAL_VIEWS, GLOBAL_KEEP, LOCAL_VIEWS, LOCAL_KEEP = 2, 0.5, 8, 0.2
TEACHER_MOMENTUM = 0.996


def network(backend: str) -> MaskedSamplingNet:
    backbone = create_backbone(ARCH, image_size=(224, 224), patch_size=16, in_chans=3, token_mode=False)
    return MaskedSamplingNet(backbone, DINOHead(backbone.embed_dim, OUT_DIM), token_mode=False, backend=backend)


def make_training_step(backend: str):
    """One MS-DINO training step on a fixed batch, every op on ``backend``; returns ``step() -> loss``."""
    torch.manual_seed(0)
    student, teacher = network(backend).to(DEVICE), network(backend).to(DEVICE)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(OUT_DIM, GLOBAL_VIEWS + LOCAL_VIEWS, GLOBAL_VIEWS, n_epochs=1, backend=backend).to(DEVICE)
    optimizer = torch.optim.AdamW(parameter_groups(student, rowwise_embed=False), lr=1e-4, weight_decay=0.04)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    images = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    n_tokens = student.backbone.patch_embed.num_patches
    generator = torch.Generator(DEVICE).manual_seed(0)
    precision = (lambda: torch.autocast(DEVICE, dtype=AUTOCAST)) if AUTOCAST is not None else contextlib.nullcontext

    def step() -> torch.Tensor:
        global_idx = sample_views(BATCH, n_tokens, GLOBAL_VIEWS, GLOBAL_KEEP, generator=generator, device=DEVICE)
        local_idx = sample_views(BATCH, n_tokens, LOCAL_VIEWS, LOCAL_KEEP, generator=generator, device=DEVICE)
        with precision():
            student_out = student(images, [global_idx, local_idx])
            with torch.no_grad():
                teacher_out = teacher(images, [global_idx])
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
