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
from kdbench._io import atomic_write_text
from kdbench.experiments.config import stable_hash
from kdbench.sweep.claims import Claims
from kdbench.sweep.figures import write_figures
from kdbench.sweep.store import jsonable, load_records
from kdbench.sweep.suite import Run, Suite
from kdbench.sweep.verdicts import (
    CLAIM_COLUMNS,
    VERDICTS,
    Verdict,
    claims_markdown,
    evaluate_claims,
    fmt_interval,
    paired_interval,
    summary_lines,
    update_narrative,
)

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
# Language datasets (hmm_v<V>, ginc_v<V>): token-level metrics against the true next-token distribution.
LM_HEADLINE = (
    ("accuracy", "Acc"),
    ("nll", "NLL"),
    ("excess_nll", "NLL − floor"),
    ("ece", "ECE"),
    ("ece_ts", "ECE (TS)"),
    ("true_ce", "True CE"),
    ("true_kl", "KL(truth ‖ model)"),
    ("agreement", "Agree"),
    ("train_tokens_per_second", "tokens/s"),
)
DIGITS = {"train_tokens_per_second": 0}
HIGHER_IS_BETTER = {"accuracy", "agreement", "train_tokens_per_second"}  # every other column: lower is better
DELTAS = (("accuracy", "Acc"), ("nll", "NLL"), ("ece", "ECE"))  # columns with a paired difference against ce
ROLE_ORDER = {"bayes": -1, "teacher": 0, "student": 1}  # reference rows first
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
    """One row per evaluated model (teachers and the Bayes reference deduplicated per pair and seed)."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for run, record in found:
        for row in record_rows(record):
            row = {k: v for k, v in row.items() if k not in BIN_FIELDS}
            row["pair"] = run.pair
            if row["role"] == "bayes":
                # The same reference in every run of a (dataset, seed): keep one.
                key = (run.config.dataset, run.pair, "bayes", str(run.config.seed))
                if key in seen:
                    continue
                seen.add(key)
            elif row["role"] == "teacher":
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
    from kdbench.experiments.lm import LM_ROLE_FIELDS

    present = {k for r in rows for k in r}
    metrics = [f for f in dict.fromkeys(ROLE_FIELDS + LM_ROLE_FIELDS) if f not in BIN_FIELDS and f in present]
    rest = sorted({k for r in rows for k in r} - set(LEAD) - set(metrics))
    return list(LEAD) + metrics + rest


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or _columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _clean(values: Any) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _mean_std(values: list[float], digits: int = 4) -> str:
    vals = _clean(values)
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta_vs_ce(g: Any, base: Any, field: str) -> str:
    """Mean paired difference (same seed) of ``field`` against the pair's ``ce`` students, with its 95% interval."""
    ref = {seed: v for seed, v in zip(base["seed"], base[field]) if _clean([v])}
    diffs = [v - ref[seed] for seed, v in zip(g["seed"], g[field]) if _clean([v]) and seed in ref]
    if len(diffs) < 2:
        return "–"
    return fmt_interval(*paired_interval(diffs), digits=3)


def _mark_best(body: list[list[str]], students: list[int], columns: tuple[tuple[str, str], ...], first: int) -> None:
    """Bold the best student mean of each metric column (within one teacher → student pair)."""
    for j, (field, _) in enumerate(columns):
        sign = 1 if field in HIGHER_IS_BETTER else -1
        means = [(float(body[i][first + j].split(" ")[0]), i) for i in students if body[i][first + j] != "–"]
        if not means:
            continue
        best = max(sign * m for m, _ in means)
        for m, i in means:
            if sign * m == best:
                body[i][first + j] = f"**{body[i][first + j]}**"


def markdown_tables(suite: Suite, rows: list[dict[str, Any]], missing: int,
                    verdicts: list[Verdict] | None = None) -> str:
    import pandas as pd
    from tabulate import tabulate

    df = pd.DataFrame(rows)
    out = [f"# Suite `{suite.name}`", ""]
    summary = summary_lines(verdicts or [])
    if summary:
        out += ["What these runs say about the claims tested in `claims.md` (paired differences over seeds, 95% "
                "intervals; every comparison, including the inconclusive ones, is there):", "", *summary, ""]
    if suite.description:
        out += [suite.description, ""]
    out += [
        f"Mean ± sample std over seeds ({len(set(df['seed'])) if len(df) else 0} seeds); "
        "ECE: 15 equal-width bins; ECE (TS): after temperature scaling fitted on validation; "
        "AdaECE: 15 equal-mass bins; Agree: top-1 agreement with the teacher; "
        "True CE (datasets with a known Bayes posterior): mean |confidence − P(y = prediction | x)|. "
        "Δ vs ce: mean difference from the `ce` student of the same pair at the same seed, with its 95% "
        "paired-t interval. **Bold**: the best student mean of the column within its teacher → student pair.",
        "",
    ]
    if missing:
        out += [f"**{missing} of {len(suite.runs)} runs have no record yet: these tables are partial.**", ""]
    order = {label: i for i, label in enumerate(suite.labels)}
    base_label = "ce" if "ce" in order else None
    for dataset in suite.datasets:
        part = df[df["dataset"] == dataset] if len(df) else df
        if not len(part):
            continue
        out += [f"## {dataset}", ""]
        if "excess_nll" in part and part["excess_nll"].notna().any():
            columns = LM_HEADLINE
            out += ["Token-level, over every scored test position. NLL − floor: the NLL above the entropy of the "
                    "true next-token distribution; True CE: mean |confidence − P(top-1 token | context)|; "
                    "KL(truth ‖ model): exact, from the forward algorithm; tokens/s: training throughput "
                    "(scored positions). `bayes_optimal` is the true distribution itself.", ""]
        else:
            columns = HEADLINE + (TRUE_CE if "true_ce" in part and part["true_ce"].notna().any() else ())
        body: list[list[str]] = []
        pairs = list(dict.fromkeys(part["pair"]))
        for pair in pairs:
            sub = part[part["pair"] == pair]
            base = sub[(sub["role"] == "student") & (sub["method"] == base_label)]
            groups = list(dict.fromkeys(zip(sub["role"], sub["method"])))
            groups.sort(key=lambda g: (ROLE_ORDER.get(g[0], 1), order.get(g[1], -1), g[1]))
            students = []
            for role, method in groups:
                g = sub[(sub["role"] == role) & (sub["method"] == method)]
                model = {"teacher": g["teacher"].iloc[0], "student": g["student"].iloc[0]}.get(role, "–")
                deltas = [("–" if role != "student" or method == base_label or not len(base)
                           else _delta_vs_ce(g, base, f)) for f, _ in DELTAS]
                if role == "student":
                    students.append(len(body))
                body.append([pair.replace("->", " → "), method, model, str(len(g))]
                            + [_mean_std(list(g[f]), DIGITS.get(f, 4)) for f, _ in columns] + deltas)
            _mark_best(body, students, columns, first=4)
        headers = (["teacher → student", "method", "model", "n"] + [h for _, h in columns]
                   + [f"Δ{h} vs ce" for _, h in DELTAS])
        out.append(tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True))
        out.append("")
    return "\n".join(out) + "\n"


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
        verdicts = evaluate_claims(rows, {run.label: run.config.method for run in suite.runs})
        write_csv(rows, suite_dir / "results.csv")
        atomic_write_text(suite_dir / "table.md", markdown_tables(suite, rows, len(lookups), verdicts))
        atomic_write_text(suite_dir / "claims.md", claims_markdown(suite.name, verdicts))
        write_csv([v.as_row() for v in verdicts], suite_dir / "claims.csv", columns=CLAIM_COLUMNS)
        info["narrative"] = update_narrative(results_root / "README.md", suite.name, verdicts)
        info["claims"] = {name: sum(v.verdict == name for v in verdicts) for name in VERDICTS}
        if figures:
            info["figures"] = [str(p) for p in write_figures(suite, found, rows, suite_dir / "figures")]
        atomic_write_text(stamp_path, stamp + "\n")
    return info
