"""kdbench: fused distillation losses, one-pass calibration statistics, benchmark suites.

Importing kdbench imports neither triton nor CUDA: kernels load on first use.  Nor
torchmetrics: ``kdbench.CalibrationError`` and ``kdbench.CalibrationMetrics`` (torchmetrics
Metrics, ``pip install "kdbench[metrics]"``) load :mod:`kdbench.calibration_metric` on
first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdbench import metrics
from kdbench.calibration import CalibrationStats, calibration_stats
from kdbench.loss import KDLoss, kd_loss
from kdbench.temperature import fit_temperature

__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "KDLoss",
    "calibration_stats",
    "fit_temperature",
    "kd_loss",
    "metrics",
    "__version__",
]
# Not in __all__: ``from kdbench import *`` reads every name there, which would import
# torchmetrics, or fail without it.
_LAZY = ("CalibrationError", "CalibrationMetrics")

if TYPE_CHECKING:
    from kdbench.calibration_metric import CalibrationError, CalibrationMetrics


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from kdbench import calibration_metric

        return getattr(calibration_metric, name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Listed only where they load: inspect.getmembers / help() read every listed name.
    from importlib.util import find_spec

    return sorted({*globals(), *(_LAZY if find_spec("torchmetrics") is not None else ())})
