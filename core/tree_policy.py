"""The tree controller: `AdaptivePolicy` extended to choose token-tree shapes.

A chain of k draft tokens commits about 1/(1 - alpha) tokens per round at best, however long the
round trip; a tree spends the same round trip on several candidates per position. Which shape
pays depends on the link and the load: every node costs verifier compute (t_v grows with the
nodes verified, and more so on a loaded, batching verifier), every level a draft forward, and the
round trip is paid once. This policy estimates, for each shape in its search space, the tokens
per second

    rate(shape) = (1 + E[accepted | shape]) / (levels * t_d + RTT + queue + t_v(nodes + 1))

with the timing estimates `AdaptivePolicy` keeps (t_v is fitted on the nodes actually verified,
so a loaded verifier makes big trees dear), and runs the best of: that tree, the chain the base
policy would run (pipelined if configured), or cloud-only decoding.

E[accepted | shape] comes from a rank model: the target's token at a node is its child of draft
rank r (0 = the draft's best proposal) with probability a(d, r), independently per level. Rank 0
is the chain's acceptance at depth d (the base policy's per-position estimate, learnt from the
rank-0 spine of every tree); ranks >= 1 are learnt from the walks of tree rounds (`TreeOutcome`).
A node's probability of being accepted is the product of a over its path, and the best tree of
n nodes under this model is the best-first one, so E[accepted] is the sum of the n largest path
products with at most `width` children per node and `depth` levels: one best-first pass per
(depth, width) gives it for every n at once.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import CostModel
from edgespec.core.estimators import RankAcceptance
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import SPECULATIVE, Decision, RoundObservation
from edgespec.core.tree import TreeShape
from edgespec.core.validation import check_float, check_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeConfig:
    """The shapes `TreePolicy` searches and how it learns sibling ranks (validated)."""

    max_nodes: int = 64  # nodes per tree at most (the verifier's max_block_tokens caps it too)
    max_depth: int = 12
    max_width: int = 4
    rank_prior_weight: float = 4.0  # pseudo-trials behind RANK_PRIOR, > 0
    rank_decay: float = 0.99  # per-round forgetting of the rank counts, in (0, 1]
    initial: TreeShape = TreeShape(nodes=16, depth=6, width=2)  # before any estimate

    def __post_init__(self) -> None:
        check_int("max_nodes", self.max_nodes, 2, 4096)
        check_int("max_depth", self.max_depth, 1, 256)
        check_int("max_width", self.max_width, 2, 64)
        check_float("rank_prior_weight", self.rank_prior_weight, 0, lo_open=True)
        check_float("rank_decay", self.rank_decay, 0, 1, lo_open=True)
        if not isinstance(self.initial, TreeShape):
            raise ValueError(f"initial must be a TreeShape, got {self.initial!r}")


def best_first_gains(
    accept: Callable[[int, int], float], depth: int, width: int, nodes: int
) -> list[tuple[float, int]]:
    """The best-first tree under a rank model: for n = 1..`nodes`, (E[accepted tokens] of the
    best n-node tree, its depth in levels), at most `width` children per node and `depth` levels.
    `accept(d, r)`: P(the target's token at depth d is the rank-r child), r < width."""
    out: list[tuple[float, int]] = []
    heap: list[tuple[float, int]] = []  # (-path probability, depth)
    for r in range(width):
        p = accept(0, r)
        if p > 0:
            heap.append((-p, 0))
    heapq.heapify(heap)
    total, levels = 0.0, 0
    while heap and len(out) < nodes:
        neg, d = heapq.heappop(heap)
        total -= neg
        levels = max(levels, d + 1)
        out.append((total, levels))
        if d + 1 < depth:
            for r in range(width):
                p = -neg * accept(d + 1, r)
                if p > 0:
                    heapq.heappush(heap, (-p, d + 1))
    return out


class TreePolicy(AdaptivePolicy):
    """`AdaptivePolicy` whose speculative rounds may be token trees of the shape it estimates
    best (see the module docstring); chains (and their pipelining) and cloud-only decoding stay
    as the base policy runs them. While it runs trees, its probes are tree rounds too (a tree's
    rank-0 spine teaches the chain's per-position acceptance as a chain probe would)."""

    def __init__(
        self,
        config: AdaptiveConfig | None = None,
        memory: PolicyMemory | None = None,
        tree: TreeConfig | None = None,
    ) -> None:
        super().__init__(config, memory)
        self.tree_config = tree if tree is not None else TreeConfig()
        t = self.tree_config
        self._ranks = RankAcceptance(t.max_width - 1, t.rank_prior_weight, t.rank_decay)
        if memory is not None and memory.ranks is not None:
            self._ranks = copy.deepcopy(memory.ranks)  # what trees showed on this link before
        self._shape: TreeShape | None = t.initial

    @property
    def shape(self) -> TreeShape | None:
        """The tree shape the policy currently runs (None: chains)."""
        return self._shape

    def memory(self) -> PolicyMemory:
        return dataclasses.replace(super().memory(), ranks=copy.deepcopy(self._ranks))

    def observe(self, obs: RoundObservation) -> None:
        super().observe(obs)
        if obs.tree is not None:
            self._ranks.update(obs.tree.steps)

    def tree_rates(self, cost: CostModel, accept: Sequence[float]) -> dict[TreeShape, float]:
        """Every tree shape searched (width >= 2) and its estimated rate (tokens/s)."""
        t = self.tree_config

        def prob(d: int, r: int) -> float:
            return accept[min(d, len(accept) - 1)] if r == 0 else self._ranks.prob(r)

        rates: dict[TreeShape, float] = {}
        for width in range(2, t.max_width + 1):
            gains = best_first_gains(prob, t.max_depth, width, t.max_nodes)
            for n, (expected, levels) in enumerate(gains, start=1):
                time_ms = levels * cost.draft_ms + cost.rtt_ms + cost.queue_ms
                rate = 1e3 * (1.0 + expected) / (time_ms + cost.verify_ms(n + 1))
                rates[TreeShape(nodes=n, depth=levels, width=width)] = rate
        return rates

    def _speculative_rate(self, cost: CostModel, accept: Sequence[float], chain: float) -> float:
        rates = self.tree_rates(cost, accept)
        if not rates:
            self._shape = None
            return chain
        best = max(rates, key=rates.__getitem__)
        hysteresis = 1.0 + self.config.k_hysteresis
        current = rates.get(self._shape, 0.0) if self._shape is not None else chain
        if rates[best] > current * hysteresis:
            if best != self._shape:
                logger.debug("tree shape %s -> %s (%.1f tok/s)", self._shape, best, rates[best])
            self._shape = best
        if self._shape is not None and rates.get(self._shape, 0.0) <= chain * hysteresis:
            logger.debug("trees -> chains (%.1f tok/s)", chain)
            self._shape = None
        return chain if self._shape is None else max(rates[self._shape], chain)

    def choose(self) -> Decision:
        decision = super().choose()
        if decision.probe and decision.mode == SPECULATIVE and self._shape is not None:
            # A chain probe would refresh the chain's acceptance and the t_v slope; tree rounds
            # already do both (their rank-0 spines, their varying sizes), without a round's loss.
            return dataclasses.replace(self._speculative(decision.k), probe=True)
        return decision

    def _speculative(self, k: int) -> Decision:
        if self._shape is None:
            return Decision(SPECULATIVE, k)
        return Decision(SPECULATIVE, self._shape.depth, tree=self._shape)

    def __repr__(self) -> str:
        return f"TreePolicy(mode={self.mode!r}, k={self.k}, shape={self._shape})"
