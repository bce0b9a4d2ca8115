"""The pipelining-depth sweep (``kdbench.bench.tuning``), run on CPU through the Triton interpreter.

The interpreter ignores the depth, so these tests check the machinery (every depth is
checked against the oracle, timed, reported, and the default restored), not speed.
"""

from __future__ import annotations

import pytest

from conftest import DEVICE
from kdbench.bench import cases, providers, report, tuning
from kdbench.bench.cases import FORWARD_BACKWARD
from kdbench.kernels import calibration as calibration_kernel
from kdbench.kernels import kd_loss as kd_kernel

# Wider than one 4096-wide tile, so the streamed (pipelined) loops run.
SWEEP_CASES = [
    cases.kd_case(3, 5003, "float32", DEVICE, FORWARD_BACKWARD, "forward"),
    cases.kd_case(3, 5003, "float32", DEVICE, FORWARD_BACKWARD, "jsd", beta=0.3),
    cases.calibration_case(5, 5000, "float32", DEVICE),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: c.key)
def test_sweep_checks_and_times_every_depth(case):
    module = tuning.knob_module(case)
    default = module.STREAM_STAGES
    out = tuning.sweep(case, bandwidth=1e3, repeats=2, warmup=0, log=lambda _: None)
    assert module.STREAM_STAGES == default
    assert out["default"] == default and out["title"] == case.title
    assert list(out["depths"]) == [str(d) for d in tuning.DEPTHS]
    for r in out["depths"].values():
        assert r["status"] == "ok", r
        assert r["repeats"] == 2 and 0 < r["min_s"] <= r["median_s"]
        assert r["GB/s"] == pytest.approx(case.bytes_moved / r["median_s"] / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["GB/s"] / 1e3)
    md = "\n".join(report._tuning_table(out))
    assert f"Pipelining depth (STREAM_STAGES): kdbench-triton, {case.title}" in md
    assert md.count("\n| ") == 2 + len(tuning.DEPTHS)  # header, rule, one row per depth


def test_knob_modules():
    assert tuning.knob_module(SWEEP_CASES[0]) is kd_kernel
    assert tuning.knob_module(SWEEP_CASES[2]) is calibration_kernel


def test_launchers_read_the_depth_per_call():
    assert kd_kernel.STREAM_STAGES >= 1
    with tuning.stream_stages(calibration_kernel, 4):
        assert calibration_kernel.launch_plan(8, 262144, 15)["NUM_STAGES"] == 4
        assert calibration_kernel.launch_plan(8, 100, 15)["NUM_STAGES"] == 1  # one tile: nothing to pipeline
    assert calibration_kernel.launch_plan(8, 262144, 15)["NUM_STAGES"] == calibration_kernel.STREAM_STAGES


def test_a_wrong_depth_is_reported_and_not_timed(monkeypatch):
    case = SWEEP_CASES[0]
    real_check = providers.Runner.check

    def check(self, oracle):
        if kd_kernel.STREAM_STAGES == 2:
            raise AssertionError("planted: depth 2 is off")
        return real_check(self, oracle)

    monkeypatch.setattr(providers.Runner, "check", check)
    out = tuning.sweep(case, bandwidth=1e3, repeats=1, warmup=0, log=lambda _: None)
    assert out["depths"]["2"] == {"status": "wrong", "reason": "planted: depth 2 is off"}
    assert all(out["depths"][str(d)]["status"] == "ok" for d in (1, 3, 4))
    assert "| 2 | wrong: planted: depth 2 is off |" in "\n".join(report._tuning_table(out))


def test_stream_stages_restores_after_an_error_and_rejects_bad_depths():
    default = kd_kernel.STREAM_STAGES
    with pytest.raises(RuntimeError, match="inside"):
        with tuning.stream_stages(kd_kernel, 4):
            raise RuntimeError("inside")
    assert kd_kernel.STREAM_STAGES == default
    for bad in (0, -1, 2.0, "3"):
        with pytest.raises(ValueError, match="depth: expected an integer >= 1"):
            with tuning.stream_stages(kd_kernel, bad):
                pass
    assert kd_kernel.STREAM_STAGES == default
