"""Per-element formulas of the fused distillation loss (``kd_loss.py``), in float32.

Online logsumexp (one exp per element), logsumexp of a whole tile, the divergences'
per-element terms and their gradients with respect to a = z_s / T, and the order in
which a pass visits a row's tiles.  Zero probabilities give exactly zero terms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdbench.kernels._utils import online_max_step


@triton.jit
def _online_update(m, s, x):
    """Per-lane online logsumexp state (m, s) after seeing x (any may be -inf).

    One exp per element (see online_max_step).  At ~4 exps per element the streamed
    loss is about as MUFU-bound as it is memory-bound on Hopper, so a second exp
    would cost time.
    """
    m_new, e, grew = online_max_step(m, x)
    return m_new, tl.where(grew, s * e + 1.0, s + e)


@triton.jit
def _lanes_lse(m, s):
    """Merge per-lane (m, s) into the row's logsumexp, returned as (shift, log-sum).

    logsumexp = shift + log-sum; keeping the two apart lets callers form
    log p = (x - shift) - log-sum, exact even for logits of 1e4 (x - shift is exact).
    """
    m_row = tl.max(m, axis=0)
    m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    s_row = tl.sum(s * tl.exp(m - m_safe), axis=0)
    return m_safe, tl.log(s_row)


@triton.jit
def _block_lse(x):
    """logsumexp of a whole tile as (shift, log-sum); see _lanes_lse."""
    m = tl.max(x, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe, tl.log(tl.sum(tl.exp(x - m_safe), axis=0))


@triton.jit
def _p_log_ratio(p, log_p, log_q):
    """p * (log p - log q), exactly 0 where p == 0 (a NaN p propagates: NaN != 0)."""
    pos = p != 0
    return tl.where(pos, p * (tl.where(pos, log_p, 0.0) - tl.where(pos, log_q, 0.0)), 0.0)


@triton.jit
def _log_mixture(log_pt, log_ps, log_beta, log_1m_beta):
    """log(beta p_t + (1 - beta) p_s), -inf where both are zero."""
    x = log_pt + log_beta
    y = log_ps + log_1m_beta
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), float("-inf"), hi_safe + tl.log(1.0 + tl.exp(lo - hi_safe)))


@triton.jit
def _row_terms(
    a,  # (BLOCK,) student logits / T, -inf padded
    b,  # (BLOCK,) teacher logits / T, -inf padded
    m_a,  # student shift; logsumexp(a) = m_a + ls_a
    ls_a,
    m_b,  # teacher shift; logsumexp(b) = m_b + ls_b
    ls_b,
    beta,
    log_beta,
    log_1m_beta,
    DIVERGENCE: tl.constexpr,
):
    """Per-element (loss term, K term) where K is the row scalar the gradient needs."""
    log_ps = (a - m_a) - ls_a
    log_pt = (b - m_b) - ls_b
    p_s = tl.exp(log_ps)
    p_t = tl.exp(log_pt)
    if DIVERGENCE == 0:
        loss = _p_log_ratio(p_t, log_pt, log_ps)
        k = loss
    elif DIVERGENCE == 1:
        loss = _p_log_ratio(p_s, log_ps, log_pt)
        k = loss
    else:
        log_m = _log_mixture(log_pt, log_ps, log_beta, log_1m_beta)
        k = _p_log_ratio(p_s, log_ps, log_m)
        loss = beta * _p_log_ratio(p_t, log_pt, log_m) + (1.0 - beta) * k
    return loss, k


@triton.jit
def _soft_grad(
    a,  # (BLOCK,) student logits / T
    b,  # (BLOCK,) teacher logits / T
    m_a,
    ls_a,
    m_b,
    ls_b,
    k_row,  # KL(p_s || p_t) (reverse) or KL(p_s || M) (jsd); unused for forward
    beta,
    log_beta,
    log_1m_beta,
    DIVERGENCE: tl.constexpr,
):
    """d divergence / d a (multiply by 1/T for d / d z_s)."""
    log_ps = (a - m_a) - ls_a
    log_pt = (b - m_b) - ls_b
    p_s = tl.exp(log_ps)
    if DIVERGENCE == 0:
        g = p_s - tl.exp(log_pt)
    elif DIVERGENCE == 1:
        pos = p_s != 0
        g = tl.where(pos, p_s * (tl.where(pos, log_ps - log_pt, 0.0) - k_row), 0.0)
    else:
        log_m = _log_mixture(log_pt, log_ps, log_beta, log_1m_beta)
        pos = p_s != 0
        g = (1.0 - beta) * tl.where(pos, p_s * (tl.where(pos, log_ps - log_m, 0.0) - k_row), 0.0)
    return g


@triton.jit
def _tile_start(i, n_tiles, BACKWARDS: tl.constexpr, BLOCK: tl.constexpr):
    """First column of the i-th tile visited, walking the row forwards or backwards."""
    if BACKWARDS:
        return (n_tiles - 1 - i) * BLOCK
    else:
        return i * BLOCK
