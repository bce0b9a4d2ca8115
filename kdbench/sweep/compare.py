"""How a fresh sweep compares with a reference one (by default the committed ``results/``).

Runs are matched by their record key (a hash of the full configuration and the engine
version), so only records of the same experiment are compared.  Every metric of the
student and of the teacher is compared except timings (``train_seconds``,
``train_samples_per_second``), which no two machines share.  Training is chaotic: on
other hardware, or with another torch build, a model's metrics can move by more than
their rounding, so a difference is a reason to look at the spread over seeds, not
by itself a failure.  The comparison therefore also asks, per cell of the table (a
dataset, teacher -> student pair and method), whether the mean over seeds of each
headline metric differs from the reference's by more than the seeds' spread explains
(Welch's t test at the 5% level; with many cells a few such differences are expected
by chance, and the summary says how many).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.sweep.store import read_record
from kdbench.sweep.suite import Suite

HEADLINE = ("accuracy", "ece", "nll")  # the metrics named in the summary line
_TIMINGS = ("train_seconds", "train_samples_per_second")


def default_reference_root() -> Path | None:
    """``results/`` beside the package source (a clone or an editable install), or None."""
    root = Path(__file__).resolve().parents[2] / "results"
    return root if root.is_dir() else None


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in record.items():
        model, _, name = key.partition("/")
        if model not in ("student", "teacher") or not name or name in _TIMINGS:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


@dataclass(frozen=True)
class Comparison:
    """A fresh sweep against a reference sweep of the same suite."""

    reference: Path  # the reference suite folder, e.g. results/quick
    runs: int  # runs of the suite with a record in the fresh folder
    compared: int  # ... of which the reference has a record of the same key
    identical: int  # ... whose every compared metric is equal
    largest: dict[str, float]  # headline metric -> largest |difference| of the students
    largest_any: tuple[str, float] | None  # the largest |difference| of any compared metric
    table_identical: bool | None  # table.md byte for byte; None when either is missing
    tested: int = 0  # (cell, headline metric) means compared over >= 2 seeds on both sides
    differing: int = 0  # ... of which differ at the 5% level (Welch's t test)

    def summary(self) -> str:
        """One line, e.g. "reproduced 48/48 runs of results/quick; largest |Δ| accuracy 0, ECE 0, NLL 0"."""
        if not self.compared:
            return f"none of the {self.runs} runs has a record in {self.reference} to compare with"
        parts = ", ".join(f"{name.upper() if name != 'accuracy' else name} {self.largest[name]:.4g}"
                          for name in HEADLINE)
        line = (f"reproduced {self.identical}/{self.compared} runs of {self.reference} exactly; "
                f"largest student |Δ| {parts}")
        if self.runs > self.compared:
            line += f"; {self.runs - self.compared} runs have no reference record"
        if self.tested and self.identical < self.compared:
            line += (f"; seed means: {self.differing} of {self.tested} (cell, metric) pairs differ at the 5% level "
                     f"(about {0.05 * self.tested:.1f} expected by chance)")
        if self.table_identical is not None:
            line += "; table.md " + ("identical" if self.table_identical else "differs")
        return line


def compare_sweeps(suite: Suite, fresh_root: Path, reference_root: Path) -> Comparison:
    """Compare the records (and table.md) of ``suite`` under two results folders."""
    fresh_dir, ref_dir = Path(fresh_root) / suite.name, Path(reference_root) / suite.name
    runs = compared = identical = 0
    largest = {name: 0.0 for name in HEADLINE}
    largest_any: tuple[str, float] | None = None
    cells: dict[tuple[str, str, str, str], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for run in suite.runs:
        mine = read_record(fresh_dir / "runs", run).record
        if mine is None:
            continue
        runs += 1
        theirs = read_record(ref_dir / "runs", run).record
        if theirs is None:
            continue
        compared += 1
        a, b = _metrics(mine), _metrics(theirs)
        same = a.keys() == b.keys()
        for key in a.keys() & b.keys():
            d = _diff(a[key], b[key])
            same = same and d == 0.0
            if largest_any is None or d > largest_any[1]:
                largest_any = (key, d)
            model, _, name = key.partition("/")
            if model == "student" and name in largest:
                largest[name] = max(largest[name], d)
        identical += same
        for name in HEADLINE:
            key = f"student/{name}"
            if key in a and key in b:
                fresh, ref = cells[(run.config.dataset, run.pair, run.label, name)]
                fresh.append(a[key])
                ref.append(b[key])
    table_a, table_b = fresh_dir / "table.md", ref_dir / "table.md"
    table_same = table_a.read_bytes() == table_b.read_bytes() if table_a.is_file() and table_b.is_file() else None
    tested = differing = 0
    for fresh, ref in cells.values():
        if len(fresh) >= 2:
            tested += 1
            differing += _welch_p(fresh, ref) < 0.05
    return Comparison(ref_dir, runs, compared, identical, largest, largest_any, table_same, tested, differing)


def _welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p value of Welch's t test of equal means (1.0 when both sides are constant and equal)."""
    import warnings

    from scipy import stats

    if len(set(a)) == 1 and len(set(b)) == 1:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():
        # Nearly equal samples trip scipy's precision warning; the p value is still right.
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return 1.0 if math.isnan(p) else float(p)
