"""The largest batch per GPU that one MS-DINO training step fits in, with the fused head + loss (``--fused-head``)
and without it.

Each trial runs two full steps of the trainer's own :func:`~msd_fast.server.trainer.distillation_step` (student
on every view, EMA teacher on the global views, DINO head, loss, backward, clipping, AdamW with its state, EMA) at
one batch size; a CUDA out-of-memory error means "does not fit". The search doubles the batch, then bisects; the
GPU default is ViT-S/16 at 224x224, K = 65536, 2 global + 10 local views, bf16 autocast, DINO's head::

    python -m bench.head_capacity --json capacity.json                 # a lent GPU machine
    python -m bench.head_capacity --device cpu --arch vit_tiny_patch16_224 --image-size 32 --patch-size 16 \\
        --out-dim 64 --max-batch 4                                     # a smoke run of the code (the test)

On a CPU nothing runs out of memory, so the search stops at ``--max-batch``: only the GPU numbers count.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Callable

import torch

from msd_fast.atomic import write_text
from msd_fast.server.config import PretrainConfig
from msd_fast.server.model import DINOHead, MaskedSamplingNet, create_backbone
from msd_fast.server.optim import KeyInvariantAdamW
from msd_fast.server.trainer import build_loss, distillation_step, parameter_groups
from msd_fast.server.views import draw_views


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest ``b`` in ``[1, limit]`` with ``fits(b)`` (0 if none), for a ``fits`` that holds for every batch
    below one that fits: doubling from 1, then bisection; about ``2·log2(answer)`` calls."""
    if not fits(1):
        return 0
    fitting, failing = 1, None
    while failing is None and fitting < limit:
        trial = min(2 * fitting, limit)
        if fits(trial):
            fitting = trial
        else:
            failing = trial
    while failing is not None and failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def step_fits(args: argparse.Namespace, fused: bool, batch: int) -> bool:
    """Whether two training steps at ``batch`` run on ``args.device`` without running out of its memory."""
    config = PretrainConfig(shards=["(in memory)"], arch=args.arch, out_dim=args.out_dim, global_views=2,
                            local_views=10, global_keep=0.5, local_keep=0.2, batch_size=batch, epochs=1,
                            fused_head=fused, device=args.device)
    device = torch.device(args.device)
    try:
        torch.manual_seed(0)

        def network() -> MaskedSamplingNet:
            backbone = create_backbone(args.arch, image_size=(args.image_size,) * 2, patch_size=args.patch_size,
                                       in_chans=3, token_mode=False)
            return MaskedSamplingNet(backbone, DINOHead(backbone.embed_dim, args.out_dim), token_mode=False)

        student, teacher = network().to(device), network().to(device)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        loss_fn = build_loss(config).to(device)
        optimizer = KeyInvariantAdamW(parameter_groups(student, rowwise_embed=True))
        images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
        num_tokens = student.backbone.patch_embed.num_patches
        for step in range(2):
            views = draw_views(config, num_tokens, step, 0, batch, device)
            distillation_step(student, teacher, loss_fn, optimizer, images, views, config, num_tokens=num_tokens,
                              epoch=0, step=step, lr=1e-4, weight_decay=0.04, momentum=0.996,
                              bf16=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--max-batch", type=int, default=4096, help="the search's upper end")
    parser.add_argument("--json", help="write the result here as JSON")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, got {args.max_batch}")
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "arch": args.arch, "image_size": args.image_size, "out_dim": args.out_dim, "views": "2 + 10",
              "max_batch": args.max_batch}
    for name, fused in (("unfused", False), ("fused", True)):
        result[f"largest_batch_{name}"] = largest_fitting(lambda batch: step_fits(args, fused, batch), args.max_batch)
        print(f"{name}: largest batch {result[f'largest_batch_{name}']}", flush=True)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
