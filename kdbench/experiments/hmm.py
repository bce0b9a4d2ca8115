"""A synthetic language whose next-token distribution is known exactly: a (mixture of) hidden Markov model(s).

Distilling a language model usually measures the student against the teacher only,
because the true ``P(x_t | x_<t)`` of natural text is unknown.  Sequences drawn from a
hidden Markov model have an exact, cheaply computed next-token distribution, so the
entropy floor of the NLL, the true calibration error and the KL to the truth of any
model trained on them can be measured without bins or estimates.

Model
=====
:class:`HMMSpec` fixes the shape; :meth:`HMM.draw` (or :func:`make_hmm`) draws one
language from a seed.  ``V`` tokens, ``K`` hidden states per component, ``M``
components, sequences of ``L`` tokens, ``s`` successors per state, emission supports of
``S`` tokens, Zipf exponent ``a``:

* emissions (shared by all components): state ``k`` emits from its own support, a
  uniformly random ``S``-subset of the ``V`` tokens put in a random order
  ``support[k, 0..S-1]``; the token of rank ``r`` (1-based) has probability
  ``r^-a / sum_{i<=S} i^-a``.  The rank distribution is the same for every state: only
  which tokens carry which rank differs.  Supports overlap (two random supports share
  ``S^2 / V`` tokens on average, and a token lies in about ``K S / V`` of them), so one
  token does not identify the state;
* transitions (one matrix per component): row ``k`` has exactly ``s`` non-zero entries.
  One of them is ``k``'s successor on a random cycle through all ``K`` states, so that
  the chain is irreducible (no state is transient and wasted); the other ``s - 1`` are
  distinct uniformly random states (a self-loop is allowed).  The ``s`` weights are
  ``Dirichlet(1/2, ..., 1/2)``, drawn exactly as normalised squares of standard normals
  (``Gamma(1/2) = Z^2 / 2``): a concentration below 1 makes rows peaked (with ``s = 2``
  the larger weight averages about 0.82), so the hidden path, hence the text, has
  structure that a model must carry through its context;
* initial distribution (one per component): ``Dirichlet(1, ..., 1)`` over the ``K``
  states (normalised standard exponentials);
* mixture (``M > 1``, as in GINC, Xie et al. 2021, "An Explanation of In-context
  Learning as Implicit Bayesian Inference"): each sequence first picks its component
  uniformly at random, then runs that component's chain; the context must identify the
  component as well as the state.

All parameters are float64, drawn on CPU from ``torch.Generator().manual_seed(seed)``
in a fixed order (supports state by state, then each component's initial distribution,
cycle, extra successors and weights), so one seed gives the same language on every
device; :meth:`HMM.to` moves it.

Exact next-token distribution
=============================
The forward algorithm runs over the joint (component, hidden state) space of size
``M K``; joint state ``m K + k`` is state ``k`` of component ``m``.  With
``E`` the emission matrix ``(K, V)`` and ``T_m`` the transition matrices::

    q_1(m, k)      = initial[m, k] / M                              (prior before x_1)
    P(x_t | x_<t)  = sum_{m,k} q_t(m, k) E[k, x_t]                  (= c_t)
    f_t(m, k)      = q_t(m, k) E[k, x_t] / c_t                      (filter after x_t)
    q_{t+1}(m, j)  = sum_k f_t(m, k) T_m[k, j]                      (predictive for x_{t+1})
    log P(x_1..x_L) = sum_t log c_t

Normalising at every step keeps every quantity in [0, 1] with no underflow, whatever
``L``.  :func:`state_predictive` returns the ``q_t`` (position 1's is the prior, so
position 0 of the output is the marginal of the first token), :func:`token_probs` maps
them to ``P(x_t = v | x_<t) = sum_{m,k} q_t(m, k) E[k, v]`` (``q @ emission_joint``,
with ``emission_joint`` the ``(M K, V)`` emission matrix tiled ``M`` times, formed
without tiling), and :func:`next_token_probs` does both.

Memory and cost (float64, 8 bytes an entry)
===========================================
* the language: ``K V`` (emission) + ``K S`` (supports, int64) + ``M K K`` entries:
  V = 262144, K = 32 holds 64 MiB + 8 MiB; V = 4096, K = 64 holds 2 MiB;
* :func:`state_predictive`: ``n L M K`` entries for ``n`` sequences of ``L`` tokens, cheap;
* :func:`next_token_probs` / :func:`token_probs`: ``n L V`` entries; at V = 32768 and
  L = 64 that is 16 MiB per sequence, so a caller scoring many sequences passes chunks
  of sequences, or takes :func:`state_predictive` once and forms token probabilities
  for slices of positions (``token_probs(hmm, q[:, a:b])``);
* :func:`token_log_probs` / :func:`log_likelihood`: ``n L`` outputs, no ``V``-sized
  intermediate beyond one ``(n, K)`` column gather a step;
* time: ``L`` sequential steps of an ``(M, n, K) x (M, K, K)`` batched product.

Sampling (:func:`sample`) draws ``2 L + 1`` uniforms per sequence in row order from a
CPU generator and inverts cumulative distributions precomputed on CPU at draw time, so
the samples depend only on the seed, not on the device nor on ``chunk_size``, and the
first ``n`` of ``n' > n`` sequences drawn from the same seed are the same.

:func:`truth_sums` scores model logits against the true distributions with mergeable
sums (entropy floor, true calibration error, KL to the truth, expected accuracy);
:func:`entropy_rate` estimates, by Monte Carlo, the entropy floor of a language next to
the cross-entropies of the best unigram, bigram and fixed-window predictors, to see how
much context a model needs before picking a shape.

Limits: ``V`` is bounded by memory only (the dense ``K V`` emission matrix; V = 262144
is fine for K up to a few hundred).  Tokens with probability 0 under the language (a
token outside every support reachable at that position) give ``log c_t = -inf``; the
filter then keeps its prior for that step instead of dividing by 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from kdbench.experiments.config import _int

from kdbench import _checks

__all__ = [
    "HMM",
    "HMMSpec",
    "default_emission_support",
    "entropy_rate",
    "log_likelihood",
    "make_hmm",
    "next_token_probs",
    "sample",
    "state_predictive",
    "token_log_probs",
    "token_probs",
    "truth_sums",
]

F64 = torch.float64
# Rows of token probabilities formed at once inside entropy_rate: 2^22 float64 entries = 32 MiB.
_BLOCK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------- argument checks




def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {value!r}")
    return v


def default_emission_support(vocab_size: int) -> int:
    """``min(V, max(8, V // 8))``: an eighth of the vocabulary, so that supports overlap."""
    return min(vocab_size, max(8, vocab_size // 8))


# --------------------------------------------------------------------------- the language


@dataclass(frozen=True)
class HMMSpec:
    """The shape of a language (see the module docstring for the model).

    Attributes:
        vocab_size: V >= 1 tokens.
        n_states: K >= 1 hidden states per component.
        seq_len: L >= 1 tokens per sampled sequence.
        successors: s in [1, K] non-zero entries per transition row.
        emission_support: S in [1, V] tokens each state emits; None becomes
            :func:`default_emission_support` (so ``spec.emission_support`` is always an int).
        zipf_exponent: a > 0; within a support, the token of rank r has probability ∝ r^-a.
        n_components: M >= 1 mixture components (uniform prior), sharing the emissions.
    """

    vocab_size: int
    n_states: int = 32
    seq_len: int = 64
    successors: int = 4
    emission_support: int | None = None
    zipf_exponent: float = 1.0
    n_components: int = 1

    def __post_init__(self) -> None:
        vocab = _int("vocab_size", self.vocab_size, 1)
        states = _int("n_states", self.n_states, 1)
        _int("seq_len", self.seq_len, 1)
        succ = _int("successors", self.successors, 1)
        if succ > states:
            raise ValueError(f"successors: expected an int <= n_states ({states}), got {succ}")
        support = self.emission_support
        if support is None:
            support = default_emission_support(vocab)
        elif _int("emission_support", support, 1) > vocab:
            raise ValueError(f"emission_support: expected an int <= vocab_size ({vocab}) or None, got {support}")
        object.__setattr__(self, "emission_support", support)  # resolve the default in the frozen spec
        object.__setattr__(self, "zipf_exponent", _positive_float("zipf_exponent", self.zipf_exponent))
        _int("n_components", self.n_components, 1)

    @property
    def joint_states(self) -> int:
        """``M K``: the size of the forward algorithm's (component, state) space."""
        return self.n_components * self.n_states


@dataclass(frozen=True, eq=False)
class HMM:
    """One language: the parameters of :class:`HMMSpec` ``spec`` drawn from ``seed``.

    All probability tensors are float64 on one device (:attr:`device`):

    * ``initial`` (M, K): per-component initial state distributions;
    * ``transition`` (M, K, K): row-stochastic, exactly ``successors`` non-zeros a row;
    * ``emission`` (K, V): dense row-stochastic, ``S`` non-zeros a row;
    * ``support`` (K, S) int64: ``support[k, r]`` is state k's token of rank r + 1;
    * ``rank_probs`` (S,): probability of rank r + 1, ``∝ (r + 1)^-a`` (the same in every state);
    * ``successor_index`` (M, K, s) int64: the non-zero columns of each transition row, increasing;
    * ``initial_cdf`` (M, K), ``successor_cdf`` (M, K, s), ``rank_cdf`` (S,): cumulative
      sums used by :func:`sample`, computed once on CPU (last entry exactly 1) so that
      sampling inverts the same numbers on every device.
    """

    spec: HMMSpec
    seed: int
    initial: torch.Tensor
    transition: torch.Tensor
    emission: torch.Tensor
    support: torch.Tensor
    rank_probs: torch.Tensor
    successor_index: torch.Tensor
    initial_cdf: torch.Tensor
    successor_cdf: torch.Tensor
    rank_cdf: torch.Tensor

    @classmethod
    def draw(cls, spec: HMMSpec, seed: int) -> "HMM":
        """Draw a language of shape ``spec`` from ``seed`` (an int >= 0), on CPU."""
        if not isinstance(spec, HMMSpec):
            raise TypeError(f"spec: expected an HMMSpec, got {type(spec).__name__}")
        seed = _int("seed", seed, 0)
        V, K, M, s = spec.vocab_size, spec.n_states, spec.n_components, spec.successors
        S = spec.emission_support
        assert S is not None  # resolved by HMMSpec.__post_init__
        g = torch.Generator(device="cpu").manual_seed(seed)

        rank_probs = torch.arange(1, S + 1, dtype=F64).pow(-spec.zipf_exponent)
        rank_probs /= rank_probs.sum()
        # One permutation per state keeps the peak memory at O(V) rather than a (K, V) sort.
        support = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(K)])
        emission = torch.zeros(K, V, dtype=F64).scatter_(1, support, rank_probs.expand(K, S))

        initial = torch.empty(M, K, dtype=F64)
        succ_index = torch.empty(M, K, s, dtype=torch.long)
        succ_weight = torch.empty(M, K, s, dtype=F64)
        rows = torch.arange(K)
        for m in range(M):
            exp = -torch.log1p(-torch.rand(K, generator=g, dtype=F64))  # Exp(1); u in [0, 1) keeps it finite
            initial[m] = exp / exp.sum()
            cycle = torch.randperm(K, generator=g)
            on_cycle = torch.empty(K, dtype=torch.long)
            on_cycle[cycle] = cycle.roll(-1)
            keys = torch.rand(K, K, generator=g, dtype=F64)
            keys[rows, on_cycle] = 2.0  # above every uniform: never drawn again as an extra successor
            extra = keys.argsort(dim=1, stable=True)[:, : s - 1]
            index = torch.cat([on_cycle[:, None], extra], dim=1)
            z = torch.randn(K, s, generator=g, dtype=F64)
            weight = z * z
            weight /= weight.sum(dim=1, keepdim=True)
            index, order = index.sort(dim=1)
            succ_index[m] = index
            succ_weight[m] = weight.gather(1, order)
        transition = torch.zeros(M, K, K, dtype=F64).scatter_(2, succ_index, succ_weight)

        return cls(
            spec=spec,
            seed=seed,
            initial=initial,
            transition=transition,
            emission=emission,
            support=support,
            rank_probs=rank_probs,
            successor_index=succ_index,
            initial_cdf=_cdf(initial),
            successor_cdf=_cdf(succ_weight),
            rank_cdf=_cdf(rank_probs),
        )

    @property
    def device(self) -> torch.device:
        return self.emission.device

    def to(self, device: torch.device | str) -> "HMM":
        """A copy with every tensor on ``device`` (the same object when already there)."""
        device = torch.device(device)
        if self.emission.device == device:
            return self
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name not in ("spec", "seed")}
        return replace(self, **moved)


def make_hmm(spec: HMMSpec, seed: int) -> HMM:
    """:meth:`HMM.draw`: the language of shape ``spec`` drawn from ``seed``."""
    return HMM.draw(spec, seed)


def _cdf(probs: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over the last dim with the last entry set to exactly 1 (inversion never runs off the end)."""
    cdf = probs.cumsum(dim=-1)
    cdf[..., -1] = 1.0
    return cdf


def _check_hmm(hmm: object) -> HMM:
    if not isinstance(hmm, HMM):
        raise TypeError(f"hmm: expected an HMM (from HMM.draw or make_hmm), got {type(hmm).__name__}")
    return hmm


# --------------------------------------------------------------------------- sampling


def _generator(seed_or_generator: object) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        if seed_or_generator.device.type != "cpu":
            raise ValueError(
                f"seed_or_generator: expected a CPU torch.Generator (samples must not depend on the device), "
                f"got one on {seed_or_generator.device}"
            )
        return seed_or_generator
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TypeError(
            f"seed_or_generator: expected an int seed >= 0 or a CPU torch.Generator, "
            f"got {type(seed_or_generator).__name__}"
        )
    return torch.Generator(device="cpu").manual_seed(_int("seed_or_generator", seed_or_generator, 0))


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each row of ``cdf`` (n, k) above ``u`` (n,): never a zero-probability entry."""
    return (cdf <= u[:, None]).sum(dim=-1).clamp_max(cdf.shape[-1] - 1)


def sample(hmm: HMM, n: int, seed_or_generator: int | torch.Generator, *, chunk_size: int = 8192) -> torch.Tensor:
    """``n`` sequences of ``spec.seq_len`` tokens: int64 ``(n, L)`` on ``hmm.device``.

    Each sequence takes ``2 L + 1`` float64 uniforms, in row order from a CPU generator
    (``seed_or_generator``: an int seed >= 0, or a CPU ``torch.Generator``, which this
    advances): the component (``floor(u M)``), the initial state, ``L`` token ranks and
    ``L - 1`` transitions, each by inverting a cumulative distribution.  The result is
    therefore the same on every device and for every ``chunk_size`` (sequences drawn at
    once; memory ``chunk_size (2 L + 1)`` float64), and its first rows do not depend on
    ``n``.
    """
    hmm = _check_hmm(hmm)
    n = _int("n", n, 0)
    chunk_size = _int("chunk_size", chunk_size, 1)
    gen = _generator(seed_or_generator)
    spec = hmm.spec
    L, M = spec.seq_len, spec.n_components
    out = torch.empty(n, L, dtype=torch.long, device=hmm.device)
    for start in range(0, n, chunk_size):
        rows = min(chunk_size, n - start)
        u = torch.rand(rows, 2 * L + 1, generator=gen, dtype=F64).to(hmm.device)
        comp = (u[:, 0] * M).long().clamp_max(M - 1)
        state = _invert(hmm.initial_cdf[comp], u[:, 1])
        states = torch.empty(rows, L, dtype=torch.long, device=hmm.device)
        states[:, 0] = state
        for t in range(1, L):
            j = _invert(hmm.successor_cdf[comp, state], u[:, L + 1 + t])
            state = hmm.successor_index[comp, state, j]
            states[:, t] = state
        # right=True counts the cdf entries <= u, i.e. the first rank whose cdf exceeds u.
        ranks = torch.searchsorted(hmm.rank_cdf, u[:, 2 : L + 2].contiguous(), right=True)
        ranks = ranks.clamp_max(hmm.rank_cdf.shape[0] - 1)
        out[start : start + rows] = hmm.support[states, ranks]
    return out


# --------------------------------------------------------------------------- forward algorithm


def _check_tokens(hmm: HMM, tokens: object, name: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (e.g. torch.long), got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (n, L) with L >= 1, got {tuple(tokens.shape)}")
    if tokens.device != hmm.device:
        raise ValueError(f"{name}: expected tokens on the language's device {hmm.device}, got {tokens.device}")
    V = hmm.spec.vocab_size
    # One host sync per call: negligible next to the L sequential steps, and an
    # out-of-range id would otherwise be a device-side assert on CUDA.
    if tokens.numel() > 0 and bool(((tokens < 0) | (tokens >= V)).any()):
        lo, hi = int(tokens.min()), int(tokens.max())
        raise ValueError(f"{name}: expected token ids in [0, {V}), got values in [{lo}, {hi}]")
    return tokens.long()


def _forward(
    hmm: HMM, tokens: torch.Tensor, *, prior: torch.Tensor | None = None, keep: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Normalised forward pass over checked ``tokens`` (n, L).

    Returns the predictive joint-state distributions ``q`` (n, L, M, K) (None unless
    ``keep``) and ``log c`` (n, L), ``c_t = P(x_t | x_<t)``.  ``prior`` (n, M, K)
    replaces ``initial / M`` as the distribution of the first hidden state.
    """
    n, L = tokens.shape
    M, K = hmm.spec.n_components, hmm.spec.n_states
    q = prior if prior is not None else (hmm.initial / M).expand(n, M, K)
    pred = torch.empty(n, L, M, K, dtype=F64, device=hmm.device) if keep else None
    log_c = torch.empty(n, L, dtype=F64, device=hmm.device)
    for t in range(L):
        if pred is not None:
            pred[:, t] = q
        f = q * hmm.emission.index_select(1, tokens[:, t]).T[:, None, :]
        c = f.sum(dim=(1, 2))
        log_c[:, t] = torch.log(c)
        ok = c > 0
        # An impossible token leaves the filter at its prior instead of 0/0.
        f = torch.where(ok[:, None, None], f / torch.where(ok, c, torch.ones_like(c))[:, None, None], q)
        if t + 1 < L:
            q = torch.bmm(f.transpose(0, 1), hmm.transition).transpose(0, 1)
    return pred, log_c


def state_predictive(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """``q`` (n, L, M K) float64: ``q[i, t, m K + k] = P(component m, state_t = k | x_<t)`` of sequence i.

    ``tokens``: int (n, L) on ``hmm.device``, any ``L >= 1`` (not only ``spec.seq_len``).
    Position 0 holds the prior ``initial / M``.  Memory ``n L M K`` float64; feed slices
    of it to :func:`token_probs` to bound the ``V``-sized memory.
    """
    hmm = _check_hmm(hmm)
    tokens = _check_tokens(hmm, tokens)
    pred, _ = _forward(hmm, tokens)
    assert pred is not None
    return pred.flatten(-2)


def token_probs(hmm: HMM, q: torch.Tensor) -> torch.Tensor:
    """``P(x = v) = sum_{m,k} q[..., m K + k] E[k, v]``: (..., M K) joint-state distributions to (..., V) token ones.

    The same as ``q @ emission_joint`` with the emission matrix tiled ``M`` times, but
    the components are summed first (``M`` times fewer multiply-adds, no tiled copy).
    Memory: the output, ``prod(...) V`` float64.
    """
    hmm = _check_hmm(hmm)
    M, K = hmm.spec.n_components, hmm.spec.n_states
    if not isinstance(q, torch.Tensor) or q.dim() == 0 or q.shape[-1] != M * K:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: expected a tensor of shape (..., {M * K}) (M K joint states), got {shape}")
    return q.to(F64).unflatten(-1, (M, K)).sum(dim=-2) @ hmm.emission


def next_token_probs(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """The exact ``P(x_t = v | x_<t)``: float64 (n, L, V) for int ``tokens`` (n, L).

    Row ``t`` (0-based) conditions on ``tokens[:, :t]``; row 0 is the first token's
    marginal.  Memory ``n L V`` float64 (16 MiB a sequence at V = 32768, L = 64): pass
    chunks of sequences, or use :func:`state_predictive` and :func:`token_probs` on
    slices of positions.
    """
    return token_probs(hmm, state_predictive(hmm, tokens))


def token_log_probs(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """``log P(x_t | x_<t)`` of the observed tokens: float64 (n, L), no ``V``-sized memory."""
    hmm = _check_hmm(hmm)
    tokens = _check_tokens(hmm, tokens)
    return _forward(hmm, tokens, keep=False)[1]


def log_likelihood(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """``log P(x_1 .. x_L) = sum_t log P(x_t | x_<t)``: float64 (n,); -inf for an impossible sequence."""
    return token_log_probs(hmm, tokens).sum(dim=1)


# --------------------------------------------------------------------------- scoring a model


def truth_sums(logits: torch.Tensor, truth: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """Sums over positions of a model's statistics against the true next-token distributions.

    Args:
        logits: (..., V) model logits, any float dtype (computed in float64), divided by
            ``temperature``: ``p = softmax(logits / T)``, ``conf, pred = max, argmax p``.
        truth: (..., V) the true distributions ``P`` (e.g. :func:`next_token_probs`),
            same shape and device; rows are assumed to sum to 1.

    Returns python floats, sums over the ``N`` rows, so that chunks merge by adding:

    * ``count``: ``N``;
    * ``entropy``: ``sum H(P) = -sum P log P`` (nats): the NLL floor of any model;
    * ``true_ce``: ``sum |conf - P(pred)|``: the numerator of the true calibration
      error (no bins, no labels);
    * ``true_kl``: ``sum KL(P || p) = sum P (log P - log p)`` (nats), entries with
      ``P = 0`` contributing 0 (``+inf`` where ``P > 0`` and ``p = 0``);
    * ``true_top1``: ``sum P(pred)``: the model's expected top-1 accuracy under the truth.

    The model's expected NLL is ``(entropy + true_kl) / count``.
    """
    logits = _checks.check_logits("logits", logits)
    t = _checks.check_temperature(temperature)
    if not isinstance(truth, torch.Tensor) or not truth.dtype.is_floating_point:
        raise TypeError(f"truth: expected a floating torch.Tensor, got {getattr(truth, 'dtype', type(truth).__name__)}")
    if truth.shape != logits.shape:
        raise ValueError(f"truth: expected the logits' shape {tuple(logits.shape)}, got {tuple(truth.shape)}")
    if truth.device != logits.device:
        raise ValueError(f"truth: expected the logits' device {logits.device}, got {truth.device}")
    V = logits.shape[-1]
    z = logits.reshape(-1, V).to(F64)
    P = truth.reshape(-1, V).to(F64)
    log_p = torch.log_softmax(z / t if t != 1.0 else z, dim=-1)
    conf, pred = log_p.max(dim=-1)
    p_pred = P.gather(1, pred[:, None]).squeeze(1)
    neg_entropy = torch.xlogy(P, P)
    # P log p only where P > 0: a masked logit (log p = -inf) under P = 0 is no error.
    cross = torch.where(P > 0, P * log_p, torch.zeros_like(P))
    return {
        "count": float(z.shape[0]),
        "entropy": float(-neg_entropy.sum()),
        "true_ce": float((conf.exp() - p_pred).abs().sum()),
        "true_kl": float((neg_entropy - cross).sum()),
        "true_top1": float(p_pred.sum()),
    }


# --------------------------------------------------------------------------- choosing a shape


def _state_marginals(hmm: HMM, L: int) -> torch.Tensor:
    """``pi`` (L, M, K): ``pi[t, m, k] = P(component m, state_t = k)`` with no observation."""
    M = hmm.spec.n_components
    pi = torch.empty(L, M, hmm.spec.n_states, dtype=F64, device=hmm.device)
    pi[0] = hmm.initial / M
    for t in range(1, L):
        pi[t] = torch.bmm(pi[t - 1][:, None, :], hmm.transition)[:, 0]
    return pi


def entropy_rate(
    hmm: HMM,
    n: int = 512,
    seed: int = 0,
    *,
    windows: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Monte-Carlo per-token statistics (nats) of ``n >= 2`` sequences sampled from ``seed``.

    Every cross-entropy is a mean over all ``n L`` positions of the sampled sequences:

    * ``entropy``: mean ``H(P(. | x_<t))``, the NLL floor (lower variance than ``nll``);
      ``entropy_se``: its standard error over sequences; ``entropy_last``: the same at
      the last position only (the floor with the longest context);
    * ``nll``: mean ``-log P(x_t | x_<t)``, another estimate of the floor;
    * ``unigram_ce``: ``-log u(x_t)`` with ``u`` the exact token marginal pooled over
      positions: the best context-free model (what unigram counts converge to);
    * ``bigram_ce``: ``-log B(x_t | x_{t-1})`` with ``B`` the exact bigram conditional
      pooled over positions, and the exact ``P(x_1)`` at position 0: the best bigram
      model with a beginning-of-sequence token;
    * ``window{w}_ce`` for ``w`` in ``windows``: ``-log P(x_t | x_{t-w} .. x_{t-1}, t)``,
      the best predictor that sees only the last ``w`` tokens and the position (the
      filter started from the state marginal at ``t - w``; full context when ``t < w``).
      How fast it falls to ``entropy`` tells how much context a model must use;
    * ``states_per_token``: mean number of states whose support holds a token (over
      tokens in some support): the ambiguity of a single token.

    Costs one :func:`next_token_probs` of ``n`` sequences, formed in 32 MiB blocks.
    """
    hmm = _check_hmm(hmm)
    n = _int("n", n, 2)
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise TypeError(f"windows: expected a sequence of ints >= 1, got {type(windows).__name__}")
    windows = [_int("windows", w, 1) for w in windows]
    spec = hmm.spec
    L, M, K, V = spec.seq_len, spec.n_components, spec.n_states, spec.vocab_size
    tokens = sample(hmm, n, seed)
    pred, log_c = _forward(hmm, tokens)
    assert pred is not None

    # Entropy of the true next-token distributions, V-sized rows formed a block at a time.
    q = pred.reshape(n * L, M * K)
    ent = torch.empty(n * L, dtype=F64, device=hmm.device)
    block = max(1, _BLOCK_ENTRIES // V)
    for a in range(0, n * L, block):
        p = token_probs(hmm, q[a : a + block])
        ent[a : a + block] = -torch.xlogy(p, p).sum(dim=-1)
    per_seq = ent.view(n, L).mean(dim=1)

    pi = _state_marginals(hmm, L)
    emission_at = lambda x: hmm.emission.index_select(1, x.reshape(-1)).T  # noqa: E731  (N, K)
    unigram = (pi.sum(dim=1).mean(dim=0) @ hmm.emission).index_select(0, tokens.reshape(-1))

    # Pooled bigram: B(b | a) = sum_{m,k} w_a(m, k) (T_m E)[k, b] with w_a ∝ rho(m, k) E[k, a]
    # and rho the state marginal pooled over the positions of a (0 .. L-2).
    first = (pi[0].sum(dim=0) @ hmm.emission).index_select(0, tokens[:, 0])
    bigram_log = [first.log()]
    if L > 1:
        rho = pi[:-1].mean(dim=0)  # (M, K)
        prev, nxt = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
        w = rho[None] * emission_at(prev)[:, None, :]  # (N, M, K)
        w = w / w.sum(dim=(1, 2), keepdim=True)
        te = torch.matmul(hmm.transition, emission_at(nxt).T)  # (M, K, N): (T_m E)[k, b_i]
        bigram_log.append((w * te.permute(2, 0, 1)).sum(dim=(1, 2)).log())
    bigram = torch.cat(bigram_log)

    out = {
        "entropy": float(ent.mean()),
        "entropy_se": float(per_seq.std() / math.sqrt(n)),
        "entropy_last": float(ent.view(n, L)[:, -1].mean()),
        "nll": float(-log_c.mean()),
        "unigram_ce": float(-unigram.log().mean()),
        "bigram_ce": float(-bigram.mean()),
    }
    for w in windows:
        if w >= L:
            out[f"window{w}_ce"] = out["nll"]
            continue
        span = tokens.unfold(1, w + 1, 1)  # (n, L - w, w + 1): x_{t-w} .. x_t for t = w .. L-1
        prior = pi[: L - w].expand(n, L - w, M, K).reshape(-1, M, K)
        _, win = _forward(hmm, span.reshape(-1, w + 1), prior=prior, keep=False)
        total = -log_c[:, :w].sum() - win[:, -1].sum()
        out[f"window{w}_ce"] = float(total / (n * L))
    covered = (hmm.emission > 0).sum(dim=0)
    out["states_per_token"] = float(covered[covered > 0].to(F64).mean())
    return out
