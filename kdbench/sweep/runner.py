"""The resumable sweep: run every cell of a suite that has no trusted record.

Order of work, on one process or sharded over ``torchrun`` ranks:

1. find the runs without a trusted record (``force`` recomputes all; a corrupt or
   stale record is reported by path and recomputed alone);
2. train each distinct teacher once (teachers are sharded over ranks, then a barrier),
   so no two ranks train the same teacher and every run finds its teacher cached;
3. run the students, rank r taking runs r, r + W, r + 2W, ... and writing each record
   atomically as soon as it finishes: a crash or Ctrl-C loses only the run in flight;
4. a final barrier, after which rank 0 may write the tables.

Teachers and runs are claimed before they are computed (:mod:`kdbench.sweep.claims`),
so separate runners on one results folder share the work instead of repeating it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from kdbench.experiments import load_config_dataset, run_experiment
from kdbench.experiments.config import check_runnable
from kdbench.experiments.teachers import TeacherConfig, get_teacher, teacher_configs
from kdbench.experiments.train import deterministic
from kdbench.sweep.claims import Claims
from kdbench.sweep.store import read_record, record_path, write_record
from kdbench.sweep.suite import Run, Suite

Say = Callable[[str], None]


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def init_distributed() -> Dist:
    """Join the torchrun job described by the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # Runs take minutes to hours; the default 30-minute collective timeout would
        # kill a rank that simply finished its share first.
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(hours=48))
    return Dist(rank, world, local)


class DeviceError(ValueError):
    """``device`` names no device this torch build can use."""


def check_device(device: str) -> str:
    """Validate ``--device`` before anything starts: "auto", or a device torch has and can use here.

    Returns the normalised name ("auto", "cpu", "cuda", "cuda:1", "mps", ...).

    Raises:
        DeviceError: one line naming the value and what was expected.
    """
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"device: unknown device {device!r}; expected auto, cpu, cuda, cuda:N or another device type of torch"
        ) from None
    if dev.type == "cpu":
        return str(dev)
    module = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    is_available = getattr(module, "is_available", None)
    if is_available is None or not is_available():
        build = f"this torch build ({torch.__version__})"
        raise DeviceError(f"device: {device!r} is not available to {build}; expected auto or cpu")
    count = getattr(module, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise DeviceError(f"device: {device!r} does not exist; this machine has {count()} {dev.type} device(s)")
    return str(dev)


def check_runnable_suite(suite: Suite) -> None:
    """Check, before anything starts, that every dataset of ``suite`` can be read on this machine.

    Raises:
        FileNotFoundError: naming ``data_dir`` and the missing files (see :func:`check_runnable`).
    """
    seen = set()
    for run in suite.runs:
        key = (run.config.dataset, run.config.data_dir)
        if key not in seen:
            seen.add(key)
            check_runnable(run.config)


def _device_for(dist: Dist, device: str) -> str:
    if device == "auto" and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return "cpu" if device == "auto" else device


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already had a trusted record when the sweep started
    ran: int  # computed by this process
    recomputed: list[str] = field(default_factory=list)  # paths of corrupt/stale records
    seconds: float = 0.0
    by_others: int = 0  # recorded meanwhile by another runner on the same folder


class ProgressBar:
    """One line per finished run: a bar, counts, elapsed time and ETA."""

    def __init__(self, total: int, say: Say, width: int = 24) -> None:
        self.total, self.say, self.width = total, say, width
        self.done = 0
        self.start = time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        self.say(
            f"[{bar}] {self.done}/{self.total} elapsed {_fmt(elapsed)} ETA {_fmt(eta)}  {text}"
        )


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _distinct_teachers(runs: list[Run]) -> list[tuple[TeacherConfig, Run]]:
    seen: dict[str, tuple[TeacherConfig, Run]] = {}
    for run in runs:
        for tc in teacher_configs(run.config):
            seen.setdefault(tc.config_hash(), (tc, run))
    return list(seen.values())


def _teachers(
    todo: list[Run], dist: Dist, claims: Claims, *, cache_dir: Path, dev: str, num_threads: int,
    say: Say, tag: str, detail: Say | None,
) -> None:
    """Make sure every teacher of ``todo`` is cached: train this rank's share, unless another runner is at it."""
    mine = _distinct_teachers(todo)[dist.rank :: dist.world_size]
    for attempt in ("free", "wait"):
        left = []
        for tc, run in mine:
            # Waiting on a teacher another runner is training costs nothing: once its
            # claim is free the checkpoint is in the cache and get_teacher loads it.
            with claims.hold(tc.filename(), wait=attempt == "wait") as claim:
                if claim is None:
                    left.append((tc, run))
                    continue
                data = load_config_dataset(run.config)
                t0 = time.monotonic()
                with deterministic(num_threads):
                    teacher = get_teacher(tc, data, cache_dir=cache_dir, device=dev, progress=detail)
            how = "cached" if teacher.cached else f"trained in {_fmt(time.monotonic() - t0)}"
            say(f"{tag}teacher: {tc.dataset} {tc.model} seed {tc.seed}"
                + (f" smoothing {tc.smoothing}" if tc.smoothing else "") + f" ({how})")
        if left and attempt == "free":
            say(f"{tag}waiting for {len(left)} teacher(s) that another runner is training")
        mine = left


def _file_id(path: Path) -> tuple[int, int] | None:
    """(inode, mtime): every atomic write makes a new inode, so a rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _recorded_meanwhile(runs_dir: Path, run: Run, seen: tuple[int, int] | None, force: bool) -> bool:
    """Whether ``run`` now has a trusted record that makes computing it redundant.

    Without ``force`` any trusted record does; with it, only one written since the
    sweep looked (``seen``), i.e. by another runner during this sweep.
    """
    lookup = read_record(runs_dir, run)
    if lookup.record is None:
        return False
    return not force or _file_id(lookup.path) != seen


def run_suite(
    suite: Suite,
    *,
    results_root: Path,
    cache_dir: Path,
    force: bool = False,
    device: str = "auto",
    num_threads: int = 1,
    dist: Dist | None = None,
    say: Say | None = None,
    verbose: bool = False,
    poll_seconds: float = 2.0,
) -> SweepSummary:
    """Run the suite's missing cells; see the module docstring for the order of work.

    Several runners (separate processes, or separate torchrun jobs) may share
    ``results_root``: each claims a run before computing it (:mod:`kdbench.sweep.claims`),
    skips runs another runner holds, and at the end waits for those to be recorded,
    taking over any whose runner died.  No run is computed twice.
    """
    dist = dist or Dist()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    tag = f"[rank {dist.rank}] " if dist.active else ""
    runs_dir = results_root / suite.name / "runs"
    start = time.monotonic()

    todo: list[Run] = []
    recomputed: list[str] = []
    seen: dict[Path, tuple[int, int] | None] = {}
    for run in suite.runs:
        lookup = read_record(runs_dir, run)
        seen[lookup.path] = _file_id(lookup.path)
        if lookup.problem is not None:
            recomputed.append(str(lookup.path))
            if dist.rank == 0:
                say(f"{tag}recomputing {lookup.path}: {lookup.problem}")
        if force or lookup.record is None:
            todo.append(run)
    skipped = len(suite.runs) - len(todo)
    if dist.rank == 0:
        say(f"{tag}suite {suite.name}: {len(suite.runs)} runs, {skipped} already recorded, {len(todo)} to run"
            + (f" on {dist.world_size} ranks" if dist.active else ""))

    dev = _device_for(dist, device)
    detail = (lambda line: say(tag + line)) if verbose else None
    _teachers(todo, dist, Claims(cache_dir), cache_dir=cache_dir, dev=dev, num_threads=num_threads,
              say=say, tag=tag, detail=detail)
    dist.barrier()

    claims = Claims(runs_dir)
    pending = todo[dist.rank :: dist.world_size]
    bar = ProgressBar(len(pending), lambda line: say(tag + line))
    ran = by_others = 0
    waiting_said = False
    while pending:
        left = []
        for run in pending:
            path = record_path(runs_dir, run)
            with claims.hold(path.name) as claim:
                if claim is None:
                    left.append(run)
                    continue
                if _recorded_meanwhile(runs_dir, run, seen[path], force):
                    by_others += 1
                    bar.step(f"{run.config.dataset} {run.label} seed {run.config.seed}: recorded by another runner")
                    continue
                record = run_experiment(run.config, cache_dir=str(cache_dir), device=dev,
                                        num_threads=num_threads, progress=detail)
                write_record(runs_dir, run, record)
            ran += 1
            c = run.config
            bar.step(
                f"{c.dataset} {run.label} {c.teacher or '-'}->{c.student} seed {c.seed}: "
                f"acc {record['student/accuracy']:.4f} ECE {record['student/ece']:.4f}"
            )
        pending = left
        if pending:
            # Held by another runner: wait for its records, or for its claims to
            # fall free (it died) and compute those runs here.
            if not waiting_said:
                say(f"{tag}waiting for {len(pending)} run(s) that another runner is computing")
                waiting_said = True
            time.sleep(poll_seconds)
    dist.barrier()
    return SweepSummary(len(suite.runs), skipped, ran, recomputed, time.monotonic() - start, by_others)
