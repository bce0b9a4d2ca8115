"""Fused calibration statistics: per-row confidence, prediction, NLL, Brier and per-bin sums.

Design
------
Two kernels, and one read of the logits.

1. ``_chunk_stats_kernel`` cuts the (N, C) logits into work items of at most ``TILE``
   elements (:func:`~kdbench.kernels._utils.tile_plan`: several rows per item when C is
   small, ``R = cdiv(C, BLOCK)`` chunks per row when it is large) and walks them with a
   persistent grid, loading the next item's logits before it works on the current
   one.  From registers it takes, per (row, chunk): the raw max m, its lowest column
   (the argmax), S' = sum_{k != y} e^((z_k - m) / T) and Q' = sum_{k != y} of the squares
   of those terms: one exp per logit, four reductions per item, nothing in the loop
   that depends on another item.  It writes these 16 bytes per (row, chunk).
2. ``_finish_kernel`` merges each row's R partials (M = max m, S' = sum S'_c
   e^((m_c - M) / T), Q' likewise with squares, argmax the lowest column among the
   chunks holding M), gathers x_y, and finishes the row:

   * confidence = 1 / S with S = S' + e_y (correctly rounded division), prediction = argmax;
   * NLL = log1p(S' / e_y) when p_y >= 1/2 (exact for tiny NLL), else log S + (M - z_y) / T;
   * Brier = (Q' + S'^2) / S^2, i.e. sum_{k != y} p_k^2 + (1 - p_y)^2: positive terms only.

   Then the bin, min(floor(conf * M), M - 1) in float32 exactly as the torch reference,
   and each program's float64 per-bin count, confidence sum and correct count and its
   NLL and Brier sums go to its own slot of a (P, 5, BINS_PAD) buffer that the host adds
   with ``torch.sum``: no atomics.  This kernel's grid depends only on N, C and M, so the
   statistics are bit-identical run after run and across devices.

Traffic model: one read of the logits (N C b bytes) and of the labels (8 N), plus
16 N R bytes of partials written and read, and 20 N bytes of per-row outputs: at
(65536, 32000) bf16 (R = 4) that is 4.19 GB + 8 MB, within 0.2% of one read.

Instruction budget per logit, from SASS (``tests/test_kernels_compile.py``): 14.7 per
bf16 logit at (65536, 32000) with Triton 3.9 (15.6 with 3.6), against about 16 that an
H200 can issue per bf16 logit at copy bandwidth.  bfloat16 rows of even length and stride
are loaded as 32-bit words of two values, whose halves stay apart until the first step of
each reduction (``_tile_math.split_pairs``).

Ignored rows (label == ignore_index) are not read.  A counted row with a NaN or +inf
value of z / T, or all -inf, gets NaN confidence / NLL / Brier and is binned in the
last bin, so the sums turn NaN; a label outside [0, C) (unchecked on CUDA, where the
host check would cost a sync) does the same.

Limits
------
* n_bins <= MAX_BINS (1024): the one-hot histogram lives in registers.
* Last dim must be contiguous (other strides are copied once); float32 / float16 /
  bfloat16 logits, float32 arithmetic, float64 accumulation of the per-bin sums.
  Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdbench._checks import interpreter_on
from kdbench.kernels._tile_math import LOG2E, finite_shift, load_item, merge_chunks, split_pairs, step_item, tile_exp
from kdbench.kernels._utils import as_rows, loads_pairs, pick_config, resident_programs, tile_plan
from kdbench.reference.calibration import CalibrationRows

MAX_BINS = 1024
# (elements per tile, warps per program, programs per SM) of the statistics kernel.  64
# logits per thread amortise the per-item work (four reductions, the next item's
# addresses, the partials' stores) to about 4 instructions per logit; the tile and the
# next one's raw logits take about 240 registers, so one 8-warp program fits per SM.
# (4096, 4, 4) and (8192, 8, 2) hold 32 logits per thread in about 127 registers, 16
# warps per SM, for about 2 instructions per logit more: the H200 ran the default at a
# third of copy bandwidth with its issue slots two-thirds idle, which more resident
# warps may hide.  The candidates are what `kdbench bench` sweeps on a GPU; the
# compile tests check each for spills and for programs per SM that fit.
TILE_CONFIGS = ((16384, 8, 1), (4096, 4, 4), (8192, 8, 2), (16384, 16, 1), (8192, 4, 2))
TILE_CONFIG = TILE_CONFIGS[0]
# Rows of at most 2048 elements: two-warp programs, 32 logits per thread, several rows each.
NARROW_CONFIG = (2048, 2, 8)
# Rows x chunks, and rows x bins, of the finishing kernel are kept to this many elements.
_FINISH_TILE = 1024
# At most this many finishing programs; each walks a fixed run of row blocks.
_MAX_PROGRAMS = 1024
# Slots per program in the partial-sum buffer: count, conf_sum, correct_sum, nll_sum, brier_sum.
_SLOTS = 5
_NO_COLUMN = tl.constexpr(2**31 - 1)


@triton.jit
def _log1p(u):
    """log(1 + u), accurate for tiny u (Goldberg's trick: the rounding of 1 + u cancels)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _chunk_stats_kernel(
    x_ptr,  # (N, C) logits, unit column stride
    x_stride,  # elements between rows
    y_ptr,  # (N,) int64 labels
    stat_ptr,  # (N, R, 4) float32 out: m, S', Q' of each (row, chunk) (slot 3 unused)
    arg_ptr,  # (N, R) int32 out: lowest column holding m
    N,
    C,
    R,  # chunks per row
    n_items,
    inv_t,  # 1 / T
    ignore_index,
    PAIRS: tl.constexpr,  # bfloat16 rows of even length and stride, loaded as 32-bit pairs (_tile_math.widen)
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    step_rb = nprog // R
    step_c = nprog - step_rb * R
    rb_next = pid // R
    c_next = pid - rb_next * R
    x_next, _, y_next = load_item(rb_next, c_next, x_ptr, x_stride, x_ptr, x_stride, y_ptr, N, C, ignore_index,
                                  True, False, PAIRS, ROWS, BLOCK, False)
    for it in range(pid, n_items, nprog):
        x_raw, y = x_next, y_next
        rb = rb_next
        c = c_next
        rb_next, c_next = step_item(rb, c, step_rb, step_c, R)
        # The next item's loads go out now and land while this one is worked on.
        x_next, _, y_next = load_item(rb_next, c_next, x_ptr, x_stride, x_ptr, x_stride, y_ptr, N, C, ignore_index,
                                      True, False, PAIRS, ROWS, BLOCK, False)

        rows = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        live = rows < N
        # The label is not in S', Q'.  Compared in int32, against the tile's own columns.
        y_in_tile = (y - c * BLOCK).to(tl.int32)
        if PAIRS:
            # The two values of each word stay apart (columns 2w and 2w + 1) and meet in the
            # first step of each reduction: no interleaving of the tile.
            lo, hi = split_pairs(x_raw)
            w2 = 2 * tl.arange(0, BLOCK // 2)[None, :]
            m = tl.max(tl.maximum(lo, hi), axis=1)
            e_lo = tl.where(w2 == y_in_tile[:, None], 0.0, tile_exp(lo, m, inv_t))
            e_hi = tl.where(w2 + 1 == y_in_tile[:, None], 0.0, tile_exp(hi, m, inv_t))
            first = tl.minimum(tl.where(lo == m[:, None], w2, _NO_COLUMN), tl.where(hi == m[:, None], w2 + 1, _NO_COLUMN))
            s_rest = tl.sum(e_lo + e_hi, axis=1)
            q_rest = tl.sum(e_lo * e_lo + e_hi * e_hi, axis=1)
        else:
            x = x_raw.to(tl.float32)
            m = tl.max(x, axis=1)
            e = tile_exp(x, m, inv_t)
            e = tl.where(tl.arange(0, BLOCK)[None, :] == y_in_tile[:, None], 0.0, e)
            first = tl.where(x == m[:, None], tl.arange(0, BLOCK)[None, :], _NO_COLUMN)
            s_rest = tl.sum(e, axis=1)
            q_rest = tl.sum(e * e, axis=1)
        arg = tl.min(first, axis=1)
        arg = tl.where(arg == _NO_COLUMN, _NO_COLUMN, arg + c * BLOCK)  # no max seen: a NaN row
        out = (rows * R + c) * 4
        tl.store(stat_ptr + out, m, mask=live)
        tl.store(stat_ptr + out + 1, s_rest, mask=live)
        tl.store(stat_ptr + out + 2, q_rest, mask=live)
        tl.store(arg_ptr + rows * R + c, arg, mask=live)


@triton.jit
def _finish_kernel(
    x_ptr,  # (N, C) logits (only x_y is read)
    x_stride,
    y_ptr,  # (N,) int64 labels
    stat_ptr,  # (N, R, 4) float32 chunk statistics
    arg_ptr,  # (N, R) int32 chunk argmax
    conf_ptr,  # (N,) float32 out: max softmax probability; 0 for ignored rows
    pred_ptr,  # (N,) int64 out: argmax, lowest index among ties; -1 for ignored rows
    nll_ptr,  # (N,) float32 out: -log p_y; 0 for ignored rows
    brier_ptr,  # (N,) float32 out: sum_k (p_k - 1[y = k])^2; 0 for ignored rows
    part_ptr,  # (P, 5, BINS_PAD) float64 out: this program's count/conf/correct per bin, nll/brier totals
    N,
    C,
    R,
    inv_t,
    ignore_index,
    n_bins,  # M
    rows_per_prog,  # a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # rows per block
    CHUNKS_PAD: tl.constexpr,  # next power of two >= R
    BINS_PAD: tl.constexpr,  # next power of two >= M
):
    pid = tl.program_id(0).to(tl.int64)
    r_off = tl.arange(0, BLOCK_N)
    ch = tl.arange(0, CHUNKS_PAD)
    slots = tl.arange(0, BINS_PAD)
    acc_count = tl.zeros([BINS_PAD], tl.float64)
    acc_conf = tl.zeros([BINS_PAD], tl.float64)
    acc_correct = tl.zeros([BINS_PAD], tl.float64)
    acc_nll = tl.zeros([BLOCK_N], tl.float64)
    acc_brier = tl.zeros([BLOCK_N], tl.float64)

    for r0 in range(0, rows_per_prog, BLOCK_N):
        rows = pid * rows_per_prog + r0 + r_off  # int64
        in_n = rows < N
        label = tl.load(y_ptr + rows, mask=in_n, other=ignore_index)
        counted = in_n & (label != ignore_index)
        label_ok = (label >= 0) & (label < C)
        safe_label = tl.where(label_ok & counted, label, 0)

        cm = counted[:, None] & (ch[None, :] < R)
        at = (rows[:, None] * R + ch[None, :]) * 4
        m_c = tl.load(stat_ptr + at, mask=cm, other=float("-inf"))
        m, s_rest = merge_chunks(m_c, tl.load(stat_ptr + at + 1, mask=cm, other=0.0), inv_t)
        _, q_rest = merge_chunks(m_c, tl.load(stat_ptr + at + 2, mask=cm, other=0.0), 2.0 * inv_t)
        arg_c = tl.load(arg_ptr + rows[:, None] * R + ch[None, :], mask=cm, other=_NO_COLUMN)
        arg = tl.min(tl.where(m_c == m[:, None], arg_c, _NO_COLUMN), axis=1).to(tl.int64)

        z_y = tl.load(x_ptr + rows * x_stride + safe_label, mask=counted, other=0.0).to(tl.float32)
        dy = (z_y - finite_shift(m)) * inv_t  # (z_y - M) / T, exact when they are close
        e_y = tl.exp2(dy * LOG2E)
        s = s_rest + e_y
        conf = tl.math.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), s)
        nll_far = tl.log(s) - dy
        near = e_y >= s_rest  # p_y >= 1/2
        nll_near = _log1p(tl.where(near, s_rest, 0.0) / tl.where(near & (e_y > 0.0), e_y, 1.0))
        nll = tl.where(near, nll_near, nll_far)
        brier = (q_rest + s_rest * s_rest) / (s * s)
        # A NaN / +inf logit leaves S NaN; no finite logit leaves it 0 (or NaN across chunks).
        undefined = ~(s > 0.0) | (m == float("-inf")) | ~label_ok
        conf = tl.where(undefined, float("nan"), conf)
        nll = tl.where(undefined, float("nan"), nll)
        brier = tl.where(undefined, float("nan"), brier)
        correct = (arg == label) & counted

        tl.store(conf_ptr + rows, tl.where(counted, conf, 0.0), mask=in_n)
        tl.store(pred_ptr + rows, tl.where(counted, arg, -1), mask=in_n)
        tl.store(nll_ptr + rows, tl.where(counted, nll, 0.0), mask=in_n)
        tl.store(brier_ptr + rows, tl.where(counted, brier, 0.0), mask=in_n)

        # Same float32 expression as the reference: min(floor(conf * M), M - 1); NaN -> last bin.
        b = tl.floor(conf * n_bins)
        b = tl.where(b != b, n_bins - 1, tl.minimum(b, n_bins - 1).to(tl.int32))
        hot = (b[:, None] == slots[None, :]) & counted[:, None]
        acc_count += tl.sum(hot.to(tl.float64), axis=0)
        acc_conf += tl.sum(tl.where(hot, conf.to(tl.float64)[:, None], 0.0), axis=0)
        acc_correct += tl.sum((hot & correct[:, None]).to(tl.float64), axis=0)
        acc_nll += tl.where(counted, nll.to(tl.float64), 0.0)
        acc_brier += tl.where(counted, brier.to(tl.float64), 0.0)

    out = part_ptr + pid * (5 * BINS_PAD)
    tl.store(out + slots, acc_count)
    tl.store(out + BINS_PAD + slots, acc_conf)
    tl.store(out + 2 * BINS_PAD + slots, acc_correct)
    first = slots == 0
    tl.store(out + 3 * BINS_PAD + slots, tl.where(first, tl.sum(acc_nll, axis=0), 0.0))
    tl.store(out + 4 * BINS_PAD + slots, tl.where(first, tl.sum(acc_brier, axis=0), 0.0))


def finish_plan(n: int, chunks: int, n_bins: int) -> dict[str, int]:
    """Row blocks and program count of the finishing kernel for N rows of ``chunks`` chunks and M bins.

    A pure function of (N, chunks, M): the same input is split the same way on every
    device, which is what makes the fixed-order reduction reproducible.
    """
    chunks_pad = triton.next_power_of_2(max(chunks, 1))
    bins_pad = max(triton.next_power_of_2(n_bins), 2)
    block_n = max(1, min(_FINISH_TILE // chunks_pad, _FINISH_TILE // bins_pad, triton.next_power_of_2(max(n, 1))))
    blocks = triton.cdiv(max(n, 1), block_n)
    per_prog = triton.cdiv(blocks, min(blocks, _MAX_PROGRAMS))
    return {
        "BLOCK_N": block_n,
        "CHUNKS_PAD": chunks_pad,
        "BINS_PAD": bins_pad,
        "num_warps": 4,
        "programs": triton.cdiv(blocks, per_prog),
        "rows_per_prog": per_prog * block_n,
    }


@torch.compiler.disable
def calibration_sums_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_bins: int,
    temperature: float,
    ignore_index: int,
) -> tuple[CalibrationRows, dict[str, torch.Tensor]]:
    """Fused path of :func:`kdbench.calibration.calibration_stats` (arguments validated).

    Args:
        logits: (N, C) float32/float16/bfloat16.
        labels: (N,) integer.

    Returns:
        ``(rows, sums)`` as :func:`kdbench.reference.calibration.calibration_sums`: per-row
        float32 conf/nll/brier, int64 pred, bool counted; float64 sums.
    """
    if not 1 <= n_bins <= MAX_BINS:
        raise ValueError(f"n_bins: the triton backend takes 1 <= n_bins <= {MAX_BINS}, got {n_bins}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: the triton backend takes float32/float16/bfloat16, got {logits.dtype}")
    x = as_rows(logits)
    n, c = x.shape
    device = x.device
    y = labels.reshape(-1).to(torch.int64).contiguous()
    tile, num_warps, per_sm = pick_config(c, x.element_size(), TILE_CONFIG, NARROW_CONFIG)
    plan = tile_plan(n, c, tile)
    fin = finish_plan(n, plan.chunks, n_bins)
    conf = torch.empty(n, dtype=torch.float32, device=device)
    pred = torch.empty(n, dtype=torch.int64, device=device)
    nll = torch.empty(n, dtype=torch.float32, device=device)
    brier = torch.empty(n, dtype=torch.float32, device=device)
    part = torch.zeros((fin["programs"], _SLOTS, fin["BINS_PAD"]), dtype=torch.float64, device=device)
    if n > 0:
        stats = torch.empty((n, plan.chunks, 4), dtype=torch.float32, device=device)
        args = torch.empty((n, plan.chunks), dtype=torch.int32, device=device)
        call = (x, x.stride(0), y, stats, args, n, c, plan.chunks, plan.items, 1.0 / temperature, ignore_index)
        consts = dict(PAIRS=loads_pairs(x), ROWS=plan.ROWS, BLOCK=plan.BLOCK, num_warps=num_warps, num_stages=1,
                      enable_fp_fusion=True)
        programs = plan.items
        if not interpreter_on() and device.type == "cuda":
            # Nothing waits on another program here, so the grid need not all be resident;
            # one resident wave keeps every program's prefetch useful.
            probe = _chunk_stats_kernel.warmup(*call, grid=(1,), **consts)
            programs = min(plan.items, resident_programs(probe, device, num_warps, per_sm))
        _chunk_stats_kernel[(programs,)](*call, **consts)
        _finish_kernel[(fin["programs"],)](
            x, x.stride(0), y, stats, args, conf, pred, nll, brier, part, n, c, plan.chunks, 1.0 / temperature,
            ignore_index, n_bins, fin["rows_per_prog"], BLOCK_N=fin["BLOCK_N"], CHUNKS_PAD=fin["CHUNKS_PAD"],
            BINS_PAD=fin["BINS_PAD"], num_warps=fin["num_warps"],
        )  # fmt: skip
    total = part.sum(dim=0)  # fixed-order reduction over programs
    counted = y != ignore_index
    sums = {
        "count": total[0, :n_bins].contiguous(),
        "conf_sum": total[1, :n_bins].contiguous(),
        "correct_sum": total[2, :n_bins].contiguous(),
        "nll_sum": total[3, 0].clone(),
        "brier_sum": total[4, 0].clone(),
        "n": counted.sum(dtype=torch.float64),
    }
    return CalibrationRows(conf=conf, pred=pred, nll=nll, brier=brier, counted=counted), sums
