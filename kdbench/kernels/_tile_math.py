"""Tile-wide helpers shared by the kernels: exps against a row max, merging chunks, a fast log.

A tile is ROWS x BLOCK values held in registers; row quantities are (ROWS,) vectors.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def finite_shift(m):
    """A row max as a shift: 0 for a row with no finite value (-inf - -inf would be NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def tile_exp(z, m, scale):
    """e = exp((z - m) * scale) for a tile z and its row max m (ROWS,); 0 for a row of -inf.

    (z - m) is formed first: exact for float32 logits of any size.
    """
    return tl.exp2((z - finite_shift(m)[:, None]) * (scale * LOG2E))


@triton.jit
def tile_exp_fma(z, m, scale):
    """(e, c): e = 2**(z k - sh) with k = scale * log2(e) and sh = m k rounded, one fma and one
    exp per element (z k is exact inside the fma), and the row factor c = 2**-(m k - sh) (the
    rounding of sh, an exact fma) so that e * c = exp((z - m) * scale) to the rounding of
    small numbers.  For rows whose max m is already known (the later launches of a
    chunked row): one instruction per element less than :func:`tile_exp`.
    """
    k = scale * LOG2E
    mf = finite_shift(m)
    sh = mf * k
    return tl.exp2(tl.fma(z, k, -sh[:, None])), tl.exp2(-tl.fma(mf, k, -sh))


@triton.jit
def rescale(m, m_row, scale):
    """exp((m - m_row) * scale): the factor that moves exps taken against m to m_row (0 for m = -inf)."""
    return tl.exp2((m - m_row) * (scale * LOG2E))


@triton.jit
def merge_chunks(m, s, scale):
    """Row max and sum of exp from per-chunk (m, s) of shape (ROWS, CHUNKS_PAD).

    A padding chunk holds (-inf, 0).  A row with no finite logit gets M = -inf, S = NaN.
    """
    m_row = tl.max(m, axis=1)
    return m_row, tl.sum(s * rescale(m, m_row[:, None], scale), axis=1)


@triton.jit
def fast_log(x, FAST: tl.constexpr):
    """Natural log: MUFU's lg2.approx (error about 2**-22 in log2) on a GPU, tl.log elsewhere.

    tl.log lowers to libdevice's correctly rounded logf, about twenty instructions; the
    interpreter cannot run inline PTX.  Denormals flush to zero (-inf).
    """
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1) * LN2
    else:
        return tl.log(x)


@triton.jit
def step_item(rb, c, step_rb, step_c, R):
    """(row block, chunk) of the item ``nprog`` items after chunk ``c`` of row block ``rb``.

    Item i is chunk i % R of row block i // R; a persistent program steps by nprog items,
    that is by (step_rb, step_c) = (nprog // R, nprog % R): no division in the loop.
    """
    c_next = c + step_c
    wrap = c_next >= R
    return rb + step_rb + wrap.to(tl.int32), tl.where(wrap, c_next - R, c_next)


@triton.jit
def load_item(
    rb, c, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N, V, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_SOFT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Raw logits (ROWS, BLOCK) of chunk ``c`` of row block ``rb`` from one tensor (two when
    HAS_SOFT: the student's and the teacher's, else the first twice), and the rows' labels.

    Nothing is read for rows past the end or rows that do not count (-inf comes back).
    """
    rows = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < N
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=live, other=ignore_index)
        counted = live & (y != ignore_index)
    else:
        y = tl.zeros([ROWS], tl.int64)
        counted = live
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = counted[:, None] & (cols[None, :] < V)
    z = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask, other=float("-inf"),
                eviction_policy="evict_first")
    zt = z
    if HAS_SOFT:
        zt = tl.load(t_ptr + rows[:, None] * t_stride + cols[None, :], mask=mask, other=float("-inf"),
                     eviction_policy="evict_first")
    return z, zt, y
