"""Calibration statistics in one pass over the logits, and temperature scaling.

Definitions (N counted rows of C classes, M bins, temperature T > 0):

* p = softmax(z / T) with z / T evaluated in float32 (float64 logits: float64).
* confidence = max_k p_k; prediction = argmax_k z_k, the lowest index among ties (as
  ``torch.argmax``); correct = 1[prediction == label].
* Bins are equal-width, [m/M, (m+1)/M) for m = 0..M-1, and a confidence of exactly
  1.0 goes to the last bin (as netcal and Google's robustness_metrics do).  The bin is
  ``min(floor(conf * M), M - 1)`` computed in float32 from the float32 confidence, by
  both backends, so they agree on every row whose confidence they agree on.
  torchmetrics instead bucketizes against ``linspace(0, 1, M + 1)`` and puts a
  confidence of exactly 1.0 into a hidden (M+1)-th bin (its open issue #3510): its ECE
  differs from this one whenever some confidence is exactly 1.0, and can differ for a
  confidence within one rounding of an edge.
* With n_m samples in bin m, acc_m and conf_m their mean correctness and confidence:
  ECE = sum_m (n_m / N) |acc_m - conf_m|;  RMS = sqrt(sum_m (n_m / N) (acc_m - conf_m)^2);
  MCE = max over non-empty bins of |acc_m - conf_m|.
* NLL = mean of -log p_y;  Brier = mean of sum_k (p_k - 1[y = k])^2.
* Rows whose label equals ``ignore_index`` are left out everywhere.
* ``inputs="probs"`` takes rows of probabilities p instead of logits: they go through
  the same path as the logits log p (softmax(log p) = p), so the statistics are those
  of p itself, and a temperature gives softmax(log(p) / T), proportional to p^(1/T).

The statistics are sums, float64, of fixed size (3 M + 3 numbers): they add across
batches, epochs and ranks, and the metrics are computed from the sums at the end.
Temperature scaling (``fit_temperature``) lives in :mod:`kdbench.temperature`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from kdbench import _checks
from kdbench.reference import calibration as ref
from kdbench.reference._common import compute_dtype

NORMS = ("l1", "l2", "max")
INPUTS = ("auto", "logits", "probs")
# Counted rows that inputs="auto" inspects for the look of probabilities: a fixed, tiny cost.
SNIFF_ROWS = 8


def prob_sum_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row of probabilities in ``dtype`` may sum.

    float16 / bfloat16 probabilities carry one rounding each (up to 2**-8 relative in
    bfloat16), and the small ones of a wide row underflow in float16.
    """
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins: expected an int >= 1, got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins}")
    return n_bins


def binned_calibration_error(
    count: torch.Tensor,
    conf_sum: torch.Tensor,
    correct_sum: torch.Tensor,
    norm: str = "l1",
) -> float:
    """ECE ("l1"), RMS calibration error ("l2") or MCE ("max") from per-bin sums.

    Args:
        count, conf_sum, correct_sum: (M,) float64 per-bin sample count, confidence
            sum and number correct.
    Raises:
        ValueError: "no samples" when every bin is empty.
    """
    _checks.check_choice("norm", norm, NORMS)
    n = count.sum()
    if not bool(n > 0):
        raise ValueError("no samples: the statistics count 0 samples, so calibration error is undefined")
    full = count > 0
    safe = torch.where(full, count, 1.0)
    gap = torch.where(full, (correct_sum - conf_sum) / safe, 0.0)
    weight = count / n
    if norm == "l1":
        return float((weight * gap.abs()).sum())
    if norm == "l2":
        return float((weight * gap.square()).sum().sqrt())
    return float(gap.abs().max())


class Reliability(NamedTuple):
    """Per-bin reliability data, float64 CPU tensors of shape (M,), ready to plot.

    ``confidence`` and ``accuracy`` are the bin means, NaN for empty bins (plotting
    libraries skip NaN); ``lower``/``upper`` are the bin edges.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    """Sufficient statistics of calibration: float64 sums that add across batches and ranks.

    Attributes:
        count: (M,) samples per confidence bin.
        conf_sum: (M,) sum of the confidences in each bin.
        correct_sum: (M,) number of correct predictions in each bin.
        nll_sum: () sum of -log p_y.
        brier_sum: () sum of sum_k (p_k - 1[y = k])^2.
        n: () number of counted samples (= count.sum()).

    All are float64 tensors on one device.  The metric methods return Python floats
    and raise ``ValueError("no samples ...")`` when ``n == 0``, and ``ValueError`` if
    the sums hold NaN (NaN logits on CUDA, which are not checked on the host).
    """

    count: torch.Tensor
    conf_sum: torch.Tensor
    correct_sum: torch.Tensor
    nll_sum: torch.Tensor
    brier_sum: torch.Tensor
    n: torch.Tensor

    def __post_init__(self) -> None:
        m = None
        device = self.count.device if isinstance(self.count, torch.Tensor) else None
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or v.dtype != torch.float64:
                raise TypeError(f"{f.name}: expected a float64 tensor, got {getattr(v, 'dtype', type(v).__name__)}")
            if v.device != device:
                raise ValueError(f"{f.name}: expected device {device} (that of count), got {v.device}")
            per_bin = f.name in ("count", "conf_sum", "correct_sum")
            if per_bin:
                m = v.shape[0] if m is None else m
                if v.dim() != 1 or v.shape[0] != m or m < 1:
                    raise ValueError(f"{f.name}: expected shape ({m},) like count, got {tuple(v.shape)}")
            elif v.dim() != 0:
                raise ValueError(f"{f.name}: expected a 0-dim tensor, got shape {tuple(v.shape)}")

    # ---- construction ------------------------------------------------------------
    @classmethod
    def zeros(cls, n_bins: int = 15, device: torch.device | str | None = None) -> CalibrationStats:
        """Statistics of no samples: the start of an accumulation (``total = total + batch``)."""
        check_n_bins(n_bins)
        z = torch.zeros(n_bins, dtype=torch.float64, device=device)
        s = torch.zeros((), dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone(), s, s.clone(), s.clone())

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])

    def _flat(self) -> torch.Tensor:
        return torch.cat([getattr(self, f.name).reshape(-1) for f in fields(self)])

    def _from_flat(self, flat: torch.Tensor) -> CalibrationStats:
        m = self.n_bins
        return CalibrationStats(
            flat[:m], flat[m : 2 * m], flat[2 * m : 3 * m], flat[3 * m], flat[3 * m + 1], flat[3 * m + 2]
        )

    def to(self, device: torch.device | str) -> CalibrationStats:
        return self._from_flat(self._flat().to(device))

    def to_dict(self) -> dict[str, list[float] | float]:
        """Plain Python numbers (JSON-ready); ``from_dict`` inverts it exactly."""
        return {
            f.name: (getattr(self, f.name).tolist() if f.name in ("count", "conf_sum", "correct_sum")
                     else float(getattr(self, f.name)))
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, list[float] | float]) -> CalibrationStats:
        try:
            return cls(**{f.name: torch.tensor(d[f.name], dtype=torch.float64) for f in fields(cls)})
        except KeyError as e:
            raise ValueError(f"d: missing field {e.args[0]!r}") from None

    # ---- merging -----------------------------------------------------------------
    def __add__(self, other: object) -> CalibrationStats:
        if not isinstance(other, CalibrationStats):
            return NotImplemented
        if other.n_bins != self.n_bins:
            raise ValueError(f"other: expected statistics with {self.n_bins} bins, got {other.n_bins}")
        if other.count.device != self.count.device:
            raise ValueError(f"other: expected device {self.count.device}, got {other.count.device}")
        return self._from_flat(self._flat() + other._flat())

    def __radd__(self, other: object) -> CalibrationStats:
        # sum(list_of_stats) starts from the integer 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def all_reduce(self, group: object = None) -> CalibrationStats:
        """The statistics summed over the ranks of ``group`` (default: the world).

        One ``all_reduce`` of 3 M + 3 float64 numbers: memory and traffic are constant
        in the number of samples.  Every rank must call it.  Returns new statistics;
        ``self`` is unchanged.

        Raises:
            RuntimeError: torch.distributed is not available or not initialized.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce: torch.distributed is not initialized; call init_process_group first "
                "(a single process needs no all_reduce)"
            )
        flat = self._flat().clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return self._from_flat(flat)

    # ---- metrics -----------------------------------------------------------------
    def _require_samples(self) -> float:
        n = float(self.n)
        if math.isnan(float(self.nll_sum)) or bool(torch.isnan(self.conf_sum).any()):
            raise ValueError(
                "stats: the sums are NaN: some counted row of logits held NaN or +inf, or its label "
                "was outside [0, C) (neither is checked on the host for CUDA tensors, to avoid a sync)"
            )
        if not n > 0:
            raise ValueError("no samples: the statistics count 0 samples")
        return n

    def ece(self, norm: str = "l1") -> float:
        """"l1": ECE; "l2": RMS calibration error; "max": MCE over non-empty bins."""
        _checks.check_choice("norm", norm, NORMS)
        self._require_samples()
        return binned_calibration_error(self.count, self.conf_sum, self.correct_sum, norm)

    def accuracy(self) -> float:
        """Fraction of counted samples whose prediction equals the label."""
        return float(self.correct_sum.sum()) / self._require_samples()

    def nll(self) -> float:
        """Mean negative log-likelihood -log p_y (nats)."""
        return float(self.nll_sum) / self._require_samples()

    def brier(self) -> float:
        """Mean multi-class Brier score sum_k (p_k - 1[y = k])^2, in [0, 2]."""
        return float(self.brier_sum) / self._require_samples()

    def reliability(self) -> Reliability:
        """Per-bin mean confidence, accuracy and count (NaN means for empty bins)."""
        self._require_samples()
        count = self.count.cpu()
        m = self.n_bins
        edges = torch.arange(m + 1, dtype=torch.float64) / m
        full = count > 0
        safe = torch.where(full, count, 1.0)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return Reliability(
            lower=edges[:-1],
            upper=edges[1:],
            confidence=torch.where(full, self.conf_sum.cpu() / safe, nan),
            accuracy=torch.where(full, self.correct_sum.cpu() / safe, nan),
            count=count,
        )


# ---- entry points -------------------------------------------------------------------


def check_inputs(
    logits: object,
    labels: object,
    temperature: object,
    ignore_index: object,
    backend: object,
    *,
    inputs: object = "logits",
) -> tuple[torch.Tensor, torch.Tensor, float, int, str]:
    """Validate the arguments; returns (logits (N, C), labels (N,), T, ignore_index, backend).

    ``inputs`` (see :func:`calibration_stats`): "probs" checks the rows on CPU, "auto"
    warns when its sample of rows looks like probabilities; the logits are returned as
    given either way.
    """
    _checks.check_logits("logits", logits)
    assert isinstance(logits, torch.Tensor)
    if logits.dim() < 2:
        raise ValueError(
            f"logits: expected shape (..., C) with at least 2 dims (samples, classes), got shape {tuple(logits.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    c = logits.shape[-1]
    _checks.check_labels(labels, logits.shape[:-1], c, ignore_index)
    assert isinstance(labels, torch.Tensor)
    if labels.device != logits.device:
        raise ValueError(f"labels: expected device {logits.device} (that of logits), got {labels.device}")
    t = _checks.check_temperature(temperature)
    b = _checks.check_backend(backend)
    mode = _checks.check_choice("inputs", inputs, INPUTS)
    z, y = logits.reshape(-1, c), labels.reshape(-1)
    if mode == "probs":
        _check_probs(z, y, ignore_index)
    elif mode == "auto":
        _warn_if_probs(z, y, ignore_index)
    return z, y, t, ignore_index, b


def _row_list(idx: torch.Tensor) -> str:
    shown = ", ".join(str(i) for i in idx[:10].tolist())
    return f"[{shown}]" + (f" and {idx.numel() - 10} more" if idx.numel() > 10 else "")


def _check_probs(p: torch.Tensor, y: torch.Tensor, ignore_index: int) -> None:
    """CPU: every counted row of ``p`` is >= 0 and sums to 1 within the dtype's tolerance.

    On other devices nothing is checked: it would cost a host sync per call.
    """
    if p.device.type != "cpu" or p.numel() == 0:
        return
    counted = y != ignore_index
    tol = prob_sum_tolerance(p.dtype)
    negative = counted & (p.amin(dim=-1) < 0)
    if bool(negative.any()):
        raise ValueError(
            f"logits: inputs='probs' expects probabilities >= 0, but rows {_row_list(negative.nonzero().flatten())} "
            "(flattened leading dims) hold negative entries; pass logits with inputs='logits'"
        )
    total = p.sum(dim=-1, dtype=torch.float64)
    # Written so that a NaN sum fails too.
    off = counted & ~((total - 1.0).abs() <= tol)
    if bool(off.any()):
        idx = off.nonzero().flatten()
        raise ValueError(
            f"logits: inputs='probs' expects rows summing to 1 within {tol:g}, but rows {_row_list(idx)} "
            f"(flattened leading dims) do not (row {int(idx[0])} sums to {float(total[idx[0]]):.6g})"
        )


def _warn_if_probs(z: torch.Tensor, y: torch.Tensor, ignore_index: int) -> None:
    """Warn when the first ``SNIFF_ROWS`` counted rows all look like probabilities.

    CPU only (on other devices the answer would cost a host sync per call), and only for
    C >= 2: a single class has p = 1 whatever its logit.  Reads those few rows, never the rest.
    """
    if z.device.type != "cpu" or z.shape[-1] < 2:
        return
    first = (y != ignore_index).nonzero().flatten()[:SNIFF_ROWS]
    if first.numel() == 0:
        return
    sample = z[first].to(torch.float64)
    looks = bool((sample >= 0).all()) and bool(
        ((sample.sum(dim=-1) - 1.0).abs() <= prob_sum_tolerance(z.dtype)).all()
    )
    if looks:
        warnings.warn(
            f"logits: the first {first.numel()} counted rows are non-negative and sum to 1, so they look like "
            "probabilities, but they were treated as logits (softmax was applied to them again); pass "
            "inputs='probs' for probabilities, or inputs='logits' to silence this warning",
            UserWarning,
            stacklevel=4,
        )


def _as_logits(z: torch.Tensor, inputs: str) -> torch.Tensor:
    """Probabilities become the logits log p, formed in the compute dtype: log of a float16 /
    bfloat16 value rounded to its own dtype would move every probability by up to one rounding."""
    if inputs != "probs":
        return z
    return torch.log(z.to(compute_dtype(z.dtype)))


def _raise_on_bad_rows(rows: ref.CalibrationRows, device: torch.device) -> None:
    """On CPU, name the counted rows whose statistics are undefined (one cheap O(N) pass)."""
    if device.type != "cpu":
        return
    bad = rows.counted & torch.isnan(rows.conf)
    if bool(bad.any()):
        raise ValueError(
            f"logits: rows {_row_list(bad.nonzero().flatten())} (flattened leading dims) hold NaN or +inf, "
            "are all -inf, or overflow when divided by the temperature"
        )


def _run(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> tuple[ref.CalibrationRows, dict[str, torch.Tensor]]:
    if _checks.resolve_backend(backend, logits) == "triton":
        from kdbench.kernels.calibration import MAX_BINS, calibration_sums_triton

        if n_bins > MAX_BINS and backend == "triton":
            raise ValueError(f"n_bins: the triton backend takes n_bins <= {MAX_BINS}, got {n_bins}; use backend='torch'")
        if n_bins <= MAX_BINS:  # "auto" falls back to the reference for more bins
            out = calibration_sums_triton(
                logits, labels, n_bins=n_bins, temperature=temperature, ignore_index=ignore_index
            )
            _raise_on_bad_rows(out[0], logits.device)
            return out
    out = ref.calibration_sums(logits, labels, n_bins=n_bins, temperature=temperature, ignore_index=ignore_index)
    _raise_on_bad_rows(out[0], logits.device)
    return out


def calibration_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int = 15,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inputs: str = "auto",
) -> CalibrationStats:
    """Calibration sufficient statistics of a batch of logits, in one pass.

    Args:
        logits: (..., C) float32/float16/bfloat16 (float64 on the torch backend), C >= 1:
            logits, or probabilities with ``inputs="probs"``.
        labels: (...) integer class indices in [0, C), or ``ignore_index`` to leave a row out.
        n_bins: M >= 1 equal-width confidence bins.
        temperature: T > 0; the statistics are those of softmax(logits / T).
        ignore_index: label value marking a row as left out (it is not read).
        backend: "triton" (the fused kernel; n_bins <= 1024), "torch" (the reference),
            or "auto" (triton for CUDA tensors of a kernel dtype, torch otherwise).
        inputs: what the rows hold.

            * "logits": logits, taken as they are.
            * "probs": probabilities p; the statistics are those of p itself (the rows go
              through the same path as the logits log p, formed in float32, float64 for
              float64 input: one extra pass and an (N, C) buffer), and a temperature
              gives softmax(log(p) / T), proportional to p^(1/T).  On CPU a counted row
              with a negative entry, or whose sum is off 1 by more than 1e-3 (1e-2 for
              float16 / bfloat16), raises ``ValueError`` naming ``logits``.  On CUDA
              nothing is checked (that would cost a host sync): a row is taken as p / sum p,
              and a negative entry makes its statistics NaN.
            * "auto" (default): logits, but on CPU, when the first 8 counted rows are all
              >= 0 and each sums to 1 within that tolerance (C >= 2), a ``UserWarning``
              says that they look like probabilities: pass "probs", or "logits" to
              silence it.  No other row of logits is read for it; nothing is checked on
              CUDA (that would cost a host sync).

    Returns:
        :class:`CalibrationStats` on the logits' device (no host sync on CUDA).
        Add the results of several batches, or ``all_reduce`` them across ranks,
        then read ``ece()``, ``accuracy()``, ``nll()``, ``brier()``, ``reliability()``.

    Raises:
        ValueError / TypeError naming the argument for bad input.  NaN / +inf logits
        in a counted row raise ``ValueError`` naming the rows on CPU; on CUDA they
        make the sums NaN, and the metric methods raise.
    """
    check_n_bins(n_bins)
    z, y, t, ii, b = check_inputs(logits, labels, temperature, ignore_index, backend, inputs=inputs)
    _, sums = _run(_as_logits(z, inputs), y, n_bins=n_bins, temperature=t, ignore_index=ii, backend=b)
    return CalibrationStats(**sums)


def calibration_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inputs: str = "auto",
) -> ref.CalibrationRows:
    """Per-row confidence, prediction, NLL and Brier (the inputs of AURC, adaptive ECE ...).

    Same arguments and definitions as :func:`calibration_stats`.  Every field is shaped
    like ``labels``: ``conf``/``nll``/``brier`` float32 (float64 for float64 logits),
    ``pred`` int64, ``counted`` bool; ignored rows hold 0 and pred = -1.
    """
    z, y, t, ii, b = check_inputs(logits, labels, temperature, ignore_index, backend, inputs=inputs)
    rows, _ = _run(_as_logits(z, inputs), y, n_bins=1, temperature=t, ignore_index=ii, backend=b)
    shape = labels.shape
    return ref.CalibrationRows(*(f.reshape(shape) for f in rows))
