"""The torch backend on CUDA against the baselines its targets are stated against.

    python -m kdbench.bench.torch_backend_gpu

Times, with CUDA events (2 warm-up calls, then the median of 10):

* ``kd_loss`` forward+backward on (8192, 128256) bfloat16, T = 2, forward KL and JSD:
  ``kdbench.kd_loss(..., backend="torch")`` against the ``eager`` provider of
  :mod:`kdbench.bench.providers` (target: at most 1.2 times eager);
* ``calibration_stats`` on (65536, 32000) bfloat16, 15 bins: the torch backend against
  torchmetrics' ``multiclass_calibration_error`` when it is importable (target: no slower).

Prints one table (time, ratio, and each side's loss or ECE as a sanity check) and
exits 0; exits 2 with a one-line message where CUDA is not available.  About 20 s on an
H200 (torch 2.11), which printed 37.0 vs 16.6 ms (forward KL), 53.1 vs 41.0 ms (JSD) and
19.5 vs 17.3 ms (calibration).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from kdbench.bench.cases import FORWARD_BACKWARD, Case, calibration_case, kd_case
from kdbench.bench.providers import calibration_fn, kd_loss_fn

KD_SHAPE = (8192, 128256)
CALIBRATION_SHAPE = (65536, 32000)
WARMUP, REPEATS = 2, 10
NO_CUDA = "torch_backend_gpu: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed"


def median_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(median milliseconds of REPEATS calls after WARMUP, the last call's result)."""
    out = None
    for _ in range(WARMUP):
        out = fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def _kd_step(name: str, case: Case, s: torch.Tensor, t: torch.Tensor) -> Callable[[], float]:
    loss_fn = kd_loss_fn(name, case)

    def step() -> float:
        loss = loss_fn(s, t)
        torch.autograd.grad(loss, s)
        return loss.detach()

    return step


def kd_rows(device: str = "cuda") -> list[tuple[str, str, float, float, str]]:
    """(case, baseline name, torch ms, baseline ms, sanity note) for forward KL and JSD."""
    out = []
    s = t = None
    for divergence in ("forward", "jsd"):
        case = kd_case(*KD_SHAPE, "bfloat16", device, FORWARD_BACKWARD, divergence, temperature=2.0)
        if s is None:
            s, t = case.inputs()
            s.requires_grad_(True)
        ms_torch, loss_torch = median_ms(_kd_step("kdbench-torch", case, s, t))
        ms_eager, loss_eager = median_ms(_kd_step("eager", case, s, t))
        note = f"loss {float(loss_torch):.6g} vs {float(loss_eager):.6g}"
        out.append((case.title, "eager", ms_torch, ms_eager, note))
    return out


def calibration_row(device: str = "cuda") -> tuple[str, str, float, float, str]:
    case = calibration_case(*CALIBRATION_SHAPE, "bfloat16", device)
    z, y = case.inputs()
    ms_torch, stats = median_ms(lambda: calibration_fn("kdbench-torch", case)(z, y))
    note = f"ECE {stats.ece():.6f}"
    if importlib.util.find_spec("torchmetrics") is None:
        return case.title, "torchmetrics (not installed)", ms_torch, float("nan"), note
    ms_tm, ece_tm = median_ms(lambda: calibration_fn("torchmetrics", case)(z, y))
    return case.title, "torchmetrics", ms_torch, ms_tm, f"{note} vs {float(ece_tm):.6f}"


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    rows = kd_rows()
    torch.cuda.empty_cache()
    rows.append(calibration_row())
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; median of {REPEATS} after {WARMUP} warm-up calls")
    print(f"| {'case':<62} | {'torch backend':>13} | {'baseline':<28} | {'ratio':>6} | sanity")
    print(f"|{'-' * 64}|{'-' * 15}|{'-' * 30}|{'-' * 8}|-------")
    for title, base, ms_torch, ms_base, note in rows:
        ratio = ms_torch / ms_base
        print(f"| {title:<62} | {ms_torch:10.2f} ms | {base:<16} {ms_base:8.2f} ms | {ratio:5.2f}x | {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
