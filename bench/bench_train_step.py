"""End-to-end throughput: images/s of one masked-sampling-distillation (MS-DINO) training step as ``msd-fast
pretrain`` runs it -- :func:`~msd_fast.server.trainer.distillation_step` on the server's own networks -- by four
providers in the same run:

  ``reference``     every op forced to the eager reference (``backend="reference"``), eager;
  ``auto``          our kernels (``backend="auto"``), eager;
  ``compile``       the reference under the trainer's ``--compile`` (the reference's math traced into the graph);
  ``auto+compile``  our kernels under ``--compile`` (custom-op nodes inside the compiled graph);
  ``auto+fused-head``  our kernels, eager, with ``--fused-head`` (the head's last layer inside the loss).

One step: :func:`~msd_fast.server.views.draw_views` (2 global views keeping 0.5, 8 local views keeping 0.2, drawn
on the CPU and copied) -> student on all views and EMA teacher on the global views (``MaskedSamplingNet``: fused
``masked_gather`` + the ViT's blocks, norm, class token, DINO head with BatchNorm) -> ``DINOLoss`` (fused
``dino_loss``, EMA center) -> backward, gradient clipping, ``KeyInvariantAdamW`` -> EMA teacher update.
GPU: ViT-S/16, B = 64, K = 65536, bfloat16 autocast (as the pretraining loop runs on GPUs). CPU: ViT-Ti/16 at
depth 4, B = 4, K = 4096, float32 (a 2-core machine cannot run or compile the GPU configuration in a benchmark's
time). ``items`` in ``extra_info`` is B, so the report shows images/s; compiled providers record their
``compile_seconds`` (the warm-up steps).
"""
import time

import pytest
import torch

from msd_fast import DINOLoss
from msd_fast.backends import resolve_backend
from msd_fast.server.config import PretrainConfig
from msd_fast.server.model import DINOHead, MaskedSamplingNet, create_backbone
from msd_fast.server.optim import KeyInvariantAdamW
from msd_fast.server.trainer import distillation_step, parameter_groups
from msd_fast.server.views import draw_views

from bench.common import DEVICE, describe, group_name, skip_compile_failure, synchronize

if DEVICE == "cuda":
    ARCH, DEPTH, BATCH, OUT_DIM, ROUNDS = "vit_small_patch16_224", None, 64, 65536, 10
else:
    ARCH, DEPTH, BATCH, OUT_DIM, ROUNDS = "vit_tiny_patch16_224", 4, 4, 4096, 5
BF16 = DEVICE == "cuda"
# provider -> (backend of every op, the trainer's compile option, its fused_head option)
PROVIDERS = {"reference": ("reference", False, False), "auto": ("auto", False, False),
             "compile": ("reference", True, False), "auto+compile": ("auto", True, False),
             "auto+fused-head": ("auto", False, True)}


def step_config(fused_head: bool = False) -> PretrainConfig:
    """The pretraining settings of the benchmark (DINO's head, 2 + 8 views, no last-layer freezing)."""
    return PretrainConfig(shards=["<benchmark: no shards>"], depth=DEPTH, out_dim=OUT_DIM, global_views=2,
                          global_keep=0.5, local_views=8, local_keep=0.2, batch_size=BATCH, epochs=1,
                          freeze_last_layer=0, momentum_teacher=0.996, fused_head=fused_head)


def networks(config: PretrainConfig, backend: str, compiled: bool) -> tuple:
    """Student and teacher (same weights, teacher without drop path or gradients) on ``DEVICE``."""
    def network(drop_path: float) -> MaskedSamplingNet:
        backbone = create_backbone(ARCH, image_size=(224, 224), patch_size=16, in_chans=3, token_mode=False,
                                   drop_path_rate=drop_path, **config.model_overrides())
        head = DINOHead(backbone.embed_dim, config.out_dim)
        return MaskedSamplingNet(backbone, head, token_mode=False, backend=backend, compiled=compiled).to(DEVICE)
    student, teacher = network(config.drop_path), network(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def make_training_step(backend: str, compiled: bool, fused_head: bool = False):
    """One MS-DINO step (:func:`distillation_step`) on a fixed batch, every op on ``backend``, the networks' features
    compiled when ``compiled``, the fused head + loss when ``fused_head``; returns ``step() -> loss``
    (synchronised)."""
    config = step_config(fused_head)
    torch.manual_seed(0)
    student, teacher = networks(config, backend, compiled)
    loss_fn = DINOLoss(OUT_DIM, config.global_views + config.local_views, config.global_views, n_epochs=1,
                       backend=backend).to(DEVICE)
    optimizer = KeyInvariantAdamW(parameter_groups(student, rowwise_embed=True))
    images = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    n_tokens = student.backbone.patch_embed.num_patches
    steps = iter(range(10 ** 9))

    def step() -> float:
        index = next(steps)
        views = draw_views(config, n_tokens, index, 0, BATCH, torch.device(DEVICE))
        loss = distillation_step(student, teacher, loss_fn, optimizer, images, views, config, num_tokens=n_tokens,
                                 epoch=0, step=index, lr=1e-4, weight_decay=0.04, momentum=0.996, bf16=BF16)
        synchronize()
        return loss

    return step


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_train_step(benchmark, provider):
    backend, compiled, fused_head = PROVIDERS[provider]
    shape = f"{ARCH}{f' depth {DEPTH}' if DEPTH else ''} B={BATCH} K={OUT_DIM} views=2x0.5+8x0.2"
    dtype = "bfloat16 autocast" if BF16 else "float32"
    if compiled:
        torch._dynamo.reset()  # this provider's graphs only, never past the recompile limit
    step = make_training_step(backend, compiled, fused_head)
    start = time.perf_counter()
    try:  # warm-up (distillation_step raises on a non-finite loss): cuDNN/cuBLAS heuristics, Triton JIT, allocator,
        step()  # and the compiled graphs (student's and teacher's)
    except Exception as error:
        if not compiled:
            raise
        skip_compile_failure(group_name("train_step", "forward_backward", shape, dtype), error)
    warm_up_seconds = time.perf_counter() - start
    resolved = {op: resolve_backend(backend, torch.device(DEVICE), op) for op in ("masked_gather", "dino_loss")}
    describe(benchmark, op="train_step", mode="forward_backward", shape=shape, dtype=dtype, provider=provider,
             items=BATCH, resolved_backends=resolved,
             **({"compile_seconds": round(warm_up_seconds, 1)} if compiled else {}))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
