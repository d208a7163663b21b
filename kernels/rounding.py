"""Rounding helpers shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def float32_to_bfloat16_rtne(x):
    # Round to nearest even explicitly: Triton's interpreter truncates on this cast, GPUs round; this matches both
    # to torch's rounding (NaN stays NaN).
    # 1. Add 0x7FFF plus the lowest kept bit (ties to even), 2. keep the top 16 bits, 3. NaN -> the canonical NaN.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
    return rounded.to(tl.bfloat16, bitcast=True)
