"""The Bayes-optimal reference (bayes/ fields, the "bayes" row) and oracle_kd, on the gaussian mixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdbench.experiments as experiments
from kdbench.experiments import (
    BAYES_METHOD,
    BAYES_ROLE,
    DATASETS,
    RELIABILITY_FIELDS,
    ROLE_FIELDS,
    TRAIN_FIELDS,
    RunConfig,
    load_config_dataset,
    load_dataset,
    record_rows,
    run_experiment,
)
from kdbench.experiments.datasets import gaussian_means, gaussian_posterior
from kdbench.experiments.methods import bayes_teacher_logits

SMALL = dict(
    dataset="gaussian",
    dataset_size=3000,
    data_seed=2,
    teacher="mlp_16x1",
    student="linear",
    teacher_recipe={"steps": 60, "batch_size": 50},
    student_recipe={"steps": 30, "batch_size": 50},
)
NOT_FOR_BAYES = set(TRAIN_FIELDS) | {"agreement", "predictive_kl"}  # nothing was trained, no teacher compared


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


def _run(cache, **overrides):
    return run_experiment(RunConfig(**{**SMALL, **overrides}), cache_dir=str(cache), progress=False)


@pytest.fixture(scope="module")
def record(cache):
    return _run(cache, method="kd")


def _binned_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    bins = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += abs(conf[sel].mean() - correct[sel].mean()) * sel.sum()
    return total / len(conf)


def test_bayes_fields_match_an_independent_computation(record) -> None:
    # The posterior straight from the generating means, in numpy, from the stored (float32) test inputs.
    cfg = RunConfig(**SMALL, method="kd")
    data = load_config_dataset(cfg)
    post = gaussian_posterior(data.x_test.double().numpy(), gaussian_means(cfg.data_seed))
    y = data.y_test.numpy()
    pred, conf = post.argmax(1), post.max(1)
    correct = (pred == y).astype(float)
    onehot = np.eye(post.shape[1])[y]
    assert record["bayes/accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert record["bayes/nll"] == pytest.approx(-np.log(post[np.arange(len(y)), y]).mean(), rel=1e-6)
    assert record["bayes/brier"] == pytest.approx(((post - onehot) ** 2).sum(1).mean(), rel=1e-6)
    assert record["bayes/ece"] == pytest.approx(_binned_ece(conf, correct), abs=1e-6)
    # Calibrated by construction: no error against the true posterior, only the binned estimate's noise.
    assert record["bayes/true_ce"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < record["bayes/ece"] < 0.05
    assert sum(record["bayes/bin_count"]) == record["n_test"]
    assert math.isclose(sum(record["bayes/bin_correct_sum"]) / record["n_test"], record["bayes/accuracy"],
                        rel_tol=1e-12)
    for field in ROLE_FIELDS:
        value = record[f"bayes/{field}"]
        if field in NOT_FOR_BAYES:
            assert value is None, field
        else:
            assert isinstance(value, float) and math.isfinite(value), (field, value)
    assert set(RELIABILITY_FIELDS) <= {k.split("/", 1)[1] for k in record if k.startswith("bayes/")}


def test_bayes_fields_depend_on_the_data_only(cache, record) -> None:
    other = _run(cache, method="ce", seed=5)
    bayes = {k: v for k, v in record.items() if k.startswith("bayes/")}
    assert bayes and bayes == {k: v for k, v in other.items() if k.startswith("bayes/")}
    moved = _run(cache, method="ce", data_seed=3)
    assert moved["bayes/nll"] != record["bayes/nll"]


def test_no_bayes_fields_without_a_posterior(tmp_path) -> None:
    cfg = RunConfig(dataset="digits", teacher="mlp_8x1", student="linear", method="kd",
                    teacher_recipe={"steps": 5}, student_recipe={"steps": 5})
    record = run_experiment(cfg, cache_dir=str(tmp_path), progress=False)
    assert not any(k.startswith("bayes/") for k in record)
    assert [r["role"] for r in record_rows(record)] == ["teacher", "student"]


def test_record_rows_emits_the_bayes_row_first(record) -> None:
    rows = record_rows(record)
    assert [(r["role"], r["method"]) for r in rows] == [(BAYES_ROLE, BAYES_METHOD), ("teacher", "kd"), ("student", "kd")]
    bayes = rows[0]
    assert {f: bayes[f] for f in ROLE_FIELDS} == {f: record[f"bayes/{f}"] for f in ROLE_FIELDS}
    assert list(bayes) == list(rows[2])  # the same columns, in the same order, as every other row
    assert bayes["dataset"] == "gaussian" and bayes["seed"] == record["seed"]


def test_record_without_bayes_fields_has_no_bayes_row(record) -> None:
    # Records stored before the reference existed have no bayes/ keys.
    old = {k: v for k, v in record.items() if not k.startswith("bayes/")}
    assert [r["role"] for r in record_rows(old)] == ["teacher", "student"]


def test_dataset_info_agrees_with_the_loaders() -> None:
    sizes = {"mnist1d": 500, "gaussian": 500}
    for name in ("mnist1d", "digits", "gaussian"):
        data = load_dataset(name, dataset_size=sizes.get(name))
        assert (data.bayes_logits is not None) == DATASETS[name].posterior == (data.posterior_test is not None)


def test_bayes_logits_give_the_posterior_on_any_split() -> None:
    data = load_dataset("gaussian", dataset_size=1000, data_seed=1)
    means = gaussian_means(1)
    for x in (data.x_train, data.x_test):
        expected = gaussian_posterior(x.double().numpy(), means)
        assert np.allclose(torch.softmax(data.bayes_logits(x), -1).numpy(), expected, rtol=0, atol=1e-12)
    assert data.to("meta").bayes_logits is data.bayes_logits


# --------------------------------------------------------------------------- oracle_kd


def test_oracle_teacher_logits_are_the_log_posterior() -> None:
    data = load_dataset("gaussian", dataset_size=1000)
    z = bayes_teacher_logits("oracle_kd", data, data.x_test)
    assert z.dtype == torch.float32 and z.shape == data.posterior_test.shape
    assert torch.allclose(z.double(), data.posterior_test.log(), rtol=0, atol=1e-5)


def test_oracle_kd_trains_on_the_log_posterior(cache, monkeypatch) -> None:
    seen = {}
    train = experiments.train_model

    def spy(model, x, y, recipe, loss_fn, *, teacher=None, **kwargs):
        seen["x"], seen["teacher"] = x, teacher
        return train(model, x, y, recipe, loss_fn, teacher=teacher, **kwargs)

    monkeypatch.setattr(experiments, "train_model", spy)
    record = _run(cache, method="oracle_kd")
    x, teacher = seen["x"], seen["teacher"]
    idx = torch.arange(0, len(x), 7)
    expected = np.log(gaussian_posterior(x[idx].double().numpy(), gaussian_means(SMALL["data_seed"])))
    assert np.allclose(teacher(idx, x[idx]).double().numpy(), expected, rtol=0, atol=1e-5)
    # The named teacher model is still evaluated alongside, as for ce.
    assert record["teacher/accuracy"] is not None and record["student/agreement"] is not None


def test_oracle_kd_goes_through_kd_loss_like_kd() -> None:
    from kdbench.experiments.methods import make_loss

    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    kw = dict(temperature=3.0, alpha=0.2)
    assert torch.equal(make_loss("oracle_kd", **kw)(s, y, t), make_loss("kd", **kw)(s, y, t))


def test_oracle_kd_beats_ce_on_a_small_training_set(cache) -> None:
    # 720 training samples: the posterior's soft targets carry far more than the labels do.
    small = dict(dataset_size=1000, student="mlp_32x1", teacher=None, temperature=1.0, alpha=0.0,
                 student_recipe={"steps": 400, "batch_size": 50, "lr": 1e-2})
    ce = _run(cache, method="ce", **small)
    oracle = _run(cache, method="oracle_kd", **small)
    assert oracle["student/nll"] < ce["student/nll"] - 0.05
    assert oracle["student/accuracy"] >= ce["student/accuracy"] - 0.01
    assert oracle["student/true_ce"] < ce["student/true_ce"]


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_oracle_kd_without_a_posterior_is_rejected_by_name(dataset: str) -> None:
    with pytest.raises(ValueError, match=rf"^method: 'oracle_kd' .*posterior.*'gaussian'.*{dataset!r}"):
        RunConfig(dataset=dataset, student="linear", method="oracle_kd")


def test_oracle_signal_without_a_posterior_is_rejected_by_name() -> None:
    data = load_dataset("digits")
    with pytest.raises(ValueError, match=r"^method: 'oracle_kd' .*'digits'"):
        bayes_teacher_logits("oracle_kd", data, data.x_test)


def test_suite_with_oracle_kd_off_gaussian_names_the_line(tmp_path) -> None:
    from kdbench.sweep.suite import SuiteError, load_suite

    path = tmp_path / "s.toml"
    path.write_text('[[dataset]]\nname = "digits"\npairs = [{teacher = "mlp", student = "linear"}]\n'
                    '[[method]]\nmethod = "ce"\n\n[[method]]\nmethod = "oracle_kd"\n')
    with pytest.raises(SuiteError, match=r"s\.toml:8: method: 'oracle_kd' .*posterior"):
        load_suite(path)


def test_oracle_signal_is_float32_log_probabilities() -> None:
    data = load_dataset("gaussian", dataset_size=500)
    z = bayes_teacher_logits("oracle_kd", data, data.x_train)
    assert torch.allclose(torch.logsumexp(z.double(), -1), torch.zeros(len(z), dtype=torch.float64), atol=1e-5)
    assert torch.equal(z, F.log_softmax(data.bayes_logits(data.x_train), -1).float())
