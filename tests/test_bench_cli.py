"""``kdbench bench`` on CPU at tiny shapes (``--quick``), writing into a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kdbench.__main__ import main as kdbench_main
from kdbench.bench import cli

QUICK_KD = "kd_loss"
QUICK_CAL = "calibration_stats"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = kdbench_main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--name", "quick"])
    return code, out


def test_quick_run_writes_json_and_markdown(quick_report):
    code, out = quick_report
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["quick.json", "quick.md"]
    data = json.loads((out / "quick.json").read_text())
    assert "tuning" not in data  # the pipelining sweep times the Triton kernels: CUDA only
    assert data["device"] == "cpu" and data["quick"] is True
    assert data["copy_bandwidth"]["GB/s"] > 0
    assert data["machine"]["torch"] == torch.__version__
    assert data["targets"] == []  # quick shapes are not the targets' shapes
    assert [c["case"]["op"] for c in data["cases"]] == [QUICK_KD, QUICK_CAL]


def test_quick_run_times_every_available_provider(quick_report):
    _, out = quick_report
    data = json.loads((out / "quick.json").read_text())
    kd, cal = data["cases"]
    for name in ("kdbench-torch", "eager", "compile"):
        r = kd["results"][name]
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] and len(r["times_s"]) == r["repeats"]
        assert r["GB/s"] > 0 and r["pct_copy_bw"] > 0
        assert r["errors"]["grad_rel_to_max"] < 1e-4
    assert kd["results"]["kdbench-triton"]["status"] == "skipped"
    assert "CUDA" in kd["results"]["kdbench-triton"]["reason"]
    assert set(kd["speedups"]["kdbench-torch"]) == {"eager", "compile"}
    ratio = kd["results"]["eager"]["median_s"] / kd["results"]["kdbench-torch"]["median_s"]
    assert kd["speedups"]["kdbench-torch"]["eager"] == pytest.approx(ratio)
    assert cal["results"]["kdbench-torch"]["status"] == "ok"


def test_markdown_has_a_table_per_case(quick_report):
    _, out = quick_report
    md = (out / "quick.md").read_text()
    assert md.startswith("# kdbench bench: cpu")
    assert "Copy bandwidth measured in this run" in md
    assert md.count("| provider | median ms |") == 2
    assert "| kdbench-triton | skipped: needs a CUDA GPU" in md
    assert "Quick run" in md


def test_check_needs_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --check would run")
    assert kdbench_main(["bench", "--check", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "tpu"], "device"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_an_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cli.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_failed_provider_gives_exit_status_1_after_writing(tmp_path, monkeypatch):
    from kdbench.bench import providers

    real = providers.calibration_fn
    monkeypatch.setattr(providers, "calibration_fn", lambda n, c: (lambda z, y: real(n, c)(z, y) + 1.0))
    code = cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "bad"])
    assert code == 1
    data = json.loads((tmp_path / "bad.json").read_text())
    assert data["cases"][0]["results"]["torchmetrics"]["status"] == "wrong"


def test_check_steps_fit_eight_minutes(tmp_path):
    from kdbench.bench import check

    assert sum(check.STEP_LIMITS.values()) <= 480  # under 8 minutes with start-up
    steps = check._steps(tmp_path, quick=False)
    assert [name for name, _, _ in steps] == ["bench", "cuda-tests", "pytest-benchmarks"]
    bench_cmd = steps[0][1]
    assert bench_cmd[1:4] == ["-m", "kdbench", "bench"] and "--check" not in bench_cmd
    tests_cmd, benchmarks_cmd = steps[1][1], steps[2][1]
    assert tests_cmd is not None and "tests/test_calibration_kernel.py" in tests_cmd
    assert benchmarks_cmd is not None and "--benchmark-only" in benchmarks_cmd
    assert f"--benchmark-json={tmp_path / 'pytest-benchmark.json'}" in benchmarks_cmd
    for name in check.CUDA_TESTS:  # every test path the check names exists
        path = name.split("::")[0]
        assert (check._repo_root() / path).exists(), path


def test_device_slug():
    assert cli.device_slug("cpu") == "cpu"


def test_help_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "kdbench", "--help"], capture_output=True, text=True, timeout=60)
    assert "bench" in out.stdout


def test_tuning_sweep_is_added_to_the_written_report(tmp_path, monkeypatch):
    """Where the Triton provider runs (CUDA; here the interpreter, let through), the sweep follows."""
    from kdbench.bench import providers, tuning

    real = providers.skip_reason
    monkeypatch.setattr(providers, "skip_reason", lambda n, c: None if n == tuning.PROVIDER else real(n, c))
    real_check = providers.Runner.check

    def check(self, oracle):
        if self.name == tuning.PROVIDER and tuning.knob_module(self.case).STREAM_STAGES == 3:
            raise AssertionError("planted")
        return real_check(self, oracle)

    monkeypatch.setattr(providers.Runner, "check", check)
    code = cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "t"])
    assert code == 1  # a depth that fails its check fails the run, after writing
    data = json.loads((tmp_path / "t.json").read_text())
    (sweep,) = data["tuning"]
    assert sweep["title"] == data["cases"][0]["title"]
    assert {d: r["status"] for d, r in sweep["depths"].items()} == {"1": "ok", "2": "ok", "3": "wrong", "4": "ok"}
    assert "## Pipelining depth (STREAM_STAGES): kdbench-triton, calibration_stats" in (tmp_path / "t.md").read_text()
    monkeypatch.setattr(providers.Runner, "check", real_check)
    assert cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--no-tuning", "--out", str(tmp_path),
                     "--name", "u"]) == 0  # fmt: skip
    assert "tuning" not in json.loads((tmp_path / "u.json").read_text())
