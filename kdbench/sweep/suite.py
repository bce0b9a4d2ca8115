"""Benchmark suites: TOML files that describe a grid of experiments.

A suite is data, never code.  The format::

    [suite]
    name = "quick"                    # optional; defaults to the file's stem
    description = "..."
    seeds = [0, 1]                    # student (and teacher) seeds

    [defaults]                        # RunConfig fields applied to every run (optional)
    data_seed = 0

    [[dataset]]                       # one table per dataset
    name = "mnist1d"
    pairs = [{ teacher = "cnn1d_64", student = "cnn1d" }]
    student_recipe = { steps = 1500 } # any other key: a RunConfig field for this dataset

    [[method]]                        # one table per method variant
    method = "kd"
    label = "kd_T2"                   # optional; defaults to the method name; unique
    temperature = 2.0                 # any other key: a RunConfig field for this variant
    datasets = ["mnist1d"]            # optional: run this variant on these datasets only

The grid is datasets x pairs x methods x seeds.  ``self_distill`` distils the pair's
student architecture into itself (its teacher is the student's architecture).
Every run is validated as a :class:`~kdbench.experiments.RunConfig` when the suite
is loaded, and every error names the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kdbench.experiments import RunConfig

SUITE_KEYS = {"name", "description", "seeds"}
TOP_KEYS = {"suite", "defaults", "dataset", "method"}
# RunConfig fields the grid itself sets: a suite may not override them in [defaults] or [[method]].
GRID_FIELDS = {"dataset", "teacher", "student", "seed"}
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


# RunConfig fields that a suite spells differently: (table, field) -> the suite's key.
_SUITE_KEY = {("dataset", "dataset"): "name", ("dataset", "student"): "pairs", ("dataset", "teacher"): "pairs"}


class SuiteError(ValueError):
    """A suite file is malformed; the message starts with ``file:line: key:``."""


@dataclass(frozen=True)
class Run:
    """One cell of the grid: the experiment and the method label the tables show."""

    label: str
    config: RunConfig
    pair: str  # "teacher->student" as the suite names it (self_distill's config teacher is the student)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    path: str
    runs: tuple[Run, ...]
    datasets: tuple[str, ...]
    labels: tuple[str, ...]  # method labels, in the file's order


class _Locator:
    """Maps (table, index, key) to a line of the TOML text, for error messages."""

    _header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _scan(self):
        """Each line as (number, text, header name or None, current table, its index among same-named tables)."""
        current, count = None, {}
        for no, raw in enumerate(self.lines, start=1):
            m = self._header.match(raw)
            if m:
                current = m.group(2)
                count[current] = count.get(current, -1) + 1
            yield no, raw, (m.group(2) if m else None), current, count.get(current)

    def _inside(self, current: str | None, at: int | None, table: str | None, index: int | None) -> bool:
        return current == table and (index is None or at == index)

    def line(self, table: str | None, index: int | None = None, key: str | None = None) -> int:
        best = 1
        for no, raw, header, current, at in self._scan():
            if header is not None:
                if self._inside(current, at, table, index):
                    best = no
                if table is None and key == header:
                    return no
            elif self._inside(current, at, table, index) and key is not None:
                if re.match(rf"^\s*{re.escape(key)}\s*=", raw):
                    return no
        return best

    def keys(self, table: str, index: int | None) -> set[str]:
        """The keys set directly in that table."""
        found = set()
        for _, raw, header, current, at in self._scan():
            if header is None and self._inside(current, at, table, index):
                k = re.match(r"^\s*([A-Za-z0-9_\-]+)\s*=", raw)
                if k:
                    found.add(k.group(1))
        return found

    def error(self, table: str | None, index: int | None, key: str, message: str) -> SuiteError:
        top = key.split(".")[0] if key else None
        no = self.line(table, index, _SUITE_KEY.get((table, top), top))
        return SuiteError(f"{self.path}:{no}: {key}: {message}")


def _mapping(loc: _Locator, table: str, index: int | None, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        where = f"[[{table}]]" if index is not None else f"[{table}]"
        raise loc.error(None, None, table, f"expected a table {where}, got {type(value).__name__}")
    return value


def _unknown(loc: _Locator, table: str | None, index: int | None, data: Mapping[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise loc.error(table, index, key, f"unknown key; expected one of {', '.join(sorted(allowed))}")


def _config(loc: _Locator, fields: dict[str, Any], sources: list[tuple[str, int | None]]) -> RunConfig:
    """Build a RunConfig, turning its field error into one that names where the field was set."""
    try:
        return RunConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        key = message.split(":", 1)[0].strip()
        text = message.split(":", 1)[1].strip() if ":" in message else message
        top = key.split(".")[0]
        for table, index in sources:  # the most specific table that set this key
            if _SUITE_KEY.get((table, top), top) in loc.keys(table, index):
                raise loc.error(table, index, key, text) from None
        raise loc.error(*sources[0], key, text) from None


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; every run is a validated RunConfig."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the suite file ({exc.strerror})") from None
    loc = _Locator(str(path), text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: invalid TOML: {exc}") from None
    _unknown(loc, None, None, data, TOP_KEYS)

    head = _mapping(loc, "suite", None, data.get("suite", {}))
    _unknown(loc, "suite", None, head, SUITE_KEYS)
    name = head.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise loc.error("suite", None, "name", f"expected letters, digits, '_' or '-', got {name!r}")
    description = head.get("description", "")
    if not isinstance(description, str):
        raise loc.error("suite", None, "description", f"expected a string, got {type(description).__name__}")
    seeds = head.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise loc.error("suite", None, "seeds", f"expected a non-empty list of distinct ints >= 0, got {seeds!r}")

    defaults = dict(_mapping(loc, "defaults", None, data.get("defaults", {})))
    _unknown(loc, "defaults", None, defaults, RUN_FIELDS - GRID_FIELDS - {"method"})

    datasets = data.get("dataset")
    if not isinstance(datasets, list) or not datasets:
        raise loc.error(None, None, "dataset", "expected at least one [[dataset]] table")
    methods = data.get("method")
    if not isinstance(methods, list) or not methods:
        raise loc.error(None, None, "method", "expected at least one [[method]] table")

    method_entries: list[tuple[str, dict[str, Any]]] = []
    method_only: list[frozenset[str] | None] = []  # a method's `datasets`: the only datasets it runs on
    for i, entry in enumerate(methods):
        entry = dict(_mapping(loc, "method", i, entry))
        _unknown(loc, "method", i, entry, (RUN_FIELDS - GRID_FIELDS) | {"label", "datasets"})
        if "method" not in entry:
            raise loc.error("method", i, "method", "missing (each [[method]] names one)")
        label = entry.pop("label", entry["method"])
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.\-=]+", label):
            raise loc.error("method", i, "label", f"expected a short name (letters, digits, _ . - =), got {label!r}")
        if label in [m[0] for m in method_entries]:
            raise loc.error("method", i, "label", f"{label!r} is used by an earlier [[method]]; labels must be unique")
        only = entry.pop("datasets", None)
        if only is not None:
            declared = [d.get("name") for d in datasets if isinstance(d, Mapping)]
            if not isinstance(only, list) or not only or not all(isinstance(x, str) for x in only):
                raise loc.error("method", i, "datasets", f"expected a non-empty list of dataset names, got {only!r}")
            for x in only:
                if x not in declared:
                    raise loc.error(
                        "method", i, "datasets",
                        f"{x!r} is not a [[dataset]] of this suite; expected some of {', '.join(map(str, declared))}",
                    )
        method_entries.append((label, entry))
        method_only.append(None if only is None else frozenset(only))

    runs: list[Run] = []
    dataset_names: list[str] = []
    seen: dict[str, str] = {}
    for d, entry in enumerate(datasets):
        entry = dict(_mapping(loc, "dataset", d, entry))
        _unknown(loc, "dataset", d, entry, (RUN_FIELDS - GRID_FIELDS - {"method"}) | {"name", "pairs"})
        ds = entry.pop("name", None)
        if not isinstance(ds, str):
            raise loc.error("dataset", d, "name", f"expected a dataset name, got {ds!r}")
        if ds in dataset_names:
            raise loc.error("dataset", d, "name", f"{ds!r} appears twice; put all its pairs in one [[dataset]]")
        dataset_names.append(ds)
        pairs = entry.pop("pairs", None)
        if not isinstance(pairs, list) or not pairs:
            raise loc.error("dataset", d, "pairs", "expected a non-empty list of {teacher = ..., student = ...}")
        for p in pairs:
            if not isinstance(p, Mapping) or set(p) != {"teacher", "student"}:
                raise loc.error("dataset", d, "pairs", f"expected {{teacher = ..., student = ...}}, got {p!r}")
        for pair in pairs:
            for (label, m_entry), only in zip(method_entries, method_only):
                if only is not None and ds not in only:
                    continue
                for seed in seeds:
                    fields = {**defaults, **entry, **m_entry, "dataset": ds, "student": pair["student"], "seed": seed}
                    fields["teacher"] = pair["student"] if m_entry["method"] == "self_distill" else pair["teacher"]
                    sources = [("method", method_entries.index((label, m_entry))), ("dataset", d), ("defaults", None)]
                    cfg = _config(loc, fields, sources)
                    key = cfg.config_hash()
                    if key in seen:
                        raise loc.error(
                            "method", sources[0][1], "label",
                            f"{label!r} runs the same experiment as {seen[key]!r} on {ds} "
                            f"{pair['teacher']} -> {pair['student']}: remove one",
                        )
                    seen[key] = label
                    runs.append(Run(label, cfg, f"{pair['teacher']}->{pair['student']}"))
    return Suite(
        name=name,
        description=description,
        path=str(path),
        runs=tuple(runs),
        datasets=tuple(dataset_names),
        labels=tuple(label for label, _ in method_entries),
    )


def suite_dirs() -> list[Path]:
    """Where suite names are looked up: ./suites (a user's own), then the suites shipped in kdbench/suites/."""
    here = Path(__file__).resolve().parents[1] / "suites"
    dirs = [Path.cwd() / "suites"]
    if here not in dirs:
        dirs.append(here)
    return dirs


def resolve_suite(name_or_path: str) -> Path:
    """A path to a .toml file, or the name of a shipped suite (``quick`` -> kdbench/suites/quick.toml)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise SuiteError(f"suite: no such file {p}")
        return p
    for d in suite_dirs():
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({f.stem for d in suite_dirs() if d.is_dir() for f in d.glob("*.toml")})
    raise SuiteError(f"suite: unknown suite {name_or_path!r}; expected a .toml path or one of {', '.join(known)}")
