"""Temperature scaling (Guo et al. 2017): the T > 0 that minimises the NLL of softmax(z / T).

Fit T on a held-out split, never on test; report calibration before and after.
"""

from __future__ import annotations

import math
import warnings

import torch

from kdbench.calibration import check_inputs


def _temperature_moments(z: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[float, float]:
    """d/dbeta and d^2/dbeta^2 of the mean NLL of softmax(beta z), in float64.

    With p = softmax(beta z): dNLL/dbeta = mean(E_p[z] - z_y), d2NLL/dbeta2 = mean(Var_p[z]).
    ``z`` holds row-centred finite logits with -inf kept (p = 0 there).
    """
    n, c = z.shape
    chunk = max(1, (1 << 22) // c)
    g = 0.0
    h = 0.0
    for s in range(0, n, chunk):
        zc = z[s : s + chunk]
        p = torch.softmax(beta * zc, dim=-1)
        finite = torch.where(torch.isfinite(zc), zc, 0.0)
        mean = (p * finite).sum(-1)
        var = (p * (finite - mean[:, None]).square()).sum(-1)
        zy = finite.gather(-1, y[s : s + chunk, None]).squeeze(-1)
        g += float((mean - zy).sum())
        h += float(var.sum())
    return g / n, h / n


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    bounds: tuple[float, float] = (1e-2, 1e2),
    rtol: float = 1e-10,
    max_iter: int = 100,
) -> float:
    """The temperature T > 0 that minimises the mean NLL of softmax(logits / T).

    Fit it on a held-out split (never on test), then pass it to
    ``calibration_stats(..., temperature=T)``.

    The mean NLL is convex in beta = 1 / T (its second derivative is the mean variance of
    the logits under p), so a safeguarded Newton iteration on beta, in float64, inside a
    bracket that always contains the minimiser, converges to |d beta| <= rtol * beta.
    At the optimum the mean expected logit under p equals the mean true-class logit.
    Unlike LBFGS on T from T = 1.5, it cannot diverge or return T <= 0.

    Degenerate cases, each with a ``RuntimeWarning``:

    * the NLL still decreases at T = bounds[0] (e.g. every counted row's label is the
      strict argmax: the infimum is T -> 0): returns bounds[0];
    * the NLL still decreases at T = bounds[1] (the true-class logit is on average below
      the softmax-mean logit: the infimum is T -> infinity): returns bounds[1];
    * every row's logits are equal (the NLL is log C for every T): returns 1.0.

    Args:
        logits: (..., C) floating logits; -inf entries are allowed except at the label.
        labels: (...) class indices, or ``ignore_index`` to leave a row out.
        bounds: (T_min, T_max), 0 < T_min < T_max < inf.
        rtol: relative tolerance on beta.
        max_iter: Newton/bisection steps at most.

    Returns:
        T as a Python float in [T_min, T_max].
    """
    z, y, _, ii, _ = check_inputs(logits, labels, 1.0, ignore_index, "torch")
    if (
        not isinstance(bounds, tuple)
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        or not (0.0 < bounds[0] < bounds[1] < math.inf)
    ):
        raise ValueError(f"bounds: expected (T_min, T_max) with 0 < T_min < T_max < inf, got {bounds!r}")
    if not (isinstance(rtol, float) and 0.0 < rtol < 1.0):
        raise ValueError(f"rtol: expected a float in (0, 1), got {rtol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")

    keep = y != ii
    z = z[keep].to(torch.float64)
    y = y[keep].long()
    if z.shape[0] == 0:
        raise ValueError("labels: no counted rows (every label is ignore_index); cannot fit a temperature")
    bad = torch.isnan(z).any(-1) | torch.isposinf(z).any(-1)
    if bool(bad.any()):
        rows = keep.nonzero().flatten()[bad][:10].tolist()
        raise ValueError(f"logits: rows {rows} (flattened leading dims) hold NaN or +inf")
    zy = z.gather(-1, y[:, None]).squeeze(-1)
    if bool(torch.isneginf(zy).any()):
        rows = keep.nonzero().flatten()[torch.isneginf(zy)][:10].tolist()
        raise ValueError(f"logits: rows {rows} have a -inf logit at the label: the NLL is infinite for every T")
    z = z - z.max(dim=-1, keepdim=True).values  # shift-invariant; keeps beta * z <= 0

    t_min, t_max = float(bounds[0]), float(bounds[1])
    lo, hi = 1.0 / t_max, 1.0 / t_min
    g_lo, h_lo = _temperature_moments(z, y, lo)
    g_hi, h_hi = _temperature_moments(z, y, hi)
    if h_lo == 0.0 and h_hi == 0.0:
        warnings.warn(
            "fit_temperature: every row's logits are equal, so the NLL (log C) does not depend on T; returning 1.0",
            RuntimeWarning,
            stacklevel=2,
        )
        return 1.0
    if g_lo >= 0.0:
        warnings.warn(
            f"fit_temperature: the NLL still decreases at T = {t_max} (the true-class logit is on average below "
            f"the softmax-mean logit: the infimum is at T -> inf); returning T_max = {t_max}",
            RuntimeWarning,
            stacklevel=2,
        )
        return t_max
    if g_hi <= 0.0:
        warnings.warn(
            f"fit_temperature: the NLL still decreases at T = {t_min} (e.g. every label is the strict argmax: "
            f"the infimum is at T -> 0); returning T_min = {t_min}",
            RuntimeWarning,
            stacklevel=2,
        )
        return t_min

    # g(lo) < 0 < g(hi): the minimiser is inside [lo, hi] and g is increasing.
    beta = min(max(1.0, lo), hi)
    for _ in range(max_iter):
        g, h = _temperature_moments(z, y, beta)
        if g == 0.0:
            break
        if g < 0.0:
            lo = beta
        else:
            hi = beta
        step = g / h if h > 0.0 else math.inf
        nxt = beta - step
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        done = abs(nxt - beta) <= rtol * beta or hi - lo <= rtol * beta
        beta = nxt
        if done:
            break
    return 1.0 / beta
