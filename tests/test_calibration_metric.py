"""kdbench.CalibrationError / CalibrationMetrics: torchmetrics agreement, the Metric protocol, DDP, Lightning."""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torchmetrics = pytest.importorskip("torchmetrics")
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.functional.classification import multiclass_calibration_error  # noqa: E402

import kdbench  # noqa: E402
from kdbench.calibration_metric import METRIC_KEYS, STATE_NAMES, CalibrationError, CalibrationMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# Against torchmetrics: it sums float32 confidences in float32, kdbench in float64.
TM_TOL = dict(rel=1e-5, abs=1e-6)
# Between kdbench results that differ only in the order of float64 sums.
SUM_TOL = dict(rel=1e-12, abs=1e-12)


def make_batch(shape: tuple[int, ...], seed: int, *, ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) float32 logits, about half of the argmaxes right, and (...) labels; a tenth ignored."""
    g = torch.Generator().manual_seed(seed)
    *lead, c = shape
    y = torch.randint(0, c, lead, generator=g)
    z = torch.randn(shape, generator=g) * 2.5
    z.scatter_add_(-1, y.unsqueeze(-1), 2.0 * torch.rand((*lead, 1), generator=g))
    if ignore_index is not None:
        y = torch.where(torch.rand(lead, generator=g) < 0.1, torch.full_like(y, ignore_index), y)
    return z, y


def tm_layout(z: torch.Tensor) -> torch.Tensor:
    """torchmetrics takes (N, C, ...): classes second."""
    return z if z.dim() == 2 else torch.movedim(z, -1, 1)


def as_float(t: torch.Tensor) -> float:
    return float(t.to(torch.float64))


# ---- agreement with torchmetrics ---------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [None, -1], ids=["no-ignore", "ignore=-1"])
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize(
    "shape, n_bins", [((600, 10), 15), ((400, 3), 7), ((6, 50, 5), 10), ((300, 100), 20)],
    ids=["600x10-15bins", "400x3-7bins", "6x50x5-10bins", "300x100-20bins"],
)  # fmt: skip
def test_agrees_with_torchmetrics_without_saturated_confidences(shape, n_bins, norm, ignore_index):
    z, y = make_batch(shape, seed=len(shape) * 1000 + shape[-1], ignore_index=ignore_index)
    assert float(torch.softmax(z, dim=-1).amax()) < 1.0  # the case where both binnings agree
    metric = CalibrationError(num_classes=shape[-1], n_bins=n_bins, norm=norm, ignore_index=ignore_index)
    for part_z, part_y in zip(z.chunk(3), y.chunk(3)):  # accumulated over batches
        metric.update(part_z, part_y)
    expected = multiclass_calibration_error(
        tm_layout(z), y, num_classes=shape[-1], n_bins=n_bins, norm=norm, ignore_index=ignore_index
    )
    got = metric.compute()
    assert got.dtype == torch.float64 and got.shape == ()
    assert as_float(got) == pytest.approx(as_float(expected), **TM_TOL)


def test_probabilities_with_inputs_probs_agree_with_torchmetrics():
    z, y = make_batch((500, 6), seed=3)
    p = torch.softmax(z, dim=-1)
    metric = CalibrationError(num_classes=6, inputs="probs")
    metric.update(p, y)
    expected = multiclass_calibration_error(p, y, num_classes=6)
    assert as_float(metric.compute()) == pytest.approx(as_float(expected), **TM_TOL)


def test_confidence_exactly_one_goes_to_the_last_bin_unlike_torchmetrics():
    # Two classes, logits (a, 0): confidence 1 / (1 + e^-a).  a = 50 saturates float32 to exactly 1.0.
    a_one, a_95, a_65 = 50.0, math.log(19.0), math.log(0.65 / 0.35)
    rows = [(a_one, 0), (a_one, 0), (a_one, 1), (a_one, 1)]  # conf 1.0, 2 of 4 right
    rows += [(a_95, 0)] * 4  # conf 0.95, 4 of 4 right: under-confident, unlike the saturated rows
    rows += [(a_65, 0), (a_65, 1)]  # conf 0.65, 1 of 2 right
    z = torch.tensor([[a, 0.0] for a, _ in rows], dtype=torch.float32)
    y = torch.tensor([label for _, label in rows])
    assert torch.equal(torch.softmax(z, dim=-1).amax(-1)[:4], torch.ones(4))  # exactly 1.0 in float32
    assert torch.equal(kdbench.calibration.calibration_rows(z, y).conf[:4], torch.ones(4))
    n, m = len(rows), 10

    ours = CalibrationMetrics(num_classes=2, n_bins=m)
    ours.update(z, y)
    assert ours.count[m - 1] == 8 and ours.count[6] == 2 and ours.count.sum() == n  # 1.0 shares the last bin

    # kdbench: the last bin [0.9, 1] holds the 8 rows: |6 - (4 + 4 * 0.95)| / 8 = 0.225; bin 6: |1 - 1.3| / 2 = 0.15.
    gaps, weights = [0.225, 0.15], [8 / n, 2 / n]
    want = {
        "ece": sum(w * g for w, g in zip(weights, gaps)),  # 0.21
        "rms_ce": math.sqrt(sum(w * g * g for w, g in zip(weights, gaps))),
        "mce": max(gaps),
    }
    got = ours.compute()
    for key, value in want.items():
        assert as_float(got[key]) == pytest.approx(value, abs=1e-6), key  # 1e-6: 0.95, 0.65 rounded to float32

    # torchmetrics: the 4 rows at 1.0 get a bin of their own (gap 0.5), the 0.95 rows keep bin 9 (gap 0.05).
    tm_gaps, tm_weights = [0.05, 0.5, 0.15], [4 / n, 4 / n, 2 / n]
    tm_want = {
        "l1": sum(w * g for w, g in zip(tm_weights, tm_gaps)),  # 0.25
        "l2": math.sqrt(sum(w * g * g for w, g in zip(tm_weights, tm_gaps))),
        "max": max(tm_gaps),
    }
    for norm, key in (("l1", "ece"), ("l2", "rms_ce"), ("max", "mce")):
        theirs = as_float(multiclass_calibration_error(z, y, num_classes=2, n_bins=m, norm=norm))
        assert theirs == pytest.approx(tm_want[norm], abs=1e-6), norm
        assert theirs > as_float(got[key]) + 0.03  # the split bin only adds: |a + b| <= |a| + |b|
    single = CalibrationError(num_classes=2, n_bins=m)
    single.update(z, y)
    assert as_float(single.compute()) == as_float(got["ece"])


# ---- the Metric protocol -----------------------------------------------------------------


def test_forward_returns_the_batch_value_and_accumulates():
    assert CalibrationError.full_state_update is False
    (z1, y1), (z2, y2) = make_batch((300, 8), seed=1), make_batch((200, 8), seed=2)
    metric = CalibrationError(num_classes=8, n_bins=12)
    v1 = metric(z1, y1)
    v2 = metric(z2, y2)
    # forward gives each batch's own value, not the running one ...
    assert as_float(v1) == kdbench.calibration_stats(z1, y1, n_bins=12).ece()
    assert as_float(v2) == kdbench.calibration_stats(z2, y2, n_bins=12).ece()
    both = kdbench.calibration_stats(torch.cat([z1, z2]), torch.cat([y1, y2]), n_bins=12)
    assert as_float(v2) != pytest.approx(both.ece(), abs=1e-6)
    # ... and adds the batch to the state once.
    assert float(metric.n) == 500 and metric.update_count == 2
    assert torch.equal(metric.count, both.count)
    assert as_float(metric.compute()) == pytest.approx(both.ece(), **SUM_TOL)


def test_calibration_metrics_forward_and_compute_return_every_key():
    z, y = make_batch((400, 5), seed=4, ignore_index=-100)
    metric = CalibrationMetrics(num_classes=5, ignore_index=-100)
    batch = metric(z, y)
    stats = kdbench.calibration_stats(z, y)
    want = dict(zip(METRIC_KEYS, (stats.accuracy(), stats.nll(), stats.brier(), stats.ece(), stats.ece("l2"),
                                  stats.ece("max"))))  # fmt: skip
    for values in (batch, metric.compute()):
        assert list(values) == list(METRIC_KEYS)
        assert {k: float(v) for k, v in values.items()} == want


def test_reset_empties_the_state():
    z, y = make_batch((100, 4), seed=5)
    metric = CalibrationError(num_classes=4)
    metric.update(z, y)
    metric.reset()
    assert all(float(getattr(metric, name).abs().sum()) == 0.0 for name in STATE_NAMES)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))
    z2, y2 = make_batch((50, 4), seed=6)
    metric.update(z2, y2)
    assert as_float(metric.compute()) == kdbench.calibration_stats(z2, y2).ece()


def test_a_batch_of_ignored_rows_gives_nan_and_leaves_the_state_alone():
    z, y = make_batch((60, 4), seed=7)
    metric = CalibrationMetrics(num_classes=4, ignore_index=-100)
    metric.update(z, y)
    before = {name: getattr(metric, name).clone() for name in STATE_NAMES}
    batch = metric(torch.randn(5, 4), torch.full((5,), -100))
    assert all(math.isnan(float(v)) for v in batch.values())
    assert all(torch.equal(getattr(metric, name), before[name]) for name in STATE_NAMES)
    assert float(metric.compute()["ece"]) == kdbench.calibration_stats(z, y).ece()


def test_merge_state_equals_one_metric_over_all_the_data():
    (za, ya), (zb, yb) = make_batch((250, 6), seed=8), make_batch((150, 6), seed=9)
    whole = CalibrationMetrics(num_classes=6)
    whole.update(za, ya)
    whole.update(zb, yb)
    first, second = CalibrationMetrics(num_classes=6), CalibrationMetrics(num_classes=6)
    first.update(za, ya)
    second.update(zb, yb)
    from_dict, from_stats = first.clone(), first.clone()
    first.merge_state(second)
    from_dict.merge_state(second.metric_state)
    from_stats.merge_state(kdbench.calibration_stats(zb, yb))
    for merged in (first, from_dict, from_stats):
        # 0 + a + b in both: the same float64 additions in the same order.
        assert all(torch.equal(getattr(merged, name), getattr(whole, name)) for name in STATE_NAMES)
        assert merged.compute() == whole.compute()
    with pytest.raises(ValueError, match="incoming_state: expected 15 bins, got 4"):
        first.merge_state(kdbench.calibration_stats(zb, yb, n_bins=4))


# torchmetrics counts update calls, and a loaded state has had none.
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric CalibrationError was called before:UserWarning")
def test_state_dict_holds_the_states_only_when_persistent():
    z, y = make_batch((300, 7), seed=10)
    metric = CalibrationError(num_classes=7, norm="l2")
    metric.update(z, y)
    # torchmetrics' default: metric states are not part of state_dict ...
    assert not set(STATE_NAMES) & set(metric.state_dict())
    # ... unless made persistent; then they survive a save / load round trip.
    metric.persistent(True)
    assert set(metric.state_dict()) == set(STATE_NAMES)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = CalibrationError(num_classes=7, norm="l2")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(getattr(restored, name), getattr(metric, name)) for name in STATE_NAMES)
    assert restored.compute() == metric.compute()
    z2, y2 = make_batch((40, 7), seed=11)
    restored.update(z2, y2)  # and accumulation goes on from the loaded sums
    both = kdbench.calibration_stats(torch.cat([z, z2]), torch.cat([y, y2]))
    assert as_float(restored.compute()) == pytest.approx(both.ece("l2"), **SUM_TOL)


@pytest.mark.parametrize("cast", ["to(float16)", "set_dtype(bfloat16)", "half()"])
def test_states_stay_float64_through_module_dtype_casts(cast):
    z, y = make_batch((200, 5), seed=12)
    metric = CalibrationError(num_classes=5)
    metric.update(z, y)
    before = metric.compute()
    if cast == "to(float16)":
        metric.to(torch.float16)
    elif cast == "set_dtype(bfloat16)":
        metric.set_dtype(torch.bfloat16)
    else:
        metric.half()
    assert all(getattr(metric, name).dtype == torch.float64 for name in STATE_NAMES)
    assert all(metric._defaults[name].dtype == torch.float64 for name in STATE_NAMES)
    assert metric.compute() == before
    metric.reset()
    metric.update(z, y)
    assert metric.count.dtype == torch.float64 and metric.compute() == before


def test_uint8_targets_are_not_confused_with_a_negative_ignore_index():
    # uint8 255 == -1 in a uint8 comparison; the metric compares int64 labels.
    c = 256
    z = torch.randn(10, c)
    y = torch.tensor([255, 0, 1, 255, 2, 3, 4, 5, 6, 7], dtype=torch.uint8)
    metric = CalibrationMetrics(num_classes=c, ignore_index=-1)
    metric.update(z, y)
    assert float(metric.n) == 10
    assert float(metric.compute()["nll"]) == pytest.approx(kdbench.calibration_stats(z, y.long()).nll(), **SUM_TOL)


def test_stats_property_and_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    z, y = make_batch((120, 4), seed=13)
    metric = CalibrationError(num_classes=4, n_bins=6)
    values = [metric(zb, yb) for zb, yb in zip(z.chunk(3), y.chunk(3))]
    stats = metric.stats
    assert isinstance(stats, kdbench.CalibrationStats) and stats.n_bins == 6 and float(stats.n) == 120
    fig, ax = metric.plot(values)
    assert len(ax.lines) >= 1
    fig2, _ = CalibrationMetrics(num_classes=4).plot([{"ece": v, "mce": 2 * v} for v in values])
    assert fig2 is not None


# ---- MetricCollection ----------------------------------------------------------------------


def test_in_a_metric_collection_the_dict_is_flattened_under_its_own_keys():
    z, y = make_batch((300, 6), seed=14)
    coll = MetricCollection(
        {"calibration_error": CalibrationError(num_classes=6), "cal": CalibrationMetrics(num_classes=6)}, prefix="val_"
    )
    batch = coll(z, y)
    coll.update(*make_batch((100, 6), seed=15))
    result = coll.compute()
    want_keys = {"val_calibration_error", *(f"val_{k}" for k in METRIC_KEYS)}
    assert set(batch) == want_keys and set(result) == want_keys
    whole = CalibrationMetrics(num_classes=6)
    whole.update(z, y)
    whole.update(*make_batch((100, 6), seed=15))
    expected = whole.compute()
    for key in METRIC_KEYS:
        assert result[f"val_{key}"] == expected[key]
    assert result["val_calibration_error"] == expected["ece"]
    # Same n_bins, equal states after the first update: one compute group, one pass per update.
    assert sorted(map(sorted, coll.compute_groups.values())) == [["cal", "calibration_error"]]


def test_in_a_metric_collection_a_key_clash_prefixes_the_dict_keys():
    z, y = make_batch((200, 6), seed=16)
    coll = MetricCollection({"ece": CalibrationError(num_classes=6), "cal": CalibrationMetrics(num_classes=6)})
    coll.update(z, y)
    result = coll.compute()
    assert set(result) == {"ece", *(f"cal_{k}" for k in METRIC_KEYS)}
    assert result["ece"] == result["cal_ece"]


# ---- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), r"^num_classes: expected an int >= 2, got 1"),
        (dict(num_classes=10.0), r"^num_classes: expected an int >= 2, got 10.0"),
        (dict(num_classes=True), r"^num_classes: expected an int >= 2, got True"),
        (dict(num_classes=10, n_bins=0), r"^n_bins: expected an int >= 1, got 0"),
        (dict(num_classes=10, n_bins=2.5), r"^n_bins: expected an int >= 1, got 2.5"),
        (dict(num_classes=10, norm="l3"), r"^norm: expected one of 'l1', 'l2', 'max', got 'l3'"),
        (dict(num_classes=10, ignore_index=1.5), r"^ignore_index: expected None or an int, got 1.5"),
        (dict(num_classes=10, validate_args="yes"), r"^validate_args: expected a bool, got 'yes'"),
        (dict(num_classes=10, inputs="softmax"), r"^inputs: expected one of 'auto', 'logits', 'probs', got 'softmax'"),
    ],
    ids=["num_classes-1", "num_classes-float", "num_classes-bool", "n_bins-0", "n_bins-float", "norm", "ignore_index",
         "validate_args", "inputs"],
)  # fmt: skip
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationError(**kwargs)
    if "norm" not in kwargs:
        with pytest.raises(ValueError, match=match):
            CalibrationMetrics(**kwargs)


def test_unknown_metric_options_are_refused_by_torchmetrics():
    with pytest.raises(ValueError, match="Unexpected keyword arguments"):
        CalibrationError(num_classes=10, temperature=2.0)


@pytest.mark.parametrize(
    "preds, target, error, match",
    [
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), ValueError, r"^preds: expected shape \(\.\.\., num_classes=6\)"),
        (torch.randn(6), torch.zeros(6, dtype=torch.long), ValueError, r"^preds: expected shape \(\.\.\., num_classes=6\)"),
        (torch.randn(4, 6), torch.tensor([0, 1, 6, 2]), ValueError, r"^target: expected class indices in \[0, 6\) "
         r"\(ignore_index is None\), found 6"),
        (torch.randn(4, 6), torch.tensor([0, -100, 1, 2]), ValueError, r"^target: .*found -100"),
        (torch.randn(4, 6), torch.zeros(3, dtype=torch.long), ValueError, r"^target: expected shape \(4,\)"),
        (torch.randn(4, 6), torch.zeros(4), TypeError, r"^target: expected an integer dtype"),
        (torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, r"^preds: expected a floating"),
    ],
    ids=["classes", "one-dim", "target-range", "no-ignore-index", "target-shape", "target-float", "preds-int"],
)  # fmt: skip
def test_bad_batches_name_the_argument(preds, target, error, match):
    metric = CalibrationError(num_classes=6)
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    assert float(metric.n) == 0


def test_validate_args_false_skips_the_class_count_check():
    metric = CalibrationError(num_classes=6, validate_args=False)
    metric.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))  # 5 classes: not checked
    assert float(metric.n) == 4


# ---- packaging -----------------------------------------------------------------------------


def test_import_kdbench_does_not_import_torchmetrics():
    code = (
        "import sys, kdbench; assert 'torchmetrics' not in sys.modules; "
        "from kdbench import *; assert 'torchmetrics' not in sys.modules; "
        "assert kdbench.CalibrationError.__module__ == 'kdbench.calibration_metric'; "
        "assert 'torchmetrics' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert kdbench.CalibrationError is CalibrationError and kdbench.CalibrationMetrics is CalibrationMetrics
    assert {"CalibrationError", "CalibrationMetrics"} <= set(dir(kdbench))


def test_without_torchmetrics_the_access_names_the_extra():
    code = (
        "import sys; sys.modules['torchmetrics'] = None; import kdbench\n"
        "assert 'CalibrationError' not in dir(kdbench)\n"
        "try:\n    kdbench.CalibrationMetrics\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'pip install "kdbench[metrics]"' in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'CalibrationErr'"):
        kdbench.CalibrationErr  # noqa: B018


# ---- two gloo processes --------------------------------------------------------------------

WORLD, DDP_N, DDP_C, DDP_BINS = 2, 1001, 10, 15
TIMEOUT_S = 120
# Each rank updates with every WORLD-th row (uneven shards, in two batches); compute()
# syncs through torchmetrics' own machinery and must see all of the data.
WORKER = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from test_calibration_metric import make_batch
import kdbench

rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n, c, n_bins = (int(a) for a in sys.argv[5:8])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
)
try:
    z, y = make_batch((n, c), seed=0, ignore_index=-100)
    z, y = z[rank::world], y[rank::world]
    cal = kdbench.CalibrationMetrics(num_classes=c, n_bins=n_bins, ignore_index=-100)
    err = kdbench.CalibrationError(num_classes=c, n_bins=n_bins, norm="max", ignore_index=-100)
    for part_z, part_y in zip(z.chunk(2), y.chunk(2)):
        cal.update(part_z, part_y)
        err.update(part_z, part_y)
    out = {k: float(v) for k, v in cal.compute().items()}
    out["mce_metric"] = float(err.compute())
    out["local_n"] = float(cal.n)  # after compute: back to this rank's own sums
    print(json.dumps(out))
finally:
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks() -> list[dict]:
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(WORLD), port, str(TESTS), str(DDP_N), str(DDP_C), str(DDP_BINS)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(rank), *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for rank in range(WORLD)
    ]  # fmt: skip
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.slow
def test_compute_in_two_gloo_processes_equals_one_process_on_all_the_data():
    ranks = _run_ranks()
    z, y = make_batch((DDP_N, DDP_C), seed=0, ignore_index=-100)
    whole = CalibrationMetrics(num_classes=DDP_C, n_bins=DDP_BINS, ignore_index=-100)
    whole.update(z, y)
    expected = {k: float(v) for k, v in whole.compute().items()}
    assert sum(r["local_n"] for r in ranks) == float(whole.n)
    assert all(0 < r["local_n"] < float(whole.n) for r in ranks)
    for r in ranks:
        assert r["accuracy"] == expected["accuracy"]  # a ratio of exact counts
        for key in METRIC_KEYS:
            assert r[key] == pytest.approx(expected[key], **SUM_TOL), key
        assert r["mce_metric"] == r["mce"]
    assert ranks[0] == {**ranks[1], "local_n": ranks[0]["local_n"]}


# ---- Lightning -----------------------------------------------------------------------------


@pytest.mark.slow
def test_lightning_logs_the_epoch_values_of_a_separate_pass(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 10, generator=g)
    x_train, x_val = torch.randn(256, 8, generator=g), torch.randn(200, 8, generator=g)
    y_train = torch.distributions.Categorical(logits=x_train @ w).sample()
    y_val = torch.distributions.Categorical(logits=x_val @ w).sample()
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=64)

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(8, 10)
            self.val_ece = kdbench.CalibrationError(num_classes=10, n_bins=15)
            self.val_cal = kdbench.CalibrationMetrics(num_classes=10, n_bins=15)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.val_ece(logits, y)
            self.log("val_ece", self.val_ece, on_step=False, on_epoch=True)
            self.val_cal.update(logits, y)

        def on_validation_epoch_end(self):
            self.log_dict({f"val_{k}": v for k, v in self.val_cal.compute().items()})
            self.val_cal.reset()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.epochs: list[dict[str, float]] = []

        def on_validation_end(self, trainer, pl_module):
            self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    model, recorder = Classifier(), Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=False), val_loader)

    assert len(recorder.epochs) == 2
    # The final model over the same batches: the same logits as the last validation epoch.
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in val_loader])
    stats = kdbench.calibration_stats(logits, y_val, n_bins=15)
    last = recorder.epochs[-1]
    # A Metric object is logged as its compute(), float64; log_dict values go through Lightning's float32 mean.
    assert last["val_ece"] == pytest.approx(stats.ece(), **SUM_TOL)
    want = dict(zip(METRIC_KEYS, (stats.accuracy(), stats.nll(), stats.brier(), stats.ece(), stats.ece("l2"),
                                  stats.ece("max"))))  # fmt: skip
    for key, value in want.items():
        assert last[f"val_{key}"] == pytest.approx(value, rel=1e-6), key
    # Both metrics were reset between epochs: the first epoch's values are those of the untrained model.
    assert recorder.epochs[0]["val_ece"] != pytest.approx(last["val_ece"], abs=1e-4)
    assert recorder.epochs[0]["val_nll"] > last["val_nll"]
    assert float(model.val_ece.n) == 0 and float(model.val_cal.n) == 0


# ---- the state-size benchmark --------------------------------------------------------------


def test_metric_memory_benchmark_reports_constant_against_growing_state(tmp_path):
    from kdbench.bench import metric_memory

    out = tmp_path / "metric_memory.md"
    argv = ["--samples", "20000", "--batch", "5000", "--every", "5000", "--classes", "10", "--threads", "1",
            "--out", str(out)]  # fmt: skip
    assert metric_memory.main(argv) == 0
    text = out.read_text()
    assert "python -m kdbench.bench.metric_memory --samples 20000" in text and "torch " in text and "UTC" in text
    rows = re.findall(r"^\| ([\d,]+) \| ([\d,]+) B[^|]*\| ([\d,]+) B[^|]*\|$", text, re.M)
    table = [tuple(int(v.replace(",", "")) for v in row) for row in rows]
    assert [n for n, _, _ in table] == [5000, 10000, 15000, 20000]
    assert {ours for _, ours, _ in table} == {(3 * 15 + 3) * 8}  # 3 M + 3 float64, whatever the samples
    assert [theirs for _, _, theirs in table] == [8 * n for n, _, _ in table]  # a float32 conf and correct per sample
    ece = re.findall(r"^\| (kdbench\.CalibrationError|torchmetrics [^|]+) \| [\d.]+ s \| [\d.]+ ms \| ([\d.]+) \|$", text, re.M)
    assert len(ece) == 2 and float(ece[0][1]) == pytest.approx(float(ece[1][1]), abs=2e-6)


def test_metric_memory_benchmark_rejects_bad_sizes(capsys):
    from kdbench.bench import metric_memory

    with pytest.raises(SystemExit) as exit_info:
        metric_memory.main(["--samples", "1000", "--batch", "300", "--every", "500"])
    assert exit_info.value.code == 2
    assert "argument --every: expected a multiple of --batch (300), got 500" in capsys.readouterr().err
