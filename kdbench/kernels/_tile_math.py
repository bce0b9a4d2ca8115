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
def fast_log2(x, FAST: tl.constexpr):
    """log2: MUFU's lg2.approx (error about 2**-22) on a GPU, tl.log2 elsewhere.

    Triton's own log lowers to libdevice's correctly rounded logf, about twenty
    instructions; the interpreter cannot run inline PTX.  Denormals flush to zero (-inf).
    """
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def fast_log(x, FAST: tl.constexpr):
    """Natural log, :func:`fast_log2` times ln 2."""
    if FAST:
        return fast_log2(x, FAST) * LN2
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
def _load_tile(ptr, stride, rows, c, counted, V, PAIRS: tl.constexpr, BLOCK: tl.constexpr, KEEP: tl.constexpr):
    """(ROWS, BLOCK) raw values of chunk c, or with PAIRS (ROWS, BLOCK / 2) uint32 words that each
    hold two adjacent bfloat16 values (see :func:`widen`); -inf where nothing is read.  KEEP
    asks L2 to keep the lines ("evict_last": the tile is read again soon), else they go first."""
    if PAIRS:
        wcols = c * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
        ptrs = ptr.to(tl.pointer_type(tl.uint32), bitcast=True) + rows[:, None] * (stride // 2) + wcols[None, :]
        mask = counted[:, None] & (wcols[None, :] < V // 2)
        other = 0xFF80FF80
    else:
        cols = c * BLOCK + tl.arange(0, BLOCK)
        ptrs = ptr + rows[:, None] * stride + cols[None, :]
        mask = counted[:, None] & (cols[None, :] < V)
        other = float("-inf")
    if KEEP:
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_last")
    else:
        return tl.load(ptrs, mask=mask, other=other, eviction_policy="evict_first")


@triton.jit
def split_pairs(words):
    """float32 (low, high) values of uint32 words of two bfloat16 values each: columns 2w and 2w + 1
    of word w, one instruction per value (see :func:`widen`)."""
    return (words << 16).to(tl.float32, bitcast=True), (words & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def widen(raw, PAIRS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """float32 (ROWS, BLOCK) values of a tile from :func:`_load_tile`.

    Triton widens a bfloat16 by moving it out of its packed 32-bit register and then
    shifting it, two instructions per element.  From a word holding a pair, the low
    value is the word shifted left by 16 and the high one the word with its low half
    cleared: one instruction each, joined back into column order.
    """
    if PAIRS:
        lo, hi = split_pairs(raw)
        return tl.reshape(tl.join(lo, hi), [ROWS, BLOCK])
    else:
        return raw.to(tl.float32)


@triton.jit
def load_item(
    rb, c, s_ptr, s_stride, t_ptr, t_stride, y_ptr, N, V, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_SOFT: tl.constexpr, PAIRS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    KEEP: tl.constexpr,
):  # fmt: skip
    """Raw logits of chunk ``c`` of row block ``rb`` from one tensor (two when HAS_SOFT: the
    student's and the teacher's, else the first twice), and the rows' labels.

    Raw: (ROWS, BLOCK) values, or with PAIRS (bfloat16 rows of even length and stride)
    (ROWS, BLOCK / 2) words of two values each; :func:`widen` makes float32 of either.
    Nothing is read for rows past the end or rows that do not count (-inf comes back).
    ``KEEP``: the tile is read again soon, L2 should keep it (else its lines go first).
    """
    rows = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < N
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=live, other=ignore_index)
        counted = live & (y != ignore_index)
    else:
        y = tl.zeros([ROWS], tl.int64)
        counted = live
    z = _load_tile(s_ptr, s_stride, rows, c, counted, V, PAIRS, BLOCK, KEEP)
    zt = z
    if HAS_SOFT:
        zt = _load_tile(t_ptr, t_stride, rows, c, counted, V, PAIRS, BLOCK, KEEP)
    return z, zt, y
