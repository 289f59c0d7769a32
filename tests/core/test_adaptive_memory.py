"""The adaptive policy's memory across sessions (warm start from a PolicyMemory) and what it
learns while cloud-only (shadow acceptance, RTT samples); against the seeded simulator."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from support.policy_sim import SimEnv, exploited_ks, noisy_env, simulate

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, Decision, RoundObservation

# ---------------------------------------------------------------------------------------------
# memory across sessions (warm start)


def _learnt(env: SimEnv, rounds: int = 80, **config) -> AdaptivePolicy:
    policy = AdaptivePolicy(AdaptiveConfig(**config))
    simulate(policy, env, rounds, seed=3)
    return policy


def test_warm_start_decides_from_the_first_round() -> None:
    """A long RTT where cloud-only wins: a cold policy spends its warm-up rounds speculating; one
    started from an earlier session's memory streams from the first decision, and a short link
    resumes at the k the earlier session settled on."""
    far = noisy_env(alpha=0.7, rtt_ms=200.0)
    cold = AdaptivePolicy()
    assert cold.choose().mode == SPECULATIVE and not cold.warm
    earlier = _learnt(far)
    assert earlier.mode == CLOUD_ONLY
    warm = AdaptivePolicy(AdaptiveConfig(), earlier.memory())
    assert warm.warm and warm.choose().mode == CLOUD_ONLY
    # over a short session the warm policy commits more per unit of time than the cold one
    rates = [simulate(p, far, 12, seed=5).tokens_per_s for p in (cold, warm)]
    assert rates[1] > 1.2 * rates[0]

    near = noisy_env(alpha=0.8, rtt_ms=5.0)
    settled = _learnt(near)
    resumed = AdaptivePolicy(AdaptiveConfig(), settled.memory())
    first = resumed.choose()
    assert first.mode == SPECULATIVE and first.k == settled.k
    assert abs(settled.k - near.best_k()) <= 1


def test_memory_is_a_copy_with_capped_acceptance_evidence() -> None:
    env = noisy_env(alpha=0.8)
    earlier = _learnt(env, rounds=200, acceptance_decay=1.0)
    memory = earlier.memory()
    assert memory.usable and memory.accept.trials > 200  # every position reached, undecayed
    before = (memory.accept.trials, memory.rtt.value, earlier.estimates())
    warm = AdaptivePolicy(AdaptiveConfig(memory_trials=40.0, allow_cloud_only=False), memory)
    assert warm.warm
    # the new session carries at most memory_trials trials, at the same rate
    assert warm._accept.trials == pytest.approx(40.0)
    assert warm._accept.pooled() == pytest.approx(earlier._accept.pooled(), abs=0.02)
    # its own rounds change neither the memory nor the policy that made it
    simulate(warm, noisy_env(alpha=0.3, rtt_ms=80.0), 40, seed=1)
    assert (memory.accept.trials, memory.rtt.value, earlier.estimates()) == before
    # and they overrule the memory: acceptance collapsed, the RTT quadrupled
    estimates = warm.estimates()
    assert estimates is not None
    assert estimates.alpha < 0.5 and estimates.cost.rtt_ms > 60.0


def test_unusable_or_wrong_memory() -> None:
    fresh = AdaptivePolicy().memory()  # nothing observed: no t_v fit, no RTT
    assert not fresh.usable
    policy = AdaptivePolicy(AdaptiveConfig(), fresh)
    assert not policy.warm and policy.choose() == Decision(SPECULATIVE, 4)
    with pytest.raises(ValueError, match="memory must be a PolicyMemory"):
        AdaptivePolicy(AdaptiveConfig(), {"k": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory_trials"):
        AdaptiveConfig(memory_trials=0.0)
    # a memory whose k lies outside this session's bounds is clipped; cloud-only only if allowed
    earlier = _learnt(noisy_env(alpha=0.7, rtt_ms=200.0))
    assert isinstance(earlier.memory(), PolicyMemory)
    speculative_only = AdaptivePolicy(
        AdaptiveConfig(k_max=2, k_init=2, allow_cloud_only=False), earlier.memory()
    )
    decision = speculative_only.choose()
    assert decision.mode == SPECULATIVE and 1 <= decision.k <= 2


# ---------------------------------------------------------------------------------------------
# shadow acceptance and RTT samples while cloud-only


def test_observe_shadow_cuts_matches_into_the_rounds_k_would_make() -> None:
    policy = AdaptivePolicy(AdaptiveConfig(k_init=4, alpha_prior=0.5, alpha_prior_weight=1e-6))
    policy.observe_shadow([True] * 12)  # rounds (4 of 4) at 0-3 and 5-8; 10-11 still open
    assert policy._accept.trials == pytest.approx(8.0) and policy._shadow_tail == [True, True]
    policy.observe_shadow([False])  # closes the open round: 2 accepted, then a rejection
    assert policy._accept.trials == pytest.approx(11.0)
    assert policy._accept.pooled() == pytest.approx(10.0 / 11.0, abs=1e-4)
    # bonus positions are no draft positions: after a rejection the next round starts one later
    policy = AdaptivePolicy(AdaptiveConfig(k_init=4, alpha_prior=0.5, alpha_prior_weight=1e-6))
    policy.observe_shadow([True, False, True, True, True, True, True])
    assert policy._accept.trials == pytest.approx(2.0 + 4.0)  # (k=4, 1) then (k=4, 4)
    # a long stream at a 0.7 match rate: the estimate follows it
    rng = random.Random(0)
    policy.observe_shadow([rng.random() < 0.7 for _ in range(4000)])
    assert policy.estimates() is None  # no timings yet: shadow rounds teach acceptance only
    assert policy._accept.pooled() == pytest.approx(0.7, abs=0.05)


def test_cloud_only_skips_probes_while_shadow_and_rtt_samples_arrive() -> None:
    far = noisy_env(alpha=0.7, rtt_ms=200.0)

    def cloud_policy() -> AdaptivePolicy:
        policy = AdaptivePolicy(AdaptiveConfig(), _learnt(far).memory())
        assert policy.mode == CLOUD_ONLY
        return policy

    fed, starved = cloud_policy(), cloud_policy()
    rng = random.Random(1)
    fed_probes = starved_probes = 0
    for _ in range(40):
        fed_probes += fed.choose().probe
        starved_probes += starved.choose().probe
        fed.observe_shadow([rng.random() < 0.7 for _ in range(8)])
        fed.observe_rtt(200.0 + rng.gauss(0.0, 2.0))
    assert fed_probes == 0 and starved_probes >= 4
    # the RTT falls to 5 ms: the pings show it, and the policy goes back to speculating
    modes = []
    for _ in range(12):
        fed.observe_rtt(5.0 + rng.gauss(0.0, 0.5))
        fed.observe_shadow([rng.random() < 0.7 for _ in range(8)])
        modes.append(fed.choose().mode)
    assert modes[-1] == SPECULATIVE and modes.index(SPECULATIVE) <= 4


def test_a_memory_of_a_few_rounds_seeds_the_estimates_but_decides_nothing() -> None:
    """One speculative round whose draft took 150x the usual (a first forward's one-time
    costs) leaves a usable memory. A session started from it as from a warm one would stream
    cloud-only at once (the negative control below); from so few rounds it runs its own warm-up
    instead, speculates, and its estimates leave the outlier behind."""
    env = noisy_env(alpha=0.8, rtt_ms=20.0, draft_ms=2.0)
    outlier = RoundObservation(k=1, accepted=1, draft_ms=300.0, verify_ms=21.0, network_ms=20.0)
    first = AdaptivePolicy()
    first.observe(outlier)
    memory = first.memory()
    assert memory.usable and memory.speculative_rounds == 1
    policy = AdaptivePolicy(AdaptiveConfig(), memory)
    assert not policy.warm and policy.choose() == Decision(SPECULATIVE, 4)
    result = simulate(policy, env, 30, seed=2)
    assert all(k > 0 for k in exploited_ks(result))
    estimates = policy.estimates()
    assert estimates is not None and estimates.cost.draft_ms < 5.0
    # the same memory, as if behind enough rounds: the session would have started cloud-only
    trusted = replace(memory, speculative_rounds=AdaptiveConfig().warmup_rounds)
    assert AdaptivePolicy(AdaptiveConfig(), trusted).choose().mode == CLOUD_ONLY
