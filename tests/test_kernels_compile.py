"""Every Triton kernel compiles for Hopper (sm_90, the H100/H200) — checked without a GPU.

The interpreter runs the kernels' semantics on CPU but never lowers them, so a kernel
can pass every CPU test and still fail to compile on a GPU.  Triton ships its NVIDIA
backend (and ptxas) in the wheel, so the whole pipeline down to a cubin runs here.
ptxas's resource report also guards against a streaming loop spilling its registers,
and the PTX, compiled with the alignment the runtime would see, shows whether tiles
move as 128-bit loads and whether the streaming loops are software-pipelined.

The GPU machine runs an older Triton (3.6) than CI.  To check against it, run this file
as a script (it prints each case's problems as JSON, "" for none) in a virtualenv that
shadows CI's Triton:

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    env -u TRITON_INTERPRET /tmp/t36/bin/python tests/test_kernels_compile.py
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    HAVE_NVIDIA = "nvidia" in triton.backends.backends
except ImportError:  # pragma: no cover - depends on the triton build
    HAVE_NVIDIA = False

pytestmark = pytest.mark.skipif(not HAVE_NVIDIA, reason="this triton build has no NVIDIA backend")

HOPPER = GPUTarget("cuda", 90, 32) if HAVE_NVIDIA else None
# A few scalars may spill (the streamed JSD variant keeps 12 bytes on the stack with
# Triton 3.9's ptxas); a tile's worth of lanes spilling would be kilobytes.
MAX_SPILL_BYTES = 64
PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


def compile_for_hopper(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                       aligned: tuple[str, ...] = ()):
    """Compile ``fn`` to a cubin for sm_90.

    ``aligned`` names the arguments the runtime would specialise as multiples of 16
    (pointers from torch's allocator; strides and V of shapes such as (8192, 128256)),
    which is what lets Triton emit 128-bit loads: without it the PTX is scalar.
    """
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=HOPPER,
                          options={"num_warps": num_warps})


def memory_shape_problems(ptx: str, pipelined: bool, scalar_16bit_loads: int) -> str:
    """What is wrong with how the kernel's PTX moves memory ('' if nothing).

    pipelined: the streaming loops must copy tiles with cp.async (16-byte copies), else
        the tile loads must be 128-bit ``ld.global.v4``;
    scalar_16bit_loads: how many scalar 16-bit loads are expected (a gathered label logit).
    """
    problems = []
    if pipelined and "cp.async.cg.shared.global" not in ptx:
        problems.append("the streaming loops are not software-pipelined (no cp.async)")
    if not pipelined and not re.search(r"ld\.global[.\w:]*\.v4\.b32", ptx):
        problems.append("no 128-bit tile loads (ld.global.v4)")
    scalar = len(re.findall(r"ld\.global[.\w:]*\.b16 ", ptx))
    if scalar > scalar_16bit_loads:
        problems.append(f"{scalar} scalar 16-bit loads, expected at most {scalar_16bit_loads}")
    return "; ".join(problems)


def ptxas_report(compiled) -> str:
    """ptxas -v on the kernel's PTX ('' when the wheel has no ptxas)."""
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*"))
    if not found:
        return ""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([found[0], "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    return out.stderr


def _kd_signature(dtype: str) -> dict[str, str]:
    p = PTR[dtype]
    return {
        "s_ptr": p, "s_stride": "i64", "t_ptr": p, "t_stride": "i64", "y_ptr": "*i64", "loss_ptr": "*fp32",
        "g_ptr": p, "g_stride": "i64", "gscale_ptr": "*fp32", "V": "i32", "inv_t": "fp32", "soft_w": "fp32",
        "hard_w": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1m_beta": "fp32", "ignore_index": "i32",
    }  # fmt: skip


KD_VARIANTS = [
    (div, labels, hard, single)
    for div, labels, hard, single in itertools.product((0, 1, 2), (True, False), (True, False), (True, False))
    if labels or not hard
]
CALIBRATION_CASES = [(65536, 32000, 15), (4096, 10, 15), (100, 262144, 100), (5000, 1000, 1024)]


def _compile_everything() -> dict[str, str]:
    """Compile every case; {case id: "" on success with no spills, else what went wrong}."""
    from kdbench.kernels.calibration import _calibration_kernel, launch_plan
    from kdbench.kernels.kd_loss import STREAM_STAGES, _kd_fwd_kernel, _scale_grad_kernel

    results: dict[str, str] = {}

    def attempt(case: str, fn, signature, consts, warps, check_spills=False, aligned=(), memory=None):
        try:
            compiled = compile_for_hopper(fn, signature, consts, warps, aligned)
            report = ptxas_report(compiled) if check_spills else ""
            spilled = re.search(r"(\d+) bytes spill stores", report)
            too_many = spilled is not None and int(spilled.group(1)) > MAX_SPILL_BYTES
            results[case] = f"spills: {report}" if too_many else ""
            if memory is not None and not results[case]:
                results[case] = memory_shape_problems(compiled.asm["ptx"], *memory)
        except Exception as exc:  # reported per case by the tests
            results[case] = f"{type(exc).__name__}: {exc}"[:2000]

    kd_aligned = ("s_ptr", "s_stride", "t_ptr", "t_stride", "y_ptr", "loss_ptr", "g_ptr", "g_stride", "V")
    for div, labels, hard, single in KD_VARIANTS:
        consts = dict(DIVERGENCE=div, HAS_LABELS=labels, HAS_SOFT=True, HAS_HARD=hard, T_IS_ONE=False,
                      COMPUTE_GRAD=True, SCALE_GRAD=True, SINGLE_BLOCK=single,
                      NUM_STAGES=1 if single else STREAM_STAGES, ROUND_BY_HAND=False, BLOCK=4096)
        attempt(f"kd-{div}-{labels}-{hard}-{single}", _kd_fwd_kernel, _kd_signature("bfloat16"), consts, 16, True,
                kd_aligned, (not single, int(hard)))
    for dtype in sorted(PTR):
        consts = dict(DIVERGENCE=0, HAS_LABELS=True, HAS_SOFT=True, HAS_HARD=True, T_IS_ONE=True, COMPUTE_GRAD=True,
                      SCALE_GRAD=False, SINGLE_BLOCK=False, NUM_STAGES=STREAM_STAGES, ROUND_BY_HAND=False, BLOCK=4096)
        attempt(f"kd-dtype-{dtype}", _kd_fwd_kernel, _kd_signature(dtype), consts, 16, aligned=kd_aligned,
                memory=(True, 1))
        for per_row in (False, True):
            attempt(f"scale-{dtype}-{per_row}", _scale_grad_kernel,
                    {"g_ptr": PTR[dtype], "g_stride": "i64", "go_ptr": "*fp32", "V": "i32"},
                    dict(PER_ROW=per_row, ROUND_BY_HAND=False, BLOCK=4096), 4)
        for n, c, n_bins in CALIBRATION_CASES:
            plan = launch_plan(n, c, n_bins)
            signature = {
                "x_ptr": PTR[dtype], "x_stride": "i64", "y_ptr": "*i64", "conf_ptr": "*fp32", "pred_ptr": "*i64",
                "nll_ptr": "*fp32", "brier_ptr": "*fp32", "part_ptr": "*fp64", "N": "i32", "C": "i32",
                "inv_t": "fp32", "ignore_index": "i32", "n_bins": "i32", "rows_per_prog": "i32",
            }  # fmt: skip
            consts = dict(BLOCK_N=plan["BLOCK_N"], BLOCK_C=plan["BLOCK_C"], BINS_PAD=plan["BINS_PAD"],
                          SINGLE_TILE=plan["SINGLE_TILE"], NUM_STAGES=plan["NUM_STAGES"])
            # C a multiple of 16 (32000, 262144) lets the runtime specialise the row stride.
            aligned = ("x_ptr", "y_ptr") + (("x_stride", "C") if c % 16 == 0 else ())
            memory = (plan["NUM_STAGES"] > 1, 1) if c % 16 == 0 else None
            attempt(f"calibration-{dtype}-{n}-{c}-{n_bins}", _calibration_kernel, signature, consts, plan["num_warps"],
                    check_spills=not plan["SINGLE_TILE"], aligned=aligned, memory=memory)
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    # The test session runs kernels through the interpreter (TRITON_INTERPRET=1), whose
    # kernel objects cannot be lowered: compile in a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("divergence,has_labels,has_hard,single_block", KD_VARIANTS)
def test_kd_forward_kernel_compiles_without_spills(compiled, divergence, has_labels, has_hard, single_block):
    assert compiled[f"kd-{divergence}-{has_labels}-{has_hard}-{single_block}"] == ""


@pytest.mark.parametrize("dtype", sorted(PTR))
def test_kd_kernels_compile_for_each_dtype(compiled, dtype):
    assert compiled[f"kd-dtype-{dtype}"] == ""
    assert compiled[f"scale-{dtype}-False"] == "" and compiled[f"scale-{dtype}-True"] == ""


@pytest.mark.parametrize("dtype", sorted(PTR))
@pytest.mark.parametrize("n,c,n_bins", CALIBRATION_CASES)
def test_calibration_kernel_compiles_without_spills(compiled, n, c, n_bins, dtype):
    assert compiled[f"calibration-{dtype}-{n}-{c}-{n_bins}"] == ""


if __name__ == "__main__":
    print(json.dumps(_compile_everything()))
