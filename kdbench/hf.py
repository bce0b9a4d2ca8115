"""``DistillationTrainer``: Hugging Face's ``Trainer`` with :class:`kdbench.KDLoss` as its loss.

Needs ``pip install "kdbench[hf]"`` (transformers, accelerate); ``import kdbench`` does not
import this module.  Its ``compute_loss`` is the override the README shows, made general::

    labels = inputs.pop("labels")                       # (B, L), -100 where ignored
    outputs = model(**inputs)                           # student logits (B, L, V)
    with torch.no_grad():
        t_logits = teacher(inputs)                      # teacher logits (B, L, V)
    loss = kd(outputs.logits[:, :-1], t_logits[:, :-1], labels[:, 1:])   # position i predicts i + 1

* ``teacher`` is a model called as ``teacher(**inputs).logits`` (a Hugging Face causal LM) or
  any callable ``teacher_logits(inputs) -> (B, L, V)`` (an ensemble, a temperature-scaled
  teacher, the true next-token distribution of a synthetic language as log-probabilities).
* ``kd`` is a :class:`kdbench.KDLoss` (forward KL, reverse KL, JSD, mixed with the hard
  term by its ``alpha``); ``None`` trains on the labels alone (cross-entropy), which is what
  a teacher or a CE baseline is trained with.
* ``loss_fn(student (N, V), labels (N,), teacher (N, V) | None) -> scalar`` replaces both for
  objectives that are not a KD divergence (label smoothing, logit MSE); rows whose label is
  -100 are dropped before it is called.

Without ``labels`` in the batch the inputs' ``input_ids`` are the labels (language modelling).
``self.kd_backend`` names the backend the loss ran on last (``"triton"`` on CUDA tensors with
Triton, ``"torch"`` otherwise), so a report can say which loss it timed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - the hf extra installs it
    raise ImportError('kdbench.hf needs transformers and accelerate: pip install "kdbench[hf]"') from e

from kdbench import _checks
from kdbench.loss import KDLoss

IGNORE_INDEX = -100
TeacherFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss distils a teacher's next-token distribution into the model.

    Args (besides ``Trainer``'s):
        teacher: a causal LM (put in eval mode, never trained here) or a callable
            ``inputs -> logits (B, L, V)``; None for plain cross-entropy.
        kd: the divergence, a :class:`kdbench.KDLoss` (its ``ignore_index`` must be -100,
            the labels' padding value); None with a teacher is an error.
        loss_fn: another objective on flattened counted positions (see the module docstring).
    """

    def __init__(self, *args: Any, teacher: nn.Module | TeacherFn | None = None, kd: KDLoss | None = None,
                 loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        if kd is not None and not isinstance(kd, KDLoss):
            raise TypeError(f"kd: expected a kdbench.KDLoss or None, got {type(kd).__name__}")
        if kd is not None and loss_fn is not None:
            raise ValueError("loss_fn: give kd (a KD divergence) or loss_fn (another objective), not both")
        if kd is not None and teacher is None:
            raise ValueError("teacher: kd distils from a teacher; expected a model or a callable, got None")
        if kd is not None and kd.options["ignore_index"] != IGNORE_INDEX:
            raise ValueError(f"kd: expected ignore_index={IGNORE_INDEX} (the labels' padding), "
                             f"got {kd.options['ignore_index']}")
        if teacher is not None and not callable(teacher):
            raise TypeError(f"teacher: expected a model or a callable, got {type(teacher).__name__}")
        super().__init__(*args, **kwargs)
        if isinstance(teacher, nn.Module):
            teacher.eval()
            teacher.requires_grad_(False)
        self.teacher = teacher
        self.kd = kd
        self.loss_fn = loss_fn
        self.kd_backend: str | None = None

    def teacher_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits ``(B, L, V)`` for the batch, without gradient."""
        assert self.teacher is not None
        with torch.no_grad():
            if isinstance(self.teacher, nn.Module):
                return self.teacher(**inputs).logits
            return self.teacher(inputs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"]
        outputs = model(**inputs)
        student = outputs.logits[:, :-1]
        target = labels[:, 1:]
        teacher = self.teacher_logits(inputs)[:, :-1] if self.teacher is not None else None
        if self.kd is not None:
            self.kd_backend = _checks.resolve_backend(self.kd.options["backend"], student, teacher)
            loss = self.kd(student, teacher, target)
        else:
            s = student.reshape(-1, student.shape[-1])
            y = target.reshape(-1)
            keep = y != IGNORE_INDEX
            t = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])[keep]
            if self.loss_fn is not None:
                loss = self.loss_fn(s[keep], y[keep], t)
            else:
                loss = F.cross_entropy(s, y, ignore_index=IGNORE_INDEX)
            self.kd_backend = "torch"
        return (loss, outputs) if return_outputs else loss
