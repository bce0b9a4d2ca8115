"""Fast PyTorch path of the distillation loss: loss and analytic gradient in one chunked sweep.

Why
---
The autograd formula in :mod:`kdbench.reference.kd` is the oracle: clear, and
sanitised by ``where``s against ``0 * log 0``.  It is also slow: autograd keeps
several (N, V) float32 intermediates alive and walks them again in backward.
This module computes the same loss and its gradient *in forward*, the way the
Triton kernel (``kernels/kd_loss.py``) does, with eager PyTorch ops on blocks of
rows small enough to stay in the CPU's L2 cache.  Main memory then sees one read
of each logit tensor and one write of the gradient; everything else happens in
cache-resident float32 work buffers reused from block to block.

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

Limits
------
* Backward is first-order only (``once_differentiable``): double backward through
  the gradient raises.  Backward through the same graph twice (``retain_graph``)
  works: the first hands its buffer to autograd, a later one recomputes it.
* The gradient is stored in the student's dtype in forward; a ``grad_output`` other
  than 1 scales it in backward (a second rounding for float16/bfloat16, as in the
  Triton kernel).
* The inputs are saved for a possible second backward (they are usually alive anyway).
* Runs outside ``torch.compile`` graphs (a graph break), like the Triton path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Elements per work buffer.  CPU: the five float32 buffers of one block span
# 5 * 4 * 2**16 B = 1.3 MB, inside two cores' L2 (2 MB each here); larger blocks
# spill to L3 and run measurably slower.  Elsewhere one block per ~64M elements
# keeps kernel launches few.
CPU_BLOCK_ELEMS = 1 << 16
DEVICE_BLOCK_ELEMS = 1 << 26


@dataclass(frozen=True)
class _Opts:
    temperature: float
    alpha: float
    divergence: str
    beta: float
    reduction: str
    ignore_index: int


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_block(v: int, device: torch.device) -> int:
    """Rows processed together: enough to amortise op dispatch, few enough to stay in cache."""
    elems = CPU_BLOCK_ELEMS if device.type == "cpu" else DEVICE_BLOCK_ELEMS
    return max(1, elems // max(v, 1))


def _softmax_into(
    x: torch.Tensor,  # (R, V) logits, any float dtype
    scale: float,  # 1 / T
    p: torch.Tensor,  # (R, V) out: softmax(x * scale), compute dtype
    log_p: torch.Tensor | None,  # (R, V) out: log_softmax(x * scale), or None when not needed
    work: torch.Tensor,  # (R, V) scratch, compute dtype; may be log_p
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``x * scale`` (upcast before the multiply) and its (R, 1) shift and log-sum.

    logsumexp(x * scale) = shift + log-sum; keeping the two apart lets callers form
    log p = (x * scale - shift) - log-sum exactly for large logits.  The shift is the raw
    max times ``scale`` (max commutes with a positive scale and monotone rounding).
    Rows of all -inf or holding +inf give NaN, as ``F.log_softmax`` does.
    """
    cdt = p.dtype
    shift = x.amax(dim=-1, keepdim=True).to(cdt).mul_(scale)
    # One pass: x * scale - shift, the product formed in the compute dtype.
    torch.addcmul(-shift, x, torch.tensor(scale, dtype=cdt), out=work)
    torch.exp(work, out=p)
    total = p.sum(dim=-1, keepdim=True)
    log_sum = total.log()
    if log_p is not None:
        torch.sub(work, log_sum, out=log_p)
    p.mul_(total.reciprocal_())
    return shift, log_sum


def _maybe_any(mask: torch.Tensor) -> bool:
    """``mask.any()`` on CPU; True elsewhere, where asking would cost a host sync."""
    return mask.device.type != "cpu" or bool(mask.any())


def _masked_sum(term: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Row sums of ``term`` with entries where ``p == 0`` counted as exactly 0.

    ``term = p * (log-ratio)`` is already 0 there unless the log-ratio is infinite
    (a -inf logit), which gives 0 * inf = NaN.  On CPU the sum is taken first and
    only rows that came out NaN are masked and summed again: masks are rare, and
    the check costs R scalars.  Elsewhere the mask is applied unconditionally (no sync).
    """
    if term.device.type != "cpu":
        return torch.where(p > 0, term, 0.0).sum(-1)
    rows = term.sum(-1)
    bad = torch.isnan(rows)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        rows[idx] = torch.where(p[idx] > 0, term[idx], 0.0).sum(-1)
    return rows


def _k_grad(
    log_ratio: torch.Tensor,  # (R, V) log p_s - log q; overwritten
    p: torch.Tensor,  # (R, V) p_s
    k: torch.Tensor,  # (R,) K = sum p_s (log p_s - log q)
    w: torch.Tensor,  # 0-dim weight
    g: torch.Tensor,  # (R, V) out
) -> None:
    """``g = w * p * (log_ratio - K)``, exactly 0 where ``p == 0`` (reverse KL and JSD)."""
    log_ratio.sub_(k[:, None])
    torch.mul(log_ratio, p, out=g)
    g.mul_(w)
    g.masked_fill_(p == 0, 0.0)


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
    la, lb, pa, pb = bufs
    rows = torch.zeros(s.shape[0], dtype=la.dtype, device=s.device)
    # Rows whose softmax is undefined (a +inf or NaN logit, or all -inf): NaN, loudly.
    undefined = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    inv_t = 1.0 / o.temperature
    soft_stats = None
    if o.alpha < 1.0:
        soft_stats = _softmax_into(s, inv_t, pa, la, la)  # pa = p_s, la = log p_s
        t_stats = _softmax_into(t, inv_t, pb, lb, lb)  # pb = p_t, lb = log p_t
        undefined |= soft_stats[1].isnan().squeeze(-1) | t_stats[1].isnan().squeeze(-1)
        gw = gscale * ((1.0 - o.alpha) * o.temperature)
        if o.divergence == "forward":
            if g is not None:
                torch.sub(pa, pb, out=g)
                g.mul_(gw)
            torch.sub(lb, la, out=la)  # log p_t - log p_s
            la.mul_(pb)
            div = _masked_sum(la, pb)
        elif o.divergence == "reverse":
            la.sub_(lb)  # log p_s - log p_t
            torch.mul(la, pa, out=lb)
            div = _masked_sum(lb, pa)
            if g is not None:
                _k_grad(la, pa, div, gw, g)
        else:
            # log M = logaddexp(log p_t + log beta, log p_s + log(1 - beta)), -inf where both are.
            log_m = la.add(math.log1p(-o.beta))
            torch.logaddexp(log_m, lb.add(math.log(o.beta)), out=log_m)
            lb.sub_(log_m).mul_(pb)  # p_t (log p_t - log M)
            k_t = _masked_sum(lb, pb)
            la.sub_(log_m)  # log p_s - log M
            torch.mul(la, pa, out=lb)
            k_s = _masked_sum(lb, pa)
            div = o.beta * k_t + (1.0 - o.beta) * k_s
            if g is not None:
                _k_grad(la, pa, k_s, gw * (1.0 - o.beta), g)
        rows += ((1.0 - o.alpha) * o.temperature**2) * div
    if o.alpha > 0.0:
        assert y is not None
        if soft_stats is not None and o.temperature == 1.0:
            shift, log_sum = soft_stats  # pa still holds softmax(z_s)
        else:
            shift, log_sum = _softmax_into(s, 1.0, pa, None, la)
        undefined |= log_sum.isnan().squeeze(-1)
        z_y = s.gather(-1, y[:, None]).to(la.dtype)
        # -log softmax(z)[y] = (shift - z_y) + log-sum: no cancellation for large logits.
        rows += o.alpha * ((shift - z_y) + log_sum).squeeze(-1)
        if g is not None:
            w = gscale * o.alpha
            if soft_stats is None:
                torch.mul(pa, w, out=g)
            else:
                g.addcmul_(pa, w)
            g[torch.arange(g.shape[0], device=g.device), y] -= w
    rows.masked_fill_(undefined, float("nan"))
    if g is not None and _maybe_any(undefined):
        g.masked_fill_(undefined[:, None], float("nan"))
    if counted is not None:
        rows.masked_fill_(~counted, 0.0)
        if g is not None:
            g.masked_fill_(~counted[:, None], 0.0)
    return rows


def _forward(
    s2: torch.Tensor,  # (N, V) student logits
    t2: torch.Tensor,  # (N, V) teacher logits
    y: torch.Tensor | None,  # (N,) int64 labels or None
    o: _Opts,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row losses (N,), count of counted rows (0-dim), gradient (N, V) in the student's dtype or None).

    The gradient already holds the batchmean factor 1/n_counted for ``reduction="batchmean"``.
    """
    n, v = s2.shape
    device = s2.device
    cdt = _compute_dtype(s2.dtype)
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
    grad = torch.empty((n, v), dtype=s2.dtype, device=device) if want_grad else None
    if n == 0:
        return rows, n_counted, grad
    step = rows_per_block(v, device)
    r = min(step, n)
    work = [torch.empty((r, v), dtype=cdt, device=device) for _ in range(4)]
    # A gradient in the compute dtype is written in place; otherwise via one more buffer.
    stage = torch.empty((r, v), dtype=cdt, device=device) if want_grad and s2.dtype != cdt else None
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
        rows, n_counted, grad = _forward(s2, t2, y, opts, want_grad)
        if want_grad:
            ctx.save_for_backward(student, teacher, labels)
            ctx.grad = grad
            ctx.opts = opts
        if opts.reduction == "none":
            return rows.reshape(lead)
        total = rows.sum()
        if opts.reduction == "sum":
            return total
        return total / n_counted.clamp_min(1).to(total.dtype)

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
            _, _, grad = _forward(student.reshape(-1, v), teacher.reshape(-1, v), y, ctx.opts, True)
        go = grad_output.to(_compute_dtype(grad.dtype))
        if ctx.opts.reduction == "none":
            grad.mul_(go.reshape(-1, 1))
        elif go.device.type != "cpu" or float(go) != 1.0:
            # On CPU the common loss.backward() (grad_output == 1) skips a pass over memory.
            grad.mul_(go)
        return grad.reshape(student.shape), None, None, None


@torch.compiler.disable
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
    float32 (float64 for float64 logits): a scalar for "batchmean"/"sum", the leading
    dims for "none".  The gradient reaching ``student_logits`` has its dtype.
    """
    opts = _Opts(temperature, alpha, divergence, beta, reduction, ignore_index)
    return _FusedKD.apply(student_logits, teacher_logits.detach(), labels, opts)
