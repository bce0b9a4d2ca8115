"""``kdbench run`` and ``kdbench table``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SUITE = "quick"
# Fresh sweeps go here, not into the committed results/: a new clone then trains and
# evaluates for real, and the end of the run compares its tables with results/.
DEFAULT_RESULTS_DIR = Path("kdbench-out")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", default=DEFAULT_SUITE,
                        help=f"a shipped suite's name or a path to a .toml file (default: {DEFAULT_SUITE})")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, type=Path,
                        help="records go to RESULTS_DIR/<suite>/runs, tables beside them (default: "
                             f"{DEFAULT_RESULTS_DIR}; name results to regenerate the committed tables)")


def _load(args: argparse.Namespace):
    from kdbench.sweep.suite import SuiteError, load_suite, resolve_suite

    try:
        return load_suite(resolve_suite(args.suite))
    except SuiteError as exc:
        print(f"kdbench: {exc}", file=sys.stderr)
        return None


def _report_tables(info: dict, suite_dir: Path) -> None:
    for path, problem in info["problems"]:
        print(f"kdbench: ignoring {path}: {problem}", file=sys.stderr)
    missing = f", {info['missing']} runs missing" if info["missing"] else ""
    if info["current"]:
        print(f"kdbench: tables in {suite_dir}/ are already those of these {info['records']} records "
              "(written by another runner)", file=sys.stderr)
        return
    print(f"kdbench: tables from {info['records']} records ({info['rows']} model rows{missing}), "
          f"{len(info['figures'])} figures: {suite_dir / 'table.md'}", file=sys.stderr)
    claims = ", ".join(f"{n} {name}" for name, n in info["claims"].items())
    print(f"kdbench: claims ({claims}): {suite_dir / 'claims.md'}", file=sys.stderr)


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _compare(suite, results_dir: Path, reference: Path | None) -> None:
    from kdbench.sweep.compare import compare_sweeps

    if reference is None:
        print("kdbench: no reference results folder to compare with (pass --reference DIR)", file=sys.stderr)
        return
    ref_dir = reference / suite.name
    if not ref_dir.is_dir():
        print(f"kdbench: no reference tables of suite {suite.name!r} in {reference} to compare with", file=sys.stderr)
        return
    if ref_dir.resolve() == (results_dir / suite.name).resolve():
        print(f"kdbench: wrote the reference folder {ref_dir} itself; nothing to compare", file=sys.stderr)
        return
    print(f"kdbench: {compare_sweeps(suite, results_dir, reference).summary()}", file=sys.stderr)


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdbench run", description="Run a benchmark suite (resumable), then write its tables.")
    _common(parser)
    parser.add_argument("--force", action="store_true", help="recompute runs that already have a record")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="teacher checkpoints (default: RESULTS_DIR/.cache/teachers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto; under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="compare the fresh records with REFERENCE/<suite> at the end (default: the committed "
                             "results/ of this source tree, when there is one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    parser.add_argument("--no-tables", action="store_true", help="only run; do not write the tables")
    parser.add_argument("--verbose", action="store_true", help="print training progress inside each run")
    return parser


def run_main(argv: list[str]) -> int:
    parser = run_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads: expected an int >= 1")
    from kdbench.sweep.runner import DeviceError, check_device, check_runnable_suite, init_distributed, run_suite

    try:
        args.device = check_device(args.device)
    except DeviceError as exc:
        print(f"kdbench run: --{exc}", file=sys.stderr)
        return 2
    suite = _load(args)
    if suite is None:
        return 2
    try:
        check_runnable_suite(suite)
    except FileNotFoundError as exc:
        print(f"kdbench run: {exc}", file=sys.stderr)
        return 2
    from kdbench.sweep.compare import default_reference_root
    from kdbench.sweep.tables import write_tables

    reference = args.reference or default_reference_root()
    reference = None if reference is None else _shown(reference)

    dist = init_distributed()
    cache = args.cache_dir or args.results_dir / ".cache" / "teachers"
    try:
        summary = run_suite(suite, results_root=args.results_dir, cache_dir=cache, force=args.force,
                            device=args.device, num_threads=args.threads, dist=dist, verbose=args.verbose)
    except KeyboardInterrupt:
        print("kdbench: interrupted; every finished run is saved: rerun the same command to resume", file=sys.stderr)
        return 130
    if dist.rank == 0:
        others = f", {summary.by_others} by another runner" if summary.by_others else ""
        print(f"kdbench: {summary.ran} runs in {summary.seconds:.1f} s ({summary.skipped} already recorded{others})",
              file=sys.stderr)
        if not args.no_tables:
            _report_tables(write_tables(suite, args.results_dir, skip_if_current=True), args.results_dir / suite.name)
        _compare(suite, args.results_dir, reference)
    if dist.active:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def table_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdbench table", description="Regenerate a suite's tables and figures from its records.")
    _common(parser)
    parser.add_argument("--no-figures", action="store_true", help="write results.csv and table.md only")
    return parser


def table_main(argv: list[str]) -> int:
    args = table_parser().parse_args(argv)
    suite = _load(args)
    if suite is None:
        return 2
    from kdbench.sweep.tables import NoRecordsError, write_tables

    try:
        info = write_tables(suite, args.results_dir, figures=not args.no_figures)
    except NoRecordsError as exc:
        print(f"kdbench table: {exc}", file=sys.stderr)
        return 1
    _report_tables(info, args.results_dir / suite.name)
    return 0
