"""Per-tile formulas and helpers of the fused distillation loss (``kd_loss.py``), in float32.

Also here: gathering a chunked row's workspace, and the kernel
that scales a stored gradient by grad_output in backward.

A tile is ROWS x BLOCK logits held in registers.  Row quantities are (ROWS,) vectors.
With a = z_s / T and b = z_t / T:

* local statistics of a tile: raw max m_z = max z (max commutes with the positive
  scale 1/T) and e = exp((z - m_z) / T), whose sum is the tile's sum of exp;
* merged statistics of a row (max M and sum S over all of its tiles) give each tile
  the factor r = exp((m_z - M) / T) / S, so that p = e * r: one exp per element and
  tensor, reused by the loss and the gradient;
* log-probabilities are linear in the logits, log p = (z - M) / T - log S, exact for
  large logits and finite where p underflows; a log-ratio such as log p_t - log p_s is
  formed from the difference of the logits, so nothing cancels between two large
  logsumexps.

Zero probabilities: a term p * d with p == 0 is 0 even where d is infinite or NaN
(a -inf logit on both sides): d is clamped from below at -BIG before the product,
and ``max`` ignores NaN.  A NaN or +inf logit turns the row's sum of exp into NaN,
which the caller turns into a NaN row loss (the clamp cannot hide it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdbench.kernels._tile_math import LOG2E, fast_log, fast_log2, finite_shift, rescale
from kdbench.kernels._utils import cast_for_store

# Below any finite log-ratio of float32 logits; p * (-BIG) is 0 for p == 0.
BIG = tl.constexpr(3.0e38)
# float32's smallest normal number, 2**-126.
TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def prob_factor(m_tile, m_row, s_row, scale):
    """r with p = e * r for a tile whose e was taken against its own max ``m_tile``."""
    return rescale(m_tile, m_row, scale) / s_row


@triton.jit
def plog(d):
    """d clamped below at -BIG: p * plog(d) is 0 where p == 0, whatever d is there."""
    return tl.maximum(d, -BIG)


@triton.jit
def jsd_log_ratios(ls, lt, p_s, p_t, beta, ub_s, ub_t, ON_GPU: tl.constexpr):
    """(log p_s - log M, log p_t - log M) for M = beta p_t + (1 - beta) p_s.

    log M is taken from M itself (one log).  Where M underflows to 0 the ratios are
    capped by their exact bounds, log p_s - log M <= -log(1 - beta) = ub_s and
    log p_t - log M <= -log(beta) = ub_t, which only those underflowing entries reach.
    """
    log_m = fast_log(beta * p_t + (1.0 - beta) * p_s, ON_GPU)
    d_s = tl.minimum(plog(ls - log_m), ub_s)
    d_t = tl.minimum(plog(lt - log_m), ub_t)
    return d_s, d_t


@triton.jit
def jsd_log2_ratios(ls2, lt2, p_s, p_t, beta, ON_GPU: tl.constexpr):
    """:func:`jsd_log_ratios` in bits, from log2 p_s and log2 p_t.

    M is held at float32's smallest normal instead of capping each ratio by its bound:
    with p_s or p_t > 0 every ratio is finite (one max per element pair where the two
    bounds took two), and an M below it, whose entries carry p < 2**-125, is off by
    terms of that size.
    """
    log2_m = fast_log2(tl.maximum(beta * p_t + (1.0 - beta) * p_s, TINY), ON_GPU)
    return plog(ls2 - log2_m), plog(lt2 - log2_m)


@triton.jit
def log2_probs(z, m_row, s_row, counted, scale, ON_GPU: tl.constexpr):
    """(log2 p, p) of a tile for its row's merged max and sum of exp, p = softmax(z * scale).

    log2 p = (z - m) * scale * log2(e) - log2(s): the difference of logits first, exact
    for logits of any size, and p = 2**(log2 p) from it, one fma and one exp per element
    (where ``e * r`` would take a product more).  0 in rows that do not count (their
    logits are -inf), NaN in counted rows without a positive sum.  On a GPU log2(s) is
    MUFU's (s >= 1; an error of 2**-22 scales the row's p by 1 + 2e-7 at most), not
    libdevice's two dozen instructions per item.
    """
    shift = tl.where(counted, fast_log2(s_row, ON_GPU), float("inf"))
    l2 = (z - finite_shift(m_row)[:, None]) * (scale * LOG2E) - shift[:, None]
    return l2, tl.exp2(l2)


@triton.jit
def gather_chunks(ws_row, slot, R, live, CHUNKS_PAD: tl.constexpr, other: tl.constexpr):
    """(ROWS, CHUNKS_PAD) values of one workspace slot over a row's chunks (L2, not L1:
    other SMs wrote them)."""
    ch = tl.arange(0, CHUNKS_PAD)
    mask = live[:, None] & (ch[None, :] < R)
    return tl.load(ws_row[:, None] + ch[None, :] * 8 + slot, mask=mask, other=other, cache_modifier=".cg")


@triton.jit
def splat(v, ROWS: tl.constexpr):
    """A (1,) row value of a chunked row as a (ROWS,) = (1,) splat of its scalar."""
    return tl.zeros([ROWS], tl.float32) + tl.sum(v, axis=0)


@triton.jit
def scale_grad_kernel(
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
