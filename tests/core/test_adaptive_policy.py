"""The adaptive draft-length policy run against the simulator (seeded, so every assertion is
deterministic; no wall-clock): convergence to the best k, RTT shifts, jitter, exploration,
switching to cloud-only and back, k bounds."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
from support.policy_sim import (
    SimEnv,
    SimResult,
    SimRound,
    exploited_ks,
    k_changes,
    noisy_env,
    simulate,
)

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import best_k, expected_tokens
from edgespec.core.estimators import AffineFit
from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, FixedPolicy, RoundObservation

# ---------------------------------------------------------------------------------------------
# the adaptive policy against the simulator


def _committed(r: SimRound) -> int:
    """Tokens one simulated round committed (a round that only verified: the last token)."""
    if r.observation is None:
        return 1
    assert r.observation.tokens is not None
    return r.observation.tokens


def test_simulate_is_deterministic_and_counts_tokens() -> None:
    env = noisy_env(rtt_spike_prob=0.02, rtt_spike_ms=60.0)
    a = simulate(AdaptivePolicy(), env, 300, seed=7)
    b = simulate(AdaptivePolicy(), env, 300, seed=7)
    assert a == b
    assert a.tokens == sum(_committed(r) for r in a.rounds)
    assert a.time_ms == pytest.approx(sum(r.wall_ms for r in a.rounds))
    assert simulate(AdaptivePolicy(), env, 300, seed=8) != a


def test_simulator_matches_the_model() -> None:
    # a fixed k's simulated throughput is the model's E(k)/T(k), within sampling error
    env = noisy_env(alpha=0.75, rtt_ms=30.0)
    result = simulate(FixedPolicy(5), env, 4000, seed=1)
    assert result.tokens / 4000 == pytest.approx(expected_tokens(0.75, 5), rel=0.03)
    assert result.tokens_per_s == pytest.approx(env.speculative_rate(5), rel=0.03)


CONVERGENCE_ENVS = {
    "lan": noisy_env(0.8, rtt_ms=5.0, verify_base_ms=15.0),
    "wan-low-acceptance": noisy_env(0.6, draft_ms=1.0, rtt_ms=20.0, verify_base_ms=30.0,
                               verify_per_token_ms=2.0),
    "high-acceptance": noisy_env(0.9, draft_ms=3.0, rtt_ms=20.0, verify_base_ms=15.0,
                            verify_per_token_ms=1.5),
    "position-dependent": noisy_env((0.5, 0.95), rtt_ms=20.0),
}  # fmt: skip
# E(k)/T(k) is sharply peaked in the first two (k_opt +/- 2 lose > 3%) and flat near the top in
# the others (high acceptance: E(k) saturates slowly): there several k are within 1-2% of the
# optimum, noisy estimates cannot tell them apart, and it does not matter which is picked.
PEAKED, FLAT = ("lan", "wan-low-acceptance"), ("high-acceptance", "position-dependent")


@pytest.mark.parametrize("name", PEAKED)
def test_adaptive_converges_to_the_optimal_k(name: str) -> None:
    env = CONVERGENCE_ENVS[name]
    optimum = env.best_k()
    best = env.speculative_rate(optimum)
    assert env.speculative_rate(optimum + 2) < 0.97 * best  # a peaked curve: +/-1 is meaningful
    assert env.speculative_rate(optimum - 2) < 0.97 * best
    assert best > env.cost.cloud_rate()  # a speculative optimum
    for seed in (0, 1):
        result = simulate(AdaptivePolicy(), env, 1500, seed=seed)
        settled = exploited_ks(result, start=300)
        assert CLOUD_ONLY not in result.modes[300:]
        within = sum(abs(k - optimum) <= 1 for k in settled) / len(settled)
        assert within >= 0.9, (seed, optimum, Counter(settled))
        assert abs(Counter(settled).most_common(1)[0][0] - optimum) <= 1


@pytest.mark.parametrize("name", FLAT)
def test_adaptive_converges_to_a_near_optimal_k_on_a_flat_curve(name: str) -> None:
    env = CONVERGENCE_ENVS[name]
    best = env.speculative_rate(env.best_k())
    for seed in (0, 1):
        result = simulate(AdaptivePolicy(), env, 1500, seed=seed)
        settled = exploited_ks(result, start=300)
        assert CLOUD_ONLY not in result.modes[300:]
        near = sum(env.speculative_rate(k) >= 0.97 * best for k in settled) / len(settled)
        assert near >= 0.9, (seed, env.best_k(), Counter(settled))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERGENCE_ENVS))
def test_adaptive_throughput_near_the_best_fixed_k(name: str) -> None:
    env = CONVERGENCE_ENVS[name]
    adaptive = simulate(AdaptivePolicy(), env, 1500, seed=1)
    best_fixed = max(simulate(FixedPolicy(k), env, 1500, seed=1).tokens_per_s for k in range(1, 17))
    assert adaptive.tokens_per_s >= 0.95 * best_fixed


def test_per_position_acceptance_beats_the_iid_model() -> None:
    # position 1 is hard, later ones easy: the i.i.d. model fitted to the same rounds (pooled
    # alpha) wants a short block, the true optimum is a long one, and the policy finds it
    env = CONVERGENCE_ENVS["position-dependent"]
    policy = AdaptivePolicy()
    result = simulate(policy, env, 1500, seed=0)
    estimates = policy.estimates()
    assert estimates is not None
    assert estimates.accept_probs[0] == pytest.approx(0.5, abs=0.08)
    assert statistics.mean(estimates.accept_probs[1:]) == pytest.approx(0.95, abs=0.04)
    iid_k = best_k(env.cost, estimates.alpha)
    assert env.best_k() >= iid_k + 4
    assert statistics.median(exploited_ks(result, start=300)) >= iid_k + 4


def test_estimates_recover_the_true_parameters() -> None:
    env = noisy_env(
        alpha=0.75, draft_ms=3.0, rtt_ms=40.0, verify_base_ms=25.0, verify_per_token_ms=1.5
    )
    policy = AdaptivePolicy(AdaptiveConfig(allow_cloud_only=False))  # every round speculative
    simulate(policy, env, 1000, seed=2)
    est = policy.estimates()
    assert est is not None and est.speculative_rounds == 1000
    assert est.alpha == pytest.approx(0.75, abs=0.05)
    assert max(abs(p - 0.75) for p in est.accept_probs[:4]) < 0.1
    assert est.cost.draft_ms == pytest.approx(3.0, rel=0.05)
    assert est.cost.rtt_ms == pytest.approx(40.0, rel=0.1)
    assert est.cost.verify_ms(8) == pytest.approx(env.cost.verify_ms(8), rel=0.05)
    assert est.cost.verify_per_token_ms == pytest.approx(1.5, abs=0.6)
    assert est.cost.cloud_ms_per_token() == pytest.approx(26.5, rel=0.1)


def test_k_follows_rtt_level_shifts() -> None:
    # RTT 10 -> 100 -> 30 ms: the optimum moves 4 -> 7 -> 5. Within a few rounds of each shift
    # the policy's k is near-optimal again (it is not dragged along by an average over both).
    def env(rtt: float) -> SimEnv:
        return noisy_env(0.7, draft_ms=2.0, rtt_ms=rtt, verify_base_ms=20.0)

    def schedule(i: int) -> SimEnv:
        return env(10.0 if i < 400 else 100.0 if i < 800 else 30.0)

    assert [env(rtt).best_k() for rtt in (10.0, 100.0, 30.0)] == [4, 7, 5]
    config = AdaptiveConfig(allow_cloud_only=False)  # this test is about k
    for seed in (0, 2, 3):
        result = simulate(AdaptivePolicy(config), schedule, 1200, seed=seed)
        for start, rtt in ((400, 100.0), (800, 30.0)):
            e = env(rtt)
            best = e.speculative_rate(e.best_k())
            after = result.rounds[start + 10 : start + 400]
            slow = [r.decision.k for r in after if not r.decision.probe]
            assert all(e.speculative_rate(k) >= 0.95 * best for k in slow), (seed, rtt)
        means = [statistics.mean(exploited_ks(result, s, s + 400)) for s in (0, 400, 800)]
        assert means[1] > means[2] > means[0] - 0.5, means


@pytest.mark.slow
def test_k_is_stable_under_jitter() -> None:
    # heavy jitter and 2% spikes of +3 RTT around a fixed level: k barely moves
    for seed in range(3):
        env = noisy_env(0.8, rtt_ms=30.0, rtt_jitter_ms=6.0, rtt_spike_prob=0.02, rtt_spike_ms=90.0)
        result = simulate(AdaptivePolicy(), env, 2000, seed=seed)
        settled = exploited_ks(result, start=100)
        assert k_changes(settled) <= 5, Counter(settled)
        assert CLOUD_ONLY not in result.modes


def test_exploration_is_bounded_and_can_be_disabled() -> None:
    env = noisy_env(0.8, rtt_ms=30.0)
    result = simulate(AdaptivePolicy(), env, 800, seed=0)
    probes = [r.decision for r in result.rounds if r.decision.probe]
    assert 0 < len(probes) <= 800 / 8 + 1
    result = simulate(AdaptivePolicy(AdaptiveConfig(explore_every=0)), env, 800, seed=0)
    assert not any(r.decision.probe for r in result.rounds)


def _switch_delays(
    good: SimEnv, bad: SimEnv, seed: int, start: int = 300, stop: int = 600
) -> tuple[int, int, SimResult]:
    """Rounds from `start` (good -> bad) to the first cloud-only step, and from `stop` (bad ->
    good) to the first non-probe speculative round; also the run."""
    result = simulate(AdaptivePolicy(), lambda i: bad if start <= i < stop else good, 900, seed)
    rounds = result.rounds
    to_cloud = next(i for i in range(start, stop) if rounds[i].decision.mode == CLOUD_ONLY)
    back = next(
        i
        for i in range(stop, len(rounds))
        if rounds[i].decision.mode == SPECULATIVE and not rounds[i].decision.probe
    )
    return to_cloud - start, back - stop, result


@pytest.mark.parametrize(
    ("bad_kind", "max_to_cloud", "max_back"),
    [
        ("slow-edge", 8, 12),  # t_d 2 -> 30 ms: drafting costs more than it saves
        ("low-acceptance", 20, 40),  # alpha 0.8 -> 0.2: the draft model stops being useful
        ("long-rtt", 8, 12),  # RTT 20 -> 250 ms
    ],
)
def test_switches_to_cloud_only_and_back(bad_kind: str, max_to_cloud: int, max_back: int) -> None:
    good = noisy_env(0.8)
    bad = {
        "slow-edge": noisy_env(0.8, draft_ms=30.0),
        "low-acceptance": noisy_env(0.2),
        "long-rtt": noisy_env(0.8, rtt_ms=250.0),
    }[bad_kind]
    assert good.speculative_rate(good.best_k()) > 1.3 * good.cost.cloud_rate()
    assert bad.speculative_rate(bad.best_k()) < 0.8 * bad.cost.cloud_rate()
    for seed in range(3):
        to_cloud, back, result = _switch_delays(good, bad, seed)
        assert to_cloud <= max_to_cloud and back <= max_back, (seed, to_cloud, back)
        # while conditions are bad, it mostly stays cloud-only (probes are bounded)
        bad_phase = result.modes[300 + to_cloud : 600]
        assert bad_phase.count(CLOUD_ONLY) >= 0.8 * len(bad_phase)
        # while good, it never leaves speculative decoding
        assert CLOUD_ONLY not in result.modes[:300] + result.modes[600 + back + 20 :]


def test_cloud_only_beats_speculative_when_it_should() -> None:
    # RTT 60 ms, verifier 20 ms/token: cloud-only streaming (~48 tok/s) beats every k (~39 tok/s)
    env = noisy_env(0.75, rtt_ms=60.0, rtt_jitter_ms=5.0)
    assert env.speculative_rate(env.best_k()) < 0.85 * env.cost.cloud_rate()
    adaptive = simulate(AdaptivePolicy(), env, 1000, seed=0)
    best_fixed = max(simulate(FixedPolicy(k), env, 1000, seed=0).tokens_per_s for k in range(1, 17))
    assert adaptive.tokens_per_s >= 1.1 * best_fixed
    assert adaptive.modes[100:].count(CLOUD_ONLY) >= 0.8 * 900
    # the cloud-only estimate was checked against real cloud-only steps
    est = AdaptivePolicy()
    simulate(est, env, 300, seed=0)
    estimates = est.estimates()
    assert estimates is not None and estimates.cloud_only_steps > 0
    assert estimates.cost.cloud_ms_per_token() == pytest.approx(21.0, rel=0.05)


def test_cloud_only_can_be_disallowed() -> None:
    env = noisy_env(0.75, rtt_ms=60.0)
    result = simulate(AdaptivePolicy(AdaptiveConfig(allow_cloud_only=False)), env, 300, seed=0)
    assert CLOUD_ONLY not in result.modes


def test_observe_rtt_brings_a_session_back_from_cloud_only() -> None:
    # RTT 250 ms sent it cloud-only; pings show it back at 20 ms: the policy returns within a
    # couple of decisions (the follow-up probe confirms it), without waiting for its schedule
    good, bad = noisy_env(0.7), noisy_env(0.7, rtt_ms=250.0)
    policy = AdaptivePolicy()
    simulate(policy, bad, 200, seed=0)
    assert policy.mode == CLOUD_ONLY
    for rtt in (21.0, 19.0, 20.5):
        policy.observe_rtt(rtt)
    result = simulate(policy, good, 10, seed=1)
    assert SPECULATIVE in [r.decision.mode for r in result.rounds[:3] if not r.decision.probe]
    with pytest.raises(ValueError, match="^rtt_ms"):
        policy.observe_rtt(-1.0)


def test_adaptive_respects_k_bounds() -> None:
    config = AdaptiveConfig(k_min=3, k_max=5)
    for env in (noisy_env(0.95, rtt_ms=150.0), noisy_env(0.3, rtt_ms=1.0)):
        result = simulate(AdaptivePolicy(config), env, 300, seed=0)
        ks = [r.decision.k for r in result.rounds if r.decision.mode == SPECULATIVE]
        assert min(ks) >= 3 and max(ks) <= 5


def test_slope_given_an_intercept() -> None:
    fit = AffineFit(decay=1.0, gain=0.1, threshold=3.0, shift_rounds=3, ridge=1e-9)
    for x, y in ((10, 31.0), (20, 34.0), (30, 37.0)):
        fit.update(x, y)
    assert fit.slope_given(30.0) == pytest.approx((10 * 1 + 20 * 4 + 30 * 7) / (100 + 400 + 900))


def test_no_forward_is_cheaper_than_the_told_fixed_cost() -> None:
    """Long blocks only, their verify times tilted by noise: the t_v(n) fit's intercept lands
    far below the verifier's fixed cost. Told that cost, the policy holds the intercept there
    (slope refitted), so neither short blocks nor cloud-only look cheaper than a forward."""
    policy = AdaptivePolicy(AdaptiveConfig())
    policy.observe_verifier_idle(30.0)
    for i in range(12):
        n = 30 + 4 * (i % 3)
        verify = 15.0 + 0.9 * n  # the tilted line: 15 ms at n = 0
        policy.observe(RoundObservation(n, 3, 6.0 * n, verify, 50.0))
    est = policy.estimates()
    assert est is not None
    assert est.cost.verify_base_ms == 30.0
    assert est.cost.cloud_ms_per_token() >= 30.0
    assert est.cost.verify_ms(34) == pytest.approx(15.0 + 0.9 * 34, rel=0.1)  # still fits there


def test_leaving_speculation_after_a_shift_needs_more_evidence() -> None:
    """Right after a level shift in acceptance the estimate rests on a few trials: leaving
    speculative decoding is then judged two standard errors optimistic instead of one, and once
    the estimate has as many trials as an unshifted one would need, one again."""
    policy = AdaptivePolicy(AdaptiveConfig())
    for _ in range(40):
        policy.observe(RoundObservation(4, 4, 24.0, 33.0, 20.0))
    assert policy._accept.shifts == 0 and policy._leave_z() == 1.0
    rounds = 0
    while policy._accept.shifts == 0:  # a hard stretch: nothing accepted
        policy.observe(RoundObservation(4, 0, 24.0, 33.0, 20.0))
        rounds += 1
        assert rounds < 40
    assert policy._accept.trials < 32 and policy._leave_z() == 2.0
    probs = policy._accept.probs(5)
    one, two = policy._accept.upper(5), policy._accept.upper(5, 2.0)
    for p, u1, u2 in zip(probs, one, two, strict=True):
        assert u2 - p == pytest.approx(min(2 * (u1 - p), 1.0 - p))
    for _ in range(40):
        policy.observe(RoundObservation(4, 1, 24.0, 33.0, 20.0))
    assert policy._accept.trials >= 32 and policy._leave_z() == 1.0
