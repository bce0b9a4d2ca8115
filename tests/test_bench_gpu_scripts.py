"""The GPU-only measurement scripts of ``kdbench.bench`` where there is no CUDA: exit 2, one line, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.bench import kd_modes, profile_kernels, torch_backend_gpu


def test_main_exits_2_with_one_line_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_backend_gpu.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == torch_backend_gpu.NO_CUDA + "\n"


def test_module_entry_point_exits_2_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "kdbench.bench.torch_backend_gpu"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and run.stderr.strip().splitlines()[-1] == torch_backend_gpu.NO_CUDA


@pytest.mark.parametrize("module", [kd_modes, profile_kernels], ids=["kd_modes", "profile_kernels"])
def test_measurement_scripts_refuse_a_machine_without_cuda(module, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_file = tmp_path / "report.md"
    assert module.main(["--out", str(out_file)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "needs a CUDA GPU" in err
    assert not out_file.exists()


def test_emit_markdown_prints_and_writes(tmp_path, capsys):
    from kdbench.bench.report import emit_markdown

    assert emit_markdown(["# t", "", "| a |"], tmp_path / "x.md") == 0
    assert (tmp_path / "x.md").read_text() == "# t\n\n| a |\n"
    assert capsys.readouterr().out == "# t\n\n| a |\n\n"
