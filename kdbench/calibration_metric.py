"""torchmetrics Metrics backed by :func:`kdbench.calibration_stats`: constant state, summed across ranks.

``CalibrationError`` is a drop-in for torchmetrics' ``MulticlassCalibrationError``
(same constructor where the meaning is the same); ``CalibrationMetrics`` computes
accuracy, NLL, Brier, ECE, RMS calibration error and MCE from the same one-pass state.
Both need torchmetrics (``pip install "kdbench[metrics]"``); ``import kdbench`` does not
import it, and ``kdbench.CalibrationError`` loads this module on first access.

State: the float64 sums of :class:`kdbench.CalibrationStats`, 3 M + 3 numbers for M bins
whatever the number of samples:

* ``count``, ``conf_sum``, ``correct_sum``: (M,) per-bin sample count, sum of the
  confidences and number of correct predictions;
* ``nll_sum``, ``brier_sum``, ``n``: () sums of -log p_y and of sum_k (p_k - 1[y = k])^2,
  and the number of counted samples.

Every state is reduced with ``dist_reduce_fx="sum"``, so ``forward`` adds a batch's sums
to the running ones (``full_state_update=False``), ``merge_state`` adds another metric's,
and ``compute()`` in a process group sums every rank's.

Where the answers differ from torchmetrics' ``MulticlassCalibrationError``:

* A confidence of exactly 1.0 (a saturated softmax, common in float32 and bfloat16) is
  in the last bin [1 - 1/M, 1] here; torchmetrics bucketizes against
  ``linspace(0, 1, M + 1)`` and gives such rows a hidden (M+1)-th bin of their own
  (torchmetrics issue #3510).  When the last bin also holds rows below 1.0, the ECEs
  ("l1") differ if those rows' gap acc - conf has the other sign than the saturated rows'
  (whose confidence can only exceed their accuracy), RMS and MCE as soon as the two gaps
  differ; torchmetrics' value is then the larger one.  Elsewhere they agree to float32
  rounding (torchmetrics accumulates float32 confidences in float32, kdbench in float64),
  save for a confidence within one rounding of a bin edge.
* ``preds`` are logits by default (``inputs="auto"`` warns on CPU when they look like
  probabilities; ``inputs="probs"`` takes probabilities).  torchmetrics takes either and
  applies softmax when some value lies outside [0, 1].
* ``preds`` are (..., C), classes last, like :func:`kdbench.calibration_stats` and a
  language model's (B, T, V) logits; torchmetrics takes (N, C, ...), classes second.
  For (N, C) they are the same.
* The state is constant in the number of samples (3 M + 3 float64); torchmetrics keeps
  two float32 per sample (confidence and correctness): 80 MB at 10 million samples.
  Syncing across R ranks gathers R x (3 M + 3) numbers and sums them; torchmetrics gathers
  every rank's per-sample lists.
* ``compute()`` of a state with no counted sample is NaN for every norm (torchmetrics:
  NaN for "l1", 0 for "l2" and "max").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

try:
    from torchmetrics import Metric
    from torchmetrics.utilities.data import apply_to_collection
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'kdbench.CalibrationError and kdbench.CalibrationMetrics need torchmetrics: pip install "kdbench[metrics]"'
    ) from e

from kdbench.calibration import INPUTS, NORMS, CalibrationStats, calibration_stats

__all__ = ["CalibrationError", "CalibrationMetrics"]

STATE_NAMES = ("count", "conf_sum", "correct_sum", "nll_sum", "brier_sum", "n")
METRIC_KEYS = ("accuracy", "nll", "brier", "ece", "rms_ce", "mce")
# With ignore_index=None no row is left out: calibration_stats still takes an ignore
# value, and no int64 label in [0, C) can equal this one (labels go in as int64).
_NO_IGNORE = -(2**63)
# calibration_stats names its arguments logits / labels; these metrics call them preds / target.
_RENAMED = (("logits:", "preds:"), ("labels:", "target:"))


def _check_args(num_classes: object, n_bins: object, norm: object, ignore_index: object,
                validate_args: object, inputs: object) -> None:  # fmt: skip
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins!r}")
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index: expected None or an int, got {ignore_index!r}")
    if not isinstance(validate_args, bool):
        raise ValueError(f"validate_args: expected a bool, got {validate_args!r}")
    if not isinstance(inputs, str) or inputs not in INPUTS:
        raise ValueError(f"inputs: expected one of {', '.join(map(repr, INPUTS))}, got {inputs!r}")


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


class _CalibrationStatsMetric(Metric):
    """The shared state and update of :class:`CalibrationError` and :class:`CalibrationMetrics`."""

    is_differentiable: bool = False
    full_state_update: bool = False

    count: Tensor
    conf_sum: Tensor
    correct_sum: Tensor
    nll_sum: Tensor
    brier_sum: Tensor
    n: Tensor

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        ignore_index: int | None = None,
        validate_args: bool = True,
        inputs: Literal["logits", "probs", "auto"] = "auto",
        *,
        norm: str = "l1",
        **kwargs: Any,
    ) -> None:
        _check_args(num_classes, n_bins, norm, ignore_index, validate_args, inputs)
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        self.inputs = inputs
        for name in STATE_NAMES:
            shape = (n_bins,) if name in ("count", "conf_sum", "correct_sum") else ()
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the statistics of a batch.

        Args:
            preds: (..., C) floating logits (probabilities with ``inputs="probs"``), C = num_classes.
            target: (...) integer classes in [0, C), or ``ignore_index`` to leave a row out.

        Raises:
            ValueError / TypeError naming ``preds`` or ``target`` for bad input.
        """
        if self.validate_args:
            self._check_batch(preds, target)
        # As int64, no ignore_index can wrap around to a valid class (uint8 labels and
        # ignore_index=-1 would compare equal at 255), and the kernel reads int64 anyway.
        labels = target.to(torch.int64) if isinstance(target, Tensor) and _is_integer(target) else target
        ignore = _NO_IGNORE if self.ignore_index is None else self.ignore_index
        try:
            stats = calibration_stats(
                preds.detach() if isinstance(preds, Tensor) else preds,
                labels,  # type: ignore[arg-type]
                n_bins=self.n_bins,
                ignore_index=ignore,
                inputs=self.inputs,
            )
        except (ValueError, TypeError) as e:
            message = str(e)
            for theirs, ours in _RENAMED:
                if message.startswith(theirs):
                    raise type(e)(ours + message[len(theirs):]) from e
            raise
        for name in STATE_NAMES:
            setattr(self, name, getattr(self, name) + getattr(stats, name))

    def _check_batch(self, preds: object, target: object) -> None:
        """What calibration_stats cannot know: the class count, and labels with no ignore_index."""
        if not isinstance(preds, Tensor):
            raise TypeError(
                f"preds: expected a torch.Tensor of shape (..., {self.num_classes}), got {type(preds).__name__}"
            )
        if preds.dim() < 2 or preds.shape[-1] != self.num_classes:
            raise ValueError(
                f"preds: expected shape (..., num_classes={self.num_classes}), classes last, "
                f"got shape {tuple(preds.shape)}"
            )
        if (
            self.ignore_index is None
            and isinstance(target, Tensor)
            and target.device.type == "cpu"
            and target.numel() > 0
            and _is_integer(target)
        ):
            bad = (target < 0) | (target >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"target: expected class indices in [0, {self.num_classes}) (ignore_index is None), "
                    f"found {target[bad].flatten()[0].item()} ({int(bad.sum())} such entries)"
                )

    @property
    def stats(self) -> CalibrationStats:
        """The accumulated sums as :class:`kdbench.CalibrationStats` (this process's; synced inside ``compute``).

        For what the metrics do not return: ``metric.stats.reliability()`` gives the
        per-bin confidence, accuracy and count of a reliability diagram.
        """
        return CalibrationStats(**{name: getattr(self, name) for name in STATE_NAMES})

    def merge_state(self, incoming_state: dict[str, Any] | Metric | CalibrationStats) -> None:
        """Add another metric's state, a dict of its states, or :class:`kdbench.CalibrationStats`."""
        if isinstance(incoming_state, CalibrationStats):
            if incoming_state.n_bins != self.n_bins:
                raise ValueError(f"incoming_state: expected {self.n_bins} bins, got {incoming_state.n_bins}")
            incoming_state = {name: getattr(incoming_state, name) for name in STATE_NAMES}
        super().merge_state(incoming_state)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> torch.nn.Module:
        # The sums count samples and must add exactly, so they follow device moves but
        # stay float64 through module dtype casts (a half-precision LightningModule, or
        # set_dtype): float16 counts would stop growing at 2048 and overflow at 65504.
        # A cached compute() result keeps its float64 value too.
        own = [name for name in STATE_NAMES if name not in exclude_state]
        values = {name: getattr(self, name) for name in own}
        defaults = {name: self._defaults[name] for name in own}
        computed = self._computed
        this = super()._apply(fn, exclude_state=(*exclude_state, *own))

        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        for name in own:
            setattr(this, name, keep_dtype(values[name]))
            this._defaults[name] = keep_dtype(defaults[name])
        if computed is not None:
            this._computed = apply_to_collection(computed, Tensor, keep_dtype)
        return this

    def _empty(self) -> bool:
        return float(self.n) == 0.0

    def _scalar(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.count.device)


class CalibrationError(_CalibrationStatsMetric):
    r"""Top-label calibration error of a multiclass classifier, from one-pass fixed-size sums.

    Softmax p = softmax(z) of the logits z (float32 arithmetic; float64 for float64
    logits); confidence = max_k p_k, prediction = argmax_k z_k, correct = 1[prediction = y].
    M equal-width bins [m/M, (m+1)/M), bin = min(floor(conf M), M - 1), so a confidence of
    exactly 1.0 is in the last bin.  With N counted samples, n_m of them in bin m, and
    acc_m, conf_m their mean correctness and confidence:

    * ``norm="l1"`` (ECE):  sum_m (n_m / N) |acc_m - conf_m|
    * ``norm="l2"`` (RMS calibration error):  sqrt(sum_m (n_m / N) (acc_m - conf_m)^2)
    * ``norm="max"`` (MCE):  max over non-empty bins of |acc_m - conf_m|

    Args:
        num_classes: C >= 2; ``preds.shape[-1]`` must equal it.
        n_bins: M >= 1 equal-width confidence bins.
        norm: "l1", "l2" or "max", as above.
        ignore_index: rows whose target equals it are left out; None leaves none out.
        validate_args: check ``preds.shape[-1] == num_classes`` and, with
            ``ignore_index=None``, the target range on CPU.  The checks of
            :func:`kdbench.calibration_stats` (dtypes, shapes, target range on CPU) run always.
        inputs: "logits", "probs" (rows of probabilities: the statistics of p itself), or
            "auto" (logits; on CPU a ``UserWarning`` when the first rows look like
            probabilities).
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``dist_sync_fn``,
            ``compute_on_cpu``, ...).

    ``update(preds, target)``: preds (..., C) floating, target (...) integer.
    ``compute()``: a 0-dim float64 tensor on the state's device; NaN when no sample was
    counted (so that ``forward`` on a batch of padding only does not stop a loop).

    The states are the float64 sums ``count``, ``conf_sum``, ``correct_sum`` (M,) and
    ``nll_sum``, ``brier_sum``, ``n`` (), each summed across batches, ``merge_state`` and
    ranks; they stay float64 through module dtype casts, and are in ``state_dict()``
    only after ``persistent(True)`` (torchmetrics' default for every metric).
    ``stats`` returns them as :class:`kdbench.CalibrationStats`.  How the value differs
    from torchmetrics' ``MulticlassCalibrationError``: see :mod:`kdbench.calibration_metric`
    (a confidence of exactly 1.0, logits by default, classes last, constant state).
    """

    higher_is_better: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        norm: Literal["l1", "l2", "max"] = "l1",
        ignore_index: int | None = None,
        validate_args: bool = True,
        inputs: Literal["logits", "probs", "auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, n_bins, ignore_index, validate_args, inputs, norm=norm, **kwargs)
        self.norm = norm

    def compute(self) -> Tensor:
        """ECE ("l1"), RMS calibration error ("l2") or MCE ("max") of the accumulated sums; () float64."""
        if self._empty():
            return self._scalar(math.nan)
        return self._scalar(self.stats.ece(self.norm))

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot one value, or a sequence of values (e.g. from ``forward``), with matplotlib; returns (fig, ax)."""
        return self._plot(val, ax)


class CalibrationMetrics(_CalibrationStatsMetric):
    r"""Accuracy, NLL, Brier score, ECE, RMS calibration error and MCE from one pass and one state.

    With N counted samples, p = softmax(z) and the bins of :class:`CalibrationError`,
    ``compute()`` returns a dict of 0-dim float64 tensors:

    * ``accuracy``: (1/N) sum_i 1[argmax z_i = y_i]
    * ``nll``: (1/N) sum_i -log p_{i, y_i}  (nats)
    * ``brier``: (1/N) sum_i sum_k (p_ik - 1[y_i = k])^2, in [0, 2]
    * ``ece``, ``rms_ce``, ``mce``: :class:`CalibrationError` with norm "l1", "l2", "max"

    Every value is NaN when no sample was counted.  ``higher_is_better`` is None: higher
    is better for accuracy only.

    In a ``torchmetrics.MetricCollection`` the dict is flattened into the collection's
    result under its own keys (``accuracy``, ``nll``, ...; the collection's prefix and
    postfix are added), not under the collection's key for this metric; only when some
    key appears twice in the collection does every dict-valued member's key get the
    collection key and an underscore in front (``cal_ece``).  Members whose states are
    equal after the first update share one state and one update (compute groups): a
    ``CalibrationError`` and a ``CalibrationMetrics`` with the same ``n_bins`` cost one
    pass.  Members that differ only in ``ignore_index`` or ``inputs`` may be grouped
    wrongly when their first batches agree: keep them in separate collections, or pass
    ``compute_groups=False``.

    In Lightning, ``self.log`` takes scalars only: log a ``CalibrationError`` object with
    ``self.log(name, metric, on_epoch=True)``, and this one by value, e.g. in
    ``on_validation_epoch_end``: ``self.log_dict(metric.compute()); metric.reset()``.

    Args: as :class:`CalibrationError`, without ``norm``.
    """

    higher_is_better: bool | None = None

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        ignore_index: int | None = None,
        validate_args: bool = True,
        inputs: Literal["logits", "probs", "auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, n_bins, ignore_index, validate_args, inputs, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        """{accuracy, nll, brier, ece, rms_ce, mce} of the accumulated sums, each () float64."""
        if self._empty():
            return {key: self._scalar(math.nan) for key in METRIC_KEYS}
        s = self.stats
        values = (s.accuracy(), s.nll(), s.brier(), s.ece("l1"), s.ece("l2"), s.ece("max"))
        return {key: self._scalar(v) for key, v in zip(METRIC_KEYS, values)}

    def plot(self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: Any = None) -> Any:
        """Plot the values of one or several ``compute()`` / ``forward`` dicts with matplotlib; returns (fig, ax)."""
        return self._plot(val, ax)
