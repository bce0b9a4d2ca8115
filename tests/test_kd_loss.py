"""kd_loss against the float64 reference: shapes x dtypes x divergences x backends."""

from __future__ import annotations

import pytest
import torch

from kd_helpers import BACKENDS, DTYPES, assert_grad_close, assert_loss_close, oracle, run

# (leading dims, V): one-tile rows, odd V, streamed rows (V > BLOCK), V > 65536.
SHAPES = [((4,), 10), ((2, 3), 17), ((3,), 1000), ((3,), 5003), ((2,), 70001)]
DIVERGENCES = ["forward", "reverse", "jsd"]
TEMPERATURES = [1.0, 2.0, 4.0]


def make_inputs(lead, v, dtype, seed=0, with_labels=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, v, generator=g) * 2).to(dtype)
    t = (torch.randn(*lead, v, generator=g) * 3 + 0.5).to(dtype)
    y = torch.randint(0, v, lead, generator=g) if with_labels else None
    return s, t, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,v", SHAPES, ids=lambda x: str(x))
def test_matches_reference_grid(lead, v, dtype, divergence, backend):
    s, t, y = make_inputs(lead, v, dtype)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3)
    go = torch.rand(()) + 0.5  # a random grad_output exercises the backward scale
    loss, grad = run(s, t, y, grad_output=go, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, grad_output=go, **kw)
    assert loss.dtype == torch.float32
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("v", [33, 4500])
def test_temperature_alpha_grid(v, divergence, temperature, alpha, backend):
    s, t, y = make_inputs((5,), v, torch.float32, seed=1)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence)
    loss, grad = run(s, t, y, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("v", [50, 4500])
def test_reductions_with_random_grad_output(v, reduction, backend):
    s, t, y = make_inputs((2, 3), v, torch.float32, seed=2)
    y[0, 1] = -100
    kw = dict(temperature=2.0, alpha=0.25, reduction=reduction)
    shape = (2, 3) if reduction == "none" else ()
    go = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    loss, grad = run(s, t, y, grad_output=go, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, grad_output=go, **kw)
    assert loss.shape == shape
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_262144(backend):
    s, t, y = make_inputs((1,), 262144, torch.bfloat16, seed=4)
    kw = dict(temperature=2.0, alpha=0.1)
    loss, grad = run(s, t, y, backend=backend, **kw)
    loss64, grad64 = oracle(s, t, y, **kw)
    assert_loss_close(loss, loss64)
    assert_grad_close(grad, grad64, torch.bfloat16)
