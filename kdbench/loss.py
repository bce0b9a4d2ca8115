"""Public distillation loss: :func:`kd_loss` and the :class:`KDLoss` module.

The convention, stated loudly because libraries disagree (RepDistiller scales by
T², torchdistill and Liger-Kernel do not; TRL once defaulted to a silent 0.5 mix):

    row loss = alpha * CE(z_s, y)  +  (1 - alpha) * T² * D(p_t, p_s)

with ``p = softmax(z / T)`` and ``D`` the chosen divergence.  ``alpha`` defaults to
0 (pure distillation) and T to 1, so nothing is mixed in unless asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdbench import _checks
from kdbench import reference

DIVERGENCES = ("forward", "reverse", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")


def _check_options(
    temperature: object,
    alpha: object,
    divergence: object,
    beta: object,
    reduction: object,
    ignore_index: object,
    backend: object,
) -> dict[str, Any]:
    opts = {
        "temperature": _checks.check_temperature(temperature),
        "alpha": _checks.check_unit_interval("alpha", alpha, open_=False),
        "divergence": _checks.check_choice("divergence", divergence, DIVERGENCES),
        "beta": _checks.check_unit_interval("beta", beta, open_=True),
        "reduction": _checks.check_choice("reduction", reduction, REDUCTIONS),
        "backend": _checks.check_backend(backend),
    }
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    opts["ignore_index"] = ignore_index
    return opts


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation loss between student and teacher logits.

    Args:
        student_logits: (..., V) float32/float16/bfloat16/float64.
        teacher_logits: (..., V), same shape, any of those dtypes (it may differ from the
            student's); treated as a constant (no gradient).
        labels: (...) integer class indices, or None. Rows whose label equals
            ``ignore_index`` contribute 0 to both terms, whatever ``alpha`` (at alpha = 0
            labels still mask padding), and are not counted by "batchmean".
        temperature: T > 0; ``p = softmax(z / T)`` for the soft term.
        alpha: weight in [0, 1] of the hard cross-entropy (at T = 1); > 0 needs labels.
        divergence: "forward" = KL(p_t || p_s); "reverse" = KL(p_s || p_t);
            "jsd" = beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s.
        beta: JSD mixture weight in (0, 1).
        reduction: "batchmean" (sum of row losses / counted rows), "sum", or "none" (one
            value per row, shaped like the leading dims).
        ignore_index: label value that marks a row as ignored.
        backend: "triton" (fused kernels), "torch" (the reference), or "auto" (triton on
            CUDA tensors, torch otherwise or when either input is float64).

    Returns:
        The loss: a scalar, or (...) for "none".  Row loss =
        alpha (logsumexp(z_s) - z_s[y]) + (1 - alpha) T² D(p_t, p_s).

    Dtypes:
        Any mix of float32, float16, bfloat16 and float64 is accepted.  The arithmetic and
        the loss are float64 when either input is float64 (the torch backend: "auto" picks
        it, "triton" raises TypeError), else float32.  The gradient has the student's dtype.

    No counted rows:
        An empty batch (N = 0, e.g. shape (0, V) or (B, 0, V)) or one whose every label is
        ``ignore_index`` gives a loss of 0 ("batchmean" and "sum"; "none": zeros shaped
        like the leading dims) and a zero gradient.  ``F.cross_entropy(reduction="mean")``
        returns NaN there; 0 lets a padding-only micro-batch of gradient accumulation add
        nothing instead of turning the accumulated gradient into NaN.
    """
    opts = _check_options(temperature, alpha, divergence, beta, reduction, ignore_index, backend)
    _checks.check_logits("student_logits", student_logits)
    _checks.check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits: expected device {student_logits.device} (the student's), got {teacher_logits.device}"
        )
    v = student_logits.shape[-1]
    if labels is not None:
        _checks.check_labels(labels, student_logits.shape[:-1], v, opts["ignore_index"])
        if labels.device != student_logits.device:
            raise ValueError(f"labels: expected device {student_logits.device}, got {labels.device}")
    elif opts["alpha"] > 0:
        raise ValueError(f"labels: alpha={opts['alpha']} > 0 mixes in cross-entropy, which needs labels")
    backend_name = _checks.resolve_backend(opts.pop("backend"), student_logits, teacher_logits)
    if backend_name == "triton":
        from kdbench.kernels.kd_loss import kd_loss_triton

        return kd_loss_triton(student_logits, teacher_logits, labels, **opts)
    return reference.kd_loss(student_logits, teacher_logits, labels, **opts)


class KDLoss(nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; options are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None)`` returns ``kd_loss(...)``
    with the options given here. Options are validated when the module is built.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 0.0,
        divergence: str = "forward",
        beta: float = 0.5,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = _check_options(temperature, alpha, divergence, beta, reduction, ignore_index, backend)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
