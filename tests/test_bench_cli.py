"""``kdbench bench`` on CPU at tiny shapes (``--quick``), writing into a temporary folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "tuning" not in data  # the tile-configuration sweep times the Triton kernels: CUDA only
    assert not any(c["extra"] for c in data["cases"])  # the extra shapes are CUDA's
    assert data["compile"] == {"mode": "default", "dynamic": False}
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
    assert cal["results"]["compile"]["status"] == "ok"  # torch.compile of the plain statistics
    assert set(cal["results"]["compile"]["errors"]) == {"ece", "nll", "brier", "accuracy"}
    assert all(r["first_call_s"] > 0 for c in (kd, cal) for r in c["results"].values() if r["status"] == "ok")


def test_markdown_has_a_table_per_case(quick_report):
    _, out = quick_report
    md = (out / "quick.md").read_text()
    assert md.startswith("# kdbench bench: cpu")
    assert "Copy bandwidth measured in this run" in md
    assert md.count("| provider | median ms |") == 2
    assert "| kdbench-triton | skipped: needs a CUDA GPU" in md
    assert "Quick run" in md
    assert 'torch.compile` in mode "default" with dynamic=False' in md
    assert "## Extra shapes" not in md and "before (median ms)" not in md


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


def _off(real, wrong: set[str]):
    """calibration_fn whose providers in ``wrong`` return an NLL twice too large (torchmetrics: ECE + 1)."""
    import dataclasses

    def fn(name, case):
        f = real(name, case)
        if name not in wrong:
            return f
        if name == "torchmetrics":
            return lambda z, y: f(z, y) + 1.0
        return lambda z, y: dataclasses.replace(stats := f(z, y), nll_sum=stats.nll_sum * 2)

    return fn


def test_wrong_kdbench_provider_gives_exit_status_1_after_writing(tmp_path, monkeypatch):
    from kdbench.bench import providers

    monkeypatch.setattr(providers, "calibration_fn", _off(providers.calibration_fn, {"kdbench-torch"}))
    code = cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "bad"])
    assert code == 1
    data = json.loads((tmp_path / "bad.json").read_text())
    r = data["cases"][0]["results"]["kdbench-torch"]
    assert r["status"] == "wrong" and "median_s" not in r and "nll" in r["reason"]  # not timed
    assert "| kdbench-torch | wrong: kdbench-torch on calibration_stats" in (tmp_path / "bad.md").read_text()


def test_other_provider_over_tolerance_is_timed_flagged_and_does_not_fail(tmp_path, monkeypatch, capsys):
    from kdbench.bench import providers

    monkeypatch.setattr(providers, "calibration_fn", _off(providers.calibration_fn, {"torchmetrics"}))
    code = cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "flag"])
    assert code == 0
    data = json.loads((tmp_path / "flag.json").read_text())
    r = data["cases"][0]["results"]["torchmetrics"]
    assert r["status"] == "ok" and r["median_s"] > 0 and len(r["times_s"]) == 3
    assert r["over_tolerance"]["ece"]["bound"] == providers.ECE_ATOL["torchmetrics"]
    assert r["over_tolerance"]["ece"]["error"] == pytest.approx(1.0, abs=0.1)
    row = next(line for line in (tmp_path / "flag.md").read_text().splitlines() if line.startswith("| torchmetrics |"))
    assert "**over tolerance: ece " in row and "(limit 5.0e-03)**" in row
    assert "timed although over tolerance" in capsys.readouterr().out
    assert data["cases"][0]["speedups"]["kdbench-torch"]["torchmetrics"] > 0  # compared like any timed provider


def test_check_steps_fit_six_minutes(tmp_path):
    from kdbench.bench import check

    assert check.STEP_LIMITS == {"bench": 170, "cuda-tests": 90}
    assert sum(check.STEP_LIMITS.values()) + 60 <= 360 - 30  # with ~60 s of start-up, and slack, in 6 minutes
    steps = check._steps(tmp_path, quick=False)
    assert [name for name, _, _ in steps] == ["bench", "cuda-tests"]  # no pytest-benchmark step
    bench_cmd = steps[0][1]
    assert bench_cmd[1:4] == ["-m", "kdbench", "bench"] and "--check" not in bench_cmd and "--baseline" not in bench_cmd
    deadline = float(bench_cmd[bench_cmd.index("--tuning-deadline") + 1])
    assert deadline == check.TUNING_DEADLINE_S and 0 < deadline <= check.STEP_LIMITS["bench"] - 20
    tests_cmd = steps[1][1]
    assert tests_cmd is not None and "tests/test_calibration_kernel.py" in tests_cmd and "not slow" in tests_cmd
    assert not any("benchmark-only" in arg for _, cmd, _ in steps for arg in cmd or [])
    for name in check.CUDA_TESTS:  # every test path the check names exists
        path = name.split("::")[0]
        assert (check._repo_root() / path).exists(), path
    with_baseline = check._steps(tmp_path, quick=True, baseline=tmp_path / "h200-before.json")[0][1]
    assert with_baseline[-2:] == ["--baseline", str(tmp_path / "h200-before.json")] and "--quick" in with_baseline


def test_check_passes_this_gpus_committed_baseline(tmp_path, monkeypatch):
    from kdbench.bench import check

    monkeypatch.setattr(cli, "device_slug", lambda device: "h200")
    assert check.baseline_file(check._repo_root()) == check._repo_root() / "results/bench/h200-before.json"
    monkeypatch.setattr(cli, "device_slug", lambda device: "b200")
    assert check.baseline_file(check._repo_root()) is None


def test_device_slug():
    assert cli.device_slug("cpu") == "cpu"


def test_help_lists_the_command():
    out = subprocess.run([sys.executable, "-m", "kdbench", "--help"], capture_output=True, text=True, timeout=60)
    assert "bench" in out.stdout


def test_tuning_sweep_is_added_to_the_written_report(tmp_path, monkeypatch):
    """Where the Triton provider runs (CUDA; here let through, against a fake kernel module), the sweep follows."""
    import types

    from kdbench.bench import providers, tuning

    fake = types.ModuleType("fake_calibration_kernel")
    fake.TILE_CONFIGS = ((4096, 16, 1), (2048, 8, 2))
    fake.TILE_CONFIG = (4096, 16, 1)
    real_skip, real_cal = providers.skip_reason, providers.calibration_fn
    monkeypatch.setattr(tuning, "knob_module", lambda case: fake)
    monkeypatch.setattr(providers, "skip_reason", lambda n, c: None if n == tuning.PROVIDER else real_skip(n, c))
    # kdbench-triton computed by the torch backend: this test is about the sweep, not the kernel.
    monkeypatch.setattr(providers, "calibration_fn", lambda n, c: real_cal(n.replace("triton", "torch"), c))
    real_check = providers.Runner.check

    def check(self, oracle):
        if self.name == tuning.PROVIDER and fake.TILE_CONFIG == (2048, 8, 2):
            raise AssertionError("planted")
        return real_check(self, oracle)

    monkeypatch.setattr(providers.Runner, "check", check)
    code = cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "t"])
    assert code == 1  # a configuration that fails its check fails the run, after writing
    data = json.loads((tmp_path / "t.json").read_text())
    (sweep,) = data["tuning"]
    assert sweep["title"] == data["cases"][0]["title"] and sweep["default"] == [4096, 16, 1]
    assert [(r["config"], r["status"]) for r in sweep["configs"]] == [([4096, 16, 1], "ok"), ([2048, 8, 2], "wrong")]
    md = (tmp_path / "t.md").read_text()
    assert "## Tile configuration (TILE_CONFIG): kdbench-triton, calibration_stats" in md
    assert "| 2048 | 8 | 2 | wrong: planted |" in md
    monkeypatch.setattr(providers.Runner, "check", real_check)
    assert cli.main(["--quick", "--only", QUICK_CAL, "--no-memory", "--no-tuning", "--out", str(tmp_path),
                     "--name", "u"]) == 0  # fmt: skip
    assert "tuning" not in json.loads((tmp_path / "u.json").read_text())


def test_extra_shapes_run_with_fewer_rounds_and_without_the_slow_providers(tmp_path, monkeypatch):
    from kdbench.bench import cases

    tiny = [cases.kd_case(4, 500, "float32", "cpu", "forward+backward"), cases.calibration_case(8, 300, "float32", "cpu")]
    monkeypatch.setattr(cli, "extra_cases", lambda device, quick=False: tiny)
    code = cli.main(["--quick", "--repeats", "12", "--no-memory", "--out", str(tmp_path), "--name", "x"])
    assert code == 0
    data = json.loads((tmp_path / "x.json").read_text())
    assert [c["extra"] for c in data["cases"]] == [False, False, True, True]
    for c in data["cases"]:
        rounds = {n: r["repeats"] for n, r in c["results"].items() if r["status"] == "ok"}
        assert set(rounds.values()) == ({cli.EXTRA_REPEATS} if c["extra"] else {12}), rounds
    extra_kd, extra_cal = data["cases"][2:]
    assert extra_kd["results"]["kdbench-torch"]["status"] == "skipped"
    assert "extra shapes" in extra_kd["results"]["kdbench-torch"]["reason"]
    assert extra_kd["results"]["eager"]["status"] == "ok" and extra_kd["results"]["compile"]["status"] == "ok"
    assert extra_cal["results"]["compile"]["status"] == "ok"
    md = (tmp_path / "x.md").read_text()
    assert "## Extra shapes" in md and f"### {tiny[0].title}" in md and f"### {tiny[1].title}" in md
    assert md.index("## Extra shapes") > md.index(f"## {data['cases'][1]['title']}")
    assert cli.main(["--quick", "--no-extra-shapes", "--no-memory", "--out", str(tmp_path), "--name", "y"]) == 0
    assert not any(c["extra"] for c in json.loads((tmp_path / "y.json").read_text())["cases"])


def test_baseline_option(tmp_path, capsys):
    from kdbench.bench import cases

    key = cases.headline_cases("cpu", quick=True)[1].key
    path = tmp_path / "before.json"
    path.write_text(json.dumps({"source": "a test run", key: {"kdbench-torch": 1000.0}}))
    argv = ["--quick", "--only", QUICK_CAL, "--no-memory", "--out", str(tmp_path), "--name", "b"]
    assert cli.main([*argv, "--baseline", str(path)]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["baseline"]["medians_ms"] == {key: {"kdbench-torch": 1000.0}}
    md = (tmp_path / "b.md").read_text()
    assert "a test run" in md and "| before (median ms) | speed-up vs before |" in md
    row = next(line for line in md.splitlines() if line.startswith("| kdbench-torch |"))
    now_ms = data["cases"][0]["results"]["kdbench-torch"]["median_s"] * 1e3
    assert f"| 1000.000 | {1000.0 / now_ms:.2f}x |" in row
    capsys.readouterr()
    assert cli.main([*argv, "--baseline", str(tmp_path / "missing.json")]) == 2
    assert "--baseline: cannot read" in capsys.readouterr().err


# ---- the commit recorded ---------------------------------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> str:
    cfg = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *cfg, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _repo(root: Path, project: str) -> Path:
    """A git repository at ``root`` whose pyproject names ``project``, with a kdbench/ folder, committed."""
    (root / "kdbench").mkdir(parents=True)
    (root / "kdbench" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(f'[build-system]\nrequires = []\n\n[project]\nname = "{project}"\n')
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


@needs_git
def test_commit_of_the_kdbench_project_and_dirty(tmp_path):
    root = _repo(tmp_path / "kdbench-checkout", "kdbench")
    head = _git(root, "rev-parse", "--short", "HEAD")
    assert cli.source_commit(root / "kdbench") == head
    (root / "notes.txt").write_text("untracked: not a change to the tree")
    assert cli.source_commit(root / "kdbench") == head
    (root / "kdbench" / "__init__.py").write_text("x = 1\n")
    assert cli.source_commit(root / "kdbench") == f"{head}-dirty"


@needs_git
def test_commit_of_another_project_is_unknown(tmp_path):
    other = _repo(tmp_path / "other", "someone-elses-project")
    assert cli.source_commit(other / "kdbench") == "unknown"  # kdbench inside a repository of another project
    site = other / "venv" / "lib" / "site-packages" / "kdbench"
    site.mkdir(parents=True)
    assert cli.source_commit(site) == "unknown"
    mine = _repo(tmp_path / "mine", "kdbench")
    nested = mine / "venv" / "site-packages" / "kdbench"  # an installed copy inside a kdbench checkout
    nested.mkdir(parents=True)
    assert cli.source_commit(nested) == "unknown"
    plain = tmp_path / "plain" / "kdbench"
    plain.mkdir(parents=True)
    assert cli.source_commit(plain) == "unknown"  # no repository at all (tmp is outside any checkout)


def test_project_name_reads_the_project_table(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.x]\nname = "kdbench"\n[project]\nversion = "1"\nname = \'other\'  # c\n')
    assert cli._project_name(path) == "other"
    path.write_text('[project]\nversion = "1"\n[tool.x]\nname = "kdbench"\n')
    assert cli._project_name(path) is None
    assert cli._project_name(tmp_path / "missing.toml") is None


@needs_git
def test_commit_of_this_checkout():
    import kdbench

    pkg = Path(kdbench.__file__).resolve().parent
    if not (pkg.parent / ".git").exists():
        pytest.skip("kdbench is not imported from a git checkout")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=pkg, capture_output=True, text=True).stdout.strip()
    assert cli.source_commit() in (head, f"{head}-dirty")


def test_jsd_is_swept_last():
    from kdbench.bench.cases import headline_cases

    got = cli.sweep_order(headline_cases("cuda", quick=True))
    assert [(c.op, c.divergence if c.op == "kd_loss" else "") for c in got] == [
        ("kd_loss", "forward"), ("calibration_stats", ""), ("kd_loss", "jsd")
    ]
