"""fit_temperature: closed forms, optimality, invariances, degenerate cases, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from calibration_helpers import make_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from kdbench import calibration_stats, fit_temperature

RTOL = 1e-9


def _nll(z: torch.Tensor, y: torch.Tensor, t: float) -> float:
    return float(F.cross_entropy(z.double() / t, y))


def test_closed_form_of_a_two_class_example():
    # p(class 1) = sigmoid(1 / T) must equal the label frequency 3/4: 1 / T = ln 3.
    t = fit_temperature(torch.tensor([[0.0, 1.0]] * 4), torch.tensor([1, 1, 1, 0]))
    assert t == pytest.approx(1 / math.log(3), rel=RTOL)


@pytest.mark.parametrize("gap", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("q", [0.55, 0.75, 0.9, 0.99])
def test_binary_closed_form(gap, q):
    # Logits [0, gap] and a fraction q of label 1: sigmoid(gap / T) = q, T = gap / logit(q).
    n = 200
    k = round(q * n)
    y = torch.tensor([1] * k + [0] * (n - k))
    z = torch.tensor([[0.0, gap]] * n, dtype=torch.float64)
    expected = gap / math.log((k / n) / (1 - k / n))
    assert fit_temperature(z, y) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("c", [3, 10, 100])
def test_multiclass_closed_form(c):
    # Logits [1, 0, ..., 0] with label 0 in a fraction q of rows (others spread over the
    # rest): p_0 = e^b / (e^b + C - 1) = q gives b = ln(q (C - 1) / (1 - q)).
    q = 0.6
    n = 50 * (c - 1)
    k = round(q * n)
    z = torch.zeros(n, c)
    z[:, 0] = 1.0
    y = torch.cat([torch.zeros(k, dtype=torch.long), 1 + torch.arange(n - k) % (c - 1)])
    expected = 1 / math.log((k / n) * (c - 1) / (1 - k / n))
    assert fit_temperature(z, y) == pytest.approx(expected, rel=RTOL)


def test_optimum_beats_a_dense_grid_and_is_stationary():
    z, y = make_logits(400, 10, dtype=torch.float64, seed=4, scale=4.0)
    t = fit_temperature(z, y)
    best = _nll(z, y, t)
    grid = torch.logspace(-1, 1.5, 400, dtype=torch.float64).tolist()
    assert best <= min(_nll(z, y, g) for g in grid) + 1e-12
    # First-order condition: the mean expected logit under p equals the mean true-class logit.
    p = torch.softmax(z / t, -1)
    assert float((p * z).sum(-1).mean()) == pytest.approx(float(z.gather(1, y[:, None]).mean()), abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 20.0), c=st.integers(2, 12))
def test_stationarity_property(seed, scale, c):
    z, y = make_logits(60, c, dtype=torch.float64, seed=seed, scale=scale)
    # Make sure the data are not separable and not anti-informative: a few flipped rows.
    y[:6] = (z[:6].argmax(-1) + 1) % c
    y[6:12] = z[6:12].argmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            t = fit_temperature(z, y)
        except RuntimeWarning:
            return  # optimum outside the default bounds: covered by the degenerate tests
    p = torch.softmax(z / t, -1)
    g = float(((p * z).sum(-1) - z.gather(1, y[:, None]).squeeze(1)).mean())
    assert abs(g) <= 1e-8 * max(1.0, float(z.abs().max()))
    assert 1e-2 <= t <= 1e2


def test_scaling_the_logits_scales_the_temperature():
    z, y = make_logits(200, 6, dtype=torch.float64, seed=7)
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0 * fit_temperature(z, y), rel=1e-8)


def test_shifting_rows_changes_nothing():
    z, y = make_logits(200, 6, dtype=torch.float64, seed=8)
    shifted = z + torch.randn(200, 1, dtype=torch.float64) * 100
    assert fit_temperature(shifted, y) == pytest.approx(fit_temperature(z, y), rel=1e-8)


def test_low_precision_logits_are_fitted_in_float64():
    z, y = make_logits(200, 6, dtype=torch.float64, seed=9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        zl = z.to(dtype)
        assert fit_temperature(zl, y) == pytest.approx(fit_temperature(zl.double(), y), rel=1e-12)


def test_ignored_rows_are_left_out():
    z, y = make_logits(120, 5, dtype=torch.float64, seed=10, ignore_frac=0.25)
    z[y == -100] = float("nan")
    keep = y != -100
    assert fit_temperature(z, y) == pytest.approx(fit_temperature(z[keep], y[keep]), rel=1e-12)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    z, y = make_logits(500, 10, seed=11, scale=8.0)
    t = fit_temperature(z, y)
    assert t > 1.0
    before = calibration_stats(z, y)
    after = calibration_stats(z, y, temperature=t)
    assert after.nll() < before.nll()
    assert after.ece() < before.ece()


@pytest.mark.parametrize("target", [0.05, 40.0])
def test_far_from_one(target):
    # Temperatures far from 1 in both directions, where LBFGS from T = 1.5 struggles.
    z, y = make_logits(300, 5, dtype=torch.float64, seed=12, scale=3.0)
    t_star = fit_temperature(z, y)
    t = fit_temperature(z * (target / t_star), y)
    assert t == pytest.approx(target, rel=1e-8)


# ---- degenerate cases ---------------------------------------------------------------------


def test_separable_data_return_t_min_with_a_warning():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="T -> 0"):
        assert fit_temperature(z, torch.tensor([0, 1, 0])) == 1e-2
    with pytest.warns(RuntimeWarning, match="T -> 0"):
        assert fit_temperature(z, torch.tensor([0, 1, 0]), bounds=(0.5, 3.0)) == 0.5


def test_equal_logits_return_one_with_a_warning():
    with pytest.warns(RuntimeWarning, match="does not depend on T"):
        assert fit_temperature(torch.full((4, 3), 2.0), torch.tensor([0, 1, 2, 0])) == 1.0


def test_anti_informative_logits_return_t_max_with_a_warning():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="T -> inf"):
        assert fit_temperature(z, torch.tensor([1, 0])) == 1e2


def test_always_positive_and_inside_the_bounds():
    z, y = make_logits(100, 4, dtype=torch.float64, seed=13)
    for bounds in [(0.9, 1.1), (1e-3, 1e3), (2.0, 5.0)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = fit_temperature(z, y, bounds=bounds)
        assert bounds[0] <= t <= bounds[1]


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input():
    z, y = make_logits(6, 3)
    with pytest.raises(ValueError, match="bounds: expected"):
        fit_temperature(z, y, bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="bounds: expected"):
        fit_temperature(z, y, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="rtol"):
        fit_temperature(z, y, rtol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        fit_temperature(z, y, max_iter=0)
    with pytest.raises(ValueError, match="labels: no counted rows"):
        fit_temperature(z, torch.full((6,), -100))
    bad = z.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits: rows \[4\]"):
        fit_temperature(bad, y)
    bad = z.clone()
    bad[1, y[1]] = float("-inf")
    with pytest.raises(ValueError, match=r"logits: rows \[1\] have a -inf logit at the label"):
        fit_temperature(bad, y)
    with pytest.raises(ValueError, match="labels: expected shape"):
        fit_temperature(z, y[:2])
    with pytest.raises(ValueError, match="logits: expected shape"):
        fit_temperature(z[0], y[0])
