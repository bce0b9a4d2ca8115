"""``kdbench bench``: the side-by-side comparisons at the headline shapes on this machine's device.

    kdbench bench [--device auto|cpu|cuda] [--out DIR] [--quick] [--repeats N] [--warmup N]
                  [--only kd_loss|calibration_stats] [--threads N] [--no-memory] [--no-tuning]
                  [--name NAME]
    kdbench bench --check [--out DIR] [--quick]

The first form measures the device's copy bandwidth, then for each headline case
checks every available provider against a float64 oracle, times them round-robin,
measures each one's peak extra memory, and writes ``<out>/<name>.md`` and ``.json``
(name: "cpu", or the GPU's name such as "h200").  On CUDA it then sweeps the Triton
kernels' pipelining depth (:mod:`kdbench.bench.tuning`) and rewrites the report with
that table.  It exits 1 if any provider (or depth) failed its correctness check, or a
provider raised, after writing the report.

``--check`` is the one prepared GPU command (see :mod:`kdbench.bench.check`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kdbench.bench import measure, providers, report, tuning
from kdbench.bench.cases import CALIBRATION, KD_LOSS, Case, headline_cases

DEFAULT_OUT = Path("results") / "bench"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdbench bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, or cuda[:i]")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default results/bench)")
    p.add_argument("--name", default=None, help="report file name without extension (default: the device's name)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke test in seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per provider (default 20 GPU, 7 CPU, 3 quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the correctness check")
    p.add_argument("--only", choices=[KD_LOSS, CALIBRATION], action="append", help="restrict to these ops")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPUs this process may use)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--no-tuning", action="store_true", help="skip the pipelining-depth sweep of the Triton kernels (CUDA only)"
    )
    p.add_argument("--check", action="store_true", help="the prepared GPU check: CUDA tests, benchmarks, this report")
    return p


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device: expected auto, cpu or cuda[:i], got {device!r}")
    return device


def device_slug(device: str) -> str:
    """File name of a device's report: "cpu", or the GPU's name ("NVIDIA H200" -> "h200")."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "memory": _mem_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchmetrics": _version("torchmetrics"),
        "liger-kernel": _version("liger-kernel"),
    }
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
    return info


def _commit() -> str | None:
    import kdbench

    root = os.path.dirname(os.path.dirname(os.path.abspath(kdbench.__file__)))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _free(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def run_case(
    case: Case,
    bandwidth: float,
    *,
    repeats: int,
    warmup: int,
    memory: bool,
    log: Any = print,
) -> dict[str, Any]:
    """Check, time and measure every provider of one case; a JSON-ready dict."""
    a, b = case.inputs()
    oracle = providers.make_oracle(case, a, b)
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, providers.Runner] = {}
    for name in providers.providers_for(case):
        reason = providers.skip_reason(name, case)
        if reason is not None:
            results[name] = {"status": "skipped", "reason": reason}
            log(f"  {name}: skipped ({reason})")
            continue
        try:
            runner = providers.Runner(name, case, a, b)
            errors = runner.check(oracle)  # the first call: compiles, warms caches
        except AssertionError as e:
            results[name] = {"status": "wrong", "reason": str(e)}
            log(f"  {name}: WRONG RESULT, not timed: {e}")
            continue
        except Exception as e:  # a provider that crashes is reported, not fatal to the others
            results[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            log(f"  {name}: ERROR, not timed: {type(e).__name__}: {e}")
            continue
        runners[name] = runner
        results[name] = {"status": "ok", "errors": errors}
    times = measure.time_round_robin({n: r.run for n, r in runners.items()}, case.device, repeats, warmup)
    for name, runner in runners.items():
        r = results[name]
        r.update(measure.summary(times[name]))
        r["times_s"] = times[name]
        r["GB/s"] = case.bytes_moved / r["median_s"] / 1e9
        r["pct_copy_bw"] = 100.0 * r["GB/s"] / bandwidth
        if memory:
            _free(case.device)
            peak, how = measure.peak_extra_memory(runner.run, case.device)
            r["peak_extra_bytes"] = peak
            r["peak_method"] = how
            if peak is not None and case.grad_bytes:
                r["peak_over_grad"] = peak / case.grad_bytes
        log(
            f"  {name}: median {r['median_s'] * 1e3:.2f} ms, min {r['min_s'] * 1e3:.2f} ms, "
            f"{r['GB/s']:.1f} GB/s ({r['pct_copy_bw']:.0f}% of copy)"
            + (f", peak extra {r['peak_extra_bytes'] / 2**20:.0f} MiB" if r.get("peak_extra_bytes") is not None else "")
        )
    del runners, a, b, oracle
    _free(case.device)
    speedups = {
        mine: {
            other: results[other]["median_s"] / results[mine]["median_s"]
            for other in results
            if other != mine and results[other]["status"] == "ok"
        }
        for mine in providers.KDBENCH_PROVIDERS
        if results.get(mine, {}).get("status") == "ok"
    }
    return {"case": case.info(), "title": case.title, "results": results, "speedups": speedups}


def run(args: argparse.Namespace, argv: list[str]) -> int:
    device = _resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    repeats = args.repeats or (3 if args.quick else 20 if device != "cpu" else 7)
    cases = [c for c in headline_cases(device, quick=args.quick) if not args.only or c.op in args.only]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy_before = measure.cpu_busy_fraction()
    print(f"kdbench bench on {device}: {len(cases)} cases, {repeats} timed rounds each")
    bw = measure.copy_bandwidth(device, nbytes=(1 << 24) if args.quick else None)
    print(f"copy bandwidth: {bw['GB/s']:.1f} GB/s")
    out_cases = []
    for case in cases:
        print(case.title)
        out_cases.append(run_case(case, bw["GB/s"], repeats=repeats, warmup=args.warmup, memory=not args.no_memory))
    import kdbench

    result: dict[str, Any] = {
        "device": "cpu" if device == "cpu" else device_slug(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["kdbench", "bench", *argv]),
        "kdbench_version": kdbench.__version__,
        "commit": _commit(),
        "quick": bool(args.quick),
        "machine": machine_info(device),
        "copy_bandwidth": bw,
        "cases": out_cases,
    }
    if load_before is not None:
        result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    if busy_before is not None:
        result["cpu_busy_before"] = busy_before
    result["targets"] = [] if args.quick else report.evaluate_targets(result)
    name = args.name or result["device"]
    md, js = report.write_reports(result, args.out, name)
    print(f"wrote {md} and {js}")
    tunable = [c for c in cases if providers.skip_reason(tuning.PROVIDER, c) is None]
    if tunable and not args.no_tuning:
        # After the report is on disk: a sweep cut short (time limit, crash) loses nothing above.
        result["tuning"] = []
        for case in tunable:
            print(f"pipelining depth sweep: {case.title}")
            result["tuning"].append(tuning.sweep(case, bw["GB/s"], repeats=repeats, warmup=args.warmup))
        md, js = report.write_reports(result, args.out, name)
        print(f"rewrote {md} and {js} with the sweep")
    for t in result["targets"]:
        state = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"target {t['name']}: {state}" + (f" ({t['value']:.3g})" if t["value"] is not None else ""))
    failed = [
        f"{c['case']['op']} {name}"
        for c in out_cases
        for name, r in c["results"].items()
        if r["status"] in ("wrong", "error")
    ]
    failed += [
        f"{c['case']['op']} {tuning.PROVIDER} at stages={depth}"
        for c in result.get("tuning", [])
        for depth, r in c["depths"].items()
        if r["status"] == "wrong"
    ]
    if failed:
        print(f"kdbench bench: failed providers: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print(f"kdbench bench: --repeats: expected >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    if args.check:
        from kdbench.bench.check import run_check

        return run_check(args.out, quick=args.quick)
    try:
        return run(args, argv)
    except ValueError as e:
        print(f"kdbench bench: {e}", file=sys.stderr)
        return 2
