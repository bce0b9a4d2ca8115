"""Reference calibration statistics: the semantics the Triton kernel must reproduce.

Shapes: N rows (the leading dims of the logits, flattened) of C classes.

Per row, with x = z * (1 / T) in the compute dtype (float32; float64 for float64 logits):

* m = max_k x_k,  e_k = exp(x_k - m),  S' = sum_{k != y} e_k,  S = S' + e_y,  p_k = e_k / S
* confidence = max_k p_k = 1 / S;  prediction = argmax_k x_k, the lowest index among ties
* NLL = -log p_y = log S - (x_y - m), as log1p(S' / e_y) when p_y >= 1/2
* Brier = sum_k (p_k - 1[y = k])^2 = (sum_{k != y} e_k^2 + S'^2) / S^2
* bin = min(floor(confidence * M), M - 1) for M equal-width bins [m/M, (m+1)/M); a
  confidence of exactly 1.0 lands in the last bin.

The kernel evaluates the same expressions (a sum of positive terms for the Brier score,
no cancellation when p_y is near 1), so the two backends differ only by the order of
summation and the exp implementation.

The bin index is computed in the confidence's own dtype by one multiplication and a
floor, exactly as the kernel does: two backends that agree on the float32 confidence
agree on the bin.  Near an edge this can differ by one bin from comparing against
explicit edges (``torch.linspace`` values, as torchmetrics does), because ``conf * M``
rounds; the rule here is the one that gives every backend the same answer.

Rows whose label equals ``ignore_index`` take no part (they may hold NaN padding; the
kernel does not even read them).  A counted row whose statistics are undefined (a NaN or +inf logit, +inf after the
division by T, an all -inf row, or a label outside [0, C) on CUDA, where labels are
not checked on the host) gets NaN confidence, NLL and Brier: the caller reports it.

On devices other than the CPU, :func:`calibration_rows` takes a GPU strategy (few large
row blocks, fused passes, no host syncs; see ``_rows_fused`` for its traffic): the same
expressions, except that S' and sum e^2 come from one Welford pass (C mean and
C (var + mean^2)), which differs from a plain sum by rounding only.

Per-bin sums are accumulated in float64 in a fixed order (``torch.bincount``'s
sequential loop on CPU; a masked one-hot sum per chunk of rows elsewhere), so they are
bit-identical from run to run on every device: no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kdbench.reference._common import block_rows, compute_dtype, gpu_strategy

# Logits per row block of calibration_rows: 2**20 float32 values (4 MiB) per temporary.
_ROW_BLOCK_ELEMENTS = 1 << 20
# GPU strategy: 2**27 logits per block, one float32 work buffer of 512 MiB; (65536, 32000)
# takes 16 blocks, each pass over a block ~0.1-0.3 ms against ~5 us to launch it.  Measured
# on an H200: 2**26 22.2 ms, 2**27 21.3 ms, 2**28 20.5 ms (before var_mean).
_DEVICE_ROW_BLOCK_ELEMENTS = 1 << 27
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


def calibration_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> CalibrationRows:
    """Per-row confidence, prediction, NLL and Brier of (N, C) logits and (N,) labels.

    Rows are processed in blocks of about ``_ROW_BLOCK_ELEMENTS`` logits, so the (block, C)
    temporaries stay bounded (and cache-sized on CPU) however large N is; rows are
    independent, so the blocking does not change any value.
    """
    n, c = logits.shape
    step = rows_per_block(c, logits.device)
    if gpu_strategy(logits.device):
        return _rows_fused(logits, labels, temperature, ignore_index, step)
    if n <= step:
        return _rows_block(logits, labels, temperature, ignore_index)
    parts = [
        _rows_block(logits[i : i + step], labels[i : i + step], temperature, ignore_index)
        for i in range(0, n, step)
    ]
    return CalibrationRows(*(torch.cat(field) for field in zip(*parts)))


def rows_per_block(c: int, device: torch.device) -> int:
    """Rows of C logits per block of calibration_rows: cache-sized on CPU, large on the GPU strategy."""
    return block_rows(c, _DEVICE_ROW_BLOCK_ELEMENTS if gpu_strategy(device) else _ROW_BLOCK_ELEMENTS)


def _labels(labels: torch.Tensor, c: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counted, in_range, y): y (N, 1) int64 is the label where it is usable, else 0."""
    counted = labels != ignore_index
    in_range = (labels >= 0) & (labels < c)
    return counted, in_range, torch.where(counted & in_range, labels, 0).long()[:, None]


def _rows_block(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int) -> CalibrationRows:
    cdt = compute_dtype(logits.dtype)
    counted, in_range, y = _labels(labels, logits.shape[-1], ignore_index)
    # Multiplying by 1/T (not dividing by T) rounds exactly as the kernel does.  Rows
    # are independent, so an ignored row's padding (even NaN) reaches only its own
    # outputs, which are overwritten below.
    x = logits.to(cdt) * (1.0 / temperature) if temperature != 1.0 else logits.to(cdt)
    m, pred = x.max(dim=-1)  # the first maximal index, as torch.argmax
    x_y = x.gather(-1, y).squeeze(-1)
    e_rest = torch.exp(x - m[:, None]).scatter_(-1, y, 0.0)  # e^(x_k - m) for k != y
    s_rest = e_rest.sum(dim=-1)
    q_rest = e_rest.square_().sum(dim=-1)
    return _finish_rows(counted, in_range, m, pred, x_y, s_rest, q_rest)


def _rows_fused(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, step: int
) -> CalibrationRows:
    """GPU strategy of :func:`calibration_rows`: the same expressions, fewer and larger passes.

    Per block of rows: the max and argmax (read in the logits' own dtype when T = 1: the
    max of the up-cast values is the up-cast max), x - m written once in the compute
    dtype, exp in place, then one reduction of that buffer for both S' and sum e^2.  The
    per-row arithmetic runs once on all N rows at the end.

    Traffic per logit, bfloat16 logits, T = 1: 2 B (max, argmax) + 6 B (x - m: read 2, write
    4) + 8 B (exp in place) + 4 B (``var_mean``) = 20 B; with T != 1, 6 B (x = z / T) + 4 B
    (max) + 8 B (x - m) + 8 B + 4 B = 30 B.  About 270 launches for calibration_sums at
    (65536, 32000) (16 blocks of ~14, then per-row and binning work on (N,) vectors); the
    CPU strategy there moves about 42 B per logit in 2048 blocks of 2**20 logits, some
    100,000 launches.
    Extra memory: one (rows, C) buffer of at most 2**27 elements (512 MiB in float32).
    On an H200 (torch 2.11) the conversions from bfloat16 and the row-broadcast
    subtraction run at ~1.5-2 TB/s, the other passes at ~3-4 TB/s.
    """
    n, c = logits.shape
    cdt = compute_dtype(logits.dtype)
    device = logits.device
    counted, in_range, y = _labels(labels, c, ignore_index)
    m = torch.empty(n, dtype=cdt, device=device)
    pred = torch.empty(n, dtype=torch.int64, device=device)
    x_y, s_rest, q_rest = torch.empty((3, n), dtype=cdt, device=device)
    buf = torch.empty((min(step, n), c), dtype=cdt, device=device)
    # A (1, 1) tensor, not a 0-dim one, so that the product is formed in the compute dtype.
    scale = torch.full((1, 1), 1.0 / temperature, dtype=cdt, device=device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        z, yb, e = logits[r0:r1], y[r0:r1], buf[: r1 - r0]
        if temperature == 1.0:
            mb, pred[r0:r1] = z.max(dim=-1)
            mb = mb.to(cdt)
            x_y[r0:r1] = z.gather(-1, yb).squeeze(-1)
            torch.sub(z, mb[:, None], out=e)
        else:
            torch.mul(z, scale, out=e)
            mb, pred[r0:r1] = e.max(dim=-1)
            x_y[r0:r1] = e.gather(-1, yb).squeeze(-1)
            e.sub_(mb[:, None])
        m[r0:r1] = mb
        e.exp_().scatter_(-1, yb, 0.0)
        # One Welford pass for both sums: S' = C mean, sum e^2 = C (var + mean^2), each a
        # sum of non-negative terms (so the Brier score stays one too).
        var, mean = torch.var_mean(e, dim=-1, correction=0)
        torch.mul(mean, c, out=s_rest[r0:r1])
        torch.addcmul(var, mean, mean, out=q_rest[r0:r1]).mul_(c)
    return _finish_rows(counted, in_range, m, pred, x_y, s_rest, q_rest)


def _finish_rows(
    counted: torch.Tensor,  # (N,) bool
    in_range: torch.Tensor,  # (N,) bool: label in [0, C)
    m: torch.Tensor,  # (N,) max_k x_k
    pred: torch.Tensor,  # (N,) int64 argmax
    x_y: torch.Tensor,  # (N,) x at the label
    s_rest: torch.Tensor,  # (N,) S' = sum_{k != y} e_k
    q_rest: torch.Tensor,  # (N,) sum_{k != y} e_k^2
) -> CalibrationRows:
    """The per-row statistics from the row reductions (both strategies)."""
    cdt = s_rest.dtype
    e_y = torch.exp(x_y - m)
    s = s_rest + e_y
    conf = 1.0 / s
    # -log p_y = log S - (x_y - m): x_y - m first (exact when close).  When p_y >= 1/2,
    # log1p(S'/e_y) keeps a tiny NLL that log S (S near 1) would round away.
    near = e_y >= s_rest
    nll = torch.where(
        near,
        torch.log1p(torch.where(near, s_rest, 0.0) / torch.where(near & (e_y > 0), e_y, 1.0)),
        torch.log(s) - (x_y - m),
    )
    # sum_k (p_k - 1[k = y])^2 = (sum_{k != y} e_k^2 + (sum_{k != y} e_k)^2) / S^2: positive terms only.
    brier = (q_rest + s_rest.square()) / s.square()

    nan = torch.tensor(float("nan"), dtype=cdt, device=m.device)
    # A NaN / +inf logit or an all -inf row already gives NaN (m or x - m is NaN).
    bad = counted & ~in_range
    conf = torch.where(bad, nan, conf)
    nll = torch.where(bad, nan, nll)
    brier = torch.where(bad, nan, brier)
    zero = torch.zeros((), dtype=cdt, device=m.device)
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
    if bins.device.type == "cpu":
        return _sums_bincount(bins, values, n_bins, mask)
    return _sums_one_hot(bins, values, n_bins, mask)


def _sums_bincount(
    bins: torch.Tensor, values: tuple[torch.Tensor, ...], n_bins: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """CPU: torch.bincount is one sequential loop, so a fixed order, in O(N)."""
    # Masked-out samples go to an extra slot that is dropped (their NaNs go nowhere).
    slot = bins if mask is None else torch.where(mask, bins, n_bins)
    out = [torch.bincount(slot, minlength=n_bins + 1)[:n_bins].to(torch.float64)]
    for v in values:
        w = torch.bincount(slot, weights=v.to(torch.float64), minlength=n_bins + 1)
        out.append(w[:n_bins].to(torch.float64))  # an empty input comes back int64
    return tuple(out)


def _sums_one_hot(
    bins: torch.Tensor, values: tuple[torch.Tensor, ...], n_bins: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Any device (CUDA's weighted bincount uses atomics): a masked one-hot sum per chunk
    of rows, a plain reduction, chunks added in order."""
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
