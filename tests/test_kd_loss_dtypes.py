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
