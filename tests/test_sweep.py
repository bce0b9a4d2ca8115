"""Suites: parsing and validation, grid expansion, resume, corrupt records, tables, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench.sweep import SuiteError, load_suite, resolve_suite
from kdbench.sweep import runner as runner_mod
from kdbench.sweep.runner import run_suite
from kdbench.sweep.store import read_record, record_path
from kdbench.sweep.tables import write_tables

TINY = Path(__file__).parent / "data" / "tiny_suite.toml"
VOLATILE = {"train_seconds", "train_samples_per_second", "teacher_cached"}


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.split("/")[-1] not in VOLATILE}


def quiet(_line: str) -> None:
    pass


def _run(tmp_path: Path, **kw):
    return run_suite(load_suite(TINY), results_root=tmp_path / "res", cache_dir=tmp_path / "cache", say=quiet, **kw)


def _records(tmp_path: Path) -> dict[str, dict]:
    runs = sorted((tmp_path / "res" / "tiny" / "runs").glob("*.json"))
    return {p.name: stable(json.loads(p.read_text())["record"]) for p in runs}


def test_grid_expansion():
    suite = load_suite(TINY)
    assert suite.name == "tiny" and suite.datasets == ("gaussian",)
    assert suite.labels == ("ce", "kd_T2", "kd_ts")
    assert len(suite.runs) == 1 * 1 * 3 * 2
    kd = [r for r in suite.runs if r.label == "kd_T2"]
    assert {r.config.seed for r in kd} == {0, 1}
    assert all(r.config.temperature == 2.0 and r.config.method == "kd" for r in kd)
    assert all(r.config.dataset_size == 600 for r in suite.runs)  # [defaults]
    assert all(r.config.student_recipe.steps == 20 for r in suite.runs)  # per-dataset field


def test_self_distill_uses_the_students_architecture(tmp_path):
    text = TINY.read_text() + '\n[[method]]\nmethod = "self_distill"\n'
    path = tmp_path / "s.toml"
    path.write_text(text)
    runs = [r for r in load_suite(path).runs if r.label == "self_distill"]
    assert runs and all(r.config.teacher == "linear" and r.pair == "mlp_32x2->linear" for r in runs)


@pytest.mark.parametrize("name", ["quick", "paper", "cifar"])
def test_shipped_suites_validate(name):
    suite = load_suite(resolve_suite(name))
    assert suite.runs
    assert len({r.config.config_hash() for r in suite.runs}) == len(suite.runs)


def test_quick_suite_covers_the_promised_grid():
    suite = load_suite(resolve_suite("quick"))
    methods = [r.config.method for r in suite.runs]
    assert len(suite.datasets) >= 2
    assert len({r.pair for r in suite.runs}) >= 2
    assert {"ce", "kd", "kd_ts", "label_smoothing", "self_distill"} <= set(methods)
    assert len({r.config.temperature for r in suite.runs if r.config.method == "kd"}) >= 2
    assert len({r.config.seed for r in suite.runs}) >= 2


def test_paper_suite_has_every_method_and_five_seeds():
    from kdbench.experiments import METHODS

    suite = load_suite(resolve_suite("paper"))
    assert set(suite.datasets) == {"mnist1d", "digits", "gaussian"}
    assert {r.config.method for r in suite.runs} == set(METHODS)
    # Five seeds, so that a paired 95% interval (t with 4 degrees of freedom) can exclude 0.
    assert len({r.config.seed for r in suite.runs}) >= 5
    # The oracle teacher exists only where the posterior is known.
    assert {r.config.dataset for r in suite.runs if r.config.method == "oracle_kd"} == {"gaussian"}


def test_method_datasets_key_restricts_a_variant(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[dataset]]\nname = "digits"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "ce"\n[[method]]\nmethod = "kd"\ndatasets = ["digits"]\n'
    )
    suite = load_suite(path)
    by = {(r.label, r.config.dataset) for r in suite.runs}
    assert by == {("ce", "gaussian"), ("ce", "digits"), ("kd", "digits")}


BAD_SUITES = {
    "unknown_top_level_key": ("[suite]\nseeds = [0]\n[extra]\nx = 1\n", r":3: extra: unknown key"),
    "unknown_method_key": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\ntemprature = 2.0\n',
        r":6: temprature: unknown key",
    ),
    "bad_value_names_line": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\n[[method]]\nmethod = "kd"\nlabel = "hot"\ntemperature = -1.0\n',
        r":9: temperature: expected a finite value > 0",
    ),
    "unknown_dataset": (
        '[[dataset]]\nname = "imagenet"\npairs = [{teacher = "mlp", student = "linear"}]\n[[method]]\nmethod = "ce"\n',
        r":2: dataset: expected one of",
    ),
    "unknown_model": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "vit"}]\n[[method]]\nmethod = "ce"\n',
        r": student: unknown model",
    ),
    "duplicate_label": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\n[[method]]\nmethod = "kd"\ntemperature = 2.0\n',
        r":6: label: 'kd' is used by an earlier",
    ),
    "same_experiment_twice": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\n[[method]]\nmethod = "kd"\nlabel = "again"\n',
        r"label: 'again' runs the same experiment as 'kd'",
    ),
    "missing_pairs": ('[[dataset]]\nname = "gaussian"\n[[method]]\nmethod = "ce"\n', r":1: pairs: expected a non-empty"),
    "bad_seeds": ("[suite]\nseeds = [0, 0]\n", r":2: seeds: expected a non-empty list of distinct"),
    "grid_field_in_defaults": ('[defaults]\nseed = 3\n', r":2: seed: unknown key"),
    "invalid_toml": ("[suite\n", r"invalid TOML"),
    "method_datasets_unknown": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\ndatasets = ["digits"]\n',
        r":6: datasets: 'digits' is not a \[\[dataset\]\] of this suite",
    ),
    "method_datasets_not_a_list": (
        '[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n'
        '[[method]]\nmethod = "kd"\ndatasets = "gaussian"\n',
        r":6: datasets: expected a non-empty list of dataset names",
    ),
    "no_methods": ('[[dataset]]\nname = "gaussian"\npairs = [{teacher = "mlp", student = "linear"}]\n', r"method: expected at least one"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suite_names_file_line_and_key(case, tmp_path):
    text, pattern = BAD_SUITES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=pattern) as info:
        load_suite(path)
    assert str(info.value).startswith(str(path))


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(SuiteError, match="quick"):
        resolve_suite("no_such_suite")


def test_resume_after_interrupt_recomputes_nothing(tmp_path, monkeypatch):
    calls = []
    real = runner_mod.run_experiment

    def counting(config, **kw):
        calls.append(config.config_hash())
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third run
        return real(config, **kw)

    monkeypatch.setattr(runner_mod, "run_experiment", counting)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    assert len(_records(tmp_path)) == 2
    partial = _records(tmp_path)

    calls.clear()
    monkeypatch.setattr(runner_mod, "run_experiment", lambda config, **kw: calls.append(1) or real(config, **kw))
    summary = _run(tmp_path)
    assert summary.skipped == 2 and summary.ran == 4 and len(calls) == 4
    resumed = _records(tmp_path)
    assert all(resumed[k] == v for k, v in partial.items())

    calls.clear()
    again = _run(tmp_path)
    assert again.ran == 0 and calls == []

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(runner_mod, "run_experiment", real)
    _run(fresh)
    assert _records(fresh) == resumed  # interrupted + resumed == one clean sweep


def test_corrupt_record_is_reported_and_recomputed_alone(tmp_path):
    _run(tmp_path)
    suite = load_suite(TINY)
    runs_dir = tmp_path / "res" / "tiny" / "runs"
    victim = record_path(runs_dir, suite.runs[1])
    victim.write_text(victim.read_text()[:50])  # a partial write
    lines: list[str] = []
    summary = run_suite(suite, results_root=tmp_path / "res", cache_dir=tmp_path / "cache", say=lines.append)
    assert summary.ran == 1 and summary.recomputed == [str(victim)]
    assert any(str(victim) in line and "unreadable" in line for line in lines)
    assert read_record(runs_dir, suite.runs[1]).record is not None


def test_record_of_another_configuration_is_never_trusted(tmp_path):
    _run(tmp_path)
    suite = load_suite(TINY)
    runs_dir = tmp_path / "res" / "tiny" / "runs"
    a, b = record_path(runs_dir, suite.runs[0]), record_path(runs_dir, suite.runs[2])
    shutil.copy(b, a)  # a record of kd_T2 sitting where ce's belongs
    lookup = read_record(runs_dir, suite.runs[0])
    assert lookup.record is None and "differs" in lookup.problem
    summary = _run(tmp_path)
    assert summary.ran == 1


def test_force_recomputes_everything(tmp_path):
    _run(tmp_path)
    assert _run(tmp_path, force=True).ran == 6


def test_tables_from_stored_records(tmp_path):
    _run(tmp_path)
    suite = load_suite(TINY)
    info = write_tables(suite, tmp_path / "res")
    assert info["records"] == 6 and info["missing"] == 0
    out = tmp_path / "res" / "tiny"
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:7]) == ["dataset", "pair", "teacher", "student", "method", "seed", "role"]
    assert {"accuracy", "nll", "brier", "ece", "ece_ts", "adaptive_ece", "aurc", "agreement"} <= set(df.columns)
    assert (df["role"] == "teacher").sum() == 2  # one shared teacher per seed, not one per run
    assert (df["role"] == "student").sum() == 6
    assert set(df[df.role == "student"]["method"]) == {"ce", "kd_T2", "kd_ts"}
    table = (out / "table.md").read_text()
    assert "## gaussian" in table and "kd_T2" in table and "±" in table
    for fig in info["figures"]:
        assert Path(fig).stat().st_size > 1000
    assert any("reliability_gaussian" in f for f in info["figures"])
    assert any("ece_vs_accuracy_gaussian" in f for f in info["figures"])


def test_tables_report_missing_runs(tmp_path):
    _run(tmp_path)
    suite = load_suite(TINY)
    record_path(tmp_path / "res" / "tiny" / "runs", suite.runs[0]).unlink()
    info = write_tables(suite, tmp_path / "res")
    assert info["missing"] == 1
    assert "1 of 6 runs have no record" in (tmp_path / "res" / "tiny" / "table.md").read_text()


def test_cli_run_then_table(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "kdbench"]
    out = subprocess.run(base + ["run", str(TINY), "--results-dir", str(tmp_path / "r")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ETA" in out.stderr
    (tmp_path / "r" / "tiny" / "table.md").unlink()
    out = subprocess.run(base + ["table", str(TINY), "--results-dir", str(tmp_path / "r")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "tiny" / "table.md").exists()
    bad = subprocess.run(base + ["run", "no_such_suite"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown suite" in bad.stderr


def test_torchrun_two_processes_write_the_same_records(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    _run(single)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "kdbench", "run", str(TINY), "--results-dir", str(tmp_path / "dist" / "res"),
        "--cache-dir", str(tmp_path / "dist" / "cache"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[rank 1]" in out.stderr and "[rank 0]" in out.stderr
    assert _records(tmp_path / "dist") == _records(single)
    assert (tmp_path / "dist" / "res" / "tiny" / "table.md").exists()
