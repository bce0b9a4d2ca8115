"""calibration_stats / CalibrationStats: definitions, hand-worked cases, edges, merging, bad input.

Backend "torch" throughout; tests/test_calibration_kernel.py holds triton versus torch.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from calibration_helpers import assert_counts_match, make_logits, near_edge, oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.classification import binary_calibration_error

import kdbench
from kdbench import CalibrationStats, calibration_stats
from kdbench.reference import calibration as ref_cal
from kdbench.reference._common import compute_dtype

SHAPES = [(1, 2), (7, 3), (64, 10), (200, 37), (3, 4, 5)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Tolerances of the per-sample means against the float64 oracle, by compute dtype:
# float32 arithmetic on (up-cast) logits, float64 sums.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
N_BINS = [1, 2, 15, 100]


def _stats(z: torch.Tensor, y: torch.Tensor, **kw) -> CalibrationStats:
    return calibration_stats(z, y, backend="torch", **kw)


# ---- against the float64 oracle and torchmetrics ----------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_means_match_the_float64_oracle(shape, dtype):
    n, c = math.prod(shape[:-1]), shape[-1]
    z, y = make_logits(n, c, dtype=dtype, seed=n + c)
    z, y = z.reshape(shape), y.reshape(shape[:-1])
    s = _stats(z, y)
    conf, correct, nll, brier = oracle(z.reshape(-1, c), y.reshape(-1))
    tol = TOL[dtype]
    assert float(s.n) == n
    assert s.accuracy() == pytest.approx(float(correct.mean()), abs=1e-12)
    assert s.nll() == pytest.approx(float(nll.mean()), rel=tol, abs=tol)
    assert s.brier() == pytest.approx(float(brier.mean()), rel=tol, abs=tol)
    assert float(s.conf_sum.sum()) == pytest.approx(float(conf.sum()), rel=tol)


@pytest.mark.parametrize("n_bins", N_BINS)
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_ece_matches_torchmetrics_on_float64(n_bins, norm):
    z, y = make_logits(500, 10, dtype=torch.float64, seed=n_bins)
    conf, correct, _, _ = oracle(z, y)
    assert not bool((conf == 1.0).any())  # torchmetrics bins 1.0 differently (#3510)
    expected = binary_calibration_error(conf, correct.long(), n_bins=n_bins, norm=norm)
    assert _stats(z, y, n_bins=n_bins).ece(norm) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bin_counts_match_the_oracle_except_at_edges(dtype):
    z, y = make_logits(400, 12, dtype=dtype, seed=3)
    conf, _, _, _ = oracle(z, y)
    s = _stats(z, y, n_bins=15)
    expected = torch.bincount(torch.floor(conf * 15).clamp(max=14).long(), minlength=15)
    assert_counts_match(s.count, expected, int(near_edge(conf, 15, 1e-6).sum()))


# ---- hand-worked cases from other libraries' documentation and tests --------------------


def test_torchmetrics_multiclass_docstring_example():
    # torchmetrics MulticlassCalibrationError docstring: these probabilities, n_bins=3,
    # give l1 0.2000, l2 0.2082, max 0.2333.  Logits log(p) reproduce p exactly in softmax.
    probs = torch.tensor(
        [[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]], dtype=torch.float64
    )
    s = _stats(probs.log(), torch.tensor([0, 1, 2, 0]), n_bins=3)
    assert s.ece("l1") == pytest.approx(0.2, abs=5e-5)
    assert s.ece("l2") == pytest.approx(0.2082, abs=5e-5)
    assert s.ece("max") == pytest.approx(0.2333, abs=5e-5)
    # By hand: bin [1/3, 2/3) holds 0.55, 0.55, 0.60 with one correct; bin [2/3, 1] holds 0.9, correct.
    assert s.ece() == pytest.approx(0.75 * abs(1 / 3 - 1.7 / 3) + 0.25 * 0.1, abs=1e-12)


def test_verified_calibration_missing_classes_ece():
    # p-lambda/verified_calibration calibration/util_test.py::test_missing_classes_ece:
    # get_ece([[0.9, 0.1], [0.8, 0.2]], [0, 0]) == 0.15 (15 equal-width bins, top label).
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=torch.float64)
    assert _stats(probs.log(), torch.tensor([0, 0])).ece() == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize("norm,p", [("l1", 1), ("l2", 2)])
def test_verified_calibration_two_label_top_ce(norm, p):
    # verified_calibration util_test.py::test_get_two_label_ce: rows [0.5, 0.5] / [0.4, 0.6]
    # with these labels have top-label CE (4/9 * 0.25^p + 5/9 * 0.2^p)^(1/p).  The tie
    # [0.5, 0.5] predicts class 0 (lowest index), as there.
    pt5, pt6 = [0.5, 0.5], [0.4, 0.6]
    probs = torch.tensor([pt5, pt5, pt5, pt6, pt5, pt6, pt6, pt6, pt6], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0])
    expected = (4 / 9 * 0.25**p + 5 / 9 * 0.2**p) ** (1 / p)
    assert _stats(probs.log(), labels).ece(norm) == pytest.approx(expected, abs=1e-12)


def test_verified_calibration_three_label_top_ce():
    # verified_calibration util_test.py::test_get_three_label_ce, top-label, p = 1.
    l0, l1, l2 = [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.0, 0.9]
    probs = torch.tensor([l0] * 6 + [l1] * 4 + [l2] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    expected = 6 / 14 * (5 / 6 - 0.6) + 4 / 14 * 0.05 + 4 / 14 * 0.1
    assert _stats(probs.log(), labels).ece() == pytest.approx(expected, abs=1e-12)


def test_netcal_rule_for_confidence_one_differs_from_torchmetrics():
    # netcal (netcal/metrics/Miscalibration.py) clips confidences to [eps, 1 - eps] before
    # binning, so 1.0 is counted in the last bin, as here.  Worked by hand with M = 10:
    # bin 9 = {1.0, 1.0, 0.95}, 2 of 3 correct: |2/3 - 2.95/3| * 3/4 = 0.2375;
    # bin 6 = {0.65}, correct: 0.35 * 1/4 = 0.0875; ECE = 0.325.  torchmetrics puts the two
    # 1.0s in a hidden 11th bin (its issue #3510): 2/4 * 0.5 + 1/4 * 0.05 + 0.0875 = 0.35.
    conf = torch.tensor([1.0, 1.0, 0.95, 0.65], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1])
    assert kdbench.metrics.ece(conf, correct, n_bins=10) == pytest.approx(0.325, abs=1e-12)
    assert float(binary_calibration_error(conf, correct, n_bins=10)) == pytest.approx(0.35, abs=1e-12)
    # The same through logits: [0, -inf] has confidence exactly 1.0.
    inf = float("inf")
    logits = torch.tensor([[0.0, -inf], [-inf, 0.0], [0.95, 0.05], [0.65, 0.35]], dtype=torch.float64)
    logits[2:] = logits[2:].log()
    s = _stats(logits, torch.tensor([0, 0, 0, 0]), n_bins=10)
    assert s.count.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 3]
    assert s.ece() == pytest.approx(0.325, abs=1e-12)


# ---- edge cases ----------------------------------------------------------------------------


def test_confidence_exactly_one_goes_to_the_last_bin():
    # exp(-200) underflows float32 to 0: the confidence is exactly 1.0.
    z = torch.tensor([[0.0, -200.0], [5.0, float("-inf")]])
    s = _stats(z, torch.tensor([0, 1]), n_bins=4)
    assert s.count.tolist() == [0, 0, 0, 2]
    assert s.conf_sum.tolist() == [0, 0, 0, 2.0]
    assert s.correct_sum.tolist() == [0, 0, 0, 1.0]


@pytest.mark.parametrize("c,n_bins,expected_bin", [(2, 2, 1), (4, 4, 1), (4, 2, 0), (2, 4, 2), (8, 8, 1)])
def test_confidence_on_a_bin_edge_goes_to_the_upper_bin(c, n_bins, expected_bin):
    # Equal logits give confidence 1/C exactly (a power of two here): bins are [lo, hi).
    s = _stats(torch.zeros(1, c), torch.tensor([0]), n_bins=n_bins)
    assert s.count.nonzero().flatten().tolist() == [expected_bin]
    assert float(s.conf_sum[expected_bin]) == 1 / c


def test_empty_bins_take_no_part():
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    s = _stats(z, torch.tensor([0, 0, 0]), n_bins=10)
    full = s.count > 0
    assert int(full.sum()) == 2 and float(s.count.sum()) == 3
    rel = s.reliability()
    assert torch.isnan(rel.confidence[~full]).all() and torch.isnan(rel.accuracy[~full]).all()
    gaps = (rel.accuracy[full] - rel.confidence[full]).abs()
    assert s.ece("max") == pytest.approx(float(gaps.max()), abs=1e-15)


def test_one_sample():
    z = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    s = _stats(z, torch.tensor([1]))
    conf = float(torch.softmax(z, -1).max())
    assert s.ece() == pytest.approx(1 - conf, abs=1e-15) == pytest.approx(s.ece("max"))
    assert s.ece("l2") == pytest.approx(1 - conf, abs=1e-15)
    assert s.accuracy() == 1.0


def test_all_correct_ece_is_one_minus_mean_confidence_per_bin():
    z, _ = make_logits(300, 5, dtype=torch.float64, seed=11)
    y = z.argmax(-1)
    s = _stats(z, y)
    conf = torch.softmax(z, -1).max(-1).values
    assert s.accuracy() == 1.0
    assert s.ece() == pytest.approx(float(1 - conf.mean()), abs=1e-12)


def test_all_wrong_ece_is_mean_confidence():
    z, _ = make_logits(300, 5, dtype=torch.float64, seed=12)
    y = (z.argmax(-1) + 1) % 5
    s = _stats(z, y)
    conf = torch.softmax(z, -1).max(-1).values
    assert s.accuracy() == 0.0
    assert s.ece() == pytest.approx(float(conf.mean()), abs=1e-12)


def test_ties_predict_the_lowest_index():
    z = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    s = _stats(z, torch.tensor([1, 0]))
    assert s.accuracy() == 1.0
    s = _stats(z, torch.tensor([2, 1]))
    assert s.accuracy() == 0.0


def test_ignored_rows_are_left_out_and_never_read():
    z, y = make_logits(50, 6, seed=5, ignore_frac=0.3)
    z[y == -100] = float("nan")
    s = _stats(z, y)
    keep = y != -100
    ref = _stats(z[keep], y[keep])
    assert float(s.n) == int(keep.sum())
    for name in ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum"):
        assert torch.equal(getattr(s, name), getattr(ref, name))


def test_no_samples_metrics_raise():
    s = _stats(torch.randn(4, 3), torch.full((4,), -100))
    assert float(s.n) == 0 and float(s.count.sum()) == 0
    for method in (s.ece, s.accuracy, s.nll, s.brier, s.reliability):
        with pytest.raises(ValueError, match="no samples"):
            method()
    with pytest.raises(ValueError, match="no samples"):
        CalibrationStats.zeros(15).ece("max")


def test_temperature_divides_the_logits():
    z, y = make_logits(80, 7, seed=8)
    a = _stats(z, y, temperature=2.0)
    b = _stats(z * 0.5, y)
    for name in ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_neg_inf_logits_are_zero_probability():
    z = torch.tensor([[0.0, float("-inf"), 0.0]])
    s = _stats(z, torch.tensor([2]))
    assert s.nll() == pytest.approx(math.log(2), abs=1e-7)
    assert s.brier() == pytest.approx(0.5, abs=1e-7)  # (1/2)^2 + 0 + (1/2)^2
    s = _stats(z, torch.tensor([1]))
    assert s.nll() == math.inf


def test_nan_logits_raise_naming_the_rows():
    z, y = make_logits(20, 4, seed=1)
    z[3, 1] = float("nan")
    z[17, 0] = float("inf")
    with pytest.raises(ValueError, match=r"logits: rows \[3, 17\]"):
        _stats(z, y)


def test_overflow_after_temperature_is_reported():
    z = torch.tensor([[3e38, 0.0]])
    with pytest.raises(ValueError, match=r"logits: rows \[0\]"):
        _stats(z, torch.tensor([0]), temperature=0.5)


# ---- merging -------------------------------------------------------------------------------


def test_merge_of_parts_equals_the_whole():
    z, y = make_logits(300, 9, seed=21, ignore_frac=0.1)
    whole = _stats(z, y)
    parts = [_stats(z[i : i + 70], y[i : i + 70]) for i in range(0, 300, 70)]
    merged = sum(parts)
    assert isinstance(merged, CalibrationStats)
    assert torch.equal(merged.count, whole.count) and float(merged.n) == float(whole.n)
    for name in ("conf_sum", "correct_sum", "nll_sum", "brier_sum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-13, atol=1e-13)
    assert merged.ece() == pytest.approx(whole.ece(), abs=1e-13)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(1, 8),
    cut=st.integers(0, 40),
    n_bins=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_merge_property(n, c, cut, n_bins, seed):
    z, y = make_logits(n, c, seed=seed, ignore_frac=0.2)
    cut = min(cut, n)
    whole = _stats(z, y, n_bins=n_bins)
    merged = _stats(z[:cut], y[:cut], n_bins=n_bins) + _stats(z[cut:], y[cut:], n_bins=n_bins)
    assert torch.equal(merged.count, whole.count)
    torch.testing.assert_close(merged.conf_sum, whole.conf_sum, rtol=1e-13, atol=1e-13)
    if float(whole.n) > 0:
        assert 0.0 <= whole.ece() <= 1.0
        assert whole.ece("l1") <= whole.ece("l2") + 1e-12 <= whole.ece("max") + 2e-12


def test_statistics_are_deterministic():
    z, y = make_logits(500, 11, seed=2)
    a, b = _stats(z, y), _stats(z, y)
    for name in ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum", "n"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_add_checks_its_operand():
    a = CalibrationStats.zeros(15)
    with pytest.raises(ValueError, match="other: expected statistics with 15 bins"):
        a + CalibrationStats.zeros(10)
    with pytest.raises(TypeError):
        a + 1.0  # noqa: B018
    assert (0 + a) is a


def test_to_dict_round_trip():
    z, y = make_logits(60, 4, seed=9)
    s = _stats(z, y)
    back = CalibrationStats.from_dict(s.to_dict())
    for name in ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum", "n"):
        assert torch.equal(getattr(back, name), getattr(s, name))
    with pytest.raises(ValueError, match="d: missing field 'n'"):
        CalibrationStats.from_dict({k: v for k, v in s.to_dict().items() if k != "n"})


def test_reliability_means_and_edges():
    conf = torch.tensor([0.1, 0.2, 0.75, 0.8], dtype=torch.float64)
    logits = torch.stack([conf.log(), (1 - conf).log()], -1)
    s = _stats(logits, torch.tensor([0, 1, 0, 0]), n_bins=2)
    rel = s.reliability()
    # Confidences max(p, 1 - p) are 0.9, 0.8, 0.75, 0.8: all in [0.5, 1]; predictions
    # 1, 1, 0, 0 against labels 0, 1, 0, 0: three correct.
    assert rel.count.tolist() == [0.0, 4.0]
    assert rel.lower.tolist() == [0.0, 0.5] and rel.upper.tolist() == [0.5, 1.0]
    assert float(rel.confidence[1]) == pytest.approx((0.9 + 0.8 + 0.75 + 0.8) / 4, abs=1e-12)
    assert float(rel.accuracy[1]) == 0.75


def test_statistics_validate_their_fields():
    z = torch.zeros(3, dtype=torch.float64)
    s = torch.zeros((), dtype=torch.float64)
    with pytest.raises(TypeError, match="count: expected a float64 tensor"):
        CalibrationStats(z.float(), z, z, s, s, s)
    with pytest.raises(ValueError, match="conf_sum: expected shape"):
        CalibrationStats(z, torch.zeros(4, dtype=torch.float64), z, s, s, s)
    with pytest.raises(ValueError, match="nll_sum: expected a 0-dim tensor"):
        CalibrationStats(z, z, z, z, s, s)


def test_all_reduce_without_a_process_group_raises():
    with pytest.raises(RuntimeError, match="all_reduce: torch.distributed is not initialized"):
        CalibrationStats.zeros(3).all_reduce()


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"n_bins": 0}, ValueError, "n_bins: expected an int >= 1"),
        ({"n_bins": 2.0}, TypeError, "n_bins"),
        ({"n_bins": True}, TypeError, "n_bins"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"inputs": "prob"}, ValueError, "inputs: expected one of 'auto', 'logits', 'probs'"),
        ({"inputs": None}, ValueError, "inputs: expected one of"),
    ],
)
def test_bad_options(kwargs, exc, match):
    z, y = make_logits(4, 3)
    with pytest.raises(exc, match=match):
        calibration_stats(z, y, **kwargs)


def test_bad_tensors():
    z, y = make_logits(4, 3)
    with pytest.raises(ValueError, match="logits: expected shape .* at least 2 dims"):
        calibration_stats(z[0], y[0])
    with pytest.raises(TypeError, match="logits"):
        calibration_stats(z.long(), y)
    with pytest.raises(ValueError, match="labels: expected shape"):
        calibration_stats(z, y[:3])
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        calibration_stats(z, y.float())
    with pytest.raises(ValueError, match="labels: expected class indices in \\[0, 3\\)"):
        calibration_stats(z, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels: expected class indices"):
        calibration_stats(z, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="labels"):
        calibration_stats(z, [0, 1, 2, 0])


def test_metric_method_rejects_unknown_norm():
    z, y = make_logits(4, 3)
    with pytest.raises(ValueError, match="norm: expected one of"):
        calibration_stats(z, y).ece("l3")


def test_calibration_rows_shapes_follow_the_labels():
    z, y = make_logits(12, 5, seed=4, ignore_frac=0.3)
    rows = kdbench.calibration.calibration_rows(z.reshape(3, 4, 5), y.reshape(3, 4), backend="torch")
    assert rows.conf.shape == (3, 4) and rows.pred.dtype == torch.int64
    assert torch.equal(rows.counted, (y != -100).reshape(3, 4))
    assert bool((rows.pred[~rows.counted] == -1).all()) and bool((rows.conf[~rows.counted] == 0).all())


@pytest.mark.parametrize("n_bins", [1, 15, 70000])
def test_both_binning_paths_agree(n_bins):
    # CPU runs torch.bincount; other devices run the chunked one-hot sum (several chunks here).
    from kdbench.reference.calibration import _sums_bincount, _sums_one_hot

    g = torch.Generator().manual_seed(n_bins)
    n = 3000
    bins = torch.randint(0, n_bins, (n,), generator=g)
    vals = (torch.rand(n, generator=g), torch.rand(n, generator=g) < 0.5)
    mask = torch.rand(n, generator=g) < 0.8
    a = _sums_bincount(bins, vals, n_bins, mask)
    b = _sums_one_hot(bins, vals, n_bins, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[1], b[1], rtol=1e-13, atol=1e-13)
    assert float(a[0].sum()) == int(mask.sum())


# ---- the GPU strategy (few large blocks, fused passes) -----------------------------------
# Every non-CPU device takes it; here it is switched on for CPU tensors (CI has no GPU),
# and runs on CUDA itself where a GPU is present.  Compared with the CPU strategy, the
# only differences are the order of summation (S' and sum e^2 from one Welford pass) and
# the exp implementation.


ROW_TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 3e-6, torch.bfloat16: 3e-6}


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def gpu_path(request, monkeypatch):
    """The device whose tensors take the GPU strategy, in blocks of 7 rows at C = 37."""
    monkeypatch.setattr(ref_cal, "_DEVICE_ROW_BLOCK_ELEMENTS", 7 * 37)
    if request.param == "cpu":
        monkeypatch.setattr(ref_cal, "gpu_strategy", lambda device: True)
    return request.param


def _hard_logits(n, c, dtype, seed):
    """Logits with ignored NaN padding, a NaN, a +inf, an all -inf and a partly -inf row, and a bad label."""
    z, y = make_logits(n, c, dtype=torch.float64, seed=seed, ignore_frac=0.2)
    z[y == -100] = float("nan")
    y[:6] = torch.arange(6) % c
    z[0, 1 % c] = float("nan")
    z[1, 0] = float("inf")
    z[2] = float("-inf")
    z[3, : c // 2] = float("-inf")
    z[4, 0] = 50.0  # a confidence of exactly 1.0 in float32 once C is small
    y[5] = c  # a label outside [0, C): NaN statistics (CUDA does not check labels)
    return z.to(dtype), y


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(6, 2), (40, 37), (300, 37), (23, 1000)])
def test_gpu_strategy_rows_match_the_cpu_strategy(n, c, dtype, temperature, gpu_path):
    z, y = _hard_logits(n, c, dtype, seed=n + c)
    kw = dict(temperature=temperature, ignore_index=-100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref_cal, "gpu_strategy", lambda device: False)
        cpu = ref_cal.calibration_rows(z, y, **kw)
    gpu = ref_cal.calibration_rows(z.to(gpu_path), y.to(gpu_path), **kw)
    assert torch.equal(gpu.counted.cpu(), cpu.counted) and torch.equal(gpu.pred.cpu(), cpu.pred)
    for name in ("conf", "nll", "brier"):
        a, b = getattr(gpu, name).cpu(), getattr(cpu, name)
        assert a.dtype == b.dtype == compute_dtype(dtype)
        torch.testing.assert_close(a, b, rtol=ROW_TOL[dtype], atol=ROW_TOL[dtype], equal_nan=True, msg=name)
    assert torch.isnan(gpu.conf[[0, 1, 2, 5]].cpu()).all() and torch.isfinite(gpu.conf[[3, 4]].cpu()).all()


@pytest.mark.parametrize("n_bins", [1, 15, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_strategy_means_match_the_float64_oracle(dtype, n_bins, gpu_path):
    z, y = make_logits(300, 37, dtype=dtype, seed=n_bins, ignore_frac=0.1)
    z[y == -100] = float("nan")
    s = _stats(z.to(gpu_path), y.to(gpu_path), n_bins=n_bins).to("cpu")
    conf, correct, nll, brier = oracle(z, y)
    tol = TOL[dtype]
    assert float(s.n) == len(conf)
    assert s.accuracy() == pytest.approx(float(correct.mean()), abs=1e-12)
    assert s.nll() == pytest.approx(float(nll.mean()), rel=tol, abs=tol)
    assert s.brier() == pytest.approx(float(brier.mean()), rel=tol, abs=tol)
    assert float(s.conf_sum.sum()) == pytest.approx(float(conf.sum()), rel=tol)
    expected = torch.bincount(torch.floor(conf * n_bins).clamp(max=n_bins - 1).long(), minlength=n_bins)
    assert_counts_match(s.count, expected, int(near_edge(conf, n_bins, 1e-6).sum()))


def test_gpu_strategy_exact_confidences(gpu_path):
    """Confidence exactly 1.0 goes to the last bin; equal logits give exactly 1/C, on the edge."""
    z = torch.tensor([[0.0, -200.0], [5.0, float("-inf")]], device=gpu_path)
    s = _stats(z, torch.tensor([0, 1], device=gpu_path), n_bins=4)
    assert s.count.tolist() == [0, 0, 0, 2] and s.conf_sum.tolist() == [0, 0, 0, 2.0]
    for temperature in (1.0, 3.0):
        s = _stats(torch.zeros(3, 4, device=gpu_path), torch.tensor([0, 1, 2], device=gpu_path), n_bins=4,
                   temperature=temperature)
        assert s.count.tolist() == [0, 3, 0, 0] and s.conf_sum.tolist() == [0, 0.75, 0, 0]


def test_gpu_strategy_uses_few_blocks():
    """(65536, 32000) runs in 16 blocks of one 512 MiB float32 buffer; the CPU keeps 4 MiB blocks."""
    rows = ref_cal.rows_per_block(32000, torch.device("cuda"))  # a device object needs no GPU
    assert -(-65536 // rows) <= 16 and rows * 32000 * 4 <= 512 * 2**20
    assert ref_cal.rows_per_block(32000, torch.device("cpu")) == (1 << 20) // 32000
    assert ref_cal.rows_per_block(10**9, torch.device("cuda")) == 1


# ---- inputs: logits or probabilities ------------------------------------------------------

PROBS_WARNING = r"^logits: .*look like probabilities.*inputs='probs'.*inputs='logits'"


def _silent(fn, *args, **kw):
    """``fn(*args, **kw)``, failing on the probabilities warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="logits: the first", category=UserWarning)
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_warns_when_rows_look_like_probabilities(dtype):
    z, y = make_logits(40, 6, seed=30)
    p = torch.softmax(z.double(), dim=-1).to(dtype)
    with pytest.warns(UserWarning, match=PROBS_WARNING) as record:
        _stats(p, y)
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match=PROBS_WARNING):
        kdbench.calibration.calibration_rows(p, y, backend="torch")


SILENT_CASES = {
    "logits": lambda z: (z, "auto"),
    "log_probabilities": lambda z: (torch.log_softmax(z, -1), "auto"),
    "non_negative_not_summing_to_one": lambda z: (2 * torch.softmax(z, -1), "auto"),
    "probabilities_declared_as_logits": lambda z: (torch.softmax(z, -1), "logits"),
    "probabilities_declared_as_probs": lambda z: (torch.softmax(z, -1), "probs"),
}


@pytest.mark.parametrize("case", sorted(SILENT_CASES))
def test_auto_is_silent_unless_rows_look_like_probabilities(case):
    z, y = make_logits(40, 6, seed=31)
    x, inputs = SILENT_CASES[case](z)
    _silent(_stats, x, y, inputs=inputs)


def test_auto_is_silent_for_one_class():
    # softmax of a single class is 1 whatever the logit: reading it either way gives the same statistics.
    _silent(_stats, torch.ones(5, 1), torch.zeros(5, dtype=torch.long))


def test_auto_reads_only_the_first_counted_rows():
    z, y = make_logits(30, 5, seed=32)
    p = torch.softmax(z, dim=-1)
    y[:3] = -100
    z[:3] = float("nan")  # ignored padding is skipped, not read
    first = z.clone()
    first[3:11] = p[3:11]
    with pytest.warns(UserWarning, match="the first 8 counted rows"):
        _stats(first, y)
    later = p.clone()
    later[:11] = z[:11]  # logits in the first 8 counted rows, probabilities after them
    _silent(_stats, later, y)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_probs_give_the_statistics_of_their_logits(dtype, temperature):
    """softmax(log p) = p, so p = softmax(z) as probabilities gives the statistics of z (to rounding)."""
    z, y = make_logits(300, 9, dtype=torch.float64, seed=33, ignore_frac=0.1)
    p = torch.softmax(z, dim=-1).to(dtype)
    p[y == -100] = float("nan")
    got = _stats(p, y, inputs="probs", temperature=temperature)
    want = _stats(z, y, temperature=temperature)
    conf, _, _, _ = oracle(z, y, temperature=temperature)
    tol = TOL[dtype]
    assert_counts_match(got.count, want.count, int(near_edge(conf, 15, 10 * tol).sum()))
    assert torch.equal(got.correct_sum.sum(), want.correct_sum.sum())
    for name in ("conf_sum", "nll_sum", "brier_sum"):
        torch.testing.assert_close(getattr(got, name).sum(), getattr(want, name).sum(), rtol=tol, atol=tol)


def test_probs_temperature_raises_p_to_one_over_t():
    p = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    rows = kdbench.calibration.calibration_rows(p, torch.tensor([1, 1]), temperature=2.0, inputs="probs")
    assert float(rows.conf[0]) == pytest.approx(0.75**0.5 / (0.25**0.5 + 0.75**0.5), rel=1e-6)
    assert float(rows.conf[1]) == 1.0 and rows.nll[1] == math.inf  # a zero probability at the label


def test_probs_rows_are_checked_on_cpu():
    p = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(34)), dim=-1)
    y = torch.tensor([0, 1, 2, -100])
    p[3] = float("nan")  # an ignored row is not checked
    negative = p.clone()
    negative[1, 0] = -0.01
    with pytest.raises(ValueError, match=r"^logits: inputs='probs' expects probabilities >= 0, but rows \[1\]"):
        _stats(negative, y, inputs="probs")
    off = p.clone()
    off[2] *= 1.01
    with pytest.raises(ValueError, match=r"^logits: inputs='probs' expects rows summing to 1 .*rows \[2\]"):
        _stats(off, y, inputs="probs")
    nan = p.clone()
    nan[0, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^logits: .*rows \[0\]"):
        _stats(nan, y, inputs="probs")
    assert float(_stats(p, y, inputs="probs").n) == 3


def test_probs_sum_tolerance_follows_the_dtype():
    p = torch.tensor([[0.5, 0.5 + 5e-4], [0.5, 0.5]])
    y = torch.tensor([0, 1])
    _stats(p, y, inputs="probs")  # float32: within 1e-3
    with pytest.raises(ValueError, match="within 0.001"):
        _stats(p + torch.tensor([[0.0, 2e-3], [0.0, 0.0]]), y, inputs="probs")
    # One rounding of each of 1000 probabilities to bfloat16 stays within its 1e-2.
    z, y = make_logits(16, 1000, seed=35)
    pb = torch.softmax(z, dim=-1).to(torch.bfloat16)
    assert float(_stats(pb, y, inputs="probs").n) == 16
    with pytest.raises(ValueError, match="within 0.01"):
        _stats(pb * 1.02, y, inputs="probs")


def test_internal_callers_pass_logits_without_the_warning():
    from kdbench.experiments.evaluate import evaluate_predictions

    # Logits that happen to be non-negative and sum to 1 per row: a caller that knows it holds logits says so.
    z, y = make_logits(64, 4, seed=36, scale=1.0)
    z = torch.softmax(z.double(), dim=-1)
    out = _silent(evaluate_predictions, z, y, z, y)
    assert out["ece"] == pytest.approx(_stats(z, y, inputs="logits").ece())


def test_unsigned_labels_with_a_negative_ignore_index_are_refused():
    # uint8 would turn ignore_index=-100 into class 156 and drop those rows silently.
    logits = torch.randn(4, 200)
    labels = torch.tensor([1, 156, 3, 199], dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"labels: an unsigned dtype \(torch.uint8\) cannot hold ignore_index=-100"):
        kdbench.calibration_stats(logits, labels)
    with pytest.raises(TypeError, match=r"labels: an unsigned dtype"):
        kdbench.kd_loss(logits, torch.randn(4, 200), labels, alpha=0.5)
    stats = kdbench.calibration_stats(logits, labels.long())
    assert float(stats.count.sum()) == 4
