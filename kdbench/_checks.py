"""Argument checks shared by the public entry points.

Every check raises ``ValueError`` or ``TypeError`` whose message starts with the
argument's name, so a user can tell at a glance which argument is wrong.  Checks
that would need a host-device sync (label range on CUDA) are done on CPU only.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")


def check_logits(name: str, logits: object) -> torch.Tensor:
    """A floating tensor with at least one dim (the class / vocabulary dim)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float32, float16, bfloat16 or float64), got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError(f"{name}: expected shape (..., V) with at least one dim, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: the last (class) dim is empty")
    return logits


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a positive float, got {type(temperature).__name__}")
    t = float(temperature)
    if math.isnan(t) or t <= 0 or math.isinf(t):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    return t


def check_unit_interval(name: str, value: object, *, open_: bool) -> float:
    """``value`` in [0, 1] (``open_=False``) or in (0, 1) (``open_=True``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v < 1.0) if open_ else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1)" if open_ else "[0, 1]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return v


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_labels(
    labels: object,
    lead_shape: torch.Size,
    num_classes: int,
    ignore_index: int,
    *,
    name: str = "labels",
) -> torch.Tensor:
    """Integer labels shaped like the leading dims of the logits, each in [0, C) or ``ignore_index``.

    The range check runs on CPU tensors only: on CUDA it would cost a host sync per
    call (the kernels then guard the index on the device instead).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (e.g. torch.long), got {labels.dtype}")
    if not labels.dtype.is_signed and ignore_index < 0:
        # -100 would wrap to 156 in uint8: a real class would be dropped without a word.
        raise TypeError(
            f"{name}: an unsigned dtype ({labels.dtype}) cannot hold ignore_index={ignore_index}; "
            "expected a signed integer dtype (e.g. torch.long)"
        )
    if labels.shape != lead_shape:
        raise ValueError(
            f"{name}: expected shape {tuple(lead_shape)} (the leading dims of the logits), got {tuple(labels.shape)}"
        )
    if labels.device.type == "cpu" and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"{name}: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
                f"found {first} ({int(bad.sum())} such entries)"
            )
    return labels


def check_backend(backend: object) -> str:
    return check_choice("backend", backend, BACKENDS)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_on() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, tensor: torch.Tensor, *others: torch.Tensor) -> str:
    """"auto" means the fused kernels on CUDA tensors of a kernel dtype, the reference otherwise.

    ``tensor`` decides the device; it and ``others`` (a teacher's logits) all decide the
    dtype: a float64 among them asks for float64 arithmetic, which only the reference has.
    """
    has_float64 = any(t.dtype == torch.float64 for t in (tensor, *others))
    if backend == "auto":
        if tensor.is_cuda and not has_float64 and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but triton is not installed")
        if not tensor.is_cuda and not interpreter_on():
            raise ValueError(
                "backend: 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                "set before triton is imported; use backend='torch' or 'auto' on CPU"
            )
        if has_float64:
            raise TypeError(
                "backend: the triton kernels accumulate in float32 and take float32/float16/bfloat16 "
                "logits, got a float64 input; use backend='torch' (or 'auto') for float64"
            )
    return backend
