"""Timing, copy bandwidth and peak extra memory, on CPU or one CUDA device.

* Times are wall-clock per call with the device synchronised inside the timed region
  (CUDA events on a GPU, ``perf_counter`` on CPU).  Providers are timed round-robin,
  one call each per round, so load that drifts during the run (a shared machine)
  falls on all of them alike; medians and minima are reported.
* Copy bandwidth is ``dst.copy_(src)`` on a buffer far larger than the last-level
  cache, counting bytes read plus bytes written.
* Peak extra memory of one call: on CUDA, ``max_memory_allocated`` during the call minus
  the memory allocated before it; on Linux CPUs, the growth of the process's peak
  resident set (VmHWM, reset through ``/proc/self/clear_refs``) over its resident set
  before the call.  Elsewhere it is not measured (None).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# Copy-bandwidth buffers: far beyond an H200's 50 MB L2 and a CPU's last-level cache.
COPY_BYTES_CUDA = 1 << 31
COPY_BYTES_CPU = 1 << 29


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one synchronised call."""
    if _is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(
    fns: dict[str, Callable[[], Any]],
    device: str,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_repeats: int = 5,
) -> dict[str, list[float]]:
    """Per-call seconds of each function, ``repeats`` rounds of one call each, after ``warmup`` rounds.

    ``budget_s``: a function stops being timed once it has ``min_repeats`` calls and they
    add up to ``budget_s`` seconds (a provider 100x slower than the rest would otherwise
    take most of the run); the others keep their rounds.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            time_once(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = times[name]
            if budget_s is not None and len(t) >= min_repeats and sum(t) >= budget_s:
                continue
            t.append(time_once(fn, device))
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Measured copy bandwidth in GB/s (1e9 bytes), counting read + write; best of ``repeats``."""
    if nbytes is None:
        nbytes = COPY_BYTES_CUDA if _is_cuda(device) else COPY_BYTES_CPU
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_round_robin({"copy": lambda: dst.copy_(src)}, device, repeats, warmup=1)["copy"]
    del src, dst
    best = min(times)
    return {"GB/s": 2 * nbytes / best / 1e9, "bytes": 2 * nbytes, "best_s": best, "median_s": statistics.median(times)}


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat), while this process sleeps.

    On a shared machine this is the load the measurement is about to compete with.
    """
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = snap()
        time.sleep(seconds)
        total1, idle1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _proc_status() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out if len(out) == 2 else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_extra_memory(fn: Callable[[], Any], device: str) -> tuple[int | None, str]:
    """(bytes, method) of the peak memory one call of ``fn`` adds over what was allocated before it.

    Whatever ``fn`` returns (a gradient, say) counts: it is alive at the peak.  The
    function should have run once before (compilation, caches).  Returns (None, why)
    where the platform offers no measurement.
    """
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak, "torch.cuda.max_memory_allocated during the call minus memory_allocated before it"
    before = _proc_status()
    if before is None or not _reset_peak_rss():
        return None, "not measured: needs Linux /proc/self/status and /proc/self/clear_refs"
    before = _proc_status()
    assert before is not None
    out = fn()
    after = _proc_status()
    del out
    assert after is not None
    return max(0, after["VmHWM"] - before["VmRSS"]), "peak resident set (VmHWM) during the call minus VmRSS before it"
