"""The training loop: random batches indexed straight out of tensors, no DataLoader.

CPU training of small models is the common case, where a DataLoader's per-batch
Python overhead and worker processes cost more than the model.  The whole split
lives in one tensor on the training device; each epoch draws one permutation from
a seeded ``torch.Generator`` and batches are slices of it.  Same seed, same
machine, same thread count -> the same parameters, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from kdbench.experiments.config import Recipe

Progress = Callable[[str], None]
# (batch indices into the training split, the batch's (augmented) inputs) -> teacher logits
TeacherSignal = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

PROGRESS_LINES = 10  # progress lines per training run


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def derive_seed(seed: int, tag: str) -> int:
    """An independent 63-bit seed for stream ``tag`` of ``seed`` (teacher init, student batches, ...)."""
    digest = hashlib.sha256(f"kdbench:{tag}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def deterministic(num_threads: int | None) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count for the block; restores both after.

    ``torch.use_deterministic_algorithms`` is set with ``warn_only`` so that an op
    without a deterministic implementation warns instead of failing a long run.
    """
    # cuBLAS reads this when its first handle is created; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    old_cudnn = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_cudnn
        torch.set_num_threads(old_threads)


def seeded_model(build: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """``build()`` with torch's global RNG seeded to ``seed``, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        kwargs = dict(lr=recipe.lr, weight_decay=recipe.weight_decay)
        cls: type[torch.optim.Optimizer] = torch.optim.Adam
    else:
        kwargs = dict(lr=recipe.lr, weight_decay=recipe.weight_decay, momentum=recipe.momentum)
        cls = torch.optim.SGD
    # The fused step is one kernel per parameter group: measurably faster for small models on CPU.
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kwargs)


def lr_at(recipe: Recipe, step: int) -> float:
    """Learning rate for 0-based ``step`` under the recipe's schedule."""
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * step / recipe.steps))
    if recipe.schedule == "multistep":
        drops = sum(step >= int(recipe.steps * f) for f in (0.625, 0.75, 0.875))
        return recipe.lr * 0.1**drops
    return recipe.lr


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-padded crops (and horizontal flips for "crop_flip") of images ``(B, C, H, W)``.

    Vectorised gathers; the random offsets come from ``generator`` (on CPU) so that
    augmentation is reproducible on every device.
    """
    if mode == "none":
        return x
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    if mode == "crop_flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def batch_indices(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless batches: slices of successive random permutations of ``range(n)``.

    A batch never spans two permutations; the last partial batch of an epoch is
    dropped unless the split is smaller than one batch.
    """
    size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - size + 1, size):
            yield perm[start : start + size]


@dataclass(frozen=True)
class TrainResult:
    seconds: float  # wall time of the optimisation loop (device synchronised)
    samples_per_second: float  # steps * batch / seconds
    steps: int
    final_loss: float  # mean training loss over the last 10% of steps


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    loss_fn: LossFn,
    *,
    seed: int,
    teacher: TeacherSignal | None = None,
    progress: Progress | None = None,
    label: str = "train",
) -> TrainResult:
    """Optimise ``model`` in place on ``(x, y)`` with ``recipe``; ``loss_fn(logits, y, teacher_logits)``.

    Args:
        x: ``(N, *input_shape)`` inputs on the model's device; y: ``(N,)`` int64 labels.
        seed: seeds batch order and augmentation (not initialisation: see :func:`seeded_model`).
        teacher: maps (batch indices, batch inputs) to teacher logits, or None.
        progress: called with a line ``PROGRESS_LINES`` times; None is silent.
    """
    device = x.device
    gen = torch.Generator().manual_seed(derive_seed(seed, "batches"))
    opt = make_optimizer(model, recipe)
    batches = batch_indices(len(x), recipe.batch_size, gen, device)
    report_every = max(1, recipe.steps // PROGRESS_LINES)
    tail_from = recipe.steps - max(1, recipe.steps // 10)
    tail_sum = torch.zeros((), device=device, dtype=torch.float64)
    window = torch.zeros((), device=device, dtype=torch.float64)
    samples = 0
    model.train()
    _sync(device)
    start = time.perf_counter()
    for step in range(recipe.steps):
        if recipe.schedule != "constant":
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, step)
        idx = next(batches)
        xb = augment_batch(x[idx], recipe.augment, gen)
        target = None if teacher is None else teacher(idx, xb)
        loss = loss_fn(model(xb), y[idx], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        samples += len(idx)
        # Accumulate on the device: a .item() per step would sync the GPU every step.
        d = loss.detach().to(torch.float64)
        window += d
        if step >= tail_from:
            tail_sum += d
        if progress is not None and ((step + 1) % report_every == 0 or step + 1 == recipe.steps):
            mean = window.item() / (step % report_every + 1)
            progress(f"[{label}] step {step + 1}/{recipe.steps} loss {mean:.4f} ({time.perf_counter() - start:.1f} s)")
            window.zero_()
        if step % 100 == 0 and not math.isfinite(d.item()):  # fail early, sync rarely
            raise FloatingPointError(f"[{label}] loss became {d.item()} at step {step + 1}; lower the learning rate")
    _sync(device)
    seconds = time.perf_counter() - start
    final = tail_sum.item() / (recipe.steps - tail_from)
    if not math.isfinite(final):
        raise FloatingPointError(f"[{label}] training loss is {final} at the end; lower the learning rate")
    model.eval()
    return TrainResult(seconds, samples / seconds if seconds > 0 else math.inf, recipe.steps, final)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode float32 logits ``(N, C)`` of ``x``, in batches.

    ``no_grad`` rather than ``inference_mode``: the logits serve as constant
    distillation targets inside autograd graphs, which inference tensors may not join.
    """
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
