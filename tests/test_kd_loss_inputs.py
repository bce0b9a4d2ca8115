"""Every bad input named by the API gets a ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import kdbench

S = torch.randn(4, 10)
T = torch.randn(4, 10)
Y = torch.randint(0, 10, (4,))

BAD_CALLS = {
    "shape_mismatch": (dict(teacher_logits=torch.randn(4, 11)), ValueError, "teacher_logits"),
    "non_float_student": (dict(student_logits=torch.ones(4, 10, dtype=torch.long)), TypeError, "student_logits"),
    "non_float_teacher": (dict(teacher_logits=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits"),
    "student_not_a_tensor": (dict(student_logits=[[1.0, 2.0]]), TypeError, "student_logits"),
    "zero_dim_logits": (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "student_logits"),
    "empty_class_dim": (dict(student_logits=torch.zeros(4, 0), teacher_logits=torch.zeros(4, 0)), ValueError, "student_logits"),
    "temperature_zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature_negative": (dict(temperature=-1.0), ValueError, "temperature"),
    "temperature_nan": (dict(temperature=float("nan")), ValueError, "temperature"),
    "temperature_inf": (dict(temperature=float("inf")), ValueError, "temperature"),
    "temperature_string": (dict(temperature="2"), TypeError, "temperature"),
    "alpha_above_one": (dict(alpha=1.5, labels=Y), ValueError, "alpha"),
    "alpha_negative": (dict(alpha=-0.1, labels=Y), ValueError, "alpha"),
    "alpha_without_labels": (dict(alpha=0.5), ValueError, "labels"),
    "float_labels": (dict(labels=Y.float()), TypeError, "labels"),
    "bool_labels": (dict(labels=Y > 3), TypeError, "labels"),
    "labels_wrong_shape": (dict(labels=Y[:3]), ValueError, "labels"),
    "labels_with_class_dim": (dict(labels=Y[:, None]), ValueError, "labels"),
    "label_too_large": (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
    "label_negative": (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
    "unknown_divergence": (dict(divergence="kl"), ValueError, "divergence"),
    "unknown_reduction": (dict(reduction="mean"), ValueError, "reduction"),
    "unknown_backend": (dict(backend="cuda"), ValueError, "backend"),
    "beta_zero": (dict(divergence="jsd", beta=0.0), ValueError, "beta"),
    "beta_one": (dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    "ignore_index_float": (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    "float64_on_triton": (
        dict(student_logits=S.double(), teacher_logits=T.double(), backend="triton"),
        TypeError,
        "backend",
    ),
    "float64_teacher_on_triton": (dict(teacher_logits=T.double(), backend="triton"), TypeError, "backend"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_names_the_argument(case):
    overrides, exc, name = BAD_CALLS[case]
    kwargs = dict(student_logits=S, teacher_logits=T, labels=None)
    kwargs.update(overrides)
    with pytest.raises(exc, match=rf"^{name}:"):
        kdbench.kd_loss(**kwargs)


@pytest.mark.parametrize("case", ["temperature_zero", "alpha_above_one", "unknown_divergence", "beta_zero", "unknown_backend"])
def test_kdloss_module_validates_at_construction(case):
    overrides, exc, name = BAD_CALLS[case]
    options = {k: v for k, v in overrides.items() if k not in ("labels", "student_logits", "teacher_logits")}
    with pytest.raises(exc, match=rf"^{name}:"):
        kdbench.KDLoss(**options)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^backend:"):
        kdbench.kd_loss(S, T, backend="triton")


def test_ignore_index_label_is_not_out_of_range():
    kdbench.kd_loss(S, T, torch.tensor([0, -100, 3, 9]), alpha=0.5)
