"""Fused calibration statistics: per-row confidence, prediction, NLL, Brier and per-bin sums.

Design
------
Each program owns a fixed run of ``rows_per_prog`` rows (a whole number of row blocks
of BLOCK_N rows).  With x = z * (1 / T) in float32, per row it finds the max m, the
lowest-index argmax, S' = sum_{k != y} e^(x_k - m) and Q' = sum_{k != y} e^(2 (x_k - m)):

* a row that fits one BLOCK_C-wide tile is reduced directly (max with its
  lowest-index argmax, then the two sums: one exp per element);
* a wider row streams through tiles (any C: 262,144 and beyond is tested), each lane
  keeping its own running max, first argmax and rescaled S', Q' with one exp per
  element; the lanes are merged once per row.  No cross-lane reduction sits in the
  loop (five per tile would serialise a 16-warp program on barriers), and the loop is
  software-pipelined (``STREAM_STAGES`` tiles in flight).

After the stream, with e_y = e^(x_y - m) from one gathered load and S = S' + e_y:

* confidence = 1 / S (correctly rounded division), prediction = argmax;
* NLL = log1p(S' / e_y) when p_y >= 1/2 (exact for tiny NLL), else log S + (m - x_y);
* Brier = (Q' + S'^2) / S^2, which is sum_k p_k^2 - 2 p_y + 1 regrouped as
  sum_{k != y} p_k^2 + (1 - p_y)^2: a sum of positive terms, no cancellation when
  p_y is near 1.  The probabilities are never materialised.

The bin is min(floor(conf * M), M - 1) in float32, exactly as the torch reference.
Each program accumulates, in float64 registers, its rows' per-bin count, confidence
sum and correct count (a masked one-hot sum per row block) and its NLL and Brier
sums, and writes them to its own slot of a (P, 5, BINS_PAD) buffer.  The host adds the
P slots with ``torch.sum`` (a fixed-order reduction): no atomics, so the statistics
are bit-identical run after run.  P depends only on N, C and M, not on the device.

Ignored rows (label == ignore_index) are not read.  A counted row with a NaN or +inf
value of z / T, or all -inf, gets NaN confidence / NLL / Brier and is binned in the
last bin, so the sums turn NaN; a label outside [0, C) (unchecked on CUDA, where the
host check would cost a sync) does the same.

Limits
------
* n_bins <= MAX_BINS (1024): the one-hot histogram lives in registers.
* One row block per program at a time: a handful of rows with a huge C under-uses a
  GPU (still correct).  Row offsets are int64.
* Last dim must be contiguous (other strides are copied once); float32 / float16 /
  bfloat16 logits, float32 arithmetic, float64 accumulation of the per-bin sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdbench.kernels._utils import as_rows, launch_config, online_max_step
from kdbench.reference.calibration import CalibrationRows

MAX_BINS = 1024
# Row block x column tile, and row block x bins, are kept to this many elements.
_TILE = 4096
# At most this many programs; each walks a fixed run of row blocks.
_MAX_PROGRAMS = 1024
# Slots per program in the partial-sum buffer: count, conf_sum, correct_sum, nll_sum, brier_sum.
_SLOTS = 5
# Column tiles in flight when a row streams (cp.async on Hopper), so that the next
# tiles' loads overlap this tile's arithmetic; not tuned on a GPU (see kd_loss.py).
STREAM_STAGES = 3


@triton.jit
def _log1p(u):
    """log(1 + u), accurate for tiny u (Goldberg's trick: the rounding of 1 + u cancels)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _load_tile(
    row_ptr,  # (BLOCK_N,) pointers to the rows
    counted,  # (BLOCK_N,) rows to read
    cols,  # (BLOCK_C,) column indices
    C,
    inv_t,
):
    """x = z / T for one tile, NaN / +inf replaced by -inf, and where they were."""
    mask = counted[:, None] & (cols[None, :] < C)
    x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    broken = (x != x) | (x == float("inf"))
    return tl.where(broken, float("-inf"), x), broken


@triton.jit
def _row_stats_one_tile(
    row_ptr,  # (BLOCK_N,) pointers to the rows
    counted,  # (BLOCK_N,) rows to read
    safe_label,  # (BLOCK_N,) label column, 0 for rows not counted
    C,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(m, argmax, S', Q', bad) of rows that fit one tile: direct reductions."""
    cols = tl.arange(0, BLOCK_C)
    x, broken = _load_tile(row_ptr, counted, cols, C, inv_t)
    bad = tl.max(broken.to(tl.int32), axis=1)
    m, arg = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(x - m_safe[:, None])
    e = tl.where(cols[None, :] == safe_label[:, None], 0.0, e)
    return m, arg.to(tl.int64), tl.sum(e, axis=1), tl.sum(e * e, axis=1), bad


@triton.jit
def _row_stats_streamed(
    row_ptr,  # (BLOCK_N,) pointers to the rows
    counted,  # (BLOCK_N,) rows to read
    safe_label,  # (BLOCK_N,) label column, 0 for rows not counted
    C,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """(m, argmax, S', Q', bad) of rows wider than a tile.

    Every lane keeps its own running max, first argmax, S' and Q' over the columns it
    sees, so the loop has no cross-lane reduction (one per row at the end instead of
    five per tile), and one exp per element (see online_max_step; Q' takes e squared).
    The row's argmax is the lowest column among the lanes holding the row max: each
    lane's is its earliest.
    """
    c_off = tl.arange(0, BLOCK_C)
    m_l = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float32)
    arg_l = tl.zeros([BLOCK_N, BLOCK_C], tl.int32)
    s_l = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    q_l = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    bad_l = tl.zeros([BLOCK_N, BLOCK_C], tl.int32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=NUM_STAGES):
        cols = c0 + c_off
        x, broken = _load_tile(row_ptr, counted, cols, C, inv_t)
        bad_l = tl.maximum(bad_l, broken.to(tl.int32))
        w = tl.where(cols[None, :] == safe_label[:, None], 0.0, 1.0)  # the label is not in S', Q'
        m_l, e, grew = online_max_step(m_l, x)
        e2 = e * e
        s_l = tl.where(grew, s_l * e + w, s_l + w * e)
        q_l = tl.where(grew, q_l * e2 + w, q_l + w * e2)
        arg_l = tl.where(grew, cols[None, :], arg_l)
    m = tl.max(m_l, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    arg = tl.min(tl.where(m_l == m[:, None], arg_l, C), axis=1)
    scale = tl.exp(m_l - m_safe[:, None])
    s_rest = tl.sum(s_l * scale, axis=1)
    q_rest = tl.sum(q_l * (scale * scale), axis=1)
    return m, arg.to(tl.int64), s_rest, q_rest, tl.max(bad_l, axis=1)


@triton.jit
def _calibration_kernel(
    x_ptr,  # (N, C) logits, unit column stride
    x_stride,  # elements between rows
    y_ptr,  # (N,) int64 labels
    conf_ptr,  # (N,) float32 out: max softmax probability; 0 for ignored rows
    pred_ptr,  # (N,) int64 out: argmax, lowest index among ties; -1 for ignored rows
    nll_ptr,  # (N,) float32 out: -log p_y; 0 for ignored rows
    brier_ptr,  # (N,) float32 out: sum_k (p_k - 1[y = k])^2; 0 for ignored rows
    part_ptr,  # (P, 5, BINS_PAD) float64 out: this program's count/conf/correct per bin, nll/brier totals
    N,  # rows
    C,  # classes
    inv_t,  # 1 / T
    ignore_index,  # label marking an ignored row
    n_bins,  # M
    rows_per_prog,  # a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # rows per block
    BLOCK_C: tl.constexpr,  # columns per tile
    BINS_PAD: tl.constexpr,  # next power of two >= M
    SINGLE_TILE: tl.constexpr,  # C <= BLOCK_C: a row is one tile
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the column loop
):
    pid = tl.program_id(0).to(tl.int64)
    r_off = tl.arange(0, BLOCK_N)
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
        row_ptr = x_ptr + rows * x_stride

        if SINGLE_TILE:
            m, arg, s_rest, q_rest, bad = _row_stats_one_tile(row_ptr, counted, safe_label, C, inv_t, BLOCK_N, BLOCK_C)
        else:
            m, arg, s_rest, q_rest, bad = _row_stats_streamed(
                row_ptr, counted, safe_label, C, inv_t, BLOCK_N, BLOCK_C, NUM_STAGES
            )

        m_safe = tl.where(m == float("-inf"), 0.0, m)
        x_y = tl.load(row_ptr + safe_label, mask=counted, other=0.0).to(tl.float32) * inv_t
        e_y = tl.exp(x_y - m_safe)
        s = s_rest + e_y
        conf = tl.math.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), s)
        nll_far = tl.log(s) + (m_safe - x_y)  # m - x_y first: exact when they are close
        near = e_y >= s_rest  # p_y >= 1/2
        nll_near = _log1p(tl.where(near, s_rest, 0.0) / tl.where(near & (e_y > 0.0), e_y, 1.0))
        nll = tl.where(near, nll_near, nll_far)
        brier = (q_rest + s_rest * s_rest) / (s * s)
        undefined = (bad > 0) | (m == float("-inf")) | (x_y != x_y) | (x_y == float("inf")) | (label_ok == 0)
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


def launch_plan(n: int, c: int, n_bins: int) -> dict[str, int]:
    """Block sizes, warps and program count for N rows of C classes and M bins.

    A pure function of (N, C, M): the same input is split the same way on every device,
    which is what makes the fixed-order reduction reproducible.
    """
    block_c, _ = launch_config(c)
    bins_pad = max(triton.next_power_of_2(n_bins), 2)
    block_n = max(1, min(_TILE // block_c, _TILE // bins_pad, triton.next_power_of_2(max(n, 1))))
    _, num_warps = launch_config(block_n * block_c)
    blocks = triton.cdiv(max(n, 1), block_n)
    per_prog = triton.cdiv(blocks, min(blocks, _MAX_PROGRAMS))
    programs = triton.cdiv(blocks, per_prog)
    return {
        "BLOCK_N": block_n,
        "BLOCK_C": block_c,
        "BINS_PAD": bins_pad,
        "num_warps": num_warps,
        "programs": programs,
        "rows_per_prog": per_prog * block_n,
        "SINGLE_TILE": c <= block_c,
        "NUM_STAGES": STREAM_STAGES if c > block_c else 1,
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
    plan = launch_plan(n, c, n_bins)
    conf = torch.empty(n, dtype=torch.float32, device=device)
    pred = torch.empty(n, dtype=torch.int64, device=device)
    nll = torch.empty(n, dtype=torch.float32, device=device)
    brier = torch.empty(n, dtype=torch.float32, device=device)
    part = torch.zeros((plan["programs"], _SLOTS, plan["BINS_PAD"]), dtype=torch.float64, device=device)
    if n > 0:
        _calibration_kernel[(plan["programs"],)](
            x,
            x.stride(0),
            y,
            conf,
            pred,
            nll,
            brier,
            part,
            n,
            c,
            1.0 / temperature,
            ignore_index,
            n_bins,
            plan["rows_per_prog"],
            BLOCK_N=plan["BLOCK_N"],
            BLOCK_C=plan["BLOCK_C"],
            BINS_PAD=plan["BINS_PAD"],
            SINGLE_TILE=plan["SINGLE_TILE"],
            NUM_STAGES=plan["NUM_STAGES"],
            num_warps=plan["num_warps"],
        )
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
