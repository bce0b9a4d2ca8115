"""Fused distillation loss: loss and dL/dz_s from registers, the gradient written once.

Design
------
The (N, V) logits are cut into work items of at most ``TILE`` elements
(:func:`~kdbench.kernels._utils.tile_plan`): a row of V <= TILE is one item (several
small rows share one), a wider row is cut into ``R = cdiv(V, BLOCK)`` chunks, one item
each.  An item's student and teacher logits are loaded into registers once, and
everything else for that item happens on chip:

1. *local statistics*: the tile's raw max and e = exp((z - max) / T) for student and
   teacher (and for the student at T = 1 when the hard term needs it): one exp per
   element and tensor, kept in registers.  Forward and reverse KL also sum their loss
   terms against these exps here, sum e (z_t - z_s), so only (max, sum) pairs have to
   travel between the chunks of a row;
2. *row statistics*: a row held by one item has them already.  A chunked row's items
   publish their (max, sum, term sum) to a small workspace and each merges the R
   partials itself, a few dozen floats;
3. *loss and row scalar*: the loss follows from the merged statistics.  Reverse KL and
   JSD need the row scalar K = KL(p_s || p_t) or KL(p_s || M) before any gradient
   element; reverse KL has it from the published term sums, JSD needs a second exchange;
4. *gradient*: written from the same registers, in the student's dtype, with the
   batchmean factor 1/n_counted already in it (read from a device scalar: no sync).

How the chunks of a row meet (``ROW_MEETING``):

* "launches" (the default): each exchange ends a launch.  Forward and reverse KL run
  two launches (statistics; loss and gradient), JSD three.  A later launch knows each
  row's merged maxima before it loads a tile, so it takes the tile's exps against them
  directly: no tile maxima, no sums of exp, and forward KL's loss from the terms the
  statistics launch already summed; forward KL forms each exponent in one fma
  (``tile_exp_fma``).  The second read comes from HBM.
* "barrier": one launch; the chunks meet at a per-row barrier
  (:func:`~kdbench.kernels._utils.arrive_and_wait`, an atomic counter) and the
  gradient comes from the tile still in registers: the logits are read once.  On an
  H200 the wait, with nothing else for the SM to do, cost more than the second read
  (results/bench/h200-kd-modes.md).
* "lagged": one launch, the passes of "launches" interleaved.  A program computes the
  statistics of its item k (leaving the tile in L2) and then the loss and gradient of
  its item k - lag (``lag_items``: by then every chunk of that row has published its
  statistics, so the wait on the row's counter, :func:`~kdbench.kernels._utils.wait_until`,
  seldom spins), re-reading that tile from L2; JSD's gradient pass runs another lag
  behind.  HBM sees one read; L2 holds the last 2 lag P items (8 MB at the headline
  shape).  Not yet timed on a GPU.

The interpreter runs programs one after another: "barrier" falls back to launches there,
and "lagged" runs as one program (which then waits on no one).  The per-item work (one
item's statistics, loss and gradient) is ``kd_item`` in ``_kd_item.py``.

The grid is persistent: P programs (every SM's worth of resident CTAs, from the
compiled kernel's registers and shared memory) walk the items in the order
item = p, p + P, ...; each program loads its next item's logits before it works on
the current one, so loads stay in flight through the arithmetic.  For the barrier,
P >= R and row-ordered items mean a program's earlier item is always in an earlier
row, and all P programs are resident: every barrier completes.  The lagged launch needs
only residency: a wait at a program's item k is on statistics published at items
before k by programs that, to publish them, waited only on earlier items still.

Traffic model (forward+backward, (N, V) logits of b bytes; minimum 3 b N V, one read
of each input and one write of the gradient: 6.30 GB at (8192, 128256) bf16)
-------------------------------------------------------------------------------
* rows of V <= TILE: the minimum, 3 b N V;
* chunked rows, separate launches: forward and reverse KL 5 b N V (the statistics
  launch reads both inputs, the second reads them again and writes the gradient);
  JSD 7 b N V; with the barrier or lagged: 3 b N V from HBM for all three (lagged
  re-reads 2 b N V, JSD 4 b N V, from L2);
* the second read of separate launches comes from HBM, not L2: between a row's two
  reads the whole (N, V) pair streams through (4.2 GB against 50 MB of L2); the lagged
  launch keeps a row's two reads a few items apart;
* workspace: N R (8 floats of statistics) + N counters, read back R times per row:
  about 32 R^2 N bytes, 0.27 GB at that shape (R = 32), mostly L2 hits;
* ``grad_output != 1`` (float32/bfloat16): one more read and write of the gradient in
  backward (the scale kernel); ``grad_output == 1`` is detected on the device and
  touches nothing.  float16: see below.

Instruction budget per (student, teacher) element pair, from SASS (see
``tests/test_kernels_compile.py``), at (8192, 128256) bf16 with Triton 3.9 for sm_90: as
one launch, forward KL 30.5, reverse KL 32.1, JSD 50.6, against about 50 that an H200 can
issue per pair at copy bandwidth; as separate launches, which load and exponentiate
every tile twice (three times for JSD), forward KL 22.1 + 17.8 = 39.9, reverse KL 42.1,
JSD 16.6 + 26.0 + 23.1 = 65.6 (its later launches work in bits: log2 p from the logits'
difference, p = 2**(log2 p) from it, ``_kd_math.log2_probs``).  bfloat16 rows of even
length and stride are loaded as 32-bit words of two values and widened with one integer
instruction per value (``_tile_math.widen``), where Triton's own conversion takes two.

float16 gradients
-----------------
A float16 gradient of a large batch is tiny (1e-7 per element at (64, 32000)), below
float16's normal range; storing it in forward and multiplying by a loss scale of 2**16
in backward would scale up the subnormal rounding.  So for float16 students forward
computes only the loss (reads both tensors), and backward runs the same kernel again
with grad_output folded into the factor: the gradient is the exact scaled gradient,
rounded once.  Under a loss scaler that costs the same traffic as storing in forward
and scaling in backward; the inputs are kept for backward (no extra memory).

Semantics
---------
Zero probabilities (-inf logits) contribute exactly 0 to loss and gradient.  A counted
row with a NaN or +inf logit, or with no finite logit, gets a NaN loss and gradient.
Ignored rows (label == ignore_index) load nothing, write a zero gradient and a zero
loss, and take no part in any barrier.  Row offsets are int64, so N * V beyond 2**31
is fine.

Limits
------
* Last dim must be contiguous (other strides are copied once); leading dims may be
  strided.  Logits float32/float16/bfloat16; all arithmetic in float32.
* The barrier and the lagged launch need all P programs resident together.
  ``usable_sms`` honours MPS's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``; two such kernels
  racing for SMs on streams of different priority could in principle wait on each
  other.  Where P < R the barrier's phases run as separate launches.
* The gradient buffer is scaled in place by backward, so backward through the same
  graph twice (``retain_graph=True``) raises instead of returning a wrong gradient
  (float16, which recomputes, allows it).
* Out-of-range labels on CUDA are not checked on the host (that needs a sync): the
  row loss becomes NaN instead (and ``tl.device_assert`` fires in debug mode).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdbench.kernels._kd_item import ALL, GRAD, LOSS, STATS, kd_item
from kdbench.kernels._kd_math import scale_grad_kernel
from kdbench.kernels._tile_math import load_item, step_item
from kdbench.kernels._utils import as_rows, bf16_round_by_hand, loads_pairs, pick_config, resident_programs, tile_plan
from kdbench._checks import interpreter_on
from kdbench.reference._common import reduce_rows

FORWARD, REVERSE, JSD = 0, 1, 2
_DIVERGENCE_CODE = {"forward": FORWARD, "reverse": REVERSE, "jsd": JSD}

# (elements per tile and tensor, warps per program, programs per SM).  32 elements of
# each tensor per thread amortise the per-item work (reductions, merge, the next
# item's addresses) to about 10 instructions per pair, and the loaded tile, its exps
# and the next tile's raw logits fit in about 128 registers.  On an H200 (Triton 3.6,
# forward KL fwd+bwd at (8192, 128256) bf16, results/bench/h200-kd-modes.md) the
# fastest was (4096, 4, 2) with the phases as separate launches: 3.99 ms, 8 warps per
# SM.  (4096, 4, 4), the same kernel with twice the programs resident (16 warps per SM,
# which its 128 registers allow), was not measured: the profile of the first kernels
# showed them waiting on latency at low occupancy.  The candidates are what
# `kdbench bench` sweeps on a GPU; tests/test_kernels_compile.py checks that each
# compiles without spills and that its programs per SM fit in the registers.
TILE_CONFIGS = ((4096, 4, 2), (4096, 4, 4), (8192, 8, 1), (2048, 2, 4), (4096, 8, 2))
TILE_CONFIG = TILE_CONFIGS[0]
# Rows of at most 2048 elements: two-warp programs, 32 elements per thread, several rows each.
NARROW_CONFIG = (2048, 2, 8)
# How the chunks of a wide row meet (module docstring): "launches" (each pass a launch;
# the second read comes from HBM), "barrier" (one launch, one read, every program waits
# at each row) or "lagged" (one launch; a program's loss and gradient pass runs a few of
# its items behind its statistics, so the second read comes from L2 and rarely waits).
# Measured on an H200, the barrier's wait cost more than the launches' second read:
# forward KL 4.7 to 6.9 ms against 3.99 ms (results/bench/h200-kd-modes.md); "lagged"
# has not been timed on a GPU yet, so "launches" stays the default.  Under the CPU
# interpreter, which runs programs one after another, "barrier" falls back to launches
# and "lagged" runs as one program.
ROW_MEETINGS = ("launches", "barrier", "lagged")
ROW_MEETING = "launches"

# Workspace floats per (row, chunk): student max and sum of exp, teacher max and sum,
# student sum at T = 1, the chunk's sum e (z - z') of the KL terms, its part of JSD's K.
_SLOTS = 8
# Resident programs of each compiled variant on each device (host-side, no sync).
_RESIDENT: dict[tuple, int] = {}


@triton.jit
def _kd_kernel(
    s_ptr,  # (N, V) student logits, unit column stride
    s_stride,  # elements between student rows
    t_ptr,  # (N, V) teacher logits, unit column stride
    t_stride,  # elements between teacher rows
    y_ptr,  # (N,) int64 labels; read only if HAS_LABELS
    part_ptr,  # (N, R) float32 out: each (row, chunk)'s part of the row loss, 0 for ignored rows
    g_ptr,  # (N, V) out: dL/dz_s in the student's dtype; written only if COMPUTE_GRAD
    g_stride,  # elements between gradient rows
    scale_ptr,  # (1,) float32: factor of the gradient (1/n_counted for batchmean, else 1)
    go_ptr,  # (1,) or (N,) float32 grad_output, folded into the gradient when GO_MODE > 0
    ws_ptr,  # (N, R, 8) float32 workspace of chunk statistics (R > 1)
    cnt_ptr,  # (N,) int32 barrier counters, zeroed (R > 1 and PHASE == ALL)
    N, V, R, n_items,
    lag,  # LAGGED: how many of its own items a program's later passes run behind its statistics
    inv_t,  # 1 / T (1 when there is no soft term)
    soft_w,  # (1 - alpha) * T^2
    hard_w,  # alpha
    beta,  # JSD mixture weight
    ub_s,  # -log(1 - beta): bound of log p_s - log M
    ub_t,  # -log(beta): bound of log p_t - log M
    ignore_index,
    DIVERGENCE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_LABELS: tl.constexpr,
    HAS_SOFT: tl.constexpr,  # alpha < 1
    HAS_HARD: tl.constexpr,  # alpha > 0
    T_IS_ONE: tl.constexpr,  # the hard term reuses the student's exps at T
    COMPUTE_GRAD: tl.constexpr,
    GO_MODE: tl.constexpr,  # 0: none, 1: one grad_output, 2: one per row
    PHASE: tl.constexpr,  # ALL, or STATS / LOSS / GRAD as separate launches (chunked rows)
    ROUND_BY_HAND: tl.constexpr,  # interpreter only: see bf16_round_by_hand
    ON_GPU: tl.constexpr,  # inline PTX (MUFU log); the interpreter has none
    PAIRS: tl.constexpr,  # bfloat16 rows of even length and stride, loaded as 32-bit pairs (_tile_math.widen)
    LAGGED: tl.constexpr,  # chunked rows: every pass in this launch, each later one `lag` items behind
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    gscale = tl.load(scale_ptr)

    # Item i is chunk i % R of row block i // R; a program steps by nprog items, so by
    # (nprog // R, nprog % R) in (row block, chunk): no division in the loop.
    step_rb = nprog // R
    step_c = nprog - step_rb * R
    rb_next = pid // R
    c_next = pid - rb_next * R
    # With LAGGED the statistics read the logits from HBM and leave them in L2 (KEEP); the
    # loss and gradient pass over the item `lag` of this program's items earlier, whose row
    # every program has finished the statistics of by then (the launcher picks lag), and
    # reads it back from L2.  JSD's gradient pass runs another `lag` items behind.
    NEED_K: tl.constexpr = HAS_SOFT and DIVERGENCE == 2 and COMPUTE_GRAD
    behind = lag * nprog
    passes = 1
    if LAGGED:
        passes = 2
        if NEED_K:
            passes = 3
    rb_l, c_l = rb_next, c_next
    rb_g, c_g = rb_next, c_next
    z_next, zt_next, y_next = load_item(rb_next, c_next, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N, V, ignore_index,
                                         HAS_LABELS, HAS_SOFT, PAIRS, ROWS, BLOCK, LAGGED)
    for it in range(pid, n_items + (passes - 1) * behind, nprog):
        z_raw, zt_raw, y = z_next, zt_next, y_next
        rb = rb_next
        c = c_next
        rb_next, c_next = step_item(rb, c, step_rb, step_c, R)
        # The next item's loads go out now and land while this one is worked on.
        z_next, zt_next, y_next = load_item(rb_next, c_next, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N, V,
                                             ignore_index, HAS_LABELS, HAS_SOFT, PAIRS, ROWS, BLOCK, LAGGED)
        if LAGGED:
            # Row block N (past the end) reads nothing: a pass that has not started yet.
            l_on = it >= behind
            z_l, zt_l, y_l = load_item(tl.where(l_on, rb_l, N), c_l, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N, V,
                                       ignore_index, HAS_LABELS, HAS_SOFT, PAIRS, ROWS, BLOCK, NEED_K)
            if NEED_K:
                g_on = it >= 2 * behind
                z_g, zt_g, y_g = load_item(tl.where(g_on, rb_g, N), c_g, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N,
                                           V, ignore_index, HAS_LABELS, HAS_SOFT, PAIRS, ROWS, BLOCK, False)
            if it < n_items:
                kd_item(z_raw, zt_raw, y, rb, c, s_ptr, s_stride, part_ptr, g_ptr, g_stride, go_ptr, ws_ptr, cnt_ptr,
                        N, V, R, gscale, inv_t, soft_w, hard_w, beta, ub_s, ub_t, ignore_index, DIVERGENCE,
                        HAS_LABELS, HAS_SOFT, HAS_HARD, T_IS_ONE, COMPUTE_GRAD, GO_MODE, STATS, ROUND_BY_HAND,
                        ON_GPU, PAIRS, True, ROWS, BLOCK, CHUNKS_PAD)
            if l_on:
                kd_item(z_l, zt_l, y_l, rb_l, c_l, s_ptr, s_stride, part_ptr, g_ptr, g_stride, go_ptr, ws_ptr,
                        cnt_ptr, N, V, R, gscale, inv_t, soft_w, hard_w, beta, ub_s, ub_t, ignore_index, DIVERGENCE,
                        HAS_LABELS, HAS_SOFT, HAS_HARD, T_IS_ONE, COMPUTE_GRAD, GO_MODE, LOSS, ROUND_BY_HAND,
                        ON_GPU, PAIRS, True, ROWS, BLOCK, CHUNKS_PAD)
                rb_l, c_l = step_item(rb_l, c_l, step_rb, step_c, R)
            if NEED_K:
                if g_on:
                    kd_item(z_g, zt_g, y_g, rb_g, c_g, s_ptr, s_stride, part_ptr, g_ptr, g_stride, go_ptr, ws_ptr,
                            cnt_ptr, N, V, R, gscale, inv_t, soft_w, hard_w, beta, ub_s, ub_t, ignore_index,
                            DIVERGENCE, HAS_LABELS, HAS_SOFT, HAS_HARD, T_IS_ONE, COMPUTE_GRAD, GO_MODE, GRAD,
                            ROUND_BY_HAND, ON_GPU, PAIRS, True, ROWS, BLOCK, CHUNKS_PAD)
                    rb_g, c_g = step_item(rb_g, c_g, step_rb, step_c, R)
        else:
            kd_item(z_raw, zt_raw, y, rb, c, s_ptr, s_stride, part_ptr, g_ptr, g_stride, go_ptr, ws_ptr, cnt_ptr, N,
                    V, R, gscale, inv_t, soft_w, hard_w, beta, ub_s, ub_t, ignore_index, DIVERGENCE, HAS_LABELS,
                    HAS_SOFT, HAS_HARD, T_IS_ONE, COMPUTE_GRAD, GO_MODE, PHASE, ROUND_BY_HAND, ON_GPU, PAIRS, False,
                    ROWS, BLOCK, CHUNKS_PAD)

def lag_items(chunks: int, programs: int) -> int:
    """How many of its own items a program's loss and gradient pass runs behind its statistics
    in the "lagged" launch, for rows of ``chunks`` chunks and ``programs`` programs.

    Item i is program i % P's item i // P; a row's chunks are consecutive items, so the
    last of them is at most cdiv(R, P) of a program's items after any other.  One more
    means every wait is on statistics published at least a whole item earlier: the
    programs never wait on each other in a cycle, and seldom at all.
    """
    return triton.cdiv(chunks, programs) + 1


def _launch(
    s2: torch.Tensor,
    t2: torch.Tensor,
    y: torch.Tensor | None,
    grad: torch.Tensor | None,
    scale: torch.Tensor,
    go: torch.Tensor | None,
    *,
    go_per_row: bool = False,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
) -> torch.Tensor:
    """Run the kernel over (N, V) rows; returns the (N,) float32 row losses.

    ``grad`` (N, V) receives the gradient when given, times ``scale`` and, when ``go``
    is given, times grad_output (one value, or one per row when ``go_per_row``).
    """
    n, v = s2.shape
    device = s2.device
    tile, num_warps, per_sm = pick_config(v, s2.element_size(), TILE_CONFIG, NARROW_CONFIG)
    plan = tile_plan(n, v, tile)
    r = plan.chunks
    part = torch.empty((n, r), dtype=torch.float32, device=device)
    if n == 0:
        return part.sum(dim=1)
    has_soft = alpha < 1.0
    inv_t = 1.0 / temperature if has_soft else 1.0
    chunked = r > 1
    ws = torch.empty((n, r, _SLOTS) if chunked else (1,), dtype=torch.float32, device=device)
    consts = dict(
        DIVERGENCE=_DIVERGENCE_CODE[divergence],
        HAS_LABELS=y is not None,
        HAS_SOFT=has_soft,
        HAS_HARD=alpha > 0.0,
        T_IS_ONE=inv_t == 1.0,
        COMPUTE_GRAD=grad is not None,
        GO_MODE=0 if go is None else (2 if go_per_row else 1),
        ROUND_BY_HAND=bf16_round_by_hand(s2.dtype),
        ON_GPU=not interpreter_on() and device.type == "cuda",
        PAIRS=loads_pairs(s2, t2),
        ROWS=plan.ROWS,
        BLOCK=plan.BLOCK,
        CHUNKS_PAD=plan.CHUNKS_PAD,
        # Prefetching is by hand (the next item's loads); FMA contraction is what the
        # instruction budget assumes, whatever a Triton version's default.
        num_warps=num_warps,
        num_stages=1,
        enable_fp_fusion=True,
    )
    cnt = torch.zeros(n, dtype=torch.int32, device=device) if chunked else part

    def args(lag: int) -> tuple:
        return (
            s2, s2.stride(0), t2, t2.stride(0), y if y is not None else part, part, grad if grad is not None else part,
            grad.stride(0) if grad is not None else 0, scale, go if go is not None else scale, ws, cnt, n, v, r,
            plan.items, lag, inv_t, (1.0 - alpha) * temperature * temperature, alpha, beta, -math.log1p(-beta),
            -math.log(beta), ignore_index,
        )  # fmt: skip

    interpret = interpreter_on() or device.type != "cuda"
    meeting = ROW_MEETING if chunked else "launches"
    if meeting not in ROW_MEETINGS:
        raise ValueError(f"kd_loss.ROW_MEETING: expected one of {ROW_MEETINGS}, got {meeting!r}")
    if interpret and meeting == "barrier":
        meeting = "launches"
    lagged = meeting == "lagged"
    programs = 1 if interpret and lagged else plan.items
    if not interpret:
        phase = ALL if meeting != "launches" or not chunked else STATS
        key = (device.index, s2.dtype, tuple(a % 16 == 0 for a in (v, s2.stride(0), t2.stride(0))), phase, lagged,
               tuple(sorted(consts.items())))
        if key not in _RESIDENT:
            probe = _kd_kernel.warmup(*args(0), PHASE=phase, LAGGED=lagged, grid=(1,), **consts)
            _RESIDENT[key] = resident_programs(probe, device, num_warps, per_sm)
        programs = min(plan.items, _RESIDENT[key])
        if meeting == "barrier" and programs < r:
            meeting = "launches"  # every chunk of a row must be with a different program, all resident
    if not chunked or meeting == "barrier":
        _kd_kernel[(programs,)](*args(0), PHASE=ALL, LAGGED=False, **consts)
    elif lagged:
        _kd_kernel[(programs,)](*args(lag_items(r, programs)), PHASE=ALL, LAGGED=True, **consts)
    else:
        need_k = has_soft and divergence == "jsd" and grad is not None
        for phase in (STATS, LOSS, GRAD) if need_k else (STATS, LOSS):
            _kd_kernel[(programs,)](*args(0), PHASE=phase, LAGGED=False, **consts)
    return part.sum(dim=1) if chunked else part.reshape(n)


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        alpha: float,
        divergence: str,
        beta: float,
        reduction: str,
        ignore_index: int,
    ) -> torch.Tensor:
        lead = student.shape[:-1]
        v = student.shape[-1]
        s2 = as_rows(student)
        t2 = as_rows(teacher)
        n = s2.shape[0]
        device = student.device
        y = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
        if y is not None:
            n_counted = (y != ignore_index).sum()
        else:
            n_counted = torch.full((), n, dtype=torch.int64, device=device)
        if reduction == "batchmean":
            scale = (1.0 / n_counted.clamp_min(1).to(torch.float32)).reshape(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=device)
        opts = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, ignore_index=ignore_index)
        compute_grad = ctx.needs_input_grad[0]
        # float16: the gradient is computed in backward, with grad_output in it (module docstring).
        deferred = compute_grad and student.dtype == torch.float16
        grad = torch.empty((n, v), dtype=student.dtype, device=device) if compute_grad and not deferred else None
        rows = _launch(s2, t2, y, grad, scale, None, **opts)
        out = reduce_rows(rows, n_counted, reduction, lead)
        if compute_grad:
            ctx.lead = lead
            ctx.per_row = reduction == "none"
            ctx.consumed = False
            ctx.deferred = deferred
            if deferred:
                ctx.save_for_backward(s2, t2, y, scale)
                ctx.opts = opts
            else:
                ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.consumed and not ctx.deferred:
            raise RuntimeError(
                "kdbench.kd_loss (triton): backward through the same graph twice is not supported; "
                "the stored gradient is scaled in place by the first backward"
            )
        ctx.consumed = True
        go = grad_output.reshape(-1).to(torch.float32).contiguous()
        if ctx.deferred:
            s2, t2, y, scale = ctx.saved_tensors
            grad = torch.empty(s2.shape, dtype=s2.dtype, device=s2.device)
            _launch(s2, t2, y, grad, scale, go, go_per_row=ctx.per_row, **ctx.opts)
        else:
            (grad,) = ctx.saved_tensors
            n, v = grad.shape
            if n > 0:
                block = min(triton.next_power_of_2(v), 4096)
                scale_grad_kernel[(n, triton.cdiv(v, block))](
                    grad, grad.stride(0), go, v, PER_ROW=ctx.per_row, ROUND_BY_HAND=bf16_round_by_hand(grad.dtype),
                    BLOCK=block, num_warps=4,
                )
        return grad.reshape(*ctx.lead, grad.shape[-1]), None, None, None, None, None, None, None, None


@torch.compiler.disable
def kd_loss_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    divergence: str,
    beta: float,
    reduction: str,
    ignore_index: int,
) -> torch.Tensor:
    """Fused kernel path of :func:`kdbench.kd_loss` (arguments already validated).

    Runs outside ``torch.compile`` graphs (a graph break), so a compiled training
    step calls the same kernels as eager mode.
    """
    return _KDLossFunction.apply(
        student_logits,
        teacher_logits.detach(),
        labels,
        temperature,
        alpha,
        divergence,
        beta,
        reduction,
        ignore_index,
    )
