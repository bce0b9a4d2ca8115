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


def test_ncu_metrics_are_summed_over_the_launches_of_a_call():
    text = (
        "==PROF== Connected to process\n"
        '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
        '"0","_kd_kernel","sm__sass_thread_inst_executed.sum","inst","1,000"\n'
        '"0","_kd_kernel","dram__bytes.sum","byte","10"\n'
        '"1","_kd_kernel","sm__sass_thread_inst_executed.sum","inst","2,500"\n'
        '"1","_kd_kernel","dram__bytes.sum","byte","5"\n'
    )
    assert profile_kernels.sum_metrics(text) == {"sm__sass_thread_inst_executed.sum": 3500.0, "dram__bytes.sum": 15.0}


def test_profiled_launches_follow_the_row_meeting(monkeypatch):
    from kdbench.kernels import kd_loss

    assert [profile_kernels.launches_per_call(c) for c in ("kd-forward", "kd-jsd", "calibration")] == [2, 3, 1]
    monkeypatch.setattr(kd_loss, "ROW_MEETING", "lagged")
    assert profile_kernels.launches_per_call("kd-jsd") == 1
