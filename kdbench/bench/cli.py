"""``kdbench bench``: the side-by-side comparisons at the headline shapes on this machine's device.

    kdbench bench [--device auto|cpu|cuda] [--out DIR] [--quick] [--repeats N] [--warmup N]
                  [--only kd_loss|calibration_stats] [--threads N] [--no-memory] [--no-tuning]
                  [--no-extra-shapes] [--baseline FILE.json] [--tuning-deadline SECONDS]
                  [--name NAME]
    kdbench bench --check [--out DIR] [--quick]

The first form measures the device's copy bandwidth, then for each headline case
checks every available provider against a float64 oracle, times them round-robin,
measures each one's peak extra memory, and writes ``<out>/<name>.md`` and ``.json``
(name: "cpu", or the GPU's name such as "h200").  On CUDA the extra shapes follow
(:func:`kdbench.bench.cases.extra_cases`: fewer repeats, without the slow providers),
then the sweep of the Triton kernels' tile configuration (:mod:`kdbench.bench.tuning`)
at the headline cases, and the report is rewritten with that table.  ``--baseline``
adds, to every provider row, the median of an earlier run and the speed-up over it.

It exits 1 if a kdbench provider (or tile configuration) failed its correctness
check, or any provider raised, after writing the report.  Another provider whose
result is over its tolerance (naive eager JSD in bfloat16) is timed and flagged in
its row, and does not fail the run.

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdbench.bench import measure, providers, report, tuning
from kdbench.bench.cases import CALIBRATION, KD_LOSS, Case, extra_cases, headline_cases

DEFAULT_OUT = Path("results") / "bench"
EXTRA_REPEATS = 10  # timed rounds at the extra shapes (at most; --repeats lower lowers them too)
# On CUDA a provider stops being timed after 5 rounds once its rounds add up to this
# (kdbench-torch's calibration_stats took 1.4 s a call on an H200: 20 rounds would be 28 s).
PROVIDER_BUDGET_S_CUDA = 5.0
UNKNOWN_COMMIT = "unknown"


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
        "--no-tuning", action="store_true", help="skip the tile-configuration sweep of the Triton kernels (CUDA only)"
    )
    p.add_argument(
        "--no-extra-shapes", action="store_true", help="only the headline shapes (CUDA also has extra shapes)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="FILE.json",
        help='medians of an earlier run: {"source": "...", "<case key>": {"<provider>": median_ms}}; '
        "the report adds a before column and the speed-up over it",
    )
    p.add_argument(
        "--tuning-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no tile configuration of the sweep later than SECONDS after the command started "
        "(the rest are reported as not run); --check sets it from its time limit",
    )
    p.add_argument(
        "--check", action="store_true", help="the prepared GPU check: this report with the tile sweep, then the CUDA tests"
    )
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


def _project_name(pyproject: Path) -> str | None:
    """``name`` of the ``[project]`` table of a pyproject.toml (a line scan: no TOML parser on Python 3.10)."""
    try:
        lines = pyproject.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    in_project = False
    for line in lines:
        line = line.strip()
        if line.startswith("["):
            in_project = line == "[project]"
        elif in_project:
            m = re.fullmatch(r"""name\s*=\s*(["'])(.+?)\1\s*(#.*)?""", line)
            if m:
                return m.group(2)
    return None


def source_commit(package_dir: Path | None = None) -> str:
    """The kdbench project's commit (short hash, "-dirty" with uncommitted changes to tracked files).

    Only the repository whose top level is the kdbench project counts: its pyproject.toml
    names the project "kdbench" and ``package_dir`` (default: where ``kdbench`` was
    imported from) is that project's ``kdbench`` folder.  Anything else, such as an
    install into site-packages inside some other repository, or no git, is "unknown".
    """
    if package_dir is None:
        import kdbench

        package_dir = Path(kdbench.__file__).parent
    package_dir = package_dir.resolve()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top:
        return UNKNOWN_COMMIT
    root = Path(top).resolve()
    if package_dir != root / "kdbench" or _project_name(root / "pyproject.toml") != "kdbench":
        return UNKNOWN_COMMIT
    head = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if not head or status is None:
        return UNKNOWN_COMMIT
    return f"{head}-dirty" if status else head


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
    skip: Mapping[str, str] | None = None,
    budget_s: float | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Check, time and measure every provider of one case; a JSON-ready dict.

    ``skip``: providers not to run at this case, with the reason to report.  ``budget_s``:
    see :func:`kdbench.bench.measure.time_round_robin` (fewer rounds for a slow provider).  A provider
    over its tolerance is "wrong" and not timed if it is one of kdbench's
    (``providers.STRICT_PROVIDERS``); any other is timed, with ``over_tolerance``
    ``{metric: {"error", "bound"}}`` in its result.
    """
    skip = skip or {}
    a, b = case.inputs()
    oracle = providers.make_oracle(case, a, b)
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, providers.Runner] = {}
    for name in providers.providers_for(case):
        reason = skip.get(name) or providers.skip_reason(name, case)
        if reason is not None:
            results[name] = {"status": "skipped", "reason": reason}
            log(f"  {name}: skipped ({reason})")
            continue
        t0 = time.perf_counter()
        try:
            runner = providers.Runner(name, case, a, b)
            over = runner.compare(oracle)  # the first call: compiles, warms caches
        except Exception as e:  # a provider that crashes is reported, not fatal to the others
            results[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            log(f"  {name}: ERROR, not timed: {type(e).__name__}: {e}")
            continue
        if over and name in providers.STRICT_PROVIDERS:
            results[name] = {"status": "wrong", "reason": runner.too_large(), "errors": runner.errors}
            log(f"  {name}: WRONG RESULT, not timed: {runner.too_large()}")
            continue
        runners[name] = runner
        results[name] = {"status": "ok", "errors": runner.errors, "first_call_s": time.perf_counter() - t0}
        if over:
            results[name]["over_tolerance"] = {k: {"error": e, "bound": bound} for k, (e, bound) in over.items()}
            log(f"  {name}: OVER TOLERANCE, timed anyway (not a kdbench provider): {runner.too_large()}")
    fns = {n: r.run for n, r in runners.items()}
    times = measure.time_round_robin(fns, case.device, repeats, warmup, budget_s=budget_s)
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


def _failures(result: dict[str, Any]) -> list[str]:
    """What makes the run exit 1: providers that raised, kdbench providers (or tile configurations) that were wrong."""
    failed = [
        f"{name} on {c['title']}"
        for c in result["cases"]
        for name, r in c["results"].items()
        if r["status"] in ("wrong", "error")
    ]
    failed += [
        f"{tuning.PROVIDER} at TILE_CONFIG={tuple(r['config'])} on {c['title']}"
        for c in result.get("tuning", [])
        for r in c["configs"]
        if r["status"] == "wrong"
    ]
    return failed


def run(args: argparse.Namespace, argv: list[str], started: float | None = None) -> int:
    started = time.monotonic() if started is None else started
    device = _resolve_device(args.device)
    baseline = report.load_baseline(args.baseline) if args.baseline is not None else None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    repeats = args.repeats or (3 if args.quick else 20 if device != "cpu" else 7)
    extra_repeats = min(repeats, EXTRA_REPEATS)
    plan = [(c, False) for c in headline_cases(device, quick=args.quick)]
    if not args.no_extra_shapes:
        plan += [(c, True) for c in extra_cases(device, quick=args.quick)]
    plan = [(c, extra) for c, extra in plan if not args.only or c.op in args.only]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy_before = measure.cpu_busy_fraction()
    n_extra = sum(extra for _, extra in plan)
    print(
        f"kdbench bench on {device}: {len(plan) - n_extra} headline cases, {repeats} timed rounds each"
        + (f"; {n_extra} extra shapes, {extra_repeats} rounds each" if n_extra else "")
    )
    bw = measure.copy_bandwidth(device, nbytes=(1 << 24) if args.quick else None)
    print(f"copy bandwidth: {bw['GB/s']:.1f} GB/s")
    out_cases = []
    for case, extra in plan:
        print(case.title + (" (extra shape)" if extra else ""))
        entry = run_case(
            case,
            bw["GB/s"],
            repeats=extra_repeats if extra else repeats,
            warmup=args.warmup,
            memory=not args.no_memory,
            skip=providers.EXTRA_SHAPE_SKIPS if extra else None,
            budget_s=None if device == "cpu" else PROVIDER_BUDGET_S_CUDA,
        )
        entry["extra"] = extra
        out_cases.append(entry)
    import kdbench

    result: dict[str, Any] = {
        "device": "cpu" if device == "cpu" else device_slug(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["kdbench", "bench", *argv]),
        "kdbench_version": kdbench.__version__,
        "commit": source_commit(),
        "quick": bool(args.quick),
        "machine": machine_info(device),
        "copy_bandwidth": bw,
        "compile": {"mode": providers.COMPILE_MODE, "dynamic": False},
        "cases": out_cases,
    }
    if baseline is not None:
        result["baseline"] = baseline
    if load_before is not None:
        result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    if busy_before is not None:
        result["cpu_busy_before"] = busy_before
    result["targets"] = [] if args.quick else report.evaluate_targets(result)
    name = args.name or result["device"]
    md, js = report.write_reports(result, args.out, name)
    print(f"wrote {md} and {js}")
    tunable = sweep_order([c for c, extra in plan if not extra and providers.skip_reason(tuning.PROVIDER, c) is None])
    if tunable and not args.no_tuning:
        # After the report is on disk: a sweep cut short (time limit, crash) loses nothing above.
        result["tuning"] = []
        deadline = None if args.tuning_deadline is None else started + args.tuning_deadline
        for case in tunable:
            print(f"tile-configuration sweep: {case.title}")
            sweep = tuning.sweep(case, bw["GB/s"], repeats=repeats, warmup=args.warmup, deadline=deadline)
            result["tuning"].append(sweep)
        md, js = report.write_reports(result, args.out, name)
        print(f"rewrote {md} and {js} with the sweep")
    for t in result["targets"]:
        state = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"target {t['name']}: {state}" + (f" ({t['value']:.3g})" if t["value"] is not None else ""))
    flagged = [f"{n} on {c['title']}" for c in out_cases for n, r in c["results"].items() if r.get("over_tolerance")]
    if flagged:
        print(f"kdbench bench: timed although over tolerance (flagged in the report): {', '.join(flagged)}")
    failed = _failures(result)
    if failed:
        print(f"kdbench bench: failed providers: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def sweep_order(cases: list[Case]) -> list[Case]:
    """The cases to sweep, JSD's last: it is the slowest (76 ms a call on the H200 run, 2026-12-04) and on that run
    it spent the deadline that calibration_stats' sweep needed.  Otherwise in the given order."""
    return sorted(cases, key=lambda c: c.op == KD_LOSS and c.divergence == "jsd")


def main(argv: list[str]) -> int:
    started = time.monotonic()
    args = _parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print(f"kdbench bench: --repeats: expected >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    if args.check:
        from kdbench.bench.check import run_check

        return run_check(args.out, quick=args.quick)
    try:
        return run(args, argv, started)
    except ValueError as e:
        print(f"kdbench bench: {e}", file=sys.stderr)
        return 2
