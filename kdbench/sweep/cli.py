"""``kdbench run`` and ``kdbench table``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SUITE = "quick"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default=DEFAULT_SUITE,
                        help=f"a shipped suite's name or a path to a .toml file (default: {DEFAULT_SUITE})")
    parser.add_argument("--results-dir", default="results", type=Path,
                        help="records go to RESULTS_DIR/<suite>/runs, tables beside them (default: results)")


def _load(args: argparse.Namespace):
    from kdbench.sweep.suite import SuiteError, load_suite, resolve_suite

    try:
        return load_suite(resolve_suite(args.suite))
    except SuiteError as exc:
        print(f"kdbench: {exc}", file=sys.stderr)
        return None


def _report_tables(info: dict) -> None:
    for path, problem in info["problems"]:
        print(f"kdbench: ignoring {path}: {problem}", file=sys.stderr)
    missing = f", {info['missing']} runs missing" if info["missing"] else ""
    print(f"kdbench: tables from {info['records']} records ({info['rows']} model rows{missing}), "
          f"{len(info['figures'])} figures", file=sys.stderr)


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kdbench run", description="Run a benchmark suite (resumable), then write its tables.")
    _common(parser)
    parser.add_argument("--force", action="store_true", help="recompute runs that already have a record")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="teacher checkpoints (default: RESULTS_DIR/.cache/teachers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    parser.add_argument("--no-tables", action="store_true", help="only run; do not write the tables")
    parser.add_argument("--verbose", action="store_true", help="print training progress inside each run")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: expected an int >= 1")
    suite = _load(args)
    if suite is None:
        return 2

    from kdbench.sweep.runner import init_distributed, run_suite
    from kdbench.sweep.tables import write_tables

    dist = init_distributed()
    cache = args.cache_dir or args.results_dir / ".cache" / "teachers"
    try:
        summary = run_suite(suite, results_root=args.results_dir, cache_dir=cache, force=args.force,
                            device=args.device, num_threads=args.threads, dist=dist, verbose=args.verbose)
    except KeyboardInterrupt:
        print("kdbench: interrupted; every finished run is saved: rerun the same command to resume", file=sys.stderr)
        return 130
    if dist.rank == 0:
        print(f"kdbench: {summary.ran} runs in {summary.seconds:.1f} s ({summary.skipped} already recorded)",
              file=sys.stderr)
        if not args.no_tables:
            _report_tables(write_tables(suite, args.results_dir))
    if dist.active:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def table_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kdbench table", description="Regenerate a suite's tables and figures from its records.")
    _common(parser)
    parser.add_argument("--no-figures", action="store_true", help="write results.csv and table.md only")
    args = parser.parse_args(argv)
    suite = _load(args)
    if suite is None:
        return 2
    from kdbench.sweep.tables import write_tables

    _report_tables(write_tables(suite, args.results_dir, figures=not args.no_figures))
    return 0
