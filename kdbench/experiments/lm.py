"""Language-model distillation against the truth: training and evaluation on ``hmm_v<V>`` / ``ginc_v<V>``.

The same engine as the classifiers (:func:`kdbench.experiments.run_experiment` calls
:func:`run_lm` for a language dataset): one :class:`RunConfig` in, one flat record out,
teachers cached by :mod:`kdbench.experiments.teachers`, sharded and resumed by the sweep.
What differs is the model (a Hugging Face causal LM, :class:`~kdbench.experiments.models.CausalLM`),
the training loop (Hugging Face's ``Trainer`` with :class:`kdbench.hf.DistillationTrainer`'s
``compute_loss``, whose KD term is :class:`kdbench.KDLoss`) and what is measured.

Metrics (:data:`LM_METRIC_FIELDS`), token-level over every scored test position (position i
of a sequence predicts token i + 1; sequences have no padding), with ``p`` the model's
next-token distribution and ``P`` the true one from the forward algorithm:

==========================  ===================================================================
``accuracy``, ``nll``       top-1 accuracy and mean NLL of the sampled next token
``brier``                   multi-class Brier score
``ece``, ``rms_ce``, ``mce``  15 equal-width bins, from :func:`kdbench.calibration_stats` on the
                            (tokens, V) logits, one pass over the test split (per-chunk sums add)
``fitted_temperature``      T minimising the validation NLL (:func:`kdbench.fit_temperature`)
``ece_ts``, ``nll_ts``      after dividing the logits by T
``entropy_floor``           mean H(P): the NLL of the truth itself, what no model can beat
``excess_nll``              ``nll - entropy_floor``; its expectation is the mean KL(P || p)
``true_kl``                 mean KL(P || p), exact (no sampling of the next token)
``true_ce``, ``true_ce_ts`` mean |conf - P(top-1 token | context)|, before / after scaling by T
``true_accuracy``           mean P(top-1 token | context): the accuracy the model has in expectation
``agreement``               top-1 agreement with the teacher (students)
``predictive_kl``           mean KL(p_teacher || p_student) (students)
==========================  ===================================================================

Training facts (:data:`LM_TRAIN_FIELDS`): parameters, wall time, and training throughput in
tokens per second (scored positions: batch x (L - 1) per step); ``loss_backend`` (a run
field) names the backend of the loss (``"torch"`` on CPU, ``"triton"`` on CUDA).

The reference role ``"bayes"`` (method ``"bayes_optimal"``) is the truth itself evaluated by
the same code: its ``true_kl`` and ``true_ce`` are 0 and its NLL is the entropy floor up to
the sampling of the test tokens.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

import kdbench
from kdbench import metrics
from kdbench.experiments import hmm as _hmm
from kdbench.experiments.config import Recipe
from kdbench.experiments.evaluate import N_BINS
from kdbench.experiments.lm_data import LMDataset

LM_METRIC_FIELDS: tuple[str, ...] = (
    "accuracy",
    "nll",
    "brier",
    "ece",
    "rms_ce",
    "mce",
    "fitted_temperature",
    "ece_ts",
    "nll_ts",
    "entropy_floor",
    "excess_nll",
    "true_kl",
    "true_ce",
    "true_ce_ts",
    "true_accuracy",
    "agreement",
    "predictive_kl",
)
LM_TRAIN_FIELDS: tuple[str, ...] = ("n_params", "train_seconds", "train_tokens_per_second")
LM_ROLE_FIELDS: tuple[str, ...] = LM_METRIC_FIELDS + LM_TRAIN_FIELDS
EVAL_CHUNK = 32  # sequences per evaluation step: bounds the (chunk, L, V) float64 truth in memory
_BAYES_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}

Logits = Callable[[torch.Tensor], torch.Tensor]  # tokens (n, L) -> logits (n, L, V)
Progress = Callable[[str], None]

# Variables through which torchrun tells a process it is one rank of a job.  The sweep's ranks
# run different experiments, so each Trainer must train alone: accelerate would otherwise wrap
# the model in DistributedDataParallel and wait for the other rank's gradients.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@contextmanager
def _single_process() -> Iterator[None]:
    from accelerate.state import AcceleratorState, PartialState
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.pop(k) for k in _DIST_ENV if k in os.environ}
    # TrainingArguments warns that a process group exists but DDP is off: here that is the intent.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        hf_logging.set_verbosity(verbosity)
        os.environ.update(saved)


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


@dataclass(frozen=True)
class LMTrainResult:
    seconds: float
    tokens_per_second: float  # scored positions per second
    steps: int
    final_loss: float  # mean training loss over all steps (Trainer's training_loss)
    backend: str  # the loss's backend


def train_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    recipe: Recipe,
    *,
    seed: int,
    device: torch.device,
    teacher: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    kd: kdbench.KDLoss | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> LMTrainResult:
    """Train ``model`` (a :class:`CausalLM`; its ``.hf`` is what Trainer sees) on ``tokens (N, L)``.

    ``recipe``: batch size in sequences, steps, learning rate and weight decay of AdamW
    (``optimizer = "adam"``; Hugging Face's decoupled weight decay) or SGD with momentum,
    ``"constant"`` or ``"cosine"`` schedule, no warm-up.  Batches are drawn by the Trainer's
    sampler seeded with ``seed``.
    """
    from transformers import PrinterCallback, TrainingArguments

    from kdbench.hf import DistillationTrainer

    if recipe.schedule not in ("constant", "cosine"):
        raise ValueError(f"student_recipe.schedule: language models take 'constant' or 'cosine', "
                         f"got {recipe.schedule!r}")
    hf = model.hf if hasattr(model, "hf") else model
    with _single_process(), tempfile.TemporaryDirectory(prefix="kdbench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=recipe.batch_size,
            max_steps=recipe.steps,
            learning_rate=recipe.lr,
            weight_decay=recipe.weight_decay,
            optim="adamw_torch" if recipe.optimizer == "adam" else "sgd",
            optim_args=None if recipe.optimizer == "adam" else f"momentum={recipe.momentum}",
            lr_scheduler_type="cosine" if recipe.schedule == "cosine" else "constant",
            warmup_steps=0,
            seed=seed % (2**32),
            data_seed=seed % (2**32),
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = DistillationTrainer(model=hf, args=args, train_dataset=_Sequences(tokens.cpu()), teacher=teacher,
                                      kd=kd, loss_fn=loss_fn)
        # The run prints its own one-line summary; Trainer's end-of-training dict would interleave with it.
        trainer.remove_callback(PrinterCallback)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    hf.eval()
    scored = recipe.steps * recipe.batch_size * (tokens.shape[1] - 1)
    if progress is not None:
        progress(f"[{label}] {recipe.steps} steps in {seconds:.1f} s, {scored / seconds:,.0f} tokens/s, "
                 f"loss {output.training_loss:.4f}")
    return LMTrainResult(seconds, scored / seconds, recipe.steps, float(output.training_loss),
                         trainer.kd_backend or "torch")


@torch.no_grad()
def lm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Eval-mode float32 logits ``(n, L, V)`` of a causal LM."""
    was = model.training
    model.eval()
    out = model(tokens).float()
    model.train(was)
    return out


def _scored(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position i scores token i + 1: logits ``(n * (L - 1), V)`` and their targets."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)


def evaluate_lm(logits_fn: Logits, data: LMDataset, *, teacher_fn: Logits | None = None,
                chunk: int = EVAL_CHUNK) -> dict[str, Any]:
    """Every field of :data:`LM_METRIC_FIELDS` for one model (see the module docstring).

    The temperature is fitted on the whole validation split (its logits are held at once:
    ``n_val * (L - 1) * V`` float32); the test split is processed ``chunk`` sequences at a
    time and its statistics summed.  Also the test split's reliability sums
    (``bin_count``, ``bin_conf_sum``, ``bin_correct_sum``).
    """
    val_logits, val_targets = _scored(torch.cat([logits_fn(t) for t in data.tokens_val.split(chunk)]),
                                      data.tokens_val)
    temperature = kdbench.fit_temperature(val_logits, val_targets)
    del val_logits
    stats = stats_ts = None
    sums: dict[str, float] = {}
    sums_ts: dict[str, float] = {}
    agree = pkl = 0.0
    for tokens in data.tokens_test.split(chunk):
        z, y = _scored(logits_fn(tokens), tokens)
        truth = data.truth(tokens)[:, 1:].reshape(-1, z.shape[-1])
        s = kdbench.calibration_stats(z, y, n_bins=N_BINS, inputs="logits")
        s_ts = kdbench.calibration_stats(z, y, n_bins=N_BINS, temperature=temperature, inputs="logits")
        stats = s if stats is None else stats + s
        stats_ts = s_ts if stats_ts is None else stats_ts + s_ts
        for acc, new in ((sums, _hmm.truth_sums(z, truth)), (sums_ts, _hmm.truth_sums(z, truth, temperature))):
            for k, v in new.items():
                acc[k] = acc.get(k, 0.0) + float(v)
        if teacher_fn is not None:
            t, _ = _scored(teacher_fn(tokens), tokens)
            # The classifiers' per-row means, weighted back into sums so that chunks add.
            agree += metrics.agreement(t, z) * len(z)
            pkl += metrics.predictive_kl(t, z) * len(z)
    assert stats is not None and stats_ts is not None
    n = sums["count"]
    out: dict[str, Any] = {
        "accuracy": stats.accuracy(),
        "nll": stats.nll(),
        "brier": stats.brier(),
        "ece": stats.ece("l1"),
        "rms_ce": stats.ece("l2"),
        "mce": stats.ece("max"),
        "fitted_temperature": temperature,
        "ece_ts": stats_ts.ece("l1"),
        "nll_ts": stats_ts.nll(),
        "entropy_floor": sums["entropy"] / n,
        "true_kl": sums["true_kl"] / n,
        "true_ce": sums["true_ce"] / n,
        "true_ce_ts": sums_ts["true_ce"] / n,
        "true_accuracy": sums["true_top1"] / n,
        "agreement": agree / n if teacher_fn is not None else None,
        "predictive_kl": pkl / n if teacher_fn is not None else None,
    }
    out["excess_nll"] = out["nll"] - out["entropy_floor"]
    out = {k: (None if v is None else float(v)) for k, v in out.items()}
    out.update(bin_count=stats.count.tolist(), bin_conf_sum=stats.conf_sum.tolist(),
               bin_correct_sum=stats.correct_sum.tolist())
    return out


def truth_logits(data: LMDataset) -> Logits:
    """The true next-token distribution as a causal LM's logits ``(n, L, V)``: position i holds
    ``log P(x_{i+1} | x_<=i)`` (float32; -inf where the truth is 0), the last position (which
    scores nothing) a uniform row.  The oracle teacher, and the ``bayes`` reference."""

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        truth = data.truth(tokens)
        out = torch.zeros(truth.shape, dtype=torch.float32, device=truth.device)
        out[:, :-1] = torch.log(truth[:, 1:])
        return out

    return logits


def models_logits(models: list[nn.Module], scale: float = 1.0) -> Logits:
    """A teacher's logits: one model's, or an ensemble's ``log mean softmax``; divided by ``scale`` (kd_ts)."""
    from kdbench.experiments.methods import ensemble_logits

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        per = [lm_logits(m, tokens) for m in models]
        z = per[0] if len(per) == 1 else ensemble_logits(per)
        return z / scale if scale != 1.0 else z

    return logits


def _kd_module(config: Any) -> kdbench.KDLoss | None:
    """The KDLoss of a divergence method (None for the objectives that are not one)."""
    from kdbench.experiments.methods import _DIVERGENCE

    if config.method not in _DIVERGENCE:
        return None
    return kdbench.KDLoss(temperature=config.temperature, alpha=config.alpha, divergence=_DIVERGENCE[config.method],
                          beta=config.beta, ignore_index=-100)


def run_lm(config: Any, data: LMDataset, record: dict[str, Any], *, cache_dir: str | None, device: torch.device,
           progress: Progress | None) -> dict[str, Any]:
    """Fill ``record`` (already holding the config and run facts) for a language dataset; see the module docstring."""
    from kdbench.experiments.methods import METHODS, make_loss
    from kdbench.experiments.models import build_model, count_parameters
    from kdbench.experiments.teachers import get_teacher, teacher_configs
    from kdbench.experiments.train import derive_seed, seeded_model

    spec = METHODS[config.method]
    # The truth's own scores depend on the data alone: every run of a process on the same data reuses them.
    key = (config.dataset, config.data_seed, config.dataset_size, config.val_fraction, str(device))
    if key not in _BAYES_CACHE:
        _BAYES_CACHE.clear()
        _BAYES_CACHE[key] = evaluate_lm(truth_logits(data), data)
    record.update({f"bayes/{k}": v for k, v in _BAYES_CACHE[key].items()})
    record.update(dict.fromkeys((f"bayes/{f}" for f in LM_TRAIN_FIELDS)))
    record["loss_backend"] = None
    teachers = [get_teacher(tc, data, cache_dir=cache_dir, device=device, progress=progress)  # type: ignore[arg-type]
                for tc in teacher_configs(config)]
    teacher_test: Logits | None = None
    signal: Logits | None = None
    if teachers:
        record["teacher_cached"] = all(t.cached for t in teachers)
        teacher_test = models_logits([t.model for t in teachers])
        fields = evaluate_lm(teacher_test, data)
        seconds = sum(t.train_seconds for t in teachers)
        tokens = sum(t.train_seconds * t.samples_per_second for t in teachers)
        fields.update(n_params=sum(count_parameters(t.model) for t in teachers), train_seconds=seconds,
                      train_tokens_per_second=tokens / seconds if seconds > 0 else None)
        record.update({f"teacher/{k}": v for k, v in fields.items()})
        if spec.needs_teacher:
            scale = fields["fitted_temperature"] if spec.teacher_temperature_scaled else 1.0
            signal = models_logits([t.model for t in teachers], scale)
    if spec.bayes_teacher:
        signal = truth_logits(data)

    student = seeded_model(lambda: build_model(config.student, data.input_shape, data.num_classes),
                           derive_seed(config.seed, "student-init"), device)
    kd = _kd_module(config)
    loss_fn = None
    if kd is None and config.method != "ce":
        loss_fn = make_loss(config.method, temperature=config.temperature, alpha=config.alpha, beta=config.beta,
                            smoothing=config.smoothing, entropy_weight=config.entropy_weight)
    teacher_fn = None if signal is None else (lambda inputs: signal(inputs["input_ids"]))
    result = train_lm(student, data.tokens_train.to(device), config.student_recipe, seed=derive_seed(config.seed, "student"),
                      device=device, teacher=teacher_fn, kd=kd, loss_fn=loss_fn, progress=progress,
                      label=f"student {config.student} {config.method} seed {config.seed}")
    record["loss_backend"] = result.backend
    fields = evaluate_lm(lambda t: lm_logits(student, t), data, teacher_fn=teacher_test)
    fields.update(n_params=count_parameters(student), train_seconds=result.seconds,
                  train_tokens_per_second=result.tokens_per_second)
    record.update({f"student/{k}": v for k, v in fields.items()})
    if progress is not None:
        progress(f"[run] {config.dataset} {config.method} -> {config.student} seed {config.seed}: student accuracy "
                 f"{fields['accuracy']:.4f} ECE {fields['ece']:.4f} KL to truth {fields['true_kl']:.4f}")
    return record
