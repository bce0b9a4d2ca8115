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

CPU_KD_PROVIDERS = ["kdbench-triton", "kdbench-lagged", "kdbench-torch", "eager"]  # triton: interpreter on CPU


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


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_lagged_provider_on_wide_rows_matches_oracle_and_restores_the_default(divergence):
    from kdbench.kernels import kd_loss as kernel

    errors = _check("kdbench-lagged", _kd(n=3, v=9000, divergence=divergence))  # 5 chunks of 2048 per row
    assert all(e <= providers.KD_TOL["float32"] for e in errors.values())
    assert kernel.ROW_MEETING == "launches"


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


@pytest.mark.parametrize("name", [p for p in providers.CALIBRATION_PROVIDERS if p != "compile"])
def test_calibration_provider_matches_oracle(name):
    if name == "torchmetrics":
        pytest.importorskip("torchmetrics")
    errors = _check(name, cases.calibration_case(200, 50, "float32", DEVICE))
    assert errors["ece"] <= providers.ECE_ATOL["torchmetrics" if name == "torchmetrics" else "kdbench"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager_calibration_statistics_match_kdbench(dtype):
    """The plain PyTorch statistics that ``compile`` compiles: every sum, on rows with ties and a confidence of 1."""
    import kdbench

    z, y = cases.calibration_case(300, 40, dtype, "cpu").inputs(seed=3)
    z[0] = 0.0  # a tie everywhere: prediction 0, confidence 1/40
    z[1, 7] = 1e4  # confidence 1.0: the last bin
    sums = providers._eager_calibration(15)(z, y)
    ref = kdbench.calibration_stats(z, y, n_bins=15, backend="torch")
    for got, want in zip(sums, (ref.count, ref.conf_sum, ref.correct_sum, ref.nll_sum, ref.brier_sum)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_calibration_matches_oracle():
    """torch.compile of the plain statistics (seconds: one compile), checked like kdbench's: ECE, NLL, Brier, accuracy."""
    errors = _check("compile", cases.calibration_case(200, 50, "float32", DEVICE))
    assert set(errors) == {"ece", "nll", "brier", "accuracy"}
    assert errors["ece"] <= providers.ECE_ATOL["kdbench"] and errors["accuracy"] == 0.0


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


def test_compare_reports_errors_over_tolerance_without_raising(monkeypatch):
    real = providers.kd_loss_fn
    monkeypatch.setattr(providers, "kd_loss_fn", lambda name, case: (lambda s, t: real(name, case)(s, t) * 1.01))
    case = _kd(direction=FORWARD)
    a, b = case.inputs(seed=1)
    runner = providers.Runner("eager", case, a, b)
    over = runner.compare(providers.make_oracle(case, a, b))
    assert set(over) == {"loss_rel"} and over["loss_rel"] == (runner.errors["loss_rel"], providers.KD_TOL["float32"])
    assert runner.errors["loss_rel"] == pytest.approx(0.01, rel=1e-3)
    assert "loss_rel" in runner.too_large() and "eager on kd_loss" in runner.too_large()
    assert providers.STRICT_PROVIDERS == ("kdbench-triton", "kdbench-torch", "kdbench-lagged")


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


def test_extra_cases_cover_both_ops_at_each_extra_shape_on_cuda_only():
    assert cases.extra_cases("cpu") == [] and cases.extra_cases("cpu", quick=True) == []
    extra = cases.extra_cases("cuda")
    want = {(65536, 1000, "float32"), (16384, 32000, "bfloat16"), (4096, 262144, "bfloat16")}
    for op in (KD_LOSS, CALIBRATION):
        assert {(c.n, c.v, c.dtype) for c in extra if c.op == op} == want
    assert all(c.direction == FORWARD_BACKWARD and c.divergence == "forward" for c in extra if c.op == KD_LOSS)
    quick = cases.extra_cases("cuda", quick=True)
    assert len(quick) == 6 and all(c.n * c.v <= 2**22 for c in quick)
    assert all(c.key not in {h.key for h in cases.headline_cases("cuda")} for c in extra)


# ---- measurements ----------------------------------------------------------------------------


def test_round_robin_budget_stops_a_slow_function_after_min_repeats(monkeypatch):
    clock = {"a": 0.01, "slow": 2.0}
    monkeypatch.setattr(measure, "time_once", lambda fn, device: clock[fn()])
    times = measure.time_round_robin({"a": lambda: "a", "slow": lambda: "slow"}, "cpu", 20, warmup=0, budget_s=5.0,
                                     min_repeats=4)  # fmt: skip
    assert len(times["a"]) == 20 and len(times["slow"]) == 4  # 4 calls of 2 s: past the budget
    times = measure.time_round_robin({"slow": lambda: "slow"}, "cpu", 20, warmup=0, budget_s=1.0, min_repeats=3)
    assert len(times["slow"]) == 3  # never fewer than min_repeats
    assert len(measure.time_round_robin({"slow": lambda: "slow"}, "cpu", 7, warmup=0)["slow"]) == 7  # no budget


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
    # 8 targets at the headline shapes, one per measured case (kdbench-triton vs compile): no triton here.
    assert len(out) == 9 and all(t["met"] is None for t in out)
    assert all("not measured" in t["note"] for t in out)


def _ok(ms: float, **extra) -> dict:
    return {"status": "ok", "median_s": ms / 1e3, **extra}


def _gpu_report(extra_cases=()) -> dict:
    """A fake H200 report at the headline shapes (milliseconds chosen to meet or miss each target)."""
    kd = cases.kd_case(8192, 128256, "bfloat16", "cuda", FORWARD_BACKWARD, "forward")
    jsd = cases.kd_case(8192, 128256, "bfloat16", "cuda", FORWARD_BACKWARD, "jsd")
    cal = cases.calibration_case(65536, 32000, "bfloat16", "cuda")
    kd_results = {
        "kdbench-triton": _ok(2.0, pct_copy_bw=75.0, peak_over_grad=1.0),
        "kdbench-torch": _ok(20.0),
        "eager": _ok(16.0),
        "compile": _ok(6.0),
    }
    jsd_results = {"kdbench-triton": _ok(2.8), "eager": _ok(17.0, over_tolerance={"grad_rel_to_max": {}})}
    cal_results = {"kdbench-triton": _ok(1.5, pct_copy_bw=79.0), "kdbench-torch": _ok(17.0), "torchmetrics": _ok(17.5)}
    out = [
        {"case": kd.info(), "title": kd.title, "results": kd_results},
        {"case": jsd.info(), "title": jsd.title, "results": jsd_results},
        {"case": cal.info(), "title": cal.title, "results": cal_results},
    ]
    return {"device": "h200", "cases": out + list(extra_cases)}


def test_gpu_targets_met_and_missed():
    got = {t["name"]: t for t in report.evaluate_targets(_gpu_report())}
    fkl = "kd_loss fwd+bwd forward KL: "
    assert got[fkl + ">= 70% of copy bandwidth"]["met"] is True
    assert got[fkl + ">= 2.5x torch.compile"]["value"] == pytest.approx(3.0) and got[fkl + ">= 2.5x torch.compile"]["met"]
    assert got[fkl + "peak extra memory <= 1.1x the gradient"]["met"] is True
    jsd = got["kd_loss fwd+bwd JSD: <= 1.3x the time of forward KL (both kdbench-triton)"]
    assert jsd["value"] == pytest.approx(1.4) and jsd["met"] is False  # 2.8 ms against forward KL's 2.0 ms
    assert got["calibration_stats: >= 80% of copy bandwidth"]["met"] is False
    assert got["calibration_stats: >= 12x torchmetrics"]["value"] == pytest.approx(17.5 / 1.5)
    assert got["calibration_stats: >= 12x torchmetrics"]["met"] is False
    torch_kd = got["kd_loss fwd+bwd forward KL (torch backend on CUDA): <= 1.2x the time of eager"]
    assert torch_kd["value"] == pytest.approx(1.25) and torch_kd["met"] is False
    assert got["calibration_stats (torch backend on CUDA): <= the time of torchmetrics"]["met"] is True
    per_case = [t for name, t in got.items() if name.startswith("no slower than torch.compile: ")]
    assert len(per_case) == 3  # one per measured case
    assert per_case[0]["met"] is True  # forward KL: 2 ms against compile's 6 ms
    assert all("compile absent" in t["note"] for t in per_case[1:])  # the fake JSD and calibration cases have no compile


def test_jsd_target_needs_the_forward_kl_case():
    data = _gpu_report()
    data["cases"] = data["cases"][1:]  # no forward-KL case measured
    got = {t["name"]: t for t in report.evaluate_targets(data)}
    jsd = got["kd_loss fwd+bwd JSD: <= 1.3x the time of forward KL (both kdbench-triton)"]
    assert jsd["met"] is None and "did not include" in jsd["note"]
    data = _gpu_report()
    data["cases"][0]["results"]["kdbench-triton"] = {"status": "wrong", "reason": "loss off"}
    got = {t["name"]: t for t in report.evaluate_targets(data)}
    jsd = got["kd_loss fwd+bwd JSD: <= 1.3x the time of forward KL (both kdbench-triton)"]
    assert jsd["met"] is None and jsd["note"] == "not measured: kdbench-triton wrong: loss off"


def test_every_cuda_case_gets_a_compile_target_and_over_tolerance_is_noted():
    wide = cases.kd_case(4096, 262144, "bfloat16", "cuda", FORWARD_BACKWARD, "forward")
    results = {"kdbench-triton": _ok(3.0), "compile": _ok(2.5, over_tolerance={"loss_rel": {}})}
    data = _gpu_report([{"case": wide.info(), "title": wide.title, "results": results, "extra": True}])
    got = {t["name"]: t for t in report.evaluate_targets(data)}
    t = got[f"no slower than torch.compile: {wide.title}"]
    assert t["value"] == pytest.approx(2.5 / 3.0) and t["met"] is False
    assert t["note"] == "compile over tolerance vs float64"
    assert not any(name.startswith("no slower") for name in {t["name"] for t in report.evaluate_targets(_report(1, 0.5))})


def _fake_report(case_entries: list, **extra) -> dict:
    return {"device": "h200", "date": "d", "command": "c", "kdbench_version": "v", "machine": {"cpu": "x"},
            "copy_bandwidth": {"GB/s": 10.0, "bytes": 2 << 20}, "targets": [], "cases": case_entries, **extra}  # fmt: skip


def _timed(ms: float, **extra) -> dict:
    return {"status": "ok", "median_s": ms / 1e3, "min_s": ms / 1e3, "GB/s": 1.0, "pct_copy_bw": 10.0, "repeats": 20,
            "errors": {"loss_rel": 1e-7, "grad_rel_to_max": 2e-3}, **extra}  # fmt: skip


def test_over_tolerance_is_loud_in_the_row():
    case = cases.kd_case(8192, 128256, "bfloat16", "cuda", FORWARD_BACKWARD, "jsd")
    eager = _timed(17.0, over_tolerance={"grad_rel_to_max": {"error": 0.063, "bound": 0.06}})
    eager["errors"]["grad_rel_to_max"] = 0.063
    md = report.render_markdown(_fake_report([{"case": case.info(), "title": case.title, "results": {"eager": eager}}]))
    row = next(line for line in md.splitlines() if line.startswith("| eager |"))
    assert row.endswith("| **over tolerance: grad_rel_to_max 6.3e-02 (limit 6.0e-02)**; loss_rel 1.0e-07 |")
    assert "over tolerance" not in report._errors_cell(_timed(1.0))


def test_baseline_columns(tmp_path):
    kd = cases.kd_case(8192, 128256, "bfloat16", "cuda", FORWARD_BACKWARD, "forward")
    cal = cases.calibration_case(65536, 32000, "bfloat16", "cuda")
    path = tmp_path / "before.json"
    path.write_text(json.dumps({"source": "run X at commit abc, 2026-12-04, H200", kd.key: {"kdbench-triton": 4.5, "eager": 16.0}}))
    baseline = report.load_baseline(path)
    assert baseline == {"source": "run X at commit abc, 2026-12-04, H200", "file": str(path),
                        "medians_ms": {kd.key: {"kdbench-triton": 4.5, "eager": 16.0}}}  # fmt: skip
    kd_results = {"kdbench-triton": _timed(3.0), "eager": _timed(16.0), "liger": {"status": "skipped", "reason": "x"}}
    entries = [
        {"case": kd.info(), "title": kd.title, "results": kd_results},
        {"case": cal.info(), "title": cal.title, "results": {"kdbench-triton": _timed(5.0)}},
    ]
    md = report.render_markdown(_fake_report(entries, baseline=baseline))
    assert f"Baseline (the \"before\" columns, from `{path}`): run X at commit abc, 2026-12-04, H200" in md
    lines = md.splitlines()
    head = next(line for line in lines if line.startswith("| provider |"))
    assert "| % copy bw | before (median ms) | speed-up vs before | peak extra memory |" in head
    assert "| kdbench-triton | 3.000 | 3.000 | 1.0 | 10.0 | 4.500 | 1.50x | n/a |" in md
    assert "| eager | 16.000 | 16.000 | 1.0 | 10.0 | 16.000 | 1.00x | n/a |" in md
    skipped = next(line for line in lines if line.startswith("| liger |"))
    assert skipped.count("|") == head.count("|")  # a row of the same width
    assert "| kdbench-triton | 5.000 | 5.000 | 1.0 | 10.0 | – | – | n/a |" in md  # a case the baseline lacks
    assert "before (median ms)" not in report.render_markdown(_fake_report(entries))  # no baseline, no column


@pytest.mark.parametrize(
    "content,match",
    [
        ("[1, 2]", "source"),
        ('{"k": {"eager": 1.0}}', "source"),
        ('{"source": "s", "k": {"eager": "fast"}}', "'k'"),
        ('{"source": "s", "k": {"eager": -1}}', "median ms > 0"),
        ('{"source": "s", "k": [1.0]}', "'k'"),
        ("{", "not JSON"),
    ],
)
def test_bad_baseline_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        report.load_baseline(path)
    with pytest.raises(ValueError, match="cannot read"):
        report.load_baseline(tmp_path / "missing.json")


def test_committed_h200_baseline_covers_the_headline_cases():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "results" / "bench" / "h200-before.json"
    baseline = report.load_baseline(path)
    assert set(baseline["medians_ms"]) == {c.key for c in cases.headline_cases("cuda")}
    assert "7eec0a8" in baseline["source"] and "2026-12-04" in baseline["source"] and "H200" in baseline["source"]
    assert baseline["medians_ms"]["kd_loss-forward+backward-forward-8192x128256-bfloat16"]["kdbench-triton"] == 4.596


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
