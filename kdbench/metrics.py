"""Functional metrics of a calibration study, in float64.

Inputs are per-sample confidences and correctness (``conf`` in [0, 1], ``correct`` in
{0, 1}: bool, integer or floating), or probabilities (N, C) and labels (N,), or logits.
Every function returns a Python float (or a small named tuple of floats) and raises
``ValueError("no samples ...")`` on empty input.

Binning follows :mod:`kdbench.calibration`: equal-width bins [m/M, (m+1)/M), the bin
``min(floor(conf * M), M - 1)`` (so 1.0 is in the last bin); equal-mass bins sort the
confidences (stable: ties keep input order) and split them into M parts whose sizes
differ by at most one, the larger parts first (``numpy.array_split``).

Where the field disagrees, the choice made here:

* ``debiased_ece`` is Kumar et al. (2019)'s L2 estimator as in their reference code
  (verified_calibration): bins with fewer than 2 samples contribute 0.  torchmetrics'
  ``debias=True`` keeps the plug-in term of such bins.
* ``aurc`` is the mean over k = 1..N of the error rate among the k most confident
  samples (no trapezoid, no 1 - 1/N normalisation); ties in confidence keep input order.
* ``selective_accuracy`` keeps the ceil(coverage * N) most confident samples, with
  coverage * N first rounded off by 1e-9 relative so that 0.95 * 100 keeps 95, not 96.
* Conformal sets use the score s = 1 - p_y (Sadinle et al. 2019, "LAC"): the threshold
  is the ceil((n + 1)(1 - alpha))-th smallest calibration score, and the set of an input
  is {k : 1 - p_k <= threshold}.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kdbench import _checks
from kdbench.calibration import binned_calibration_error, check_n_bins
from kdbench.reference import calibration as ref
from kdbench.reference.kd import kd_row_losses

__all__ = [
    "ece",
    "adaptive_ece",
    "classwise_ece",
    "debiased_ece",
    "aurc",
    "selective_accuracy",
    "agreement",
    "predictive_kl",
    "conformal_threshold",
    "conformal_coverage",
    "Coverage",
]


# ---- argument checks ----------------------------------------------------------------


def _require(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _unit_values(name: str, x: torch.Tensor) -> torch.Tensor:
    """float64 copy of a floating tensor whose values all lie in [0, 1]."""
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    x64 = x.detach().to(torch.float64)
    bad = torch.isnan(x64) | (x64 < 0) | (x64 > 1)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected values in [0, 1], found {x64[bad].flatten()[0].item()}")
    return x64


def _conf_correct(conf: object, correct: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float64 confidences and (N,) float64 0/1 correctness, both flattened."""
    c = _unit_values("conf", _require("conf", conf))
    k = _require("correct", correct)
    if k.shape != c.shape:
        raise ValueError(f"correct: expected shape {tuple(c.shape)} (that of conf), got {tuple(k.shape)}")
    if k.dtype.is_complex:
        raise TypeError(f"correct: expected bool, integer or floating values, got {k.dtype}")
    k64 = k.detach().to(device=c.device, dtype=torch.float64)
    if bool(((k64 != 0) & (k64 != 1)).any()):
        raise ValueError("correct: expected values in {0, 1} (or bool)")
    if c.numel() == 0:
        raise ValueError("no samples: conf is empty")
    return c.reshape(-1), k64.reshape(-1)


def _probs_labels(probs: object, labels: object, name: str = "probs") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 probabilities and (N,) int64 labels in [0, C)."""
    p = _require(name, probs)
    if p.dim() != 2:
        raise ValueError(f"{name}: expected shape (N, C), got {tuple(p.shape)}")
    p64 = _unit_values(name, p)
    c = p.shape[1]
    _checks.check_labels(labels, p.shape[:1], c, -1)
    assert isinstance(labels, torch.Tensor)
    if bool((labels < 0).any()):
        raise ValueError(f"labels: expected class indices in [0, {c}), found {int(labels.min())}")
    if p.shape[0] == 0:
        raise ValueError(f"no samples: {name} is empty")
    return p64, labels.to(device=p64.device, dtype=torch.int64)


def _logits(name: str, x: object) -> torch.Tensor:
    _checks.check_logits(name, x)
    assert isinstance(x, torch.Tensor)
    if x.dim() < 2:
        raise ValueError(f"{name}: expected shape (..., C) with at least 2 dims, got {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name}: expected no NaN values")
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def _logit_pair(teacher_logits: object, student_logits: object) -> tuple[torch.Tensor, torch.Tensor]:
    t = _logits("teacher_logits", teacher_logits)
    s = _logits("student_logits", student_logits)
    assert isinstance(teacher_logits, torch.Tensor) and isinstance(student_logits, torch.Tensor)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits: expected the teacher's shape {tuple(teacher_logits.shape)}, "
            f"got {tuple(student_logits.shape)}"
        )
    if t.shape[0] == 0:
        raise ValueError("no samples: the logits have no rows")
    return t, s.to(t.device)


def _fraction(name: str, value: object, *, open_low: bool) -> float:
    """A float in (0, 1] (open_low) or (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if open_low else (0.0 < v < 1.0)
    if not ok:
        raise ValueError(f"{name}: expected a value in {'(0, 1]' if open_low else '(0, 1)'}, got {value}")
    return v


def _ceil(x: float) -> int:
    """ceil(x), forgiving the last bits of float error (0.95 * 100 -> 95)."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


# ---- binned calibration errors --------------------------------------------------------


def _mass_bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bin of each sample: sort (stable), split like numpy.array_split."""
    n = conf.shape[0]
    q, r = divmod(n, n_bins)
    pos = torch.arange(n, device=conf.device)
    big = r * (q + 1)  # the first r parts hold q + 1 samples
    part = torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    order = torch.sort(conf, stable=True).indices
    bins = torch.empty_like(part)
    bins[order] = part
    return bins


def ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15, norm: str = "l1") -> float:
    """Equal-width-binned calibration error of confidences.

    Args:
        conf: (N,) confidences in [0, 1] (any shape; flattened).
        correct: like ``conf``, 1 where the prediction was right.
        n_bins: M >= 1.
        norm: "l1" ECE = sum_m (n_m/N)|acc_m - conf_m|; "l2" RMS = sqrt(sum_m (n_m/N)(acc_m - conf_m)^2);
            "max" MCE = max over non-empty bins |acc_m - conf_m|.
    """
    check_n_bins(n_bins)
    _checks.check_choice("norm", norm, ("l1", "l2", "max"))
    c, k = _conf_correct(conf, correct)
    count, conf_sum, correct_sum = ref.binned_sums(ref.bin_index(c, n_bins), (c, k), n_bins)
    return binned_calibration_error(count, conf_sum, correct_sum, norm)


def adaptive_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over M equal-mass bins (Nixon et al. 2019's adaptive calibration error).

    Sort by confidence (stable), split into M parts of near-equal size (sizes differ by at
    most one; with N < M some parts are empty), then sum_b (n_b/N)|acc_b - conf_b|.
    Not netcal's "ACE", which is the unweighted average over equal-width bins.
    """
    check_n_bins(n_bins)
    c, k = _conf_correct(conf, correct)
    count, conf_sum, correct_sum = ref.binned_sums(_mass_bins(c, n_bins), (c, k), n_bins)
    return binned_calibration_error(count, conf_sum, correct_sum, "l1")


def classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019): (1/C) sum_k ECE(p_k, 1[y = k]).

    Every class's probability column is binned (equal width) against the indicator of
    that class, whether or not the class was predicted.

    Args:
        probs: (N, C) class probabilities in [0, 1].
        labels: (N,) class indices in [0, C).
    """
    check_n_bins(n_bins)
    p, y = _probs_labels(probs, labels)
    c = p.shape[1]
    hit = torch.nn.functional.one_hot(y, c).to(torch.float64)
    # One binning over C * M slots: class k's bin m is slot k * M + m.
    slots = ref.bin_index(p, n_bins) + n_bins * torch.arange(c, device=p.device)[None, :]
    count, conf_sum, correct_sum = ref.binned_sums(slots.reshape(-1), (p.reshape(-1), hit.reshape(-1)), c * n_bins)
    per_class = [
        binned_calibration_error(
            count[i * n_bins : (i + 1) * n_bins],
            conf_sum[i * n_bins : (i + 1) * n_bins],
            correct_sum[i * n_bins : (i + 1) * n_bins],
            "l1",
        )
        for i in range(c)
    ]
    return sum(per_class) / c


def debiased_ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Kumar et al. (2019)'s debiased L2 calibration error over equal-width bins.

    sqrt(max(0, sum_b (n_b/N) [(conf_b - acc_b)^2 - acc_b (1 - acc_b) / (n_b - 1)])), where
    bins with n_b < 2 contribute 0 (as in the authors' verified_calibration code).  The
    plug-in RMS error ``ece(..., norm="l2")`` is biased upward; this is not.
    """
    check_n_bins(n_bins)
    c, k = _conf_correct(conf, correct)
    count, conf_sum, correct_sum = ref.binned_sums(ref.bin_index(c, n_bins), (c, k), n_bins)
    two = count >= 2
    safe = torch.where(two, count, 2.0)
    acc = correct_sum / safe
    term = (conf_sum / safe - acc).square() - acc * (1.0 - acc) / (safe - 1.0)
    total = torch.where(two, count / c.shape[0] * term, 0.0).sum()
    return math.sqrt(max(float(total), 0.0))


# ---- selective prediction -----------------------------------------------------------


def _by_confidence(conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``correct`` reordered by confidence, highest first; ties keep input order."""
    order = torch.sort(conf, descending=True, stable=True).indices
    return correct[order]


def aurc(conf: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve: (1/N) sum_{k=1..N} (errors among the top k) / k.

    Sorted by confidence descending, ties keeping input order.  Lower is better; a
    perfect ranking of an accuracy-a model gives the minimum for that a.
    """
    c, k = _conf_correct(conf, correct)
    errors = 1.0 - _by_confidence(c, k)
    ranks = torch.arange(1, errors.shape[0] + 1, dtype=torch.float64, device=errors.device)
    return float((errors.cumsum(0) / ranks).mean())


def selective_accuracy(conf: torch.Tensor, correct: torch.Tensor, coverage: float = 0.95) -> float:
    """Accuracy of the ceil(coverage * N) most confident samples (ties keep input order)."""
    cov = _fraction("coverage", coverage, open_low=True)
    c, k = _conf_correct(conf, correct)
    n = c.shape[0]
    keep = min(max(_ceil(cov * n), 1), n)
    return float(_by_confidence(c, k)[:keep].mean())


# ---- teacher versus student -----------------------------------------------------------


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Top-1 agreement: the fraction of rows where argmax teacher == argmax student.

    Args:
        teacher_logits, student_logits: (..., C), same shape; ties go to the lowest index.
    """
    t, s = _logit_pair(teacher_logits, student_logits)
    return float((t.argmax(-1) == s.argmax(-1)).to(torch.float64).mean())


def predictive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean over rows of KL(p_t || p_s) (nats), p = softmax of the logits, in float64.

    Classes the teacher gives probability 0 contribute 0; a class the teacher gives
    mass and the student none makes the KL +inf.
    """
    t, s = _logit_pair(teacher_logits, student_logits)
    rows, _ = kd_row_losses(
        s, t, None, temperature=1.0, alpha=0.0, divergence="forward", beta=0.5, ignore_index=-100
    )
    return float(rows.mean())


# ---- split-conformal prediction sets ---------------------------------------------------


class Coverage(NamedTuple):
    """Empirical coverage P(y in set) and mean prediction-set size."""

    coverage: float
    mean_set_size: float


def conformal_threshold(probs: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1) -> float:
    """Split-conformal threshold on the score 1 - p_y, fitted on a calibration split.

    q = the ceil((n + 1)(1 - alpha))-th smallest calibration score; if that rank exceeds
    n, q = 1.0 (every class enters every set).  For exchangeable test data the sets
    {k : 1 - p_k <= q} contain the label with probability >= 1 - alpha.

    Args:
        probs: (n, C) class probabilities of the calibration split.
        labels: (n,) its labels.
        alpha: miscoverage in (0, 1): the target coverage is 1 - alpha.
    """
    a = _fraction("alpha", alpha, open_low=False)
    p, y = _probs_labels(probs, labels)
    scores = 1.0 - p.gather(1, y[:, None]).squeeze(1)
    n = scores.shape[0]
    rank = _ceil((n + 1) * (1.0 - a))
    if rank > n:
        return 1.0
    return float(torch.sort(scores).values[rank - 1])


def conformal_coverage(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> Coverage:
    """Empirical coverage and mean set size of the sets {k : 1 - p_k <= threshold}.

    Args:
        probs: (N, C) class probabilities of the evaluation split.
        labels: (N,) its labels.
        threshold: from :func:`conformal_threshold` on a calibration split.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise TypeError(f"threshold: expected a float, got {threshold!r}")
    p, y = _probs_labels(probs, labels)
    in_set = (1.0 - p) <= float(threshold)
    covered = in_set.gather(1, y[:, None]).squeeze(1).to(torch.float64)
    return Coverage(float(covered.mean()), float(in_set.sum(1).to(torch.float64).mean()))
