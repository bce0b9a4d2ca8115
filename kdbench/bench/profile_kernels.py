"""Dynamic instruction counts of the Triton kernels under Nsight Compute, per element.

The instruction budgets of ``tests/test_kernels_compile.py`` are checked on static SASS
counts.  This measures what the GPU executes, so that the two can be compared:

    python -m kdbench.bench.profile_kernels --ncu ncu --out results/bench/h200-ncu.md

runs each headline case once under ``ncu --clock-control none`` (the clocks are left
alone), reading ``sm__sass_thread_inst_executed.sum`` (thread instructions executed),
``dram__bytes.sum`` and ``gpu__time_duration.sum`` of the case's main kernel, summed
over its launches in one call (kd_loss with ``ROW_MEETING = "launches"``: two, three for
JSD), and writes a Markdown table: instructions per element (kd_loss: per (student,
teacher) pair; calibration_stats: per logit) next to the static count of the loop
bodies of the same launches.
``--case NAME`` (used by the parent run under ncu) runs one case: a warm-up call and
then the measured one.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import subprocess
import sys
from pathlib import Path

import torch

from kdbench.bench.report import emit_markdown

# name: (op, divergence, N, V, main kernel)
CASES = {
    "kd-forward": ("kd_loss", "forward", 8192, 128256, "_kd_kernel"),
    "kd-reverse": ("kd_loss", "reverse", 8192, 128256, "_kd_kernel"),
    "kd-jsd": ("kd_loss", "jsd", 8192, 128256, "_kd_kernel"),
    "calibration": ("calibration_stats", "", 65536, 32000, "_chunk_stats_kernel"),
}
METRICS = ("sm__sass_thread_inst_executed.sum", "dram__bytes.sum", "gpu__time_duration.sum")


def launches_per_call(name: str) -> int:
    """Launches of the case's main kernel in one call (what ncu sums)."""
    from kdbench.kernels import kd_loss

    op, divergence = CASES[name][:2]
    if op != "kd_loss" or kd_loss.ROW_MEETING != "launches":
        return 1
    return 3 if divergence == "jsd" else 2


def sum_metrics(csv_text: str) -> dict[str, float]:
    """``ncu --csv`` output (one row per launch and metric) -> each metric summed over the launches."""
    values: dict[str, float] = {}
    for row in csv.DictReader(io.StringIO(csv_text[csv_text.find('"ID"') :])):
        name = row["Metric Name"]
        values[name] = values.get(name, 0.0) + float(row["Metric Value"].replace(",", ""))
    return values


def run_case(name: str) -> None:
    """A warm-up call, then the call that ncu measures (its launches of the kernel)."""
    import kdbench

    op, divergence, n, v, _ = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, v, device="cuda", generator=g).mul_(2.0).to(torch.bfloat16)
    if op == "kd_loss":
        b = torch.randn(n, v, device="cuda", generator=g).mul_(3.0).to(torch.bfloat16)
        for _ in range(2):
            s = a.detach().requires_grad_(True)
            kdbench.kd_loss(s, b, temperature=2.0, divergence=divergence, backend="triton").backward()
    else:
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        for _ in range(2):
            kdbench.calibration_stats(a, y, n_bins=15, backend="triton")
    torch.cuda.synchronize()


def _ncu(ncu: str, name: str) -> dict[str, float]:
    kernel = CASES[name][4]
    k = str(launches_per_call(name))
    cmd = [
        ncu, "--clock-control", "none", "--kernel-name", kernel, "--launch-skip", k, "--launch-count", k,
        "--metrics", ",".join(METRICS), "--csv", "--print-units", "base", sys.executable, "-m", "kdbench.bench.profile_kernels",
        "--case", name,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"ncu failed on {name}: {out.stderr[-2000:]}")
    return sum_metrics(out.stdout)


def _static_counts() -> dict[str, float]:
    """Static SASS counts per element of the same kernels (compiled here, as the tests do)."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "tests"))
    try:
        import test_kernels_compile as tkc
    finally:
        sys.path.pop(0)
    return tkc.headline_counts()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdbench.bench.profile_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(CASES), help="run one case (what the ncu child does)")
    p.add_argument("--ncu", default="ncu", help="the Nsight Compute command")
    p.add_argument("--out", type=Path, help="Markdown file to write")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kdbench.bench.profile_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.case:
        run_case(args.case)
        return 0
    static = _static_counts()
    lines = [
        f"# Instructions per element on {torch.cuda.get_device_name(0)}, Nsight Compute vs static SASS",
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with "
        "`python -m kdbench.bench.profile_kernels` (ncu --clock-control none, one launch after a warm-up; "
        "bf16, T = 2 for kd_loss, forward and backward; 15 bins for calibration_stats).",
        "",
        "| case | shape | kernel | thread instructions executed | per element | static SASS per element | "
        "DRAM bytes | duration under ncu |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (_, _, n, v, kernel) in CASES.items():
        try:
            m = _ncu(args.ncu, name)
        except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
            lines.append(f"| {name} | ({n}, {v}) | `{kernel}` | failed: {str(e)[:200]} | | | | |")
            continue
        inst = m.get(METRICS[0], float("nan"))
        per = inst / (n * v)
        lines.append(
            f"| {name} | ({n}, {v}) | `{kernel}` | {inst:.3g} | {per:.1f} | {static[name]:.1f} | "
            f"{m.get(METRICS[1], float('nan')) / 1e9:.2f} GB | {m.get(METRICS[2], float('nan')) / 1e6:.3f} ms |"
        )
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
