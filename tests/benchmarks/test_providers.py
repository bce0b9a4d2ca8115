"""Ordinary tests of the benchmark machinery: every provider is correct, the checks catch wrong ones,
and the measurements and targets behave.  They run in a plain ``pytest`` (no benchmark fixture)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DEVICE
from kd_helpers import assert_grad_close, assert_loss_close, oracle
from kdbench.bench import cases, measure, providers, report
from kdbench.bench.cases import CALIBRATION, FORWARD, FORWARD_BACKWARD, KD_LOSS, Case

CPU_KD_PROVIDERS = ["kdbench-triton", "kdbench-torch", "eager"]  # triton: interpreter on CPU


def _kd(n=6, v=300, dtype="float32", direction=FORWARD_BACKWARD, divergence="forward", device=DEVICE):
    return cases.kd_case(n, v, dtype, device, direction, divergence)


def _check(name: str, case: Case) -> dict[str, float]:
    a, b = case.inputs(seed=1)
    return providers.Runner(name, case, a, b).check(providers.make_oracle(case, a, b))


# ---- every provider agrees with the float64 oracle -------------------------------------------


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("direction", [FORWARD, FORWARD_BACKWARD])
@pytest.mark.parametrize("name", CPU_KD_PROVIDERS)
def test_kd_provider_matches_oracle(name, direction, divergence):
    errors = _check(name, _kd(direction=direction, divergence=divergence))
    assert set(errors) == ({"loss_rel", "grad_rel_to_max"} if direction == FORWARD_BACKWARD else {"loss_rel"})
    assert all(e <= providers.KD_TOL["float32"] for e in errors.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["kdbench-torch", "eager"])
def test_kd_provider_half_precision(name, dtype):
    errors = _check(name, _kd(dtype=dtype, v=2000))
    assert errors["grad_rel_to_max"] <= providers.KD_TOL[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_compiled_eager_matches_oracle(divergence):
    """torch.compile of the eager formula (one compile per divergence: seconds)."""
    errors = _check("compile", _kd(n=8, v=200, divergence=divergence))
    assert errors["grad_rel_to_max"] <= providers.KD_TOL["float32"]


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_liger_matches_oracle(divergence):
    """Liger is fed log-softmax and scaled by T**2: the same quantity as kd_loss."""
    pytest.importorskip("liger_kernel", reason="Liger-Kernel is not installed (extra: bench)")
    if DEVICE == "cuda":
        _check("liger", _kd(n=64, v=32000, dtype="bfloat16", divergence=divergence))
    elif divergence == "forward":
        pytest.skip("Liger-Kernel's KL kernel fails under the Triton interpreter (it calls .to on a Python float)")
    else:
        # Its JSD kernel, interpreted; beta != 0.5 so that a swapped convention would show.
        errors = _check("liger", cases.kd_case(8, 300, "float32", DEVICE, FORWARD_BACKWARD, "jsd", beta=0.3))
        assert all(e <= providers.KD_TOL["float32"] for e in errors.values())


@pytest.mark.parametrize("name", providers.CALIBRATION_PROVIDERS)
def test_calibration_provider_matches_oracle(name):
    if name == "torchmetrics":
        pytest.importorskip("torchmetrics")
    errors = _check(name, cases.calibration_case(200, 50, "float32", DEVICE))
    assert errors["ece"] <= providers.ECE_ATOL["torchmetrics" if name == "torchmetrics" else "kdbench"]


def test_calibration_inputs_look_like_a_trained_model():
    z, y = cases.calibration_case(2000, 10, "float32", "cpu").inputs()
    acc = (z.argmax(-1) == y).float().mean().item()
    assert 0.6 < acc < 0.85


# ---- the checks catch a wrong provider ----------------------------------------------------------


def test_check_rejects_a_wrong_loss(monkeypatch):
    real = providers.kd_loss_fn

    def off_by_one_percent(name, case):
        fn = real(name, case)
        return lambda s, t: fn(s, t) * 1.01

    monkeypatch.setattr(providers, "kd_loss_fn", off_by_one_percent)
    with pytest.raises(AssertionError, match="loss_rel"):
        _check("eager", _kd())


def test_check_rejects_a_wrong_gradient(monkeypatch):
    real = providers.kd_loss_fn

    def wrong_temperature_gradient(name, case):
        fn = real(name, case)
        # Same value, gradient scaled by 2: what forgetting a 1/T would look like.
        return lambda s, t: fn(s, t) + (fn(s, t) - fn(s, t).detach())

    monkeypatch.setattr(providers, "kd_loss_fn", wrong_temperature_gradient)
    with pytest.raises(AssertionError, match="grad_rel_to_max"):
        _check("eager", _kd())


def test_check_rejects_a_wrong_ece(monkeypatch):
    real = providers.calibration_fn

    def shifted(name, case):
        fn = real(name, case)
        return lambda z, y: fn(z, y) + 0.01

    monkeypatch.setattr(providers, "calibration_fn", shifted)
    pytest.importorskip("torchmetrics")
    with pytest.raises(AssertionError, match="ece"):
        _check("torchmetrics", cases.calibration_case(200, 50, "float32", DEVICE))


# ---- availability --------------------------------------------------------------------------


def test_skip_reasons_on_cpu():
    case = _kd(device="cpu")
    assert "CUDA" in providers.skip_reason("kdbench-triton", case)
    assert providers.skip_reason("kdbench-torch", case) is None
    assert providers.skip_reason("eager", case) is None
    liger = providers.skip_reason("liger", case)
    assert liger is not None and ("not installed" in liger or "GPU" in liger)


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(ValueError, match="provider"):
        providers.skip_reason("numpy", _kd())
    with pytest.raises(ValueError, match="provider"):
        providers.kd_loss_fn("numpy", _kd())


# ---- cases -------------------------------------------------------------------------------------


def test_bytes_moved_counts_the_minimum_traffic():
    assert _kd(n=4, v=10, dtype="bfloat16", direction=FORWARD).bytes_moved == 2 * 4 * 10 * 2
    assert _kd(n=4, v=10, dtype="bfloat16").bytes_moved == 3 * 4 * 10 * 2
    assert _kd(n=4, v=10).grad_bytes == 4 * 10 * 4
    assert cases.calibration_case(4, 10, "float32", "cpu").bytes_moved == 4 * 10 * 4 + 4 * 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(op="matmul"), "op"),
        (dict(dtype="int8"), "dtype"),
        (dict(direction="backward"), "direction"),
        (dict(op=CALIBRATION, direction=FORWARD_BACKWARD), "direction"),
        (dict(n=0), "n, v"),
    ],
)
def test_bad_case_is_a_clear_error(kwargs, match):
    base = dict(op=KD_LOSS, n=2, v=3, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=match):
        Case(**{**base, **kwargs})


def test_headline_cases_are_the_targets_shapes():
    cpu = cases.headline_cases("cpu")
    assert (cpu[0].n, cpu[0].v, cpu[0].dtype, cpu[0].direction) == (2048, 32000, "float32", FORWARD_BACKWARD)
    gpu = cases.headline_cases("cuda")
    assert (gpu[0].n, gpu[0].v, gpu[0].dtype) == (8192, 128256, "bfloat16")
    assert (gpu[-1].op, gpu[-1].n, gpu[-1].v) == (CALIBRATION, 65536, 32000)


# ---- measurements ----------------------------------------------------------------------------


def test_round_robin_timing_shapes_and_validation():
    calls = []
    times = measure.time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three interleaved rounds
    assert all(len(v) == 3 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError, match="repeats"):
        measure.time_round_robin({}, "cpu", 0)


def test_copy_bandwidth_is_positive():
    bw = measure.copy_bandwidth("cpu", nbytes=1 << 22, repeats=2)
    assert bw["GB/s"] > 0 and bw["bytes"] == 2 << 22


def test_cpu_busy_fraction_is_a_fraction():
    busy = measure.cpu_busy_fraction(0.2)
    assert busy is None or 0.0 <= busy <= 1.0


def test_peak_extra_memory_sees_an_allocation():
    nbytes = 64 << 20

    def allocate():
        return torch.ones(nbytes // 4)  # touched, so resident

    peak, how = measure.peak_extra_memory(allocate, "cpu")
    if peak is None:
        pytest.skip(how)
    assert nbytes * 0.95 <= peak <= nbytes * 1.5


# ---- targets and reports ------------------------------------------------------------------------


def _report(eager_s: float, torch_s: float | None, device: str = "cpu") -> dict:
    case = _kd(n=2048, v=32000, device="cpu")
    results = {"eager": {"status": "ok", "median_s": eager_s}}
    if torch_s is None:
        results["kdbench-torch"] = {"status": "wrong", "reason": "loss off"}
    else:
        results["kdbench-torch"] = {"status": "ok", "median_s": torch_s}
    return {"device": device, "cases": [{"case": case.info(), "results": results}]}


def test_cpu_target_met_missed_and_unmeasured():
    met = report.evaluate_targets(_report(1.0, 0.5))
    assert len(met) == 1 and met[0]["met"] is True and math.isclose(met[0]["value"], 0.5)
    assert report.evaluate_targets(_report(1.0, 0.9))[0]["met"] is False
    wrong = report.evaluate_targets(_report(1.0, None))[0]
    assert wrong["met"] is None and "wrong" in wrong["note"]


def test_gpu_targets_unmeasured_without_their_shape():
    out = report.evaluate_targets(_report(1.0, 0.5, device="h200"))
    assert len(out) == 7 and all(t["met"] is None for t in out)


def test_reports_are_written_whole(tmp_path):
    data = {"device": "cpu", "date": "d", "command": "c", "kdbench_version": "v", "machine": {"cpu": "x"},
            "copy_bandwidth": {"GB/s": 10.0, "bytes": 2 << 20}, "cases": [], "targets": []}  # fmt: skip
    case = _kd(device="cpu")
    data["cases"] = [
        {"title": case.title, "results": {"eager": {"status": "error", "reason": "RuntimeError: a | b\nline two"}}}
    ]
    md, js = report.write_reports(data, tmp_path / "out", "cpu")
    assert "| eager | error: RuntimeError: a / b line two |" in md.read_text()
    assert json.loads(js.read_text())["device"] == "cpu"
    assert md.read_text().startswith("# kdbench bench: cpu")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cpu.json", "cpu.md"]


# ---- the kd kernel on CUDA tensors (the GPU check runs these) -----------------------------------

CUDA_GRID = [((4, 5003), torch.float32), ((64, 32000), torch.float16), ((16, 128256), torch.bfloat16)]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (on CPU the kernel tests run under the interpreter)")
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("shape,dtype", CUDA_GRID, ids=lambda x: str(x))
def test_cuda_kernel_matches_float64_oracle(shape, dtype, divergence):
    import kdbench

    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(shape, generator=g, device="cuda") * 2).to(dtype)
    t = (torch.randn(shape, generator=g, device="cuda") * 3 + 0.5).to(dtype)
    y = torch.randint(0, shape[1], shape[:1], generator=g, device="cuda")
    y[1] = -100
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3)
    go = torch.tensor(0.7, device="cuda")
    x = s.clone().requires_grad_(True)
    loss = kdbench.kd_loss(x, t, y, backend="triton", **kw)
    loss.backward(go)
    loss64, grad64 = oracle(s, t, y, grad_output=go, **kw)
    assert_loss_close(loss.detach(), loss64)
    assert_grad_close(x.grad, grad64, dtype)
