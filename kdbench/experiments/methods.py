"""Training objectives: the label baselines and the distillation methods.

Every KL-family distillation loss goes through :func:`kdbench.kd_loss`, so its
convention holds throughout::

    row loss = alpha * CE(z_s, y) + (1 - alpha) * T^2 * D(p_t, p_s),   p = softmax(z / T)

=================  ==========================================================================
method             objective (z_s student logits, z_t teacher logits, y labels)
=================  ==========================================================================
``ce``             CE(z_s, y)
``label_smoothing`` CE with smoothed targets (1 - eps) 1[y] + eps / C, eps = ``smoothing``
``kd``             kd_loss(divergence="forward"): KL(p_t || p_s) (Hinton et al. 2015)
``kd_reverse``     kd_loss(divergence="reverse"): KL(p_s || p_t)
``kd_jsd``         kd_loss(divergence="jsd", beta): generalised Jensen-Shannon
``kd_ts``          ``kd`` with z_t / T_val: the teacher temperature-scaled on the validation split first
``kd_ls_teacher``  ``kd`` from a teacher trained with label smoothing ``smoothing`` (Mueller et al. 2019)
``self_distill``   ``kd`` from a teacher of the student's own architecture (born-again networks)
``ensemble_kd``    ``kd`` with z_t = log mean_k softmax(z_t^(k)): the mean probability of K teachers
``logit_mse``      alpha CE + (1 - alpha) mean_j (z_s,j - z_t,j)^2 (Ba & Caruana 2014's logit regression)
``entropy_match``  CE + lambda (H(p_s) - H(p_t))^2 per row, H at T = 1, lambda = ``entropy_weight``
``oracle_kd``      ``kd`` from the ideal teacher, z_t = log P(y | x): the dataset's true Bayes posterior,
                   which only synthetic data (``gaussian``) has; a teacher model is optional
=================  ==========================================================================

``logit_mse`` and ``entropy_match`` are not divergences between p_t and p_s, so
they are written in torch here rather than through ``kd_loss``.  Row losses are
averaged over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kdbench.experiments.datasets import DATASETS, Dataset
from kdbench.loss import kd_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    needs_teacher: bool  # a teacher is mandatory (ce / label_smoothing may still name one, for comparison)
    teacher_smoothing: bool = False  # the teacher is trained with label smoothing
    teacher_temperature_scaled: bool = False  # teacher logits divided by their validation-fitted T
    ensemble: bool = False  # the teacher is the mean probability of `ensemble_size` teachers
    same_architecture: bool = False  # teacher = student architecture
    bayes_teacher: bool = False  # the teacher signal is the dataset's Bayes posterior, log P(y | x)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("ce", needs_teacher=False),
        MethodInfo("label_smoothing", needs_teacher=False),
        MethodInfo("kd", needs_teacher=True),
        MethodInfo("kd_reverse", needs_teacher=True),
        MethodInfo("kd_jsd", needs_teacher=True),
        MethodInfo("kd_ts", needs_teacher=True, teacher_temperature_scaled=True),
        MethodInfo("kd_ls_teacher", needs_teacher=True, teacher_smoothing=True),
        MethodInfo("self_distill", needs_teacher=True, same_architecture=True),
        MethodInfo("ensemble_kd", needs_teacher=True, ensemble=True),
        MethodInfo("logit_mse", needs_teacher=True),
        MethodInfo("entropy_match", needs_teacher=True),
        # A teacher model is optional, as for ce: named, it is evaluated alongside for comparison.
        MethodInfo("oracle_kd", needs_teacher=False, bayes_teacher=True),
    )
}

_DIVERGENCE = {
    "kd": "forward",
    "kd_reverse": "reverse",
    "kd_jsd": "jsd",
    "kd_ts": "forward",
    "kd_ls_teacher": "forward",
    "self_distill": "forward",
    "ensemble_kd": "forward",
    "oracle_kd": "forward",
}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Row entropies ``H(softmax(z)) = -sum_j p_j log p_j`` of ``(N, C)`` logits, ``(N,)``; 0 log 0 = 0."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * torch.where(torch.isneginf(log_p), 0.0, log_p)).sum(-1)


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """``log mean_k softmax(z^(k))``: logits whose softmax is the ensemble's mean probability."""
    log_p = torch.stack([F.log_softmax(z.float(), dim=-1) for z in member_logits])
    return torch.logsumexp(log_p, dim=0) - math.log(len(member_logits))


def no_posterior_error(method: str, dataset: str) -> ValueError:
    """The error of a ``bayes_teacher`` method asked to run on a dataset without a known posterior."""
    known = ", ".join(repr(name) for name, info in DATASETS.items() if info.posterior) + ", hmm_v<V>, ginc_v<V>"
    return ValueError(
        f"method: {method!r} distils from the dataset's true Bayes posterior, known only for {known}; "
        f"dataset {dataset!r} has none, expected another method"
    )


def bayes_teacher_logits(method: str, data: Dataset, x: torch.Tensor) -> torch.Tensor:
    """``log P(y | x)`` under ``data``'s Bayes posterior, float32 ``(N, C)``: ``oracle_kd``'s teacher logits.

    float32 like every trained teacher's logits, so that the loss runs in the same precision.
    """
    if data.bayes_logits is None:
        raise no_posterior_error(method, data.name)
    return F.log_softmax(data.bayes_logits(x), dim=-1).float()


def make_loss(
    method: str,
    *,
    temperature: float = 4.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    smoothing: float = 0.1,
    entropy_weight: float = 1.0,
) -> LossFn:
    """The training objective of ``method`` as ``loss(student_logits, labels, teacher_logits) -> scalar``.

    ``student_logits`` and ``teacher_logits`` are ``(N, C)``; labels ``(N,)`` int64.
    ``teacher_logits`` is None for ``ce`` and ``label_smoothing`` (ignored if given) and
    must already be the method's teacher signal (temperature-scaled for ``kd_ts``, the
    ensemble's :func:`ensemble_logits` for ``ensemble_kd``, ``log P(y | x)`` for ``oracle_kd``).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "ce":
        return lambda s, y, t: F.cross_entropy(s, y)
    if method == "label_smoothing":
        return lambda s, y, t: F.cross_entropy(s, y, label_smoothing=smoothing)
    if method in _DIVERGENCE:
        div = _DIVERGENCE[method]

        def kd(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            return kd_loss(s, _need(t, method), y, temperature=temperature, alpha=alpha, divergence=div, beta=beta)

        return kd
    if method == "logit_mse":

        def logit_mse(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            mse = F.mse_loss(s, _need(t, method).detach().to(s.dtype))
            return alpha * F.cross_entropy(s, y) + (1.0 - alpha) * mse if alpha > 0 else mse

        return logit_mse

    def entropy_match(s: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        gap = entropy(s) - entropy(_need(t, method).detach())
        return F.cross_entropy(s, y) + entropy_weight * (gap * gap).mean()

    return entropy_match


def _need(t: torch.Tensor | None, method: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"teacher_logits: method {method!r} distils from a teacher; got None")
    return t
