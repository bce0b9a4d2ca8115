"""Reference calibration statistics: the semantics the Triton kernel must reproduce.

Shapes: N rows (the leading dims of the logits, flattened) of C classes.

Per row, with x = z * (1 / T) in the compute dtype (float32; float64 for float64 logits):

* m = max_k x_k,  S = sum_k exp(x_k - m),  p_k = exp(x_k - m) / S
* confidence = max_k p_k = 1 / S;  prediction = argmax_k x_k, the lowest index among ties
* NLL = -log p_y = log S - (x_y - m);  Brier = sum_k (p_k - 1[y = k])^2
* bin = min(floor(confidence * M), M - 1) for M equal-width bins [m/M, (m+1)/M); a
  confidence of exactly 1.0 lands in the last bin.

The bin index is computed in the confidence's own dtype by one multiplication and a
floor, exactly as the kernel does: two backends that agree on the float32 confidence
agree on the bin.  Near an edge this can differ by one bin from comparing against
explicit edges (``torch.linspace`` values, as torchmetrics does), because ``conf * M``
rounds; the rule here is the one that gives every backend the same answer.

Rows whose label equals ``ignore_index`` are never read (they may hold NaN padding).
A counted row whose statistics are undefined (a NaN or +inf logit, +inf after the
division by T, an all -inf row, or a label outside [0, C) on CUDA, where labels are
not checked on the host) gets NaN confidence, NLL and Brier: the caller reports it.

Per-bin sums are accumulated in float64 by a fixed-order reduction (a masked
one-hot sum per chunk of rows, chunks added in order), so they are bit-identical
from run to run on every device: no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Rows per chunk of the one-hot binning, times the number of bins: bounds the
# temporary (chunk, M) float64 buffer to about 8 MiB.
_ONE_HOT_ELEMENTS = 1 << 20


class CalibrationRows(NamedTuple):
    """Per-row statistics of (N, C) logits; every field has shape (N,).

    ``conf``/``nll``/``brier`` are float32 (float64 for float64 logits), ``pred`` int64,
    ``counted`` bool.  Ignored rows hold conf = nll = brier = 0 and pred = -1.
    """

    conf: torch.Tensor
    pred: torch.Tensor
    nll: torch.Tensor
    brier: torch.Tensor
    counted: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def calibration_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> CalibrationRows:
    """Per-row confidence, prediction, NLL and Brier of (N, C) logits and (N,) labels."""
    cdt = _compute_dtype(logits.dtype)
    c = logits.shape[-1]
    counted = labels != ignore_index
    in_range = (labels >= 0) & (labels < c)
    # Ignored rows may hold anything: compute on zeros so nothing leaks from them.
    # Multiplying by 1/T (not dividing by T) rounds exactly as the kernel does.
    x = torch.where(counted[:, None], logits.to(cdt), 0.0) * (1.0 / temperature)
    m = x.max(dim=-1).values
    e = torch.exp(x - m[:, None])
    s = e.sum(dim=-1)
    conf = 1.0 / s
    pred = x.argmax(dim=-1)
    p = e / s[:, None]
    y = torch.where(counted & in_range, labels, 0).long()
    # -log_softmax, not logsumexp - x_y: x_y - m is formed first, so a near-certain
    # label keeps its small NLL instead of losing it to the rounding of a large logsumexp.
    nll = -torch.log_softmax(x, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    one_hot = torch.nn.functional.one_hot(y, c).to(cdt)
    brier = (p - one_hot).square().sum(dim=-1)

    nan = torch.tensor(float("nan"), dtype=cdt, device=x.device)
    bad = counted & ~in_range
    conf = torch.where(bad, nan, conf)
    nll = torch.where(bad, nan, nll)
    brier = torch.where(bad, nan, brier)
    # NaN / +inf / all -inf rows already came out NaN (softmax of them is NaN).
    zero = torch.zeros((), dtype=cdt, device=x.device)
    return CalibrationRows(
        conf=torch.where(counted, conf, zero),
        pred=torch.where(counted, pred, -1),
        nll=torch.where(counted, nll, zero),
        brier=torch.where(counted, brier, zero),
        counted=counted,
    )


def bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """int64 bin of each confidence: min(floor(conf * M), M - 1), in conf's dtype.

    NaN confidences (undefined rows) go to the last bin so the NaN shows in its sums.
    """
    b = torch.floor(conf * float(n_bins)).clamp(0, n_bins - 1)
    return torch.nan_to_num(b, nan=float(n_bins - 1)).long()


def binned_sums(
    bins: torch.Tensor,
    values: tuple[torch.Tensor, ...],
    n_bins: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-bin float64 count and sum of each of ``values``, in a fixed order.

    Args:
        bins: (N,) int64 bin of each sample, in [0, n_bins).
        values: tensors of shape (N,) (any real or bool dtype).
        mask: (N,) bool, the samples to count; None counts all.  A mask rather than
            boolean indexing keeps CUDA tensors free of host syncs.

    Returns:
        (count, *sums), each float64 of shape (n_bins,).
    """
    device = bins.device
    out = [torch.zeros(n_bins, dtype=torch.float64, device=device) for _ in range(len(values) + 1)]
    chunk = max(1, _ONE_HOT_ELEMENTS // n_bins)
    slots = torch.arange(n_bins, device=device)
    for start in range(0, bins.shape[0], chunk):
        hot = bins[start : start + chunk, None] == slots[None, :]
        if mask is not None:
            hot &= mask[start : start + chunk, None]
        out[0] += hot.sum(dim=0, dtype=torch.float64)
        for acc, v in zip(out[1:], values):
            v64 = v[start : start + chunk, None].to(torch.float64)
            # where, not a product: a NaN in one row must not reach the other bins.
            acc += torch.where(hot, v64, 0.0).sum(dim=0)
    return tuple(out)


def calibration_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[CalibrationRows, dict[str, torch.Tensor]]:
    """Per-row statistics and the sufficient statistics of (N, C) logits.

    Returns ``(rows, sums)`` where ``sums`` holds float64 ``count``, ``conf_sum``,
    ``correct_sum`` (each (n_bins,)), and 0-dim ``nll_sum``, ``brier_sum``, ``n``.
    """
    rows = calibration_rows(logits, labels, temperature=temperature, ignore_index=ignore_index)
    keep = rows.counted
    correct = rows.pred == labels
    bins = bin_index(rows.conf, n_bins)
    count, conf_sum, correct_sum = binned_sums(bins, (rows.conf, correct), n_bins, keep)
    sums = {
        "count": count,
        "conf_sum": conf_sum,
        "correct_sum": correct_sum,
        "nll_sum": rows.nll.to(torch.float64).sum(),
        "brier_sum": rows.brier.to(torch.float64).sum(),
        "n": keep.sum(dtype=torch.float64),
    }
    return rows, sums
