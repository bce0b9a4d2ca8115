"""CalibrationStats.all_reduce across two gloo processes equals the single-process statistics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calibration_helpers import make_logits

from kdbench import calibration_stats

TESTS = Path(__file__).resolve().parent
WORLD = 2
N, C, N_BINS = 1001, 10, 15
TIMEOUT_S = 120

# Each rank takes every WORLD-th row (uneven shards), sums its statistics, all-reduces them
# over the default group and over an explicit group, and prints what it got.
WORKER = """
import json, sys
from datetime import timedelta
import torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from calibration_helpers import make_logits
import kdbench

rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n, c, n_bins = (int(a) for a in sys.argv[5:8])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
)
try:
    z, y = make_logits(n, c, seed=0, ignore_frac=0.1)
    local = kdbench.calibration_stats(z[rank::world], y[rank::world], n_bins=n_bins, backend="torch")
    total = local.all_reduce()
    again = local.all_reduce(group=dist.new_group(list(range(world))))
    print(json.dumps({
        "local_n": float(local.n),
        "stats": total.to_dict(),
        "again": again.to_dict(),
        "ece": total.ece(), "rms": total.ece("l2"), "mce": total.ece("max"),
        "accuracy": total.accuracy(), "nll": total.nll(), "brier": total.brier(),
    }))
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
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(rank), str(WORLD), port, str(TESTS), str(N), str(C), str(N_BINS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(WORLD)
    ]
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
def test_all_reduced_stats_equal_the_single_process_stats():
    ranks = _run_ranks()
    z, y = make_logits(N, C, seed=0, ignore_frac=0.1)
    whole = calibration_stats(z, y, n_bins=N_BINS, backend="torch")
    # Each rank saw only part of the data ...
    assert sum(r["local_n"] for r in ranks) == float(whole.n)
    assert all(0 < r["local_n"] < float(whole.n) for r in ranks)
    for r in ranks:
        # ... and after the all-reduce holds the statistics of all of it.
        assert r["stats"]["count"] == whole.count.tolist()
        assert r["stats"]["correct_sum"] == whole.correct_sum.tolist()
        assert r["stats"]["n"] == float(whole.n)
        assert r["again"] == r["stats"]
        got = torch.tensor(r["stats"]["conf_sum"], dtype=torch.float64)
        torch.testing.assert_close(got, whole.conf_sum, rtol=1e-13, atol=1e-13)
        assert r["ece"] == pytest.approx(whole.ece(), abs=1e-13)
        assert r["rms"] == pytest.approx(whole.ece("l2"), abs=1e-13)
        assert r["mce"] == pytest.approx(whole.ece("max"), abs=1e-13)
        assert r["accuracy"] == whole.accuracy()
        assert r["nll"] == pytest.approx(whole.nll(), rel=1e-13)
        assert r["brier"] == pytest.approx(whole.brier(), rel=1e-13)
    assert ranks[0]["stats"] == ranks[1]["stats"]
