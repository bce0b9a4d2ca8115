"""kdbench: fused distillation losses, one-pass calibration statistics, benchmark suites.

Importing kdbench imports neither triton nor CUDA: kernels load on first use.
"""

from kdbench.loss import KDLoss, kd_loss

__version__ = "0.1.0"

__all__ = ["KDLoss", "kd_loss", "__version__"]
