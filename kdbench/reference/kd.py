"""Reference distillation loss: the semantics the Triton kernel must reproduce.

Notation (shapes: N rows after flattening the leading dims, V classes):

* ``a = z_s / T`` and ``b = z_t / T``; ``log p_s = log_softmax(a)``, ``log p_t = log_softmax(b)``.
* forward KL  = sum_j p_t (log p_t - log p_s)                      (Hinton et al. 2015)
* reverse KL  = sum_j p_s (log p_s - log p_t)                      (MiniLLM)
* JSD_beta    = beta KL(p_t || M) + (1 - beta) KL(p_s || M),  M = beta p_t + (1 - beta) p_s
* soft row    = T^2 * divergence;  hard row = logsumexp(z_s) - z_s[y]  (cross-entropy at T = 1)
* row loss    = alpha * hard + (1 - alpha) * soft

A probability that is exactly zero contributes exactly zero (never ``0 * log 0``
= NaN); every ``where`` below sanitises *both* branches so that autograd sees no
NaN either (the usual ``torch.where`` gradient trap).  Where the mathematics gives
+inf (reverse KL with p_t = 0 < p_s, or a hard label whose logit is -inf) the row
loss is +inf and its gradient is undefined (non-finite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdbench.reference._common import compute_dtype, reduce_rows
from kdbench.reference.kd_fused import kd_loss_fused


def _p_log_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p * (log p - log q)`` with ``0 * anything = 0`` (values and gradients).

    ``p != 0`` rather than ``p > 0``: a NaN probability (a NaN or +inf logit) must
    propagate to the loss, never be masked into a silent 0.
    """
    pos = p != 0
    diff = torch.where(pos, log_p, 0.0) - torch.where(pos, log_q, 0.0)
    return torch.where(pos, p * diff, 0.0)


def _log_mixture(log_pt: torch.Tensor, log_ps: torch.Tensor, beta: float) -> torch.Tensor:
    """``log(beta p_t + (1 - beta) p_s)``; -inf (with a zero gradient) where both are zero."""
    both_zero = torch.isneginf(log_pt) & torch.isneginf(log_ps)
    x = torch.where(both_zero, 0.0, log_pt + math.log(beta))
    y = torch.where(both_zero, 0.0, log_ps + math.log1p(-beta))
    return torch.where(both_zero, float("-inf"), torch.logaddexp(x, y))


def kd_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses of (N, V) logits and the mask of counted rows.

    Returns ``(rows, counted)``: ``rows`` (N,) in float32 (float64 when either input is
    float64), 0 on ignored rows; ``counted`` (N,) bool.
    """
    cdt = compute_dtype(student.dtype, teacher.dtype)
    s = student.to(cdt)
    t = teacher.detach().to(cdt)
    n = s.shape[0]
    if labels is not None:
        counted = labels != ignore_index
        # Ignored rows may hold anything (padding): compute on zeros so that no
        # inf/NaN from them can leak into values or gradients.
        s = torch.where(counted[:, None], s, 0.0)
        t = torch.where(counted[:, None], t, 0.0)
    else:
        counted = torch.ones(n, dtype=torch.bool, device=s.device)
    rows = torch.zeros(n, dtype=cdt, device=s.device)
    if alpha < 1.0:
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t / temperature, dim=-1)
        p_s, p_t = log_ps.exp(), log_pt.exp()
        if divergence == "forward":
            div = _p_log_ratio(p_t, log_pt, log_ps).sum(-1)
        elif divergence == "reverse":
            div = _p_log_ratio(p_s, log_ps, log_pt).sum(-1)
        else:
            log_m = _log_mixture(log_pt, log_ps, beta)
            div = beta * _p_log_ratio(p_t, log_pt, log_m).sum(-1) + (1.0 - beta) * _p_log_ratio(
                p_s, log_ps, log_m
            ).sum(-1)
        rows = rows + (1.0 - alpha) * temperature**2 * div
    if alpha > 0.0:
        assert labels is not None
        safe = torch.where(counted, labels, 0).long()
        # -log_softmax, not logsumexp - z_y: its backward forms exp(x - max - log-sum),
        # exact for large logits, where exp(x - lse) loses digits to the rounded lse.
        hard = -F.log_softmax(s, dim=-1).gather(-1, safe[:, None]).squeeze(-1)
        rows = rows + alpha * hard
    rows = torch.where(counted, rows, 0.0)
    return rows, counted


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
) -> torch.Tensor:
    """Reference ``kd_loss`` on already-validated arguments; see :func:`kdbench.kd_loss`.

    Shapes: logits (..., V), labels (...) or None.  Returns a scalar for
    "batchmean"/"sum", a tensor shaped like the leading dims for "none".

    float32/float16/bfloat16 logits take the chunked path of
    :mod:`kdbench.reference.kd_fused` (loss and analytic gradient in one sweep, same
    values); a float64 student or teacher takes :func:`kd_loss_autograd`, the autograd
    formula, because float64 is the tests' oracle and must not depend on the path it checks.
    """
    opts = dict(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return kd_loss_autograd(student_logits, teacher_logits, labels, **opts)
    return kd_loss_fused(student_logits, teacher_logits, labels, **opts)


def kd_loss_autograd(
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
) -> torch.Tensor:
    """``kd_loss`` through autograd over :func:`kd_row_losses`: the oracle formula.

    Same arguments, shapes and results as :func:`kd_loss`; slower (autograd keeps
    several (N, V) intermediates), and differentiable twice.
    """
    v = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    flat_labels = labels.reshape(-1) if labels is not None else None
    rows, counted = kd_row_losses(
        student_logits.reshape(-1, v),
        teacher_logits.reshape(-1, v),
        flat_labels,
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
    )
    return reduce_rows(rows, counted.sum(), reduction, lead)
