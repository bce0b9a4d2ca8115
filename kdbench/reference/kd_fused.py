"""Fast PyTorch path of the distillation loss: loss and analytic gradient in one chunked sweep.

Why
---
The autograd formula in :mod:`kdbench.reference.kd` is the oracle: clear, and
sanitised by ``where``s against ``0 * log 0``.  It is also slow: autograd keeps
several (N, V) float32 intermediates alive and walks them again in backward.
This module computes the same loss and its gradient *in forward*, the way the
Triton kernel (``kernels/kd_loss.py``) does, with eager PyTorch ops on blocks of
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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdbench.reference._common import compute_dtype, reduce_rows

# Elements per work buffer.  CPU: 2**19 float32 (2 MB; 16 rows of a 32k vocabulary),
# measured on 2 Xeon cores with 2 MB of L2 each: (2048, 32000) forward+backward took
# 0.25-0.26 s from 2**17 to 2**20 elements, 0.28 s at 2**22 and 0.37 s at 2**24 (eager:
# 0.74 s).  Smaller blocks mean more, shorter parallel regions, which suffer most when
# another process takes a core; larger ones spill the caches and cost workspace memory.
CPU_BLOCK_ELEMS = 1 << 19
DEVICE_BLOCK_ELEMS = 1 << 26


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
    unconditionally).  Tests switch this off on CPU to cover that side.
    """
    return device.type == "cpu"


def rows_per_block(v: int, device: torch.device) -> int:
    """Rows processed together: enough to amortise op dispatch, few enough to stay in cache."""
    elems = CPU_BLOCK_ELEMS if device.type == "cpu" else DEVICE_BLOCK_ELEMS
    return max(1, elems // max(v, 1))


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
    cdt = compute_dtype(s2.dtype)
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
            _, _, grad = _forward(student.reshape(-1, v), teacher.reshape(-1, v), y, ctx.opts, True)
        go = grad_output.to(compute_dtype(grad.dtype))
        if ctx.opts.reduction == "none":
            grad.mul_(go.reshape(-1, 1))
        elif not _host_checks(go.device) or float(go) != 1.0:
            # On CPU the common loss.backward() (grad_output == 1) skips a pass over memory.
            grad.mul_(go)
        return grad.reshape(student.shape), None, None, None


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
    float32 (float64 for float64 logits): a scalar for "batchmean"/"sum", the leading
    dims for "none".  The gradient reaching ``student_logits`` has its dtype.
    """
    opts = _Opts(temperature, alpha, divergence, beta, reduction, ignore_index)
    return _apply_eagerly()(student_logits, teacher_logits.detach(), labels, opts)
