"""kdbench.metrics: against torchmetrics, hand-worked cases from other libraries, properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import binary_calibration_error
from torchmetrics.functional.classification.calibration_error import _ce_compute

from kdbench import metrics

N_BINS = [1, 3, 10, 15, 40]
NORMS = ["l1", "l2", "max"]


def _conf_correct(n: int, seed: int, *, over: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 confidences and correctness drawn from a model over-confident by ``over``."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.3 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = (torch.rand(n, generator=g, dtype=torch.float64) < conf - over).long()
    return conf, correct


# ---- ECE / RMS / MCE against torchmetrics ---------------------------------------------


@pytest.mark.parametrize("n_bins", N_BINS)
@pytest.mark.parametrize("norm", NORMS)
def test_ece_matches_torchmetrics(n_bins, norm):
    conf, correct = _conf_correct(1000, n_bins)
    expected = binary_calibration_error(conf, correct, n_bins=n_bins, norm=norm)
    assert metrics.ece(conf, correct, n_bins=n_bins, norm=norm) == pytest.approx(float(expected), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    conf=st.lists(st.floats(0.0, 0.999999, allow_nan=False), min_size=1, max_size=60),
    data=st.data(),
    n_bins=st.integers(1, 30),
)
def test_ece_matches_torchmetrics_property(conf, data, n_bins):
    correct = data.draw(st.lists(st.integers(0, 1), min_size=len(conf), max_size=len(conf)))
    c = torch.tensor(conf, dtype=torch.float64)
    k = torch.tensor(correct)
    # Away from edges the two bin rules agree; at an edge both use [lo, hi) but compute it
    # differently (floor(conf * M) here, linspace edges there).
    scaled = c * n_bins
    if bool(((scaled - scaled.round()).abs() < 1e-9).any()):
        return
    for norm in NORMS:
        expected = float(binary_calibration_error(c, k, n_bins=n_bins, norm=norm))
        assert metrics.ece(c, k, n_bins=n_bins, norm=norm) == pytest.approx(expected, abs=1e-12)


def test_torchmetrics_binary_docstring_example():
    # torchmetrics BinaryCalibrationError docstring: preds [0.25, 0.25, 0.55, 0.75, 0.75],
    # target [0, 0, 1, 1, 1], n_bins=2: l1 0.2900, l2 0.2918, max 0.3167.
    preds = torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75], dtype=torch.float64)
    target = torch.tensor([0, 0, 1, 1, 1])
    assert metrics.ece(preds, target, n_bins=2, norm="l1") == pytest.approx(0.29, abs=1e-12)
    assert metrics.ece(preds, target, n_bins=2, norm="l2") == pytest.approx(0.2918, abs=5e-5)
    assert metrics.ece(preds, target, n_bins=2, norm="max") == pytest.approx(0.3167, abs=5e-5)


# ---- hand-worked cases from p-lambda/verified_calibration (calibration/util_test.py) ----


def _top_label(probs: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(probs, dtype=torch.float64)
    y = torch.tensor(labels)
    return p.max(-1).values, (p.argmax(-1) == y).long()


def test_verified_calibration_test_ece():
    # test_ece: top-label ECE with 3 equal-width bins = 4/6 * (1 - (0.8 + 0.85 + 0.9 + 1.0) / 4).
    probs = [[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.0, 0.9, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.2, 0.0, 0.85]]
    conf, correct = _top_label(probs, [0, 0, 1, 1, 0, 2])
    assert metrics.ece(conf, correct, n_bins=3) == pytest.approx(4 / 6 * (1 - (0.8 + 0.85 + 0.9 + 1.0) / 4), abs=1e-12)


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_verified_calibration_binary_ce(norm, p):
    # test_get_binary_ce: binary probabilities against 0/1 labels (the labels are the
    # "correctness" of predicting class 1): (4/9 * 0.25^p + 5/9 * 0.2^p)^(1/p).
    probs = torch.tensor([0.5, 0.5, 0.5, 0.6, 0.5, 0.6, 0.6, 0.6, 0.6], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0])
    expected = (4 / 9 * 0.25**p + 5 / 9 * 0.2**p) ** (1 / p)
    assert metrics.ece(probs, labels, n_bins=15, norm=norm) == pytest.approx(expected, abs=1e-12)


def test_verified_calibration_marginal_ce_is_classwise_ece():
    # test_get_three_label_ce, marginal mode, p = 1: the mean over classes of each
    # class's calibration error (every distinct value falls in its own bin with M = 15).
    l0, l1, l2 = [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.0, 0.9]
    probs = torch.tensor([l0] * 6 + [l1] * 4 + [l2] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    expected = (
        4 / 42 * 0.1 + 6 / 42 * (5 / 6 - 0.6) + 8 / 42 * 0.1 + 4 / 42 * 0.05 + 6 / 42 * (0.3 - 1 / 6)
    )
    assert metrics.classwise_ece(probs, labels, n_bins=15) == pytest.approx(expected, abs=1e-12)


def test_verified_calibration_debiased_is_below_plugin():
    # test_get_binary_ce: the debiased estimate is below the plug-in one.
    probs = torch.tensor([0.5, 0.5, 0.5, 0.6, 0.5, 0.6, 0.6, 0.6, 0.6], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0])
    plug_in = metrics.ece(probs, labels, n_bins=15, norm="l2")
    # By hand: bin of 0.5 (n=4, ybar=1/4): 4/9 * (0.25^2 - 3/16/3); bin of 0.6 (n=5, ybar=0.8):
    # 5/9 * (0.2^2 - 0.16/4).
    expected = math.sqrt(max(4 / 9 * (0.0625 - 0.0625) + 5 / 9 * (0.04 - 0.04), 0.0))
    # Both bracketed terms are 0 in exact arithmetic; the square root magnifies rounding.
    assert metrics.debiased_ece(probs, labels, n_bins=15) == pytest.approx(expected, abs=1e-7)
    assert metrics.debiased_ece(probs, labels, n_bins=15) < plug_in


# ---- debiased, adaptive, classwise ----------------------------------------------------------


def test_debiased_ece_matches_torchmetrics_when_every_bin_has_two_samples():
    conf, correct = _conf_correct(2000, 7)
    count = torch.bincount(torch.floor(conf * 10).long(), minlength=10)
    assert bool(((count == 0) | (count >= 2)).all())
    expected = float(_ce_compute(conf, correct.double(), 10, norm="l2", debias=True))
    assert metrics.debiased_ece(conf, correct, n_bins=10) == pytest.approx(expected, abs=1e-12)


def test_debiased_ece_drops_singleton_bins():
    # One sample alone in bin 0 (no variance estimate): it contributes 0, as in Kumar et al.'s code.
    conf = torch.tensor([0.05, 0.95, 0.95, 0.95], dtype=torch.float64)
    correct = torch.tensor([1, 0, 0, 1])
    rest = 3 / 4 * ((0.95 - 1 / 3) ** 2 - (1 / 3) * (2 / 3) / 2)
    assert metrics.debiased_ece(conf, correct, n_bins=10) == pytest.approx(math.sqrt(rest), abs=1e-12)


def test_debiased_ece_is_clamped_at_zero():
    conf = torch.full((10,), 0.55, dtype=torch.float64)
    correct = torch.tensor([1, 0] * 5)
    assert metrics.debiased_ece(conf, correct) == 0.0


def test_adaptive_ece_hand_worked():
    # Two equal-mass bins: {0.1, 0.2, 0.3} with 1 of 3 correct, {0.4, 0.5, 0.6} all correct.
    conf = torch.tensor([0.4, 0.1, 0.6, 0.2, 0.5, 0.3], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 0, 1, 1])
    expected = 0.5 * abs(1 / 3 - 0.2) + 0.5 * abs(1 - 0.5)
    assert metrics.adaptive_ece(conf, correct, n_bins=2) == pytest.approx(expected, abs=1e-12)


def test_adaptive_ece_part_sizes_follow_array_split():
    # 7 samples in 3 parts: sizes 3, 2, 2 (numpy.array_split); each part all wrong, so the
    # error is the mean confidence.  With more bins than samples, parts of one.
    conf = torch.linspace(0.3, 0.9, 7, dtype=torch.float64)
    wrong = torch.zeros(7, dtype=torch.long)
    assert metrics.adaptive_ece(conf, wrong, n_bins=3) == pytest.approx(float(conf.mean()), abs=1e-12)
    right = torch.ones(7, dtype=torch.long)
    assert metrics.adaptive_ece(conf, right, n_bins=20) == pytest.approx(float((1 - conf).mean()), abs=1e-12)
    from kdbench.metrics import _mass_bins

    assert torch.bincount(_mass_bins(conf, 3)).tolist() == [3, 2, 2]


def test_adaptive_ece_equals_ece_when_mass_and_width_bins_coincide():
    conf = torch.tensor([0.1, 0.2, 0.6, 0.7], dtype=torch.float64)
    correct = torch.tensor([0, 1, 1, 0])
    assert metrics.adaptive_ece(conf, correct, n_bins=2) == pytest.approx(metrics.ece(conf, correct, n_bins=2))


def test_classwise_ece_two_classes_equals_binary_ece_twice():
    # With two classes, class 1's column is p and class 0's is 1 - p: both columns' errors
    # are the binary ECE of p against y when no confidence sits on an edge.
    g = torch.Generator().manual_seed(3)
    p1 = torch.rand(300, generator=g, dtype=torch.float64)
    y = (torch.rand(300, generator=g, dtype=torch.float64) < p1).long()
    probs = torch.stack([1 - p1, p1], -1)
    binary = metrics.ece(p1, y, n_bins=10)
    assert metrics.classwise_ece(probs, y, n_bins=10) == pytest.approx(binary, abs=1e-12)


# ---- selective prediction ------------------------------------------------------------------


def test_aurc_hand_worked():
    # Sorted by confidence: correct, wrong, correct -> risks 0, 1/2, 1/3.
    conf = torch.tensor([0.7, 0.9, 0.8], dtype=torch.float64)
    correct = torch.tensor([1, 1, 0])
    assert metrics.aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3, abs=1e-15)


def test_aurc_ties_keep_input_order():
    conf = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert metrics.aurc(conf, torch.tensor([0, 1])) == pytest.approx((1 + 1 / 2) / 2)
    assert metrics.aurc(conf, torch.tensor([1, 0])) == pytest.approx((0 + 1 / 2) / 2)


def test_aurc_perfect_and_worst_ranking():
    correct = torch.tensor([1, 1, 1, 0])
    good = torch.tensor([0.9, 0.8, 0.7, 0.1], dtype=torch.float64)
    bad = torch.tensor([0.2, 0.3, 0.4, 0.9], dtype=torch.float64)
    assert metrics.aurc(good, correct) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4)
    assert metrics.aurc(bad, correct) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_selective_accuracy():
    conf = torch.arange(100, 0, -1, dtype=torch.float64) / 100  # 1.00, 0.99, ..., 0.01
    correct = torch.ones(100, dtype=torch.long)
    correct[95:] = 0  # the five least confident are wrong
    assert metrics.selective_accuracy(conf, correct, coverage=0.95) == 1.0  # keeps 95, not 96
    assert metrics.selective_accuracy(conf, correct, coverage=0.96) == pytest.approx(95 / 96)
    assert metrics.selective_accuracy(conf, correct, coverage=1.0) == pytest.approx(0.95)
    assert metrics.selective_accuracy(conf, correct, coverage=1e-6) == 1.0  # at least one sample
    eighth_wrong = torch.ones(100, dtype=torch.long)
    eighth_wrong[7] = 0
    # 0.07 * 100 is 7.000000000000001 in floating point: seven are kept, not eight.
    assert metrics.selective_accuracy(conf, eighth_wrong, coverage=0.07) == 1.0
    assert metrics.selective_accuracy(conf, eighth_wrong, coverage=0.08) == pytest.approx(7 / 8)


# ---- teacher versus student -------------------------------------------------------------


def test_agreement():
    t = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [5.0, 5.0, 0.0], [1.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 9.0, 0.0], [1.0, 0.0, 0.0], [3.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    # argmax t: 1, 2, 0 (tie -> 0), 0; argmax s: 1, 0, 0 (tie -> 0), 0.
    assert metrics.agreement(t, s) == 0.75
    assert metrics.agreement(t.reshape(2, 2, 3), s.reshape(2, 2, 3)) == 0.75


def test_predictive_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 8, generator=g, dtype=torch.float64)
    s = torch.randn(50, 8, generator=g, dtype=torch.float64)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert metrics.predictive_kl(t, s) == pytest.approx(float(expected), rel=1e-12)
    assert metrics.predictive_kl(t, t) == pytest.approx(0.0, abs=1e-15)


def test_predictive_kl_zero_and_infinite_mass():
    inf = float("inf")
    t = torch.tensor([[0.0, -inf]])
    assert metrics.predictive_kl(t, torch.tensor([[0.0, 3.0]])) == pytest.approx(math.log1p(math.exp(3.0)))
    assert metrics.predictive_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -inf]])) == inf


# ---- conformal prediction ----------------------------------------------------------------


def test_conformal_threshold_is_the_finite_sample_quantile():
    # Scores 1 - p_y = 0.1, 0.2, ..., 0.9; n = 9, alpha = 0.2: rank ceil(10 * 0.8) = 8 -> 0.8.
    p_y = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    probs = torch.stack([p_y, 1 - p_y], -1)
    labels = torch.zeros(9, dtype=torch.long)
    assert metrics.conformal_threshold(probs, labels, alpha=0.2) == pytest.approx(0.8)
    # alpha = 0.05: rank ceil(9.5) = 10 > n, every class enters every set.
    assert metrics.conformal_threshold(probs, labels, alpha=0.05) == 1.0


def test_conformal_coverage_counts_sets():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    # threshold 0.65: sets {k : p_k >= 0.35} = {0}, {0, 1}, {2}.
    cov = metrics.conformal_coverage(probs, labels, 0.65)
    assert cov.coverage == pytest.approx(2 / 3) and cov.mean_set_size == pytest.approx(4 / 3)
    coverage, size = metrics.conformal_coverage(probs, labels, 1.0)
    assert coverage == 1.0 and size == 3.0


def test_conformal_reaches_the_target_on_exchangeable_data():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6000, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits * 0.7, -1), 1, generator=g).squeeze(1)
    probs = torch.softmax(logits, -1)
    q = metrics.conformal_threshold(probs[:2000], labels[:2000], alpha=0.1)
    cov = metrics.conformal_coverage(probs[2000:], labels[2000:], q)
    # Marginal guarantee >= 0.9 on average over calibration draws; this draw's sd is ~0.007.
    assert 0.88 <= cov.coverage <= 0.93
    assert 1.0 <= cov.mean_set_size <= 5.0


# ---- bad input ---------------------------------------------------------------------------


def test_bad_confidences():
    good = torch.tensor([0.5, 0.7], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"conf: expected values in \[0, 1\]"):
        metrics.ece(torch.tensor([0.5, 1.2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="conf: expected values"):
        metrics.aurc(torch.tensor([0.5, float("nan")]), torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="conf: expected a floating dtype"):
        metrics.ece(torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"correct: expected values in \{0, 1\}"):
        metrics.ece(good, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="correct: expected shape"):
        metrics.adaptive_ece(good, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        metrics.selective_accuracy(torch.zeros(0, dtype=torch.float64), torch.zeros(0))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.debiased_ece(good, torch.tensor([1, 0]), n_bins=0)
    with pytest.raises(ValueError, match="norm"):
        metrics.ece(good, torch.tensor([1, 0]), norm="l3")
    with pytest.raises(ValueError, match=r"coverage: expected a value in \(0, 1\]"):
        metrics.selective_accuracy(good, torch.tensor([1, 0]), coverage=0.0)
    with pytest.raises(TypeError, match="conf: expected a torch.Tensor"):
        metrics.ece([0.5], torch.tensor([1]))


def test_bad_probabilities_and_logits():
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"probs: expected shape \(N, C\)"):
        metrics.classwise_ece(probs[0], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 2\)"):
        metrics.conformal_threshold(probs, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 2\)"):
        metrics.conformal_coverage(probs, torch.tensor([-1]), 0.5)
    with pytest.raises(ValueError, match=r"alpha: expected a value in \(0, 1\)"):
        metrics.conformal_threshold(probs, torch.tensor([0]), alpha=1.0)
    with pytest.raises(TypeError, match="threshold"):
        metrics.conformal_coverage(probs, torch.tensor([0]), float("nan"))
    with pytest.raises(ValueError, match="student_logits: expected the teacher's shape"):
        metrics.agreement(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="teacher_logits: expected no NaN"):
        metrics.predictive_kl(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="teacher_logits: expected shape"):
        metrics.agreement(torch.zeros(3), torch.zeros(3))
