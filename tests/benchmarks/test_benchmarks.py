"""pytest-benchmark: kd_loss forward, kd_loss forward+backward and calibration_stats, every provider.

Run with ``python -m pytest tests/benchmarks --benchmark-only`` (a plain ``pytest`` skips
them: pyproject's addopts has ``--benchmark-skip``, which ``--benchmark-only`` overrides).
Each benchmark first checks its provider against the float64 oracle, then times
synchronised calls; ``extra_info`` records device, shape, dtype, bytes moved, GB/s
and the measured errors.  As in ``kdbench bench``, a kdbench provider over its
tolerance fails; any other provider (naive eager JSD in bfloat16) is timed, and its
errors over their bounds are recorded under ``over_tolerance``.  CPU shapes are small (minutes in all); CUDA shapes are the
headline ones (``KDBENCH_BENCH_QUICK=1``: small ones).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from conftest import DEVICE
from kdbench.bench import cases, providers

QUICK = os.environ.get("KDBENCH_BENCH_QUICK") == "1"
CASES = cases.pytest_cases(DEVICE, quick=QUICK)
ROUNDS = 20 if DEVICE == "cuda" else 5
# Case-major order, so that consecutive tests share one case's inputs and oracle.
PARAMS = [
    pytest.param(case, name, id=f"{case.key}-{name}") for case in CASES for name in providers.providers_for(case)
]


@functools.lru_cache(maxsize=1)
def _prepared(case: cases.Case):
    a, b = case.inputs()
    return a, b, providers.make_oracle(case, a, b)


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


@pytest.mark.parametrize("case,provider", PARAMS)
def test_benchmark(benchmark, case, provider):
    reason = providers.skip_reason(provider, case)
    if reason is not None:
        pytest.skip(reason)
    a, b, oracle = _prepared(case)
    runner = providers.Runner(provider, case, a, b)
    over = runner.compare(oracle)  # before anything is timed; also the warm-up / compile call
    assert not (over and provider in providers.STRICT_PROVIDERS), runner.too_large()
    benchmark.group = case.group
    benchmark.extra_info.update(
        device=_device_name(),
        op=case.op,
        direction=case.direction,
        shape=[case.n, case.v],
        dtype=case.dtype,
        bytes_moved=case.bytes_moved,
        errors_vs_float64=runner.errors,
        over_tolerance={k: {"error": e, "bound": bound} for k, (e, bound) in over.items()},
    )
    benchmark.pedantic(runner.run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None when benchmarking is disabled
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = case.bytes_moved / median / 1e9
