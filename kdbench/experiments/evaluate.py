"""Evaluation of one model's predictions: the metrics a calibration study reports.

Every calibration metric comes from :func:`kdbench.calibration_stats`,
:func:`kdbench.fit_temperature` and :mod:`kdbench.metrics`; this module only decides
which split each is computed on:

* the validation split fits the temperature T (Guo et al. 2017) and the
  split-conformal threshold (target coverage 90%);
* everything else is measured on the test split.

Fields (:data:`METRIC_FIELDS`, all floats; None where a field does not apply):

=========================  =================================================================
``accuracy``               top-1 accuracy
``nll``, ``brier``         mean negative log-likelihood, mean multi-class Brier score
``ece``, ``rms_ce``, ``mce``  equal-width (15 bins) ECE, RMS calibration error, maximum CE
``adaptive_ece``           equal-mass (15 bins) ECE
``classwise_ece``          per-class ECE averaged over classes
``debiased_ece``           Kumar et al. 2019's debiased L2 estimate
``aurc``                   area under the risk-coverage curve
``selective_accuracy_95``  accuracy on the 95% most confident test samples
``conformal_coverage_90``  split-conformal empirical coverage at target 90%
``conformal_set_size_90``  mean prediction-set size at that threshold
``fitted_temperature``     T fitted on validation (temperature scaling)
``ece_ts``, ``nll_ts``     ECE and NLL of softmax(z / T) on test
``true_ce``, ``true_ce_ts``  E|conf - P(y = pred | x)| with the Bayes posterior, before / after
                           temperature scaling (``gaussian`` only)
``agreement``              top-1 agreement with the teacher (students only)
``predictive_kl``          mean KL(p_teacher || p_student) on test (students only)
=========================  =================================================================
"""

from __future__ import annotations

from typing import Any

import torch

import kdbench
from kdbench import metrics

N_BINS = 15
SELECTIVE_COVERAGE = 0.95
CONFORMAL_ALPHA = 0.1  # target coverage 1 - alpha = 90%

METRIC_FIELDS: tuple[str, ...] = (
    "accuracy",
    "nll",
    "brier",
    "ece",
    "rms_ce",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "debiased_ece",
    "aurc",
    "selective_accuracy_95",
    "conformal_coverage_90",
    "conformal_set_size_90",
    "fitted_temperature",
    "ece_ts",
    "nll_ts",
    "true_ce",
    "true_ce_ts",
    "agreement",
    "predictive_kl",
)


# Per-bin sums of the test split's calibration statistics (equal-width, N_BINS bins), kept in
# the record as lists so that reliability diagrams can pool seeds exactly (the sums add).
RELIABILITY_FIELDS: tuple[str, ...] = ("bin_count", "bin_conf_sum", "bin_correct_sum")


def true_calibration_error(logits: torch.Tensor, posterior: torch.Tensor, temperature: float = 1.0) -> float:
    """``mean_i |conf_i - posterior_i[pred_i]|``: the calibration error against the true posterior.

    Args:
        logits: (N, C) model logits; conf = max softmax(logits / T), pred = argmax (lowest index on ties).
        posterior: (N, C) the Bayes posterior P(y = k | x_i) of each sample.

    An unbiased sample mean of E_x |conf(x) - P(y = pred(x) | x)| - no bins, no labels.
    It bounds the binned ECE's target E|E[1(y = pred) | conf] - conf| from above (Jensen).
    """
    if logits.shape != posterior.shape or logits.dim() != 2:
        raise ValueError(
            f"posterior: expected the logits' shape {tuple(logits.shape)} (N, C), got {tuple(posterior.shape)}"
        )
    p = torch.softmax(logits.double() / temperature, dim=-1)
    conf, pred = p.max(dim=-1)
    truth = posterior.double().gather(-1, pred[:, None]).squeeze(-1)
    return float((conf - truth).abs().mean())


def evaluate_predictions(
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    posterior_test: torch.Tensor | None = None,
    teacher_test_logits: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every field of :data:`METRIC_FIELDS` for one model, from its validation and test logits ``(N, C)``.

    Also :data:`RELIABILITY_FIELDS`, lists of the test split's per-bin sums (the same
    statistics the ECE comes from).
    """
    out: dict[str, float | None] = dict.fromkeys(METRIC_FIELDS)
    stats = kdbench.calibration_stats(test_logits, test_labels, n_bins=N_BINS, inputs="logits")
    out["accuracy"] = stats.accuracy()
    out["nll"] = stats.nll()
    out["brier"] = stats.brier()
    out["ece"] = stats.ece("l1")
    out["rms_ce"] = stats.ece("l2")
    out["mce"] = stats.ece("max")

    probs = torch.softmax(test_logits.double(), dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = pred == test_labels
    out["adaptive_ece"] = metrics.adaptive_ece(conf, correct, n_bins=N_BINS)
    out["classwise_ece"] = metrics.classwise_ece(probs, test_labels, n_bins=N_BINS)
    out["debiased_ece"] = metrics.debiased_ece(conf, correct, n_bins=N_BINS)
    out["aurc"] = metrics.aurc(conf, correct)
    out["selective_accuracy_95"] = metrics.selective_accuracy(conf, correct, coverage=SELECTIVE_COVERAGE)

    val_probs = torch.softmax(val_logits.double(), dim=-1)
    threshold = metrics.conformal_threshold(val_probs, val_labels, alpha=CONFORMAL_ALPHA)
    coverage, set_size = metrics.conformal_coverage(probs, test_labels, threshold)
    out["conformal_coverage_90"] = coverage
    out["conformal_set_size_90"] = set_size

    t = kdbench.fit_temperature(val_logits, val_labels)
    scaled = kdbench.calibration_stats(test_logits, test_labels, n_bins=N_BINS, temperature=t, inputs="logits")
    out["fitted_temperature"] = t
    out["ece_ts"] = scaled.ece("l1")
    out["nll_ts"] = scaled.nll()

    if posterior_test is not None:
        out["true_ce"] = true_calibration_error(test_logits, posterior_test)
        out["true_ce_ts"] = true_calibration_error(test_logits, posterior_test, t)
    if teacher_test_logits is not None:
        out["agreement"] = metrics.agreement(teacher_test_logits, test_logits)
        out["predictive_kl"] = metrics.predictive_kl(teacher_test_logits, test_logits)
    fields: dict[str, Any] = {k: (None if v is None else float(v)) for k, v in out.items()}
    fields.update(bin_count=stats.count.tolist(), bin_conf_sum=stats.conf_sum.tolist(),
                  bin_correct_sum=stats.correct_sum.tolist())
    return fields
