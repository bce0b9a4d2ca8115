"""Fast PyTorch path of the distillation loss: loss and analytic gradient in one chunked sweep.

Why
---
The autograd formula in :mod:`kdbench.reference.kd` is the oracle: clear, and
sanitised by ``where``s against ``0 * log 0``.  It is also slow: autograd keeps
several (N, V) float32 intermediates alive and walks them again in backward.
This module computes the same loss and its gradient *in forward*, the way the
Triton kernel (``kdbench/kernels/kd_loss.py``) does, with eager PyTorch ops on blocks of
rows sized for the CPU's caches.  Main memory then sees one read of each logit
tensor and one write of the gradient; everything else happens in cache-resident
float32 work buffers reused from block to block.

Math (a = z_s / T, b = z_t / T, c = (1 - alpha) T, times 1/n_counted for "batchmean")
--------------------------------------------------------------------------------------
* forward KL: dL/dz_s = c (p_s - p_t)
* reverse KL: dL/dz_s = c p_s (log p_s - log p_t - K),           K = KL(p_s || p_t)
* JSD:        dL/dz_s = c (1 - beta) p_s (log p_s - log M - K),  K = KL(p_s || M)
* hard term:  dL/dz_s += alpha (softmax(z_s) - onehot(y))

Per-element log-ratios are formed from exact log-probabilities (``x - max - log-sum``),
so large logits lose nothing to cancellation between two logsumexps.  A probability
that is exactly zero contributes exactly zero to loss and gradient; ignored rows
give zero loss and a zero gradient whatever they hold.  A counted row whose softmax
is undefined (a +inf or NaN logit, or every logit -inf) gives a NaN loss and a NaN
gradient row.  (The autograd formula returns 0 for some of those, e.g. a +inf teacher
logit under forward KL; here they are never a silent finite number.)

GPU strategy (every device but the CPU; :func:`_forward_gpu`)
-------------------------------------------------------------
Few large row blocks (2**25 elements, (8192, 128256) in 32 blocks), no data-dependent host
syncs, and each row's log-sums applied once as a row constant (the p_j sum to 1) instead
of in a pass per element.  Traffic per element for bfloat16 logits, float32 work buffers,
forward KL with alpha = 0, forward and backward:

====================================================  =======
row maxima of s and t, all rows first (2 + 2)           4 B
w = x/T - max, bf16 read + fp32 write (2 x 6)          12 B
e = exp(w) (2 x 8), S = sum e (2 x 4)                  24 B
w_t - w_s (12), times e_t (12), nansum (4)             28 B
e_s *= c/S_s (8); e_s - (c/S_t) e_t -> bf16 (10)       18 B
backward: gradient *= grad_output, bf16 in place        4 B
total                                                  90 B
====================================================  =======

JSD: 146 B (w_t shifted by the rows' constants, w_s clamped, log M, two log-ratios, two
masked dots, the gradient (p_s (d - K), one rounding)).  Reverse KL: 100 B.  The CPU
strategy's blocks, run on a GPU as before, moved 132 B (forward KL) and about 254 B (JSD)
in about 48 and 72 launches per block (778 and 1162 in all at that shape, 2**26-element
blocks).  Now 14 launches per block for forward KL (11 of them full-block passes) and 26
for JSD (17), plus ~20 for all rows: 480 and 868 in all.

Extra memory: 4 (forward, reverse KL) or 5 (JSD) float32 work buffers of 2**25 elements
(128 MiB each; one more to add the hard term to a float16/bfloat16 gradient), so at most
768 MiB, plus (N,) statistics; the gradient itself is N V in the student's dtype.
Measured on an H200 (torch 2.11) at (8192, 128256) bf16, T = 2: forward KL 37 ms, JSD
53 ms (eager PyTorch in bf16: 16.6 ms and 41 ms; this module before: 50 ms and 88 ms).
What bounds it: every conversion from bfloat16 and every pass with an (R, 1) operand runs
at 1.4-2.7 TB/s there, the others at 3.5-4 TB/s; bf16 intermediates, which make eager
fast, would break the float32 semantics above.

Limits
------
* Backward is first-order only (``once_differentiable``): double backward through
  the gradient raises.  Backward through the same graph twice (``retain_graph``)
  works: the first hands its buffer to autograd, a later one recomputes it.
* The gradient is stored in the student's dtype in forward; a ``grad_output`` other
  than 1 scales it in backward (a second rounding for bfloat16).  float16 keeps it in
  float32 until backward, so that a loss scale multiplies the exact gradient and it is
  rounded once (at the cost of a float32 buffer between forward and backward).
* The inputs are saved for a possible second backward (they are usually alive anyway).
* Runs outside ``torch.compile`` graphs (a graph break), like the Triton path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdbench.reference._common import block_rows, compute_dtype, gpu_strategy, reduce_rows

# Elements per work buffer.  CPU: 2**19 float32 (2 MB; 16 rows of a 32k vocabulary),
# measured on 2 Xeon cores with 2 MB of L2 each: (2048, 32000) forward+backward took
# 0.25-0.26 s from 2**17 to 2**20 elements, 0.28 s at 2**22 and 0.37 s at 2**24 (eager:
# 0.74 s).  Smaller blocks mean more, shorter parallel regions, which suffer most when
# another process takes a core; larger ones spill the caches and cost workspace memory.
CPU_BLOCK_ELEMS = 1 << 19
# GPU strategy: 2**25 elements per work buffer (128 MiB in float32), at most six buffers
# (see the module docstring).  Each pass over a block moves hundreds of MB, far more than
# the ~5 us it costs to launch.  Measured on an H200 at (8192, 128256) bf16, forward KL
# and JSD: 2**24 41.4 and 59.4 ms, 2**25 37.3 and 53.3 ms, 2**26 35.6 and 50.7 ms.
DEVICE_BLOCK_ELEMS = 1 << 25


@dataclass(frozen=True)
class _Opts:
    temperature: float
    alpha: float
    divergence: str
    beta: float
    reduction: str
    ignore_index: int


def _host_checks(device: torch.device) -> bool:
    """Whether data-dependent branches may ask the host (free on CPU, a sync on a GPU).

    Where they may not, every branch takes its always-correct side (masks applied
    unconditionally).  Tests switch this off on CPU to cover that side.  The GPU
    strategy (:func:`_forward_gpu`) asks no such question at all.
    """
    return not gpu_strategy(device)


def rows_per_block(v: int, device: torch.device) -> int:
    """Rows processed together: enough to amortise op dispatch, few enough to stay in cache
    (CPU) or to bound the work buffers (GPU strategy)."""
    return block_rows(v, DEVICE_BLOCK_ELEMS if gpu_strategy(device) else CPU_BLOCK_ELEMS)


@dataclass
class _Softmax:
    """Row softmax of ``x * scale`` kept unnormalised, in two (R, V) buffers.

    ``work = x * scale - shift`` and ``e = exp(work)``; then ``p = e / total`` and
    ``log p = work - log_sum``, exact for large logits (``x * scale - shift`` is exact
    up to one rounding).  Row factors stay (R, 1) until a caller needs them.
    """

    work: torch.Tensor
    e: torch.Tensor
    shift: torch.Tensor
    total: torch.Tensor
    log_sum: torch.Tensor

    def normalise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the buffers into (log p, p) in place."""
        self.work.sub_(self.log_sum)
        self.e.mul_(self.total.reciprocal())
        return self.work, self.e


def _softmax(
    x: torch.Tensor,  # (R, V) logits, any float dtype
    scale: float,  # 1 / T
    work: torch.Tensor,  # (R, V) out: x * scale - shift, compute dtype
    e: torch.Tensor,  # (R, V) out: exp(work), compute dtype
) -> _Softmax:
    """Four passes: max, scaled shift (upcast before the multiply), exp, sum.

    The shift is the raw max times ``scale`` (max commutes with a positive scale and
    monotone rounding).  Rows of all -inf or holding +inf / NaN get a NaN ``log_sum``.
    """
    cdt = work.dtype
    shift = x.amax(dim=-1, keepdim=True).to(cdt).mul_(scale)
    torch.addcmul(-shift, x, torch.tensor(scale, dtype=cdt), out=work)
    torch.exp(work, out=e)
    total = e.sum(dim=-1, keepdim=True)
    return _Softmax(work, e, shift, total, total.log())


def _masked_dot(
    e: torch.Tensor,  # (R, V) weights >= 0 (an unnormalised probability)
    d: torch.Tensor,  # (R, V) log-ratios, possibly infinite where e == 0
    tmp: torch.Tensor,  # (R, V) scratch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row sums of ``e * d`` with entries where ``e == 0`` exactly 0, rows that were not finite).

    ``e * d`` is already 0 where ``e == 0`` unless ``d`` is infinite there (a -inf
    logit): 0 * inf = NaN.  The plain sum is taken first and only rows that came out
    non-finite are summed again with the mask: masks are rare.  On CPU that costs R
    scalars; without host checks the masked sum is always computed (no sync).
    """
    torch.mul(e, d, out=tmp)
    rows = tmp.sum(-1)
    suspect = ~torch.isfinite(rows)
    if _host_checks(e.device):
        if bool(suspect.any()):
            idx = suspect.nonzero().squeeze(-1)
            rows[idx] = torch.where(e[idx] > 0, tmp[idx], 0.0).sum(-1)
    else:
        rows = torch.where(suspect, torch.where(e > 0, tmp, 0.0).sum(-1), rows)
    return rows, suspect


def _k_grad(
    d: torch.Tensor,  # (R, V) log p_s - log q; overwritten
    e: torch.Tensor,  # (R, V) unnormalised p_s
    k: torch.Tensor,  # (R,) K = sum p_s (log p_s - log q)
    w: torch.Tensor,  # (R, 1) weight, including 1 / total of e
    suspect: torch.Tensor,  # (R,) rows whose K sum needed the zero mask
    g: torch.Tensor,  # (R, V) out
) -> None:
    """``g = w * e * (d - K)``, exactly 0 where ``e == 0`` (reverse KL and JSD)."""
    d.sub_(k[:, None])
    torch.mul(d, e, out=g)
    g.mul_(w)
    if not _host_checks(e.device) or bool(suspect.any()):
        g.masked_fill_((e == 0) & suspect[:, None], 0.0)


def _block(
    s: torch.Tensor,  # (R, V) student logits of this block, any float dtype
    t: torch.Tensor,  # (R, V) teacher logits
    y: torch.Tensor | None,  # (R,) int64 labels, ignored rows replaced by 0
    counted: torch.Tensor | None,  # (R,) bool, None when every row counts
    o: _Opts,
    bufs: list[torch.Tensor],  # four (R, V) work buffers, compute dtype
    g: torch.Tensor | None,  # (R, V) out: gradient in the compute dtype (times gscale), or None
    gscale: torch.Tensor,  # 0-dim factor folded into the gradient (1/n_counted for batchmean)
) -> torch.Tensor:
    """Row losses (R,) of one block; its gradient is written into ``g``."""
    wa, wb, ea, eb = bufs
    rows = torch.zeros(s.shape[0], dtype=wa.dtype, device=s.device)
    inv_t = 1.0 / o.temperature
    soft = None
    if o.alpha < 1.0:
        soft = _softmax(s, inv_t, wa, ea)
        teach = _softmax(t, inv_t, wb, eb)
        # Rows whose softmax is undefined (a +inf or NaN logit, or all -inf): NaN, loudly.
        undefined = soft.log_sum.isnan() | teach.log_sum.isnan()
        gw = gscale * ((1.0 - o.alpha) * o.temperature)
        if o.divergence == "forward":
            # log p_t - log p_s, per element: no cancellation between large logsumexps.
            torch.sub(wb, wa, out=wa)
            wa.sub_(teach.log_sum - soft.log_sum)
            dot, _ = _masked_dot(eb, wa, wb)
            div = dot / teach.total.squeeze(-1)
            if g is not None:
                torch.mul(ea, gw / soft.total, out=g)
                g.addcmul_(eb, -gw / teach.total)  # c (p_s - p_t)
        elif o.divergence == "reverse":
            wa.sub_(wb)
            wa.sub_(soft.log_sum - teach.log_sum)  # log p_s - log p_t
            dot, suspect = _masked_dot(ea, wa, wb)
            div = dot / soft.total.squeeze(-1)
            if g is not None:
                _k_grad(wa, ea, div, gw / soft.total, suspect, g)
        else:
            log_ps, _ = soft.normalise()
            log_pt, p_t = teach.normalise()
            # log M = logaddexp(log p_t + log beta, log p_s + log(1 - beta)), -inf where both are.
            log_m = log_ps.add(math.log1p(-o.beta))
            torch.logaddexp(log_m, log_pt.add(math.log(o.beta)), out=log_m)
            log_pt.sub_(log_m)
            k_t, _ = _masked_dot(p_t, log_pt, log_pt)
            log_ps.sub_(log_m)
            del log_m
            k_s, suspect = _masked_dot(soft.e, log_ps, log_pt)
            div = o.beta * k_t + (1.0 - o.beta) * k_s
            if g is not None:
                _k_grad(log_ps, soft.e, k_s, gw * (1.0 - o.beta), suspect, g)
        rows += ((1.0 - o.alpha) * o.temperature**2) * div
    else:
        undefined = torch.zeros((s.shape[0], 1), dtype=torch.bool, device=s.device)
    if o.alpha > 0.0:
        assert y is not None
        if soft is not None and o.temperature == 1.0 and o.divergence != "jsd":
            hard = soft  # its e buffer still holds exp(z - max z)
        else:
            hard = _softmax(s, 1.0, wa, ea)
            undefined = undefined | hard.log_sum.isnan()
        z_y = s.gather(-1, y[:, None]).to(wa.dtype)
        # -log softmax(z)[y] = (shift - z_y) + log-sum: no cancellation for large logits.
        rows += o.alpha * ((hard.shift - z_y) + hard.log_sum).squeeze(-1)
        if g is not None:
            w = gscale * o.alpha
            if soft is None:
                torch.mul(hard.e, w / hard.total, out=g)
            else:
                g.addcmul_(hard.e, w / hard.total)
            g[torch.arange(g.shape[0], device=g.device), y] -= w
    undefined = undefined.squeeze(-1)
    rows.masked_fill_(undefined, float("nan"))
    if g is not None and (not _host_checks(g.device) or bool(undefined.any())):
        g.masked_fill_(undefined[:, None], float("nan"))
    if counted is not None:
        rows.masked_fill_(~counted, 0.0)
        if g is not None:
            g.masked_fill_(~counted[:, None], 0.0)
    return rows


def gpu_buffers(o: _Opts, staged: bool) -> int:
    """(R, V) work buffers the GPU strategy needs (``staged``: one more in which the soft and
    hard gradients meet in the compute dtype before one rounding to the student's)."""
    soft = {"forward": 4, "reverse": 4, "jsd": 5}[o.divergence] if o.alpha < 1.0 else 2
    return soft + int(staged)


def _exp_rows(
    x: torch.Tensor,  # (R, V) logits, any float dtype
    neg_shift: torch.Tensor,  # (R, 1) -(max_j x_j) * scale, the shift of _softmax
    scale: float,
    w: torch.Tensor,  # (R, V) out: x * scale - shift, formed in the compute dtype
    e: torch.Tensor,  # (R, V) out: exp(w)
    total: torch.Tensor,  # (R, 1) out: row sums of e
) -> None:
    """Three passes, :func:`_softmax`'s last three, with the shift computed for all rows beforehand."""
    torch.add(neg_shift, x, alpha=scale, out=w)
    torch.exp(w, out=e)
    torch.sum(e, dim=-1, keepdim=True, out=total)


def _forward_gpu(
    s2: torch.Tensor,  # (N, V) student logits
    t2: torch.Tensor,  # (N, V) teacher logits
    y: torch.Tensor | None,  # (N,) int64 labels, ignored rows replaced by 0
    counted: torch.Tensor | None,  # (N,) bool, None when every row counts
    o: _Opts,
    gscale: torch.Tensor,  # 0-dim factor folded into the gradient (1/n_counted for batchmean)
    rows: torch.Tensor,  # (N,) out: row losses, compute dtype
    grad: torch.Tensor | None,  # (N, V) out: gradient in the student's dtype, or None
) -> None:
    """The GPU strategy of :func:`_forward`: :func:`_block`'s mathematics in fewer, larger passes.

    The softmaxes stay unnormalised (w = x/T - max, e = exp(w), S = sum e; the maxima of all
    rows are taken first, one read of each input) and each row's log-sums enter its loss
    once, as a row constant: sum_j p_t,j (w_t - w_s)_j - (log S_t - log S_s) for forward KL
    (the p_t,j sum to 1), so the per-element log-ratios are still differences of max-shifted
    logits.  Zero probabilities: their NaN products (0 * inf) are dropped by ``nansum``; in
    the gradient, reverse KL zeroes them with an unconditional mask and JSD never makes
    them (-inf student logits are clamped to a finite -max/2, whose exp is still 0).
    Undefined rows get NaN through their row factors (c / NaN), never a host check.  The
    per-row arithmetic runs once for all rows after the sweep.  With no hard term the
    gradient's last pass writes the student's dtype directly.
    """
    n, v = s2.shape
    cdt, device = rows.dtype, s2.device
    nan = float("nan")
    step = rows_per_block(v, device)
    staged = grad is not None and o.alpha > 0.0 and grad.dtype != cdt
    work = [torch.empty((min(step, n), v), dtype=cdt, device=device) for _ in range(gpu_buffers(o, staged))]
    inv_t = 1.0 / o.temperature
    soft, hard = o.alpha < 1.0, o.alpha > 0.0
    log_b, log_1b = math.log(o.beta), math.log1p(-o.beta)
    # Per-row statistics (N, 1): the row sums S of the student at T, the teacher at T and the
    # student at 1 (hard term), and the two masked dot products of the divergence.
    s_tot, t_tot, h_tot, k1, k2 = torch.empty((5, n, 1), dtype=cdt, device=device)
    # -(row max) * scale, the shift of every row (max commutes with a positive scale).
    max_s = s2.amax(dim=-1, keepdim=True).to(cdt)
    if soft:
        ns_s, ns_t = max_s * -inv_t, t2.amax(dim=-1, keepdim=True).to(cdt).mul_(-inv_t)
    ns_h = -max_s
    gw = gscale * ((1.0 - o.alpha) * o.temperature)
    low = -torch.finfo(cdt).max / 2
    for r0 in range(0, n, step):
        b = slice(r0, min(r0 + step, n))
        bufs = [x[: b.stop - r0] for x in work]
        s, t = s2[b], t2[b]
        g = None if grad is None else grad[b]
        acc = bufs[-1] if staged else g
        if soft:
            wa, ea, wb, eb = bufs[:4]
            _exp_rows(s, ns_s[b], inv_t, wa, ea, s_tot[b])
            _exp_rows(t, ns_t[b], inv_t, wb, eb, t_tot[b])
            if o.divergence == "forward":
                torch.sub(wb, wa, out=wa)  # log p_t - log p_s + (log S_t - log S_s)
                wa.mul_(eb)
                torch.nansum(wa, dim=-1, keepdim=True, out=k1[b])
                if acc is not None:  # c (p_s - p_t)
                    ea.mul_(gw / s_tot[b])
                    torch.addcmul(ea, eb, -gw / t_tot[b], out=acc)
            elif o.divergence == "reverse":
                torch.sub(wa, wb, out=wa)  # log p_s - log p_t + (log S_s - log S_t)
                torch.mul(wa, ea, out=wb)
                torch.nansum(wb, dim=-1, keepdim=True, out=k1[b])
                if acc is not None:  # c p_s (d - K) = (c / S) (e d' - kappa e), 0 where p_s is 0
                    undefined = s_tot[b].isnan() | t_tot[b].isnan()
                    torch.addcmul(wb, ea, -k1[b] / s_tot[b], out=wb)
                    torch.mul(wb, (gw / s_tot[b]).masked_fill_(undefined, nan), out=acc)
                    # Compared with NaN in undefined rows, so that those stay all NaN.
                    acc.masked_fill_(ea == torch.zeros_like(k1[b]).masked_fill_(undefined, nan), 0.0)
            else:
                # With w_t shifted by the rows' constants, log M = logaddexp(w_s, w_t) - c_s and the
                # log-ratios to M are w_t - log M' - log beta and w_s - log M' - log(1 - beta).
                wb.sub_((t_tot[b].log() - log_b) - (s_tot[b].log() - log_1b))
                wa.clamp_min_(low)
                log_m = bufs[4]
                torch.logaddexp(wa, wb, out=log_m)
                wb.sub_(log_m)
                wb.mul_(eb)
                torch.nansum(wb, dim=-1, keepdim=True, out=k1[b])
                wa.sub_(log_m)
                torch.mul(wa, ea, out=log_m)
                torch.nansum(log_m, dim=-1, keepdim=True, out=k2[b])
                if acc is not None:  # c (1 - beta) p_s (d - K), as for reverse KL
                    torch.addcmul(log_m, ea, -k2[b] / s_tot[b], out=log_m)
                    torch.mul(log_m, (gw * (1.0 - o.beta)) / s_tot[b], out=acc)
        if hard:
            hw, he = bufs[0], bufs[2 if soft else 1]
            _exp_rows(s, ns_h[b], 1.0, hw, he, h_tot[b])
            if acc is not None:
                w = gscale * o.alpha
                if soft:
                    acc.addcmul_(he, w / h_tot[b])
                else:
                    torch.mul(he, w / h_tot[b], out=acc)
                acc[torch.arange(acc.shape[0], device=device), y[b]] -= w
        if staged:
            g.copy_(acc)
    out = torch.zeros((n, 1), dtype=cdt, device=device)
    undefined = torch.zeros((n, 1), dtype=torch.bool, device=device)
    if soft:
        log_s, log_t = s_tot.log(), t_tot.log()
        if o.divergence == "forward":
            div = k1 / t_tot - (log_t - log_s)
        elif o.divergence == "reverse":
            div = k1 / s_tot - (log_s - log_t)
        else:
            div = o.beta * (k1 / t_tot - log_b) + (1.0 - o.beta) * (k2 / s_tot - log_1b)
        out += ((1.0 - o.alpha) * o.temperature**2) * div
        undefined = log_s.isnan() | log_t.isnan()
    if hard:
        assert y is not None
        # -log softmax(z)[y] = (max z - z_y) + log S: no cancellation for large logits.
        out += o.alpha * ((-ns_h - s2.gather(-1, y[:, None]).to(cdt)) + h_tot.log())
        undefined |= h_tot.isnan()
    rows.copy_(out.squeeze(-1).masked_fill_(undefined.squeeze(-1), nan))
    if counted is not None:
        rows.masked_fill_(~counted, 0.0)
        if grad is not None:
            grad.masked_fill_(~counted[:, None], 0.0)


def _forward(
    s2: torch.Tensor,  # (N, V) student logits
    t2: torch.Tensor,  # (N, V) teacher logits
    y: torch.Tensor | None,  # (N,) int64 labels or None
    o: _Opts,
    want_grad: bool,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row losses (N,), count of counted rows (0-dim), gradient (N, V) or None).

    The gradient is in ``grad_dtype`` (default: the student's) and already holds the
    batchmean factor 1/n_counted for ``reduction="batchmean"``.
    """
    n, v = s2.shape
    device = s2.device
    cdt = compute_dtype(s2.dtype, t2.dtype)
    counted = None
    if y is not None:
        counted = y != o.ignore_index
        n_counted = counted.sum()
        y = torch.where(counted, y, 0)
    else:
        n_counted = torch.tensor(n, device=device)
    gscale = torch.ones((), dtype=cdt, device=device)
    if o.reduction == "batchmean":
        gscale = n_counted.clamp_min(1).to(cdt).reciprocal()
    rows = torch.empty(n, dtype=cdt, device=device)
    grad = torch.empty((n, v), dtype=grad_dtype or s2.dtype, device=device) if want_grad else None
    if n == 0:
        return rows, n_counted, grad
    if gpu_strategy(device):
        _forward_gpu(s2, t2, y, counted, o, gscale, rows, grad)
        return rows, n_counted, grad
    step = rows_per_block(v, device)
    r = min(step, n)
    work = [torch.empty((r, v), dtype=cdt, device=device) for _ in range(4)]
    # A gradient in the compute dtype is written in place; otherwise via one more buffer.
    stage = torch.empty((r, v), dtype=cdt, device=device) if want_grad and grad.dtype != cdt else None
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        k = r1 - r0
        g = None
        if grad is not None:
            g = grad[r0:r1] if stage is None else stage[:k]
        rows[r0:r1] = _block(
            s2[r0:r1],
            t2[r0:r1],
            None if y is None else y[r0:r1],
            None if counted is None else counted[r0:r1],
            o,
            [b[:k] for b in work],
            g,
            gscale,
        )
        if stage is not None:
            grad[r0:r1].copy_(g)
    return rows, n_counted, grad


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        opts: _Opts,
    ) -> torch.Tensor:
        v = student.shape[-1]
        lead = student.shape[:-1]
        s2 = student.reshape(-1, v)
        t2 = teacher.reshape(-1, v)
        y = labels.reshape(-1).long() if labels is not None else None
        want_grad = ctx.needs_input_grad[0]
        # float16: the gradient waits for grad_output in float32, so that a loss scale
        # (2**16 under GradScaler) multiplies the exact gradient and it is rounded once;
        # stored in float16 first, its subnormal rounding would be scaled up with it.
        grad_dtype = compute_dtype(student.dtype) if student.dtype == torch.float16 else student.dtype
        rows, n_counted, grad = _forward(s2, t2, y, opts, want_grad, grad_dtype)
        if want_grad:
            ctx.save_for_backward(student, teacher, labels)
            ctx.grad = grad
            ctx.grad_dtype = grad_dtype
            ctx.opts = opts
        return reduce_rows(rows, n_counted, opts.reduction, lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        student, teacher, labels = ctx.saved_tensors
        grad = ctx.grad
        # The buffer is handed to autograd (which may keep it as .grad and add into it
        # later), so a second backward through this graph recomputes it.
        ctx.grad = None
        if grad is None:
            v = student.shape[-1]
            y = labels.reshape(-1).long() if labels is not None else None
            _, _, grad = _forward(student.reshape(-1, v), teacher.reshape(-1, v), y, ctx.opts, True, ctx.grad_dtype)
        go = grad_output.to(compute_dtype(grad.dtype))
        if ctx.opts.reduction == "none":
            grad.mul_(go.reshape(-1, 1))
        elif not _host_checks(go.device) or float(go) != 1.0:
            # On CPU the common loss.backward() (grad_output == 1) skips a pass over memory.
            grad.mul_(go)
        return grad.to(student.dtype).reshape(student.shape), None, None, None


@functools.cache
def _apply_eagerly() -> Callable[..., torch.Tensor]:
    """``_FusedKD.apply`` kept out of ``torch.compile`` graphs (a graph break).

    Made on first use: ``torch.compiler.disable`` imports Dynamo, which imports triton,
    and ``import kdbench`` must import neither.
    """
    return torch.compiler.disable(_FusedKD.apply)


def kd_loss_fused(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Chunked ``kd_loss`` on already-validated arguments; same semantics as :func:`kdbench.reference.kd_loss`.

    Shapes: logits (..., V) (any strides), labels (...) or None.  Returns the loss in
    float32 (float64 when either input is float64): a scalar for "batchmean"/"sum", the
    leading dims for "none".  The gradient reaching ``student_logits`` has its dtype.
    """
    opts = _Opts(temperature, alpha, divergence, beta, reduction, ignore_index)
    return _apply_eagerly()(student_logits, teacher_logits.detach(), labels, opts)
