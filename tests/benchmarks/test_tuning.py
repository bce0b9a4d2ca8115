"""The tile-configuration sweep (``kdbench.bench.tuning``), against a fake kernel module.

The sweep sets ``TILE_CONFIG`` on the kernel module of a case to each of its
``TILE_CONFIGS``.  Here ``knob_module`` returns a stand-in module with those attributes
and the swept provider is kdbench's torch backend, so these tests check the machinery
(every configuration is set while it is checked and timed, reported, and the default
restored) whatever state the real kernels are in.
"""

from __future__ import annotations

import types

import pytest

from conftest import DEVICE
from kdbench.bench import cases, providers, report, tuning
from kdbench.bench.cases import FORWARD_BACKWARD

SWEEP_CASES = [
    cases.kd_case(3, 500, "float32", DEVICE, FORWARD_BACKWARD, "forward"),
    cases.kd_case(3, 500, "float32", DEVICE, FORWARD_BACKWARD, "jsd", beta=0.3),
    cases.calibration_case(5, 500, "float32", DEVICE),
]
CONFIGS = ((4096, 16, 1), (2048, 8, 2), (8192, 32, 1))


@pytest.fixture
def fake(monkeypatch):
    """A kernel module stand-in; records TILE_CONFIG at every call of the swept provider."""
    module = types.ModuleType("fake_kernel")
    module.TILE_CONFIGS = CONFIGS
    module.TILE_CONFIG = CONFIGS[0]
    module.seen = []
    monkeypatch.setattr(tuning, "knob_module", lambda case: module)
    monkeypatch.setattr(tuning, "PROVIDER", "kdbench-torch")
    real_run = providers.Runner.run

    def run(self):
        module.seen.append(module.TILE_CONFIG)
        return real_run(self)

    monkeypatch.setattr(providers.Runner, "run", run)
    return module


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: c.key)
def test_sweep_checks_and_times_every_configuration(fake, case):
    out = tuning.sweep(case, bandwidth=1e3, repeats=2, warmup=0, log=lambda _: None)
    assert fake.TILE_CONFIG == CONFIGS[0]  # restored
    assert out["default"] == list(CONFIGS[0]) and out["title"] == case.title
    assert [r["config"] for r in out["configs"]] == [list(c) for c in CONFIGS]
    # Checked once at each configuration, then two round-robin rounds, each call under its own configuration.
    assert fake.seen == [*CONFIGS, *CONFIGS, *CONFIGS]
    for r in out["configs"]:
        assert r["status"] == "ok", r
        assert r["repeats"] == 2 and 0 < r["min_s"] <= r["median_s"]
        assert r["GB/s"] == pytest.approx(case.bytes_moved / r["median_s"] / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["GB/s"] / 1e3)
    md = "\n".join(report._tuning_table(out))
    assert f"## Tile configuration (TILE_CONFIG): kdbench-triton, {case.title}" in md
    assert "| tile | warps | CTAs/SM | median ms |" in md
    assert "Default in this run: (4096, 16, 1)" in md
    assert "| 2048 | 8 | 2 | " in md
    assert md.count("\n| ") == 2 + len(CONFIGS)  # header, rule, one row per configuration


def test_a_wrong_configuration_is_reported_and_not_timed(fake, monkeypatch):
    real_check = providers.Runner.check

    def check(self, oracle):
        if fake.TILE_CONFIG == (2048, 8, 2):
            raise AssertionError("planted: (2048, 8, 2) is off")
        return real_check(self, oracle)

    monkeypatch.setattr(providers.Runner, "check", check)
    out = tuning.sweep(SWEEP_CASES[0], bandwidth=1e3, repeats=1, warmup=0, log=lambda _: None)
    status = {tuple(r["config"]): r["status"] for r in out["configs"]}
    assert status == {(4096, 16, 1): "ok", (2048, 8, 2): "wrong", (8192, 32, 1): "ok"}
    assert (2048, 8, 2) not in fake.seen  # the planted check raised before running it, and it was not timed
    assert "| 2048 | 8 | 2 | wrong: planted: (2048, 8, 2) is off |" in "\n".join(report._tuning_table(out))


def test_a_configuration_that_raises_is_an_error_not_timed(fake, monkeypatch):
    real_run = providers.Runner.run

    def run(self):
        if fake.TILE_CONFIG == (8192, 32, 1):
            raise RuntimeError("out of shared memory")
        return real_run(self)

    monkeypatch.setattr(providers.Runner, "run", run)
    out = tuning.sweep(SWEEP_CASES[2], bandwidth=1e3, repeats=1, warmup=0, log=lambda _: None)
    assert out["configs"][2] == {"config": [8192, 32, 1], "status": "error", "reason": "RuntimeError: out of shared memory"}
    assert fake.TILE_CONFIG == CONFIGS[0]


def test_past_the_deadline_no_configuration_is_started(fake):
    out = tuning.sweep(SWEEP_CASES[0], bandwidth=1e3, repeats=1, warmup=0, deadline=0.0, log=lambda _: None)
    assert [r["status"] for r in out["configs"]] == ["skipped"] * len(CONFIGS)
    assert fake.seen == []
    assert "deadline" in out["configs"][0]["reason"]


def test_configurations_after_the_deadline_are_skipped(fake, monkeypatch):
    ticks = iter([5.0, 5.0])  # the start and the first configuration are before the deadline; later ones after it
    monkeypatch.setattr(tuning, "time", types.SimpleNamespace(monotonic=lambda: next(ticks, 20.0)))
    out = tuning.sweep(SWEEP_CASES[0], bandwidth=1e3, repeats=2, warmup=0, deadline=10.0, log=lambda _: None)
    assert [r["status"] for r in out["configs"]] == ["ok", "skipped", "skipped"]
    assert fake.seen == [CONFIGS[0]] * 3  # checked, then timed twice: the compiled configuration is still timed
    assert "| 2048 | 8 | 2 | skipped: not run: the sweep's deadline" in "\n".join(report._tuning_table(out))


def test_a_module_without_tile_configs_is_not_swept(fake):
    del fake.TILE_CONFIGS
    out = tuning.sweep(SWEEP_CASES[0], bandwidth=1e3, repeats=1, warmup=0, log=lambda _: None)
    assert out["configs"] == [] and out["default"] is None and "no TILE_CONFIGS" in out["note"]
    assert fake.seen == []
    md = "\n".join(report._tuning_table(out))
    assert "Not swept: fake_kernel has no TILE_CONFIGS" in md and "| tile |" not in md


def test_tile_config_restores_after_an_error_and_rejects_bad_configs(fake):
    with pytest.raises(RuntimeError, match="inside"):
        with tuning.tile_config(fake, (1024, 4, 2)):
            assert fake.TILE_CONFIG == (1024, 4, 2)
            raise RuntimeError("inside")
    assert fake.TILE_CONFIG == CONFIGS[0]
    for bad in ((1024, 4), (1024, 4, 0), (1024.0, 4, 1), [1024, 4, 1], (1024, True, 1), 3):
        with pytest.raises(ValueError, match="config: expected a tuple"):
            with tuning.tile_config(fake, bad):
                pass
    assert fake.TILE_CONFIG == CONFIGS[0]


def test_real_kernel_modules_default_is_a_candidate():
    """Once the kernels have the knob: the default is one of the candidates, each a valid tuple."""
    for case in (SWEEP_CASES[0], SWEEP_CASES[2]):
        try:
            module = tuning.knob_module(case)
        except ImportError as e:  # the kernels are being rewritten
            pytest.skip(f"kernel module not importable: {e}")
        if getattr(module, "TILE_CONFIGS", None) is None:
            pytest.skip(f"{module.__name__} has no TILE_CONFIGS yet")
        for config in module.TILE_CONFIGS:
            tuning._checked(config)
        assert module.TILE_CONFIG in module.TILE_CONFIGS
