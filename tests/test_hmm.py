"""The hidden-Markov-model language: exact forward algorithm, sampling, structure, truth scores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdbench.experiments import hmm as H
from kdbench.experiments.hmm import (
    HMM,
    HMMSpec,
    entropy_rate,
    log_likelihood,
    make_hmm,
    next_token_probs,
    sample,
    state_predictive,
    token_log_probs,
    token_probs,
    truth_sums,
)

# (n_states, n_components, emission_support, successors): full supports, a mixture, partial
# supports, and a deterministic cycle with partial supports under which some sequences are impossible.
TINY = {
    "K2": (2, 1, None, 2),
    "K2_mixture": (2, 2, None, 2),
    "K3_mixture_partial_support": (3, 2, 2, 2),
    "K2_cycle_partial_support": (2, 1, 2, 1),
}
TINY_V, TINY_L = 3, 4


def _tiny(name: str, seed: int = 0) -> HMM:
    K, M, S, s = TINY[name]
    spec = HMMSpec(vocab_size=TINY_V, n_states=K, seq_len=TINY_L, successors=s, emission_support=S, n_components=M)
    return make_hmm(spec, seed)


def _all_sequences() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(TINY_V), repeat=TINY_L)))


def _brute_force(hmm: HMM, seqs: torch.Tensor) -> list[float]:
    """P(x) by summing over every component and hidden path explicitly."""
    M, K = hmm.spec.n_components, hmm.spec.n_states
    init, trans, emit = hmm.initial.tolist(), hmm.transition.tolist(), hmm.emission.tolist()
    out = []
    for x in seqs.tolist():
        total = 0.0
        for m in range(M):
            for z in itertools.product(range(K), repeat=len(x)):
                p = init[m][z[0]] * emit[z[0]][x[0]] / M
                for t in range(1, len(x)):
                    p *= trans[m][z[t - 1]][z[t]] * emit[z[t]][x[t]]
                total += p
        out.append(total)
    return out


def _index(seqs: torch.Tensor) -> torch.Tensor:
    """Each sequence's position in the lexicographic order of _all_sequences."""
    weights = TINY_V ** torch.arange(seqs.shape[1] - 1, -1, -1)
    return (seqs * weights).sum(dim=1)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(TINY))
def test_forward_matches_brute_force_enumeration(name: str) -> None:
    hmm = _tiny(name)
    seqs = _all_sequences()
    joint = _brute_force(hmm, seqs)
    assert math.isclose(sum(joint), 1.0, abs_tol=1e-12)

    ll = log_likelihood(hmm, seqs)
    for lp, p in zip(ll.tolist(), joint):
        if p == 0.0:
            assert lp == -math.inf
        else:
            assert abs(math.exp(lp) - p) <= 1e-12

    probs = next_token_probs(hmm, seqs)
    assert probs.shape == (len(seqs), TINY_L, TINY_V) and probs.dtype == torch.float64
    prefix: dict[tuple[int, ...], float] = {}
    for x, p in zip(seqs.tolist(), joint):
        for t in range(TINY_L + 1):
            prefix[tuple(x[:t])] = prefix.get(tuple(x[:t]), 0.0) + p
    checked = 0
    for i, x in enumerate(seqs.tolist()):
        for t in range(TINY_L):
            below = prefix[tuple(x[:t])]
            if below == 0.0:  # an impossible context has no conditional
                continue
            for v in range(TINY_V):
                expected = prefix[tuple(x[:t]) + (v,)] / below
                assert abs(float(probs[i, t, v]) - expected) <= 1e-12
                checked += 1
    assert checked > 0
    if name == "K2_cycle_partial_support":
        assert 0.0 in joint  # the impossible sequences are covered too
    assert torch.allclose(probs.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["K2", "K2_mixture"])
def test_sample_frequencies_match_exact_probabilities(name: str) -> None:
    hmm = _tiny(name)
    exact = log_likelihood(hmm, _all_sequences()).exp()
    n = 200_000
    counts = torch.bincount(_index(sample(hmm, n, 123)), minlength=TINY_V**TINY_L).to(torch.float64)
    expected = n * exact
    sigma = (n * exact * (1 - exact)).sqrt()
    assert bool(((counts - expected).abs() <= 5 * sigma + 1).all())
    # Pearson chi-square over the well-populated cells; 7 sd above its mean fails with p < 1e-9.
    big = expected >= 5
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    dof = int(big.sum()) - 1
    assert chi2 < dof + 7 * math.sqrt(2 * dof)


def test_samples_are_possible_under_partial_supports() -> None:
    spec = HMMSpec(vocab_size=50, n_states=6, seq_len=16, successors=2, emission_support=5, n_components=4)
    hmm = make_hmm(spec, 2)
    x = sample(hmm, 4000, 0)
    assert x.shape == (4000, 16) and x.dtype == torch.long
    assert bool(torch.isfinite(log_likelihood(hmm, x)).all())
    assert set(x.unique().tolist()) <= set(hmm.support.flatten().tolist())


# --------------------------------------------------------------------------- determinism


def _fields_equal(a: HMM, b: HMM) -> bool:
    names = ("initial", "transition", "emission", "support", "rank_probs", "successor_index",
             "initial_cdf", "successor_cdf", "rank_cdf")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in names)


def test_draw_and_sample_are_deterministic() -> None:
    spec = HMMSpec(vocab_size=300, n_states=8, seq_len=12, successors=3, n_components=2)
    a, b, c = make_hmm(spec, 7), HMM.draw(spec, 7), make_hmm(spec, 8)
    assert _fields_equal(a, b)
    assert not torch.equal(a.emission, c.emission) and not torch.equal(a.transition, c.transition)

    x = sample(a, 100, 5)
    assert torch.equal(x, sample(b, 100, 5))
    assert not torch.equal(x, sample(a, 100, 6))
    for chunk in (1, 7, 100, 1000):
        assert torch.equal(x, sample(a, 100, 5, chunk_size=chunk))
    assert torch.equal(x[:30], sample(a, 30, 5))  # the first rows do not depend on n
    assert torch.equal(x, sample(a, 100, torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(5)
    first, second = sample(a, 50, gen), sample(a, 50, gen)
    assert torch.equal(first, x[:50]) and not torch.equal(first, second)  # a generator advances
    assert sample(a, 0, 5).shape == (0, 12)
    assert a.to("cpu") is a


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    spec = HMMSpec(vocab_size=500, n_states=8, seq_len=20, successors=2, n_components=3)
    cpu = make_hmm(spec, 1)
    gpu = cpu.to("cuda")
    assert gpu.device.type == "cuda"
    x = sample(cpu, 64, 3)
    assert torch.equal(sample(gpu, 64, 3).cpu(), x)
    assert torch.allclose(next_token_probs(gpu, x.cuda()).cpu(), next_token_probs(cpu, x), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- structure


def test_structure() -> None:
    spec = HMMSpec(vocab_size=200, n_states=16, seq_len=8, successors=3, emission_support=30,
                   zipf_exponent=1.5, n_components=3)
    hmm = make_hmm(spec, 4)
    M, K, V, S, s = 3, 16, 200, 30, 3
    one = torch.ones((), dtype=torch.float64)
    assert hmm.initial.shape == (M, K) and hmm.transition.shape == (M, K, K) and hmm.emission.shape == (K, V)
    for t in (hmm.initial, hmm.transition, hmm.emission):
        assert t.dtype == torch.float64 and bool((t >= 0).all())
        assert torch.allclose(t.sum(-1), one, atol=1e-12, rtol=0)
    assert bool(((hmm.transition > 0).sum(-1) == s).all())
    nz = (hmm.transition > 0).nonzero()[:, 2].view(M, K, s)
    assert torch.equal(nz, hmm.successor_index)
    assert bool(((hmm.emission > 0).sum(-1) == S).all())
    assert hmm.support.shape == (K, S)
    assert all(len(set(row)) == S for row in hmm.support.tolist())
    assert torch.equal(hmm.emission.gather(1, hmm.support), hmm.rank_probs.expand(K, S))
    assert math.isclose(float(hmm.rank_probs[0] / hmm.rank_probs[1]), 2**1.5, rel_tol=1e-12)
    assert bool((hmm.rank_probs[:-1] > hmm.rank_probs[1:]).all())
    # Irreducible: every state reaches every state within K steps in every component.
    step = (hmm.transition > 0).to(torch.float64)
    reach = torch.eye(K, dtype=torch.float64).expand(M, K, K)
    for _ in range(K):
        reach = ((reach + reach @ step) > 0).to(torch.float64)
    assert bool((reach > 0).all())
    # Supports overlap: some token lies in more than one support.
    assert int((hmm.emission > 0).sum(0).max()) > 1
    for cdf in (hmm.initial_cdf, hmm.successor_cdf, hmm.rank_cdf):
        assert bool((cdf[..., -1] == 1.0).all())


def test_default_emission_support() -> None:
    assert HMMSpec(vocab_size=1024).emission_support == 128
    assert HMMSpec(vocab_size=100).emission_support == 12
    assert HMMSpec(vocab_size=3).emission_support == 3
    assert HMMSpec(vocab_size=3, n_states=2, successors=1, emission_support=2).emission_support == 2
    assert HMMSpec(vocab_size=64) == HMMSpec(vocab_size=64, emission_support=8)
    assert HMMSpec(vocab_size=8, n_states=5).joint_states == 5
    assert HMMSpec(vocab_size=8, n_states=5, n_components=3).joint_states == 15


def test_large_vocabulary() -> None:
    spec = HMMSpec(vocab_size=131072, n_states=8, seq_len=6, successors=2)
    hmm = make_hmm(spec, 0)
    assert spec.emission_support == 16384
    assert hmm.emission.shape == (8, 131072) and hmm.support.shape == (8, 16384)
    assert torch.allclose(hmm.emission.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12, rtol=0)
    x = sample(hmm, 2, 0)
    assert x.shape == (2, 6) and int(x.max()) < 131072
    p = next_token_probs(hmm, x)
    assert p.shape == (2, 6, 131072)
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12, rtol=0)
    assert bool(torch.isfinite(log_likelihood(hmm, x)).all())


# --------------------------------------------------------------------------- forward algorithm


def test_probabilities_normalised_and_consistent() -> None:
    spec = HMMSpec(vocab_size=40, n_states=5, seq_len=10, successors=2, emission_support=6, n_components=2)
    hmm = make_hmm(spec, 3)
    x = sample(hmm, 20, 1)
    q = state_predictive(hmm, x)
    assert q.shape == (20, 10, 10)
    one = torch.ones((), dtype=torch.float64)
    assert torch.allclose(q.sum(-1), one, atol=1e-12, rtol=0)
    assert torch.allclose(q[:, 0], (hmm.initial / 2).flatten().expand(20, 10), atol=0, rtol=0)
    p = next_token_probs(hmm, x)
    assert torch.allclose(p.sum(-1), one, atol=1e-12, rtol=0)
    assert torch.allclose(token_probs(hmm, q[:, 3:7]), p[:, 3:7], atol=1e-15, rtol=0)
    # The same as multiplying by the emission matrix tiled over the components.
    assert torch.allclose(q @ hmm.emission.repeat(2, 1), p, atol=1e-15, rtol=0)
    lp = token_log_probs(hmm, x)
    assert torch.allclose(lp, p.gather(2, x[..., None]).squeeze(2).log(), atol=1e-12, rtol=0)
    assert torch.allclose(log_likelihood(hmm, x), lp.sum(1), atol=1e-12, rtol=0)
    # A prefix's probabilities do not depend on what follows it, and any length is accepted.
    assert torch.allclose(next_token_probs(hmm, x[:, :4]), p[:, :4], atol=1e-15, rtol=0)


def test_no_underflow_on_long_sequences() -> None:
    spec = HMMSpec(vocab_size=64, n_states=8, seq_len=512, successors=2, n_components=2)
    hmm = make_hmm(spec, 0)
    x = sample(hmm, 4, 0)
    ll = log_likelihood(hmm, x)
    assert bool(torch.isfinite(ll).all())
    assert float(ll.max()) < -800  # exp(ll) is below the float64 range: only the normalisation saves it
    p = next_token_probs(hmm, x)
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- truth_sums


def _random_truth(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, v, generator=g, dtype=torch.float64) ** 3
    w[torch.rand(n, v, generator=g) < 0.3] = 0.0
    w[:, 0] += 1e-3  # no all-zero row
    return w / w.sum(-1, keepdim=True)


def test_truth_sums_against_direct_computation() -> None:
    N, V = 50, 7
    truth = _random_truth(N, V, 0)
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(1)) * 2
    got = truth_sums(logits, truth)
    ent = kl = ce = top1 = 0.0
    for z, P in zip(logits.double().tolist(), truth.tolist()):
        mx = max(z)
        lse = mx + math.log(sum(math.exp(a - mx) for a in z))
        logp = [a - lse for a in z]
        pred = max(range(V), key=lambda i: (logp[i], -i))
        ent -= sum(p * math.log(p) for p in P if p > 0)
        kl += sum(p * (math.log(p) - lp) for p, lp in zip(P, logp) if p > 0)
        ce += abs(math.exp(logp[pred]) - P[pred])
        top1 += P[pred]
    assert got["count"] == N
    for key, value in (("entropy", ent), ("true_kl", kl), ("true_ce", ce), ("true_top1", top1)):
        assert math.isclose(got[key], value, rel_tol=1e-10, abs_tol=1e-12), key
    assert got["true_kl"] > 0

    # Temperature divides the logits; sums over two chunks add up to the whole.
    scaled = truth_sums(logits.double() * 2.5, truth, temperature=2.5)  # float64: no rounding of the product
    for key in got:
        assert math.isclose(scaled[key], got[key], rel_tol=1e-9, abs_tol=1e-12), key
    a, b = truth_sums(logits[:20], truth[:20]), truth_sums(logits[20:], truth[20:])
    for key in got:
        assert math.isclose(a[key] + b[key], got[key], rel_tol=1e-12, abs_tol=1e-12), key
    # Leading dims are flattened; bfloat16 logits are computed in float64.
    shaped = truth_sums(logits.view(5, 10, V), truth.view(5, 10, V))
    assert shaped == got
    half = truth_sums(logits.bfloat16(), truth)
    direct = truth_sums(logits.bfloat16().double(), truth)
    assert half == direct


def test_truth_sums_zero_for_the_truth() -> None:
    truth = _random_truth(40, 9, 3)
    assert bool((truth == 0).any())
    got = truth_sums(truth.log(), truth)  # -inf logits where the truth is 0
    assert abs(got["true_kl"]) < 1e-12 and got["true_ce"] < 1e-12
    assert math.isclose(got["true_top1"], float(truth.max(-1).values.sum()), rel_tol=1e-12)
    assert math.isclose(got["entropy"], float(-torch.xlogy(truth, truth).sum()), rel_tol=1e-12)
    # The exact next-token distributions of a language score 0 against themselves too.
    hmm = make_hmm(HMMSpec(vocab_size=30, n_states=4, seq_len=6, successors=2, emission_support=5), 0)
    p = next_token_probs(hmm, sample(hmm, 8, 0))
    got = truth_sums(p.log().float(), p)
    assert abs(got["true_kl"]) < 1e-5 and got["true_ce"] < 1e-5 and got["count"] == 48


# --------------------------------------------------------------------------- entropy_rate


def test_entropy_rate_single_state_is_iid_zipf() -> None:
    spec = HMMSpec(vocab_size=100, n_states=1, seq_len=8, successors=1, emission_support=20)
    hmm = make_hmm(spec, 0)
    zipf_entropy = float(-torch.xlogy(hmm.rank_probs, hmm.rank_probs).sum())
    r = entropy_rate(hmm, n=400, seed=1)
    assert math.isclose(r["entropy"], zipf_entropy, rel_tol=1e-12)
    assert math.isclose(r["entropy_last"], zipf_entropy, rel_tol=1e-12)
    assert r["entropy_se"] < 1e-12
    for key in ("nll", "unigram_ce", "bigram_ce", "window1_ce", "window8_ce"):
        assert math.isclose(r[key], r["nll"], rel_tol=1e-12), key  # every model is the truth here
    assert abs(r["nll"] - zipf_entropy) < 0.1
    assert r["states_per_token"] == 1.0


@pytest.mark.parametrize("name", ["K2", "K2_mixture"])
def test_entropy_rate_against_enumeration(name: str) -> None:
    """Each Monte-Carlo estimate against its exact expectation over the 81 sequences."""
    hmm = _tiny(name)
    seqs = _all_sequences()
    p_seq = log_likelihood(hmm, seqs).exp()
    probs = next_token_probs(hmm, seqs)
    L = TINY_L

    def expect(per_position: torch.Tensor) -> float:  # (81, L) -> E over sequences of the position mean
        return float((p_seq[:, None] * per_position).sum() / L)

    entropy = expect(-torch.xlogy(probs, probs).sum(-1))
    nll = expect(-token_log_probs(hmm, seqs))

    # Pooled unigram and bigram, and the position-aware one-token window, from the exact joint.
    unigram = torch.zeros(TINY_V, dtype=torch.float64)
    pair_t = torch.zeros(L, TINY_V, TINY_V, dtype=torch.float64)
    for t in range(L):
        unigram.index_add_(0, seqs[:, t], p_seq)
        if t > 0:
            pair_t[t].index_put_((seqs[:, t - 1], seqs[:, t]), p_seq, accumulate=True)
    pair = pair_t[1:].sum(0)
    unigram /= L
    bigram = pair / pair.sum(1, keepdim=True)
    window1 = pair_t / pair_t.sum(2, keepdim=True).clamp_min(1e-300)
    first = probs[:, 0].gather(1, seqs[:, :1]).squeeze(1)
    uni_ce = expect(-unigram[seqs].log())
    big_lp = torch.stack([first.log()] + [bigram[seqs[:, t - 1], seqs[:, t]].log() for t in range(1, L)], 1)
    win_lp = torch.stack([first.log()] + [window1[t, seqs[:, t - 1], seqs[:, t]].log() for t in range(1, L)], 1)

    r = entropy_rate(hmm, n=20000, seed=4, windows=(1, 2, 8))
    tol = 0.02  # about 5 standard errors of 80000 tokens
    assert abs(r["entropy"] - entropy) < tol
    assert abs(r["nll"] - nll) < tol
    assert abs(r["unigram_ce"] - uni_ce) < tol
    assert abs(r["bigram_ce"] - expect(-big_lp)) < tol
    assert abs(r["window1_ce"] - expect(-win_lp)) < tol
    assert r["window8_ce"] == r["nll"]  # a window longer than the sequence is the full context
    assert entropy <= expect(-win_lp) + 1e-12 <= expect(-big_lp) + 2e-12 <= uni_ce + 3e-12


def test_entropy_rate_context_matters() -> None:
    spec = HMMSpec(vocab_size=256, n_states=16, seq_len=32, successors=2, n_components=2)
    r = entropy_rate(make_hmm(spec, 0), n=256, seed=0)
    assert r["entropy"] < r["window4_ce"] <= r["window2_ce"] <= r["window1_ce"] <= r["bigram_ce"] < r["unigram_ce"]
    assert abs(r["entropy"] - r["nll"]) < 5 * r["entropy_se"] + 0.02
    assert r["states_per_token"] > 1.5


# --------------------------------------------------------------------------- argument checks

SPEC_OK = dict(vocab_size=10, n_states=4, seq_len=5, successors=2)


@pytest.mark.parametrize(
    "changes, field",
    [
        pytest.param({"vocab_size": 0}, "vocab_size", id="vocab_size_zero"),
        pytest.param({"n_states": 0}, "n_states", id="n_states_zero"),
        pytest.param({"seq_len": 0}, "seq_len", id="seq_len_zero"),
        pytest.param({"successors": 0}, "successors", id="successors_zero"),
        pytest.param({"successors": 5}, "successors", id="successors_above_n_states"),
        pytest.param({"emission_support": 0}, "emission_support", id="emission_support_zero"),
        pytest.param({"emission_support": 11}, "emission_support", id="emission_support_above_vocab"),
        pytest.param({"zipf_exponent": 0.0}, "zipf_exponent", id="zipf_zero"),
        pytest.param({"zipf_exponent": -1.0}, "zipf_exponent", id="zipf_negative"),
        pytest.param({"zipf_exponent": math.inf}, "zipf_exponent", id="zipf_inf"),
        pytest.param({"zipf_exponent": math.nan}, "zipf_exponent", id="zipf_nan"),
        pytest.param({"n_components": 0}, "n_components", id="n_components_zero"),
    ],
)
def test_spec_rejects_bad_values(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        HMMSpec(**{**SPEC_OK, **changes})


@pytest.mark.parametrize(
    "changes, field",
    [
        pytest.param({"vocab_size": 10.0}, "vocab_size", id="vocab_size_float"),
        pytest.param({"n_states": True}, "n_states", id="n_states_bool"),
        pytest.param({"emission_support": "3"}, "emission_support", id="emission_support_str"),
        pytest.param({"zipf_exponent": "1"}, "zipf_exponent", id="zipf_str"),
    ],
)
def test_spec_rejects_bad_types(changes: dict, field: str) -> None:
    with pytest.raises(TypeError, match=f"^{field}: "):
        HMMSpec(**{**SPEC_OK, **changes})


_HMM = make_hmm(HMMSpec(**SPEC_OK), 0)
_X = sample(_HMM, 3, 0)


@pytest.mark.parametrize(
    "call, field",
    [
        pytest.param(lambda: make_hmm(HMMSpec(**SPEC_OK), -1), "seed", id="draw_negative_seed"),
        pytest.param(lambda: sample(_HMM, -1, 0), "n", id="sample_negative_n"),
        pytest.param(lambda: sample(_HMM, 3, -2), "seed_or_generator", id="sample_negative_seed"),
        pytest.param(lambda: sample(_HMM, 3, 0, chunk_size=0), "chunk_size", id="sample_chunk_zero"),
        pytest.param(lambda: next_token_probs(_HMM, _X + 10), "tokens", id="tokens_out_of_range"),
        pytest.param(lambda: next_token_probs(_HMM, _X - 1), "tokens", id="tokens_negative"),
        pytest.param(lambda: log_likelihood(_HMM, _X[0]), "tokens", id="tokens_1d"),
        pytest.param(lambda: state_predictive(_HMM, _X[:, :0]), "tokens", id="tokens_empty_length"),
        pytest.param(lambda: token_probs(_HMM, torch.ones(3, 5, dtype=torch.float64)), "q", id="q_wrong_states"),
        pytest.param(lambda: truth_sums(torch.zeros(4, 3), torch.zeros(4, 2)), "truth", id="truth_shape"),
        pytest.param(lambda: truth_sums(torch.zeros(4, 3), torch.zeros(4, 3), 0.0), "temperature", id="temp_zero"),
        pytest.param(lambda: entropy_rate(_HMM, n=1), "n", id="entropy_rate_n"),
        pytest.param(lambda: entropy_rate(_HMM, windows=(2, 0)), "windows", id="entropy_rate_window_zero"),
    ],
)
def test_functions_reject_bad_values(call, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        call()


@pytest.mark.parametrize(
    "call, field",
    [
        pytest.param(lambda: make_hmm({"vocab_size": 3}, 0), "spec", id="draw_spec_dict"),
        pytest.param(lambda: sample(_HMM, 3, 1.5), "seed_or_generator", id="sample_float_seed"),
        pytest.param(lambda: sample("hmm", 3, 0), "hmm", id="sample_not_hmm"),
        pytest.param(lambda: next_token_probs(_HMM, _X.double()), "tokens", id="tokens_float"),
        pytest.param(lambda: truth_sums(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3)), "logits",
                     id="logits_int"),
        pytest.param(lambda: truth_sums(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long)), "truth",
                     id="truth_int"),
    ],
)
def test_functions_reject_bad_types(call, field: str) -> None:
    with pytest.raises(TypeError, match=f"^{field}: "):
        call()


def test_module_exports() -> None:
    for name in H.__all__:
        assert hasattr(H, name)
