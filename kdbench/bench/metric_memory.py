"""State size and time: kdbench.CalibrationError against torchmetrics' MulticlassCalibrationError.

    python -m kdbench.bench.metric_memory [--samples 10000000] [--batch 100000] [--classes 10]
        [--bins 15] [--every 1000000] [--device cpu] [--threads N]
        [--out results/bench/metric_memory.md]

Feeds both metrics the same random float32 logits (standard normal times 3, uniform
labels), batch by batch (kdbench with ``inputs="logits"``, both with ``validate_args=True``).
Reports the bytes of every tensor in each metric's ``metric_state`` (the tensors of list
states included) after every ``--every`` samples, the total time of the ``update`` calls
and the time of ``compute`` (after one untimed warm-up update of each), and both ECEs,
which agree to float32 rounding on such logits.  kdbench's state is 3 M + 3 float64
whatever the samples; torchmetrics keeps a float32 confidence and a float32 correctness
per sample.  Generating the logits is not timed.  Prints a Markdown table and writes it
to ``--out``, with the machine (CPU model, torch and torchmetrics versions), the date
(UTC) and the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kdbench.bench.report import emit_markdown

if TYPE_CHECKING:
    from torchmetrics import Metric

DEFAULT_OUT = Path("results") / "bench" / "metric_memory.md"
PROG = "python -m kdbench.bench.metric_memory"


def state_bytes(metric: Metric) -> int:
    """Bytes held by a torchmetrics Metric's states: tensors, and the tensors in list states."""
    total = 0
    for value in metric.metric_state.values():
        tensors = value if isinstance(value, list) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def cpu_model() -> str:
    from kdbench.bench.cli import _cpu_model

    return _cpu_model()


@dataclass
class Measured:
    """One metric's run: state bytes at each checkpoint, total update seconds, compute seconds, ECE."""

    name: str
    sizes: list[int] = field(default_factory=list)
    update_s: float = 0.0
    compute_s: float = 0.0
    ece: float = float("nan")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000_000, help="samples in all (default 10,000,000)")
    p.add_argument("--batch", type=int, default=100_000, help="samples per update (default 100,000)")
    p.add_argument("--classes", type=int, default=10, help="classes C >= 2 (default 10)")
    p.add_argument("--bins", type=int, default=15, help="confidence bins (default 15)")
    p.add_argument("--every", type=int, default=1_000_000,
                   help="report the state sizes after every this many samples, a multiple of --batch "
                   "(default 1,000,000)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown file to write (default {DEFAULT_OUT})")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    for name, low in (("samples", 1), ("batch", 1), ("classes", 2), ("bins", 1), ("every", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"argument --{name}: expected an int >= {low}, got {getattr(args, name)}")
    if args.every % args.batch:
        p.error(f"argument --every: expected a multiple of --batch ({args.batch}), got {args.every}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: expected cpu or cuda[:i], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"argument --device: expected cpu or cuda[:i], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device!r} requested but CUDA is not available on this machine")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    samples: int, batch: int, classes: int, bins: int, every: int, device: torch.device
) -> tuple[list[int], list[Measured]]:
    """Update both metrics with ``samples`` samples; returns the checkpoints and each metric's figures."""
    from torchmetrics.classification import MulticlassCalibrationError

    from kdbench.calibration_metric import CalibrationError

    metrics = {
        "kdbench.CalibrationError": CalibrationError(classes, n_bins=bins, inputs="logits").to(device),
        "torchmetrics MulticlassCalibrationError": MulticlassCalibrationError(classes, n_bins=bins).to(device),
    }
    results = [Measured(name) for name in metrics]
    gen = torch.Generator(device=device).manual_seed(0)
    # First calls pay for imports and allocator growth: one small untimed update each.
    warm_z = torch.randn(min(batch, 1000), classes, generator=gen, device=device)
    warm_y = torch.randint(0, classes, (warm_z.shape[0],), generator=gen, device=device)
    for metric in metrics.values():
        metric.update(warm_z, warm_y)
        metric.reset()
    checkpoints: list[int] = []
    done = 0
    while done < samples:
        b = min(batch, samples - done)
        z = torch.randn(b, classes, generator=gen, device=device).mul_(3.0)
        y = torch.randint(0, classes, (b,), generator=gen, device=device)
        for res, metric in zip(results, metrics.values()):
            _sync(device)
            t0 = time.perf_counter()
            metric.update(z, y)
            _sync(device)
            res.update_s += time.perf_counter() - t0
        done += b
        if done % every == 0 or done == samples:
            checkpoints.append(done)
            for res, metric in zip(results, metrics.values()):
                res.sizes.append(state_bytes(metric))
    for res, metric in zip(results, metrics.values()):
        _sync(device)
        t0 = time.perf_counter()
        value = metric.compute()
        _sync(device)
        res.compute_s = time.perf_counter() - t0
        res.ece = float(value)
    return checkpoints, results


def _mb(n: int) -> str:
    return f"{n:,} B" if n < 10**6 else f"{n:,} B ({n / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    device = _check(p, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        import torchmetrics
    except ImportError as e:
        print(f'{PROG}: needs torchmetrics: pip install "kdbench[metrics]" ({e})', file=sys.stderr)
        return 2

    checkpoints, results = run(args.samples, args.batch, args.classes, args.bins, args.every, device)
    where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    names = [r.name for r in results]
    lines = [
        "# Calibration metric state: kdbench.CalibrationError vs torchmetrics MulticlassCalibrationError",
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {where} "
        f"({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"torchmetrics {torchmetrics.__version__}; device {device}) with `{' '.join([PROG, *map(shlex.quote, raw)])}`: "
        f"{args.samples:,} samples of {args.classes} classes in batches of {args.batch:,}, {args.bins} bins, "
        'float32 logits (kdbench with inputs="logits"), validate_args=True.',
        "",
        f"| samples | {names[0]} state | {names[1]} state |",
        "| ---: | ---: | ---: |",
    ]
    for i, n in enumerate(checkpoints):
        lines.append(f"| {n:,} | {_mb(results[0].sizes[i])} | {_mb(results[1].sizes[i])} |")
    lines += [
        "",
        "| metric | update, total | compute | ECE |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.update_s:.3f} s | {r.compute_s * 1e3:.2f} ms | {r.ece:.6f} |")
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
