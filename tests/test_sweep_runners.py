"""Runners sharing a results folder, the comparison with a reference, file modes, and the CLI's errors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from kdbench._io import atomic_write_text
from kdbench.sweep import load_suite
from kdbench.sweep.claims import Claims
from kdbench.sweep.compare import compare_sweeps
from kdbench.sweep.runner import DeviceError, check_device, run_suite
from kdbench.sweep.store import record_path
from kdbench.sweep.tables import NoRecordsError, write_tables

TINY = Path(__file__).parent / "data" / "tiny_suite.toml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def quiet(_line: str) -> None:
    pass


def _sweep(root: Path, **kw):
    return run_suite(load_suite(TINY), results_root=root / "res", cache_dir=root / "cache", say=quiet, **kw)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One finished sweep of the tiny suite, with its tables (read-only for the tests)."""
    root = tmp_path_factory.mktemp("swept")
    _sweep(root)
    write_tables(load_suite(TINY), root / "res")
    return root


# --- claims -----------------------------------------------------------------------------------


def test_claim_is_exclusive_and_released(tmp_path):
    claims = Claims(tmp_path)
    first = claims.acquire("run-a")
    assert first is not None
    assert claims.acquire("run-a") is None  # a second holder, even in the same process
    assert claims.acquire("run-b") is not None
    first.release()
    assert not (tmp_path / ".claims" / "run-a.lock").exists()
    again = claims.acquire("run-a")
    assert again is not None
    again.release()


def test_claim_of_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from kdbench.sweep.claims import Claims
            claim = Claims({str(tmp_path)!r}).acquire("run-a")
            print("held" if claim else "refused", flush=True)
            time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Claims(tmp_path).acquire("run-a") is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        claim = Claims(tmp_path).acquire("run-a")
        assert claim is not None  # the lock went with its process: no timeout, no manual cleanup
        claim.release()
    finally:
        holder.kill()


def test_run_held_by_another_runner_is_waited_for_then_computed(tmp_path):
    suite = load_suite(TINY)
    name = record_path(tmp_path / "res" / "tiny" / "runs", suite.runs[0]).name
    claim = Claims(tmp_path / "res" / "tiny" / "runs").acquire(name)
    assert claim is not None
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if "waiting for" in line:  # the other runner gives up the run unrecorded (it crashed)
            threading.Timer(0.2, claim.release).start()

    summary = run_suite(suite, results_root=tmp_path / "res", cache_dir=tmp_path / "cache", say=say,
                        poll_seconds=0.05)
    assert summary.ran == 6 and summary.by_others == 0  # ... and this runner took it over
    assert sum("waiting for 1 run(s)" in line for line in lines) == 1


def test_run_recorded_by_another_runner_is_not_computed_again(tmp_path, swept):
    suite = load_suite(TINY)
    runs_dir = tmp_path / "res" / "tiny" / "runs"
    src = record_path(swept / "res" / "tiny" / "runs", suite.runs[0])
    dst = record_path(runs_dir, suite.runs[0])
    claim = Claims(runs_dir).acquire(dst.name)
    assert claim is not None

    def finish() -> None:  # the other runner writes its record, then lets go
        atomic_write_text(dst, src.read_text())
        claim.release()

    def say(line: str) -> None:
        if "waiting for" in line:
            threading.Timer(0.2, finish).start()

    summary = run_suite(suite, results_root=tmp_path / "res", cache_dir=tmp_path / "cache", say=say,
                        poll_seconds=0.05)
    assert summary.ran == 5 and summary.by_others == 1
    assert json.loads(dst.read_text()) == json.loads(src.read_text())


SLOW_RUNNER = textwrap.dedent("""
    import sys, time
    import kdbench.sweep.runner as runner
    real = runner.run_experiment

    def slow(config, **kw):  # long enough that both runners are at work together
        time.sleep(0.7)
        return real(config, **kw)

    runner.run_experiment = slow
    from kdbench.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_two_runners_on_one_folder_share_the_work(tmp_path, swept):
    args = ["run", str(TINY), "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"),
            "--reference", str(swept / "res")]
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_RUNNER, *args], stderr=subprocess.PIPE, text=True,
                              env=ENV, cwd=tmp_path) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    ran = [int(line.split()[1]) for err in errs for line in err.splitlines() if " runs in " in line]
    assert sum(ran) == 6  # every run computed once, by one of the two
    trained = sum(err.count("trained in") for err in errs)
    assert trained == 2  # the tiny suite's two teachers (seeds 0 and 1), each trained once
    wrote = sum("tables from 6 records" in err for err in errs)
    current = sum("already those of these 6 records" in err for err in errs)
    assert (wrote, current) == (1, 1)  # tables written once
    assert all("reproduced 6/6 runs" in err for err in errs)  # consistent with a one-runner sweep
    assert not list((tmp_path / "res").rglob("*.tmp"))


# --- comparison with a reference ----------------------------------------------------------------


def test_comparison_of_identical_sweeps(tmp_path, swept):
    suite = load_suite(TINY)
    _sweep(tmp_path)
    write_tables(suite, tmp_path / "res")
    cmp = compare_sweeps(suite, tmp_path / "res", swept / "res")
    assert (cmp.runs, cmp.compared, cmp.identical) == (6, 6, 6)
    assert cmp.largest == {"accuracy": 0.0, "ece": 0.0, "nll": 0.0} and cmp.table_identical
    assert cmp.summary().startswith("reproduced 6/6 runs of")


def test_comparison_reports_the_largest_difference(tmp_path, swept):
    suite = load_suite(TINY)
    ref = tmp_path / "ref"
    (ref / "tiny" / "runs").mkdir(parents=True)
    for p in (swept / "res" / "tiny" / "runs").glob("*.json"):
        (ref / "tiny" / "runs" / p.name).write_text(p.read_text())
    victim = record_path(ref / "tiny" / "runs", suite.runs[2])
    payload = json.loads(victim.read_text())
    payload["record"]["student/ece"] += 0.0125
    victim.write_text(json.dumps(payload))
    record_path(ref / "tiny" / "runs", suite.runs[3]).unlink()
    cmp = compare_sweeps(suite, swept / "res", ref)
    assert (cmp.runs, cmp.compared, cmp.identical) == (6, 5, 4)
    assert cmp.largest["ece"] == pytest.approx(0.0125) and cmp.largest["accuracy"] == 0.0
    assert cmp.largest_any[0] == "student/ece"
    assert cmp.table_identical is None  # the reference has no table.md
    assert "1 runs have no reference record" in cmp.summary()


# --- file modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_everything_written_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _sweep(tmp_path)
        write_tables(load_suite(TINY), tmp_path / "res")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".csv", ".md", ".png", ".pt"} <= kinds, kinds
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert not [p for p in files if p.suffix in (".lock", ".tmp")]  # claims and temporaries are gone


# --- tables -----------------------------------------------------------------------------------------


def test_tables_of_a_suite_never_run_write_nothing(tmp_path):
    with pytest.raises(NoRecordsError, match="no records of suite 'tiny'"):
        write_tables(load_suite(TINY), tmp_path / "res")
    assert not (tmp_path / "res").exists()


def test_tables_are_not_rewritten_from_the_same_records(tmp_path, swept):
    res = tmp_path / "res"
    (res / "tiny" / "runs").mkdir(parents=True)
    for p in (swept / "res" / "tiny" / "runs").glob("*.json"):
        (res / "tiny" / "runs" / p.name).write_text(p.read_text())
    suite = load_suite(TINY)
    first = write_tables(suite, res, figures=False, skip_if_current=True)
    assert not first["current"]
    table = res / "tiny" / "table.md"
    before = table.stat().st_mtime_ns
    assert write_tables(suite, res, figures=False, skip_if_current=True)["current"]
    assert table.stat().st_mtime_ns == before
    assert not write_tables(suite, res, figures=False)["current"]  # `kdbench table` always writes


# --- the CLI's errors -------------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("device", ["tpu", "bogus", "cuda:x"])
def test_unknown_device_is_one_line_and_exit_2(tmp_path, device):
    out = _cli(["run", str(TINY), "--device", device], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--device" in out.stderr and repr(device) in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build or machine without CUDA")
def test_unavailable_cuda_is_one_line_and_exit_2(tmp_path):
    out = _cli(["run", str(TINY), "--device", "cuda"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "'cuda' is not available" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_device_accepts_what_is_there():
    assert check_device("auto") == "auto" and check_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda:0") == "cuda:0"
        with pytest.raises(DeviceError, match="does not exist"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_table_of_a_suite_never_run_exits_1_and_writes_nothing(tmp_path):
    out = _cli(["table", "cifar"], tmp_path)
    assert out.returncode == 1
    assert "no records of suite 'cifar'" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_of_a_suite_whose_data_is_missing_exits_2_before_starting(tmp_path):
    out = _cli(["run", "cifar"], tmp_path)
    assert out.returncode == 2
    assert "data_dir" in out.stderr and "missing" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_writes_to_its_own_folder_and_compares_with_the_reference(tmp_path, swept):
    out = _cli(["run", str(TINY), "--cache-dir", str(tmp_path / "cache"), "--reference", str(swept / "res")],
               tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "kdbench-out" / "tiny" / "table.md").is_file()  # the default output folder
    assert f"{Path('kdbench-out') / 'tiny' / 'table.md'}" in out.stderr
    assert "reproduced 6/6 runs of" in out.stderr and "table.md identical" in out.stderr
