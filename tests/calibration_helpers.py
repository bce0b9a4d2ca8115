"""Shared pieces of the calibration tests: data, an independent float64 oracle, bin checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_logits(
    n: int,
    c: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scale: float = 3.0,
    ignore_frac: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, c) logits whose argmax matches the label about half the time, and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    z[torch.arange(n), y] += scale * torch.rand(n, generator=g, dtype=torch.float64)
    if ignore_frac > 0:
        y = torch.where(torch.rand(n, generator=g) < ignore_frac, torch.full_like(y, -100), y)
    return z.to(dtype), y


def oracle(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100):
    """Per-row float64 statistics computed the textbook way (materialised softmax)."""
    keep = labels != ignore_index
    z = logits[keep].to(torch.float64) / temperature
    y = labels[keep]
    p = F.softmax(z, dim=-1)
    conf = p.max(dim=-1).values
    correct = (z.argmax(dim=-1) == y).to(torch.float64)
    nll = F.cross_entropy(z, y, reduction="none")
    brier = (p - F.one_hot(y, z.shape[-1]).to(torch.float64)).square().sum(-1)
    return conf, correct, nll, brier


def near_edge(conf64: torch.Tensor, n_bins: int, tol: float) -> torch.Tensor:
    """Samples whose confidence lies within ``tol`` of an interior bin edge."""
    scaled = conf64 * n_bins
    return ((scaled - scaled.round()).abs() <= tol * n_bins) & (scaled.round() > 0) & (scaled.round() < n_bins)


def assert_counts_match(count: torch.Tensor, expected: torch.Tensor, slack: int) -> None:
    """Per-bin counts equal, except for at most ``slack`` samples moved across an edge."""
    diff = (count.cpu().to(torch.float64) - expected.cpu().to(torch.float64)).abs()
    assert float(diff.sum()) <= 2 * slack, (count, expected, slack)
    assert float(count.sum()) == float(expected.sum())
