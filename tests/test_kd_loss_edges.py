"""Named edge cases of kd_loss, each on both backends."""

from __future__ import annotations

import math

import pytest
import torch

import kdbench
from kd_helpers import BACKENDS, assert_grad_close, assert_loss_close, device_for, oracle, run

NEG_INF = float("-inf")
V_CASES = [37, 5000]  # one tile, streamed


def _inputs(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g), torch.randn(n, v, generator=g) * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("v", V_CASES)
def test_all_rows_ignored_gives_zero_loss_and_gradient(v, reduction, backend):
    s, t = _inputs(3, v)
    s[0, 0] = float("nan")  # garbage in an ignored row must not leak out
    y = torch.full((3,), -100)
    loss, grad = run(s, t, y, backend=backend, alpha=0.5, reduction=reduction)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_batchmean_counts_only_rows_not_ignored(v, backend):
    s, t = _inputs(4, v, seed=1)
    y = torch.tensor([1, -100, 2, -100])
    loss, _ = run(s, t, y, backend=backend, alpha=0.2)
    kept, _ = run(s[[0, 2]], t[[0, 2]], y[[0, 2]], backend=backend, alpha=0.2)
    torch.testing.assert_close(loss, kept, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_custom_ignore_index(v, backend):
    s, t = _inputs(3, v, seed=2)
    y = torch.tensor([0, 7, 3])
    loss, grad = run(s, t, y, backend=backend, alpha=0.5, ignore_index=7)
    assert torch.all(grad[1] == 0)
    loss64, _ = oracle(s[[0, 2]], t[[0, 2]], y[[0, 2]], alpha=0.5)
    assert_loss_close(loss, loss64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("v", V_CASES)
def test_shared_neg_inf_mask_contributes_exactly_zero(v, divergence, backend):
    """A vocabulary masked in both models (Liger-Kernel #1453 returned NaN here for JSD)."""
    s, t = _inputs(3, v, seed=3)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[::3] = True
    s_m, t_m = s.masked_fill(masked, NEG_INF), t.masked_fill(masked, NEG_INF)
    kw = dict(temperature=2.0, divergence=divergence)
    loss, grad = run(s_m, t_m, backend=backend, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(grad[:, masked] == 0)
    # Dropping the masked columns altogether must give the same numbers.
    loss64, grad64 = oracle(s[:, ~masked], t[:, ~masked], **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad[:, ~masked].contiguous(), grad64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_jsd_one_sided_mask_is_finite(v, backend):
    s, t = _inputs(2, v, seed=4)
    t[:, :5] = NEG_INF  # teacher gives zero mass, student does not: JSD stays finite
    loss, grad = run(s, t, backend=backend, divergence="jsd", beta=0.3)
    loss64, grad64 = oracle(s, t, divergence="jsd", beta=0.3)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_jsd_mixture_below_float32_normal_range(v, backend):
    """Classes whose probabilities under both models, and so their mixture M, fall below
    float32's smallest normal number (2**-126), and some that underflow to 0 in one model
    only: every log-ratio stays finite and the loss and gradient keep the oracle's value."""
    s, t = _inputs(2, v, seed=15)
    s[:, :3] = s.max() - 95.0  # p ~ 1e-41 in both models at T = 1: a subnormal M
    t[:, :3] = t.max() - 95.0
    s[:, 3:6] = s.max() - 120.0  # p_s = 0 in float32, p_t subnormal
    t[:, 3:6] = t.max() - 100.0
    for beta in (0.5, 0.9):
        kw = dict(divergence="jsd", beta=beta, temperature=1.0)
        loss, grad = run(s, t, backend=backend, **kw)
        loss64, grad64 = oracle(s, t, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_loss_close(loss, loss64)
        assert_grad_close(grad, grad64, torch.float32)


# (divergence, which model puts zero mass on a class the other does not): the
# mathematics says +inf, and so must the loss.
INFINITE_CASES = {
    "reverse_kl_teacher_zero_student_positive": ("reverse", "teacher"),
    "forward_kl_student_zero_teacher_positive": ("forward", "student"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
@pytest.mark.parametrize("case", sorted(INFINITE_CASES))
def test_zero_against_positive_mass_is_inf(case, v, backend):
    divergence, zeroed = INFINITE_CASES[case]
    s, t = _inputs(2, v, seed=5)
    (t if zeroed == "teacher" else s)[0, 3] = NEG_INF
    loss, _ = run(s, t, backend=backend, divergence=divergence, reduction="none")
    assert loss[0] == math.inf
    assert torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("v", V_CASES)
def test_logits_of_magnitude_1e4(v, divergence, backend):
    g = torch.Generator().manual_seed(7)
    s = (torch.rand(3, v, generator=g) * 2 - 1) * 1e4
    t = (torch.rand(3, v, generator=g) * 2 - 1) * 1e4
    t[:, 1] = 1e4  # the teacher is sure of one class; the student is not
    y = torch.tensor([1, 2, 3])
    kw = dict(temperature=4.0, alpha=0.5, divergence=divergence)
    loss, grad = run(s, t, y, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_identical_distributions_give_zero_loss(v, backend):
    s, _ = _inputs(3, v, seed=8)
    for divergence in ("forward", "reverse", "jsd"):
        loss, grad = run(s, s + 3.0, backend=backend, divergence=divergence, temperature=2.0)
        assert abs(loss.item()) < 1e-5
        assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", V_CASES)
def test_non_contiguous_inputs(v, backend):
    g = torch.Generator().manual_seed(9)
    base_s = torch.randn(4, 3, 2 * v, generator=g)
    base_t = torch.randn(3, 4, v, generator=g)
    s = base_s[..., ::2].transpose(0, 1)  # strided last dim and leading dims
    t = base_t  # (3, 4, v) contiguous
    t_nc = torch.randn(4, 3, v, generator=g).transpose(0, 1)
    y = torch.randint(0, v, (3, 4), generator=g).t().contiguous().t()
    for teacher in (t, t_nc):
        loss, grad = run(s, teacher, y, backend=backend, alpha=0.3, temperature=2.0)
        loss_c, grad_c = run(s.contiguous(), teacher.contiguous(), y.contiguous(), backend=backend, alpha=0.3, temperature=2.0)
        torch.testing.assert_close(loss, loss_c, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_receives_no_gradient(backend):
    s, t = (x.to(device_for(backend)) for x in _inputs(2, 40))
    s.requires_grad_(True)
    t.requires_grad_(True)
    kdbench.kd_loss(s, t, backend=backend, temperature=2.0).backward()
    assert t.grad is None
    assert s.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_give_float32_loss_and_own_dtype_gradient(dtype, backend):
    s, t = _inputs(2, 40)
    loss, grad = run(s.to(dtype), t.to(dtype), backend=backend)
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_student_teacher_dtypes(backend):
    s, t = _inputs(3, 300, seed=10)
    loss, grad = run(s.to(torch.bfloat16), t, backend=backend, temperature=2.0)
    loss64, grad64 = oracle(s.to(torch.bfloat16), t, temperature=2.0)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_accepted(backend):
    s, t = _inputs(3, 20)
    y = torch.tensor([1, 2, -100], dtype=torch.int32)
    a, _ = run(s, t, y, backend=backend, alpha=0.5)
    b, _ = run(s, t, y.long(), backend=backend, alpha=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend):
    s, t = _inputs(3, 5000, seed=11)
    with torch.no_grad():
        plain = kdbench.kd_loss(s.to(device_for(backend)), t.to(device_for(backend)), backend=backend,
                                divergence="reverse").cpu()
    loss, _ = run(s, t, backend=backend, divergence="reverse")
    torch.testing.assert_close(plain, loss, rtol=1e-6, atol=1e-7)


# Batches with no counted row: a loss of 0 (never NaN) and a zero gradient.
NO_COUNTED_ROWS = {
    "empty_rows": (0, 7),
    "empty_inner_dim": (3, 0, 7),
    "all_ignored": (2, 3, 7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("case", sorted(NO_COUNTED_ROWS))
def test_no_counted_rows_give_zero_loss_and_gradient(case, divergence, alpha, reduction, dtype, backend):
    shape = NO_COUNTED_ROWS[case]
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    labels = None
    if case == "all_ignored":
        labels = torch.full(shape[:-1], -100)
        s[0, 0, 0] = float("nan")  # padding may hold anything
    elif alpha > 0:
        labels = torch.zeros(shape[:-1], dtype=torch.long)
    loss, grad = run(s, t, labels, backend=backend, divergence=divergence, alpha=alpha, reduction=reduction)
    assert loss.dtype == torch.float32
    assert loss.shape == (shape[:-1] if reduction == "none" else ())
    assert bool((loss == 0).all()), loss
    assert grad.shape == shape and grad.dtype == dtype
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_counted_rows_give_zero_where_cross_entropy_gives_nan(backend):
    s, t = _inputs(3, 9, seed=13)
    y = torch.full((3,), -100)
    assert torch.isnan(torch.nn.functional.cross_entropy(s, y))
    loss, grad = run(s, t, y, backend=backend, alpha=1.0)
    assert loss.item() == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_labels_mask_rows_and_set_the_batchmean_count_at_alpha_zero(divergence, backend):
    """Without the hard term labels still mark padding: batchmean divides by the rows kept."""
    s, t = _inputs(4, 50, seed=14)
    y = torch.tensor([1, -100, 2, -100])
    loss, grad = run(s, t, y, backend=backend, divergence=divergence, temperature=2.0)
    kept, kept_grad = run(s[[0, 2]], t[[0, 2]], backend=backend, divergence=divergence, temperature=2.0)
    torch.testing.assert_close(loss, kept, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad[[0, 2]], kept_grad, rtol=1e-6, atol=1e-9)
    assert bool((grad[[1, 3]] == 0).all())


def test_triton_double_backward_raises_instead_of_a_wrong_gradient():
    s, t = (x.to(device_for("triton")) for x in _inputs(2, 30))
    s.requires_grad_(True)
    loss = kdbench.kd_loss(s, t, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_triton_gradient_accumulates_across_calls():
    s, t = (x.to(device_for("triton")) for x in _inputs(2, 30))
    s.requires_grad_(True)
    kdbench.kd_loss(s, t, backend="triton", temperature=2.0).backward()
    first = s.grad.clone()
    kdbench.kd_loss(s, t, backend="triton", temperature=2.0).backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    import kdbench.reference as ref

    calls = []
    original = ref.kd_loss
    monkeypatch.setattr(ref, "kd_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    s, t = _inputs(2, 10)
    kdbench.kd_loss(s, t)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with > 20 GB free (N*V > 2**31)")
def test_cuda_rows_beyond_int32_offsets():
    n, v = 16400, 131072  # n * v = 2.15e9 > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = kdbench.kd_loss(s, t, backend="triton", reduction="none")
    last = slice(n - 2, n)
    ref = kdbench.kd_loss(s[last].float(), t[last].float(), backend="torch", reduction="none")
    torch.testing.assert_close(rows[last], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("where", ["teacher_pos_inf", "student_pos_inf", "student_nan", "teacher_nan"])
@pytest.mark.parametrize("v", V_CASES)
def test_nan_or_pos_inf_logit_gives_nan_not_a_silent_number(v, where, divergence, backend):
    """A NaN or +inf logit has no probability: the row's loss must say so (NaN), never 0."""
    s, t = _inputs(2, v, seed=12)
    model, value = where.split("_", 1)
    (t if model == "teacher" else s)[0, 4] = float("nan") if value == "nan" else math.inf
    loss, _ = run(s, t, backend=backend, divergence=divergence, temperature=2.0, reduction="none")
    assert math.isnan(loss[0].item())
    assert torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_float16_gradient_under_a_loss_scale_is_rounded_once(divergence, backend):
    """A float16 gradient of a batch is ~1e-7 per element, below float16's normal range.

    Under ``torch.amp.GradScaler`` backward sees grad_output = 2**16: the gradient must be
    the exact scaled gradient rounded once, not a subnormal rounding scaled up 65536-fold.
    """
    g = torch.Generator().manual_seed(13)
    s = (torch.randn(64, 32000, generator=g) * 2).half()
    t = (torch.randn(64, 32000, generator=g) * 3).half()
    kw = dict(temperature=2.0, divergence=divergence)
    go = torch.tensor(2.0**16)
    loss, grad = run(s, t, grad_output=go, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, grad_output=go, **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.float16)


@pytest.mark.parametrize("meeting", ["barrier", "launches", "lagged"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_rows_meet_in_any_way(divergence, meeting, dtype, monkeypatch):
    """Rows wider than a tile: the in-kernel barrier (GPU only), separate launches, and the
    lagged launch (one program under the interpreter, a full grid on a GPU) give the
    numbers of the float64 oracle, and the same bits as each other."""
    from kdbench.kernels import kd_loss as kernel

    if meeting == "barrier" and not torch.cuda.is_available():
        pytest.skip("the in-kernel barrier runs on a GPU only; the interpreter runs programs one at a time")
    s, t = _inputs(5, 20000, seed=14)
    s, t = s.to(dtype), t.to(dtype)
    y = torch.tensor([3, -100, 19999, 7, 0])
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence)
    monkeypatch.setattr(kernel, "ROW_MEETING", meeting)
    loss, grad = run(s, t, y, grad_output=torch.tensor(0.7), backend="triton", **kw)
    loss64, grad64 = oracle(s, t, y, grad_output=torch.tensor(0.7), **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, dtype)
    assert torch.all(grad[1] == 0)
    monkeypatch.setattr(kernel, "ROW_MEETING", "launches")
    loss_l, grad_l = run(s, t, y, grad_output=torch.tensor(0.7), backend="triton", **kw)
    if meeting != "barrier":  # the barrier keeps the tile's own statistics: other roundings
        assert torch.equal(loss, loss_l) and torch.equal(grad, grad_l)


def test_unknown_row_meeting_is_refused(monkeypatch):
    from kdbench.kernels import kd_loss as kernel

    monkeypatch.setattr(kernel, "ROW_MEETING", "sometimes")
    s, t = _inputs(2, 9000, seed=1)
    with pytest.raises(ValueError, match="ROW_MEETING: expected one of"):
        run(s, t, backend="triton")


def _simulate_lagged(n_items: int, chunks: int, programs: int, lag: int, passes: int, pick: str, seed: int = 0):
    """Run the lagged launch's schedule on paper: program p's step k is the statistics of its
    item k, the loss pass of its item k - lag and (passes == 3) the gradient pass of its item
    k - 2 lag, in that order; a later pass waits until every chunk of its row has finished the
    pass before.  ``pick`` says which program moves next: "random", "first" or "last" (by
    index) among those that can, or "behind" (the one furthest behind; counted as a wait
    when that one cannot move).  Returns the number of such waits; raises if every program
    is blocked."""
    import random

    rng = random.Random(seed)
    done = [dict() for _ in range(passes)]  # pass -> row -> chunks finished
    steps = [0] * programs
    pos = [0] * programs  # next action within the step
    last = (n_items - 1) // programs + (passes - 1) * lag
    waited = 0
    while True:
        movable = []
        for p in range(programs):
            while steps[p] <= last:
                k, a = steps[p], pos[p]
                item = p + (k - a * lag) * programs
                if a >= passes:
                    steps[p], pos[p] = k + 1, 0
                elif not 0 <= item < n_items:
                    pos[p] += 1
                else:
                    movable.append((k, a, p, a == 0 or done[a - 1].get(item // chunks, 0) == chunks))
                    break
        if not movable:
            return waited
        ready = [m for m in movable if m[3]]
        if not ready:
            raise AssertionError(f"deadlock: n_items={n_items} chunks={chunks} programs={programs} lag={lag}")
        if pick == "behind":
            waited += not min(movable)[3]
            k, a, p, _ = min(ready)
        else:
            k, a, p, _ = {"random": rng.choice, "first": min, "last": max}[pick](ready)
        item = p + (k - a * lag) * programs
        done[a][item // chunks] = done[a].get(item // chunks, 0) + 1
        pos[p] += 1


@pytest.mark.parametrize("passes", [2, 3])
@pytest.mark.parametrize("chunks,programs", [(2, 1), (3, 2), (4, 4), (5, 3), (8, 16), (32, 264), (33, 16), (7, 100)])
def test_lagged_schedule_never_deadlocks(chunks, programs, passes):
    """Any interleaving of the programs (all resident) completes with kd_loss.lag_items."""
    from kdbench.kernels.kd_loss import lag_items

    lag = lag_items(chunks, programs)
    for n_rows in (1, 3, 11):
        for pick in ("random", "first", "last"):
            _simulate_lagged(n_rows * chunks, chunks, programs, lag, passes, pick, seed=n_rows)


@pytest.mark.parametrize("chunks,programs", [(2, 1), (3, 2), (32, 264), (33, 16), (7, 100)])
def test_lagged_schedule_does_not_wait_when_programs_keep_pace(chunks, programs):
    """Programs that move one step at a time together never find a row unfinished."""
    from kdbench.kernels.kd_loss import lag_items

    lag = lag_items(chunks, programs)
    for passes in (2, 3):
        assert _simulate_lagged(9 * chunks, chunks, programs, lag, passes, "behind") == 0


def test_lagged_schedule_with_too_small_a_lag_deadlocks():
    """The check can fail: one program whose loss pass runs before its row's last statistics."""
    with pytest.raises(AssertionError, match="deadlock"):
        _simulate_lagged(8, 4, 1, 2, 2, "first")
