"""Benchmark cases: one op at one shape, dtype, direction and device, and the bytes it must move.

Minimum memory traffic (the denominator of every GB/s figure):

* ``kd_loss`` forward:           N V (bytes(student) + bytes(teacher))
* ``kd_loss`` forward+backward:  N V (bytes(student) + bytes(teacher) + bytes(gradient)),
  the gradient having the student's dtype
* ``calibration_stats``:         N C bytes(logits) + 8 N (int64 labels)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KD_LOSS = "kd_loss"
CALIBRATION = "calibration_stats"
FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One measurement problem.

    ``v`` is the vocabulary / class count (C for calibration).  The kd_loss fields
    (``divergence``, ``temperature``, ``beta``) and ``n_bins`` are ignored by the
    other op.
    """

    op: str
    n: int
    v: int
    dtype: str
    device: str
    direction: str = FORWARD
    divergence: str = "forward"
    temperature: float = 2.0
    beta: float = 0.5
    n_bins: int = 15

    def __post_init__(self) -> None:
        if self.op not in (KD_LOSS, CALIBRATION):
            raise ValueError(f"op: expected {KD_LOSS!r} or {CALIBRATION!r}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.direction not in (FORWARD, FORWARD_BACKWARD):
            raise ValueError(f"direction: expected {FORWARD!r} or {FORWARD_BACKWARD!r}, got {self.direction!r}")
        if self.op == CALIBRATION and self.direction != FORWARD:
            raise ValueError("direction: calibration_stats has no backward")
        if self.n < 1 or self.v < 1:
            raise ValueError(f"n, v: expected positive sizes, got ({self.n}, {self.v})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backward(self) -> bool:
        return self.direction == FORWARD_BACKWARD

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_moved(self) -> int:
        """Minimum bytes read and written (see the module docstring)."""
        if self.op == CALIBRATION:
            return self.n * self.v * self.itemsize + 8 * self.n
        tensors = 3 if self.backward else 2
        return tensors * self.n * self.v * self.itemsize

    @property
    def grad_bytes(self) -> int:
        """Size of the gradient buffer, the least extra memory forward+backward can use."""
        return self.n * self.v * self.itemsize if self.backward else 0

    @property
    def title(self) -> str:
        shape = f"({self.n}, {self.v}) {self.dtype}"
        if self.op == CALIBRATION:
            return f"calibration_stats, {self.n_bins} bins, {shape}"
        div = {"forward": "forward KL", "reverse": "reverse KL", "jsd": f"JSD beta={self.beta:g}"}[self.divergence]
        return f"kd_loss {self.direction}, {div}, T={self.temperature:g}, {shape}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: providers of one group are compared with each other."""
        return f"{self.op} {self.direction} | {self.title}" if self.op == KD_LOSS else self.title

    @property
    def key(self) -> str:
        """Short id for test names and JSON."""
        name = self.op if self.op == CALIBRATION else f"{self.op}-{self.direction}-{self.divergence}"
        return f"{name}-{self.n}x{self.v}-{self.dtype}"

    def info(self) -> dict[str, object]:
        """What a benchmark records next to its timing."""
        return {
            **asdict(self),
            "key": self.key,
            "shape": [self.n, self.v],
            "bytes_moved": self.bytes_moved,
        }

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) logits for kd_loss; (logits, labels) for calibration_stats.

        Generated on the device in float32 and rounded once to the case dtype.  The
        calibration labels agree with the argmax on about 70% of rows, so the
        statistics look like a trained model's rather than chance.
        """
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape = (self.n, self.v)

        def normal(scale: float, shift: float = 0.0) -> torch.Tensor:
            x = torch.randn(shape, generator=g, device=self.device)
            return x.mul_(scale).add_(shift).to(self.torch_dtype)

        if self.op == KD_LOSS:
            return normal(2.0), normal(3.0, 0.5)
        logits = normal(3.0)
        noise = torch.randint(0, self.v, (self.n,), generator=g, device=self.device)
        keep = torch.rand(self.n, generator=g, device=self.device) < 0.7
        labels = torch.where(keep, logits.argmax(-1), noise)
        return logits, labels


def kd_case(n: int, v: int, dtype: str, device: str, direction: str, divergence: str = "forward", **kw: float) -> Case:
    return Case(KD_LOSS, n, v, dtype, device, direction=direction, divergence=divergence, **kw)


def calibration_case(n: int, c: int, dtype: str, device: str) -> Case:
    return Case(CALIBRATION, n, c, dtype, device)


def headline_cases(device: str, quick: bool = False) -> list[Case]:
    """The shapes ``kdbench bench`` reports first (most targets are stated at these).

    CUDA: kd_loss forward+backward on (8192, 128256) bf16 (forward KL, T = 2; JSD too,
    against Liger's JSD) and calibration_stats on (65536, 32000) bf16.  CPU: kd_loss
    forward+backward on (2048, 32000) fp32 and calibration_stats on (4096, 32000) fp32.
    ``quick`` shrinks every shape to seconds in total (for tests of the command).
    """
    if device.startswith("cuda"):
        kd_shape, cal_shape, dtype = (8192, 128256), (65536, 32000), "bfloat16"
        if quick:
            kd_shape, cal_shape = (256, 32000), (1024, 32000)
        divergences = ["forward", "jsd"]
    else:
        kd_shape, cal_shape, dtype = (2048, 32000), (4096, 32000), "float32"
        if quick:
            kd_shape, cal_shape = (16, 3000), (64, 1000)
        divergences = ["forward"]
    out = [kd_case(*kd_shape, dtype, device, FORWARD_BACKWARD, d) for d in divergences]
    out.append(calibration_case(*cal_shape, dtype, device))
    return out


# (n, v, dtype) of the extra CUDA shapes: few classes in float32, a mid-size vocabulary,
# a very wide one.  ``quick`` keeps the dtypes and the widths' character at tiny sizes.
EXTRA_SHAPES_CUDA = ((65536, 1000, "float32"), (16384, 32000, "bfloat16"), (4096, 262144, "bfloat16"))
EXTRA_SHAPES_CUDA_QUICK = ((512, 1000, "float32"), (64, 32000, "bfloat16"), (8, 262144, "bfloat16"))


def extra_cases(device: str, quick: bool = False) -> list[Case]:
    """Shapes ``kdbench bench`` reports after the headline ones, on CUDA only.

    At each of :data:`EXTRA_SHAPES_CUDA`: kd_loss forward+backward (forward KL, T = 2)
    and calibration_stats.  They are timed with fewer repeats and without the slow
    providers (see :data:`kdbench.bench.providers.EXTRA_SHAPE_SKIPS`); their target is
    kdbench-triton against ``torch.compile``.  None on CPU.
    """
    if not device.startswith("cuda"):
        return []
    shapes = EXTRA_SHAPES_CUDA_QUICK if quick else EXTRA_SHAPES_CUDA
    out = [kd_case(n, v, dtype, device, FORWARD_BACKWARD) for n, v, dtype in shapes]
    out += [calibration_case(n, v, dtype, device) for n, v, dtype in shapes]
    return out


def pytest_cases(device: str, quick: bool = False) -> list[Case]:
    """Shapes of ``pytest --benchmark-only``: small on CPU (minutes in all), headline on CUDA.

    ``quick`` (environment ``KDBENCH_BENCH_QUICK=1``) takes small shapes on CUDA too.
    """
    if device.startswith("cuda"):
        kd_shape, cal_shape, dtype = (8192, 128256), (65536, 32000), "bfloat16"
        if quick:
            kd_shape, cal_shape = (256, 32000), (1024, 32000)
    else:
        kd_shape, cal_shape, dtype = (256, 32000), (1024, 32000), "float32"
    out = [
        kd_case(*kd_shape, dtype, device, direction, divergence)
        for direction in (FORWARD, FORWARD_BACKWARD)
        for divergence in ("forward", "jsd")
    ]
    out.append(calibration_case(*cal_shape, dtype, device))
    return out
