"""Triton kernels of msd_fast, installed as ``msd_fast.kernels`` (never as a top-level ``kernels`` module).

Each module holds the kernel(s) of one op and a host launcher with the same contract as the C++/CUDA kernel of
that op. Under ``TRITON_INTERPRET=1`` they run on CPU tensors (numpy interpreter), which is how CI tests them.
"""
from .block_mix import block_mix
from .dino_loss import dino_loss
from .masked_gather import masked_gather_backward, masked_gather_forward
from .patch_permute import patch_permute

__all__ = ["block_mix", "dino_loss", "masked_gather_backward", "masked_gather_forward", "patch_permute"]
