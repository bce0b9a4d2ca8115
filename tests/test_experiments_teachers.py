"""Teacher cache: trained once, loaded afterwards (not retrained), keyed by configuration, written atomically."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from kdbench.experiments import RunConfig
from kdbench.experiments import teachers as teachers_mod
from kdbench.experiments.datasets import load_dataset
from kdbench.experiments.teachers import ENSEMBLE_SEED_STRIDE, get_teacher, teacher_configs

TINY = dict(dataset="gaussian", dataset_size=400, student="linear", teacher="mlp_8x1",
            teacher_recipe={"steps": 20, "batch_size": 32}, student_recipe={"steps": 5})


@pytest.fixture(scope="module")
def data():
    return load_dataset("gaussian", dataset_size=400)


@pytest.fixture
def counting(monkeypatch):
    """Counts calls of the function that trains a teacher."""
    calls = []
    real = teachers_mod.train_teacher

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(teachers_mod, "train_teacher", counted)
    return calls


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_second_request_loads_and_does_not_retrain(tmp_path, data, counting) -> None:
    (tc,) = teacher_configs(RunConfig(**TINY))
    first = get_teacher(tc, data, cache_dir=tmp_path)
    assert not first.cached and len(counting) == 1
    path = tmp_path / tc.filename()
    mtime = os.stat(path).st_mtime_ns
    second = get_teacher(tc, data, cache_dir=tmp_path)
    assert second.cached and len(counting) == 1
    assert os.stat(path).st_mtime_ns == mtime
    a, b = _state(first.model), _state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.train_seconds == first.train_seconds and not second.model.training
    assert [p.name for p in tmp_path.iterdir()] == [tc.filename()]  # no temporary file left behind


def test_methods_share_a_teacher_unless_its_training_differs() -> None:
    kd = teacher_configs(RunConfig(**TINY, method="kd"))
    assert teacher_configs(RunConfig(**TINY, method="kd_ts")) == kd
    assert teacher_configs(RunConfig(**TINY, method="logit_mse", temperature=9.0)) == kd
    assert teacher_configs(RunConfig(**{**TINY, "student": "mlp"}, method="kd")) == kd  # any student
    ls = teacher_configs(RunConfig(**TINY, method="kd_ls_teacher", smoothing=0.2))
    assert ls[0].smoothing == 0.2 and ls[0].config_hash() != kd[0].config_hash()
    assert teacher_configs(RunConfig(**TINY, seed=1))[0].config_hash() != kd[0].config_hash()
    assert teacher_configs(RunConfig(**{**TINY, "teacher": None}, method="ce")) == []


def test_ensemble_members_have_strided_seeds() -> None:
    members = teacher_configs(RunConfig(**TINY, method="ensemble_kd", ensemble_size=3, seed=2))
    assert [m.seed for m in members] == [2, 2 + ENSEMBLE_SEED_STRIDE, 2 + 2 * ENSEMBLE_SEED_STRIDE]
    # The first member is the single teacher of the same seed: kd and ensemble_kd share it.
    assert members[0] == teacher_configs(RunConfig(**TINY, method="kd", seed=2))[0]


def test_other_config_other_file(tmp_path, data, counting) -> None:
    (tc,) = teacher_configs(RunConfig(**TINY))
    get_teacher(tc, data, cache_dir=tmp_path)
    get_teacher(dataclasses.replace(tc, seed=5), data, cache_dir=tmp_path)
    assert len(counting) == 2 and len(list(tmp_path.iterdir())) == 2


def test_unreadable_checkpoint_is_retrained(tmp_path, data, counting) -> None:
    (tc,) = teacher_configs(RunConfig(**TINY))
    (tmp_path / tc.filename()).write_bytes(b"not a checkpoint")
    teacher = get_teacher(tc, data, cache_dir=tmp_path)
    assert not teacher.cached and len(counting) == 1
    assert get_teacher(tc, data, cache_dir=tmp_path).cached


def test_checkpoint_of_another_config_is_not_trusted(tmp_path, data, counting) -> None:
    (tc,) = teacher_configs(RunConfig(**TINY))
    other = dataclasses.replace(tc, seed=9)
    get_teacher(other, data, cache_dir=tmp_path)
    os.replace(tmp_path / other.filename(), tmp_path / tc.filename())  # a stale file under tc's name
    assert not get_teacher(tc, data, cache_dir=tmp_path).cached and len(counting) == 2


def test_interrupted_write_leaves_the_old_file(tmp_path) -> None:
    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    target = tmp_path / "t.pt"
    teachers_mod.atomic_write(target, lambda f: f.write(b"old"))
    with pytest.raises(KeyboardInterrupt):
        teachers_mod.atomic_write(target, crash)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path))
    assert teachers_mod.default_cache_dir() == tmp_path / "teachers"
    monkeypatch.delenv("KDBENCH_CACHE_DIR")
    assert teachers_mod.default_cache_dir().parts[-3:] == (".cache", "kdbench", "teachers")
