"""Pieces every reference and kernel launcher shares: the compute dtype and the reduction."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64; float32 / float16 / bfloat16 in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
