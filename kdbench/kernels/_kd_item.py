"""One work item of the fused distillation loss: statistics, loss and gradient of a tile.

The persistent loop of ``kd_loss.py`` loads items and calls :func:`kd_item` on each;
the design, the phases and the formulas are described there and in ``_kd_math.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdbench.kernels._kd_math import (
    gather_chunks, jsd_log2_ratios, jsd_log_ratios, log2_probs, plog, prob_factor, splat,
)
from kdbench.kernels._tile_math import LN2, LOG2E, finite_shift, merge_chunks, tile_exp, tile_exp_fma, widen
from kdbench.kernels._utils import arrive, arrive_and_wait, cast_for_store, wait_until

# Phases (launches) of a chunked row when they do not meet in the kernel.
ALL, STATS, LOSS, GRAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def kd_item(
    z_raw, zt_raw, y, rb, c,  # the item: raw (ROWS, BLOCK) logits, labels, row block and chunk
    s_ptr, s_stride, part_ptr, g_ptr, g_stride, go_ptr, ws_ptr, cnt_ptr,
    N, V, R, gscale, inv_t, soft_w, hard_w, beta, ub_s, ub_t, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_HARD: tl.constexpr,
    T_IS_ONE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, GO_MODE: tl.constexpr, PHASE: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr, ON_GPU: tl.constexpr, PAIRS: tl.constexpr, LAGGED: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_PAD: tl.constexpr,
):  # fmt: skip
    """Statistics, loss part and gradient of item (rb, c); see ``kd_loss._kd_kernel`` for the arguments."""
    CHUNKED: tl.constexpr = CHUNKS_PAD > 1
    NEED_K: tl.constexpr = HAS_SOFT and DIVERGENCE == 2 and COMPUTE_GRAD  # JSD meets twice
    SEP_E1: tl.constexpr = HAS_HARD and not T_IS_ONE
    # Whether this launch takes the tiles' own statistics (else the row's, from the workspace).
    LOCAL: tl.constexpr = not CHUNKED or PHASE == ALL or PHASE == STATS
    # JSD's later launches work in bits: log2 p first, p = 2**(log2 p) from it.
    JSD2: tl.constexpr = HAS_SOFT and DIVERGENCE == 2 and not LOCAL
    rows = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    live = rows < N
    counted = live
    if HAS_LABELS:
        counted = live & (y != ignore_index)
    label_ok = (y >= 0) & (y < V)
    tl.device_assert(label_ok | (counted == 0), "label out of range [0, V)")
    ws_row = ws_ptr + (rows * R) * 8
    # A chunked row (ROWS == 1) that counts takes part in the barriers.
    row0 = rb.to(tl.int64) * ROWS
    meets = tl.sum(counted.to(tl.int32), axis=0) > 0

    # ---- 1. statistics -------------------------------------------------------
    z = widen(z_raw, PAIRS, ROWS, BLOCK)
    zt = z
    if HAS_SOFT:
        zt = widen(zt_raw, PAIRS, ROWS, BLOCK)
    if LOCAL:
        # This tile's raw maxima and e = exp((z - max) / T): one exp per element and tensor,
        # kept in registers.
        m_s = tl.max(z, axis=1)
        m_t = m_s
        if HAS_SOFT:
            m_t = tl.max(zt, axis=1)
        if PHASE == STATS and (DIVERGENCE == 2 or not HAS_SOFT):
            # Only (max, sum) pairs leave this launch: each exponent is one fma against the
            # rounded max, the rounding's exact factor applied to the sum (tile_exp_fma).
            e_s, f_s = tile_exp_fma(z, m_s, inv_t)
            s_s = tl.sum(e_s, 1) * f_s
            s_t, s_1, a = s_s, s_s, s_s
            if HAS_SOFT:
                e_t, f_t = tile_exp_fma(zt, m_t, inv_t)
                s_t = tl.sum(e_t, 1) * f_t
            if SEP_E1:
                e_1, f_1 = tile_exp_fma(z, m_s, 1.0)
                s_1 = tl.sum(e_1, 1) * f_1
        else:
            e_s = tile_exp(z, m_s, inv_t)
            e_t = e_s
            e_1 = e_s
            if HAS_SOFT:
                e_t = tile_exp(zt, m_t, inv_t)
            if SEP_E1:
                e_1 = tile_exp(z, m_s, 1.0)
            # Forward and reverse KL sum their loss terms against the local exps now, so only the
            # row's (max, sum) have to travel: sum p (log p - log q) = r * (sum e (z - z') / T + c0 * sum e).
            q = z
            if HAS_SOFT and DIVERGENCE == 0:
                q = plog(zt - z)
                s_s, s_t, a, s_1 = tl.sum(e_s, 1), tl.sum(e_t, 1), tl.sum(e_t * q, 1), tl.sum(e_1, 1)
            elif HAS_SOFT and DIVERGENCE == 1:
                q = plog(z - zt)
                s_s, s_t, a, s_1 = tl.sum(e_s, 1), tl.sum(e_t, 1), tl.sum(e_s * q, 1), tl.sum(e_1, 1)
            else:
                s_s, s_t, s_1 = tl.sum(e_s, 1), tl.sum(e_t, 1), tl.sum(e_1, 1)
                a = s_s
        # The maxima the tiles' exps were taken against (tm_*), the row's, and the tiles' extra
        # factors (f_*: 1 here, see tile_exp_fma).
        tm_s, tm_t = m_s, m_t
        f_s, f_t, f_1 = 1.0, 1.0, 1.0
        M_s, S_s, M_t, S_t, S_1 = m_s, s_s, m_t, s_t, s_1
        if CHUNKED:
            slots = tl.arange(0, 8)
            vals = tl.where(slots == 0, tl.sum(m_s, axis=0), tl.sum(s_s, axis=0))
            vals = tl.where(slots == 2, tl.sum(m_t, axis=0), vals)
            vals = tl.where(slots == 3, tl.sum(s_t, axis=0), vals)
            vals = tl.where(slots == 4, tl.sum(s_1, axis=0), vals)
            vals = tl.where(slots == 5, tl.sum(a, axis=0), vals)
            if meets:
                tl.store(ws_ptr + (row0 * R + c) * 8 + slots, vals, mask=slots < 6)
                if PHASE == ALL:
                    arrive_and_wait(cnt_ptr + row0, R)
                if LAGGED:
                    arrive(cnt_ptr + row0)
    if CHUNKED and PHASE != STATS:
        # ---- 2. row statistics from every chunk's (max, sum) ----------------------
        if LAGGED:
            # In the lagged launch the row's statistics (and, for JSD's gradient, its K
            # parts) were published some items ago: this rarely waits.
            if meets:
                if PHASE == LOSS:
                    wait_until(cnt_ptr + row0, R)
                else:
                    wait_until(cnt_ptr + row0, 2 * R)
        m_all = gather_chunks(ws_row, 0, R, counted, CHUNKS_PAD, float("-inf"))
        s_all = gather_chunks(ws_row, 1, R, counted, CHUNKS_PAD, 0.0)
        M_s, S_s = merge_chunks(m_all, s_all, inv_t)
        M_t, S_t, S_1 = M_s, S_s, S_s
        if HAS_SOFT:
            M_t, S_t = merge_chunks(gather_chunks(ws_row, 2, R, counted, CHUNKS_PAD, float("-inf")),
                                    gather_chunks(ws_row, 3, R, counted, CHUNKS_PAD, 0.0), inv_t)
        if SEP_E1:
            _, S_1 = merge_chunks(m_all, gather_chunks(ws_row, 4, R, counted, CHUNKS_PAD, 0.0), 1.0)
        # The merged values live in the layout of the (1, CHUNKS_PAD) gathers; as
        # scalars splatted back they take the tile's, with no layout conversion of a tile
        # (Triton 3.6 would otherwise move a whole tile through shared memory).
        M_s = splat(M_s, ROWS)
        S_s = splat(S_s, ROWS)
        M_t = splat(M_t, ROWS)
        S_t = splat(S_t, ROWS)
        S_1 = splat(S_1, ROWS)
        if not LOCAL:
            # A later launch: the row's maxima are known, so the tiles' exps are taken against
            # them directly (no maxima, no sums: about half the work of the statistics).  The
            # loss terms of forward and reverse KL are this chunk's own, from the statistics
            # launch.
            tm_s, tm_t = M_s, M_t
            if JSD2:
                # The log-probabilities JSD needs anyway give p in one exp each: e_* hold
                # p_* here (r_* = 1 below).
                f_1 = 1.0
                ls2, e_s = log2_probs(z, M_s, S_s, counted, inv_t, ON_GPU)
                lt2, e_t = log2_probs(zt, M_t, S_t, counted, inv_t, ON_GPU)
                e_1 = e_s
                if SEP_E1:
                    e_1 = tile_exp(z, M_s, 1.0)
            elif DIVERGENCE == 0 or not HAS_SOFT:
                # Nothing else needs z - M here: the exps take it inside one fma each.
                e_s, f_s = tile_exp_fma(z, M_s, inv_t)
                e_t, f_t, e_1, f_1 = e_s, f_s, e_s, f_s
                if HAS_SOFT:
                    e_t, f_t = tile_exp_fma(zt, M_t, inv_t)
                if SEP_E1:
                    e_1, f_1 = tile_exp_fma(z, M_s, 1.0)
            else:
                f_s, f_t, f_1 = 1.0, 1.0, 1.0
                e_s = tile_exp(z, M_s, inv_t)
                e_t = tile_exp(zt, M_t, inv_t)
                e_1 = e_s
                if SEP_E1:
                    e_1 = tile_exp(z, M_s, 1.0)
            own = ws_row + c * 8
            m_s = tl.load(own, mask=counted, other=float("-inf"))
            s_s = tl.load(own + 1, mask=counted, other=0.0)
            m_t = tl.load(own + 2, mask=counted, other=float("-inf"))
            s_t = tl.load(own + 3, mask=counted, other=0.0)
            a = tl.load(own + 5, mask=counted, other=0.0)
            q = z
            if HAS_SOFT and DIVERGENCE == 1:
                q = plog(z - zt)
    if not SEP_E1:
        S_1 = S_s
    if PHASE != STATS:
        # No finite logit, or a NaN / +inf one, leaves no positive sum: the row is undefined.
        undefined = ~(S_s > 0)
        if HAS_SOFT:
            undefined = undefined | ~(S_t > 0)
        # p_s = e_s * r_s, p_t = e_t * r_t, softmax(z) = e_1 * r_1; 0 for rows that do not count.
        if JSD2:
            r_s = tl.where(counted, 1.0, 0.0)
            r_t = r_s
        else:
            r_s = tl.where(counted, prob_factor(tm_s, M_s, S_s, inv_t) * f_s, 0.0)
            r_t = tl.where(counted, prob_factor(tm_t, M_t, S_t, inv_t) * f_t, 0.0)
        r_1 = r_s
        if SEP_E1:
            r_1 = tl.where(counted, prob_factor(tm_s, M_s, S_1, 1.0) * f_1, 0.0)

        # ---- 3. loss and the row scalar K ------------------------------------
        loss = tl.zeros([ROWS], tl.float32)
        k_row = tl.zeros([ROWS], tl.float32)
        if HAS_SOFT:
            # log p_t - log p_s = (z_t - z_s) / T + c0: differences of logits, no large logsumexps.
            # (0 for rows that do not count, whose maxima are -inf: their terms are all 0.)
            c0 = tl.where(counted, (M_s - M_t) * inv_t + tl.log(S_s / S_t), 0.0)
            if DIVERGENCE == 0:
                # This chunk's terms, against its own maximum (rl: the chunk's factor r).
                loss = tl.where(counted, prob_factor(m_t, M_t, S_t, inv_t), 0.0) * (a * inv_t + c0 * s_t)
            elif DIVERGENCE == 1:
                loss = tl.where(counted, prob_factor(m_s, M_s, S_s, inv_t), 0.0) * (a * inv_t - c0 * s_s)
                k_row = loss
                if CHUNKED:
                    # K = KL(p_s || p_t): every chunk's part, from its (max, sum, sum e (z_s - z_t)).
                    r_all = prob_factor(m_all, M_s[:, None], S_s[:, None], inv_t)
                    b_all = gather_chunks(ws_row, 5, R, counted, CHUNKS_PAD, 0.0)
                    k_all = tl.where(s_all > 0, r_all * (b_all * inv_t - c0[:, None] * s_all), 0.0)
                    k_row = splat(tl.sum(k_all, axis=1), ROWS)
            else:
                if JSD2:
                    # Ratios in bits (q too, for the gradient), the sums back in nats.
                    q, d_t = jsd_log2_ratios(ls2, lt2, e_s, e_t, beta, ON_GPU)
                    k_part, l_t = tl.sum(e_s * q, 1) * LN2, tl.sum(e_t * d_t, 1) * LN2
                else:
                    p_s = e_s * r_s[:, None]
                    p_t = e_t * r_t[:, None]
                    ls = (z - finite_shift(M_s)[:, None]) * inv_t - tl.log(S_s)[:, None]
                    lt = (zt - finite_shift(M_t)[:, None]) * inv_t - tl.log(S_t)[:, None]
                    q, d_t = jsd_log_ratios(ls, lt, p_s, p_t, beta, ub_s, ub_t, ON_GPU)
                    k_part, l_t = tl.sum(p_s * q, 1), tl.sum(p_t * d_t, 1)
                loss = beta * l_t + (1.0 - beta) * k_part
                k_row = k_part
                if NEED_K and CHUNKED:
                    if PHASE == ALL or PHASE == LOSS:
                        if meets:
                            tl.store(ws_row + c * 8 + 6, k_part, mask=counted)
                            if PHASE == ALL:
                                arrive_and_wait(cnt_ptr + row0, 2 * R)
                            if LAGGED:
                                arrive(cnt_ptr + row0)
                    if PHASE != LOSS:
                        k_row = splat(tl.sum(gather_chunks(ws_row, 6, R, counted, CHUNKS_PAD, 0.0), axis=1), ROWS)
            loss = soft_w * loss
        if HAS_HARD:
            if c == 0:
                # -log softmax(z)[y] = (M - z_y) + log S_1: no cancellation for large logits.
                safe_y = tl.where(label_ok & counted, y, 0)
                z_y = tl.load(s_ptr + rows * s_stride + safe_y, mask=counted, other=0.0).to(tl.float32)
                hard = (M_s - z_y) + tl.log(S_1)
                loss += hard_w * tl.where(label_ok, hard, float("nan"))
        if PHASE == ALL or PHASE == LOSS:
            loss = tl.where(undefined, float("nan"), loss)
            tl.store(part_ptr + rows * R + c, tl.where(counted, loss, 0.0), mask=live)

        # ---- 4. gradient -----------------------------------------------------
        if COMPUTE_GRAD and (PHASE == ALL or PHASE == GRAD or (PHASE == LOSS and not NEED_K)):
            w = gscale
            if GO_MODE == 1:
                w = w * tl.load(go_ptr)
            if GO_MODE == 2:
                w = w * tl.load(go_ptr + rows, mask=live, other=0.0)
            w = tl.where(counted, w + tl.zeros([ROWS], tl.float32), 0.0)
            g = tl.zeros([ROWS, BLOCK], tl.float32)
            if HAS_SOFT:
                coef = (soft_w * inv_t) * w * r_s
                if DIVERGENCE == 0:
                    g = coef[:, None] * e_s - ((soft_w * inv_t) * w * r_t)[:, None] * e_t
                elif DIVERGENCE == 1:
                    # p_s (log p_s - log p_t - K), with log p_s - log p_t = q / T - c0.
                    g = (coef * inv_t)[:, None] * e_s * (q - ((c0 + k_row) * (1.0 / inv_t))[:, None])
                elif JSD2:
                    # q in bits: p_s (q ln 2 - K), one fma and one product per element.
                    a_g = coef * ((1.0 - beta) * LN2)
                    g = e_s * (q * a_g[:, None] - (a_g * (k_row * LOG2E))[:, None])
                else:
                    g = (coef * (1.0 - beta))[:, None] * e_s * (q - k_row[:, None])
            if HAS_HARD:
                g += (hard_w * w * r_1)[:, None] * e_1
                g = tl.where(cols[None, :] == y[:, None], g - (hard_w * w)[:, None], g)
            # Undefined rows are NaN through r_s (or r_1), rows that do not count 0 through w.
            tl.store(g_ptr + rows[:, None] * g_stride + cols[None, :],
                     cast_for_store(g, g_ptr.dtype.element_ty, ROUND_BY_HAND),
                     mask=live[:, None] & (cols[None, :] < V), eviction_policy="evict_first")

