"""The implementations that are timed against each other, and the oracle each must match first.

kd_loss providers (student s, teacher t, temperature T, batchmean):

* ``kdbench-triton``: ``kdbench.kd_loss(..., backend="triton")`` (CUDA only here: on CPU
  the Triton interpreter is a correctness tool, not something to time).
* ``kdbench-torch``:  ``kdbench.kd_loss(..., backend="torch")`` (the chunked fused path).
* ``kdbench-lagged``: ``kdbench-triton`` with ``kernels/kd_loss.py``'s ``ROW_MEETING =
  "lagged"`` (wide rows in one launch, the second pass reading from L2) instead of the
  default separate launches; CUDA only.  The gradient is computed inside the timed
  forward call for float32 and bfloat16, so the setting covers it.
* ``eager``:   what users write, ``F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T),
  log_target=True, reduction="batchmean") * T**2`` (JSD: the same with log M =
  logaddexp(log p_t + log beta, log p_s + log(1 - beta))), in the logits' dtype.
* ``compile``: ``torch.compile`` of ``eager`` (default mode, ``dynamic=False``: one graph
  per shape, compiled by the correctness check, before anything is timed).
* ``liger``:   Liger-Kernel's ``LigerKLDIVLoss(reduction="batchmean", log_target=True)``
  or ``LigerJSD(beta)``, fed ``F.log_softmax(z / T)`` as they require, times T**2;
  only when ``liger_kernel`` is importable and the tensors are on a GPU.

calibration_stats providers: ``kdbench-triton``, ``kdbench-torch`` (all statistics in
one pass), ``compile`` (``torch.compile``, same options, of the plain PyTorch statistics
of :func:`_eager_calibration`: softmax in float32, confidence, argmax, NLL, Brier and the
per-bin sums) and ``torchmetrics`` (``multiclass_calibration_error``, ECE only, with
``validate_args=False``: its fastest setting).

``torch.compile`` is used in its default mode (:data:`COMPILE_MODE`): on an H200,
``mode="max-autotune-no-cudagraphs"`` made the forward-KL loss 5% faster but took 14 s to
compile, once per shape, which the time limit of ``kdbench bench --check`` cannot pay.

Every provider's output is checked against a float64 oracle before it is timed:
the kd loss over all rows and the gradient of the first rows; the calibration ECE
(and NLL, Brier, accuracy where the provider computes them).  The error bounds below are
sanity bounds ("computes the same quantity"), looser for eager bfloat16, whose
log-probabilities are rounded to bfloat16; the measured errors are reported next to
the timings.  A kdbench provider over its bound is wrong and is not timed
(:data:`STRICT_PROVIDERS`); any other provider that runs is timed anyway, its row marked
over tolerance, because it is what users run (naive eager JSD in bfloat16 has a 6%
gradient error).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kdbench.bench.cases import CALIBRATION, KD_LOSS, Case

KDBENCH_PROVIDERS = ("kdbench-triton", "kdbench-torch")
KD_PROVIDERS = ("kdbench-triton", "kdbench-lagged", "kdbench-torch", "eager", "compile", "liger")
CALIBRATION_PROVIDERS = ("kdbench-triton", "kdbench-torch", "compile", "torchmetrics")
# Over tolerance, these are wrong (not timed; ``kdbench bench`` exits 1); any other provider is timed and flagged.
STRICT_PROVIDERS = (*KDBENCH_PROVIDERS, "kdbench-lagged")
# Not run at the extra shapes of ``kdbench bench`` (cases.extra_cases): the slow ones.
EXTRA_SHAPE_SKIPS = {
    "kdbench-torch": "not run at the extra shapes (slow on CUDA; timed at the headline shapes)",
    "liger": "not run at the extra shapes (slow; timed at the headline shapes)",
}
COMPILE_MODE = "default"

# Sanity bounds: relative loss error and gradient error relative to max|grad|, vs float64.
KD_TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
# ECE absolute error: bin flips of confidences within one rounding of an edge move ECE by O(1/N);
# torchmetrics takes the softmax in the logits' dtype, so its bfloat16 confidences are rounded.
ECE_ATOL = {"kdbench": 1e-4, "torchmetrics": 5e-3}
STAT_RTOL = 1e-4  # NLL and Brier of kdbench's statistics
GRAD_ROWS = 64  # rows of the float64 gradient oracle (its cost grows with N V)


def providers_for(case: Case) -> tuple[str, ...]:
    return KD_PROVIDERS if case.op == KD_LOSS else CALIBRATION_PROVIDERS


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def skip_reason(name: str, case: Case) -> str | None:
    """Why ``name`` cannot run ``case`` here, or None when it can."""
    if name not in providers_for(case):
        raise ValueError(f"provider: expected one of {', '.join(providers_for(case))} for {case.op}, got {name!r}")
    on_gpu = case.device.startswith("cuda")
    if name in ("kdbench-triton", "kdbench-lagged"):
        if not on_gpu:
            return "needs a CUDA GPU (on CPU the Triton interpreter checks correctness; it is not timed)"
        if not _installed("triton"):
            return "triton is not installed"
    if name == "liger":
        if not _installed("liger_kernel"):
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if not on_gpu:
            return "Liger-Kernel's Triton kernels need a GPU"
        if case.divergence not in ("forward", "jsd"):
            return f"Liger-Kernel has no {case.divergence} divergence loss"
    if name == "torchmetrics" and not _installed("torchmetrics"):
        return "torchmetrics is not installed (pip install torchmetrics)"
    return None


# ---- kd_loss -----------------------------------------------------------------------------


def _eager_kd(case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    temp, beta = case.temperature, case.beta

    def forward_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temp**2

    def jsd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        kl_t = F.kl_div(log_m, log_pt, log_target=True, reduction="batchmean")
        kl_s = F.kl_div(log_m, log_ps, log_target=True, reduction="batchmean")
        return (beta * kl_t + (1.0 - beta) * kl_s) * temp**2

    if case.divergence == "forward":
        return forward_kl
    if case.divergence == "jsd":
        return jsd
    raise ValueError(f"divergence: the eager baseline covers 'forward' and 'jsd', got {case.divergence!r}")


_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _compiled(key: tuple[Any, ...], make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """``torch.compile`` of ``make()``, one wrapper per key; Dynamo compiles one graph per shape.

    ``dynamic=False``: each shape gets its own static graph (its first call, the correctness
    check, pays the compile).  Dynamo keeps the graphs of one Python function together, up to
    ``torch._dynamo.config.recompile_limit`` (8) shapes; ``kdbench bench`` uses at most 4.
    """
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(make(), mode=COMPILE_MODE, dynamic=False)
    return _COMPILED[key]


def _compiled_kd(case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _compiled((KD_LOSS, case.divergence, case.temperature, case.beta), lambda: _eager_kd(case))


def _liger_kd(case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    temp = case.temperature
    if case.divergence == "forward":
        from liger_kernel.transformers import LigerKLDIVLoss

        loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        from liger_kernel.transformers import LigerJSD

        loss_fn = LigerJSD(beta=case.beta)

    def run(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        return loss_fn(log_ps, log_pt) * temp**2

    return run


def _kdbench_kd(case: Case, backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import kdbench

    opts = dict(temperature=case.temperature, divergence=case.divergence, beta=case.beta, backend=backend)

    def run(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return kdbench.kd_loss(s, t, **opts)

    return run


def _lagged(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn`` with the kd kernel's wide rows meeting in the lagged launch."""
    from kdbench.kernels import kd_loss as kernel

    def run(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        old, kernel.ROW_MEETING = kernel.ROW_MEETING, "lagged"
        try:
            return fn(s, t)
        finally:
            kernel.ROW_MEETING = old

    return run


def kd_loss_fn(name: str, case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function of provider ``name``: (student, teacher) -> scalar loss."""
    if name == "kdbench-triton":
        return _kdbench_kd(case, "triton")
    if name == "kdbench-torch":
        return _kdbench_kd(case, "torch")
    if name == "kdbench-lagged":
        return _lagged(_kdbench_kd(case, "triton"))
    if name == "eager":
        return _eager_kd(case)
    if name == "compile":
        return _compiled_kd(case)
    if name == "liger":
        return _liger_kd(case)
    raise ValueError(f"provider: expected one of {', '.join(KD_PROVIDERS)}, got {name!r}")


def kd_oracle(case: Case, s: torch.Tensor, t: torch.Tensor) -> tuple[float, torch.Tensor]:
    """float64 (loss over all rows, gradient of the first GRAD_ROWS rows) from the autograd formula."""
    from kdbench.reference.kd import kd_row_losses

    opts = dict(temperature=case.temperature, alpha=0.0, divergence=case.divergence, beta=case.beta, ignore_index=-100)
    n, v = s.shape
    step = max(1, (1 << 24) // v)
    total = 0.0
    with torch.no_grad():
        for r0 in range(0, n, step):
            rows, _ = kd_row_losses(s[r0 : r0 + step].double(), t[r0 : r0 + step].double(), None, **opts)
            total += float(rows.sum())
    head = s[:GRAD_ROWS].detach().double().requires_grad_(True)
    rows, _ = kd_row_losses(head, t[:GRAD_ROWS].double(), None, **opts)
    (grad,) = torch.autograd.grad(rows.sum() / n, head)
    return total / n, grad


# ---- calibration_stats ---------------------------------------------------------------------


def _eager_calibration(n_bins: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """The statistics of ``kdbench.calibration_stats`` written plainly in PyTorch (what ``compile`` compiles).

    Softmax in float32; confidence = max probability; prediction = argmax of the logits;
    NLL = -log p_y; Brier = sum_k p_k^2 - 2 p_y + 1; bin = min(floor(conf * M), M - 1);
    per-bin count, confidence sum and correct sum, and the NLL and Brier sums, in float64.
    """

    def sums(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        zf = z.float()
        p = torch.softmax(zf, dim=-1)
        log_py = torch.log_softmax(zf, dim=-1).gather(1, y[:, None]).squeeze(1)
        p_y = p.gather(1, y[:, None]).squeeze(1)
        conf = p.amax(dim=-1)
        correct = (z.argmax(dim=-1) == y).double()
        brier = p.square().sum(dim=-1) - 2.0 * p_y + 1.0
        bins = (conf * n_bins).floor().long().clamp_max(n_bins - 1)
        zeros = torch.zeros(n_bins, dtype=torch.float64, device=z.device)
        count = zeros.index_add(0, bins, torch.ones_like(correct))
        conf_sum = zeros.index_add(0, bins, conf.double())
        correct_sum = zeros.index_add(0, bins, correct)
        return count, conf_sum, correct_sum, -log_py.double().sum(), brier.double().sum()

    return sums


def calibration_fn(name: str, case: Case) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """(logits, labels) -> kdbench CalibrationStats (also from ``compile``), or torchmetrics' ECE tensor."""
    if name == "compile":
        from kdbench.calibration import CalibrationStats

        compiled = _compiled((CALIBRATION, case.n_bins), lambda: _eager_calibration(case.n_bins))

        def run_compiled(z: torch.Tensor, y: torch.Tensor) -> Any:
            count, conf_sum, correct_sum, nll_sum, brier_sum = compiled(z, y)
            return CalibrationStats(count, conf_sum, correct_sum, nll_sum, brier_sum, count.sum())

        return run_compiled
    if name in KDBENCH_PROVIDERS:
        import kdbench

        backend = name.split("-", 1)[1]

        def run(z: torch.Tensor, y: torch.Tensor) -> Any:
            return kdbench.calibration_stats(z, y, n_bins=case.n_bins, backend=backend, inputs="logits")

        return run
    if name == "torchmetrics":
        from torchmetrics.functional.classification import multiclass_calibration_error

        def run_tm(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return multiclass_calibration_error(
                z, y, num_classes=case.v, n_bins=case.n_bins, norm="l1", validate_args=False
            )

        return run_tm
    raise ValueError(f"provider: expected one of {', '.join(CALIBRATION_PROVIDERS)}, got {name!r}")


def calibration_oracle(case: Case, z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """ECE, NLL, Brier and accuracy from float64 statistics summed over row chunks."""
    import kdbench

    step = max(1, (1 << 24) // z.shape[1])
    stats = None
    for r0 in range(0, z.shape[0], step):
        part = kdbench.calibration_stats(
            z[r0 : r0 + step].double(), y[r0 : r0 + step], n_bins=case.n_bins, backend="torch", inputs="logits"
        )
        stats = part if stats is None else stats + part
    assert stats is not None
    return {"ece": stats.ece(), "nll": stats.nll(), "brier": stats.brier(), "accuracy": stats.accuracy()}


# ---- a provider bound to inputs ------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Runner:
    """Provider ``name`` bound to the inputs of ``case``; ``run()`` executes once, synchronised.

    kd_loss forward returns the loss; forward+backward returns (loss, dL/ds) via
    ``torch.autograd.grad`` (nothing accumulates between calls).  calibration_stats
    returns the provider's result.
    """

    name: str
    case: Case
    a: torch.Tensor
    b: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], Any] = field(init=False)
    errors: dict[str, float] = field(default_factory=dict, init=False)
    over_tolerance: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # No availability check here: callers ask skip_reason() first; tests also run
        # kdbench-triton on CPU tensors through the Triton interpreter.
        if self.case.op == KD_LOSS:
            self.fn = kd_loss_fn(self.name, self.case)
            if self.case.backward:
                self.a = self.a.detach().requires_grad_(True)
        else:
            self.fn = calibration_fn(self.name, self.case)

    def _call(self) -> Any:
        if self.case.op == KD_LOSS:
            if self.case.backward:
                loss = self.fn(self.a, self.b)
                (grad,) = torch.autograd.grad(loss, self.a)
                return loss, grad
            with torch.no_grad():
                return self.fn(self.a, self.b)
        return self.fn(self.a, self.b)

    def run(self) -> Any:
        out = self._call()
        synchronize(self.case.device)
        return out

    def compare(self, oracle: Any) -> dict[str, tuple[float, float]]:
        """Run once and compare with ``oracle`` (from :func:`make_oracle`), without raising.

        Keeps the measured errors in ``self.errors``; returns (and keeps in
        ``self.over_tolerance``) ``{metric: (error, bound)}`` of those over their bound.
        """
        out = self.run()
        if self.case.op == KD_LOSS:
            self.errors = _kd_errors(out, oracle, self.case.backward)
            bounds = dict.fromkeys(self.errors, KD_TOL[self.case.dtype])
        else:
            self.errors = _calibration_errors(self.name, out, oracle)
            bounds = {k: _calibration_tol(self.name, k) for k in self.errors}
        self.over_tolerance = {k: (e, bounds[k]) for k, e in self.errors.items() if not e <= bounds[k]}
        return self.over_tolerance

    def check(self, oracle: Any) -> dict[str, float]:
        """Run once, compare with ``oracle``, raise AssertionError if off.

        Returns the measured errors (also kept in ``self.errors``).
        """
        if self.compare(oracle):
            raise AssertionError(self.too_large())
        return self.errors

    def too_large(self) -> str:
        """What :meth:`check` raises about the errors over their bounds."""
        bad = {k: e for k, (e, _) in self.over_tolerance.items()}
        return f"{self.name} on {self.case.key}: errors vs the float64 oracle too large: {bad}"


def _kd_errors(out: Any, oracle: tuple[float, torch.Tensor], backward: bool) -> dict[str, float]:
    loss64, grad64 = oracle
    loss = out[0] if backward else out
    errors = {"loss_rel": abs(float(loss.detach()) - loss64) / max(abs(loss64), 1e-30)}
    if backward:
        g = out[1][: grad64.shape[0]].double().to(grad64.device)
        scale = float(grad64.abs().max().clamp_min(1e-300))
        errors["grad_rel_to_max"] = float((g - grad64).abs().max()) / scale
    return errors


def _calibration_tol(name: str, metric: str) -> float:
    if metric == "ece":
        return ECE_ATOL["torchmetrics" if name == "torchmetrics" else "kdbench"]
    if metric == "accuracy":
        return 1e-12  # the argmax of the same logits: exact
    return STAT_RTOL


def _calibration_errors(name: str, out: Any, oracle: dict[str, float]) -> dict[str, float]:
    if name == "torchmetrics":  # ECE only; every other provider returns CalibrationStats
        return {"ece": abs(float(out) - oracle["ece"])}
    return {
        "ece": abs(out.ece() - oracle["ece"]),
        "nll": abs(out.nll() - oracle["nll"]) / max(abs(oracle["nll"]), 1e-30),
        "brier": abs(out.brier() - oracle["brier"]) / max(abs(oracle["brier"]), 1e-30),
        "accuracy": abs(out.accuracy() - oracle["accuracy"]),
    }


def make_oracle(case: Case, a: torch.Tensor, b: torch.Tensor) -> Any:
    if case.op == KD_LOSS:
        return kd_oracle(case, a, b)
    if case.op == CALIBRATION:
        return calibration_oracle(case, a, b)
    raise ValueError(f"op: unknown {case.op!r}")
