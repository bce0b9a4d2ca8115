"""Launch helpers shared by the kernel files."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdbench._checks import interpreter_on

# A tile this wide holds a row's worth of fp32 lanes in registers across 8-16 warps;
# wider rows stream through tiles of this size.
MAX_BLOCK = 4096


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with unit column stride; copies only when a view cannot give that."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1 and v > 1:
        x2 = x2.contiguous()
    return x2


def launch_config(v: int, max_block: int = MAX_BLOCK) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``v`` columns."""
    block = min(triton.next_power_of_2(max(v, 1)), max_block)
    block = max(block, 16)
    if block >= 4096:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    elif block >= 512:
        num_warps = 4
    else:
        num_warps = 2
    return block, num_warps


def bf16_round_by_hand(dtype: torch.dtype) -> bool:
    """Whether stores to ``dtype`` must round to bfloat16 in integer arithmetic.

    Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding to
    nearest-even (the GPU's cvt.rn does round), which would add up to one extra ulp
    of error under test. Only the interpreter takes this path.
    """
    return dtype == torch.bfloat16 and interpreter_on()


@triton.jit
def cast_for_store(
    x,  # float32 tensor
    DTYPE: tl.constexpr,  # element type of the destination
    ROUND_BY_HAND: tl.constexpr,  # see bf16_round_by_hand
):
    """x rounded to nearest-even in DTYPE."""
    if ROUND_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(x != x, bits, rounded) >> 16
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def online_max_step(m, x):
    """One step of a running max with rescaling, for per-lane online sums of exp(x - max).

    Returns (m_new, e, grew): m_new = max(m, x), grew = x > m, and e = exp(min(m, x) - m_new)
    (0 where both are -inf).  A running sum s over exp(x_k - m) becomes
    ``where(grew, s * e + 1, s + e)``: whichever of x and m is smaller is exponentiated
    against the new max, so one exp per element serves both cases, not two.
    """
    m_new = tl.maximum(m, x)
    e = tl.exp(tl.minimum(m, x) - tl.where(m_new == float("-inf"), 0.0, m_new))
    return m_new, e, x > m
