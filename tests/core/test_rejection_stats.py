"""Statistical proof that the rejection sampler is exact: emitted tokens follow the target.

Pure tensors, no models. A synthetic chain of K positions over a small vocabulary has fixed
target distributions p_0..p_K and draft distributions q_0..q_{K-1}, both made by
`logits_to_probs` with the same SamplingParams from related random logits. Tens of thousands
of rounds go through `rejection_sample` (the batched math `verify` wraps; `test_rejection.py`
checks that `verify` is exactly that wrapper) and, for every position i, the token emitted at
i in the rounds that reach i (all earlier draft tokens accepted) must follow p_i; the bonus
token, in the rounds accepting all K, must follow p_K. Chi-square goodness of fit, alpha = 1e-4
per test.

Bonferroni: about 100 goodness-of-fit tests run here, so a correct sampler fails one of them
by chance with probability <= 100 * 1e-4 = 1%. All seeds are fixed, so the outcome is
deterministic: it either always passes or always fails. Negative controls (a verifier that
always accepts, one that resamples from p instead of the residual) must fail the same test,
which shows it has the power to catch a wrong sampler.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from edgespec.core.params import SamplingParams
from edgespec.core.rejection import (
    DraftProbs,
    Verification,
    recovered_probs,
    rejection_sample,
    verify,
)
from edgespec.core.sampling import categorical, logits_to_probs, make_generator

ALPHA = 1e-4
K = 4  # draft tokens per round
V = 12  # vocabulary
ROUNDS = 40_000
MIN_REACHED = 500  # a position reached fewer times than this would make a weak test


# ---------------------------------------------------------------- the exact identity


def _identity_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for trial in range(20):
        p = torch.softmax(torch.randn(V, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
        cases.append((f"dense{trial}", p, q))
        holes = q.clone()
        holes[:4] = 0  # q has zeros where p > 0: only the residual can produce those tokens
        cases.append((f"holes{trial}", p, holes / holes.sum()))
        sparse = torch.zeros(V)
        sparse[torch.randperm(V, generator=g)[:2]] = torch.tensor([0.7, 0.3])
        cases.append((f"sparse{trial}", p, sparse))
        truncated_p = p * (p >= p.median())  # p itself with zeros, q full support
        cases.append((f"p_holes{trial}", truncated_p / truncated_p.sum(), q))
    p = torch.softmax(torch.randn(V, generator=g), -1)
    cases.append(("q_equals_p", p, p.clone()))
    cases.append(("q_one_hot", p, torch.nn.functional.one_hot(torch.tensor(3), V).float()))
    cases.append(("p_one_hot", torch.nn.functional.one_hot(torch.tensor(5), V).float(), p))
    return cases


IDENTITY_CASES = _identity_cases()


@pytest.mark.parametrize(("name", "p", "q"), IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_accept_plus_recover_equals_target_exactly(name, p, q):
    """q(x) min(1, p(x)/q(x)) + (1 - sum_y q(y) min(1, p(y)/q(y))) norm(max(p - q, 0))(x) == p(x)."""
    accept = torch.where(q > 0, q * torch.clamp(p / q, max=1.0), torch.zeros_like(q))
    emitted = accept + (1 - accept.sum()) * recovered_probs(p, q)
    assert torch.allclose(emitted, p, atol=1e-6), name


# ---------------------------------------------------------------- simulation helpers


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())  # stable across runs, unlike hash()


def _chain(params: SamplingParams, seed: int, noise: float = 0.5):
    """Target p (K+1, V) and draft q (K, V): the same params, draft logits = target + noise."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(K + 1, V, generator=g) * 2
    draft_logits = target_logits[:K] + torch.randn(K, V, generator=g) * noise
    return logits_to_probs(target_logits, params), logits_to_probs(draft_logits, params)


def _draw(q: torch.Tensor, rounds: int, g: torch.Generator) -> torch.Tensor:
    """Draft tokens (rounds, K), x_i ~ q_i independently."""
    return torch.stack([categorical(q[i].expand(rounds, V), g) for i in range(K)], dim=1)


def _draw_sparse(sparse: DraftProbs, rounds: int, g: torch.Generator) -> torch.Tensor:
    """Draft tokens drawn the way a sparse-q drafter would: an entry of the sparse row, its id."""
    cols = [categorical(sparse.probs[i].expand(rounds, -1), g) for i in range(K)]
    return torch.stack([sparse.ids[i][c] for i, c in enumerate(cols)], dim=1)


def _emitted_counts(draft, accepted, token) -> list[torch.Tensor]:
    """Per position i, the counts (V,) of the token emitted at i over the rounds reaching i."""
    counts = []
    for i in range(K + 1):
        reached = accepted >= i
        at_i = torch.where(accepted > i, draft[:, min(i, K - 1)], token)  # draft token or last
        counts.append(torch.bincount(at_i[reached], minlength=V))
    return counts


def _gof_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of `counts` (V,) against `probs` (V,); cells expecting < 5 merged.

    0.0 when a token of target probability 0 was emitted: no sampling luck explains that.
    """
    obs = counts.double().numpy()
    p = probs.double().numpy()
    if obs[p == 0].sum() > 0:
        return 0.0
    obs, p = obs[p > 0], p[p > 0]
    exp = obs.sum() * p / p.sum()
    order = np.argsort(exp)
    obs, exp = obs[order], exp[order]  # ascending expectation
    n_small = int((exp < 5).sum())
    if n_small and exp[:n_small].sum() < 5:
        n_small += 1  # the small cells together still expect < 5: the next cell joins them
    n_small = min(n_small, len(exp))
    if n_small >= 2:
        obs = np.concatenate([[obs[:n_small].sum()], obs[n_small:]])
        exp = np.concatenate([[exp[:n_small].sum()], exp[n_small:]])
    if len(exp) < 2:
        return 1.0  # all the mass on one cell: nothing left to test beyond the zero check
    return float(chisquare(obs, exp).pvalue)


def _pvalues(draft, accepted, token, p) -> list[float]:
    counts = _emitted_counts(draft, accepted, token)
    for i, c in enumerate(counts):
        assert int(c.sum()) >= MIN_REACHED, f"position {i} reached only {int(c.sum())} times"
    return [_gof_pvalue(c, p[i]) for i, c in enumerate(counts)]


def _expand(p, q, rounds):
    return p.expand(rounds, K + 1, V), None if q is None else q.expand(rounds, K, V)


# ---------------------------------------------------------------- goodness of fit

TEMPERATURES = (0.5, 1.0, 1.5)
VARIANTS = {"plain": {}, "top_k": {"top_k": 5}, "top_p": {"top_p": 0.8}}
PARAM_GRID = [
    (f"t{t}-{name}", SamplingParams(temperature=t, **extra))
    for t in TEMPERATURES
    for name, extra in VARIANTS.items()
]
TRUNCATED = [(name, params) for name, params in PARAM_GRID if not name.endswith("plain")]


@pytest.mark.parametrize(("name", "params"), PARAM_GRID, ids=[n for n, _ in PARAM_GRID])
def test_dense_q_emits_target_distribution(name, params):
    p, q = _chain(params, seed=_seed(name))
    g = make_generator(11)
    draft = _draw(q, ROUNDS, g)
    accepted, token = rejection_sample(draft, *_expand(p, q, ROUNDS), g)
    pvalues = _pvalues(draft, accepted, token, p)
    assert min(pvalues) > ALPHA, pvalues


@pytest.mark.parametrize(("name", "params"), TRUNCATED, ids=[n for n, _ in TRUNCATED])
def test_sparse_q_emits_target_distribution(name, params):
    p, q = _chain(params, seed=_seed("sparse" + name))
    sparse = DraftProbs.from_probs_sparse(q)
    assert sparse.probs.shape[1] < V  # really sparse: a truncated q
    g = make_generator(12)
    draft = _draw_sparse(sparse, ROUNDS, g)
    accepted, token = rejection_sample(draft, *_expand(p, sparse.to_dense(V), ROUNDS), g)
    pvalues = _pvalues(draft, accepted, token, p)
    assert min(pvalues) > ALPHA, pvalues


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_greedy_drafting_emits_target_distribution(temperature):
    """q = None: the draft tokens are the draft model's argmax, a deterministic proposal."""
    params = SamplingParams(temperature=temperature)
    p, q = _chain(params, seed=7, noise=0.5)
    draft = q.argmax(-1).expand(ROUNDS, K)  # (ROUNDS, K), the same proposal every round
    g = make_generator(13)
    accepted, token = rejection_sample(draft, *_expand(p, None, ROUNDS), g)
    pvalues = _pvalues(draft, accepted, token, p)
    assert min(pvalues) > ALPHA, pvalues


@pytest.mark.slow
def test_verify_itself_emits_target_distribution():
    """The same check, a round at a time through `verify` with a sparse q (fewer rounds)."""
    rounds = 6_000
    p, q = _chain(SamplingParams(temperature=1.0, top_k=6), seed=21, noise=0.5)
    sparse = DraftProbs.from_probs_sparse(q)
    g = make_generator(14)
    draft = _draw_sparse(sparse, rounds, g)
    results = [verify(draft[r], p, sparse, g) for r in range(rounds)]
    accepted = torch.tensor([v.accepted for v in results])
    token = torch.tensor([v.token for v in results])
    assert all(v.is_bonus == (v.accepted == K) for v in results)
    pvalues = _pvalues(draft, accepted, token, p)
    assert min(pvalues) > ALPHA, pvalues


@pytest.mark.parametrize("draft_temperature", [None, 1.0])
def test_greedy_target_emits_exactly_its_argmax(draft_temperature):
    """Greedy target: every emitted token is the target's argmax, whatever the draft did."""
    p, _ = _chain(SamplingParams(), seed=3)
    if draft_temperature is None:  # greedy drafting from an unrelated model: q = None
        draft = torch.randint(0, V, (ROUNDS, K), generator=torch.Generator().manual_seed(1))
        draft[: ROUNDS // 2] = p[:K].argmax(-1)  # half the rounds propose the right tokens
        q = None
    else:
        _, q = _chain(SamplingParams(temperature=draft_temperature), seed=3, noise=0.5)
        draft = _draw(q, ROUNDS, make_generator(2))
    accepted, token = rejection_sample(draft, *_expand(p, q, ROUNDS), make_generator(15))
    argmax = p.argmax(-1)  # (K+1,)
    for i, counts in enumerate(_emitted_counts(draft, accepted, token)):
        assert int(counts.sum()) > 0
        assert int(counts[argmax[i]]) == int(counts.sum()), f"position {i} left the argmax"


# ---------------------------------------------------------------- negative controls


def _always_accept(draft, p, q, g):
    """Broken: accepts every draft token, so position i emits q_i instead of p_i."""
    batch = draft.shape[0]
    return torch.full((batch,), K), categorical(p[:, K], g)


def _resample_from_target(draft, p, q, g):
    """Broken: on rejection draws from p instead of the residual max(p - q, 0)."""
    p_draft = p[:, :K].gather(-1, draft[..., None])[..., 0]
    q_draft = q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(draft.shape, generator=g)
    accepted = (u * q_draft < p_draft).long().cumprod(-1).sum(-1)
    rows = p.gather(1, accepted.view(-1, 1, 1).expand(-1, 1, V))[:, 0]
    return accepted, categorical(rows, g)


@pytest.mark.parametrize("broken", [_always_accept, _resample_from_target])
@pytest.mark.parametrize(("name", "params"), PARAM_GRID, ids=[n for n, _ in PARAM_GRID])
def test_negative_control_broken_verifier_fails(broken, name, params):
    """The dense-q test above, same chains and seeds, must reject a wrong verifier."""
    p, q = _chain(params, seed=_seed(name))
    g = make_generator(11)
    draft = _draw(q, ROUNDS, g)
    accepted, token = broken(draft, *_expand(p, q, ROUNDS), g)
    pvalues = _pvalues(draft, accepted, token, p)
    assert min(pvalues) < ALPHA, pvalues


# ---------------------------------------------------------------- reproducibility


def test_seeded_verify_is_reproducible():
    p, q = _chain(SamplingParams(temperature=1.0, top_p=0.9), seed=5)
    draft = _draw(q, 200, make_generator(0))

    def run(seed: int) -> list[Verification]:
        g = make_generator(seed)
        return [verify(draft[r], p, DraftProbs.dense(q), g) for r in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)
