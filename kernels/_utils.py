"""Launch helpers shared by the kernel files."""

from __future__ import annotations

import torch
import triton

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
