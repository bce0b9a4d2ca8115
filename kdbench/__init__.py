"""kdbench: fused distillation losses, one-pass calibration statistics, benchmark suites.

Importing kdbench imports neither triton nor CUDA: kernels load on first use.
"""

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
