"""Methods (each trains, loss decreasing; KL methods go through kd_loss) and the training loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdbench
from kdbench.experiments import methods as methods_mod
from kdbench.experiments.config import Recipe
from kdbench.experiments.datasets import load_dataset
from kdbench.experiments.methods import METHODS, bayes_teacher_logits, ensemble_logits, entropy, make_loss
from kdbench.experiments.models import build_model
from kdbench.experiments.train import (
    augment_batch,
    batch_indices,
    derive_seed,
    deterministic,
    lr_at,
    predict,
    seeded_model,
    train_model,
)

CPU = torch.device("cpu")
HYPER = dict(temperature=2.0, alpha=0.3, beta=0.4, smoothing=0.2, entropy_weight=0.5)
KL_METHODS = {"kd": "forward", "kd_reverse": "reverse", "kd_jsd": "jsd", "kd_ts": "forward",
              "kd_ls_teacher": "forward", "self_distill": "forward", "ensemble_kd": "forward",
              "oracle_kd": "forward"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("gaussian", dataset_size=1200)


@pytest.fixture(scope="module")
def teacher_logits(data):
    """Training-split logits of two quickly trained MLP teachers."""
    out = []
    for seed in (0, 1):
        model = seeded_model(lambda: build_model("mlp_32x1", data.input_shape, 10), seed, CPU)
        train_model(model, data.x_train, data.y_train, Recipe(lr=1e-2, batch_size=64, steps=150),
                    make_loss("ce"), seed=seed)
        out.append(predict(model, data.x_train))
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_and_its_loss_decreases(method: str, data, teacher_logits) -> None:
    info = METHODS[method]
    t_all = None
    if info.needs_teacher:
        t_all = ensemble_logits(teacher_logits) if info.ensemble else teacher_logits[0]
        if info.teacher_temperature_scaled:
            t_all = t_all / 1.7
    if info.bayes_teacher:
        t_all = bayes_teacher_logits(method, data, data.x_train)
    loss_fn = make_loss(method, **HYPER)
    with deterministic(1):
        student = seeded_model(lambda: build_model("mlp_16x1", data.input_shape, 10), 3, CPU)
        before = float(loss_fn(predict(student, data.x_train), data.y_train, t_all))
        signal = None if t_all is None else (lambda idx, xb: t_all[idx])
        result = train_model(student, data.x_train, data.y_train, Recipe(lr=1e-2, batch_size=64, steps=40),
                             loss_fn, seed=0, teacher=signal)
        after = float(loss_fn(predict(student, data.x_train), data.y_train, t_all))
    assert math.isfinite(result.final_loss) and result.steps == 40
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("method,divergence", sorted(KL_METHODS.items()))
def test_kl_methods_go_through_kd_loss(method: str, divergence: str, monkeypatch) -> None:
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kdbench.kd_loss(*args, **kwargs)

    monkeypatch.setattr(methods_mod, "kd_loss", spy)
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    loss = make_loss(method, **HYPER)(s, y, t)
    expected = kdbench.kd_loss(s, t, y, temperature=2.0, alpha=0.3, divergence=divergence, beta=0.4)
    assert calls == [dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.4)]
    assert torch.equal(loss, expected)


def test_label_baselines() -> None:
    s, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert torch.equal(make_loss("ce")(s, y, None), F.cross_entropy(s, y))
    # Smoothed target (1 - eps) onehot + eps / C, written out by hand.
    target = F.one_hot(y, 4) * 0.8 + 0.2 / 4
    manual = -(target * F.log_softmax(s, -1)).sum(-1).mean()
    assert torch.allclose(make_loss("label_smoothing", smoothing=0.2)(s, y, None), manual)


def test_logit_mse() -> None:
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    manual = 0.3 * F.cross_entropy(s, y) + 0.7 * ((s - t) ** 2).mean()
    assert torch.allclose(make_loss("logit_mse", alpha=0.3)(s, y, t), manual)
    assert torch.allclose(make_loss("logit_mse", alpha=0.0)(s, y, t), ((s - t) ** 2).mean())


def test_entropy_match() -> None:
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    h = lambda z: -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)  # noqa: E731
    manual = F.cross_entropy(s, y) + 0.5 * ((h(s) - h(t)) ** 2).mean()
    assert torch.allclose(make_loss("entropy_match", entropy_weight=0.5)(s, y, t), manual)


def test_entropy_with_a_zero_probability() -> None:
    z = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    assert torch.allclose(entropy(z), torch.tensor([0.0, math.log(2)]))


def test_ensemble_logits_are_the_mean_probability() -> None:
    zs = [torch.randn(4, 6) for _ in range(3)]
    mean_p = torch.stack([z.softmax(-1) for z in zs]).mean(0)
    assert torch.allclose(ensemble_logits(zs).softmax(-1), mean_p, atol=1e-6)


def test_teacher_required() -> None:
    with pytest.raises(ValueError, match=r"^teacher_logits: "):
        make_loss("kd")(torch.randn(2, 3), torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match=r"^method: "):
        make_loss("fitnets")


# --------------------------------------------------------------------------- training loop


def test_training_is_deterministic(data) -> None:
    def run() -> torch.Tensor:
        with deterministic(1):
            m = seeded_model(lambda: build_model("mlp_16x1", data.input_shape, 10), 5, CPU)
            train_model(m, data.x_train, data.y_train, Recipe(steps=30, batch_size=32), make_loss("ce"), seed=9)
        return predict(m, data.x_test)

    assert torch.equal(run(), run())


def test_seeded_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    seeded_model(lambda: build_model("mlp", (4,), 2), 123, CPU)
    assert torch.equal(torch.rand(3), expected)


def test_deterministic_restores_settings() -> None:
    threads = torch.get_num_threads()
    with deterministic(1):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads


def test_derive_seed_separates_streams() -> None:
    assert derive_seed(0, "a") != derive_seed(0, "b") != derive_seed(1, "b")
    assert derive_seed(3, "a") == derive_seed(3, "a") and 0 <= derive_seed(3, "a") < 2**63


def test_batches_cover_each_epoch() -> None:
    gen = torch.Generator().manual_seed(0)
    it = batch_indices(10, 3, gen, CPU)
    epoch = torch.cat([next(it) for _ in range(3)])  # 3 full batches; the 10th sample waits
    assert len(set(epoch.tolist())) == 9
    small = batch_indices(4, 100, gen, CPU)
    assert sorted(next(small).tolist()) == [0, 1, 2, 3]


def test_schedules() -> None:
    r = Recipe(lr=1.0, steps=80, schedule="multistep")
    assert [lr_at(r, s) for s in (0, 49, 50, 60, 70, 79)] == pytest.approx([1, 1, 0.1, 0.01, 0.001, 0.001])
    c = Recipe(lr=1.0, steps=100, schedule="cosine")
    assert lr_at(c, 0) == 1.0 and lr_at(c, 50) == pytest.approx(0.5) and lr_at(c, 99) < 1e-3
    assert lr_at(Recipe(lr=0.3), 5000) == 0.3


def test_augment_crops_and_flips() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    assert augment_batch(x, "none", gen) is x
    crops = [augment_batch(x, "crop", gen, pad=2) for _ in range(20)]
    assert all(c.shape == x.shape for c in crops)
    assert any(not torch.equal(c, x) for c in crops)
    # A crop is a shifted window of the zero-padded image: every non-zero value comes from x, same channel.
    for c in crops:
        for ch in range(3):
            vals = set(c[:, ch][c[:, ch] != 0].tolist())
            assert vals <= set(x[:, ch].flatten().tolist())
    flipped = [augment_batch(x, "crop_flip", gen, pad=0) for _ in range(20)]
    assert any(torch.equal(f[0], x[0].flip(-1)) for f in flipped)
    assert all(torch.equal(f[0], x[0]) or torch.equal(f[0], x[0].flip(-1)) for f in flipped)


def test_divergence_raises_early(data) -> None:
    m = build_model("linear", data.input_shape, 10)
    bad = lambda s, y, t: s.sum() * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train_model(m, data.x_train, data.y_train, Recipe(steps=5), bad, seed=0)
