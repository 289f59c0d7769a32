"""The adaptive policy at a generation's end: the rounds a finite generation costs beyond its
steady rate (`overshoot_rounds`), and streaming the last tokens cloud-only when that finishes
first (`AdaptivePolicy.choose(tokens_left=...)`). Seeded simulations; no wall-clock."""

from __future__ import annotations

import random
import statistics

import pytest
from support.policy_sim import SimEnv, noisy_env, simulate

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import expected_tokens_per_position, overshoot_rounds
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    Decision,
    DraftLengthPolicy,
    RoundObservation,
)

# ---------------------------------------------------------------------------------------------
# overshoot_rounds


@pytest.mark.parametrize("k", [1, 4, 9])
def test_overshoot_of_a_constant_round(k: int) -> None:
    # every round commits k + 1 tokens: the last one overshoots by k/2 on average
    assert overshoot_rounds([1.0] * k, k) == pytest.approx(k / (2 * (k + 1)))
    assert overshoot_rounds([0.0] * k, k) == 0.0  # one token per round: no overshoot


@pytest.mark.parametrize(
    "probs", [(0.8,) * 8, (0.6, 0.9, 0.9, 0.95, 0.95, 0.95), (0.95,) * 12, (0.3, 0.5)]
)
def test_overshoot_matches_counted_rounds(probs: tuple[float, ...]) -> None:
    # rounds to commit n tokens, counted over Bernoulli rounds, against n / E(k) + overshoot
    k, n, runs = len(probs), 64, 4000
    rng = random.Random(3)
    counts = []
    for _ in range(runs):
        committed = rounds = 0
        while committed < n:
            accepted = 0
            while accepted < k and rng.random() < probs[accepted]:
                accepted += 1
            committed += accepted + 1
            rounds += 1
        counts.append(rounds)
    predicted = n / expected_tokens_per_position(probs, k) + overshoot_rounds(probs, k)
    sem = statistics.stdev(counts) / runs**0.5
    assert statistics.fmean(counts) == pytest.approx(predicted, abs=4 * sem + 0.02)
    # the control: the steady rate alone misses the last round's cost (by more than the error)
    if overshoot_rounds(probs, k) > 0.4:
        assert abs(statistics.fmean(counts) - n / expected_tokens_per_position(probs, k)) > 4 * sem


# ---------------------------------------------------------------------------------------------
# the last tokens cloud-only


def _warm(env: SimEnv) -> AdaptivePolicy:
    """A policy starting from what a long session on `env` learnt (no warm-up)."""
    long = AdaptivePolicy()
    simulate(long, env, 300, seed=11)
    return AdaptivePolicy(AdaptiveConfig(), long.memory())


class _Blind:
    """A policy that is never told the tokens left (how every session ran before)."""

    def __init__(self, policy: DraftLengthPolicy) -> None:
        self.policy = policy

    def choose(self, tokens_left: int | None = None) -> Decision:
        return self.policy.choose()

    def observe(self, obs: RoundObservation) -> None:
        self.policy.observe(obs)


def _generations(env: SimEnv, horizon: bool, tokens: int = 64, seeds: int = 40) -> list[float]:
    """Wall ms of `seeds` generations of `tokens` tokens by warm policies; `horizon`: the policy
    is told the tokens left (otherwise it sees only rounds, as before)."""
    times = []
    for seed in range(seeds):
        policy: DraftLengthPolicy = _warm(env)
        if not horizon:
            policy = _Blind(policy)
        result = simulate(policy, env, 1000, seed=seed, max_tokens=tokens)
        assert result.tokens == tokens
        times.append(result.time_ms)
    return times


# 200 ms RTT, a 70B-class target's ~30 ms forwards, a draft of ~6.5 ms per token and high
# acceptance: the steady speculative rate is a few % over cloud-only mode's, so a session keeps
# speculating; over 64 tokens its ends make it slower than streaming.
LONG_LINK = noisy_env(
    alpha=0.93, draft_ms=6.5, rtt_ms=200.0, verify_base_ms=30.0, verify_per_token_ms=0.2
)
SHORT_LINK = noisy_env(
    alpha=0.93, draft_ms=6.5, rtt_ms=20.0, verify_base_ms=30.0, verify_per_token_ms=0.2
)


def test_a_long_link_streams_the_last_tokens() -> None:
    warm = _warm(LONG_LINK)
    assert warm.mode == SPECULATIVE  # the steady rates favour speculating
    assert warm.choose(tokens_left=64).mode == CLOUD_ONLY
    stream_ms = LONG_LINK.cost.rtt_ms + 64 * LONG_LINK.cost.cloud_ms_per_token()
    told = statistics.fmean(_generations(LONG_LINK, horizon=True))
    blind = statistics.fmean(_generations(LONG_LINK, horizon=False))
    assert told < 0.97 * blind  # the rule saves what the ends cost (~6%)
    assert told < 1.03 * stream_ms  # and comes within noise of streaming it all
    # the mode carried to the next session is still the steady one
    assert warm.memory().mode == SPECULATIVE


def test_a_short_link_keeps_speculating_to_the_end() -> None:
    # the control: where speculating is far faster, being told the horizon changes nothing
    # but (perhaps) the very last tokens
    told = _generations(SHORT_LINK, horizon=True)
    blind = _generations(SHORT_LINK, horizon=False)
    assert statistics.fmean(told) <= 1.01 * statistics.fmean(blind)
    policy = _warm(SHORT_LINK)
    assert policy.choose(tokens_left=64).mode == SPECULATIVE
    assert policy.choose(tokens_left=8).mode == SPECULATIVE


def test_streaming_the_rest_is_kept_to_the_end_then_forgotten() -> None:
    policy = _warm(LONG_LINK)
    assert policy.choose(tokens_left=64).mode == CLOUD_ONLY
    later = policy.choose(tokens_left=40)
    assert later.mode == CLOUD_ONLY and later.stream_tokens == 40 and not later.probe
    # a policy reused for another generation (more tokens left) decides afresh
    assert policy.choose(tokens_left=2000).mode == SPECULATIVE


def test_the_last_token_is_not_streamed_for_nothing() -> None:
    # one token left costs one round trip and one forward either way (a round that drafts
    # nothing, or a stream of one): no reason to switch, even on the long link
    policy = _warm(LONG_LINK)
    assert policy.choose(tokens_left=1).mode == SPECULATIVE


def test_tokens_left_is_validated() -> None:
    with pytest.raises(ValueError, match="tokens_left"):
        AdaptivePolicy().choose(tokens_left=0)
