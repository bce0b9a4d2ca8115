"""Synthetic languages as datasets: ``hmm_v<V>`` and ``ginc_v<V>``.

A dataset name fixes the language (:func:`lm_spec`); ``data_seed`` draws the model, and
the three splits are independent draws from it (disjoint streams of one seed), so every
next-token distribution of every split is known exactly (:func:`LMDataset.truth`):

=============  ==============================================================================
``hmm_v<V>``   one hidden Markov model over V tokens (:data:`HMM_SHAPE`)
``ginc_v<V>``  a GINC-style mixture (Xie et al. 2021): each sequence is drawn from one of
               :data:`GINC_COMPONENTS` HMMs that share the emissions and differ in their
               transitions, so the context must identify the component
=============  ==============================================================================

Sizes: ``dataset_size`` sequences in all (default :data:`DEFAULT_SEQUENCES`) of
:data:`SEQ_LEN` tokens; :data:`TEST_FRACTION` of them are the test split and
``val_fraction`` of the rest the validation split (temperature scaling).  Tokens are int64
``(N, L)``; a model's position i predicts token i + 1, so every sequence has L - 1 scored
positions and there is no padding.

Memory: the test split's truth is formed a chunk of sequences at a time, ``chunk * L * V``
float64 values (64 sequences at V = 4096: 134 MB); the tokens themselves are small.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from kdbench.experiments import hmm as _hmm
from kdbench.experiments.datasets import DatasetInfo

LM_NAME = re.compile(r"(hmm|ginc)_v(\d+)")
SEQ_LEN = 64
DEFAULT_SEQUENCES = 8000
TEST_FRACTION = 0.1
MIN_VOCAB, MAX_VOCAB = 3, 1 << 20
GINC_COMPONENTS = 4
# States, sparse successors and emission supports that overlap, so that one token does not
# reveal the state and the forward algorithm's use of the whole context pays.
HMM_SHAPE = dict(n_states=16, successors=4, zipf_exponent=1.0)


def lm_spec(name: str) -> "_hmm.HMMSpec":
    """The :class:`~kdbench.experiments.hmm.HMMSpec` that a dataset name stands for."""
    m = LM_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"dataset: expected hmm_v<V> or ginc_v<V>, got {name!r}")
    family, vocab = m.group(1), int(m.group(2))
    if not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise ValueError(f"dataset: {name!r}: V must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab}")
    return _hmm.HMMSpec(vocab_size=vocab, seq_len=SEQ_LEN, n_components=GINC_COMPONENTS if family == "ginc" else 1,
                        **HMM_SHAPE)


def lm_dataset_info(name: str, *, field: str = "dataset") -> DatasetInfo | None:
    """The :class:`DatasetInfo` of a language dataset name; None when the name is not one."""
    if LM_NAME.fullmatch(name) is None:
        return None
    try:
        spec = lm_spec(name)
    except ValueError as e:
        raise ValueError(str(e).replace("dataset:", f"{field}:", 1)) from None
    return DatasetInfo(name, (spec.seq_len,), spec.vocab_size, from_disk=False, sizable=True, augmentable=False,
                       posterior=True, kind="lm")


def _seed(data_seed: int, tag: str) -> int:
    from kdbench.experiments.train import derive_seed

    return derive_seed(data_seed, f"lm:{tag}")


@dataclass(frozen=True)
class LMDataset:
    """A synthetic language and its splits: token ids int64 ``(N, L)``; ``hmm`` is the truth.

    ``num_classes`` is V and ``input_shape`` is ``(L,)``, as the model registry expects.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    hmm: "_hmm.HMM"
    tokens_train: torch.Tensor
    tokens_val: torch.Tensor
    tokens_test: torch.Tensor

    kind = "lm"

    def to(self, device: torch.device | str) -> "LMDataset":
        """The splits and the model on ``device`` (the same object when already there)."""
        device = torch.device(device)
        if self.tokens_train.device == device:
            return self
        return replace(self, hmm=self.hmm.to(device), tokens_train=self.tokens_train.to(device),
                       tokens_val=self.tokens_val.to(device), tokens_test=self.tokens_test.to(device))

    def truth(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact ``P(x_i | x_<i)`` of every position, float64 ``(n, L, V)`` (the forward algorithm)."""
        return _hmm.next_token_probs(self.hmm, tokens)

    def split_sizes(self) -> dict[str, int]:
        return {"n_train": len(self.tokens_train), "n_val": len(self.tokens_val), "n_test": len(self.tokens_test)}


def load_lm_dataset(name: str, *, data_seed: int = 0, dataset_size: int | None = None,
                    val_fraction: float = 0.1) -> LMDataset:
    """Draw the language of ``name`` from ``data_seed`` and sample its three splits (CPU tensors)."""
    spec = lm_spec(name)
    total = DEFAULT_SEQUENCES if dataset_size is None else dataset_size
    n_test = max(1, round(TEST_FRACTION * total))
    n_val = max(1, round(val_fraction * (total - n_test)))
    n_train = total - n_test - n_val
    if n_train < 1:
        raise ValueError(f"dataset_size: {total} sequences leave none to train on after {n_test} test and "
                         f"{n_val} validation; expected more")
    model = _hmm.make_hmm(spec, _seed(data_seed, "model"))
    sample = lambda n, tag: _hmm.sample(model, n, _seed(data_seed, tag))  # noqa: E731
    return LMDataset(name, spec.vocab_size, (spec.seq_len,), model, sample(n_train, "train"), sample(n_val, "val"),
                     sample(n_test, "test"))
