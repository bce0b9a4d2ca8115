"""Packaging facts: the kernels live inside the kdbench namespace; import stays light."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_install_inside_the_kdbench_namespace():
    spec = importlib.util.find_spec("kdbench.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().parent == (ROOT / "kernels").resolve()


def test_no_top_level_kernels_module_from_this_project():
    # Run from a neutral directory so the repository root is not on sys.path.
    code = (
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "print('none' if s is None else s.origin)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or str(ROOT) not in origin


def test_import_kdbench_imports_neither_triton_nor_cuda():
    code = (
        "import sys, kdbench; "
        "print('triton' in sys.modules, 'kdbench.kernels.kd_loss' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kdbench", "--help"], capture_output=True, text=True, check=True)
    assert "usage: kdbench" in out.stdout
