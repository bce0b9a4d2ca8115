"""``kdbench bench --check``: the one prepared command for a GPU session.

Sized for an H200 with torch 2.11 / triton 3.6 to finish in under 8 minutes (470 s of steps): three
steps, each a subprocess with its own time limit (a hang costs at most that step),
the most valuable first:

1. ``kdbench bench --out OUT``: the headline comparisons, written to ``OUT/<gpu>.md``
   and ``.json`` (e.g. ``h200.md``), with the targets evaluated, then the Triton
   kernels' pipelining-depth sweep added to the same report;
2. the CUDA tests: the calibration kernel tests, every kd_loss edge case (and the > 2**31-element test),
   and ``tests/benchmarks`` (every provider against the float64 oracle; a grid of the
   kd kernel on CUDA tensors), without the ``slow`` torch.compile ones;
3. ``pytest tests/benchmarks --benchmark-only`` with ``--benchmark-json OUT/pytest-benchmark.json``.

Liger-Kernel is used when importable (install its wheel first; it is not on the
image), torchmetrics likewise; steps needing pytest / pytest-benchmark are reported
as not run when those are missing.  Each step's output goes to ``OUT/check-<step>.log``
and a summary to ``OUT/check-summary.md``.  Exit status: 0 when every step ran and
passed, 1 otherwise, 2 when this is not a CUDA machine or kdbench is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdbench._io import atomic_write_text

CUDA_TESTS = (
    "tests/test_calibration_kernel.py",
    # every named kd_loss edge case (masks, +-inf, 1e4 logits, strides, ...) on CUDA
    # tensors, and the > 2**31-element test
    "tests/test_kd_loss_edges.py",
    "tests/benchmarks",
)
# Seconds per step; the sum (470 s) leaves room for start-up within 8 minutes.  The
# bench step ends with the pipelining-depth sweep (its report is on disk before the
# sweep starts, so a cut-short sweep loses only itself).  The benchmarks step compiles
# the forward-only eager graphs cold (the bench step's forward+backward graphs come
# from Inductor's cache).  None of these limits has been tried on a GPU yet.
STEP_LIMITS = {"bench": 210, "cuda-tests": 160, "pytest-benchmarks": 100}


def _repo_root() -> Path:
    import kdbench

    return Path(kdbench.__file__).resolve().parent.parent


def _steps(out: Path, quick: bool) -> list[tuple[str, list[str] | None, str]]:
    """(name, command or None, why not run)."""
    py = sys.executable
    have_pytest = importlib.util.find_spec("pytest") is not None
    have_bench = importlib.util.find_spec("pytest_benchmark") is not None
    bench = [py, "-m", "kdbench", "bench", "--out", str(out)] + (["--quick"] if quick else [])
    # "not slow": the torch.compile correctness tests; the benchmarks check compile's output anyway.
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *CUDA_TESTS]
    benchmarks = [
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/benchmarks",
        "--benchmark-only", f"--benchmark-json={out / 'pytest-benchmark.json'}",
    ]  # fmt: skip
    return [
        ("bench", bench, ""),
        ("cuda-tests", tests if have_pytest else None, "pytest is not installed"),
        ("pytest-benchmarks", benchmarks if have_pytest and have_bench else None, "pytest-benchmark is not installed"),
    ]


def _run_step(name: str, cmd: list[str], out: Path, root: Path, env: dict[str, str]) -> tuple[str, float]:
    log = out / f"check-{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT, timeout=STEP_LIMITS[name], env=env)
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {STEP_LIMITS[name]} s"
    wall = time.monotonic() - t0
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] {status} in {wall:.0f} s; last lines of {log}:")
    print("\n".join("    " + line for line in tail))
    return status, wall


def run_check(out: Path, quick: bool = False) -> int:
    if not torch.cuda.is_available():
        print("kdbench bench --check: needs a CUDA GPU; on a CPU machine run `kdbench bench`", file=sys.stderr)
        return 2
    if importlib.util.find_spec("kdbench.kernels") is None:
        print(
            "kdbench bench --check: kdbench.kernels is not importable; install the package first "
            "(pip install --no-deps --no-build-isolation -e .)",
            file=sys.stderr,
        )
        return 2
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = _repo_root()
    env = dict(os.environ)
    if quick:
        env["KDBENCH_BENCH_QUICK"] = "1"
    rows = []
    ok = True
    for name, cmd, why_not in _steps(out, quick):
        if cmd is None:
            rows.append((name, f"not run: {why_not}", 0.0))
            ok = False
            print(f"[{name}] not run: {why_not}")
            continue
        status, wall = _run_step(name, cmd, out, root, env)
        rows.append((name, status, wall))
        ok &= status == "passed"
    lines = [
        "# kdbench bench --check",
        "",
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
        f"liger-kernel importable: {importlib.util.find_spec('liger_kernel') is not None}; "
        f"torchmetrics importable: {importlib.util.find_spec('torchmetrics') is not None}",
        "",
        "| step | status | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {n} | {s} | {w:.0f} |" for n, s, w in rows]
    atomic_write_text(out / "check-summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1
