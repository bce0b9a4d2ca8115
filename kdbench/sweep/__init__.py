"""Benchmark suites: TOML grids of experiments, a resumable runner, tables and figures.

``kdbench run [SUITE]`` and ``kdbench table [SUITE]`` (see :mod:`kdbench.sweep.cli`).
"""

from kdbench.sweep.suite import Run, Suite, SuiteError, load_suite, resolve_suite

__all__ = ["Run", "Suite", "SuiteError", "load_suite", "resolve_suite"]
