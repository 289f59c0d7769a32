"""Coupled sampling (edgespec.core.coupling): the noise is pinned by test vectors, the sampler is
exact per position (chi-square against the target's exact marginals, with a negative control),
and co-located speculative decoding reproduces the target alone token for token whatever the
draft length, the draft's own params, pipelining or cloud-only decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.stats import chi_square_p
from support.tiny_models import noisy_draft, tiny_model

from edgespec.core.coupling import (
    coupled_tokens,
    gumbel_noise,
    noise_bits,
    noise_bits_reference,
)
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs
from edgespec.core.session import DraftBlock
from edgespec.core.verifier import Verifier

# (seed, position, token id) -> the 32 noise bits. The definition of the noise, pinned: another
# implementation (a GPU build, another language) must reproduce these exactly.
VECTORS = [
    (0, 0, 0, 3830755560),
    (0, 0, 1, 2600210710),
    (1, 0, 0, 2179834300),
    (2**64 - 1, 2**32 - 1, 131071, 3540600810),
    (42, 17, 5, 1888420601),
    (12345678901234567890, 1000, 50256, 1250174957),
]


@pytest.mark.parametrize(("seed", "position", "token", "bits"), VECTORS)
def test_noise_test_vectors(seed, position, token, bits):
    assert noise_bits_reference(seed, position, token) == bits
    assert int(noise_bits(seed, [position], token + 1)[0, token]) == bits


def test_vectorised_noise_equals_the_reference():
    positions = [0, 1, 7, 2**31, 2**32 - 1]
    for seed in (0, 1, 2**32, 2**63, 2**64 - 1, 987654321):
        bits = noise_bits(seed, positions, 300)
        assert bits.dtype == torch.int64 and bool(((bits >= 0) & (bits < 2**32)).all())
        for i, t in enumerate(positions):
            for v in (0, 1, 2, 150, 299):
                assert int(bits[i, v]) == noise_bits_reference(seed, t, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_is_bit_identical_on_cuda():
    cpu = noise_bits(2**64 - 5, [0, 9, 4096], 131072)
    assert torch.equal(noise_bits(2**64 - 5, [0, 9, 4096], 131072, "cuda").cpu(), cpu)


def test_noise_rejects_out_of_range_inputs():
    with pytest.raises(ValueError, match="seed"):
        noise_bits(2**64, [0], 4)
    with pytest.raises(ValueError, match="position"):
        noise_bits(1, [2**32], 4)


def test_gumbel_noise_is_standard_gumbel():
    g = gumbel_noise(7, range(64), 4096).flatten()  # 262,144 draws
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(float(g.mean()) - 0.5772157) < 0.01
    assert abs(float(g.var()) - 1.6449341) < 0.02
    assert bool(torch.isfinite(g).all())


def test_greedy_params_take_the_argmax():
    logits = torch.randn(3, 50)
    tokens = coupled_tokens(logits, SamplingParams(), seed=3, positions=[4, 5, 6])
    assert torch.equal(tokens, logits.argmax(-1))


# ---------------------------------------------------------------- exactness per position

V = 16
PROMPT = [3, 14, 15, 9, 2, 6]
N_SEEDS = 1000
POSITIONS = 3


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", V, seed=0, max_positions=64, init_range=0.3)
    draft = tiny_model("llama", V, seed=1, max_positions=64, init_range=0.3)
    return target, draft


def _exact_marginals(model, params: SamplingParams, depth: int) -> list[torch.Tensor]:
    """The law of the token at each of the first `depth` generated positions under `params`
    (summing over every earlier generated token: V^j prefixes at position j)."""
    marginals = []
    prefixes = torch.tensor([PROMPT])  # (n, len)
    weights = torch.ones(1, dtype=torch.float64)  # probability of each prefix
    with torch.inference_mode():
        for _ in range(depth):
            logits = model(prefixes).logits[:, -1]  # (n, V)
            probs = logits_to_probs(logits, params).double()  # (n, V)
            joint = weights[:, None] * probs  # (n, V)
            marginals.append(joint.sum(0))
            prefixes = torch.cat(
                [prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]],
                dim=1,
            )
            weights = joint.flatten()
    return marginals


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=POSITIONS),
        SamplingParams(temperature=0.7, top_k=5, max_new_tokens=POSITIONS),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=POSITIONS),
    ],
    ids=["t1", "t0.7-topk5", "t1.3-topp0.9"],
)
def test_each_position_follows_the_target_distribution(pair, params):
    """Speculative decoding (k = 2) under coupled sampling, over many seeds: the token at each of
    the first positions follows the target's exact marginal there (chi-square, p > 1e-3); the
    draft alone with the same seeds (same noise, its own logits) is rejected by the same test."""
    target, draft = pair
    t_runner, d_runner = ModelRunner(target), ModelRunner(draft)
    spec_counts = [dict[int, int]() for _ in range(POSITIONS)]
    draft_counts = [dict[int, int]() for _ in range(POSITIONS)]
    for seed in range(N_SEEDS):
        seeded = dataclasses.replace(params, seed=seed)
        spec = generate(t_runner, d_runner, PROMPT, seeded, k=2).tokens
        own = generate_autoregressive(d_runner, PROMPT, seeded).tokens
        for j in range(POSITIONS):
            spec_counts[j][spec[j]] = spec_counts[j].get(spec[j], 0) + 1
            draft_counts[j][own[j]] = draft_counts[j].get(own[j], 0) + 1
    for j, marginal in enumerate(_exact_marginals(target, params, POSITIONS)):
        assert chi_square_p(spec_counts[j], marginal, N_SEEDS) > 1e-3, f"position {j}"
        assert chi_square_p(draft_counts[j], marginal, N_SEEDS) < 1e-3, f"control at {j}"


# ---------------------------------------------------------------- drafter invariance

ARCH_PAIRS = ("gpt2", "llama")
PARAMS = {
    "t0.7": SamplingParams(temperature=0.7, max_new_tokens=24, seed=11),
    "t1.0": SamplingParams(temperature=1.0, max_new_tokens=24, seed=2**64 - 1),
    "t1.3": SamplingParams(temperature=1.3, max_new_tokens=24, seed=5),
    "topk20": SamplingParams(temperature=1.0, top_k=20, max_new_tokens=24, seed=6),
    "topp0.9": SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, seed=7),
}
WIDE_V = 64


@pytest.fixture(scope="module", params=ARCH_PAIRS)
def runners(request):
    target = tiny_model(request.param, WIDE_V, seed=0, max_positions=128, head_scale=4.0)
    return ModelRunner(target), ModelRunner(noisy_draft(target, 0.3))


def _pipelined(target, draft, params, k):
    """Drive a Drafter/Verifier pair with pipelining: a block drafted ahead of every verdict."""
    drafter = Drafter(draft, PROMPT, params)
    verifier = Verifier(target, PROMPT, params)
    hits = 0
    block = drafter.propose(k)
    while not drafter.finished:
        drafter.propose_ahead(k)
        drafter.apply(verifier.verify(block))
        hits += bool(drafter.last_ahead_hit)
        if drafter.finished:
            break
        block = drafter.pending if drafter.pending is not None else drafter.propose(k)
    return drafter.generated, hits


def _cloud_only(target, draft, params):
    """Cloud-only decode blocks of 5 tokens, with the draft shadowing the committed tokens."""
    drafter = Drafter(draft, PROMPT, params)
    verifier = Verifier(target, PROMPT, params)
    matches = []
    while not drafter.finished:
        block = drafter.propose_decode(min(5, drafter.tokens_left))
        pending = verifier.prepare(block)
        assert pending is not None
        drafter.apply(verifier.complete(pending, target.extend(pending.feed)))
        while drafter.pending is block and not drafter.finished:
            step = verifier.continue_decode()
            drafter.apply(verifier.complete(step, target.extend(step.feed)))
        matches += drafter.shadow_matches()
    return drafter.generated, matches


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_output_is_the_target_alone_whatever_the_drafting(runners, name):
    target, draft = runners
    params = PARAMS[name]
    reference = generate_autoregressive(target, PROMPT, params)
    assert reference.seed == params.seed and len(reference.tokens) == 24
    accepted = 0
    for k in (0, 1, 4, 8):
        result = generate(target, draft, PROMPT, params, k=k)
        assert result.tokens == reference.tokens, f"k={k}"
        accepted += result.stats.accepted
    assert accepted > 0  # the draft's coupled proposals do get accepted
    greedy_draft = Drafter(
        draft, PROMPT, params, draft_params=dataclasses.replace(params, temperature=0)
    )
    verifier = Verifier(target, PROMPT, params)
    while not greedy_draft.finished:
        greedy_draft.apply(verifier.verify(greedy_draft.propose(3)))
    assert greedy_draft.generated == reference.tokens
    assert _pipelined(target, draft, params, 3)[0] == reference.tokens
    tokens, matches = _cloud_only(target, draft, params)
    assert tokens == reference.tokens and any(matches)


def test_pipelined_guesses_are_the_drafts_coupled_tokens_and_hit(runners):
    """The guessed bonus token is the draft's coupled proposal, so guesses do come true."""
    target, draft = runners
    hits = sum(_pipelined(target, draft, params, 2)[1] for params in PARAMS.values())
    assert hits > 0


def test_blocks_carry_no_q_and_a_seed_is_drawn_when_missing(runners):
    target, draft = runners
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    drafter = Drafter(draft, PROMPT, params)
    assert drafter.params.seed is not None and drafter.propose(4).draft_probs is None
    result = generate(target, draft, PROMPT, params, k=3)
    assert result.seed is not None
    again = generate_autoregressive(target, PROMPT, dataclasses.replace(params, seed=result.seed))
    assert again.tokens == result.tokens


def test_shadow_matches_are_the_coupled_acceptance(runners):
    """Cloud-only: the draft's coupled proposal at each committed position vs the committed token
    is exactly whether a draft token there would have been accepted."""
    target, draft = runners
    params = PARAMS["t1.0"]
    _, matches = _cloud_only(target, draft, params)
    reference = generate_autoregressive(target, PROMPT, params).tokens
    own = []
    for j in range(len(reference)):
        context = PROMPT + reference[:j]
        logits = draft.prefill(context)[None]
        own.append(
            int(coupled_tokens(logits, params, params.seed, [len(context)])[0]) == reference[j]
        )
    assert matches == own[: len(matches)] and len(matches) >= len(own) - 5


def test_verifier_refuses_q_under_coupled_sampling(runners):
    target, _ = runners
    verifier = Verifier(target, PROMPT, SamplingParams(temperature=1.0, seed=1))
    q = DraftProbs.dense(torch.full((1, WIDE_V), 1.0 / WIDE_V))
    with pytest.raises(ValueError, match="draft_probs must be absent"):
        verifier.verify(DraftBlock(seq=0, base_len=len(PROMPT), tokens=(1,), draft_probs=q))


def test_different_seeds_give_different_outputs(runners):
    target, _ = runners
    outputs = {
        tuple(
            generate_autoregressive(
                target, PROMPT, dataclasses.replace(PARAMS["t1.0"], seed=s)
            ).tokens
        )
        for s in range(4)
    }
    assert len(outputs) > 1


def test_positions_are_absolute(runners):
    """The noise is keyed by the absolute position, so resuming from a committed prefix (what a
    failover does) continues the same output."""
    target, draft = runners
    params = PARAMS["t0.7"]
    reference = generate_autoregressive(target, PROMPT, params).tokens
    resumed = generate(
        target,
        draft,
        PROMPT + reference[:10],
        dataclasses.replace(params, max_new_tokens=14),
        k=3,
    )
    assert resumed.tokens == reference[10:]
