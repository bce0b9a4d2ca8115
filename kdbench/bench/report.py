"""Targets, and the Markdown / JSON reports of ``kdbench bench`` (written atomically).

The targets (issue 6) are stated at the headline shapes; a run at other shapes
(``--quick``) reports its figures but evaluates no target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench._io import atomic_write_text
from kdbench.bench.cases import CALIBRATION, FORWARD_BACKWARD, KD_LOSS


@dataclass(frozen=True)
class Target:
    """One requirement on one provider of one headline case.

    ``metric``: "pct_copy_bw" (% of the measured copy bandwidth, min bytes), "speedup"
    (median time of ``other`` / median time of ``provider``), "time_ratio" (the
    inverse), or "peak_over_grad" (peak extra memory / gradient buffer bytes).
    """

    name: str
    device: str  # "cuda" or "cpu"
    op: str
    direction: str
    divergence: str
    shape: tuple[int, int]
    dtype: str
    provider: str
    metric: str
    threshold: float
    at_most: bool = False  # True: value <= threshold passes; False: value >= threshold
    other: str | None = None


_GPU_KD = dict(device="cuda", op=KD_LOSS, direction=FORWARD_BACKWARD, divergence="forward", shape=(8192, 128256), dtype="bfloat16")
_GPU_CAL = dict(device="cuda", op=CALIBRATION, direction="forward", divergence="forward", shape=(65536, 32000), dtype="bfloat16")
_CPU_KD = dict(device="cpu", op=KD_LOSS, direction=FORWARD_BACKWARD, divergence="forward", shape=(2048, 32000), dtype="float32")

TARGETS: tuple[Target, ...] = (
    Target("kd_loss fwd+bwd: >= 75% of copy bandwidth", **_GPU_KD, provider="kdbench-triton", metric="pct_copy_bw", threshold=75.0),
    Target("kd_loss fwd+bwd: >= 4x PyTorch eager", **_GPU_KD, provider="kdbench-triton", metric="speedup", threshold=4.0, other="eager"),
    Target("kd_loss fwd+bwd: >= 1.3x torch.compile", **_GPU_KD, provider="kdbench-triton", metric="speedup", threshold=1.3, other="compile"),
    Target("kd_loss fwd+bwd: >= 2x Liger-Kernel KL", **_GPU_KD, provider="kdbench-triton", metric="speedup", threshold=2.0, other="liger"),
    Target(
        "kd_loss fwd+bwd: peak extra memory <= 1.1x the gradient",
        **_GPU_KD,
        provider="kdbench-triton",
        metric="peak_over_grad",
        threshold=1.1,
        at_most=True,
    ),
    Target("calibration_stats: >= 75% of copy bandwidth", **_GPU_CAL, provider="kdbench-triton", metric="pct_copy_bw", threshold=75.0),
    Target("calibration_stats: >= 10x torchmetrics", **_GPU_CAL, provider="kdbench-triton", metric="speedup", threshold=10.0, other="torchmetrics"),
    Target(
        "kd_loss fwd+bwd (torch backend): <= 0.75x the time of eager",
        **_CPU_KD,
        provider="kdbench-torch",
        metric="time_ratio",
        threshold=0.75,
        at_most=True,
        other="eager",
    ),
)


def _matches(target: Target, case: dict[str, Any], device_kind: str) -> bool:
    return (
        target.device == device_kind
        and target.op == case["op"]
        and target.direction == case["direction"]
        and (target.op != KD_LOSS or target.divergence == case["divergence"])
        and tuple(case["shape"]) == target.shape
        and target.dtype == case["dtype"]
    )


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of this device kind: value, threshold, and met (True / False / None = not measured)."""
    kind = "cuda" if report["device"] != "cpu" else "cpu"
    out = []
    for target in TARGETS:
        if target.device != kind:
            continue
        entry: dict[str, Any] = {
            "name": target.name,
            "threshold": target.threshold,
            "at_most": target.at_most,
            "value": None,
            "met": None,
        }
        case = next((c for c in report["cases"] if _matches(target, c["case"], kind)), None)
        if case is None:
            entry["note"] = "not measured: this run did not include the target's shape"
            out.append(entry)
            continue
        mine = case["results"].get(target.provider, {})
        theirs = case["results"].get(target.other, {}) if target.other else {}
        value = None
        if mine.get("status") != "ok":
            entry["note"] = f"not measured: {target.provider} {mine.get('status', 'absent')}: {mine.get('reason', '')}".rstrip(": ")
        elif target.other and theirs.get("status") != "ok":
            entry["note"] = f"not measured: {target.other} {theirs.get('status', 'absent')}: {theirs.get('reason', '')}".rstrip(": ")
        elif target.metric == "pct_copy_bw":
            value = mine["pct_copy_bw"]
        elif target.metric == "speedup":
            value = theirs["median_s"] / mine["median_s"]
        elif target.metric == "time_ratio":
            value = mine["median_s"] / theirs["median_s"]
        elif target.metric == "peak_over_grad":
            value = mine.get("peak_over_grad")
            if value is None:
                entry["note"] = "not measured: no memory figure on this platform"
        if value is not None:
            entry["value"] = value
            entry["met"] = value <= target.threshold if target.at_most else value >= target.threshold
        out.append(entry)
    return out


# ---- writing -----------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:,.0f} MiB"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    bw = report["copy_bandwidth"]
    lines = [
        f"# kdbench bench: {report['device']}",
        "",
        f"Measured {report['date']} with `{report['command']}` (kdbench {report['kdbench_version']}, "
        f"commit {report.get('commit') or 'unknown'}).",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    load = report.get("load_average")
    if load:
        lines.append(
            f"- load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in load['before'])}; "
            f"after: {', '.join(f'{x:.2f}' for x in load['after'])}"
        )
    if report.get("cpu_busy_before") is not None:
        lines.append(f"- CPU busy (all cores, other processes) in the second before the run: {100 * report['cpu_busy_before']:.0f}%")
    lines += [
        "",
        f"Copy bandwidth measured in this run: **{bw['GB/s']:.1f} GB/s** (`copy_` of {_fmt_bytes(bw['bytes'] // 2)}, "
        "bytes read + written, best of the repeats).",
        "",
    ]
    if report.get("quick"):
        lines += ["Quick run: small shapes for a smoke test; the targets are not evaluated.", ""]
    if report.get("notes"):
        lines += [f"- {n}" for n in report["notes"]] + [""]
    if report["targets"]:
        lines += ["## Targets", "", "| target | measured | threshold | met |", "| --- | --- | --- | --- |"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            value = _fmt(t["value"], ".3g") if t["value"] is not None else t.get("note", "n/a")
            bound = ("<= " if t["at_most"] else ">= ") + format(t["threshold"], "g")
            lines.append(f"| {t['name']} | {value} | {bound} | {met} |")
        lines.append("")
    for case in report["cases"]:
        lines += _case_table(case)
    for sweep in report.get("tuning", []):
        lines += _tuning_table(sweep)
    lines += [
        "GB/s counts the minimum bytes (kd_loss: read both logit tensors, write the gradient; "
        "calibration_stats: read the logits and labels once). Speed-up = the provider's median time "
        "/ the kdbench provider's. Errors are against a float64 oracle (kd_loss: loss over all rows, "
        "gradient of the first rows relative to its largest entry).",
        "",
    ]
    return "\n".join(lines)


def _status_cell(r: dict[str, Any]) -> str:
    """'status: reason' of a result that was not timed, as one table cell."""
    reason = " ".join(str(r.get("reason", "")).split()).replace("|", "/")
    return f"{r['status']}: {reason}"


def _timing_cells(r: dict[str, Any]) -> str:
    """median ms | min ms | GB/s | % copy bw of a timed result."""
    return f"{r['median_s'] * 1e3:.3f} | {r['min_s'] * 1e3:.3f} | {r['GB/s']:.1f} | {r['pct_copy_bw']:.1f}"


def _errors_cell(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items())


def _case_table(case: dict[str, Any]) -> list[str]:
    results = case["results"]
    mine = [p for p in ("kdbench-triton", "kdbench-torch") if results.get(p, {}).get("status") == "ok"]
    head = "| provider | median ms | min ms | GB/s | % copy bw | peak extra memory | "
    head += "".join(f"{p} speed-up over it | " for p in mine) + "max error vs float64 |"
    lines = [f"## {case['title']}", "", head, "|" + " --- |" * (7 + len(mine))]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {_status_cell(r)} |" + " |" * (5 + len(mine)))
            continue
        mem = _fmt_bytes(r.get("peak_extra_bytes"))
        if r.get("peak_over_grad") is not None:
            mem += f" ({r['peak_over_grad']:.2f}x grad)"
        speed = "".join(f"{r['median_s'] / results[p]['median_s']:.2f}x | " for p in mine)
        lines.append(f"| {name} | {_timing_cells(r)} | {mem} | {speed}{_errors_cell(r)} |")
    lines.append("")
    return lines


def _tuning_table(sweep: dict[str, Any]) -> list[str]:
    lines = [
        f"## Pipelining depth (STREAM_STAGES): kdbench-triton, {sweep['title']}",
        "",
        f"Default in this run: {sweep['default']}. Each depth is checked against the float64 oracle, then timed "
        "round-robin with the others.",
        "",
        "| stages | median ms | min ms | GB/s | % copy bw | max error vs float64 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for depth, r in sweep["depths"].items():
        if r["status"] != "ok":
            lines.append(f"| {depth} | {_status_cell(r)} | | | | |")
            continue
        lines.append(f"| {depth} | {_timing_cells(r)} | {_errors_cell(r)} |")
    lines.append("")
    return lines


def write_reports(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` and ``.md``, each written atomically."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md_path, render_markdown(report))
    return md_path, json_path
