"""The draft-length policies' foundations: the E(k)/T(k) cost model, the boundary dataclasses
(RoundObservation, Decision, AdaptiveConfig), make_policy, and the fixed and heuristic policies."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import (
    CostModel,
    best_k,
    expected_tokens,
    expected_tokens_per_position,
)
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
