"""Pipelining-depth sweep of the Triton kernels, so that one GPU run can tune them.

The streaming loops of both kernels keep ``STREAM_STAGES`` tiles in flight
(``kernels/kd_loss.py``, ``kernels/calibration.py``).  That default was reasoned
(bytes in flight needed to cover DRAM latency with one 16-warp program per SM), not
timed.  On CUDA, ``kdbench bench`` times the ``kdbench-triton`` provider of each
headline case at every depth in ``DEPTHS`` (1 = not pipelined): each depth is checked
against the float64 oracle first (pipelining rewrites the loads), then all depths are
timed round-robin, exactly like the providers.  The report's "Pipelining depth"
tables show which default to keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from kdbench.bench import measure, providers
from kdbench.bench.cases import KD_LOSS, Case

DEPTHS = (1, 2, 3, 4)
PROVIDER = "kdbench-triton"


def knob_module(case: Case) -> ModuleType:
    """The kernel module whose ``STREAM_STAGES`` governs ``case``."""
    if case.op == KD_LOSS:
        from kdbench.kernels import kd_loss as module
    else:
        from kdbench.kernels import calibration as module
    return module


@contextlib.contextmanager
def stream_stages(module: ModuleType, depth: int) -> Iterator[None]:
    """``module.STREAM_STAGES = depth`` inside the block (the launchers read it per call)."""
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth: expected an integer >= 1, got {depth!r}")
    old = module.STREAM_STAGES
    module.STREAM_STAGES = depth
    try:
        yield
    finally:
        module.STREAM_STAGES = old


def _at_depth(module: ModuleType, depth: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with stream_stages(module, depth):
            return fn()

    return run


def sweep(
    case: Case,
    bandwidth: float,
    *,
    repeats: int,
    warmup: int = 1,
    depths: tuple[int, ...] = DEPTHS,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Check, then time, the Triton provider of ``case`` at each pipelining depth.

    Returns ``{"case", "title", "default", "depths": {depth: result}}`` where a result is
    ``{"status": "ok", "errors", "median_s", "min_s", "repeats", "GB/s", "pct_copy_bw"}``
    or ``{"status": "wrong" | "error", "reason"}`` (a depth that fails its check or
    cannot launch, e.g. out of shared memory, is reported and not timed).
    """
    module = knob_module(case)
    a, b = case.inputs()
    oracle = providers.make_oracle(case, a, b)
    results: dict[str, dict[str, Any]] = {}
    timed: dict[str, Callable[[], Any]] = {}
    for depth in depths:
        runner = providers.Runner(PROVIDER, case, a, b)
        key = str(depth)
        try:
            with stream_stages(module, depth):
                errors = runner.check(oracle)
        except AssertionError as e:
            results[key] = {"status": "wrong", "reason": str(e)}
            log(f"  stages={depth}: WRONG RESULT, not timed: {e}")
            continue
        except Exception as e:  # e.g. a depth whose buffers exceed shared memory
            results[key] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            log(f"  stages={depth}: ERROR, not timed: {type(e).__name__}: {e}")
            continue
        results[key] = {"status": "ok", "errors": errors}
        timed[key] = _at_depth(module, depth, runner.run)
    times = measure.time_round_robin(timed, case.device, repeats, warmup) if timed else {}
    for key, t in times.items():
        r = results[key]
        r.update(measure.summary(t))
        r["GB/s"] = case.bytes_moved / r["median_s"] / 1e9
        r["pct_copy_bw"] = 100.0 * r["GB/s"] / bandwidth
        log(f"  stages={key}: median {r['median_s'] * 1e3:.3f} ms, {r['GB/s']:.1f} GB/s ({r['pct_copy_bw']:.0f}% of copy)")
    return {"case": case.info(), "title": case.title, "default": module.STREAM_STAGES, "depths": results}
