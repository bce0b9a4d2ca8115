"""Fused distillation loss: loss and dL/dz_s in one launch.

Design
------
One program per row (N rows of V logits).  Each program

1. *statistics pass*: streams the row in BLOCK-wide tiles, keeping per-lane online
   max / sum-of-exp for the student at T (a = z_s / T), the teacher at T
   (b = z_t / T) and, when the hard term is on and T != 1, the student at T = 1.
   Lanes are merged once at the end, so the loop body has no cross-lane reduction;
2. *divergence pass* (reverse KL and JSD only): the gradient of those divergences
   needs the row scalar K = KL(p_s || p_t) or KL(p_s || M) before any element of
   the gradient can be written, so one more streaming pass computes it exactly;
3. *gradient pass*: writes dL/dz_s in the student's dtype and accumulates the
   forward-KL loss from exact per-element log-ratios (no cancellation between
   large logsumexps).

A row that fits one tile (V <= BLOCK) is read once: all passes run on registers.

Memory traffic of a streamed row (V > BLOCK): pass 1 reads both rows, the gradient
pass reads them again and writes the gradient (plus one more read for reverse KL and
JSD), against a minimum of one read and one write.  What narrows the gap:

* each pass walks the row in the opposite direction to the one before, so it starts
  on the tiles just read, which are the likeliest to still be in L2 (a 128256-wide
  bf16 row pair is 0.5 MB; 132 rows in flight roughly fill an H200's 60 MB of L2);
* the last pass loads and stores with ``evict_first``: its data is dead afterwards
  and should not push out rows that other programs will read again;
* the streaming loops are software-pipelined (``STREAM_STAGES`` tiles in flight,
  cp.async on Hopper): a single tile per loop iteration is too few bytes in flight
  to cover DRAM latency with one 16-warp program per SM.

Exps per element: one per online logsumexp update (see _online_update) and two in
the gradient pass, four in all for the forward KL (Hopper's MUFU does 16 per clock per
SM, so at bf16 the exps take about as long as the memory traffic: every one counts).
Zero probabilities (-inf logits) contribute exactly 0 to loss and gradient.
Ignored rows (label == ignore_index) load nothing, write a zero gradient and a
zero loss.  Row offsets are int64, so N * V beyond 2**31 is fine.

The gradient is stored in forward with the batchmean factor 1/n_counted already
folded in (read from a device scalar: no host sync).  Backward multiplies it in
place by grad_output; a scalar grad_output equal to 1 (a plain ``loss.backward()``)
is detected *on the device* and the scale kernel returns without touching memory.

Limits
------
* Last dim must be contiguous (other strides are copied once); leading dims may be
  strided.  Logits float32/float16/bfloat16; all arithmetic in float32.
* One row per program: tiny V with huge N under-uses a GPU (still correct).
* Block size, warps and ``STREAM_STAGES`` are reasoned, not tuned: no GPU has timed
  this kernel yet (``kdbench bench`` on CUDA reports a stages sweep for that).
* The gradient buffer is scaled in place by backward, so backward through the same
  graph twice (``retain_graph=True``) raises instead of returning a wrong gradient.
* Out-of-range labels on CUDA are not checked on the host (that needs a sync): the
  row loss becomes NaN instead (and ``tl.device_assert`` fires in debug mode).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdbench.kernels._kd_math import _block_lse, _lanes_lse, _online_update, _row_terms, _soft_grad, _tile_start
from kdbench.kernels._utils import as_rows, bf16_round_by_hand, cast_for_store, launch_config
from kdbench.reference._common import reduce_rows

FORWARD, REVERSE, JSD = 0, 1, 2
_DIVERGENCE_CODE = {"forward": FORWARD, "reverse": REVERSE, "jsd": JSD}
# Tiles in flight per streaming loop (cp.async into shared memory on Hopper): one
# CTA per SM (16 warps) holds only one tile of loads otherwise, too few bytes in flight
# to cover DRAM latency.  3 is Triton's default depth for Hopper; not tuned on a GPU.
STREAM_STAGES = 3


@triton.jit
def _kd_fwd_kernel(
    s_ptr,  # (N, V) student logits, unit column stride
    s_stride,  # elements between student rows
    t_ptr,  # (N, V) teacher logits, unit column stride
    t_stride,  # elements between teacher rows
    y_ptr,  # (N,) int64 labels; read only if HAS_LABELS
    loss_ptr,  # (N,) float32 out: row loss, 0 for ignored rows
    g_ptr,  # (N, V) out: dL/dz_s in the student's dtype, contiguous; written only if COMPUTE_GRAD
    g_stride,  # elements between gradient rows
    gscale_ptr,  # (1,) float32: factor folded into the gradient; read only if SCALE_GRAD
    V,  # number of classes
    inv_t,  # 1 / T
    soft_w,  # (1 - alpha) * T^2
    hard_w,  # alpha
    beta,  # JSD mixture weight
    log_beta,  # log(beta)
    log_1m_beta,  # log(1 - beta)
    ignore_index,  # label marking an ignored row
    DIVERGENCE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_LABELS: tl.constexpr,
    HAS_SOFT: tl.constexpr,  # alpha < 1
    HAS_HARD: tl.constexpr,  # alpha > 0
    T_IS_ONE: tl.constexpr,  # the hard term reuses the soft student statistics
    COMPUTE_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # V <= BLOCK: the row is read once
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
    ROUND_BY_HAND: tl.constexpr,  # interpreter only: see bf16_round_by_hand
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    cols = tl.arange(0, BLOCK)

    # Tensors from the start (not Python bools / ints), so that masks and selects see
    # the same types whether or not HAS_LABELS is set.
    counted = tl.full([], 1, tl.int1)
    label = tl.zeros([], tl.int64)
    if HAS_LABELS:
        label = tl.load(y_ptr + row)
        counted = label != ignore_index
    # Ignored rows read nothing: every load is masked off.
    v_eff = tl.where(counted, V, 0)
    label_ok = (label >= 0) & (label < V)
    tl.device_assert(label_ok | (counted == 0), "label out of range [0, V)")
    safe_label = tl.where(label_ok & counted, label, 0)

    gscale = 1.0
    if SCALE_GRAD:
        gscale = tl.load(gscale_ptr)
    gscale = tl.where(counted, gscale, 0.0)

    if SINGLE_BLOCK:
        mask = cols < v_eff
        z = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        zt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        a = z * inv_t
        b = zt * inv_t
        m_a, ls_a = _block_lse(a)
        m_b, ls_b = _block_lse(b)
        m_1, ls_1 = m_a, ls_a
        if HAS_HARD and not T_IS_ONE:
            m_1, ls_1 = _block_lse(z)
        loss = 0.0
        g = tl.zeros([BLOCK], tl.float32)
        if HAS_SOFT:
            terms, k_terms = _row_terms(a, b, m_a, ls_a, m_b, ls_b, beta, log_beta, log_1m_beta, DIVERGENCE)
            loss = soft_w * tl.sum(terms, axis=0)
            if COMPUTE_GRAD:
                k_row = tl.sum(k_terms, axis=0)
                g = (soft_w * inv_t) * _soft_grad(a, b, m_a, ls_a, m_b, ls_b, k_row, beta, log_beta, log_1m_beta, DIVERGENCE)
        if HAS_HARD:
            if COMPUTE_GRAD:
                g += hard_w * (tl.exp((z - m_1) - ls_1) - tl.where(cols == safe_label, 1.0, 0.0))
        if COMPUTE_GRAD:
            g = tl.where(mask, g * gscale, 0.0)
            tl.store(g_row + cols, cast_for_store(g, g_ptr.dtype.element_ty, ROUND_BY_HAND), mask=cols < V,
                     eviction_policy="evict_first")
    else:
        # ---- pass 1: per-lane online statistics --------------------------------
        m_a = tl.full([BLOCK], float("-inf"), tl.float32)
        s_a = tl.zeros([BLOCK], tl.float32)
        m_b = tl.full([BLOCK], float("-inf"), tl.float32)
        s_b = tl.zeros([BLOCK], tl.float32)
        m_1 = tl.full([BLOCK], float("-inf"), tl.float32)
        s_1 = tl.zeros([BLOCK], tl.float32)
        n_tiles = tl.cdiv(V, BLOCK)
        for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
            c = i * BLOCK + cols
            mask = c < v_eff
            z = tl.load(s_row + c, mask=mask, other=float("-inf")).to(tl.float32)
            m_a, s_a = _online_update(m_a, s_a, z * inv_t)
            if HAS_SOFT:
                zt = tl.load(t_row + c, mask=mask, other=float("-inf")).to(tl.float32)
                m_b, s_b = _online_update(m_b, s_b, zt * inv_t)
            if HAS_HARD and not T_IS_ONE:
                m_1, s_1 = _online_update(m_1, s_1, z)
        m_a, ls_a = _lanes_lse(m_a, s_a)
        m_b, ls_b = _lanes_lse(m_b, s_b)
        m_1r, ls_1 = m_a, ls_a
        if HAS_HARD and not T_IS_ONE:
            m_1r, ls_1 = _lanes_lse(m_1, s_1)
        m_1 = m_1r

        # ---- pass 2: the row scalar K (reverse KL and JSD) ---------------------
        loss_acc = tl.zeros([BLOCK], tl.float32)
        k_row = 0.0
        if HAS_SOFT and DIVERGENCE != 0:
            k_acc = tl.zeros([BLOCK], tl.float32)
            for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
                c = _tile_start(i, n_tiles, True, BLOCK) + cols
                mask = c < v_eff
                a = tl.load(s_row + c, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                b = tl.load(t_row + c, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                terms, k_terms = _row_terms(a, b, m_a, ls_a, m_b, ls_b, beta, log_beta, log_1m_beta, DIVERGENCE)
                loss_acc += terms
                k_acc += k_terms
            k_row = tl.sum(k_acc, axis=0)

        # ---- pass 3: gradient (and the forward-KL loss) ------------------------
        if COMPUTE_GRAD or (HAS_SOFT and DIVERGENCE == 0):
            # Walks the row against the previous pass: it starts on the tiles read last.
            BACKWARDS: tl.constexpr = not (HAS_SOFT and DIVERGENCE != 0)
            for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
                c = _tile_start(i, n_tiles, BACKWARDS, BLOCK) + cols
                mask = c < v_eff
                z = tl.load(s_row + c, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
                a = z * inv_t
                g = tl.zeros([BLOCK], tl.float32)
                if HAS_SOFT:
                    b = tl.load(t_row + c, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32) * inv_t
                    if DIVERGENCE == 0:
                        terms, k_terms = _row_terms(a, b, m_a, ls_a, m_b, ls_b, beta, log_beta, log_1m_beta, DIVERGENCE)
                        loss_acc += terms
                    if COMPUTE_GRAD:
                        g = (soft_w * inv_t) * _soft_grad(a, b, m_a, ls_a, m_b, ls_b, k_row, beta, log_beta, log_1m_beta, DIVERGENCE)
                if COMPUTE_GRAD:
                    if HAS_HARD:
                        g += hard_w * (tl.exp((z - m_1) - ls_1) - tl.where(c == safe_label, 1.0, 0.0))
                    g = tl.where(mask, g * gscale, 0.0)
                    tl.store(g_row + c, cast_for_store(g, g_ptr.dtype.element_ty, ROUND_BY_HAND), mask=c < V,
                             eviction_policy="evict_first")
        loss = soft_w * tl.sum(loss_acc, axis=0)

    if HAS_HARD:
        z_y = tl.load(s_row + safe_label, mask=counted, other=0.0).to(tl.float32)
        loss += hard_w * ((m_1 - z_y) + ls_1)
    loss = tl.where(counted, loss, 0.0)
    loss = tl.where(label_ok | (counted == 0), loss, float("nan"))
    tl.store(loss_ptr + row, loss)


@triton.jit
def _scale_grad_kernel(
    g_ptr,  # (N, V) gradient, scaled in place
    g_stride,  # elements between rows
    go_ptr,  # (1,) or (N,) float32 grad_output
    V,  # number of classes
    PER_ROW: tl.constexpr,  # grad_output has one value per row (reduction="none")
    ROUND_BY_HAND: tl.constexpr,  # interpreter only: see bf16_round_by_hand
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if PER_ROW:
        go = tl.load(go_ptr + row)
    else:
        go = tl.load(go_ptr)
    # The common case, loss.backward() on a scalar, has grad_output == 1: checked
    # here on the device, so the host never syncs and memory is not touched.
    if go != 1.0:
        mask = cols < V
        ptrs = g_ptr + row * g_stride + cols
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, cast_for_store(g * go, g_ptr.dtype.element_ty, ROUND_BY_HAND), mask=mask)


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
        inv_count = 1.0 / n_counted.clamp_min(1).to(torch.float32)
        compute_grad = ctx.needs_input_grad[0]
        rows = torch.empty(n, dtype=torch.float32, device=device)
        grad = torch.empty((n, v), dtype=student.dtype, device=device) if compute_grad else rows
        if n > 0:
            block, num_warps = launch_config(v)
            _kd_fwd_kernel[(n,)](
                s2,
                s2.stride(0),
                t2,
                t2.stride(0),
                y if y is not None else rows,
                rows,
                grad,
                grad.stride(0) if compute_grad else 0,
                inv_count.reshape(1),
                v,
                1.0 / temperature,
                (1.0 - alpha) * temperature * temperature,
                alpha,
                beta,
                math.log(beta),
                math.log1p(-beta),
                ignore_index,
                DIVERGENCE=_DIVERGENCE_CODE[divergence],
                HAS_LABELS=y is not None,
                HAS_SOFT=alpha < 1.0,
                HAS_HARD=alpha > 0.0,
                T_IS_ONE=temperature == 1.0,
                COMPUTE_GRAD=compute_grad,
                SCALE_GRAD=reduction == "batchmean",
                SINGLE_BLOCK=v <= block,
                NUM_STAGES=1 if v <= block else STREAM_STAGES,
                ROUND_BY_HAND=bf16_round_by_hand(student.dtype),
                BLOCK=block,
                num_warps=num_warps,
            )
        out = reduce_rows(rows, n_counted, reduction, lead)
        if compute_grad:
            ctx.save_for_backward(grad)
            ctx.lead = lead
            ctx.per_row = reduction == "none"
            ctx.consumed = False
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "kdbench.kd_loss (triton): backward through the same graph twice is not supported; "
                "the stored gradient is scaled in place by the first backward"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        n, v = grad.shape
        go = grad_output.reshape(-1).to(torch.float32).contiguous()
        if n > 0:
            block = min(triton.next_power_of_2(v), 4096)
            _scale_grad_kernel[(n, triton.cdiv(v, block))](
                grad, grad.stride(0), go, v, PER_ROW=ctx.per_row, ROUND_BY_HAND=bf16_round_by_hand(grad.dtype), BLOCK=block, num_warps=4
            )
        return grad.reshape(*ctx.lead, v), None, None, None, None, None, None, None, None


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
