"""``kdbench bench --check``: the one prepared command for a GPU machine.

Sized for an H200 with torch 2.11 / triton 3.6 to finish within 6 minutes including
the machine's start-up and the ``pip install`` (about 60 s): two steps, 260 s of limits
in all, each a subprocess with its own time limit (a hang costs at most that step),
the most valuable first:

1. ``kdbench bench --out OUT`` (170 s): the headline comparisons and the extra CUDA
   shapes, written to ``OUT/<gpu>.md`` and ``.json`` (e.g. ``h200.md``) with the
   targets evaluated, then the Triton kernels' tile-configuration sweep added to the
   same report.  With ``results/bench/<gpu>-before.json`` in the checkout (e.g.
   ``h200-before.json``), it is passed as ``--baseline``, so the report shows the
   earlier medians and the speed-up over them;
2. the CUDA tests (90 s): the calibration kernel tests, every kd_loss edge case (and the
   > 2**31-element test), and ``tests/benchmarks`` (every provider against the float64
   oracle; a grid of the kd kernel on CUDA tensors), without the ``slow``
   torch.compile ones, with ``--durations`` so that the log says where the time went.

The pytest-benchmark step (``pytest tests/benchmarks --benchmark-only``) is no longer
part of the check: it took 73 s on the H200 on 2026-12-04, which does not fit next to
the other two, and it times the same providers at the same headline shapes as step 1.
Run it by hand when its JSON is wanted::

    python -m pytest tests/benchmarks --benchmark-only --benchmark-json=OUT/pytest-benchmark.json

Install with ``python -m pip``: on the GPU image ``pip`` can belong to another
interpreter (see results/bench/README.md).  Liger-Kernel is used when importable
(install its wheel first; it is not on the image), torchmetrics likewise; the test step is reported as not run without pytest.
Each step's output goes to ``OUT/check-<step>.log`` and a summary to
``OUT/check-summary.md``.  Exit status: 0 when every step ran and passed, 1 otherwise,
2 when this is not a CUDA machine or kdbench is not installed.
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
# Seconds per step: 260 s, plus about 60 s of machine start and pip install, leaves
# 40 s of the 6 minutes for the interpreters' start and the summary.
#
# The bench step: this code ran on an H200 on 2026-12-04 (17:49 UTC, cold caches) in
# 80 s from start to report, headline and extra shapes, with kdbench-triton failing to
# import (the kernels were mid-rewrite), no Liger-Kernel and no sweep.  torch.compile's
# first calls (default mode) took 7.9 s (forward KL, the first compile of the process),
# 3.3 s (JSD) and 0.9 to 1.9 s at every other shape; kdbench-torch's calibration_stats
# (1.1 s a call) was stopped after 5 rounds by the per-provider time budget.  Left for
# what that run lacked: the Triton compiles of kdbench-triton at 9 shapes and of
# Liger-Kernel at 2 (about 30 s, guessed), then the sweep, which starts no configuration
# after TUNING_DEADLINE_S (each one is a Triton compile), so the step ends in time
# whatever the number of candidates.
#
# The CUDA tests took 115 s on 2026-12-04, including the old pipelining-depth sweep tests
# (12 Triton compiles), which now run against a fake kernel module and compile nothing;
# 90 s is not yet tried (``--durations`` in the step's log will say where the time goes).
STEP_LIMITS = {"bench": 170, "cuda-tests": 90}
TUNING_DEADLINE_S = STEP_LIMITS["bench"] - 30  # room to time the configurations already compiled and write


def _repo_root() -> Path:
    import kdbench

    return Path(kdbench.__file__).resolve().parent.parent


def baseline_file(root: Path) -> Path | None:
    """``results/bench/<gpu>-before.json`` of this GPU (e.g. h200-before.json), if the checkout has one."""
    from kdbench.bench.cli import device_slug

    path = root / "results" / "bench" / f"{device_slug('cuda')}-before.json"
    return path if path.is_file() else None


def _steps(out: Path, quick: bool, baseline: Path | None = None) -> list[tuple[str, list[str] | None, str]]:
    """(name, command or None, why not run)."""
    py = sys.executable
    have_pytest = importlib.util.find_spec("pytest") is not None
    bench = [py, "-m", "kdbench", "bench", "--out", str(out), "--tuning-deadline", str(TUNING_DEADLINE_S)]
    bench += (["--quick"] if quick else []) + (["--baseline", str(baseline)] if baseline else [])
    # "not slow": the torch.compile correctness tests; the bench step checks compile's output anyway.
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--durations=25", *CUDA_TESTS]
    return [
        ("bench", bench, ""),
        ("cuda-tests", tests if have_pytest else None, "pytest is not installed"),
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
            "with this interpreter (python -m pip install --no-deps --no-build-isolation -e .)",
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
    for name, cmd, why_not in _steps(out, quick, baseline_file(root)):
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
