"""The fused calibration kernel against the torch backend and the float64 oracle.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py): shapes stay small,
except for a few rows with C > 65536 and C = 262,147, which stream through many tiles.
"""

from __future__ import annotations

import math

import pytest
import torch
from calibration_helpers import make_logits, near_edge, oracle
from hypothesis import given, settings
from hypothesis import strategies as st

from kdbench import CalibrationStats, calibration_stats
from kdbench.calibration import calibration_rows
from kdbench.kernels._utils import tile_plan
from kdbench.kernels.calibration import MAX_BINS, TILE_CONFIG, calibration_sums_triton, finish_plan
from kdbench.reference.calibration import bin_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, C): one tile, odd C, a row block of many rows, streamed rows, C > 65536, C > 2^18.
SHAPES = [(1, 1), (5, 2), (33, 10), (9, 100), (70, 37), (3, 5000), (2, 70001), (1, 262147)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TEMPERATURES = [1.0, 0.7, 3.0]
# Per-row agreement with the torch backend (both float32 arithmetic, different exp and
# summation order): relative on confidence, absolute + relative on NLL, absolute on Brier.
CONF_RTOL = 2e-6
NLL_TOL = 2e-6
BRIER_ATOL = 2e-6
SUM_RTOL = 1e-6


def _both(z, y, **kw):
    z, y = z.to(DEVICE), y.to(DEVICE)
    return calibration_stats(z, y, backend="triton", **kw), calibration_stats(z, y, backend="torch", **kw)


def _assert_rows_close(a, b):
    assert torch.equal(a.counted, b.counted)
    assert torch.equal(a.pred, b.pred)
    torch.testing.assert_close(a.conf, b.conf, rtol=CONF_RTOL, atol=0.0)
    torch.testing.assert_close(a.nll, b.nll, rtol=NLL_TOL, atol=NLL_TOL)
    torch.testing.assert_close(a.brier, b.brier, rtol=0.0, atol=BRIER_ATOL)


def _assert_stats_close(tri: CalibrationStats, ref: CalibrationStats, conf_tri, conf_ref, n_bins):
    """Counts equal except where the two float32 confidences straddle an edge."""
    moved = bin_index(conf_tri, n_bins) != bin_index(conf_ref, n_bins)
    assert bool(near_edge(conf_ref.double()[moved], n_bins, 1e-6).all())
    slack = int(moved.sum())
    assert float((tri.count - ref.count).abs().sum()) <= 2 * slack
    assert float(tri.n) == float(ref.n)
    torch.testing.assert_close(tri.nll_sum, ref.nll_sum, rtol=SUM_RTOL, atol=1e-5)
    torch.testing.assert_close(tri.brier_sum, ref.brier_sum, rtol=SUM_RTOL, atol=1e-5)
    if slack == 0:
        assert torch.equal(tri.count, ref.count) and torch.equal(tri.correct_sum, ref.correct_sum)
        torch.testing.assert_close(tri.conf_sum, ref.conf_sum, rtol=SUM_RTOL, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", SHAPES, ids=str)
def test_kernel_matches_torch_backend(n, c, dtype, temperature):
    z, y = make_logits(n, c, dtype=dtype, seed=n * 7 + c, ignore_frac=0.2 if n > 2 else 0.0)
    kw = dict(temperature=temperature)
    a = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="triton", **kw)
    b = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="torch", **kw)
    _assert_rows_close(a, b)
    tri, ref = _both(z, y, n_bins=15, **kw)
    _assert_stats_close(tri, ref, a.conf[a.counted], b.conf[b.counted], 15)


@pytest.mark.parametrize("n_bins", [1, 2, 15, 100, MAX_BINS])
def test_kernel_bins(n_bins):
    z, y = make_logits(60, 12, seed=n_bins)
    tri, ref = _both(z, y, n_bins=n_bins)
    a = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="triton")
    b = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="torch")
    _assert_stats_close(tri, ref, a.conf, b.conf, n_bins)
    assert tri.ece() == pytest.approx(ref.ece(), abs=1e-5)


def test_kernel_against_the_float64_oracle():
    z, y = make_logits(120, 50, seed=3, scale=4.0)
    tri = calibration_stats(z.to(DEVICE), y.to(DEVICE), backend="triton")
    conf, correct, nll, brier = oracle(z, y)
    assert tri.accuracy() == pytest.approx(float(correct.mean()), abs=1e-15)
    assert tri.nll() == pytest.approx(float(nll.mean()), rel=1e-6)
    assert tri.brier() == pytest.approx(float(brier.mean()), rel=1e-6)
    assert float(tri.conf_sum.sum()) == pytest.approx(float(conf.sum()), rel=1e-6)


def test_tiny_nll_and_brier_keep_their_relative_accuracy():
    # p_y = 1 - ~1e-6: -log p_y ~ 1e-6 and Brier ~ 2e-12.  logsumexp - x_y would lose the
    # NLL to float32 rounding of values near 1; sum p^2 - 2 p_y + 1 would lose the Brier.
    z = torch.zeros(4, 8)
    z[:, 0] = torch.tensor([14.0, 15.0, 16.0, 17.0])
    y = torch.zeros(4, dtype=torch.long)
    rows = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="triton")
    _, _, nll64, brier64 = oracle(z, y)
    torch.testing.assert_close(rows.nll.cpu().double(), nll64, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(rows.brier.cpu().double(), brier64, rtol=1e-5, atol=0.0)


def test_statistics_are_bit_identical_run_to_run():
    z, y = make_logits(3000, 10, seed=5)
    assert finish_plan(3000, 1, 15)["programs"] > 1  # several partial histograms to reduce
    z, y = z.to(DEVICE), y.to(DEVICE)
    first = calibration_stats(z, y, backend="triton")
    for _ in range(2):
        again = calibration_stats(z, y, backend="triton")
        for name in ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum", "n"):
            assert torch.equal(getattr(again, name), getattr(first, name)), name


def test_finishing_plan_depends_only_on_the_problem():
    """The per-bin sums are added in an order fixed by (N, chunks, M): same on every device."""
    assert finish_plan(10**6, 1, 15) == finish_plan(10**6, 1, 15)
    plan = finish_plan(10**6, 1, 15)
    assert plan["programs"] <= 1024 and plan["programs"] * plan["rows_per_prog"] >= 10**6
    wide = finish_plan(8, 64, 15)
    assert wide["CHUNKS_PAD"] == 64 and wide["programs"] * wide["rows_per_prog"] >= 8


def test_tile_plan_cuts_wide_rows_into_chunks_and_packs_narrow_ones():
    tile = TILE_CONFIG[0]
    wide = tile_plan(8, 262144, tile)
    assert wide.ROWS == 1 and wide.BLOCK == tile and wide.chunks == 262144 // tile and wide.items == 8 * wide.chunks
    odd = tile_plan(3, 5000, 4096)
    assert (odd.ROWS, odd.BLOCK, odd.chunks, odd.CHUNKS_PAD, odd.items) == (1, 4096, 2, 2, 6)
    narrow = tile_plan(100, 10, 4096)
    assert narrow.chunks == 1 and narrow.BLOCK == 16 and narrow.ROWS == 128 and narrow.items == 1


# ---- edges through the kernel --------------------------------------------------------------


def test_kernel_ties_pick_the_lowest_index_across_tiles():
    z = torch.zeros(5, 9000)
    z[0, [100, 4500, 8999]] = 5.0  # tie across tiles: 100
    z[1, [4097, 4096]] = 5.0  # tie inside the second tile: 4096
    z[2, :] = 1.0  # all equal: 0
    z[3, [4196, 8292]] = 5.0  # one lane of a 4096-wide tile sees both: 4196
    z[4, [4196, 8242]] = 5.0  # a lower lane holds the later column: 4196
    y = torch.tensor([100, 4096, 0, 4196, 4196])
    rows = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="triton")
    assert rows.pred.cpu().tolist() == [100, 4096, 0, 4196, 4196]
    assert calibration_stats(z.to(DEVICE), y.to(DEVICE), backend="triton").accuracy() == 1.0


def test_kernel_confidence_one_and_bin_edges():
    inf = float("inf")
    z = torch.tensor([[0.0, -200.0, -inf, -300.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, -inf, -inf]])
    tri = calibration_stats(z.to(DEVICE), torch.tensor([0, 0, 1]).to(DEVICE), n_bins=4, backend="triton")
    # Confidences 1.0 (last bin), 0.25 (edge: bin 1), 0.5 (edge: bin 2).
    assert tri.count.cpu().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert tri.conf_sum.cpu().tolist() == [0.0, 0.25, 0.5, 1.0]
    assert tri.correct_sum.cpu().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_kernel_neg_inf_label_gives_infinite_nll():
    z = torch.tensor([[0.0, float("-inf"), 0.0]])
    tri = calibration_stats(z.to(DEVICE), torch.tensor([1]).to(DEVICE), backend="triton")
    assert tri.nll() == math.inf
    assert tri.brier() == pytest.approx(1.5)  # 1/4 + 1 + 1/4


def test_kernel_ignored_rows_are_not_read():
    z, y = make_logits(40, 300, seed=6, ignore_frac=0.5)
    z[y == -100] = float("nan")
    tri = calibration_stats(z.to(DEVICE), y.to(DEVICE), backend="triton")
    keep = y != -100
    sub = calibration_stats(z[keep].to(DEVICE), y[keep].to(DEVICE), backend="triton")
    assert float(tri.n) == int(keep.sum())
    assert torch.equal(tri.count, sub.count) and torch.equal(tri.correct_sum, sub.correct_sum)
    torch.testing.assert_close(tri.conf_sum, sub.conf_sum, rtol=1e-12, atol=1e-12)


def test_kernel_no_rows_and_no_counted_rows():
    for z, y in [(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)), (torch.randn(6, 5), torch.full((6,), -100))]:
        tri = calibration_stats(z.to(DEVICE), y.to(DEVICE), backend="triton")
        assert float(tri.n) == 0 and float(tri.count.sum()) == 0
        with pytest.raises(ValueError, match="no samples"):
            tri.ece()


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA NaN rows are not checked on the host")
def test_kernel_nan_rows_raise_naming_them_on_cpu():
    z, y = make_logits(30, 6000, seed=2)
    z[4, 5000] = float("nan")
    z[21, 7] = float("inf")
    with pytest.raises(ValueError, match=r"logits: rows \[4, 21\]"):
        calibration_stats(z, y, backend="triton")


def test_undefined_rows_make_the_sums_nan():
    # What CUDA users get for NaN logits or out-of-range labels (no host check there):
    # the launcher itself does not check, the sums turn NaN, and the metrics refuse them.
    z, y = make_logits(8, 3, seed=1)
    z[2, 1] = float("nan")
    y[5] = 7
    rows, sums = calibration_sums_triton(z.to(DEVICE), y.to(DEVICE), n_bins=10, temperature=1.0, ignore_index=-100)
    assert torch.isnan(rows.conf.cpu()).nonzero().flatten().tolist() == [2, 5]
    stats = CalibrationStats(**sums)
    with pytest.raises(ValueError, match="stats: the sums are NaN"):
        stats.ece()


def test_kernel_strided_inputs():
    z, y = make_logits(24, 40, seed=8)
    wide = torch.zeros(24, 80)
    wide[:, ::2] = z  # column stride 2: copied once
    tall = torch.zeros(48, 40)
    tall[::2] = z  # row stride 80: used as is
    base = calibration_stats(z.to(DEVICE), y.to(DEVICE), backend="triton")
    for view in (wide[:, ::2], tall[::2], z.t().contiguous().t()):
        other = calibration_stats(view.to(DEVICE), y.to(DEVICE), backend="triton")
        assert torch.equal(other.count, base.count) and torch.equal(other.conf_sum, base.conf_sum)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_takes_probabilities_as_their_logarithms(dtype):
    """inputs="probs": the kernel reads log p, formed in float32, so it agrees with the torch backend."""
    z, y = make_logits(70, 37, seed=9, ignore_frac=0.1)
    p = torch.softmax(z, dim=-1).to(dtype)
    p[y == -100] = float("nan")
    p, y = p.to(DEVICE), y.to(DEVICE)
    tri = calibration_rows(p, y, backend="triton", inputs="probs", temperature=0.7)
    ref = calibration_rows(p, y, backend="torch", inputs="probs", temperature=0.7)
    assert tri.conf.dtype == torch.float32
    _assert_rows_close(tri, ref)


def test_kernel_rejects_what_it_cannot_do():
    z, y = make_logits(4, 3)
    with pytest.raises(ValueError, match="n_bins: the triton backend takes n_bins <= 1024"):
        calibration_stats(z.to(DEVICE), y.to(DEVICE), n_bins=MAX_BINS + 1, backend="triton")
    with pytest.raises(TypeError, match="backend"):
        calibration_stats(z.double().to(DEVICE), y.to(DEVICE), backend="triton")
    # "auto" goes to the reference for more bins than the kernel holds.
    many = calibration_stats(z.to(DEVICE), y.to(DEVICE), n_bins=MAX_BINS + 1)
    assert many.n_bins == MAX_BINS + 1


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 50),
    c=st.integers(1, 70),
    n_bins=st.integers(1, 40),
    scale=st.floats(0.1, 30.0),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_torch_property(n, c, n_bins, scale, seed):
    z, y = make_logits(n, c, seed=seed, scale=scale, ignore_frac=0.2)
    a = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="triton")
    b = calibration_rows(z.to(DEVICE), y.to(DEVICE), backend="torch")
    _assert_rows_close(a, b)
    tri, ref = _both(z, y, n_bins=n_bins)
    _assert_stats_close(tri, ref, a.conf[a.counted], b.conf[b.counted], n_bins)


@pytest.mark.parametrize("c", [10, 5000, 70002])
def test_bfloat16_pair_loads_match_element_loads(c):
    """bfloat16 rows of even length load as 32-bit words of two values; rows that start at an odd
    element one value at a time.  Same logits: same predictions and bins, sums to rounding."""
    from kdbench.kernels._utils import loads_pairs

    z, y = make_logits(40, c + 1, seed=12)
    y = y.clamp_max(c - 1)
    odd = z.bfloat16().to(DEVICE)[:, 1:]
    even = odd.contiguous()
    assert loads_pairs(even) and not loads_pairs(odd)
    a, ra = calibration_sums_triton(even, y.to(DEVICE), n_bins=15, temperature=1.0, ignore_index=-100)
    b, rb = calibration_sums_triton(odd, y.to(DEVICE), n_bins=15, temperature=1.0, ignore_index=-100)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.counted, b.counted)
    _assert_rows_close(a, b)
    assert torch.equal(ra["count"], rb["count"]) and torch.equal(ra["correct_sum"], rb["correct_sum"])
