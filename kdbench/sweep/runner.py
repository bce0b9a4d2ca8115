"""The resumable sweep: run every cell of a suite that has no trusted record.

Order of work, on one process or sharded over ``torchrun`` ranks:

1. find the runs without a trusted record (``force`` recomputes all; a corrupt or
   stale record is reported by path and recomputed alone);
2. train each distinct teacher once (teachers are sharded over ranks, then a barrier),
   so no two ranks train the same teacher and every run finds its teacher cached;
3. run the students, rank r taking runs r, r + W, r + 2W, ... and writing each record
   atomically as soon as it finishes: a crash or Ctrl-C loses only the run in flight;
4. a final barrier, after which rank 0 may write the tables.
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
from kdbench.experiments.teachers import TeacherConfig, get_teacher, teacher_configs
from kdbench.experiments.train import deterministic
from kdbench.sweep.store import read_record, write_record
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


def _device_for(dist: Dist, device: str) -> str:
    if device == "auto" and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return "cpu" if device == "auto" else device


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already had a trusted record
    ran: int  # by this rank
    recomputed: list[str] = field(default_factory=list)  # paths of corrupt/stale records
    seconds: float = 0.0


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
) -> SweepSummary:
    """Run the suite's missing cells; see the module docstring for the order of work."""
    dist = dist or Dist()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    tag = f"[rank {dist.rank}] " if dist.active else ""
    runs_dir = results_root / suite.name / "runs"
    start = time.monotonic()

    todo: list[Run] = []
    recomputed: list[str] = []
    for run in suite.runs:
        lookup = read_record(runs_dir, run)
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
    teachers = _distinct_teachers(todo)[dist.rank :: dist.world_size]
    for i, (tc, run) in enumerate(teachers, start=1):
        data = load_config_dataset(run.config)
        t0 = time.monotonic()
        with deterministic(num_threads):
            teacher = get_teacher(tc, data, cache_dir=cache_dir, device=dev, progress=detail)
        how = "cached" if teacher.cached else f"trained in {_fmt(time.monotonic() - t0)}"
        say(f"{tag}teacher {i}/{len(teachers)}: {tc.dataset} {tc.model} seed {tc.seed}"
            + (f" smoothing {tc.smoothing}" if tc.smoothing else "") + f" ({how})")
    dist.barrier()

    mine = todo[dist.rank :: dist.world_size]
    bar = ProgressBar(len(mine), lambda line: say(tag + line))
    for run in mine:
        record = run_experiment(run.config, cache_dir=str(cache_dir), device=dev, num_threads=num_threads,
                                progress=detail)
        write_record(runs_dir, run, record)
        c = run.config
        bar.step(
            f"{c.dataset} {run.label} {c.teacher or '-'}->{c.student} seed {c.seed}: "
            f"acc {record['student/accuracy']:.4f} ECE {record['student/ece']:.4f}"
        )
    dist.barrier()
    return SweepSummary(len(suite.runs), skipped, len(mine), recomputed, time.monotonic() - start)
