"""Run records on disk: one JSON file per finished run, written atomically.

A record is found by its *key*: a hash of the run's full configuration
(:meth:`RunConfig.config_hash`) and :data:`ENGINE_VERSION`.  A file is trusted only
if it parses, carries the same key, the same configuration and the same engine
version; anything else (a partial write from a crash, a hand edit, a record of an
older configuration) is reported by path and recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench._io import atomic_write_text
from kdbench.experiments.config import RunConfig, stable_hash
from kdbench.sweep.suite import Run

# Bump when a change to the experiment engine changes any number a run produces:
# every stored record then becomes stale and is recomputed.
ENGINE_VERSION = "1"


def run_key(config: RunConfig) -> str:
    return stable_hash({"config": config.config_hash(), "engine": ENGINE_VERSION})


def record_path(runs_dir: Path, run: Run) -> Path:
    c = run.config
    return runs_dir / f"{c.dataset}__{c.student}__{run.label}__s{c.seed}__{run_key(c)}.json"


def jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: store them as strings that ``_restore`` turns back."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _restore(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def write_record(runs_dir: Path, run: Run, record: dict[str, Any]) -> Path:
    path = record_path(runs_dir, run)
    payload = {
        "key": run_key(run.config),
        "engine_version": ENGINE_VERSION,
        "label": run.label,
        "config": run.config.to_dict(),
        "record": record,
    }
    atomic_write_text(path, json.dumps(jsonable(payload), indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


@dataclass(frozen=True)
class Lookup:
    """What is on disk for one run: a trusted record, or why there is none."""

    path: Path
    record: dict[str, Any] | None
    problem: str | None  # None when absent or valid


def read_record(runs_dir: Path, run: Run) -> Lookup:
    path = record_path(runs_dir, run)
    if not path.exists():
        return Lookup(path, None, None)
    try:
        payload = _restore(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Lookup(path, None, f"unreadable ({exc.__class__.__name__}: {exc})")
    if not isinstance(payload, dict) or not isinstance(payload.get("record"), dict):
        return Lookup(path, None, "not a run record")
    if payload.get("key") != run_key(run.config) or payload.get("engine_version") != ENGINE_VERSION:
        return Lookup(path, None, "key or engine version differs from the current configuration")
    if payload.get("config") != _restore(json.loads(json.dumps(jsonable(run.config.to_dict())))):
        return Lookup(path, None, "configuration differs from the current one")
    record = payload["record"]
    if record.get("config_hash") != run.config.config_hash():
        return Lookup(path, None, "record's config_hash differs from its configuration")
    return Lookup(path, record, None)


def load_records(runs_dir: Path, runs: tuple[Run, ...]) -> tuple[list[tuple[Run, dict[str, Any]]], list[Lookup]]:
    """Trusted records of ``runs`` (in grid order) and the lookups that found none or a bad one."""
    found, missing = [], []
    for run in runs:
        lookup = read_record(runs_dir, run)
        if lookup.record is not None:
            found.append((run, lookup.record))
        else:
            missing.append(lookup)
    return found, missing
