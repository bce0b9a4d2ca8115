"""kd_loss inside training code: the module, torch.compile, and properties (hypothesis)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kdbench
from kd_helpers import BACKENDS, device_for, oracle


def test_kdloss_module_equals_functional():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 12, generator=g), torch.randn(2, 3, 12, generator=g)
    y = torch.randint(0, 12, (2, 3), generator=g)
    opts = dict(temperature=3.0, alpha=0.4, divergence="jsd", beta=0.2, reduction="none")
    module = kdbench.KDLoss(**opts)
    torch.testing.assert_close(module(s, t, y), kdbench.kd_loss(s, t, y, **opts), rtol=0, atol=0)
    assert "temperature=3.0" in repr(module) and "divergence='jsd'" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_training_loop_distils(backend):
    """A student fitted with KDLoss alone moves its predictions to the teacher's."""
    torch.manual_seed(0)
    dev = device_for(backend)
    x = torch.randn(16, 8, device=dev)  # few rows: the interpreter runs one program per row
    teacher = torch.nn.Linear(8, 5).to(dev)
    student = torch.nn.Linear(8, 5).to(dev)
    loss_fn = kdbench.KDLoss(temperature=2.0, backend=backend)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    with torch.no_grad():
        t_logits = teacher(x)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(student(x), t_logits)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    agree = (student(x).argmax(-1) == t_logits.argmax(-1)).float().mean()
    assert agree > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    torch.manual_seed(0)
    dev = device_for(backend)
    x = torch.randn(16, 6).to(dev)
    y = torch.randint(0, 7, (16,)).to(dev)
    t_logits = torch.randn(16, 7).to(dev)

    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(6, 7).to(dev)

    def step(model, opt):
        opt.zero_grad()
        loss = kdbench.kd_loss(model(x), t_logits, y, temperature=2.0, alpha=0.5, backend=backend)
        loss.backward()
        opt.step()
        return loss.detach()

    eager_model = make()
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    compiled_model = make()
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    compiled_step = torch.compile(step)
    for _ in range(3):
        a = step(eager_model, eager_opt)
        b = compiled_step(compiled_model, compiled_opt)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_model.weight, compiled_model.weight, rtol=1e-5, atol=1e-6)


logits = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.integers(min_value=2, max_value=40).map(lambda v: (n, v))
)


@settings(max_examples=30, deadline=None)
@given(
    shape=logits,
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    temperature=st.floats(0.5, 8.0),
    divergence=st.sampled_from(["forward", "reverse", "jsd"]),
    beta=st.floats(0.05, 0.95),
)
def test_property_backends_agree_and_divergence_is_nonnegative(shape, seed, scale, temperature, divergence, beta):
    n, v = shape
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, reduction="none")
    loss64, grad64 = oracle(s, t, **kw)
    assert torch.all(loss64 >= -1e-12)
    # Gradients of a softmax-composed loss sum to zero over the classes.
    assert torch.allclose(grad64.sum(-1), torch.zeros(n, dtype=torch.float64), atol=1e-10)
    # float32 log-probabilities carry ~1e-7 * log(V) absolute error, which T^2 scales.
    atol = 1e-6 * temperature**2 * (1.0 + math.log(v))
    for backend in ("torch", "triton"):
        dev = device_for(backend)
        out = kdbench.kd_loss(s.to(dev), t.to(dev), backend=backend, **kw).cpu()
        torch.testing.assert_close(out.double(), loss64, rtol=1e-4, atol=atol)
