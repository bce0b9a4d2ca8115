"""One experiment as data: :class:`RunConfig` (and the training :class:`Recipe` inside it).

Both are frozen dataclasses of plain values, validated on construction (every
error message starts with the field's name), JSON-serialisable with
:meth:`RunConfig.to_dict` / :meth:`RunConfig.from_dict`, and identified by
:meth:`RunConfig.config_hash`.  Construction also *normalises*: an omitted recipe
becomes the dataset's default recipe, a recipe given as a partial mapping is laid
over that default, ``teacher_seed=None`` becomes ``seed`` and ``self_distill``
without a teacher uses the student's architecture, so that two configs that run the
same experiment compare (and hash) equal.

Whether a disk dataset's files are present is checked by :func:`check_runnable`, not
on construction, so that configs can be built and stored on a machine without the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from kdbench import _checks
from kdbench.experiments import datasets as _datasets
from kdbench.experiments import models as _models
from kdbench.experiments.methods import METHODS, no_posterior_error

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "multistep")
AUGMENTATIONS = ("none", "crop", "crop_flip")


# --------------------------------------------------------------------------- field checks


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _float(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high) and math.isfinite(v)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name}: expected a finite value in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def _str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name}: expected a non-empty str, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(keys: Mapping[str, Any], cls: type, prefix: str, what: str) -> None:
    """``ValueError`` naming the first key of ``keys`` that is not a field of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown {what} field; expected one of {', '.join(sorted(known))}")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: optimiser, schedule, batches, augmentation.

    ``steps`` optimiser steps on random batches of ``batch_size`` (epoch-wise
    permutations of the training split).  ``schedule``: "constant"; "cosine" (to 0 at
    the last step); "multistep" (x0.1 at 62.5%, 75% and 87.5% of the steps: RepDistiller's
    150/180/210 of 240 epochs).  ``momentum`` applies to SGD only.  ``augment``
    (image datasets from disk only): "crop" (random 4-pixel-padded crops) or
    "crop_flip" (plus random horizontal flips).
    """

    optimizer: str = "adam"
    lr: float = 1e-2
    batch_size: int = 100
    steps: int = 6000
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    augment: str = "none"

    def __post_init__(self) -> None:
        self._validate("recipe")

    def _validate(self, prefix: str) -> None:
        _set(self, "optimizer", _checks.check_choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS))
        _set(self, "lr", _float(f"{prefix}.lr", self.lr, low=0.0, low_open=True))
        _set(self, "batch_size", _int(f"{prefix}.batch_size", self.batch_size, 1))
        _set(self, "steps", _int(f"{prefix}.steps", self.steps, 1))
        _set(self, "weight_decay", _float(f"{prefix}.weight_decay", self.weight_decay, low=0.0))
        _set(self, "momentum", _float(f"{prefix}.momentum", self.momentum, low=0.0, high=1.0, high_open=True))
        _set(self, "schedule", _checks.check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES))
        _set(self, "augment", _checks.check_choice(f"{prefix}.augment", self.augment, AUGMENTATIONS))

    @classmethod
    def build(cls, prefix: str, value: object, default: "Recipe") -> "Recipe":
        """A Recipe from a Recipe, a partial mapping laid over ``default``, or None (= ``default``)."""
        if value is None:
            return default
        if isinstance(value, Recipe):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{prefix}: expected a Recipe, a mapping of its fields or None, got {type(value).__name__}")
        _reject_unknown(value, cls, f"{prefix}.", "recipe")
        merged = {**dataclasses.asdict(default), **value}
        recipe = object.__new__(cls)
        for k, v in merged.items():
            _set(recipe, k, v)
        recipe._validate(prefix)
        return recipe


# Per-dataset defaults: MNIST-1D's published CNN recipe; RepDistiller's CIFAR recipe
# (SGD 0.05, momentum 0.9, wd 5e-4, batch 64, 240 epochs of 50k = 187,500 steps).
DEFAULT_RECIPES: dict[str, Recipe] = {
    "mnist1d": Recipe("adam", 1e-2, 100, 6000),
    "digits": Recipe("adam", 3e-3, 64, 2000),
    "gaussian": Recipe("adam", 3e-3, 100, 3000),
    "mnist": Recipe("adam", 1e-3, 128, 4700),
    "fashion_mnist": Recipe("adam", 1e-3, 128, 4700),
    "cifar10": Recipe("sgd", 0.05, 64, 187_500, 5e-4, 0.9, "multistep", "crop_flip"),
    "cifar100": Recipe("sgd", 0.05, 64, 187_500, 5e-4, 0.9, "multistep", "crop_flip"),
}

# Language models (hmm_v<V>, ginc_v<V>): batches of sequences; AdamW (Hugging Face's Trainer), cosine.
LM_RECIPE = Recipe("adam", 3e-3, 32, 1500, 0.0, 0.9, "cosine", "none")


def default_recipe(dataset: str) -> Recipe:
    """The training recipe of ``dataset`` when a config names none (teacher and student alike)."""
    if dataset in DEFAULT_RECIPES:
        return DEFAULT_RECIPES[dataset]
    if _datasets.dataset_info(dataset).kind == "lm":
        return LM_RECIPE
    raise ValueError(f"dataset: no default recipe for {dataset!r}")


# --------------------------------------------------------------------------- run config


@dataclass(frozen=True)
class RunConfig:
    """One distillation experiment: data, teacher, student, method, hyper-parameters, seed.

    Fields:
        dataset: a name in ``kdbench.experiments.datasets.DATASETS``.
        student: a model name (``kdbench.experiments.models``), e.g. "cnn1d", "resnet20".
        method: a name in ``kdbench.experiments.methods.METHODS``; "oracle_kd" only on a
            dataset with a known Bayes posterior (gaussian).
        teacher: the teacher's model name; required by the distillation methods, optional
            for "ce" / "label_smoothing" / "oracle_kd" (then evaluated alongside, and the
            student's agreement with it reported); for "self_distill" None means the student's.
        seed: seed of the student's initialisation and batch order.
        teacher_seed: seed of the teacher (ensemble member k uses
            ``teacher_seed + k * ENSEMBLE_SEED_STRIDE``); None = ``seed``.
        temperature, alpha, beta: ``kdbench.kd_loss``'s T (> 0), hard-label weight in [0, 1]
            and JSD beta in (0, 1).
        smoothing: label-smoothing epsilon in [0, 1) ("label_smoothing" student,
            "kd_ls_teacher" teacher).
        ensemble_size: K >= 2 teachers for "ensemble_kd".
        entropy_weight: lambda >= 0 of "entropy_match".
        student_recipe, teacher_recipe: :class:`Recipe`, a partial mapping over the
            dataset's default, or None for the default.
        data_dir: root of torchvision-format files (mnist, fashion_mnist, cifar10, cifar100).
        data_seed: seed of the validation (and digits / gaussian test) split and of the
            gaussian problem instance.
        dataset_size: total samples of a generated dataset (mnist1d, gaussian); None = default.
        val_fraction: share of the training split held out for validation, in (0, 0.5].
    """

    dataset: str
    student: str
    method: str = "kd"
    teacher: str | None = None
    seed: int = 0
    teacher_seed: int | None = None
    temperature: float = 4.0
    alpha: float = 0.1
    beta: float = 0.5
    smoothing: float = 0.1
    ensemble_size: int = 3
    entropy_weight: float = 1.0
    student_recipe: Recipe | None = field(default=None)
    teacher_recipe: Recipe | None = field(default=None)
    data_dir: str | None = None
    data_seed: int = 0
    dataset_size: int | None = None
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        info = self._validate_names()
        _set(self, "seed", _int("seed", self.seed, 0))
        teacher_seed = self.seed if self.teacher_seed is None else _int("teacher_seed", self.teacher_seed, 0)
        _set(self, "teacher_seed", teacher_seed)
        _set(self, "temperature", _checks.check_temperature(self.temperature))
        _set(self, "alpha", _checks.check_unit_interval("alpha", self.alpha, open_=False))
        _set(self, "beta", _checks.check_unit_interval("beta", self.beta, open_=True))
        _set(self, "smoothing", _float("smoothing", self.smoothing, low=0.0, high=1.0, high_open=True))
        _set(self, "ensemble_size", _int("ensemble_size", self.ensemble_size, 2))
        _set(self, "entropy_weight", _float("entropy_weight", self.entropy_weight, low=0.0))
        _set(self, "data_seed", _int("data_seed", self.data_seed, 0))
        _set(self, "val_fraction", _float("val_fraction", self.val_fraction, low=0.0, high=0.5, low_open=True))
        if self.dataset_size is not None:
            if not info.sizable:
                raise ValueError(
                    f"dataset_size: only generated datasets (mnist1d, gaussian) take a size; "
                    f"{self.dataset}'s is fixed, expected None"
                )
            _set(self, "dataset_size", _int("dataset_size", self.dataset_size, 100))
        if self.data_dir is not None:
            if not isinstance(self.data_dir, (str, os.PathLike)):
                raise TypeError(f"data_dir: expected a path (str), got {type(self.data_dir).__name__}")
            _set(self, "data_dir", os.fspath(self.data_dir))
        elif info.from_disk:
            files = _datasets.expected_files(self.dataset, "<data_dir>")
            raise ValueError(
                f"data_dir: dataset {self.dataset!r} is read from disk (torchvision format, e.g. {files[0]}); "
                "expected the directory holding it, got None"
            )
        default = default_recipe(self.dataset)
        for name in ("student_recipe", "teacher_recipe"):
            recipe = Recipe.build(name, getattr(self, name), default)
            if recipe.augment != "none" and not info.augmentable:
                raise ValueError(
                    f"{name}.augment: random crops apply to the image datasets read from disk; "
                    f"{self.dataset!r} expects 'none', got {recipe.augment!r}"
                )
            _set(self, name, recipe)

    def _validate_names(self) -> _datasets.DatasetInfo:
        dataset = _str("dataset", self.dataset)
        info = _datasets.dataset_info(dataset)
        method = _checks.check_choice("method", self.method, tuple(METHODS))
        spec = METHODS[method]
        if spec.bayes_teacher and not info.posterior:
            raise no_posterior_error(method, dataset)
        student = _models.parse_model(self.student, field="student")
        _models.check_input(student, info.input_shape, field="student", kind=info.kind)
        if self.teacher is None and spec.same_architecture:
            _set(self, "teacher", self.student)
        if self.teacher is None:
            if spec.needs_teacher:
                raise ValueError(f"teacher: method {method!r} distils from a teacher; expected a model name, got None")
        else:
            teacher = _models.parse_model(self.teacher, field="teacher")
            _models.check_input(teacher, info.input_shape, field="teacher", kind=info.kind)
            if spec.same_architecture and self.teacher != self.student:
                raise ValueError(
                    f"teacher: method {method!r} uses the student's architecture {self.student!r}, got {self.teacher!r}"
                )
        return info

    # ----------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (recipes as nested dicts); ``from_dict`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Build from a mapping (e.g. parsed TOML/JSON); unknown keys are rejected by name."""
        if not isinstance(data, Mapping):
            raise TypeError(f"config: expected a mapping, got {type(data).__name__}")
        _reject_unknown(data, cls, "", "config")
        for required in ("dataset", "student"):
            if required not in data:
                raise ValueError(f"{required}: missing (required field)")
        return cls(**dict(data))

    def flat_dict(self) -> dict[str, Any]:
        """``to_dict`` with the recipes flattened: ``student_recipe.lr`` etc. (one CSV column each)."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def config_hash(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON of every field but ``data_dir``.

        ``data_dir`` says where the files are, not what the experiment is, so moving
        the data keeps the hash.  Stable across processes and machines.
        """
        d = self.to_dict()
        d.pop("data_dir")
        return stable_hash(d)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def stable_hash(data: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``json.dumps(data, sort_keys=True)`` (floats in repr form)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_runnable(config: RunConfig) -> None:
    """Checks that need the machine: the disk dataset's files exist (``FileNotFoundError`` naming ``data_dir``)."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config: expected a RunConfig, got {type(config).__name__}")
    _datasets.check_available(config.dataset, config.data_dir)
