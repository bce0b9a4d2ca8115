"""Tables and figures of a suite, regenerated from its stored run records alone.

* ``results.csv``: one row per evaluated model.  Columns: dataset, pair, teacher,
  student, method, seed, role, every metric of the experiment engine, then the
  run's configuration.  A teacher shared by several runs (kd, kd_ts, ... of one pair
  and seed) appears once per pair and seed; its ``method`` says how it was trained
  (``teacher:ce``, ``teacher:ls0.1``, ``teacher:ensemble3``, ``teacher:self``).
* ``table.md``: per dataset, mean ± std over seeds of the headline metrics, rows
  teacher → student × method.
* ``figures/``: reliability diagrams (one panel per method, per-bin sums pooled over
  seeds — the sums add, so pooling is exact) and ECE vs accuracy per method.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from kdbench.experiments import METHODS, ROLE_FIELDS, record_rows
from kdbench.experiments.teachers import teacher_configs
from kdbench._io import atomic_write, atomic_write_text
from kdbench.experiments.config import stable_hash
from kdbench.sweep.claims import Claims
from kdbench.sweep.store import jsonable, load_records
from kdbench.sweep.suite import Run, Suite

HEADLINE = (
    ("accuracy", "Acc"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("ece", "ECE"),
    ("ece_ts", "ECE (TS)"),
    ("adaptive_ece", "AdaECE"),
    ("aurc", "AURC"),
    ("agreement", "Agree"),
)
# Shown where the dataset has a known Bayes posterior (gaussian): the calibration error
# against the true P(y = pred | x), which the binned estimates only approximate.
TRUE_CE = (("true_ce", "True CE"), ("true_ce_ts", "True CE (TS)"))
BIN_FIELDS = ("bin_count", "bin_conf_sum", "bin_correct_sum")
LEAD = ("dataset", "pair", "teacher", "student", "method", "seed", "role")


def _teacher_kind(run: Run) -> str:
    c = run.config
    spec = METHODS[c.method]
    if spec.ensemble:
        return f"teacher:ensemble{c.ensemble_size}"
    if spec.teacher_smoothing:
        return f"teacher:ls{c.smoothing:g}"
    if spec.same_architecture:
        return "teacher:self"
    return "teacher:ce"


def _teacher_key(run: Run) -> str:
    """What identifies a run's teacher: the hashes of the teacher models it trains or loads."""
    return "+".join(tc.config_hash() for tc in teacher_configs(run.config))


def model_rows(found: list[tuple[Run, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per evaluated model (teachers deduplicated per pair and seed)."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for run, record in found:
        for row in record_rows(record):
            row = {k: v for k, v in row.items() if k not in BIN_FIELDS}
            row["pair"] = run.pair
            if row["role"] == "teacher":
                key = (run.config.dataset, run.pair, _teacher_key(run))
                if key in seen:
                    continue
                seen.add(key)
                row["method"] = _teacher_kind(run)
                row["seed"] = run.config.teacher_seed
            else:
                row["method"] = run.label
            rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    metrics = [f for f in ROLE_FIELDS if f not in BIN_FIELDS]
    rest = sorted({k for r in rows for k in r} - set(LEAD) - set(metrics))
    return list(LEAD) + metrics + rest


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def markdown_tables(suite: Suite, rows: list[dict[str, Any]], missing: int) -> str:
    import pandas as pd
    from tabulate import tabulate

    df = pd.DataFrame(rows)
    out = [f"# Suite `{suite.name}`", ""]
    if suite.description:
        out += [suite.description, ""]
    out += [
        f"Mean ± sample std over seeds ({len(set(df['seed'])) if len(df) else 0} seeds); "
        "ECE: 15 equal-width bins; ECE (TS): after temperature scaling fitted on validation; "
        "AdaECE: 15 equal-mass bins; Agree: top-1 agreement with the teacher; "
        "True CE (datasets with a known Bayes posterior): mean |confidence − P(y = prediction | x)|.",
        "",
    ]
    if missing:
        out += [f"**{missing} of {len(suite.runs)} runs have no record yet: these tables are partial.**", ""]
    order = {label: i for i, label in enumerate(suite.labels)}
    for dataset in suite.datasets:
        part = df[df["dataset"] == dataset] if len(df) else df
        if not len(part):
            continue
        out += [f"## {dataset}", ""]
        columns = HEADLINE + (TRUE_CE if part["true_ce"].notna().any() else ())
        body = []
        pairs = list(dict.fromkeys(part["pair"]))
        for pair in pairs:
            sub = part[part["pair"] == pair]
            groups = list(dict.fromkeys(zip(sub["role"], sub["method"])))
            groups.sort(key=lambda g: (g[0] != "teacher", order.get(g[1], -1), g[1]))
            for role, method in groups:
                g = sub[(sub["role"] == role) & (sub["method"] == method)]
                model = g["teacher"].iloc[0] if role == "teacher" else g["student"].iloc[0]
                body.append(
                    [pair.replace("->", " → "), method, model, len(g)]
                    + [_mean_std(list(g[f])) for f, _ in columns]
                )
        out.append(tabulate(body, headers=["teacher → student", "method", "model", "n"] + [h for _, h in columns],
                            tablefmt="pipe", disable_numparse=True))
        out.append("")
    return "\n".join(out) + "\n"


def _pooled_bins(found: list[tuple[Run, dict[str, Any]]], dataset: str, pair: str) -> dict[str, list[list[float]]]:
    """Per method (and the plain teacher), the per-bin sums added over seeds."""
    pooled: dict[str, list[list[float]]] = {}
    seen: set[str] = set()
    for run, record in found:
        if run.config.dataset != dataset or run.pair != pair:
            continue
        entries = [(run.label, "student")]
        ident = _teacher_key(run)
        if record.get("teacher/bin_count") is not None and _teacher_kind(run) == "teacher:ce" and ident not in seen:
            seen.add(ident)
            entries.append(("teacher", "teacher"))
        for name, role in entries:
            sums = [record.get(f"{role}/{f}") for f in BIN_FIELDS]
            if any(s is None for s in sums):
                continue
            acc = pooled.setdefault(name, [[0.0] * len(sums[0]) for _ in BIN_FIELDS])
            for i, s in enumerate(sums):
                acc[i] = [a + b for a, b in zip(acc[i], s)]
    return pooled


def write_figures(suite: Suite, found: list[tuple[Run, dict[str, Any]]], rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, path: Path) -> None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    for dataset in suite.datasets:
        pairs = list(dict.fromkeys(r.pair for r, _ in found if r.config.dataset == dataset))
        for pair in pairs:
            pooled = _pooled_bins(found, dataset, pair)
            names = [n for n in ["teacher", *suite.labels] if n in pooled]
            if not names:
                continue
            cols = min(len(names), 4)
            nrows = math.ceil(len(names) / cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, 3.3 * nrows), squeeze=False,
                                     layout="constrained")
            for ax in axes.flat[len(names):]:
                ax.axis("off")
            fig.get_layout_engine().set(h_pad=0.08, hspace=0.06)
            for ax, name in zip(axes.flat, names):
                count, conf_sum, correct_sum = pooled[name]
                m = len(count)
                edges = [i / m for i in range(m)]
                acc = [c / n if n else 0.0 for c, n in zip(correct_sum, count)]
                conf = [c / n if n else 0.0 for c, n in zip(conf_sum, count)]
                total = sum(count)
                ece = sum(abs(a - c) * n for a, c, n in zip(acc, conf, count)) / total if total else float("nan")
                ax.bar(edges, acc, width=1 / m, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
                ax.bar(edges, [c - a for a, c in zip(acc, conf)], bottom=acc, width=1 / m, align="edge",
                       color="#dd8452", alpha=0.45, label="gap to confidence")
                ax.plot([0, 1], [0, 1], "k--", lw=0.8)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.set_title(f"{name}\nECE {ece:.3f} (pooled seeds)", fontsize=9)
                ax.set_xlabel("confidence", fontsize=8)
                ax.set_ylabel("accuracy", fontsize=8)
                ax.tick_params(labelsize=7)
            axes.flat[0].legend(fontsize=7, loc="upper left")
            fig.suptitle(f"{suite.name}: {dataset}, {pair.replace('->', ' → ')}", fontsize=10)
            save(fig, out_dir / f"reliability_{dataset}_{pair.replace('->', '_to_')}.png")

        part = [r for r in rows if r["dataset"] == dataset and r.get("accuracy") is not None]
        if not part:
            continue
        fig, ax = plt.subplots(figsize=(6.2, 4.2), layout="constrained")
        methods = list(dict.fromkeys(r["method"] for r in part))
        cmap = plt.get_cmap("tab20")
        for i, method in enumerate(methods):
            pts = [r for r in part if r["method"] == method]
            marker = "*" if method.startswith("teacher") else "o"
            ax.scatter([r["accuracy"] for r in pts], [r["ece"] for r in pts], s=60 if marker == "*" else 28,
                       marker=marker, color=cmap(i % 20), label=method, alpha=0.85, edgecolors="none")
        ax.set_xlabel("test accuracy")
        ax.set_ylabel("test ECE (15 bins)")
        ax.set_title(f"{suite.name}: {dataset} — ECE vs accuracy (one point per model and seed)", fontsize=9)
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        ax.grid(alpha=0.3)
        save(fig, out_dir / f"ece_vs_accuracy_{dataset}.png")
    return written


class NoRecordsError(ValueError):
    """The suite has no trusted record in the results folder: there is nothing to tabulate."""


STAMP = ".kdbench-tables"  # in the suite folder: which records the tables were written from


def write_tables(suite: Suite, results_root: Path, *, figures: bool = True, skip_if_current: bool = False) -> dict[str, Any]:
    """Regenerate results.csv, table.md and figures/ of ``suite`` from its records.

    The tables are written under a claim on the suite folder, so runners that finish
    together write them one after the other.  With ``skip_if_current`` they are not
    rewritten when the last writer used the same records (``info["current"]`` is then
    True): two runners that shared a sweep write its tables once.

    Raises:
        NoRecordsError: no record of the suite under ``results_root``; nothing is written.
    """
    suite_dir = results_root / suite.name
    found, lookups = load_records(suite_dir / "runs", suite.runs)
    if not found:
        raise NoRecordsError(
            f"no records of suite {suite.name!r} in {suite_dir / 'runs'}: run `kdbench run {suite.name}` "
            f"with the same --results-dir first"
        )
    info: dict[str, Any] = {
        "records": len(found),
        "missing": len(lookups),
        "problems": [(str(lk.path), lk.problem) for lk in lookups if lk.problem],
        "figures": [],
        "current": False,
    }
    stamp = stable_hash({"records": [[run.label, jsonable(rec)] for run, rec in found], "figures": figures})
    with Claims(suite_dir).hold("tables", wait=True):
        rows = model_rows(found)
        info["rows"] = len(rows)
        stamp_path = suite_dir / STAMP
        if skip_if_current and stamp_path.is_file() and stamp_path.read_text().strip() == stamp \
                and (suite_dir / "table.md").is_file():
            info["current"] = True
            return info
        write_csv(rows, suite_dir / "results.csv")
        atomic_write_text(suite_dir / "table.md", markdown_tables(suite, rows, len(lookups)))
        if figures:
            info["figures"] = [str(p) for p in write_figures(suite, found, rows, suite_dir / "figures")]
        atomic_write_text(stamp_path, stamp + "\n")
    return info
