"""Targets, and the Markdown / JSON reports of ``kdbench bench`` (written atomically).

The targets are stated at the headline shapes on CUDA (bf16, measured on an H200) and
at the CPU headline shape, plus one per measured CUDA case (headline and extra):
kdbench-triton no slower than ``torch.compile``.  A run at other shapes (``--quick``)
reports its figures but evaluates no target.  A ``--baseline`` file adds each
provider's median from an earlier run (:func:`load_baseline`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench._io import atomic_write_text
from kdbench.bench.cases import CALIBRATION, FORWARD_BACKWARD, KD_LOSS
from kdbench.bench.tuning import CONFIG_HEADERS


@dataclass(frozen=True)
class Target:
    """One requirement on one provider of one case.

    ``metric``: "pct_copy_bw" (% of the measured copy bandwidth, min bytes), "speedup"
    (median time of ``other`` / median time of ``provider``), "time_ratio" (the
    inverse), or "peak_over_grad" (peak extra memory / gradient buffer bytes).
    ``other`` is looked up in the same case, or, with ``other_divergence``, in the case
    that differs from this one only in its divergence (kd_loss JSD against forward KL).
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
    other_divergence: str | None = None


_GPU_KD = dict(device="cuda", op=KD_LOSS, direction=FORWARD_BACKWARD, divergence="forward", shape=(8192, 128256), dtype="bfloat16")
_GPU_JSD = {**_GPU_KD, "divergence": "jsd"}
_GPU_CAL = dict(device="cuda", op=CALIBRATION, direction="forward", divergence="forward", shape=(65536, 32000), dtype="bfloat16")
_CPU_KD = dict(device="cpu", op=KD_LOSS, direction=FORWARD_BACKWARD, divergence="forward", shape=(2048, 32000), dtype="float32")
_TRITON = dict(provider="kdbench-triton")
_TORCH = dict(provider="kdbench-torch")
_AT_MOST_TIME = dict(metric="time_ratio", at_most=True)  # provider's median time / other's, at most threshold

TARGETS: tuple[Target, ...] = (
    Target("kd_loss fwd+bwd forward KL: >= 70% of copy bandwidth", **_GPU_KD, **_TRITON, metric="pct_copy_bw", threshold=70.0),
    Target("kd_loss fwd+bwd forward KL: >= 2.5x torch.compile", **_GPU_KD, **_TRITON, metric="speedup", threshold=2.5, other="compile"),
    Target("kd_loss fwd+bwd forward KL: peak extra memory <= 1.1x the gradient", **_GPU_KD, **_TRITON, metric="peak_over_grad",
           threshold=1.1, at_most=True),  # fmt: skip
    Target("kd_loss fwd+bwd JSD: <= 1.3x the time of forward KL (both kdbench-triton)", **_GPU_JSD, **_TRITON, **_AT_MOST_TIME,
           threshold=1.3, other="kdbench-triton", other_divergence="forward"),  # fmt: skip
    Target("calibration_stats: >= 80% of copy bandwidth", **_GPU_CAL, **_TRITON, metric="pct_copy_bw", threshold=80.0),
    Target("calibration_stats: >= 12x torchmetrics", **_GPU_CAL, **_TRITON, metric="speedup", threshold=12.0, other="torchmetrics"),
    Target("kd_loss fwd+bwd forward KL (torch backend on CUDA): <= 1.2x the time of eager", **_GPU_KD, **_TORCH, **_AT_MOST_TIME,
           threshold=1.2, other="eager"),  # fmt: skip
    Target("calibration_stats (torch backend on CUDA): <= the time of torchmetrics", **_GPU_CAL, **_TORCH, **_AT_MOST_TIME,
           threshold=1.0, other="torchmetrics"),  # fmt: skip
    Target("kd_loss fwd+bwd (torch backend): <= 0.75x the time of eager", **_CPU_KD, **_TORCH, **_AT_MOST_TIME, threshold=0.75,
           other="eager"),  # fmt: skip
)


def _device_kind(report: dict[str, Any]) -> str:
    return "cuda" if report["device"] != "cpu" else "cpu"


def per_case_targets(report: dict[str, Any]) -> list[Target]:
    """On CUDA, one target per measured case: kdbench-triton no slower than torch.compile."""
    if _device_kind(report) != "cuda":
        return []
    out = []
    for c in report["cases"]:
        info = c["case"]
        out.append(
            Target(
                f"no slower than torch.compile: {c.get('title', info.get('key', ''))}",
                device="cuda",
                op=info["op"],
                direction=info["direction"],
                divergence=info["divergence"],
                shape=tuple(info["shape"]),
                dtype=info["dtype"],
                **_TRITON,
                metric="speedup",
                threshold=1.0,
                other="compile",
            )
        )
    return out


def _matches(target: Target, case: dict[str, Any], device_kind: str) -> bool:
    return (
        target.device == device_kind
        and target.op == case["op"]
        and target.direction == case["direction"]
        and (target.op != KD_LOSS or target.divergence == case["divergence"])
        and tuple(case["shape"]) == target.shape
        and target.dtype == case["dtype"]
    )


def _find_case(target: Target, report: dict[str, Any]) -> dict[str, Any] | None:
    kind = _device_kind(report)
    return next((c for c in report["cases"] if _matches(target, c["case"], kind)), None)


def _unmeasured(provider: str, r: dict[str, Any]) -> str:
    return f"not measured: {provider} {r.get('status', 'absent')}: {r.get('reason', '')}".rstrip(": ")


def _evaluate(target: Target, report: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": target.name,
        "threshold": target.threshold,
        "at_most": target.at_most,
        "value": None,
        "met": None,
    }
    case = _find_case(target, report)
    other_case = case
    if target.other_divergence is not None:
        other_case = _find_case(dataclasses.replace(target, divergence=target.other_divergence), report)
    if case is None or (target.other and other_case is None):
        entry["note"] = "not measured: this run did not include the target's shape"
        return entry
    mine = case["results"].get(target.provider, {})
    theirs = other_case["results"].get(target.other, {}) if target.other and other_case else {}
    value = None
    if mine.get("status") != "ok":
        entry["note"] = _unmeasured(target.provider, mine)
    elif target.other and theirs.get("status") != "ok":
        entry["note"] = _unmeasured(target.other, theirs)
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
        flagged = [p for p, r in ((target.provider, mine), (target.other, theirs)) if r.get("over_tolerance")]
        if flagged:
            entry["note"] = f"{' and '.join(dict.fromkeys(flagged))} over tolerance vs float64"
    return entry


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of this device kind: value, threshold, and met (True / False / None = not measured)."""
    kind = _device_kind(report)
    return [_evaluate(t, report) for t in (*TARGETS, *per_case_targets(report)) if t.device == kind]


def load_baseline(path: Path) -> dict[str, Any]:
    """The medians of an earlier run, from a ``--baseline`` file.

    The file is a JSON object: ``"source"`` (where the numbers come from: report, commit,
    date, machine) and, under each case key (``Case.key``), ``{provider: median_ms}``.
    Returns ``{"source", "file", "medians_ms": {case key: {provider: ms}}}``; raises
    ValueError naming what is wrong.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--baseline: cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--baseline: {path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("source"), str) or not data["source"].strip():
        raise ValueError(f'--baseline: {path}: expected a JSON object with a non-empty "source" string')
    medians: dict[str, dict[str, float]] = {}
    for key, row in data.items():
        if key == "source":
            continue
        ok = isinstance(row, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in row.values()
        )
        if not ok:
            raise ValueError(f"--baseline: {path}: {key!r}: expected {{provider: median ms > 0}}, got {row!r}")
        medians[key] = {p: float(v) for p, v in row.items()}
    return {"source": data["source"], "file": str(path), "medians_ms": medians}


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
    baseline = report.get("baseline")
    if baseline:
        lines += [f"Baseline (the \"before\" columns, from `{baseline['file']}`): {baseline['source']}", ""]
    if report.get("quick"):
        lines += ["Quick run: small shapes for a smoke test; the targets are not evaluated.", ""]
    if report.get("notes"):
        lines += [f"- {n}" for n in report["notes"]] + [""]
    if report["targets"]:
        lines += ["## Targets", "", "| target | measured | threshold | met |", "| --- | --- | --- | --- |"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            if t["value"] is None:
                value = t.get("note", "n/a")
            else:
                value = _fmt(t["value"], ".3g") + (f" ({t['note']})" if t.get("note") else "")
            bound = ("<= " if t["at_most"] else ">= ") + format(t["threshold"], "g")
            lines.append(f"| {t['name']} | {value} | {bound} | {met} |")
        lines.append("")
    medians = (baseline or {}).get("medians_ms")
    headline = [c for c in report["cases"] if not c.get("extra")]
    extra = [c for c in report["cases"] if c.get("extra")]
    for case in headline:
        lines += _case_table(case, medians, "##")
    if extra:
        repeats = sorted({r["repeats"] for c in extra for r in c["results"].values() if r["status"] == "ok"})
        lines += [
            "## Extra shapes",
            "",
            f"Timed with fewer rounds ({', '.join(map(str, repeats)) or 'n/a'}) and without the slow providers.",
            "",
        ]
        for case in extra:
            lines += _case_table(case, medians, "###")
    for sweep in report.get("tuning", []):
        lines += _tuning_table(sweep)
    comp = report.get("compile")
    lines += [
        "GB/s counts the minimum bytes (kd_loss: read both logit tensors, write the gradient; "
        "calibration_stats: read the logits and labels once). Speed-up = the provider's median time "
        "/ the kdbench provider's. Errors are against a float64 oracle (kd_loss: loss over all rows, "
        "gradient of the first rows relative to its largest entry); a provider other than kdbench's "
        "over its tolerance is timed anyway and flagged in its row, a kdbench provider over it is wrong and not timed."
        + (
            f" `compile` is `torch.compile` in mode \"{comp['mode']}\" with dynamic={comp['dynamic']}, one compile "
            "per shape in the untimed first call (the first-call line under each table)."
            if comp
            else ""
        ),
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
    """The measured errors; those over their bound first, in bold, with the bound."""
    over = r.get("over_tolerance", {})
    flagged = ", ".join(f"{k} {v['error']:.1e} (limit {v['bound']:.1e})" for k, v in over.items())
    rest = ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items() if k not in over)
    if not flagged:
        return rest
    return f"**over tolerance: {flagged}**" + (f"; {rest}" if rest else "")


def _baseline_cells(r: dict[str, Any], before_ms: float | None) -> str:
    """before (median ms) | speed-up vs before."""
    if before_ms is None:
        return "– | – | "
    return f"{before_ms:.3f} | {before_ms / (r['median_s'] * 1e3):.2f}x | "


def _case_table(case: dict[str, Any], baseline: dict[str, dict[str, float]] | None, level: str) -> list[str]:
    """One case's table; with ``baseline`` (case key -> provider -> median ms), the before columns."""
    results = case["results"]
    before = None if baseline is None else baseline.get(case["case"].get("key", ""), {})
    mine = [p for p in ("kdbench-triton", "kdbench-torch") if results.get(p, {}).get("status") == "ok"]
    head = "| provider | median ms | min ms | GB/s | % copy bw | "
    head += "before (median ms) | speed-up vs before | " if before is not None else ""
    head += "peak extra memory | " + "".join(f"{p} speed-up over it | " for p in mine) + "max error vs float64 |"
    columns = head.count("|") - 1
    lines = [f"{level} {case['title']}", "", head, "|" + " --- |" * columns]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {_status_cell(r)} |" + " |" * (columns - 2))
            continue
        mem = _fmt_bytes(r.get("peak_extra_bytes"))
        if r.get("peak_over_grad") is not None:
            mem += f" ({r['peak_over_grad']:.2f}x grad)"
        speed = "".join(f"{r['median_s'] / results[p]['median_s']:.2f}x | " for p in mine)
        prev = "" if before is None else _baseline_cells(r, before.get(name))
        lines.append(f"| {name} | {_timing_cells(r)} | {prev}{mem} | {speed}{_errors_cell(r)} |")
    lines.append("")
    first = [f"{n} {r['first_call_s']:.1f} s" for n, r in results.items() if r.get("first_call_s") is not None]
    if first:
        lines += [f"First call (compile / JIT, checked, not timed): {', '.join(first)}.", ""]
    rounds = {n: r["repeats"] for n, r in results.items() if r["status"] == "ok" and "repeats" in r}
    fewer = [f"{n} {k}" for n, k in rounds.items() if k < max(rounds.values())]
    if fewer:
        lines += [f"Timed rounds: {max(rounds.values())}, but {', '.join(fewer)} (its time budget was spent).", ""]
    return lines


def _tuning_table(sweep: dict[str, Any]) -> list[str]:
    lines = [f"## Tile configuration (TILE_CONFIG): kdbench-triton, {sweep['title']}", ""]
    if sweep.get("note"):
        return lines + [f"{sweep['note'][:1].upper()}{sweep['note'][1:]}.", ""]
    default = ", ".join(map(str, sweep["default"]))
    lines += [
        f"Default in this run: ({default}) = ({', '.join(CONFIG_HEADERS)}). Each configuration is checked against the "
        "float64 oracle, then timed round-robin with the others.",
        "",
        "| " + " | ".join(CONFIG_HEADERS) + " | median ms | min ms | GB/s | % copy bw | max error vs float64 |",
        "|" + " --- |" * (len(CONFIG_HEADERS) + 5),
    ]
    for r in sweep["configs"]:
        config = " | ".join(map(str, r["config"]))
        if r["status"] != "ok":
            lines.append(f"| {config} | {_status_cell(r)} | | | | |")
            continue
        lines.append(f"| {config} | {_timing_cells(r)} | {_errors_cell(r)} |")
    lines.append("")
    return lines


def write_reports(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` and ``.md``, each written atomically."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md_path, render_markdown(report))
    return md_path, json_path


def emit_markdown(lines: list[str], out: Path | None) -> int:
    """Print a Markdown document and, given ``out``, write it there atomically; exit status 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        atomic_write_text(out, text)
    return 0
