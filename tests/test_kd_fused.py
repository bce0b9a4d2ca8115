"""The chunked fused torch path equals the autograd formula, edge case by edge case.

``kd_loss_fused`` computes the gradient analytically in forward; ``kd_loss_autograd``
differentiates ``kd_row_losses`` with autograd (the oracle).  In float64 both must
agree to rounding, values and gradients, for random ``grad_output``s.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kdbench
import kdbench.reference.kd_fused as kd_fused
from kdbench.reference.kd import kd_loss_autograd
from kdbench.reference.kd_fused import kd_loss_fused
from kd_helpers import DEFAULTS, assert_grad_close, assert_loss_close, oracle

NEG_INF, POS_INF = float("-inf"), float("inf")
# float64 both ways: the two paths differ only in the order of rounding.
RTOL, ATOL = 1e-10, 1e-12
DIVERGENCES = ["forward", "reverse", "jsd"]
REDUCTIONS = ["batchmean", "sum", "none"]


def _grad_output(loss: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype)


def both(student, teacher, labels=None, seed=0, **kw):
    """(loss, grad) of the fused path and of the autograd formula, same random grad_output."""
    opts = {**DEFAULTS, **kw}
    out = []
    for fn in (kd_loss_fused, kd_loss_autograd):
        s = student.detach().clone().requires_grad_(True)
        loss = fn(s, teacher, labels, **opts)
        loss.backward(_grad_output(loss, seed))
        out.append((loss.detach(), s.grad))
    return out


def assert_same(fused, auto, rtol=RTOL, atol=ATOL):
    (loss_f, grad_f), (loss_a, grad_a) = fused, auto
    assert loss_f.dtype == loss_a.dtype and grad_f.dtype == grad_a.dtype
    torch.testing.assert_close(loss_f, loss_a, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(grad_f, grad_a, rtol=rtol, atol=atol, equal_nan=True)


def _inputs(n, v, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3 + 0.5
    y = torch.randint(0, v, (n,), generator=g)
    return s.to(dtype), t.to(dtype), y


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows at V = 50: several blocks and a short last one."""
    monkeypatch.setattr(kd_fused, "CPU_BLOCK_ELEMS", 150)


GPU_PATHS = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=GPU_PATHS)
def gpu_path(request, monkeypatch):
    """The device whose tensors take the GPU strategy (on "cpu" switched on for CPU tensors:
    CI has no GPU; that turns the host checks off too)."""
    return _use_path(f"gpu-strategy-{request.param}", monkeypatch)


def _use_path(path, monkeypatch):
    """Switch to ``path`` in blocks of 3 rows at V = 50; returns the device of the inputs.

    "cpu-strategy", "sync-free-cpu-strategy" (host checks off: the branches GPUs took
    before the GPU strategy), "gpu-strategy-cpu" (switched on for CPU tensors) or
    "gpu-strategy-cuda".
    """
    monkeypatch.setattr(kd_fused, "CPU_BLOCK_ELEMS", 150)
    monkeypatch.setattr(kd_fused, "DEVICE_BLOCK_ELEMS", 150)
    if path == "sync-free-cpu-strategy":
        monkeypatch.setattr(kd_fused, "_host_checks", lambda device: False)
    elif path == "gpu-strategy-cpu":
        monkeypatch.setattr(kd_fused, "gpu_strategy", lambda device: True)
    return "cuda" if path.endswith("cuda") else "cpu"


@pytest.fixture(params=["cpu-strategy", *(f"gpu-strategy-{d}" for d in GPU_PATHS)])
def any_path(request, monkeypatch):
    return _use_path(request.param, monkeypatch)


@pytest.fixture(params=["sync-free-cpu-strategy", *(f"gpu-strategy-{d}" for d in GPU_PATHS)])
def sync_free_path(request, monkeypatch):
    return _use_path(request.param, monkeypatch)


def _to(device, *tensors):
    return [None if x is None else x.to(device) for x in tensors]


def _on_cpu(result):
    return [(loss.cpu(), grad.cpu()) for loss, grad in result]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_equals_autograd_formula_grid(divergence, alpha, temperature, reduction, any_path):
    s, t, y = _inputs(8, 50, seed=1)
    y[[2, 6]] = -100
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=0.3, reduction=reduction)
    assert_same(*both(*_to(any_path, s, t, y), seed=2, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_within_one_rounding_of_the_float64_formula(divergence, dtype, small_blocks):
    s, t, y = _inputs(7, 50, seed=3, dtype=dtype)
    kw = dict(temperature=2.0, alpha=0.2, divergence=divergence)
    x = s.clone().requires_grad_(True)
    loss = kd_loss_fused(x, t, y, **{**DEFAULTS, **kw})
    go = _grad_output(loss, 4)
    loss.backward(go)
    loss64, grad64 = oracle(s, t, y, grad_output=go, **kw)
    assert loss.dtype == torch.float32
    assert_loss_close(loss.detach(), loss64)
    assert_grad_close(x.grad, grad64, dtype)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sync_free_branches_equal_the_formula(divergence, sync_free_path):
    """Masks, garbage in ignored rows and undefined rows, without host checks."""
    s, t, y = _inputs(7, 50, seed=23)
    s[0, :3] = NEG_INF  # masks: student zeros, teacher zeros, shared zeros
    t[1, :3] = NEG_INF
    s[2, ::5], t[2, ::5] = NEG_INF, NEG_INF
    y[3] = -100
    s[3, 0] = float("nan")  # garbage in an ignored row
    kw = dict(divergence=divergence, alpha=0.3, temperature=2.0, reduction="none")
    fused, auto = _on_cpu(both(*_to(sync_free_path, s, t, y), seed=24, **kw))
    assert_same(fused, auto)
    assert torch.all(fused[0][3] == 0) and torch.all(fused[1][3] == 0)
    t[4, 2] = POS_INF  # undefined rows are NaN on this side too, loss and whole gradient row
    s[5] = NEG_INF
    s[6, 7] = float("nan")
    for alpha in (0.0, 0.3):
        (loss, grad), _ = _on_cpu(both(*_to(sync_free_path, s, t, y), **{**kw, "alpha": alpha}))
        assert torch.isnan(loss[4:]).all() and torch.isnan(grad[4:]).all()
        assert torch.isfinite(loss[[2, 3]]).all() and torch.all(grad[2][s[2] == NEG_INF] == 0)


def test_ignored_rows_with_garbage_give_zero(small_blocks):
    s, t, y = _inputs(7, 50, seed=5)
    y[[0, 4]] = -100
    s[0, 3], t[4, 1], s[4, 2] = float("nan"), POS_INF, NEG_INF
    fused, auto = both(s, t, y, alpha=0.5, reduction="none", divergence="jsd")
    assert_same(fused, auto)
    assert torch.all(fused[0][[0, 4]] == 0) and torch.all(fused[1][[0, 4]] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    s, t, _ = _inputs(3, 20, seed=6)
    y = torch.full((3,), -100)
    fused, auto = both(s, t, y, alpha=0.5, reduction=reduction)
    assert_same(fused, auto)
    assert torch.all(fused[0] == 0) and torch.all(fused[1] == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shared_neg_inf_mask_is_exact_zero(divergence, small_blocks):
    s, t, _ = _inputs(6, 50, seed=7)
    masked = torch.zeros(50, dtype=torch.bool)
    masked[::4] = True
    s, t = s.masked_fill(masked, NEG_INF), t.masked_fill(masked, NEG_INF)
    fused, auto = both(s, t, temperature=2.0, divergence=divergence)
    assert_same(fused, auto)
    assert torch.isfinite(fused[0]) and torch.all(fused[1][:, masked] == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_sided_masks(divergence):
    """Teacher zero where the student is not, and the other way round, in different rows."""
    s, t, _ = _inputs(4, 30, seed=8)
    t[0, :5] = NEG_INF
    s[1, 5:9] = NEG_INF
    fused, auto = both(s, t, divergence=divergence, beta=0.7, reduction="none")
    assert_same(fused, auto)
    assert torch.isfinite(fused[0][2:]).all()


def test_forward_kl_student_zero_mass_is_inf():
    s, t, _ = _inputs(2, 30, seed=9)
    s[0, 3] = NEG_INF
    (loss, grad), auto = both(s, t, reduction="none")
    assert_same((loss, grad), auto)
    assert loss[0] == POS_INF and torch.isfinite(loss[1]) and torch.isfinite(grad).all()


def test_reverse_kl_teacher_zero_mass_is_inf():
    s, t, _ = _inputs(2, 30, seed=10)
    t[0, 3] = NEG_INF
    (loss, grad), auto = both(s, t, divergence="reverse", reduction="none")
    assert_same((loss, grad), auto)
    assert loss[0] == POS_INF and torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all()


def test_hard_label_on_neg_inf_logit_is_inf():
    s, t, y = _inputs(2, 30, seed=11)
    s[0, y[0]] = NEG_INF
    (loss, grad), auto = both(s, t, y, alpha=0.5, reduction="none")
    assert_same((loss, grad), auto)
    assert loss[0] == POS_INF


UNDEFINED_ROWS = {
    "student_pos_inf": ("student", POS_INF),
    "teacher_pos_inf": ("teacher", POS_INF),
    "student_nan": ("student", float("nan")),
    "teacher_nan": ("teacher", float("nan")),
}


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", sorted(UNDEFINED_ROWS))
def test_undefined_softmax_gives_nan_row_never_a_finite_number(case, divergence, alpha):
    """A +inf or NaN logit leaves the softmax undefined: that row's loss and gradient are NaN.

    The autograd formula returns a finite 0 for some of these (its ``where``s mask the
    NaN probabilities); the fused path flags them.  Other rows are untouched.
    """
    who, value = UNDEFINED_ROWS[case]
    s, t, y = _inputs(3, 30, seed=12)
    (s if who == "student" else t)[1, 4] = value
    kw = dict(divergence=divergence, alpha=alpha, reduction="none")
    if alpha > 0 and who == "teacher":
        kw["alpha"] = 1.0  # the hard term alone never reads the teacher: the row stays finite
    (loss, grad), (loss_a, grad_a) = both(s, t, y, **kw)
    keep = [0, 2]
    torch.testing.assert_close(loss[keep], loss_a[keep], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad[keep], grad_a[keep], rtol=RTOL, atol=ATOL)
    if kw["alpha"] == 1.0 and who == "teacher":
        torch.testing.assert_close(loss[1], loss_a[1], rtol=RTOL, atol=ATOL)
    else:
        assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()


def test_all_neg_inf_row_is_nan():
    s, t, _ = _inputs(2, 20, seed=22)
    s[0] = NEG_INF
    (loss, grad), _ = both(s, t, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all() and torch.isfinite(loss[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_of_magnitude_1e4(divergence):
    g = torch.Generator().manual_seed(13)
    s = (torch.rand(3, 40, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    t = (torch.rand(3, 40, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    y = torch.tensor([1, 2, 3])
    assert_same(*both(s, t, y, temperature=4.0, alpha=0.5, divergence=divergence))


def test_empty_batch():
    s, t = torch.zeros(0, 10, dtype=torch.float64), torch.zeros(0, 10, dtype=torch.float64)
    for reduction in REDUCTIONS:
        fused, auto = both(s, t, reduction=reduction)
        assert_same(fused, auto)
        assert fused[1].shape == (0, 10)


def test_leading_dims_and_non_contiguous_inputs(small_blocks):
    g = torch.Generator().manual_seed(14)
    s = torch.randn(4, 3, 100, generator=g, dtype=torch.float64)[..., ::2].transpose(0, 1)
    t = torch.randn(4, 3, 50, generator=g, dtype=torch.float64).transpose(0, 1)
    y = torch.randint(0, 50, (3, 4), generator=g)
    y[1, 2] = -100
    fused, auto = both(s, t, y, alpha=0.3, temperature=2.0, reduction="none")
    assert fused[0].shape == (3, 4) and fused[1].shape == (3, 4, 50)
    assert_same(fused, auto)


def test_mixed_student_teacher_dtypes():
    s, t, _ = _inputs(3, 40, seed=15, dtype=torch.float32)
    s = s.to(torch.bfloat16)
    x = s.clone().requires_grad_(True)
    loss = kd_loss_fused(x, t, None, **{**DEFAULTS, "temperature": 2.0})
    loss.backward()
    loss64, grad64 = oracle(s, t, temperature=2.0)
    assert_loss_close(loss.detach(), loss64)
    assert_grad_close(x.grad, grad64, torch.bfloat16)


def test_backward_twice_with_retain_graph_recomputes():
    s, t, y = _inputs(3, 40, seed=16)
    x = s.clone().requires_grad_(True)
    loss = kd_loss_fused(x, t, y, temperature=2.0, alpha=0.3)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(x.grad, 1.5 * first, rtol=RTOL, atol=ATOL)


def test_gradient_accumulates_across_calls():
    s, t, _ = _inputs(3, 40, seed=17)
    x = s.clone().requires_grad_(True)
    kd_loss_fused(x, t, temperature=2.0).backward()
    first = x.grad.clone()
    kd_loss_fused(x, t, temperature=2.0).backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=RTOL, atol=ATOL)


def test_double_backward_raises_instead_of_a_wrong_gradient():
    s, t, _ = _inputs(2, 20, seed=18)
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss_fused(x, t), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_no_grad_forward_and_teacher_gets_no_gradient():
    s, t, y = _inputs(3, 40, seed=19)
    tt = t.clone().requires_grad_(True)
    with torch.no_grad():
        plain = kd_loss_fused(s, tt, y, divergence="reverse", alpha=0.2)
    x = s.clone().requires_grad_(True)
    loss = kd_loss_fused(x, tt, y, divergence="reverse", alpha=0.2)
    loss.backward()
    torch.testing.assert_close(plain, loss.detach(), rtol=0, atol=0)
    assert tt.grad is None and x.grad is not None


def test_compiled_function_matches_eager():
    s, t, y = _inputs(4, 30, seed=20, dtype=torch.float32)

    def step(x):
        return kdbench.kd_loss(x, t, y, temperature=2.0, alpha=0.5, backend="torch")

    compiled = torch.compile(step)
    xa, xb = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    step(xa).backward()
    compiled(xb).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


def test_reference_dispatches_float64_to_the_formula_and_the_rest_to_the_fused_path(monkeypatch):
    import kdbench.reference.kd as kd

    calls = []
    monkeypatch.setattr(kd, "kd_loss_fused", lambda *a, **k: calls.append("fused") or kd_loss_fused(*a, **k))
    monkeypatch.setattr(kd, "kd_loss_autograd", lambda *a, **k: calls.append("autograd") or kd_loss_autograd(*a, **k))
    s, t, _ = _inputs(2, 10, seed=21)
    kdbench.kd_loss(s, t, backend="torch")
    kdbench.kd_loss(s.float(), t.float(), backend="torch")
    assert calls == ["autograd", "fused"]


def test_rows_per_block_fits_the_cpu_budget():
    cpu = torch.device("cpu")
    assert kd_fused.rows_per_block(32000, cpu) * 32000 <= kd_fused.CPU_BLOCK_ELEMS
    assert kd_fused.rows_per_block(10**7, cpu) == 1  # a row wider than the budget still runs


property_cases = given(
    n=st.integers(1, 9),
    v=st.integers(1, 60),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    temperature=st.floats(0.25, 8.0),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    divergence=st.sampled_from(DIVERGENCES),
    beta=st.floats(0.05, 0.95),
    reduction=st.sampled_from(REDUCTIONS),
)


def _fused_equals_autograd(device, n, v, seed, scale, temperature, alpha, divergence, beta, reduction):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, reduction=reduction)
    assert_same(*both(s.to(device), t.to(device), y.to(device), seed=seed + 1, **kw), rtol=1e-9, atol=1e-11)


@settings(max_examples=40, deadline=None)
@property_cases
def test_property_fused_equals_autograd(**case):
    _fused_equals_autograd("cpu", **case)


# ---- the GPU strategy alone (few large blocks, fused passes, no host syncs) ----------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_strategy_low_precision_within_one_rounding(divergence, dtype, alpha, temperature, gpu_path):
    s, t, y = _inputs(7, 50, seed=3, dtype=dtype)
    y[4] = -100
    # "sum" keeps float16 gradients above its subnormals, whose spacing the tolerance ignores.
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, reduction="sum")
    x = s.to(gpu_path).requires_grad_(True)
    loss = kd_loss_fused(x, t.to(gpu_path), y.to(gpu_path), **{**DEFAULTS, **kw})
    loss.backward()  # grad_output 1: a second rounding (of float16 subnormals) would blur the check
    loss64, grad64 = oracle(s, t, y, **kw)
    assert loss.dtype == torch.float32
    assert_loss_close(loss.detach().cpu(), loss64)
    assert_grad_close(x.grad.cpu(), grad64, dtype)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_strategy_is_shift_invariant_for_large_logits(divergence, dtype, gpu_path):
    """Per-element log-ratios of max-shifted logits: a student that is the teacher plus 1e4
    has divergence 0 and gradient 0 to rounding, not to the size of the logits."""
    t = (torch.randn(4, 300, generator=torch.Generator().manual_seed(25)) * 3).to(dtype)
    s = (t.double() + 1e4).to(dtype)
    t = (s.double() - 1e4).to(dtype)  # exactly representable both ways
    x = s.to(gpu_path).requires_grad_(True)
    loss = kd_loss_fused(x, t.to(gpu_path), None, **{**DEFAULTS, "divergence": divergence, "temperature": 2.0})
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and float(x.grad.abs().max()) < 1e-6


def test_gpu_strategy_property(gpu_path):
    # Hypothesis inside the test: a function-scoped fixture cannot feed @given directly.
    settings(max_examples=25, deadline=None)(property_cases(lambda **case: _fused_equals_autograd(gpu_path, **case)))()


def test_gpu_strategy_uses_few_blocks_and_bounded_buffers():
    """(8192, 128256) runs in 32 blocks; the work buffers stay within 6 x 128 MiB in float32."""
    cuda = torch.device("cuda")  # a device object needs no GPU
    rows = kd_fused.rows_per_block(128256, cuda)
    assert -(-8192 // rows) <= 32
    most = max(kd_fused.gpu_buffers(kd_fused._Opts(2.0, a, d, 0.5, "batchmean", -100), True)
               for a in (0.0, 0.5, 1.0) for d in DIVERGENCES)
    assert most * rows * 128256 * 4 <= 6 * 128 * 2**20
    assert kd_fused.rows_per_block(32000, torch.device("cpu")) == kd_fused.CPU_BLOCK_ELEMS // 32000

