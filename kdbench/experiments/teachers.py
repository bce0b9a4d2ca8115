"""Teachers: trained once per configuration, cached as checkpoints, reused by every run.

A teacher is identified by :class:`TeacherConfig` - dataset (name, data seed, size,
validation fraction), architecture, training recipe, label smoothing and seed -
and stored at ``<cache_dir>/<dataset>-<model>-<hash>.pt`` where ``hash`` is
:meth:`TeacherConfig.config_hash`.  Every method and student that needs the same
teacher loads that file instead of training again.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written checkpoint behind.  Two processes that
miss the cache at the same moment both train, and the last rename wins; either file
is a valid teacher.  A checkpoint that cannot be read, or whose stored configuration
differs from the requested one, is trained again and overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdbench._io import atomic_write
from kdbench.experiments.config import Recipe, RunConfig, stable_hash
from kdbench.experiments.datasets import Dataset
from kdbench.experiments.methods import METHODS
from kdbench.experiments.models import build_model
from kdbench.experiments.train import Progress, TrainResult, derive_seed, seeded_model, train_model

CACHE_FORMAT = 1  # bump when the checkpoint layout or the training code changes what a teacher is
ENSEMBLE_SEED_STRIDE = 1000  # ensemble member k trains with teacher_seed + k * stride
CACHE_ENV = "KDBENCH_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$KDBENCH_CACHE_DIR/teachers`` if set, else ``~/.cache/kdbench/teachers``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "kdbench") / "teachers"


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines a trained teacher's parameters."""

    dataset: str
    data_seed: int
    dataset_size: int | None
    val_fraction: float
    model: str
    recipe: Recipe
    smoothing: float  # label-smoothing epsilon of its training loss (0 = plain cross-entropy)
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        return stable_hash({**self.to_dict(), "format": CACHE_FORMAT})

    def filename(self) -> str:
        return f"{self.dataset}-{self.model}-{self.config_hash()}.pt"


def teacher_configs(config: RunConfig) -> list[TeacherConfig]:
    """The teachers ``config`` needs: none, one, or ``ensemble_size`` members (seeds strided)."""
    if config.teacher is None:
        return []
    spec = METHODS[config.method]
    base = TeacherConfig(
        dataset=config.dataset,
        data_seed=config.data_seed,
        dataset_size=config.dataset_size,
        val_fraction=config.val_fraction,
        model=config.teacher,
        recipe=config.teacher_recipe,  # type: ignore[arg-type]  # normalised to a Recipe
        smoothing=config.smoothing if spec.teacher_smoothing else 0.0,
        seed=config.teacher_seed,  # type: ignore[arg-type]  # normalised to an int
    )
    k = config.ensemble_size if spec.ensemble else 1
    return [dataclasses.replace(base, seed=base.seed + i * ENSEMBLE_SEED_STRIDE) for i in range(k)]


@dataclass
class Teacher:
    model: nn.Module  # eval mode, on the requested device
    config: TeacherConfig
    train_seconds: float  # of the original training run, also when loaded from the cache
    samples_per_second: float
    cached: bool  # loaded from the cache rather than trained now
    path: Path


def train_teacher(
    tc: TeacherConfig, data: Dataset, *, device: torch.device, progress: Progress | None
) -> tuple[nn.Module, TrainResult]:
    """Train a fresh teacher for ``tc`` on ``data`` (already on ``device``)."""
    model = seeded_model(
        lambda: build_model(tc.model, data.input_shape, data.num_classes), derive_seed(tc.seed, "teacher-init"), device
    )
    eps = tc.smoothing
    if getattr(data, "kind", "classification") == "lm":
        from kdbench.experiments.lm import train_lm
        from kdbench.experiments.methods import make_loss

        r = train_lm(model, data.tokens_train, tc.recipe, seed=derive_seed(tc.seed, "teacher"), device=device,  # type: ignore[attr-defined]
                     loss_fn=make_loss("label_smoothing", smoothing=eps) if eps else None, progress=progress,
                     label=f"teacher {tc.model} seed {tc.seed}" + (f" ls {eps}" if eps else ""))
        # samples_per_second holds tokens per second for a language model (scored positions).
        return model, TrainResult(r.seconds, r.tokens_per_second, r.steps, r.final_loss)
    result = train_model(
        model,
        data.x_train,
        data.y_train,
        tc.recipe,
        lambda s, y, t: F.cross_entropy(s, y, label_smoothing=eps),
        seed=derive_seed(tc.seed, "teacher"),
        progress=progress,
        label=f"teacher {tc.model} seed {tc.seed}" + (f" ls {eps}" if eps else ""),
    )
    return model, result


def _load(path: Path, tc: TeacherConfig, data: Dataset, device: torch.device) -> Teacher | None:
    """The cached teacher at ``path``, or None when it is absent, unreadable or for another config."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CACHE_FORMAT or ckpt.get("config") != tc.to_dict():
            return None
        model = build_model(tc.model, data.input_shape, data.num_classes)
        model.load_state_dict(ckpt["state_dict"])
    except (OSError, RuntimeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError):
        return None
    model.to(device).eval()
    return Teacher(model, tc, float(ckpt["train_seconds"]), float(ckpt["samples_per_second"]), True, path)


def get_teacher(
    tc: TeacherConfig,
    data: Dataset,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Teacher:
    """Load the teacher for ``tc`` from ``cache_dir`` (default :func:`default_cache_dir`), or train and store it.

    ``data`` must be the dataset ``tc`` describes; its tensors are moved to ``device``.
    """
    device = torch.device(device)
    path = Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser() / tc.filename()
    teacher = _load(path, tc, data, device)
    if teacher is not None:
        if progress is not None:
            progress(f"[teacher {tc.model} seed {tc.seed}] loaded from {path}")
        return teacher
    data = data.to(device)
    model, result = train_teacher(tc, data, device=device, progress=progress)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {
            "format": CACHE_FORMAT,
            "config": tc.to_dict(),
            "state_dict": state,
            "train_seconds": result.seconds,
            "samples_per_second": result.samples_per_second,
        "final_loss": result.final_loss,
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    if progress is not None:
        progress(f"[teacher {tc.model} seed {tc.seed}] saved to {path}")
    return Teacher(model.eval(), tc, result.seconds, result.samples_per_second, False, path)
