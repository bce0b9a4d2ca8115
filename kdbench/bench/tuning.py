"""Tile-configuration sweep of the Triton kernels, so that one GPU run can tune them.

Each kernel module (``kdbench/kernels/kd_loss.py``, ``kdbench/kernels/calibration.py``) reads its launch
configuration from a module attribute ``TILE_CONFIG = (tile_elems, num_warps,
ctas_per_sm)`` at every call, and lists the candidates in ``TILE_CONFIGS`` (a tuple of
such tuples; the default is one of them).  On CUDA, ``kdbench bench`` times the
``kdbench-triton`` provider of each headline case at every candidate: each is checked
against the float64 oracle first (a tile configuration changes the loops), then all
are timed round-robin, exactly like the providers.  The report's "Tile configuration"
tables show which default to keep.  A kernel module without ``TILE_CONFIGS`` is
reported as not swept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from kdbench.bench import measure, providers
from kdbench.bench.cases import KD_LOSS, Case

PROVIDER = "kdbench-triton"
# The fields of a TILE_CONFIG tuple: JSON names and report column headers.
CONFIG_FIELDS = ("tile_elems", "num_warps", "ctas_per_sm")
CONFIG_HEADERS = ("tile", "warps", "CTAs/SM")
_PAST_DEADLINE = "not run: the sweep's deadline (--tuning-deadline) had passed"


def knob_module(case: Case) -> ModuleType:
    """The kernel module whose ``TILE_CONFIG`` governs ``case``."""
    if case.op == KD_LOSS:
        from kdbench.kernels import kd_loss as module
    else:
        from kdbench.kernels import calibration as module
    return module


def _checked(config: object) -> tuple[int, ...]:
    ok = (
        isinstance(config, tuple)
        and len(config) == len(CONFIG_FIELDS)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in config)
    )
    if not ok:
        raise ValueError(f"config: expected a tuple ({', '.join(CONFIG_FIELDS)}) of integers >= 1, got {config!r}")
    return config  # type: ignore[return-value]


@contextlib.contextmanager
def tile_config(module: ModuleType, config: tuple[int, ...]) -> Iterator[None]:
    """``module.TILE_CONFIG = config`` inside the block (the launchers read it per call)."""
    config = _checked(config)
    old = module.TILE_CONFIG
    module.TILE_CONFIG = config
    try:
        yield
    finally:
        module.TILE_CONFIG = old


def _at_config(module: ModuleType, config: tuple[int, ...], fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with tile_config(module, config):
            return fn()

    return run


def sweep(
    case: Case,
    bandwidth: float,
    *,
    repeats: int,
    warmup: int = 1,
    configs: tuple[tuple[int, ...], ...] | None = None,
    deadline: float | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Check, then time, the Triton provider of ``case`` at each tile configuration.

    ``configs`` defaults to the kernel module's ``TILE_CONFIGS``.  No configuration is
    started after ``deadline`` (a ``time.monotonic()`` value): those left are reported
    with status "skipped" (each new configuration costs a Triton compile).  Returns ``{"case",
    "title", "default", "configs": [result, ...]}`` (plus ``"note"`` when there was
    nothing to sweep), where a result is ``{"config": [tile_elems, num_warps,
    ctas_per_sm], "status": "ok", "errors", "median_s", "min_s", "repeats", "GB/s",
    "pct_copy_bw"}`` or ``{"config", "status": "wrong" | "error", "reason"}`` (a
    configuration that fails its check or cannot launch is reported and not timed).
    """
    module = knob_module(case)
    out: dict[str, Any] = {"case": case.info(), "title": case.title, "default": None, "configs": []}
    if configs is None:
        configs = getattr(module, "TILE_CONFIGS", None)
    if not configs or not hasattr(module, "TILE_CONFIG"):
        out["note"] = f"not swept: {module.__name__} has no TILE_CONFIGS / TILE_CONFIG"
        log(f"  {out['note']}")
        return out
    out["default"] = list(module.TILE_CONFIG)
    results: list[dict[str, Any]] = [{"config": list(_checked(config))} for config in configs]
    out["configs"] = results
    if deadline is not None and time.monotonic() > deadline:  # not even the inputs and the oracle
        for r in results:
            r.update(status="skipped", reason=_PAST_DEADLINE)
        log(f"  {_PAST_DEADLINE}")
        return out
    a, b = case.inputs()
    oracle = providers.make_oracle(case, a, b)
    timed: dict[int, Callable[[], Any]] = {}
    for i, r in enumerate(results):
        config = tuple(r["config"])
        if deadline is not None and time.monotonic() > deadline:
            r.update(status="skipped", reason=_PAST_DEADLINE)
            continue
        runner = providers.Runner(PROVIDER, case, a, b)
        try:
            with tile_config(module, config):
                errors = runner.check(oracle)
        except AssertionError as e:
            r.update(status="wrong", reason=str(e))
            log(f"  TILE_CONFIG={config}: WRONG RESULT, not timed: {e}")
            continue
        except Exception as e:  # e.g. a configuration whose buffers exceed shared memory
            r.update(status="error", reason=f"{type(e).__name__}: {e}")
            log(f"  TILE_CONFIG={config}: ERROR, not timed: {type(e).__name__}: {e}")
            continue
        r.update(status="ok", errors=errors)
        timed[i] = _at_config(module, config, runner.run)
    times = measure.time_round_robin(timed, case.device, repeats, warmup) if timed else {}
    for i, t in times.items():
        r = results[i]
        r.update(measure.summary(t))
        r["GB/s"] = case.bytes_moved / r["median_s"] / 1e9
        r["pct_copy_bw"] = 100.0 * r["GB/s"] / bandwidth
        log(
            f"  TILE_CONFIG={tuple(r['config'])}: median {r['median_s'] * 1e3:.3f} ms, "
            f"{r['GB/s']:.1f} GB/s ({r['pct_copy_bw']:.0f}% of copy)"
        )
    return out
