"""End-to-end tiny runs: the record has every field, finite; determinism; the teacher cache in use."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kdbench.experiments import (
    METHODS,
    RELIABILITY_FIELDS,
    ROLE_FIELDS,
    ROLES,
    RUN_FIELDS,
    RunConfig,
    record_rows,
    run_experiment,
)

TINY = dict(
    dataset="gaussian",
    dataset_size=600,
    teacher="mlp_16x1",
    student="linear",
    teacher_recipe={"steps": 60, "batch_size": 50},
    student_recipe={"steps": 30, "batch_size": 50},
    ensemble_size=2,
)
TIMING = {f"{r}/{f}" for r in ROLES for f in ("train_seconds", "train_samples_per_second")}
TEACHERLESS_FIELDS = {"agreement", "predictive_kl"}  # a teacher is not compared with itself


def _run(cache, **overrides):
    return run_experiment(RunConfig(**{**TINY, **overrides}), cache_dir=str(cache), progress=False)


def _assert_complete(record: dict, *, has_teacher: bool, has_posterior: bool) -> None:
    for key in RUN_FIELDS:
        assert key in record
    for role in ROLES:
        for field in ROLE_FIELDS:
            value = record[f"{role}/{field}"]
            applies = (role == "student" or (has_teacher and field not in TEACHERLESS_FIELDS)) and (
                has_posterior or not field.startswith("true_ce")
            )
            if role == "student" and field in TEACHERLESS_FIELDS:
                applies = has_teacher
            if applies:
                assert isinstance(value, (int, float)) and math.isfinite(value), (role, field, value)
            else:
                assert value is None, (role, field, value)
    for role in ROLES:
        sums = [record[f"{role}/{field}"] for field in RELIABILITY_FIELDS]
        if role == "teacher" and not has_teacher:
            assert sums == [None] * len(RELIABILITY_FIELDS)
            continue
        count, conf_sum, correct_sum = sums
        assert len(count) == len(conf_sum) == len(correct_sum) == 15
        assert sum(count) == record["n_test"]
        assert math.isclose(sum(correct_sum) / record["n_test"], record[f"{role}/accuracy"], rel_tol=1e-12)
        assert all(0 <= c <= n and 0 <= s <= n for c, s, n in zip(correct_sum, conf_sum, count))
    json.dumps(record, allow_nan=False)  # JSON-serialisable, no NaN


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teachers")


def test_record_has_every_field_all_finite(cache) -> None:
    record = _run(cache, method="kd")
    _assert_complete(record, has_teacher=True, has_posterior=True)
    assert record["dataset"] == "gaussian" and record["method"] == "kd" and record["student_recipe.steps"] == 30
    assert record["n_train"] + record["n_val"] + record["n_test"] == 600
    assert 0.0 <= record["student/accuracy"] <= 1.0 and record["student/fitted_temperature"] > 0
    assert record["student/train_samples_per_second"] > 0 and record["teacher/n_params"] > record["student/n_params"]


def test_same_config_same_numbers_and_the_cache_is_used(cache) -> None:
    first = _run(cache, method="kd_jsd", seed=11)
    second = _run(cache, method="kd_jsd", seed=11)
    assert first["teacher_cached"] is False and second["teacher_cached"] is True
    differing = {k for k in first if first[k] != second[k]}
    assert differing <= TIMING | {"teacher_cached"}, differing
    # The teacher's training time is that of its original run, also when loaded.
    assert second["teacher/train_seconds"] == first["teacher/train_seconds"]


def test_other_seed_other_numbers(cache) -> None:
    a, b = _run(cache, method="ce", seed=1), _run(cache, method="ce", seed=2)
    assert a["student/nll"] != b["student/nll"] and a["teacher/nll"] != b["teacher/nll"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs(cache, method: str) -> None:
    record = _run(cache, method=method, **({"teacher": None} if METHODS[method].same_architecture else {}))
    _assert_complete(record, has_teacher=True, has_posterior=True)
    if METHODS[method].ensemble:
        single = _run(cache, method="kd")
        assert record["teacher/n_params"] == 2 * single["teacher/n_params"]
        assert record["teacher/nll"] != single["teacher/nll"]
    if method == "self_distill":
        assert record["teacher"] == "linear" and record["teacher/n_params"] == record["student/n_params"]


def test_label_baseline_without_teacher(cache) -> None:
    record = _run(cache, method="label_smoothing", teacher=None)
    _assert_complete(record, has_teacher=False, has_posterior=True)
    assert record["teacher"] is None and record["teacher_cached"] is None
    rows = record_rows(record)
    assert [r["role"] for r in rows] == ["bayes", "student"]


def test_temperature_scaled_teacher_changes_the_student(cache) -> None:
    kd, kd_ts = _run(cache, method="kd"), _run(cache, method="kd_ts")
    assert kd["teacher/fitted_temperature"] != pytest.approx(1.0, abs=1e-3)
    assert kd_ts["teacher/nll"] == kd["teacher/nll"]  # the same teacher, evaluated unscaled
    assert kd_ts["student/nll"] != kd["student/nll"]


def test_rows_for_a_csv(cache) -> None:
    record = _run(cache, method="kd")
    rows = record_rows(record)
    assert [r["role"] for r in rows] == ["bayes", "teacher", "student"]  # gaussian: the Bayes reference first
    for row in rows:
        assert {"dataset", "teacher", "student", "method", "seed", "role", "config_hash"} <= row.keys()
        assert not any("/" in k for k in row)
        assert len(row) == len([k for k in record if "/" not in k]) + 1 + len(ROLE_FIELDS)  # no name clash
        assert list(row)[-len(ROLE_FIELDS):] == list(ROLE_FIELDS)
    assert rows[1]["accuracy"] == record["teacher/accuracy"] and rows[2]["ece"] == record["student/ece"]
    assert rows[1]["teacher"] == rows[2]["teacher"] == "mlp_16x1"
    assert rows[0]["accuracy"] == record["bayes/accuracy"] and rows[0]["method"] == "bayes_optimal"
    assert [r["method"] for r in rows[1:]] == ["kd", "kd"]


def test_mnist1d_run(tmp_path) -> None:
    cfg = RunConfig(dataset="mnist1d", teacher="cnn1d_8", student="mlp_16x1", method="kd", dataset_size=1000,
                    teacher_recipe={"steps": 40}, student_recipe={"steps": 20})
    record = run_experiment(cfg, cache_dir=str(tmp_path), progress=False)
    _assert_complete(record, has_teacher=True, has_posterior=False)
    assert record["n_test"] == 200


def test_progress_lines_and_silence(cache, capsys) -> None:
    lines: list[str] = []
    run_experiment(RunConfig(**TINY, method="kd", seed=3), cache_dir=str(cache), progress=lines.append)
    assert any("[teacher" in line for line in lines) and any("[student" in line for line in lines)
    assert lines[-1].startswith("[run]") and "accuracy" in lines[-1]
    _run(cache, method="kd", seed=3)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    run_experiment(RunConfig(**TINY, method="kd", seed=3), cache_dir=str(cache), progress=True)
    assert "[student" in capsys.readouterr().err


def test_same_numbers_in_a_fresh_process(cache) -> None:
    config = RunConfig(**TINY, method="entropy_match", seed=4)
    here = run_experiment(config, cache_dir=str(cache), progress=False)
    code = (
        "import json, sys; from kdbench.experiments import RunConfig, run_experiment;"
        "cfg = RunConfig.from_dict(json.loads(sys.argv[1]));"
        "print(json.dumps(run_experiment(cfg, cache_dir=sys.argv[2], progress=False)))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config.to_dict()), str(cache)],
                         capture_output=True, text=True, check=True)
    there = json.loads(out.stdout)
    assert {k for k in here if here[k] != there[k]} <= TIMING | {"teacher_cached"}


def test_disk_dataset_with_augmentation(tmp_path) -> None:
    from test_experiments_datasets import _write_mnist  # the tiny IDX files of the dataset tests

    _write_mnist(tmp_path, "FashionMNIST", n_train=80, n_test=30)
    recipe = {"steps": 6, "batch_size": 16, "augment": "crop_flip", "schedule": "multistep"}
    cfg = RunConfig(dataset="fashion_mnist", data_dir=str(tmp_path), teacher="cnn2d_4", student="mlp_8x1",
                    method="ensemble_kd", ensemble_size=2, teacher_recipe=recipe, student_recipe=recipe)
    record = run_experiment(cfg, cache_dir=str(tmp_path / "cache"), progress=False)
    _assert_complete(record, has_teacher=True, has_posterior=False)
    assert record["n_test"] == 30 and record["student_recipe.augment"] == "crop_flip"


@pytest.mark.slow
def test_published_mnist1d_cnn_recipe(tmp_path) -> None:
    # Greydanus (2020): the CNN with Adam 1e-2, batch 100, 6000 steps reaches 92-94% test accuracy.
    record = run_experiment(RunConfig(dataset="mnist1d", student="cnn1d", method="ce"), cache_dir=str(tmp_path),
                            progress=False)
    assert record["student/n_params"] == 5210 and record["student_recipe.steps"] == 6000
    assert record["student/accuracy"] >= 0.90
