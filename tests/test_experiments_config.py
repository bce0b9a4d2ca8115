"""RunConfig: validation naming the field, normalisation, serialisation, a stable hash."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kdbench.experiments as experiments
from kdbench.experiments import RunConfig, run_experiment
from kdbench.experiments.config import DEFAULT_RECIPES, Recipe, check_runnable

BASE = dict(dataset="mnist1d", student="cnn1d", teacher="cnn1d_64", method="kd")

# (override, field the message must start with, exception type)
BAD = [
    (dict(dataset="imagenet"), "dataset", ValueError),
    (dict(dataset=3), "dataset", TypeError),
    (dict(student="vgg13"), "student", ValueError),
    (dict(teacher="resnet56"), "teacher", ValueError),  # images model on 1-D data
    (dict(student="cnn2d"), "student", ValueError),
    (dict(method="fitnet"), "method", ValueError),
    (dict(teacher=None), "teacher", ValueError),
    (dict(method="self_distill", teacher="mlp"), "teacher", ValueError),
    (dict(seed=-1), "seed", ValueError),
    (dict(seed=1.0), "seed", TypeError),
    (dict(seed=True), "seed", TypeError),
    (dict(teacher_seed="0"), "teacher_seed", TypeError),
    (dict(temperature=0), "temperature", ValueError),
    (dict(temperature="4"), "temperature", TypeError),
    (dict(alpha=1.5), "alpha", ValueError),
    (dict(beta=1.0), "beta", ValueError),
    (dict(smoothing=1.0), "smoothing", ValueError),
    (dict(ensemble_size=1), "ensemble_size", ValueError),
    (dict(entropy_weight=-0.1), "entropy_weight", ValueError),
    (dict(entropy_weight=float("nan")), "entropy_weight", ValueError),
    (dict(val_fraction=0.0), "val_fraction", ValueError),
    (dict(val_fraction=0.6), "val_fraction", ValueError),
    (dict(dataset_size=10), "dataset_size", ValueError),
    (dict(dataset="digits", student="cnn2d", teacher="cnn2d", dataset_size=1000), "dataset_size", ValueError),
    (dict(data_seed=-3), "data_seed", ValueError),
    (dict(data_dir=5), "data_dir", TypeError),
    (dict(dataset="cifar10", student="resnet20", teacher="resnet56"), "data_dir", ValueError),
    (dict(student_recipe={"lr": 0}), "student_recipe.lr", ValueError),
    (dict(student_recipe={"steps": 10.5}), "student_recipe.steps", TypeError),
    (dict(teacher_recipe={"optimizer": "lamb"}), "teacher_recipe.optimizer", ValueError),
    (dict(teacher_recipe={"schedule": "step"}), "teacher_recipe.schedule", ValueError),
    (dict(student_recipe={"momentum": 1.0}), "student_recipe.momentum", ValueError),
    (dict(student_recipe={"augment": "crop_flip"}), "student_recipe.augment", ValueError),  # 1-D data
    (dict(student_recipe={"epochs": 3}), "student_recipe.epochs", ValueError),
    (dict(student_recipe=[1, 2]), "student_recipe", TypeError),
]


@pytest.mark.parametrize("override,field,exc", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_names_the_field(override: dict, field: str, exc: type) -> None:
    with pytest.raises(exc) as info:
        RunConfig(**{**BASE, **override})
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_recipe_checks_its_own_fields() -> None:
    with pytest.raises(ValueError, match=r"^recipe.batch_size: "):
        Recipe(batch_size=0)


def test_from_dict_rejects_unknown_and_missing_fields() -> None:
    with pytest.raises(ValueError, match=r"^temprature: unknown config field"):
        RunConfig.from_dict({**BASE, "temprature": 2.0})
    with pytest.raises(ValueError, match=r"^student: missing"):
        RunConfig.from_dict({"dataset": "mnist1d"})
    with pytest.raises(TypeError, match=r"^config: "):
        RunConfig.from_dict([("dataset", "mnist1d")])


def test_frozen() -> None:
    cfg = RunConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_normalisation() -> None:
    cfg = RunConfig(**BASE, seed=7, temperature=2)
    assert cfg.teacher_seed == 7 and isinstance(cfg.temperature, float)
    assert cfg.student_recipe == DEFAULT_RECIPES["mnist1d"] == cfg.teacher_recipe
    partial = RunConfig(**BASE, student_recipe={"steps": 10})
    assert partial.student_recipe == Recipe(steps=10) and partial.teacher_recipe.steps == 6000
    assert RunConfig(dataset="mnist1d", student="mlp", method="self_distill").teacher == "mlp"
    assert RunConfig(dataset="mnist1d", student="mlp", method="ce").teacher is None
    # Two spellings of the same experiment are the same config.
    assert RunConfig(**BASE, seed=7) == RunConfig(**BASE, seed=7, teacher_seed=7, student_recipe={})


def test_json_round_trip() -> None:
    cfg = RunConfig(**BASE, seed=2, student_recipe={"steps": 50, "schedule": "cosine"}, dataset_size=2000)
    text = json.dumps(cfg.to_dict())
    back = RunConfig.from_dict(json.loads(text))
    assert back == cfg and back.config_hash() == cfg.config_hash()


def test_flat_dict_has_one_column_per_value() -> None:
    flat = RunConfig(**BASE).flat_dict()
    assert flat["student_recipe.lr"] == 0.01 and flat["teacher_recipe.steps"] == 6000
    assert not any(isinstance(v, dict) for v in flat.values())


def test_hash_tracks_the_experiment_not_the_data_location() -> None:
    cfg = RunConfig(**BASE)
    assert cfg.replace(seed=1).config_hash() != cfg.config_hash()
    assert cfg.replace(student_recipe=Recipe(lr=0.02)).config_hash() != cfg.config_hash()
    assert cfg.replace(data_dir="/elsewhere").config_hash() == cfg.config_hash()
    assert len(cfg.config_hash()) == 16 and int(cfg.config_hash(), 16) >= 0


def test_hash_is_stable_across_processes() -> None:
    cfg = RunConfig(**BASE, seed=3)
    code = (
        "from kdbench.experiments import RunConfig;"
        f"print(RunConfig(**{BASE!r}, seed=3).config_hash())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == cfg.config_hash()


def test_missing_data_rejected_before_training(tmp_path, monkeypatch) -> None:
    cfg = RunConfig(dataset="cifar10", student="resnet20", teacher="resnet56", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^data_dir: .*cifar-10-batches-py"):
        check_runnable(cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the config was checked")

    monkeypatch.setattr(experiments, "load_dataset", no_training)
    monkeypatch.setattr(experiments, "train_model", no_training)
    with pytest.raises(FileNotFoundError, match=r"^data_dir: "):
        run_experiment(cfg, cache_dir=str(tmp_path / "cache"), progress=False)
    assert not (tmp_path / "cache").exists()


def test_run_experiment_checks_its_own_arguments(tmp_path) -> None:
    cfg = RunConfig(dataset="gaussian", student="linear", method="ce", student_recipe={"steps": 1})
    with pytest.raises(TypeError, match=r"^config: "):
        run_experiment(cfg.to_dict(), progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^num_threads: "):
        run_experiment(cfg, num_threads=0, progress=False)
    with pytest.raises(ValueError, match=r"^device: "):
        run_experiment(cfg, device="gpu0", progress=False)
    with pytest.raises(TypeError, match=r"^progress: "):
        run_experiment(cfg, progress="loud")  # type: ignore[arg-type]
