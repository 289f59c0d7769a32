"""Draft-length controllers: the E(k)/T(k) model, the baseline policies, and the adaptive policy
run against the simulator (seeded, so every assertion is deterministic; no wall-clock)."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable

import pytest
from _policy_sim import SimEnv, SimResult, simulate

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import (
    CostModel,
    best_k,
    expected_tokens,
    expected_tokens_per_position,
)
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    Decision,
    DraftLengthPolicy,
    FixedPolicy,
    HeuristicPolicy,
    RoundObservation,
)
from edgespec.core.registry import make_policy


def _env(
    alpha: float | tuple[float, ...] = 0.8,
    draft_ms: float = 2.0,
    rtt_ms: float = 20.0,
    verify_base_ms: float = 20.0,
    verify_per_token_ms: float = 1.0,
    **noise: float,
) -> SimEnv:
    """A session with realistic noise: RTT jitter of 10% + 1 ms, 3% timing noise."""
    noise.setdefault("rtt_jitter_ms", 0.1 * rtt_ms + 1.0)
    noise.setdefault("timing_noise", 0.03)
    cost = CostModel(draft_ms, rtt_ms, verify_base_ms, verify_per_token_ms)
    return SimEnv(alpha, cost, **noise)


def _exploited(result: SimResult, start: int = 0, stop: int | None = None) -> list[int]:
    """k of the non-probe rounds in [start, stop): what the policy judged best (0: cloud-only)."""
    return [r.decision.k for r in result.rounds[start:stop] if not r.decision.probe]


def _changes(ks: list[int]) -> int:
    return sum(1 for a, b in zip(ks, ks[1:], strict=False) if a != b)


# ---------------------------------------------------------------------------------------------
# the model


def test_expected_tokens_formula() -> None:
    assert expected_tokens(0.0, 5) == 1.0  # only the verifier's own token
    assert expected_tokens(1.0, 5) == 6.0  # every draft token plus the bonus token
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert expected_tokens(0.8, 0) == 1.0
    # continuous at alpha -> 1 (no 0/0 blow-up just below it)
    assert expected_tokens(1.0 - 1e-12, 7) == pytest.approx(8.0)
    assert expected_tokens(0.999999, 7) == pytest.approx(8.0, rel=1e-5)
    for alpha in (0.1, 0.6, 0.95):
        direct = sum(alpha**i for i in range(9))
        assert expected_tokens(alpha, 8) == pytest.approx(direct)


def test_expected_tokens_per_position_matches_iid_and_orders() -> None:
    assert expected_tokens_per_position([0.7] * 6, 6) == pytest.approx(expected_tokens(0.7, 6))
    assert expected_tokens_per_position([0.5, 1.0, 1.0], 3) == pytest.approx(1 + 0.5 * 3)
    assert expected_tokens_per_position([], 0) == 1.0
    with pytest.raises(ValueError, match="accept_probs"):
        expected_tokens_per_position([0.5], 2)


@pytest.mark.parametrize(
    ("call", "field_name"),
    [
        (lambda: expected_tokens(1.5, 3), "alpha"),
        (lambda: expected_tokens(-0.1, 3), "alpha"),
        (lambda: expected_tokens(float("nan"), 3), "alpha"),
        (lambda: expected_tokens(0.5, -1), "k"),
        (lambda: expected_tokens(0.5, 2.0), "k"),
        (lambda: expected_tokens_per_position([0.5, 2.0], 2), r"accept_probs\[1\]"),
        (lambda: best_k(CostModel(1, 1, 1, 1), 0.5, k_min=0), "k_min"),
        (lambda: best_k(CostModel(1, 1, 1, 1), 0.5, k_min=4, k_max=3), "k_max"),
        (lambda: best_k(CostModel(1, 1, 1, 1), [0.5] * 3, k_max=4), "accept"),
        (lambda: CostModel(-1, 1, 1, 1), "draft_ms"),
        (lambda: CostModel(1, math.inf, 1, 1), "rtt_ms"),
        (lambda: CostModel(1, 1, 1, 1, cloud_token_ms=0), "cloud_token_ms"),
    ],
)
def test_model_functions_reject_bad_values(call: Callable[[], object], field_name: str) -> None:
    with pytest.raises(ValueError, match=f"^{field_name}"):
        call()


def test_cost_model_times() -> None:
    cost = CostModel(draft_ms=2, rtt_ms=30, verify_base_ms=20, verify_per_token_ms=1, queue_ms=4)
    # T(k) = k t_d + RTT + q + a + b (k + 1)
    assert cost.round_ms(5) == pytest.approx(5 * 2 + 30 + 4 + 20 + 1 * 6)
    assert cost.cloud_ms_per_token() == pytest.approx(20 + 1 + 4)  # t_v(1) + q
    assert cost.cloud_rate() == pytest.approx(1e3 / 25)
    assert CostModel(1, 1, 1, 1, cloud_token_ms=10).cloud_rate() == pytest.approx(100.0)
    rate = cost.speculative_rate(0.8, 5)
    assert rate == pytest.approx(1e3 * expected_tokens(0.8, 5) / cost.round_ms(5))


def test_best_k_grows_with_rtt_and_alpha() -> None:
    def k_at(alpha: float, rtt: float) -> int:
        return best_k(CostModel(2.0, rtt, 20.0, 1.0), alpha, 1, 32)

    by_rtt = [k_at(0.8, rtt) for rtt in (0, 5, 10, 20, 50, 100, 200)]
    assert by_rtt == sorted(by_rtt) and by_rtt[-1] >= by_rtt[0] + 4
    by_alpha = [k_at(alpha, 30.0) for alpha in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
    assert by_alpha == sorted(by_alpha) and by_alpha[-1] >= by_alpha[0] + 8
    # and it is the argmax
    cost = CostModel(2.0, 40.0, 20.0, 1.0)
    rates = {k: cost.speculative_rate(0.8, k) for k in range(1, 17)}
    assert best_k(cost, 0.8) == max(rates, key=rates.__getitem__)


# ---------------------------------------------------------------------------------------------
# boundary dataclasses and construction


def test_round_observation_contract() -> None:
    obs = RoundObservation(k=5, accepted=3, draft_ms=10, verify_ms=22, network_ms=30)
    assert obs.tokens == 4 and not obs.cloud_only
    cloud = RoundObservation(
        k=0, accepted=0, draft_ms=0, verify_ms=80, network_ms=0, cloud_only=True, tokens=4
    )
    assert cloud.tokens == 4
    assert RoundObservation(0, 0, 0, 20, 0, cloud_only=True).tokens == 1


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"k": 3, "accepted": 4}, "accepted"),
        ({"k": 3, "accepted": -1}, "accepted"),
        ({"k": 0, "accepted": 0}, "k"),
        ({"k": True, "accepted": 0}, "k"),
        ({"k": 3, "accepted": 1, "draft_ms": -1.0}, "draft_ms"),
        ({"k": 3, "accepted": 1, "network_ms": float("nan")}, "network_ms"),
        ({"k": 3, "accepted": 1, "queue_ms": -2.0}, "queue_ms"),
        ({"k": 3, "accepted": 1, "tokens": 5}, "tokens"),
        ({"k": 2, "accepted": 0, "cloud_only": True}, "k"),
        ({"k": 0, "accepted": 0, "cloud_only": True, "tokens": 0}, "tokens"),
        ({"k": 0, "accepted": 0, "cloud_only": 1}, "cloud_only"),
    ],
)
def test_round_observation_rejects_bad_values(kwargs: dict, field_name: str) -> None:
    base = {"draft_ms": 1.0, "verify_ms": 1.0, "network_ms": 1.0}
    with pytest.raises(ValueError, match=f"^{field_name}"):
        RoundObservation(**{**base, **kwargs})


def test_decision_contract() -> None:
    assert Decision(SPECULATIVE, 4).stream_tokens == 0
    assert Decision(CLOUD_ONLY, 0, stream_tokens=8).k == 0
    with pytest.raises(ValueError, match="^k"):
        Decision(SPECULATIVE, 0)
    with pytest.raises(ValueError, match="^k"):
        Decision(CLOUD_ONLY, 3, stream_tokens=8)
    with pytest.raises(ValueError, match="^stream_tokens"):
        Decision(CLOUD_ONLY, 0)
    with pytest.raises(ValueError, match="^mode"):
        Decision("local", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("k_min", 0),
        ("k_max", 0),
        ("k_max", 300),
        ("k_init", 17),
        ("warmup_rounds", -1),
        ("cloud_warmup_rounds", 1.5),
        ("alpha_prior", 1.0),
        ("alpha_prior_weight", 0.0),
        ("position_prior_weight", -1.0),
        ("acceptance_decay", 0.0),
        ("timing_gain", 1.5),
        ("verify_decay", float("nan")),
        ("shift_threshold", 0.0),
        ("shift_rounds", 0),
        ("acceptance_shift_g", -3.0),
        ("k_hysteresis", -0.1),
        ("mode_hysteresis", "0.1"),
        ("explore_every", 1),
        ("allow_cloud_only", "yes"),
        ("cloud_chunk_tokens", 0),
        ("cloud_probe_every", 0),
        ("cloud_probe_k", 0),
    ],
)
def test_adaptive_config_rejects_bad_values(field_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field_name} must be"):
        AdaptiveConfig(**{field_name: value})
    # make_policy reports the same field
    with pytest.raises(ValueError, match=f"^{field_name} must be"):
        make_policy("adaptive", **{field_name: value})


def test_adaptive_config_defaults_k_init_within_bounds() -> None:
    assert AdaptiveConfig().k_init == 4
    assert AdaptiveConfig(k_max=2).k_init == 2
    assert AdaptiveConfig(k_min=6, k_max=9).k_init == 6


def test_make_policy() -> None:
    fixed = make_policy("fixed", k=3)
    assert isinstance(fixed, FixedPolicy) and fixed.choose() == Decision(SPECULATIVE, 3)
    assert isinstance(make_policy("heuristic", k0=2, k_max=8), HeuristicPolicy)
    adaptive = make_policy("adaptive", k_max=8, allow_cloud_only=False)
    assert isinstance(adaptive, AdaptivePolicy) and adaptive.config.k_max == 8
    for policy in (fixed, adaptive, make_policy("heuristic")):
        assert isinstance(policy, DraftLengthPolicy)
    with pytest.raises(ValueError, match="^policy must be one of"):
        make_policy("greedy")
    with pytest.raises(ValueError, match="^k0 is not an option of the 'fixed' policy"):
        make_policy("fixed", k0=3)
    with pytest.raises(ValueError, match="^k must be"):
        make_policy("fixed", k=0)
    with pytest.raises(ValueError, match="^k0 must be"):
        make_policy("heuristic", k0=20, k_max=16)


# ---------------------------------------------------------------------------------------------
# baseline policies


def _spec(k: int, accepted: int) -> RoundObservation:
    return RoundObservation(k=k, accepted=accepted, draft_ms=k, verify_ms=20, network_ms=20)


def test_fixed_policy_never_moves() -> None:
    policy = FixedPolicy(5)
    for accepted in (5, 0, 5, 2):
        assert policy.choose() == Decision(SPECULATIVE, 5)
        policy.observe(_spec(5, accepted))


def test_heuristic_policy_plus_two_minus_one_within_bounds() -> None:
    policy = HeuristicPolicy(k0=3, k_min=2, k_max=8)
    seen = []
    # all accepted: +2 (capped at k_max); any rejection: -1 (floored at k_min)
    for all_accepted in (True, True, True, False, False, False, False, False, False, True):
        k = policy.choose().k
        seen.append(k)
        policy.observe(_spec(k, k if all_accepted else k - 1))
    assert seen == [3, 5, 7, 8, 7, 6, 5, 4, 3, 2]
    assert policy.choose().k == 4
    # cloud-only steps say nothing about drafting
    policy.observe(RoundObservation(0, 0, 0, 20, 0, cloud_only=True, tokens=8))
    assert policy.choose().k == 4


# ---------------------------------------------------------------------------------------------
# the adaptive policy against the simulator


def test_simulate_is_deterministic_and_counts_tokens() -> None:
    env = _env(rtt_spike_prob=0.02, rtt_spike_ms=60.0)
    a = simulate(AdaptivePolicy(), env, 300, seed=7)
    b = simulate(AdaptivePolicy(), env, 300, seed=7)
    assert a == b
    assert a.tokens == sum(r.observation.tokens for r in a.rounds)
    assert a.time_ms == pytest.approx(sum(r.wall_ms for r in a.rounds))
    assert simulate(AdaptivePolicy(), env, 300, seed=8) != a


def test_simulator_matches_the_model() -> None:
    # a fixed k's simulated throughput is the model's E(k)/T(k), within sampling error
    env = _env(alpha=0.75, rtt_ms=30.0)
    result = simulate(FixedPolicy(5), env, 4000, seed=1)
    assert result.tokens / 4000 == pytest.approx(expected_tokens(0.75, 5), rel=0.03)
    assert result.tokens_per_s == pytest.approx(env.speculative_rate(5), rel=0.03)


CONVERGENCE_ENVS = {
    "lan": _env(0.8, rtt_ms=5.0, verify_base_ms=15.0),
    "wan-low-acceptance": _env(0.6, draft_ms=1.0, rtt_ms=20.0, verify_base_ms=30.0,
                               verify_per_token_ms=2.0),
    "high-acceptance": _env(0.9, draft_ms=3.0, rtt_ms=20.0, verify_base_ms=15.0,
                            verify_per_token_ms=1.5),
    "position-dependent": _env((0.5, 0.95), rtt_ms=20.0),
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
        settled = _exploited(result, start=300)
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
        settled = _exploited(result, start=300)
        assert CLOUD_ONLY not in result.modes[300:]
        near = sum(env.speculative_rate(k) >= 0.97 * best for k in settled) / len(settled)
        assert near >= 0.9, (seed, env.best_k(), Counter(settled))


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
    assert statistics.median(_exploited(result, start=300)) >= iid_k + 4


def test_estimates_recover_the_true_parameters() -> None:
    env = _env(alpha=0.75, draft_ms=3.0, rtt_ms=40.0, verify_base_ms=25.0, verify_per_token_ms=1.5)
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
        return _env(0.7, draft_ms=2.0, rtt_ms=rtt, verify_base_ms=20.0)

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
        means = [statistics.mean(_exploited(result, s, s + 400)) for s in (0, 400, 800)]
        assert means[1] > means[2] > means[0] - 0.5, means


def test_k_is_stable_under_jitter() -> None:
    # heavy jitter and 2% spikes of +3 RTT around a fixed level: k barely moves
    for seed in range(3):
        env = _env(0.8, rtt_ms=30.0, rtt_jitter_ms=6.0, rtt_spike_prob=0.02, rtt_spike_ms=90.0)
        result = simulate(AdaptivePolicy(), env, 2000, seed=seed)
        settled = _exploited(result, start=100)
        assert _changes(settled) <= 5, Counter(settled)
        assert CLOUD_ONLY not in result.modes


def test_exploration_is_bounded_and_can_be_disabled() -> None:
    env = _env(0.8, rtt_ms=30.0)
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
    good = _env(0.8)
    bad = {
        "slow-edge": _env(0.8, draft_ms=30.0),
        "low-acceptance": _env(0.2),
        "long-rtt": _env(0.8, rtt_ms=250.0),
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
    env = _env(0.75, rtt_ms=60.0, rtt_jitter_ms=5.0)
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
    env = _env(0.75, rtt_ms=60.0)
    result = simulate(AdaptivePolicy(AdaptiveConfig(allow_cloud_only=False)), env, 300, seed=0)
    assert CLOUD_ONLY not in result.modes


def test_observe_rtt_brings_a_session_back_from_cloud_only() -> None:
    # RTT 250 ms sent it cloud-only; pings show it back at 20 ms: the policy returns within a
    # couple of decisions (the follow-up probe confirms it), without waiting for its schedule
    good, bad = _env(0.7), _env(0.7, rtt_ms=250.0)
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
    for env in (_env(0.95, rtt_ms=150.0), _env(0.3, rtt_ms=1.0)):
        result = simulate(AdaptivePolicy(config), env, 300, seed=0)
        ks = [r.decision.k for r in result.rounds if r.decision.mode == SPECULATIVE]
        assert min(ks) >= 3 and max(ks) <= 5


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
    far = _env(alpha=0.7, rtt_ms=200.0)
    cold = AdaptivePolicy()
    assert cold.choose().mode == SPECULATIVE and not cold.warm
    earlier = _learnt(far)
    assert earlier.mode == CLOUD_ONLY
    warm = AdaptivePolicy(AdaptiveConfig(), earlier.memory())
    assert warm.warm and warm.choose().mode == CLOUD_ONLY
    # over a short session the warm policy commits more per unit of time than the cold one
    rates = [simulate(p, far, 12, seed=5).tokens_per_s for p in (cold, warm)]
    assert rates[1] > 1.2 * rates[0]

    near = _env(alpha=0.8, rtt_ms=5.0)
    settled = _learnt(near)
    resumed = AdaptivePolicy(AdaptiveConfig(), settled.memory())
    first = resumed.choose()
    assert first.mode == SPECULATIVE and first.k == settled.k
    assert abs(settled.k - near.best_k()) <= 1


def test_memory_is_a_copy_with_capped_acceptance_evidence() -> None:
    env = _env(alpha=0.8)
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
    simulate(warm, _env(alpha=0.3, rtt_ms=80.0), 40, seed=1)
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
    earlier = _learnt(_env(alpha=0.7, rtt_ms=200.0))
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
    far = _env(alpha=0.7, rtt_ms=200.0)

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
