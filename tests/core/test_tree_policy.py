"""The tree controller (`TreePolicy`) against a synthetic session: it runs trees where they pay,
chains where they do not, and shrinks trees when verifying nodes gets dear (a loaded verifier).

The synthetic session: a tree of width w continues its walk at each level with probability
sum_{r<w} a_r (the target's token is one of the node's w children), a chain with a_0, up to the
tree's depth; timings follow the cost model exactly (draft per level, RTT, t_v(n))."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import CostModel
from edgespec.core.estimators import ReachCalibration
from edgespec.core.policies import CLOUD_ONLY, RoundObservation, TreeOutcome
from edgespec.core.tree import TreeShape
from edgespec.core.tree_policy import (
    TreePolicy,
    _beam_levels,
    _ranked,
    _ranked_cut,
    beam_reach,
    beam_shapes,
)

RANKS = (0.7, 0.15, 0.06, 0.03)  # the true P(target = rank-r child)


def run(policy: TreePolicy, cost: CostModel, rounds: int, seed: int = 0, ranks=RANKS) -> list:
    rng = random.Random(seed)
    decisions = []
    for _ in range(rounds):
        d = policy.choose()
        decisions.append(d)
        if d.mode == CLOUD_ONLY:
            n = d.stream_tokens
            policy.observe(
                RoundObservation(
                    0, 0, 0.0, n * cost.cloud_ms_per_token(), 0.0, cloud_only=True, tokens=n
                )
            )
            continue
        width = d.tree.width if d.tree is not None else 1
        depth = d.tree.depth if d.tree is not None else d.k
        steps, accepted = [], 0
        while accepted < depth:
            u, rank, acc = rng.random(), -1, 0.0
            for r in range(width):
                acc += ranks[r]
                if u < acc:
                    rank = r
                    break
            steps.append((width, rank))
            if rank < 0:
                break
            accepted += 1
        nodes = d.tree.nodes if d.tree is not None else d.k
        tree = None
        if d.tree is not None:
            spine_accepted = next((i for i, (_, r) in enumerate(steps) if r != 0), len(steps))
            tree = TreeOutcome(depth, depth, tuple(steps), depth, min(spine_accepted, depth))
        policy.observe(
            RoundObservation(
                k=nodes,
                accepted=accepted,
                draft_ms=depth * cost.draft_ms,
                verify_ms=cost.verify_ms(nodes + 1),
                network_ms=cost.rtt_ms,
                tree=tree,
            )
        )
    return decisions


def _tree_share(decisions) -> float:
    return sum(d.tree is not None for d in decisions) / len(decisions)


def test_beam_of_width_one_is_the_chain() -> None:
    reach = beam_reach(lambda d, r: 0.8 if r == 0 else 0.0, 5, 1, 5)
    assert reach == pytest.approx([0.8**i for i in range(1, 6)])


def test_beam_reach_keeps_the_most_probable_nodes() -> None:
    """Width 2, a(d, 0) = 0.6, a(d, 1) = 0.3: the root's children are 0.6 and 0.3, the next
    level 0.36, 0.18, 0.18, 0.09; the best 4 nodes are 0.6, 0.36, 0.3 and one 0.18."""
    reach = beam_reach(lambda d, r: (0.6, 0.3)[r], 2, 2, 4)
    assert reach == pytest.approx([0.9, 0.54])


def _beam_reach_reference(accept, depth: int, width: int, nodes: int) -> list[float]:
    """The beam, grown and cut as the module docstring says, level by level (no sharing)."""
    proposed = []
    frontier = [1.0]
    for d in range(depth):
        level = [p * accept(d, r) for p in frontier for r in range(width)]
        level = [p for p in level if p > 0]
        proposed += [(p, d) for p in level]
        frontier = sorted(level, reverse=True)[:width]
        if not frontier:
            break
    proposed.sort(key=lambda x: -x[0])
    reach = [0.0] * depth
    for p, d in proposed[:nodes]:
        reach[d] += p
    return reach


@settings(max_examples=200, deadline=None)
@given(
    table=st.lists(
        st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0]), min_size=4, max_size=4),
        min_size=13,
        max_size=13,
    ),
    depth=st.integers(1, 10),
    extra=st.integers(0, 3),
    width=st.integers(1, 4),
    nodes=st.integers(1, 64),
)
def test_shared_beams_price_every_shape_as_its_own_beam(table, depth, extra, width, nodes) -> None:
    """The policy grows one beam per width, to the deepest shape, and cuts shallower shapes
    from it: each cut equals the shape's own beam (ties included, on a coarse grid of rates)."""
    accept = lambda d, r: table[d][r]  # noqa: E731
    own = _beam_reach_reference(accept, depth, width, nodes)
    assert beam_reach(accept, depth, width, nodes) == own
    assert _ranked_cut(_ranked(_beam_levels(accept, depth + extra, width)), depth, nodes) == own


def test_beam_shapes_hold_the_whole_beam() -> None:
    assert beam_shapes((3, 10), (2, 4), 64) == (
        TreeShape(10, 3, 2),
        TreeShape(38, 10, 2),
        TreeShape(36, 3, 4),
        TreeShape(64, 10, 4),
    )


def test_reach_calibration_learns_by_depth_and_extrapolates() -> None:
    """The model predicts reaching depth 1 and 2 with 0.8 and 0.6; walks reach them half as
    often at depth 2 and always at depth 1. Depth 3, never predicted, takes depth 2's factor."""
    cal = ReachCalibration(max_depth=8, prior_weight=1.0, decay=1.0)
    assert cal.factors(2) == [1.0, 1.0]
    for accepted in (1, 2) * 50:  # depth 1 always, depth 2 half the time
        cal.update([0.8, 0.6], accepted)
    f = cal.factors(3)
    assert f[0] == pytest.approx((100 + 1) / (80 + 1))
    assert f[1] == pytest.approx((50 + f[0]) / (60 + 1))
    assert f[2] == pytest.approx(f[1])


def test_trees_where_the_round_trip_is_long() -> None:
    cost = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    decisions = run(TreePolicy(AdaptiveConfig(allow_cloud_only=False)), cost, 200)
    assert _tree_share(decisions[50:]) > 0.8  # every 8th round is a chain probe


def test_chains_where_levels_cost_more_than_they_bring() -> None:
    """No round trip and a draft forward twice as dear as a verification: the levels a tree
    needs to pay for itself (3 or more in the grid searched) cost more than its extra tokens
    bring (the best chain has k = 1)."""
    cost = CostModel(draft_ms=60.0, rtt_ms=0.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    decisions = run(TreePolicy(AdaptiveConfig(allow_cloud_only=False)), cost, 200)
    assert _tree_share(decisions[50:]) < 0.2


def test_trees_shrink_when_the_verifier_is_loaded() -> None:
    """The same link; verifying a node costs 0.05 ms on an idle verifier and 1.5 ms on a loaded
    one (a batching verifier past its memory-bound regime): the nodes per tree go down."""
    idle = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    loaded = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=1.5)

    def mean_nodes(cost: CostModel) -> float:
        decisions = run(TreePolicy(AdaptiveConfig(allow_cloud_only=False)), cost, 200)[50:]
        return sum(d.tree.nodes if d.tree else d.k for d in decisions) / len(decisions)

    assert mean_nodes(loaded) < 0.6 * mean_nodes(idle)


def test_a_node_cap_is_the_budget_shapes_are_searched_and_learnt_at() -> None:
    """The verifier takes at most 8 nodes (the edge cuts bigger trees): every shape is searched
    at that budget, and the rounds run teach the shape they ran as (a cut tree's round would
    otherwise be nobody's, and an over-the-cap shape's prediction would never be corrected)."""
    policy = TreePolicy(AdaptiveConfig(allow_cloud_only=False))
    policy.limit_nodes(8)
    shapes = policy.tree_config.shapes
    assert all(s.nodes <= 8 and s.depth <= s.nodes for s in shapes)
    assert len(set(shapes)) == len(shapes) < len(TreePolicy().tree_config.shapes)
    assert policy.shape is not None and policy.shape.nodes <= 8
    cost = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    trees = [d.tree for d in run(policy, cost, 60) if d.tree is not None]
    assert trees and all(t.nodes <= 8 for t in trees)
    learnt = policy.memory().shapes
    assert learnt is not None
    for t in set(trees):
        assert learnt.mean((t.nodes, t.depth, t.width), 0.0, 1.0)[1] > 0  # rounds behind it


def test_leaving_trees_for_cloud_only_must_beat_what_trees_could_do() -> None:
    """The guard on leaving speculative decoding (the best rate under an acceptance one standard
    error up) counts trees: a session running trees that beat every chain is not sent to
    cloud-only because cloud-only beats the chains' optimistic rate."""
    cost = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    policy = TreePolicy(AdaptiveConfig(allow_cloud_only=False))
    run(policy, cost, 60)
    accept = policy._accept.probs(policy.config.k_max + 1)
    best_tree = max(policy.tree_rates(cost, accept).values())
    chains = AdaptivePolicy._hopeful_rate(policy, cost)
    assert best_tree > chains  # the case that matters: trees beat even optimistic chains
    assert policy._hopeful_rate(cost) >= best_tree


def test_the_calibration_is_carried_to_the_next_session() -> None:
    cost = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    first = TreePolicy(AdaptiveConfig(allow_cloud_only=False))
    run(first, cost, 40)
    memory = first.memory()
    assert memory.reach is not None
    deepest = max(s.depth for s in first.tree_config.shapes)
    assert memory.reach.factors(deepest) != [1.0] * deepest  # tree rounds taught it
    second = TreePolicy(AdaptiveConfig(allow_cloud_only=False), memory)
    accept = [0.7] * 17
    assert second.tree_rates(cost, accept) == first.tree_rates(cost, accept)


def test_pipelined_tree_rates_price_the_guessed_path() -> None:
    """Pipelined, a tree round costs T_pipe of the cost model with the tree's levels, nodes + 1
    positions and h = the spine's reach to its leaf times the bonus's acceptance (nothing learnt
    yet: rank 0 is the chain's acceptance, no calibration); on a 50 ms link it always pays."""
    serial = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    piped = dataclasses.replace(serial, pipelined=True)
    accept = [0.7] * 17
    plain = TreePolicy(AdaptiveConfig()).tree_rates(serial, accept)
    rates = TreePolicy(AdaptiveConfig(pipelined=True)).tree_rates(piped, accept)
    for shape, rate in rates.items():
        hit = math.prod(accept[: shape.depth + 1])
        ratio = serial.round_ms(shape.depth, shape.nodes + 1) / piped.expected_round_ms(
            shape.depth, hit, shape.nodes + 1
        )
        assert rate == pytest.approx(plain[shape] * ratio)
        assert rate > plain[shape]  # a hit hides a round trip
    # deep trees rarely hit: pipelining helps shallow ones more
    gain = {s: rates[s] / plain[s] for s in rates}
    shallow, deep = min(gain, key=lambda s: s.depth), max(gain, key=lambda s: s.depth)
    assert gain[shallow] > gain[deep]


def test_no_tree_drafted_ahead_where_it_does_not_pay() -> None:
    """No round trip: drafting a deep tree ahead (11 forwards) outlasts its verdict, and it
    rarely hits, so its rounds are priced serially and not drafted ahead; a shallow tree's are."""
    cost = CostModel(6.0, 0.0, 30.0, 0.2, pipelined=True)
    policy = TreePolicy(AdaptiveConfig(pipelined=True))
    priced = policy._tree_rates(cost, [0.7] * 17, 0.0)
    plain = TreePolicy(AdaptiveConfig()).tree_rates(
        dataclasses.replace(cost, pipelined=False), [0.7] * 17
    )
    shallow, deep = min(priced, key=lambda s: s.depth), max(priced, key=lambda s: s.depth)
    assert priced[shallow][1] and priced[shallow][0] > plain[shallow]
    assert not priced[deep][1] and priced[deep][0] == plain[deep]


def test_a_session_on_chains_probes_trees_and_comes_back_when_they_pay() -> None:
    """Siblings never hit at first (a tree is a chain plus wasted nodes), so a session may
    settle on chains; then they hit as usual. On chains, every other exploration round is a
    tree of the best-rated shape, which is how the rank model learns that siblings pay again:
    trees come back. Without tree probes (the control) a session that settled on chains stays
    there, its sibling estimates frozen at what trees showed when they lost."""
    cost = CostModel(draft_ms=6.0, rtt_ms=50.0, verify_base_ms=30.0, verify_per_token_ms=0.05)
    stuck = []
    for probes in (True, False):
        for seed in (0, 1):
            policy = TreePolicy(AdaptiveConfig(allow_cloud_only=False))
            if not probes:
                policy._probe = lambda p=policy: AdaptivePolicy._probe(p)  # chain probes only
            before = run(policy, cost, 150, seed=seed, ranks=(0.7, 0.0, 0.0, 0.0))
            after = run(policy, cost, 200, seed=seed + 10)
            if probes:
                assert _tree_share(after[100:]) > 0.8
                assert any(d.probe and d.tree is not None for d in before + after)
            else:
                stuck.append(_tree_share(before[50:]) < 0.2 and _tree_share(after[100:]) < 0.2)
    assert any(stuck)  # the control: the case this guards against does happen
