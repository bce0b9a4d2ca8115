"""Shared helpers for the kd_loss tests: the float64 oracle and the tolerances."""

from __future__ import annotations

import torch

from kdbench import reference
import kdbench

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Gradient tolerance: |g - g64| <= RTOL * |g64| + ATOL * max|g64|. RTOL is one rounding
# of the stored dtype (the kernel accumulates in fp32 and rounds once at the store);
# ATOL covers fp32 arithmetic relative to the row's largest entry.
GRAD_TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2.0**-10, 2e-6),
    torch.bfloat16: (2.0**-7, 2e-6),
}
# Loss tolerance (the loss is float32 whatever the input dtype).
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6

DEFAULTS = dict(temperature=1.0, alpha=0.0, divergence="forward", beta=0.5, reduction="batchmean", ignore_index=-100)


def oracle(student, teacher, labels=None, grad_output=None, **kw):
    """Loss and dL/dz_s of the float64 autograd formula on the same (already rounded) inputs."""
    opts = {**DEFAULTS, **kw}
    s64 = student.detach().double().requires_grad_(True)
    loss = reference.kd_loss_autograd(s64, teacher.detach().double(), labels, **opts)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, s64, go)
    return loss.detach(), grad


def device_for(backend: str) -> str:
    """Where a backend's tensors live in the tests: CUDA for triton when present, else CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def run(student, teacher, labels=None, grad_output=None, backend="torch", **kw):
    """Loss and gradient of kdbench.kd_loss for one backend, returned on the CPU.

    With a GPU present the triton backend runs on CUDA copies of the inputs (the
    interpreter is off then); without one, on the CPU tensors through the interpreter.
    """
    device = device_for(backend)
    s = student.detach().to(device).requires_grad_(True)
    labels = labels.to(device) if labels is not None else None
    loss = kdbench.kd_loss(s, teacher.to(device), labels, backend=backend, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(device, loss.dtype)
    loss.backward(go)
    return loss.detach().cpu(), s.grad.cpu()


def assert_grad_close(grad: torch.Tensor, grad64: torch.Tensor, dtype: torch.dtype) -> None:
    assert grad.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    g = grad.double()
    bound = rtol * grad64.abs() + atol * grad64.abs().max().clamp_min(1e-30)
    err = (g - grad64).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"gradient off: max err {err.max().item():.3e} at flat index {worst.item()} "
        f"(value {g.flatten()[worst].item():.6e}, exact {grad64.flatten()[worst].item():.6e})"
    )


def assert_loss_close(loss: torch.Tensor, loss64: torch.Tensor) -> None:
    torch.testing.assert_close(loss.double(), loss64, rtol=LOSS_RTOL, atol=LOSS_ATOL)
