"""Distillation experiments: one :class:`RunConfig` in, one flat record of metrics out.

>>> from kdbench.experiments import RunConfig, run_experiment, record_rows
>>> cfg = RunConfig(dataset="mnist1d", teacher="cnn1d_64", student="cnn1d", method="kd", seed=0)
>>> record = run_experiment(cfg, cache_dir="results/.cache/teachers")   # doctest: +SKIP
>>> rows = record_rows(record)   # one dict per evaluated model: role "teacher", then "student"

:func:`run_experiment` trains (or loads from the teacher cache) the teacher(s), trains
the student with the method's objective, and evaluates both on the test split.

The record is flat, JSON-serialisable, with a fixed set of keys for every config of a dataset:

* the config, flattened (:meth:`RunConfig.flat_dict`: ``dataset``, ``teacher``, ``student``,
  ``method``, ``seed``, ..., ``student_recipe.lr``, ...) and ``config_hash``;
* run facts (:data:`RUN_FIELDS`): ``device``, ``num_threads``, ``kdbench_version``,
  ``n_train``, ``n_val``, ``n_test``, ``teacher_cached``;
* for each role in :data:`ROLES` and each field in :data:`ROLE_FIELDS`, the key
  ``"<role>/<field>"`` - the metrics of :data:`kdbench.experiments.evaluate.METRIC_FIELDS`
  plus ``n_params``, ``train_seconds`` and ``train_samples_per_second``.  A value is None
  where the field does not apply (every teacher field when the run has no teacher, the
  teacher's agreement with itself, ``true_ce`` off ``gaussian``);
* on a dataset with a known Bayes posterior (``gaussian``) only, the same fields under
  ``"bayes/<field>"`` (:data:`BAYES_ROLE`): the Bayes-optimal classifier, softmax of the
  true log-posterior, evaluated on the same splits by the same code.  It is calibrated,
  so its ``true_ce`` is 0 up to rounding, while its binned ``ece`` is not 0: that is the
  binning's finite-sample bias, the floor a model's binned ECE is to be read against.
  Its training fields, ``agreement`` and ``predictive_kl`` are None.

:func:`record_rows` turns a record into one row per evaluated model (columns: the
config and run fields, ``role``, then :data:`ROLE_FIELDS`), ready for a CSV writer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdbench import __version__
from kdbench.experiments.config import DEFAULT_RECIPES, Recipe, RunConfig, check_runnable
from kdbench.experiments.datasets import DATASETS, Dataset, load_dataset
from kdbench.experiments.evaluate import METRIC_FIELDS, RELIABILITY_FIELDS, evaluate_predictions
from kdbench.experiments.methods import METHODS, bayes_teacher_logits, ensemble_logits, make_loss
from kdbench.experiments.models import FAMILIES, build_model, count_parameters
from kdbench.experiments.teachers import Teacher, default_cache_dir, get_teacher, teacher_configs
from kdbench.experiments.train import (
    Progress,
    derive_seed,
    deterministic,
    predict,
    seeded_model,
    stderr_progress,
    train_model,
)

ROLES = ("teacher", "student")
BAYES_ROLE = "bayes"  # the Bayes-optimal reference, present where the dataset's posterior is known
BAYES_METHOD = "bayes_optimal"  # the ``method`` of its row in record_rows
TRAIN_FIELDS = ("n_params", "train_seconds", "train_samples_per_second")
ROLE_FIELDS: tuple[str, ...] = METRIC_FIELDS + TRAIN_FIELDS
RUN_FIELDS = ("config_hash", "device", "num_threads", "kdbench_version", "n_train", "n_val", "n_test", "teacher_cached")

__all__ = [
    "BAYES_METHOD",
    "BAYES_ROLE",
    "DATASETS",
    "DEFAULT_RECIPES",
    "FAMILIES",
    "METHODS",
    "METRIC_FIELDS",
    "RELIABILITY_FIELDS",
    "ROLES",
    "ROLE_FIELDS",
    "RUN_FIELDS",
    "Recipe",
    "RunConfig",
    "build_model",
    "check_runnable",
    "default_cache_dir",
    "load_config_dataset",
    "load_dataset",
    "record_rows",
    "role_fields",
    "run_experiment",
]


def _resolve_progress(progress: bool | Progress | None) -> Progress | None:
    if progress is True:
        return stderr_progress
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    raise TypeError(f"progress: expected a bool or a callable taking a str, got {type(progress).__name__}")


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


class _TeacherSignal:
    """The teacher logits a method distils from: members combined, temperature-scaled for kd_ts.

    Without augmentation the training-split logits are computed once (:meth:`precompute`)
    and indexed per batch; with augmentation every batch goes through the teacher(s).
    """

    def __init__(self, teachers: list[Teacher], scale: float = 1.0) -> None:
        self.models = [t.model for t in teachers]
        self.scale = scale
        self.train: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        per_model = [predict(m, x) for m in self.models]
        z = per_model[0] if len(per_model) == 1 else ensemble_logits(per_model)
        return z / self.scale if self.scale != 1.0 else z

    def precompute(self, x_train: torch.Tensor) -> "_TeacherSignal":
        self.train = self.logits(x_train)
        return self

    def __call__(self, idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return self.train[idx] if self.train is not None else self.logits(xb)


class _BayesSignal(_TeacherSignal):
    """``log P(y | x)`` of the dataset's Bayes posterior as the teacher logits (``oracle_kd``)."""

    def __init__(self, method: str, data: Dataset) -> None:
        self.method = method
        self.data = data
        self.train = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return bayes_teacher_logits(self.method, self.data, x)


def run_experiment(
    config: RunConfig,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "auto",
    num_threads: int | None = 1,
    progress: bool | Callable[[str], None] | None = True,
) -> dict[str, Any]:
    """Run one experiment and return its flat record (see the module docstring).

    Args:
        config: the experiment.  Checked (with :func:`check_runnable`) before any work.
        cache_dir: folder of teacher checkpoints; None = :func:`default_cache_dir`.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        num_threads: torch CPU threads during the run (restored after); 1 is fastest for
            the small CPU models and keeps runs reproducible; None leaves torch's setting.
        progress: True prints progress lines to stderr, False/None is silent, a callable
            receives each line.

    Determinism: every random stream (data split, initialisation, batch order,
    augmentation) derives from the config's seeds, deterministic algorithms are on and
    the thread count is fixed, so the same config on the same machine and device gives
    the same numbers.  ``train_seconds`` fields are wall-clock and vary.
    """
    check_runnable(config)
    say = _resolve_progress(progress)
    dev = _resolve_device(device)
    bad_threads = isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    if num_threads is not None and bad_threads:
        raise ValueError(f"num_threads: expected an int >= 1 or None, got {num_threads!r}")
    with deterministic(num_threads):
        return _run(config, cache_dir=cache_dir, device=dev, progress=say, threads=torch.get_num_threads())


def load_config_dataset(config: RunConfig) -> Dataset:
    """The dataset ``config`` trains and evaluates on (CPU tensors, splits fixed by its data fields)."""
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        data_seed=config.data_seed,
        dataset_size=config.dataset_size,
        val_fraction=config.val_fraction,
    )


def _run(config: RunConfig, *, cache_dir: str | None, device: torch.device, progress: Progress | None,
         threads: int) -> dict[str, Any]:
    name = f"{config.dataset} {config.method} {config.teacher or '-'} -> {config.student} seed {config.seed}"
    if progress is not None:
        progress(f"[run] {name}")
    data = load_config_dataset(config).to(device)
    spec = METHODS[config.method]

    record: dict[str, Any] = config.flat_dict()
    record.update(
        config_hash=config.config_hash(),
        device=str(device),
        num_threads=threads,
        kdbench_version=__version__,
        teacher_cached=None,
    )
    if getattr(data, "kind", "classification") == "lm":
        from kdbench.experiments.lm import LM_ROLE_FIELDS, run_lm

        record.update(data.split_sizes())  # type: ignore[attr-defined]  # sequences
        for role in ROLES:
            record.update({f"{role}/{f}": None for f in LM_ROLE_FIELDS + RELIABILITY_FIELDS})
        return run_lm(config, data, record, cache_dir=cache_dir, device=device, progress=progress)  # type: ignore[arg-type]
    record.update(n_train=len(data.y_train), n_val=len(data.y_val), n_test=len(data.y_test))
    for role in ROLES:
        record.update({f"{role}/{f}": None for f in ROLE_FIELDS + RELIABILITY_FIELDS})
    if data.bayes_logits is not None:
        record.update({f"{BAYES_ROLE}/{k}": v for k, v in _evaluate_bayes(data).items()})

    teachers = [
        get_teacher(tc, data, cache_dir=cache_dir, device=device, progress=progress) for tc in teacher_configs(config)
    ]
    signal = None
    teacher_test = None
    if teachers:
        record["teacher_cached"] = all(t.cached for t in teachers)
        teacher_fields, teacher_test = _evaluate_teachers(teachers, data)
        record.update({f"teacher/{k}": v for k, v in teacher_fields.items()})
        if spec.needs_teacher:
            scale = teacher_fields["fitted_temperature"] if spec.teacher_temperature_scaled else 1.0
            signal = _TeacherSignal(teachers, scale)
            if config.student_recipe.augment == "none":  # type: ignore[union-attr]
                signal.precompute(data.x_train)
    if spec.bayes_teacher:
        signal = _BayesSignal(config.method, data)
        if config.student_recipe.augment == "none":  # type: ignore[union-attr]
            signal.precompute(data.x_train)

    student = seeded_model(
        lambda: build_model(config.student, data.input_shape, data.num_classes),
        derive_seed(config.seed, "student-init"),
        device,
    )
    loss_fn = make_loss(
        config.method,
        temperature=config.temperature,
        alpha=config.alpha,
        beta=config.beta,
        smoothing=config.smoothing,
        entropy_weight=config.entropy_weight,
    )
    result = train_model(
        student,
        data.x_train,
        data.y_train,
        config.student_recipe,  # type: ignore[arg-type]  # normalised to a Recipe
        loss_fn,
        seed=derive_seed(config.seed, "student"),
        teacher=signal,
        progress=progress,
        label=f"student {config.student} {config.method} seed {config.seed}",
    )
    metrics = evaluate_predictions(
        predict(student, data.x_val),
        data.y_val,
        predict(student, data.x_test),
        data.y_test,
        posterior_test=data.posterior_test,
        teacher_test_logits=teacher_test,
    )
    record.update({f"student/{k}": v for k, v in metrics.items()})
    record.update({
        "student/n_params": count_parameters(student),
        "student/train_seconds": result.seconds,
        "student/train_samples_per_second": result.samples_per_second,
    })
    if progress is not None:
        acc, ece = record["student/accuracy"], record["student/ece"]
        progress(f"[run] {name}: student accuracy {acc:.4f} ECE {ece:.4f} ({result.seconds:.1f} s)")
    return record


def _evaluate_teachers(teachers: list[Teacher], data: Dataset) -> tuple[dict[str, Any], torch.Tensor]:
    """The teacher's :data:`ROLE_FIELDS` (an ensemble's: mean probability, summed sizes and times) and test logits."""
    combined = _TeacherSignal(teachers)
    test = combined.logits(data.x_test)
    out: dict[str, Any] = evaluate_predictions(
        combined.logits(data.x_val), data.y_val, test, data.y_test, posterior_test=data.posterior_test
    )
    seconds = sum(t.train_seconds for t in teachers)
    samples = sum(t.train_seconds * t.samples_per_second for t in teachers)
    out["n_params"] = sum(count_parameters(t.model) for t in teachers)
    out["train_seconds"] = seconds
    out["train_samples_per_second"] = samples / seconds if seconds > 0 else None
    return out, test


def _evaluate_bayes(data: Dataset) -> dict[str, Any]:
    """The Bayes-optimal classifier's :data:`ROLE_FIELDS` (and reliability sums) on ``data``'s splits."""
    bayes = data.bayes_logits
    assert bayes is not None
    # float64 logits: the reference should carry no rounding of its own (its true_ce is then ~1e-16).
    out: dict[str, Any] = evaluate_predictions(
        bayes(data.x_val), data.y_val, bayes(data.x_test), data.y_test, posterior_test=data.posterior_test
    )
    out.update(dict.fromkeys(TRAIN_FIELDS))
    return out


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: the shared columns, ``role``, then :func:`role_fields`.

    Roles in order: ``"bayes"`` (method ``"bayes_optimal"``) where the record has the
    Bayes-optimal reference (datasets with a known posterior), ``"teacher"`` unless the
    run had no teacher, then ``"student"``.
    """
    shared = {k: v for k, v in record.items() if "/" not in k}
    names = role_fields(str(record.get("dataset")))
    rows = []
    if record.get(f"{BAYES_ROLE}/accuracy") is not None:
        fields = {f: record.get(f"{BAYES_ROLE}/{f}") for f in names}
        rows.append({**shared, "method": BAYES_METHOD, "role": BAYES_ROLE, **fields})
    for role in ROLES:
        if role == "teacher" and record.get("teacher") is None:
            continue
        rows.append({**shared, "role": role, **{f: record.get(f"{role}/{f}") for f in names}})
    return rows


def role_fields(dataset: str) -> tuple[str, ...]:
    """The per-model fields of a record of ``dataset``: :data:`ROLE_FIELDS`, or the language
    models' (:data:`kdbench.experiments.lm.LM_ROLE_FIELDS`)."""
    from kdbench.experiments.datasets import dataset_info

    try:
        kind = dataset_info(dataset).kind
    except ValueError:
        kind = "classification"
    if kind == "lm":
        from kdbench.experiments.lm import LM_ROLE_FIELDS

        return LM_ROLE_FIELDS
    return ROLE_FIELDS
