"""Packaging facts: the kernels live inside the kdbench namespace; import stays light."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_install_inside_the_kdbench_namespace():
    spec = importlib.util.find_spec("kdbench.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().parent == (ROOT / "kdbench" / "kernels").resolve()


@pytest.mark.parametrize("cwd", ["/", str(ROOT)], ids=["elsewhere", "repository-root"])
def test_no_top_level_kernels_module_from_this_project(cwd):
    # Not even from the clone's root, where the working directory is on sys.path:
    # transformers imports Hugging Face's `kernels`, and a directory of ours would shadow it.
    code = (
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "print('none' if s is None else s.origin)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
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


@pytest.mark.slow
def test_wheel_ships_every_subpackage_and_the_suites(tmp_path):
    # A non-editable install must work too: every kdbench.* package and the shipped suites.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kdbench", src / "kdbench", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("kdbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "kdbench").rglob("__init__.py")}
    missing = {pkg for pkg in packages if f"{pkg}/__init__.py" not in names}
    assert not missing, f"not in the wheel: {sorted(missing)}"
    suites = {p.name for p in (ROOT / "kdbench" / "suites").glob("*.toml")}
    assert suites and all(f"kdbench/suites/{s}" in names for s in suites)
    assert not [n for n in names if n.startswith("kernels/")]  # no top-level `kernels`
