"""The adaptive policy under a shared, batching verifier (`AdaptiveConfig.load_aware`): sessions
whose blocks share compute-bound forwards price a position at what it costs all of them, so they
do not all lengthen their blocks and slow the shared forwards down; a session with the verifier
to itself decides exactly as before. Seeded lockstep simulation, no wall clock."""

from __future__ import annotations

import random

import pytest

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.estimators import VerifierLoad
from edgespec.core.policies import RoundObservation

RTT_MS, DRAFT_MS = 20.0, 6.0
FLOOR_MS, PER_POSITION_MS = 30.0, 0.5  # one forward: fixed cost + compute per position fed


def _lockstep(
    sessions: int, load_aware: bool, rounds: int = 80, seed: int = 0, told: bool = True
) -> tuple[float, float, list[list[int]]]:
    """`sessions` adaptive sessions whose blocks all go into the same forward each round
    (compute-bound: its time grows with every position fed); returns the replica's tokens/s,
    the mean k drafted and every session's k per round."""
    rng = random.Random(seed)
    config = AdaptiveConfig(load_aware=load_aware, allow_cloud_only=False, explore_every=0)
    policies = [AdaptivePolicy(config) for _ in range(sessions)]
    for policy in policies:
        if told:  # what the verifier's compute profile says of an idle forward
            policy.observe_verifier_idle(FLOOR_MS)
    tokens, time_ms, ks = 0, 0.0, []
    for _ in range(rounds):
        chosen = [p.choose().k for p in policies]
        ks.append(chosen)
        verify_ms = FLOOR_MS + PER_POSITION_MS * sum(k + 1 for k in chosen)
        # a continuous batcher: blocks wait for the forward in progress, ~half of one
        queue_ms = 0.5 * verify_ms if sessions > 1 else 0.0
        time_ms += max(chosen) * DRAFT_MS + RTT_MS + queue_ms + verify_ms
        for policy, k in zip(policies, chosen, strict=True):
            accepted = 0
            while accepted < k and rng.random() < 0.7:
                accepted += 1
            tokens += accepted + 1
            policy.observe(RoundObservation(k, accepted, k * DRAFT_MS, verify_ms, RTT_MS, queue_ms))
    mean_k = sum(map(sum, ks)) / (rounds * sessions)
    return 1e3 * tokens / time_ms, mean_k, ks


def test_one_session_decides_as_before() -> None:
    assert _lockstep(1, load_aware=True)[2] == _lockstep(1, load_aware=False)[2]


def test_shared_forwards_shorter_blocks_and_more_tokens() -> None:
    aware_rate, aware_k, _ = _lockstep(24, load_aware=True)
    blind_rate, blind_k, _ = _lockstep(24, load_aware=False)
    assert aware_k < blind_k
    assert aware_rate > blind_rate


def test_verifier_load_estimate() -> None:
    load = VerifierLoad(gain=0.5)
    load.update(5, 72.5, 0.5)
    assert load.per_position_ms(0.25) == 0.0  # no idle floor told: nothing estimated
    load.observe_idle(30.0)
    load.update(5, 32.5, 0.5)  # alone
    assert load.per_position_ms(0.25) == 0.0
    for _ in range(20):  # others add 40 ms to every forward
        load.update(5, 72.5, 0.5)
    assert abs(load.per_position_ms(0.25) - 8.5) < 0.01  # 42.5 ms over the floor, 5 positions


def test_without_an_idle_floor_nothing_changes() -> None:
    assert _lockstep(24, True, told=False)[2] == _lockstep(24, False, told=False)[2]


def test_a_pipelined_session_under_load_keeps_the_wait_of_its_fresh_blocks() -> None:
    """Pipelined, a session's blocks drafted ahead wait behind its own pending block: that wait
    is not learnt as the verifier's. Its fresh blocks' wait (the forward in progress when they
    arrive) stays in every round's cost under load, where a serial session prices it per
    position instead (its `_busy_ms`)."""
    costs = {}
    for pipelined in (False, True):
        policy = AdaptivePolicy(AdaptiveConfig(pipelined=pipelined, allow_cloud_only=False))
        policy.observe_verifier_idle(FLOOR_MS)
        for i in range(40):  # a loaded verifier: every forward well over the idle floor
            ahead = pipelined and i % 2 == 1
            queue = 60.0 if ahead else 15.0  # an ahead block also waits for its predecessor
            obs = RoundObservation(4, 2, 24.0, 45.0, RTT_MS, queue, ahead=ahead)
            policy.observe(obs)
        costs[pipelined] = policy.estimates().cost
    assert costs[False].queue_ms == 0.0  # in the per-position price
    assert costs[True].queue_ms == 15.0  # the fresh blocks' wait only
    assert costs[True].verify_base_ms == costs[False].verify_base_ms == FLOOR_MS


def test_one_burst_does_not_price_every_position_for_the_rest_of_the_session() -> None:
    """One round that waited several forwards (sessions opened together send their first
    blocks together) is an outlier against the level learnt before: it barely moves the price.
    When it is a session's first round, with nothing learnt, the next rounds overrule it within
    a few rounds (a level shift) instead of an average carrying it on."""
    steady = VerifierLoad(gain=0.3)
    steady.observe_idle(FLOOR_MS)
    for _ in range(20):
        steady.update(17, 55.0, 0.2)  # 25 ms over the floor, 17 positions
    before = steady.per_position_ms(0.25)
    assert before == pytest.approx(25.0 / 17)
    steady.update(17, 130.0, 0.2)  # the burst: 100 ms over the floor
    assert steady.per_position_ms(0.25) < 1.1 * before
    first = VerifierLoad(gain=0.3)
    first.observe_idle(FLOOR_MS)
    first.update(17, 130.0, 0.2)  # its first round is the burst
    assert first.per_position_ms(0.25) > 3 * before
    for _ in range(4):
        first.update(17, 55.0, 0.2)
    assert first.per_position_ms(0.25) == pytest.approx(before, rel=0.05)


def test_the_load_is_carried_to_the_next_session() -> None:
    """What the verifier's load cost per position is part of the link's memory: the next
    session prices positions with it from its first round, and its first round's burst is an
    outlier against it."""
    first = AdaptivePolicy(AdaptiveConfig())
    first.observe_verifier_idle(FLOOR_MS)
    for _ in range(12):
        first.observe(RoundObservation(4, 2, 24.0, 55.0, RTT_MS, 20.0))  # 45 ms over, 5 positions
    price = first._load.per_position_ms(0.25)
    assert price == pytest.approx(9.0, rel=0.05)
    second = AdaptivePolicy(AdaptiveConfig(), first.memory())
    assert second._load.per_position_ms(0.25) == price
    second.observe(RoundObservation(4, 2, 24.0, 55.0, RTT_MS, 160.0))  # its first round: a burst
    assert second._load.per_position_ms(0.25) < 1.1 * price
    assert first._load.per_position_ms(0.25) == price  # a copy


def test_streamed_tokens_keep_the_load_current() -> None:
    """A session that streams cloud-only sees the verifier's load in every token's forward: the
    price of a position follows it (here down to none: the forwards are back at the idle
    floor), where it would otherwise stay what the last speculative round saw."""
    policy = AdaptivePolicy(AdaptiveConfig())
    policy.observe_verifier_idle(FLOOR_MS)
    for _ in range(10):
        policy.observe(RoundObservation(4, 2, 24.0, 55.0, RTT_MS, 20.0))
    assert policy._load.per_position_ms(0.25) > 5.0
    for _ in range(6):  # 8 streamed tokens per step, each one forward at the idle floor
        policy.observe(RoundObservation(0, 0, 0.0, 8 * 30.5, 1.0, 8 * 0.2, True, tokens=8))
    assert policy._load.per_position_ms(0.25) == 0.0
