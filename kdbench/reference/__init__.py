"""Plain-PyTorch reference implementations.

They define the semantics of every fused kernel in ``kdbench.kernels``: the tests
run them in float64 as the oracle, the benchmarks time them as the "torch"
provider, and ``backend="torch"`` (the default off CUDA) runs them.
"""

from kdbench.reference.calibration import bin_index, binned_sums, calibration_rows, calibration_sums
from kdbench.reference.kd import kd_loss, kd_loss_autograd, kd_row_losses

__all__ = ["bin_index", "binned_sums", "calibration_rows", "calibration_sums", "kd_loss", "kd_loss_autograd", "kd_row_losses"]
