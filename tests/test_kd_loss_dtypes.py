"""Student and teacher of different dtypes: which are accepted, the dtype of the loss and
gradient, and the values against the float64 oracle.

The rule: any mix of float32, float16, bfloat16 and float64 is accepted; the arithmetic and
the loss are float64 when either input is float64 (torch backend only), else float32; the
gradient has the student's dtype.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

import kdbench
from kdbench import _checks
from kd_helpers import BACKENDS, assert_grad_close, assert_loss_close, device_for, oracle, run

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MIXES = list(itertools.product(ALL_DTYPES, ALL_DTYPES))
# Mixes the kernels take (no float64), student dtype != teacher dtype.
KERNEL_MIXES = [(a, b) for a, b in MIXES if a != b and torch.float64 not in (a, b)]


def _ids(mix):
    return "-".join(str(d).removeprefix("torch.") for d in mix)


def _loss_scale(dtype):
    """grad_output for a float16 student, as under a loss scaler: its gradient entries then stay
    clear of float16's subnormals, whose absolute rounding the tolerances do not cover."""
    return torch.tensor(1024.0) if dtype == torch.float16 else None


def _inputs(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 2, torch.randn(n, v, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("mix", MIXES, ids=_ids)
def test_loss_and_gradient_dtypes_of_every_mix(mix, backend):
    s_dtype, t_dtype = mix
    s, t = _inputs(3, 20, seed=1)
    s, t = s.to(s_dtype), t.to(t_dtype)
    has_float64 = torch.float64 in mix
    if backend == "triton" and has_float64:
        with pytest.raises(TypeError, match="^backend: .*float64"):
            kdbench.kd_loss(s.requires_grad_(True), t, backend="triton")
        return
    loss, grad = run(s, t, backend="torch" if backend == "auto" else backend, temperature=2.0)
    assert loss.dtype == (torch.float64 if has_float64 else torch.float32)
    assert grad.dtype == s_dtype
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("v", [37, 5000])  # one tile, streamed
@pytest.mark.parametrize(
    "mix", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)], ids=_ids
)
def test_mixed_dtypes_match_the_float64_oracle(mix, v, divergence, backend):
    s, t = _inputs(3, v, seed=2)
    s, t = s.to(mix[0]), t.to(mix[1])
    y = torch.tensor([0, 5, -100])
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.3, grad_output=_loss_scale(mix[0]))
    loss, grad = run(s, t, y, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, mix[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", KERNEL_MIXES, ids=_ids)
def test_every_kernel_mix_matches_the_float64_oracle(mix, backend):
    s, t = _inputs(4, 300, seed=3)
    s, t = s.to(mix[0]), t.to(mix[1])
    kw = dict(divergence="jsd", temperature=1.5, grad_output=_loss_scale(mix[0]))
    loss, grad = run(s, t, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, mix[0])


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_teacher_is_not_rounded_to_float32(s_dtype):
    s, t = _inputs(3, 40, seed=4)
    s = s.to(s_dtype)
    # Teacher differences below float32's resolution: rounding them away moves the loss by ~1e-8.
    t = t.to(torch.float32).double() + 1e-9 * torch.arange(40, dtype=torch.float64)
    loss, grad = run(s, t, temperature=2.0)
    loss64, grad64 = oracle(s, t, temperature=2.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss64, rtol=1e-13, atol=1e-15)
    assert_grad_close(grad, grad64, s_dtype)


def test_float64_student_with_a_bfloat16_teacher_is_float64_throughout():
    s, t = _inputs(3, 40, seed=5)
    t = t.to(torch.bfloat16)
    loss, grad = run(s, t, divergence="reverse")
    loss64, grad64 = oracle(s, t, divergence="reverse")
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, loss64, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, grad64, rtol=1e-12, atol=1e-15)


def test_auto_takes_the_torch_backend_when_the_teacher_is_float64_on_cuda():
    # Stand-ins for CUDA tensors: the choice depends on is_cuda and the dtypes only.
    s = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    if not _checks.triton_available():
        pytest.skip("triton is not installed")
    assert _checks.resolve_backend("auto", s, SimpleNamespace(is_cuda=True, dtype=torch.float32)) == "triton"
    assert _checks.resolve_backend("auto", s, SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "torch"


def test_triton_refuses_a_float64_teacher():
    s, t = _inputs(2, 10, seed=6)
    device = device_for("triton")
    with pytest.raises(TypeError, match="^backend: .*float64"):
        kdbench.kd_loss(s.float().to(device), t.to(device), backend="triton")


@pytest.mark.parametrize("gpu_strategy", [False, True], ids=["cpu-strategy", "gpu-strategy"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_chunked_reference_with_a_float64_teacher_computes_in_float64(divergence, gpu_strategy, monkeypatch):
    """kd_loss sends float64 to the autograd formula; the chunked path, called directly, keeps the same rule."""
    from kdbench.reference import kd_fused

    monkeypatch.setattr(kd_fused, "gpu_strategy", lambda device: gpu_strategy)
    s, t = _inputs(3, 40, seed=7)
    s = s.float().requires_grad_(True)
    y = torch.tensor([1, -100, 3])
    kw = dict(divergence=divergence, alpha=0.3, temperature=2.0)
    loss = kd_fused.kd_loss_fused(s, t, y, **kw)
    loss.backward()
    loss64, grad64 = oracle(s, t, y, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), loss64, rtol=1e-13, atol=1e-15)
    assert_grad_close(s.grad, grad64, torch.float32)


# ---- bfloat16 loaded as pairs ---------------------------------------------------------------


def _odd_and_even_views(v: int, device: str):
    """The same (4, v) bfloat16 logits twice: contiguous, and as a view into (4, v + 1) rows
    starting at column 1 (odd row stride and start: no pair loads)."""
    g = torch.Generator().manual_seed(3)
    base = [(torch.randn(4, v + 1, generator=g) * 3).bfloat16().to(device) for _ in range(2)]
    odd = tuple(b[:, 1:] for b in base)
    return tuple(b.contiguous() for b in odd), odd


def test_pair_loads_need_bfloat16_of_even_length_stride_and_start():
    from kdbench.kernels._utils import loads_pairs

    x = torch.zeros(4, 10, dtype=torch.bfloat16)
    assert loads_pairs(x) and loads_pairs(x, x[:2])
    assert not loads_pairs(x.half()) and not loads_pairs(x.float())
    assert not loads_pairs(torch.zeros(4, 9, dtype=torch.bfloat16))  # odd length
    assert not loads_pairs(torch.zeros(4, 11, dtype=torch.bfloat16)[:, :10])  # odd row stride
    assert not loads_pairs(torch.zeros(4, 12, dtype=torch.bfloat16)[:, 1:11])  # odd start
    assert not loads_pairs(x, x.half())


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("v", [64, 5000, 70002])
def test_bfloat16_pair_loads_give_the_bits_of_element_loads(v, divergence):
    """Rows of even length load as 32-bit words of two values (kernels/_tile_math.widen), rows
    that start at an odd element one value at a time: the same logits give the same bits."""
    from kdbench.kernels._utils import loads_pairs

    device = device_for("triton")
    (s, t), (s_odd, t_odd) = _odd_and_even_views(v, device)
    assert loads_pairs(s, t) and not loads_pairs(s_odd, t_odd)
    y = torch.tensor([0, 1, v - 1, v - 2], device=device)
    out = []
    for a, b in ((s, t), (s_odd, t_odd)):
        a = a.detach().requires_grad_(True)
        loss = kdbench.kd_loss(a, b, y, temperature=2.0, alpha=0.3, divergence=divergence, backend="triton")
        loss.backward()
        out.append((loss.detach(), a.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    loss64, grad64 = oracle(s.cpu(), t.cpu(), y.cpu(), temperature=2.0, alpha=0.3, divergence=divergence)
    assert_loss_close(out[0][0].cpu(), loss64)
    assert_grad_close(out[0][1].cpu(), grad64, torch.bfloat16)
