"""Sampling through real (tiny) models: seeded generation is reproducible, and the first token
speculative decoding emits follows the target's distribution, not the draft's.

The per-position statistical test of the rejection sampler itself is in test_rejection_stats.py;
this one checks that Drafter/Verifier wire q, p and the generators together correctly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import chisquare
from support.tiny_models import tiny_model

from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs

V = 24
N_SAMPLES = 500
PROMPT = [3, 14, 15, 9, 2, 6]


@pytest.fixture(scope="module")
def runners():
    # Wide init: peaked, clearly different target and draft distributions (the test has power).
    target = ModelRunner(tiny_model("llama", V, seed=0, max_positions=128, init_range=0.3))
    draft = ModelRunner(tiny_model("llama", V, seed=1, max_positions=128, init_range=0.3))
    return target, draft


@pytest.mark.slow
def test_seeded_generation_is_reproducible(runners):
    target, draft = runners
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1234)
    first = generate(target, draft, PROMPT, params, k=3)
    again = generate(target, draft, PROMPT, params, k=3)
    assert first.tokens == again.tokens and len(first.tokens) == 16
    assert first.stats.drafted > 0
    others = set()
    for seed in range(5):
        result = generate(target, draft, PROMPT, dataclasses.replace(params, seed=seed), k=3)
        others.add(tuple(result.tokens))
    assert len(others) > 1  # the seed matters
    auto = generate_autoregressive(target, PROMPT, params)
    assert auto.tokens == generate_autoregressive(target, PROMPT, params).tokens


def _pooled_chisquare(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of counts against probs, bins with expected < 5 pooled into one (0.0 when a
    token of probability 0 was drawn)."""
    expected = probs.double() / probs.double().sum() * counts.sum()
    big = expected >= 5
    obs = [*counts[big].tolist(), float(counts[~big].sum())]
    exp = [*expected[big].tolist(), float(expected[~big].sum())]
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0  # a token with probability 0 was emitted
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=2, sampler="rejection"),  # dense q
        SamplingParams(temperature=0.8, top_k=6, max_new_tokens=2, sampler="rejection"),  # sparse q
    ],
    ids=["dense", "top_k"],
)
def test_first_token_follows_target_distribution(runners, params):
    """max_new_tokens=2 with k=2 drafts one token: the first output token is an accepted draft
    token or a recovered token, so its law is exactly what rejection sampling produces."""
    target, draft = runners
    with torch.inference_mode():
        p = logits_to_probs(target.prefill(PROMPT), params)  # (V,)
        q = logits_to_probs(draft.prefill(PROMPT), params)  # (V,)
    counts = torch.zeros(V)
    accepted = 0
    for seed in range(N_SAMPLES):
        result = generate(target, draft, PROMPT, dataclasses.replace(params, seed=seed), k=2)
        counts[result.tokens[0]] += 1
        accepted += result.stats.accepted
    assert 0 < accepted < N_SAMPLES  # both accepted draft tokens and recovered tokens occur
    assert _pooled_chisquare(counts, p) > 1e-3
    assert _pooled_chisquare(counts, q) < 1e-3  # the draft's own law is clearly rejected
