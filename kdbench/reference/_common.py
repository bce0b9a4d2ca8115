"""Pieces every reference and kernel launcher shares: the compute dtype, the reduction, the
choice between the torch backend's CPU and GPU strategies, and its row blocking."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype, *others: torch.dtype) -> torch.dtype:
    """float64 when any of the dtypes is float64, else float32 (float32 / float16 / bfloat16).

    A student and a teacher of different dtypes share it: a float64 teacher is not
    rounded to float32 because the student is float32.
    """
    return torch.float64 if torch.float64 in (dtype, *others) else torch.float32


def gpu_strategy(device: torch.device) -> bool:
    """Whether the torch backend takes its GPU strategy for tensors on ``device``.

    CPU: blocks sized for the caches, host checks allowed.  Anything else (CUDA, ROCm,
    MPS, XPU): few large blocks, passes fused into torch's own kernels, and no
    data-dependent host syncs.  The modules look this up at call time, so tests switch it
    on for CPU tensors to run the GPU strategy where CI has no GPU.
    """
    return device.type != "cpu"


def block_rows(width: int, budget: int) -> int:
    """Rows of ``width`` elements per block of at most ``budget`` elements (at least one row)."""
    return max(1, budget // max(width, 1))


def reduce_rows(rows: torch.Tensor, n_counted: torch.Tensor, reduction: str, lead: torch.Size) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses (N,).

    "none": the rows shaped like the leading dims ``lead``; "sum": their sum;
    "batchmean": their sum / the number of counted rows (0 when no row counts).
    """
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / n_counted.clamp_min(1).to(total.dtype)
