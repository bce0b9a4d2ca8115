"""Every Triton kernel compiles for Hopper (sm_90, the H100/H200), within its instruction budget — checked without a GPU.

The interpreter runs the kernels' semantics on CPU but never lowers them, so a kernel
can pass every CPU test and still fail to compile on a GPU.  Triton ships its NVIDIA
backend (ptxas, cuobjdump) in the wheel, so the whole pipeline down to a cubin runs
here.  From it these tests read:

* ptxas's resource report: no streaming loop may spill its registers;
* the PTX, compiled with the alignment the runtime would see: tiles move as 128-bit loads;
* the SASS: the instructions of the persistent loop's body, per element.  That is the
  budget that decides speed on Hopper: an H200 issues about 3.3e13 thread
  instructions per second (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz) and copies
  about 4.1e12 bytes per second, so a kernel at copy bandwidth can afford about 8
  instructions per byte it moves.  Budgets: calibration_stats 16 per bf16 logit;
  kd_loss 40 per (student, teacher) bf16 element pair for forward KL and 60 for
  reverse KL and JSD (all passes, the gradient write included).  A float32 element
  moves twice the bytes and gets twice the budget.  The kd kernel as one launch meets
  them; so do forward and reverse KL as separate launches, the default for chunked rows
  (faster on an H200 so far, see ``kdbench/kernels/kd_loss.py``), over all launches.
  JSD by launches reads every tile three times and is held to a ceiling instead.

How the static count relates to what the GPU executes: the body of the persistent
loop runs once per work item and has no data-dependent branches except the barrier's
spin loop (left out: waiting, not work) and a few per-row ``if``s, so instructions per
item = the body's length, and per element = that / the elements each thread holds.
Counted this way, the previous streaming kernels came to 77 (forward KL), 183 (JSD) and
42 (calibration) per element, where Nsight Compute measured 80, 195 and 51 on an H200
(2026-12-04, ``sm__sass_thread_inst_executed`` over the element count); the static count
reads 4 to 18% low, the difference being per-row work outside the loop.  For the
present kernels ``python -m kdbench.bench.profile_kernels`` makes the same comparison
on a GPU.

The GPU machine runs an older Triton (3.6) than CI.  To check against it, run this file
as a script (it prints each case's problems as JSON, "" for none) in a virtualenv that
shadows CI's Triton:

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    env -u TRITON_INTERPRET /tmp/t36/bin/python tests/test_kernels_compile.py
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

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
MAX_SPILL_BYTES = 0
PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Instructions per element (a bf16 logit, or a bf16 (student, teacher) pair): see above.
BUDGET = {"calibration": 16.0, "kd-0": 40.0, "kd-1": 60.0, "kd-2": 60.0}
# The headline shapes of the budgets, and a small-V one (several rows per tile).
KD_SHAPES = [(8192, 128256, "bfloat16"), (65536, 1000, "float32"), (16384, 32000, "bfloat16")]
CAL_SHAPES = [(65536, 32000, "bfloat16"), (65536, 1000, "float32"), (4096, 262144, "bfloat16")]


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for_hopper(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                       aligned: tuple[str, ...] = ()):
    """Compile ``fn`` to a cubin for sm_90, as the launchers do (no automatic pipelining, FMA contraction on).

    ``aligned`` names the arguments the runtime would specialise as multiples of 16
    (pointers from torch's allocator; strides and V of shapes such as (8192, 128256)),
    which is what lets Triton emit 128-bit loads: without it the PTX is scalar.
    """
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": True})


def ptxas_report(compiled) -> str:
    """ptxas -v on the kernel's PTX ('' when the wheel has no ptxas).

    Newer wheels carry a second ptxas for newer PTX versions; the first that accepts
    the PTX is used.
    """
    candidates = [p for p in (_bin("ptxas-blackwell"), _bin("ptxas")) if os.path.exists(p)]
    if not candidates:
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        for exe in candidates:
            out = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                return out.stderr
    finally:
        os.unlink(f.name)
    raise AssertionError(out.stderr)


def sass(compiled) -> str:
    """cuobjdump -sass of the cubin ('' when the wheel has no cuobjdump)."""
    if not os.path.exists(_bin("cuobjdump")):
        return ""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    return out.stdout


def loop_body_instructions(sass_text: str) -> int:
    """Instructions in the body of the outermost loop, inner loops (barrier spins) left out.

    Loops are found from backward branches (``BRA`` to a lower address); the outermost
    is the widest.  Raises if the SASS has no loop.
    """
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass_text)]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        raise AssertionError("no loop in the SASS")
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    inner = [(a, b) for a, b in loops if (a, b) != (lo, hi) and lo <= a and b <= hi]
    return sum(
        1 for addr, text in ins
        if lo <= addr <= hi and not any(a <= addr <= b for a, b in inner) and not text.startswith("NOP")
    )  # fmt: skip


def memory_shape_problems(ptx: str, scalar_16bit_loads: int) -> str:
    """What is wrong with how the kernel's PTX moves memory ('' if nothing): tiles must load
    as 128-bit ``ld.global.v4``, and at most ``scalar_16bit_loads`` scalar 16-bit loads
    (a gathered label logit) are expected."""
    problems = []
    if not re.search(r"ld\.global[.\w:]*\.v4\.b32", ptx):
        problems.append("no 128-bit tile loads (ld.global.v4)")
    scalar = len(re.findall(r"ld\.global[.\w:]*\.b16 ", ptx))
    if scalar > scalar_16bit_loads:
        problems.append(f"{scalar} scalar 16-bit loads, expected at most {scalar_16bit_loads}")
    return "; ".join(problems)


def _kd_signature(dtype: str) -> dict[str, str]:
    p = PTR[dtype]
    return {
        "s_ptr": p, "s_stride": "i64", "t_ptr": p, "t_stride": "i64", "y_ptr": "*i64", "part_ptr": "*fp32",
        "g_ptr": p, "g_stride": "i64", "scale_ptr": "*fp32", "go_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
        "N": "i32", "V": "i32", "R": "i32", "n_items": "i32", "lag": "i32", "inv_t": "fp32", "soft_w": "fp32", "hard_w": "fp32",
        "beta": "fp32", "ub_s": "fp32", "ub_t": "fp32", "ignore_index": "i32",
    }  # fmt: skip


def _cal_signatures(dtype: str) -> tuple[dict[str, str], dict[str, str]]:
    stats = {
        "x_ptr": PTR[dtype], "x_stride": "i64", "y_ptr": "*i64", "stat_ptr": "*fp32", "arg_ptr": "*i32", "N": "i32",
        "C": "i32", "R": "i32", "n_items": "i32", "inv_t": "fp32", "ignore_index": "i32",
    }  # fmt: skip
    finish = {
        "x_ptr": PTR[dtype], "x_stride": "i64", "y_ptr": "*i64", "stat_ptr": "*fp32", "arg_ptr": "*i32",
        "conf_ptr": "*fp32", "pred_ptr": "*i64", "nll_ptr": "*fp32", "brier_ptr": "*fp32", "part_ptr": "*fp64",
        "N": "i32", "C": "i32", "R": "i32", "inv_t": "fp32", "ignore_index": "i32", "n_bins": "i32",
        "rows_per_prog": "i32",
    }  # fmt: skip
    return stats, finish


# (divergence, labels, hard term, chunked rows, no-grad forward)
KD_VARIANTS = [
    (div, labels, hard, chunked, grad)
    for div, labels, hard, chunked, grad in itertools.product((0, 1, 2), (True, False), (True, False), (True, False),
                                                              (True, False))
    if (labels or not hard) and (grad or not hard)
]


def _per_element(compiled, plan, num_warps: int) -> float:
    return loop_body_instructions(sass(compiled)) / (plan.ROWS * plan.BLOCK / (32 * num_warps))


def _compile_everything() -> dict[str, object]:
    """Compile every case: {case id: "" on success, else what went wrong}, and {"count:<case>": per element}."""
    from kdbench.kernels import calibration as cal
    from kdbench.kernels import kd_loss as kd
    from kdbench.kernels._utils import pick_config, tile_plan

    results: dict[str, object] = {}

    def attempt(case, fn, signature, consts, warps, aligned=(), scalar16=None, plan=None, per_sm=None):
        try:
            compiled = compile_for_hopper(fn, signature, consts, warps, aligned)
            report = ptxas_report(compiled)
            spilled = re.search(r"(\d+) bytes spill stores", report)
            results[case] = f"spills: {report}" if spilled and int(spilled.group(1)) > MAX_SPILL_BYTES else ""
            if scalar16 is not None and not results[case]:
                results[case] = memory_shape_problems(compiled.asm["ptx"], scalar16)
            if plan is not None:
                results[f"count:{case}"] = _per_element(compiled, plan, warps)
            if per_sm is not None and not results[case]:
                # The programs per SM a tile configuration asks for must fit in its registers
                # (64K per SM, allocated per warp in units of 256).
                regs = int(re.search(r"Used (\d+) registers", report).group(1))
                fit = min(65536 // (triton.cdiv(regs * 32, 256) * 256 * warps), 64 // warps)
                if fit < per_sm:
                    results[case] = f"{regs} registers: {fit} programs of {warps} warps fit per SM, {per_sm} asked"
        except Exception as exc:  # reported per case by the tests
            results[case] = f"{type(exc).__name__}: {exc}"[:2000]

    kd_aligned = ("s_ptr", "s_stride", "t_ptr", "t_stride", "y_ptr", "part_ptr", "g_ptr", "g_stride", "V")

    def kd_consts(div, labels, hard, grad, plan, phase=0, pairs=True, lagged=False):
        return dict(DIVERGENCE=div, HAS_LABELS=labels, HAS_SOFT=True, HAS_HARD=hard, T_IS_ONE=False,
                    COMPUTE_GRAD=grad, GO_MODE=0, PHASE=phase, ROUND_BY_HAND=False, ON_GPU=True, PAIRS=pairs,
                    LAGGED=lagged, ROWS=plan.ROWS, BLOCK=plan.BLOCK, CHUNKS_PAD=plan.CHUNKS_PAD)

    def kd_plan(n, v, dtype):
        tile, warps, _ = pick_config(v, BYTES[dtype], kd.TILE_CONFIG, kd.NARROW_CONFIG)
        return tile_plan(n, v, tile), warps

    for div, labels, hard, chunked, grad in KD_VARIANTS:
        plan, warps = kd_plan(8192, 128256 if chunked else 1000, "bfloat16")
        attempt(f"kd-{div}-{labels}-{hard}-{chunked}-{grad}", kd._kd_kernel, _kd_signature("bfloat16"),
                kd_consts(div, labels, hard, grad, plan), warps, kd_aligned, plan.ROWS if hard else 0)
    for n, v, dtype in KD_SHAPES:
        plan, warps = kd_plan(n, v, dtype)
        pairs = dtype == "bfloat16" and v % 2 == 0  # as kd_loss's launcher decides (loads_pairs)
        for div in (0, 1, 2):
            aligned = kd_aligned if v % 16 == 0 else ()
            attempt(f"kd-shape-{n}-{v}-{dtype}-{div}", kd._kd_kernel, _kd_signature(dtype),
                    kd_consts(div, False, False, True, plan, pairs=pairs), warps, aligned, plan=plan)
            if plan.chunks > 1:
                # The phases as separate launches (the default for chunked rows): all passes count.
                for phase in (1, 2, 3) if div == 2 else (1, 2):  # STATS, LOSS, GRAD
                    attempt(f"kd-shape-{n}-{v}-{dtype}-{div}-phase{phase}", kd._kd_kernel, _kd_signature(dtype),
                            kd_consts(div, False, False, True, plan, phase, pairs), warps, aligned, plan=plan)
                # Every pass in one launch, each a few items behind the statistics ("lagged").
                attempt(f"kd-shape-{n}-{v}-{dtype}-{div}-lagged", kd._kd_kernel, _kd_signature(dtype),
                        kd_consts(div, False, False, True, plan, 0, pairs, True), warps, aligned, plan=plan)
    plan, warps = kd_plan(8192, 128256, "bfloat16")
    for phase in (1, 2, 3):  # STATS, LOSS, GRAD
        attempt(f"kd-phase-{phase}", kd._kd_kernel, _kd_signature("bfloat16"), kd_consts(2, True, True, True, plan, phase),
                warps, kd_aligned)
    for labels, hard in ((True, True), (True, False)):
        attempt(f"kd-lagged-{labels}-{hard}", kd._kd_kernel, _kd_signature("bfloat16"),
                kd_consts(2, labels, hard, True, plan, 0, True, True), warps, kd_aligned)
    for dtype in sorted(PTR):
        attempt(f"kd-fp16-grad-{dtype}", kd._kd_kernel, _kd_signature(dtype),
                {**kd_consts(0, True, True, True, plan, pairs=dtype == "bfloat16"), "GO_MODE": 2}, warps, kd_aligned)
        for per_row in (False, True):
            attempt(f"scale-{dtype}-{per_row}", kd.scale_grad_kernel,
                    {"g_ptr": PTR[dtype], "g_stride": "i64", "go_ptr": "*fp32", "V": "i32"},
                    dict(PER_ROW=per_row, ROUND_BY_HAND=False, BLOCK=4096), 4)

    # Every tile-configuration candidate (what `kdbench bench` sweeps) at the headline shape: no spills,
    # and the programs per SM it asks for fit in the registers it takes.
    for tile, warps, per_sm in kd.TILE_CONFIGS:
        plan = tile_plan(8192, 128256, tile)
        for phase in (1, 2):
            attempt(f"tile-kd-{tile}-{warps}-{per_sm}-phase{phase}", kd._kd_kernel, _kd_signature("bfloat16"),
                    kd_consts(0, False, False, True, plan, phase), warps, kd_aligned, per_sm=per_sm)
    for tile, warps, per_sm in cal.TILE_CONFIGS:
        plan = tile_plan(65536, 32000, tile)
        attempt(f"tile-cal-{tile}-{warps}-{per_sm}", cal._chunk_stats_kernel, _cal_signatures("bfloat16")[0],
                dict(PAIRS=True, ROWS=plan.ROWS, BLOCK=plan.BLOCK), warps,
                ("x_ptr", "y_ptr", "stat_ptr", "arg_ptr", "x_stride", "C"), per_sm=per_sm)

    for n, c, dtype in CAL_SHAPES:
        c_tile, c_warps, _ = pick_config(c, BYTES[dtype], cal.TILE_CONFIG, cal.NARROW_CONFIG)
        plan = tile_plan(n, c, c_tile)
        stats_sig, finish_sig = _cal_signatures(dtype)
        aligned = ("x_ptr", "y_ptr", "stat_ptr", "arg_ptr") + (("x_stride", "C") if c % 16 == 0 else ())
        consts = dict(PAIRS=dtype == "bfloat16" and c % 2 == 0, ROWS=plan.ROWS, BLOCK=plan.BLOCK)
        attempt(f"cal-stats-{n}-{c}-{dtype}", cal._chunk_stats_kernel, stats_sig, consts,
                c_warps, aligned, 0 if c % 16 == 0 else None, plan=plan)
        fin = cal.finish_plan(n, plan.chunks, 15)
        attempt(f"cal-finish-{n}-{c}-{dtype}", cal._finish_kernel, finish_sig,
                dict(BLOCK_N=fin["BLOCK_N"], CHUNKS_PAD=fin["CHUNKS_PAD"], BINS_PAD=fin["BINS_PAD"]), fin["num_warps"])
    return results


def headline_counts() -> dict[str, float]:
    """Static instructions per element of the headline cases, summed over the launches of one
    call in the kd kernel's ``ROW_MEETING`` (for the GPU profile's table)."""
    from kdbench.kernels import calibration as cal
    from kdbench.kernels import kd_loss as kd
    from kdbench.kernels._utils import pick_config, tile_plan

    out = {}
    tile, warps, _ = pick_config(128256, 2, kd.TILE_CONFIG, kd.NARROW_CONFIG)
    plan = tile_plan(8192, 128256, tile)
    for div, name in enumerate(("kd-forward", "kd-reverse", "kd-jsd")):
        if kd.ROW_MEETING == "launches":
            launches = [(phase, False) for phase in ((1, 2, 3) if div == 2 else (1, 2))]
        else:
            launches = [(0, kd.ROW_MEETING == "lagged")]
        out[name] = 0.0
        for phase, lagged in launches:
            consts = dict(DIVERGENCE=div, HAS_LABELS=False, HAS_SOFT=True, HAS_HARD=False, T_IS_ONE=False,
                          COMPUTE_GRAD=True, GO_MODE=0, PHASE=phase, ROUND_BY_HAND=False, ON_GPU=True, PAIRS=True,
                          LAGGED=lagged, ROWS=plan.ROWS, BLOCK=plan.BLOCK, CHUNKS_PAD=plan.CHUNKS_PAD)
            compiled = compile_for_hopper(kd._kd_kernel, _kd_signature("bfloat16"), consts, warps,
                                          ("s_ptr", "s_stride", "t_ptr", "t_stride", "part_ptr", "g_ptr", "g_stride",
                                           "V"))
            out[name] += _per_element(compiled, plan, warps)
    tile, warps, _ = pick_config(32000, 2, cal.TILE_CONFIG, cal.NARROW_CONFIG)
    plan = tile_plan(65536, 32000, tile)
    compiled = compile_for_hopper(cal._chunk_stats_kernel, _cal_signatures("bfloat16")[0],
                                  dict(PAIRS=True, ROWS=plan.ROWS, BLOCK=plan.BLOCK), warps,
                                  ("x_ptr", "y_ptr", "stat_ptr", "arg_ptr", "x_stride", "C"))
    out["calibration"] = _per_element(compiled, plan, warps)
    return out


def test_headline_counts_follow_the_default_launches(compiled):
    """What the GPU profile (kdbench.bench.profile_kernels) compares Nsight's counts with: the
    launches of one call, as the test cases above count them."""
    counts = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; sys.path.insert(0, 'tests'); import test_kernels_compile as t; "
         "print(json.dumps(t.headline_counts()))"],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    ).stdout)  # fmt: skip
    case = "kd-shape-8192-128256-bfloat16"
    assert counts["kd-forward"] == pytest.approx(compiled[f"count:{case}-0-phase1"] + compiled[f"count:{case}-0-phase2"])
    assert counts["kd-jsd"] == pytest.approx(sum(compiled[f"count:{case}-2-phase{p}"] for p in (1, 2, 3)))
    assert counts["calibration"] == pytest.approx(compiled["count:cal-stats-65536-32000-bfloat16"])


@pytest.fixture(scope="module")
def compiled() -> dict[str, object]:
    # The test session runs kernels through the interpreter (TRITON_INTERPRET=1), whose
    # kernel objects cannot be lowered: compile in a fresh process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("divergence,has_labels,has_hard,chunked,grad", KD_VARIANTS)
def test_kd_kernel_compiles_without_spills(compiled, divergence, has_labels, has_hard, chunked, grad):
    assert compiled[f"kd-{divergence}-{has_labels}-{has_hard}-{chunked}-{grad}"] == ""


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_kd_kernel_phases_compile(compiled, phase):
    """The phases as separate launches (the fallback when a barrier cannot be used)."""
    assert compiled[f"kd-phase-{phase}"] == ""


@pytest.mark.parametrize("dtype", sorted(PTR))
def test_kd_kernels_compile_for_each_dtype(compiled, dtype):
    assert compiled[f"kd-fp16-grad-{dtype}"] == ""
    assert compiled[f"scale-{dtype}-False"] == "" and compiled[f"scale-{dtype}-True"] == ""


@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["forward", "reverse", "jsd"])
@pytest.mark.parametrize("n,v,dtype", KD_SHAPES, ids=str)
def test_kd_single_read_kernel_within_instruction_budget(compiled, n, v, dtype, divergence):
    """The kernel as one launch (rows that fit a tile; chunked rows meeting at the in-kernel barrier)."""
    case = f"kd-shape-{n}-{v}-{dtype}-{divergence}"
    assert compiled[case] == ""
    budget = BUDGET[f"kd-{divergence}"] * BYTES[dtype] / 2
    per_pair = compiled[f"count:{case}"]
    assert per_pair <= budget, f"{per_pair:.1f} instructions per element pair, budget {budget:.0f}"


@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["forward", "reverse", "jsd"])
@pytest.mark.parametrize("n,v,dtype", [s for s in KD_SHAPES if s[1] > 2048], ids=str)
def test_kd_phase_launches_within_instruction_budget(compiled, n, v, dtype, divergence):
    """Chunked rows by separate launches (the default, measured faster on an H200) load and
    exponentiate every tile in each launch; the later launches take the row's maxima from
    the statistics launch instead of the tile's own.  At (8192, 128256) bf16 with Triton 3.9:
    forward KL 22.1 + 17.8 = 39.9 per pair, reverse KL 42.1, JSD 16.6 + 26.0 + 23.1 = 65.6
    (53, 50 and 95 when the later launches recomputed the tile's statistics; Triton 3.6:
    41.4, 43.5, 67.3).  Forward and reverse KL are held to their budgets of 40 and 60; JSD,
    over its budget of 60 by a third launch, to a ceiling of 68 against regressions (x2
    for float32)."""
    phases = (1, 2, 3) if divergence == 2 else (1, 2)
    for phase in phases:
        assert compiled[f"kd-shape-{n}-{v}-{dtype}-{divergence}-phase{phase}"] == ""
    total = sum(compiled[f"count:kd-shape-{n}-{v}-{dtype}-{divergence}-phase{p}"] for p in phases)
    ceiling = (68.0 if divergence == 2 else BUDGET[f"kd-{divergence}"]) * BYTES[dtype] / 2
    assert total <= ceiling, f"{total:.1f} instructions per element pair over {len(phases)} launches, ceiling {ceiling:.0f}"


@pytest.mark.parametrize("divergence", [0, 1, 2], ids=["forward", "reverse", "jsd"])
@pytest.mark.parametrize("n,v,dtype", [s for s in KD_SHAPES if s[1] > 2048], ids=str)
def test_kd_lagged_launch_compiles_within_its_ceiling(compiled, n, v, dtype, divergence):
    """Every pass in one launch ("lagged"): the loop body holds a statistics item and a loss
    item (and JSD's gradient item), so its count per element pair is the launches' sum plus
    the second item's bookkeeping: 42.7, 45.7 and 70.8 at (8192, 128256) bf16 with Triton
    3.9 (3.6: 43.1, 47.1, 72.8).  Held to 46, 50 and 74 against regressions (x2 for
    float32); no spills."""
    case = f"kd-shape-{n}-{v}-{dtype}-{divergence}-lagged"
    assert compiled[case] == ""
    ceiling = (46.0, 50.0, 74.0)[divergence] * BYTES[dtype] / 2
    assert compiled[f"count:{case}"] <= ceiling, f"{compiled[f'count:{case}']:.1f} per element pair, ceiling {ceiling:.0f}"


def test_kd_lagged_launch_with_labels_compiles(compiled):
    assert compiled["kd-lagged-True-True"] == "" and compiled["kd-lagged-True-False"] == ""


@pytest.mark.parametrize("n,c,dtype", CAL_SHAPES, ids=str)
def test_calibration_kernels_compile_within_instruction_budget(compiled, n, c, dtype):
    assert compiled[f"cal-stats-{n}-{c}-{dtype}"] == ""
    assert compiled[f"cal-finish-{n}-{c}-{dtype}"] == ""
    budget = BUDGET["calibration"] * BYTES[dtype] / 2
    per_logit = compiled[f"count:cal-stats-{n}-{c}-{dtype}"]
    assert per_logit <= budget, f"{per_logit:.1f} instructions per logit, budget {budget:.0f}"


def _tile_cases():
    from kdbench.kernels import calibration as cal
    from kdbench.kernels import kd_loss as kd

    return [f"tile-kd-{t}-{w}-{p}-phase{ph}" for t, w, p in kd.TILE_CONFIGS for ph in (1, 2)] + [
        f"tile-cal-{t}-{w}-{p}" for t, w, p in cal.TILE_CONFIGS
    ]


@pytest.mark.parametrize("case", _tile_cases())
def test_every_tile_candidate_compiles_and_fits_its_programs_per_sm(compiled, case):
    assert compiled[case] == ""


def test_loop_body_count_leaves_out_inner_loops():
    body = """
        /*0000*/ MOV R1, c[0x0][0x28] ;
        /*0010*/ FADD R2, R2, R3 ;
        /*0020*/ LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/ @P0 BRA 0x0020 ;
        /*0040*/ NOP ;
        /*0050*/ BRA 0x0010 ;
        /*0060*/ EXIT ;
    """
    assert loop_body_instructions(body) == 2  # FADD and the closing BRA; the spin (LDG, BRA) is out
    with pytest.raises(AssertionError, match="no loop"):
        loop_body_instructions("/*0000*/ EXIT ;")


if __name__ == "__main__":
    print(json.dumps(_compile_everything()))
