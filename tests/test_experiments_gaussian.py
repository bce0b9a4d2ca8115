"""The gaussian mixture's closed-form posterior and true calibration error, against Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdbench
from kdbench.experiments.datasets import gaussian_means, gaussian_posterior, gaussian_sample, load_dataset
from kdbench.experiments.evaluate import true_calibration_error


def test_posterior_matches_label_frequencies_in_1d() -> None:
    # In one dimension x can be binned finely: each bin's label frequencies estimate P(y | x).
    means = gaussian_means(0, num_classes=3, dim=1, spread=1.5)
    x, y = gaussian_sample(means, 2_000_000, seed=1)
    post = gaussian_posterior(x, means)
    edges = np.linspace(-4.0, 4.0, 81)
    bins = np.digitize(x[:, 0], edges)
    checked = 0
    for b in np.unique(bins):
        sel = bins == b
        n = int(sel.sum())
        if n < 2000:
            continue
        freq = np.bincount(y[sel], minlength=3) / n
        expect = post[sel].mean(axis=0)
        tol = 5 * np.sqrt(expect * (1 - expect) / n) + 1e-3
        assert np.all(np.abs(freq - expect) <= tol), (b, freq, expect)
        checked += 1
    assert checked >= 40


def _miscalibrated(x: np.ndarray, means: np.ndarray) -> torch.Tensor:
    """Over-confident, slightly biased logits: 1.8 x the Bayes logits, +0.6 on class 0."""
    bayes = x @ means.T - 0.5 * np.sum(means * means, axis=1)
    z = 1.8 * bayes
    z[:, 0] += 0.6
    return torch.from_numpy(z)


def test_true_calibration_error_matches_monte_carlo() -> None:
    # Unbiased label-based estimate: with s = sign(conf - P(y = pred | x)),
    # E[s (conf - 1[y = pred])] = E[s (conf - P(y = pred | x))] = E|conf - P(y = pred | x)|.
    means = gaussian_means(3)
    x, y = gaussian_sample(means, 400_000, seed=4)
    logits = _miscalibrated(x, means)
    post = torch.from_numpy(gaussian_posterior(x, means))
    closed = true_calibration_error(logits, post)
    p = logits.softmax(-1)
    conf, pred = p.max(-1)
    s = torch.sign(conf - post.gather(1, pred[:, None]).squeeze(1))
    correct = (pred == torch.from_numpy(y)).double()
    monte_carlo = float((s * (conf - correct)).mean())
    assert closed > 0.05  # the case is far from calibrated
    assert closed == pytest.approx(monte_carlo, abs=2.5e-3)  # about 5 standard errors (4.6e-4)
    # Binning only averages errors of opposite sign within a bin: the binned ECE of a
    # large sample stays below the true calibration error.
    ece = kdbench.calibration_stats(logits, torch.from_numpy(y)).ece()
    assert ece <= closed + 5e-3


def test_bayes_classifier_is_calibrated() -> None:
    means = gaussian_means(0)
    x, y = gaussian_sample(means, 200_000, seed=7)
    post = torch.from_numpy(gaussian_posterior(x, means))
    assert true_calibration_error(post.log(), post) == pytest.approx(0.0, abs=1e-12)
    assert kdbench.calibration_stats(post.log(), torch.from_numpy(y)).ece() < 0.01


def test_temperature_enters_the_true_calibration_error() -> None:
    means = gaussian_means(0)
    x, _ = gaussian_sample(means, 5000, seed=2)
    post = torch.from_numpy(gaussian_posterior(x, means))
    # Bayes logits sharpened by 2 are over-confident; T = 2 undoes it exactly.
    sharp = 2 * post.log()
    assert true_calibration_error(sharp, post) > 0.02
    assert true_calibration_error(sharp, post, temperature=2.0) == pytest.approx(0.0, abs=1e-12)


def test_dataset_posterior_is_the_generating_one() -> None:
    d = load_dataset("gaussian", data_seed=4, dataset_size=800)
    expected = gaussian_posterior(d.x_test.double().numpy(), gaussian_means(4))
    # x is stored in float32: the posterior was computed from the stored values.
    assert np.allclose(d.posterior_test.numpy(), expected, atol=1e-12)


def test_shape_mismatch_named() -> None:
    with pytest.raises(ValueError, match=r"^posterior: "):
        true_calibration_error(torch.zeros(4, 3), torch.zeros(4, 2))
