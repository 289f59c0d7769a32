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
policy would run (pipelined if configured), or cloud-only decoding. Pipelined (the config's
`pipelined`), a tree's round is priced as a chain's (`CostModel.expected_round_ms` with the
tree's levels and nodes + 1 positions): a block drafted ahead on the tree's guessed path is used
with probability h = the calibrated reach of the rank-0 spine's leaf times the rank-0 acceptance
after it (the bonus token the draft guesses), and a run of hits drafts (levels + 1) forwards per
block while the block before it travels, while a miss waits for the block drafted ahead when the
round trip is shorter than its drafting. Where that costs more than it saves (deep trees that
rarely hit, on a short round trip), the tree's decisions say so (`Decision.ahead` False) and its
rounds are priced serially.

E[accepted | shape] comes from a rank model applied to the tree `grow_tree` grows (a beam of
`width` nodes per level, then the most probable `nodes`: `beam_reach`): the target's token at a
node is its child of draft rank r (0 = the draft's best proposal) with probability a(d, r),
independently per level, learnt per depth and rank from the walks of tree rounds
(`TreeOutcome`, `edgespec.core.estimators.RankAcceptance`). Before trees have shown much, rank 0
at depth d is the chain's acceptance there (the base policy's per-position estimate) and ranks
>= 1 a prior pooled over depths. A node's probability of being accepted is the product of a
over its path; summed per depth it is P(the walk reaches that depth).

Independence over-predicts deep walks (a hard context stays hard for the siblings too), the more
so the deeper: by up to ~45% in E[accepted] for 10-level trees on the demo pair. So the reach
predicted at each depth is scaled by a factor learnt from the tree rounds run
(`ReachCalibration`: walks that reached depth d over the reach predicted there, extrapolated to
deeper levels from the deepest seen), which makes the first choice of a shape already close to
right instead of one a round of exploration has to correct: a 64-token generation has ~15 tree
rounds. A shape's own measured acceptance (`ShapeAcceptance`) then refines its estimate.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import CostModel
from edgespec.core.estimators import RankAcceptance, ReachCalibration, ShapeAcceptance
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import SPECULATIVE, Decision, RoundObservation
from edgespec.core.tree import TreeShape
from edgespec.core.validation import check_float, check_int

logger = logging.getLogger(__name__)


def beam_shapes(
    depths: Sequence[int], widths: Sequence[int], max_nodes: int
) -> tuple[TreeShape, ...]:
    """A grid of shapes: per depth d and width w, the whole beam `grow_tree` proposes (w root
    children, then w * w per level: w + (d - 1) * w^2 nodes), capped at `max_nodes`. A beam's
    nodes cost little to verify (the verifier's weight pass dominates) but its levels each cost
    a draft forward, so the grid spans depth and width and leaves the budget to the beam."""
    return tuple(
        TreeShape(min(max_nodes, w + (d - 1) * w * w), d, w) for w in widths for d in depths
    )


@dataclass(frozen=True)
class TreeConfig:
    """The shapes `TreePolicy` searches and how it learns sibling ranks (validated)."""

    # the shapes searched: shallow to deep, narrow to wide, each its full beam (`beam_shapes`)
    shapes: tuple[TreeShape, ...] = beam_shapes((3, 4, 5, 6, 8, 10), (2, 3, 4), 64)
    max_depth: int = 12  # depths the rank model tracks (deeper ones share the last row)
    max_width: int = 4  # ranks the rank model tracks: 0 .. max_width - 1
    rank_prior_weight: float = 4.0  # pseudo-trials behind each (depth, rank) prior, > 0
    rank_decay: float = 0.99  # per-round forgetting of the rank counts and the depth calibration
    shape_prior_weight: float = 1.0  # pseudo-rounds behind a shape's rank-model prediction
    shape_decay: float = 0.995  # per-round forgetting of a shape's measured acceptance
    # pseudo-mass (predicted reach) pulling each depth's calibration to the one above it, > 0
    reach_prior_weight: float = 2.0
    # tokens of optimism for a shape with no rounds behind it (UCB). 0: the calibrated model's
    # own optimism (priors of shapes never run) is the only exploration; a bonus would make every
    # untried shape of the grid cost a round, more than a ~20-round generation can repay
    explore_bonus: float = 0.0
    initial: TreeShape = TreeShape(nodes=16, depth=6, width=2)  # before any estimate

    def __post_init__(self) -> None:
        if not self.shapes or not all(isinstance(s, TreeShape) for s in self.shapes):
            raise ValueError(f"shapes must be a non-empty tuple of TreeShape, got {self.shapes!r}")
        check_int("max_depth", self.max_depth, 1, 256)
        check_int("max_width", self.max_width, 2, 64)
        for name in ("rank_prior_weight", "shape_prior_weight", "reach_prior_weight"):
            check_float(name, getattr(self, name), 0, lo_open=True)
        for name in ("rank_decay", "shape_decay"):
            check_float(name, getattr(self, name), 0, 1, lo_open=True)
        check_float("explore_bonus", self.explore_bonus, 0)
        if not isinstance(self.initial, TreeShape):
            raise ValueError(f"initial must be a TreeShape, got {self.initial!r}")


def beam_reach(
    accept: Callable[[int, int], float], depth: int, width: int, nodes: int
) -> list[float]:
    """The tree `grow_tree` grows, under a rank model: per level the `width` most probable
    nodes of the level before (the root first) each get `width` children, and the tree is the
    `nodes` most probable of all. Returns, per depth d = 0 .. depth - 1, P(the walk accepts a
    node at depth d), i.e. the sum of the path probabilities of the tree's depth-d nodes (their
    sum over depths is E[accepted tokens]). `accept(d, r)`: P(the target's token at depth d is
    the rank-r child), r < width; a node's probability is the product over its path."""
    return _ranked_cut(_ranked(_beam_levels(accept, depth, width)), depth, nodes)


def _beam_levels(accept: Callable[[int, int], float], depth: int, width: int) -> list[list[float]]:
    """Per level d < `depth` of the beam (`beam_reach`), the path probabilities of the nodes
    proposed there (fewer levels when a level has none). The levels of a shallower beam of the
    same width are a prefix of these."""
    levels: list[list[float]] = []
    frontier = [1.0]
    for d in range(depth):
        row = [accept(d, r) for r in range(width)]
        level = [q for p in frontier for a in row if (q := p * a) > 0]
        levels.append(level)
        frontier = sorted(level, reverse=True)[:width]
        if not frontier:
            break
    return levels


def _ranked(levels: Sequence[Sequence[float]]) -> list[tuple[float, int]]:
    """The beam's proposed nodes as (path probability, depth), most probable first; equally
    probable ones shallowest first, as proposed (a stable sort)."""
    nodes = [(p, d) for d, level in enumerate(levels) for p in level]
    nodes.sort(key=lambda node: node[0], reverse=True)
    return nodes


def _ranked_cut(ranked: Sequence[tuple[float, int]], depth: int, nodes: int) -> list[float]:
    """`beam_reach` from the beam's `_ranked` nodes: the first `nodes` of them shallower than
    `depth`, their probabilities summed per depth (a filter keeps the order of the rest, so one
    ranking serves every depth)."""
    reach = [0.0] * depth
    taken = 0
    for p, d in ranked:
        if taken == nodes:
            break
        if d < depth:
            reach[d] += p
            taken += 1
    return reach


class TreePolicy(AdaptivePolicy):
    """`AdaptivePolicy` whose speculative rounds may be token trees (see the module docstring),
    pipelined like chains when the config says so; chains and cloud-only decoding stay as the
    base policy runs them.

    Shapes: `TreeConfig.shapes`, by default a grid of depths and widths, each with its whole
    beam (`beam_shapes`). Each shape's accepted tokens per round are measured when it runs
    (`ShapeAcceptance`, decayed) and, until then, predicted by the calibrated rank model; the
    shape run is the one with the best rate, optionally optimistic (`explore_bonus`: a bonus
    that shrinks with the rounds behind a shape, as in UCB; off by default). Mode decisions
    (against chains and cloud-only) use the plain estimates. What the rank model, the
    calibration, the shapes and the runner-up rate learnt is carried to the next session on
    the link (`PolicyMemory`). On trees its exploration probes are chains of varied k: besides the
    chain's acceptance they keep the slope of t_v(n) identified, which trees of one size would
    not. On chains every other probe is a tree of the best-rated shape (`_probe`), so that the
    sibling ranks and the calibration keep learning while trees are not run."""

    def __init__(
        self,
        config: AdaptiveConfig | None = None,
        memory: PolicyMemory | None = None,
        tree: TreeConfig | None = None,
    ) -> None:
        super().__init__(config, memory)
        self.tree_config = tree if tree is not None else TreeConfig()
        t = self.tree_config
        self._ranks = RankAcceptance(
            t.max_width - 1, t.max_depth, t.rank_prior_weight, t.rank_decay
        )
        self._shapes = ShapeAcceptance(t.shape_decay)
        self._reach = ReachCalibration(t.max_depth, t.reach_prior_weight, t.rank_decay)
        if memory is not None and memory.ranks is not None:
            self._ranks = copy.deepcopy(memory.ranks)  # what trees showed on this link before
        if memory is not None and memory.shapes is not None:
            self._shapes = copy.deepcopy(memory.shapes)
        if memory is not None and memory.reach is not None:
            self._reach = copy.deepcopy(memory.reach)
        if memory is not None and memory.runner_up is not None:
            # Unlike the chain policy, the tree policy starts from the runner-up rate its link
            # showed: its tree rounds measured it (each walk's steps), and without it a warm
            # session prices its chains' branches as never hitting and runs trees where chains
            # with branches are faster (at 32 sessions and 50 ms: trees in 44-50% of rounds).
            self._runner_up = list(memory.runner_up)
        self._shape: TreeShape | None = t.initial
        # the best-rated tree at the last decision taken on chains: what a tree probe runs
        self._tree_probe: TreeShape | None = None
        self._probe_trees = False  # whose turn it is, on chains: tree probes alternate
        # a pipelined session drafts the next tree ahead of the pending one's verdict (until the
        # estimates say it does not pay)
        self._tree_ahead = True

    @property
    def shape(self) -> TreeShape | None:
        """The tree shape the policy currently runs (None: chains)."""
        return self._shape

    def limit_nodes(self, max_nodes: int) -> None:
        """The verifier takes trees of at most `max_nodes` nodes (its ``max_block_tokens``), and
        the edge cuts bigger ones to that: from now on every shape is searched, predicted and
        learnt at the budget it will really be sent with (nodes capped, depth at most the nodes;
        shapes that become equal merge). Without this a shape over the cap would be predicted at
        its full beam but run cut, and since a cut tree's rounds are not its shape's, its
        estimate would never learn otherwise."""
        max_nodes = check_int("max_nodes", max_nodes, 1)

        def capped(shape: TreeShape) -> TreeShape:
            nodes = min(shape.nodes, max_nodes)
            return dataclasses.replace(shape, nodes=nodes, depth=min(shape.depth, nodes))

        t = self.tree_config
        shapes = tuple(dict.fromkeys(capped(s) for s in t.shapes))
        self.tree_config = dataclasses.replace(t, shapes=shapes, initial=capped(t.initial))
        if self._shape is not None:
            self._shape = capped(self._shape)

    def memory(self) -> PolicyMemory:
        return dataclasses.replace(
            super().memory(),
            ranks=copy.deepcopy(self._ranks),
            shapes=copy.deepcopy(self._shapes),
            reach=copy.deepcopy(self._reach),
            runner_up=(self._runner_up[0], self._runner_up[1]),
        )

    def observe(self, obs: RoundObservation) -> None:
        # what the model predicted for this round, before the round teaches it anything
        shape = None
        if obs.tree is not None:
            # A tree cut short (the generation's end) is not its shape's. Shapes of one budget
            # and depth differ in width: the most children a node on the walk had tells which
            # ran (a beam gives every node it grows `width` children; the budget may drop some).
            ran = [
                s for s in self.tree_config.shapes if (s.nodes, s.depth) == (obs.k, obs.tree.levels)
            ]
            seen = max((children for children, _ in obs.tree.steps), default=0)
            shape = next((s for s in ran if s.width == seen), ran[0] if ran else None)
        predicted = None
        if shape is not None:
            accept = self._accept.probs(self.config.k_max + 1)
            predicted = beam_reach(self._prob(accept), shape.depth, shape.width, shape.nodes)
        super().observe(obs)
        if obs.tree is not None:
            self._ranks.update(obs.tree.steps)
        if shape is not None and predicted is not None:
            self._shapes.update((shape.nodes, shape.depth, shape.width), obs.accepted)
            self._reach.update(predicted, obs.accepted)

    def tree_rates(
        self, cost: CostModel, accept: Sequence[float], bonus: float = 0.0
    ) -> dict[TreeShape, float]:
        """Each shape of `TreeConfig.shapes` and its estimated rate (tokens/s); `bonus` > 0:
        the optimistic rate, `bonus` / sqrt(rounds + 1) tokens added to the estimate. A
        pipelined `cost` prices a round with the tree's hit probability, or serially where
        drafting ahead does not pay (module docstring)."""
        return {shape: rate for shape, (rate, _) in self._tree_rates(cost, accept, bonus).items()}

    def _tree_rates(
        self, cost: CostModel, accept: Sequence[float], bonus: float
    ) -> dict[TreeShape, tuple[float, bool]]:
        """`tree_rates`, and per shape whether drafting ahead of its rounds pays."""
        prob = self._prob(accept)
        weight = self.tree_config.shape_prior_weight
        deepest = max(shape.depth for shape in self.tree_config.shapes)
        factors = self._reach.factors(deepest)
        rates: dict[TreeShape, tuple[float, bool]] = {}
        # one beam per width, grown to the deepest shape of that width: shallower shapes'
        # levels are its prefix
        beams: dict[int, list[tuple[float, int]]] = {}
        for shape in sorted(self.tree_config.shapes, key=lambda s: -s.depth):
            if shape.width not in beams:
                beams[shape.width] = _ranked(_beam_levels(prob, shape.depth, shape.width))
        for shape in self.tree_config.shapes:
            reach = _ranked_cut(beams[shape.width], shape.depth, shape.nodes)
            prior = sum(f * p for f, p in zip(factors, reach, strict=False))
            key = (shape.nodes, shape.depth, shape.width)
            expected, rounds = self._shapes.mean(key, prior, weight)
            expected += bonus / (rounds + 1.0) ** 0.5
            round_ms = cost.round_ms(shape.depth, shape.nodes + 1)
            ahead = False
            if cost.pipelined:
                # P(the block drafted ahead is used): the walk follows the guessed path (the
                # rank-0 spine, its reach calibrated) to the leaf, and the bonus is the guess
                spine = math.prod(prob(d, 0) for d in range(shape.depth + 1))
                hit = min(factors[shape.depth - 1] * spine, 1.0)
                piped = cost.expected_round_ms(shape.depth, hit, shape.nodes + 1)
                round_ms, ahead = min(round_ms, piped), piped < round_ms
            rates[shape] = (1e3 * (1.0 + expected) / max(round_ms, 1e-9), ahead)
        return rates

    def _prob(self, accept: Sequence[float]) -> Callable[[int, int], float]:
        """a(d, r) of the rank model: rank 0's prior is the chain's acceptance at d.

        Tabulated for the depths and ranks the shapes can ask for (every shape's levels and
        the bonus below its deepest), since pricing the shape grid asks for each about a
        thousand times per decision: computed each time, that was most of the edge's CPU per
        round on a loaded host. Other (depth, rank) pairs are computed when asked."""
        last = len(accept) - 1
        depths = max(shape.depth for shape in self.tree_config.shapes) + 1
        ranks = max(shape.width for shape in self.tree_config.shapes)
        table = [
            [self._ranks.prob(d, r, accept[min(d, last)]) for r in range(ranks)]
            for d in range(depths)
        ]

        def prob(d: int, r: int) -> float:
            if d < depths and r < ranks:
                return table[d][r]
            return self._ranks.prob(d, r, accept[min(d, last)])

        return prob

    def _speculative_rate(self, cost: CostModel, accept: Sequence[float], chain: float) -> float:
        priced = self._tree_rates(cost, accept, 0.0)
        rates = {shape: rate for shape, (rate, _) in priced.items()}
        best_rate = max(rates.values(), default=0.0)
        # Like k, the round's kind and shape change only for a gain beyond `k_hysteresis`: the
        # estimates of neighbouring shapes are close and noisy, and each switch rests on a
        # prior until the new shape has rounds behind it.
        hysteresis = 1.0 + self.config.k_hysteresis
        on_chains = self._shape is None
        if best_rate * hysteresis < chain or (on_chains and best_rate <= chain * hysteresis):
            if not on_chains:
                logger.debug("trees -> chains (%.1f < %.1f tok/s)", best_rate, chain)
            self._shape = None
            self._tree_probe = max(rates, key=rates.__getitem__) if rates else None
            return chain
        bonus = self.tree_config.explore_bonus
        hopeful = self.tree_rates(cost, accept, bonus) if bonus > 0 else rates  # 0: the same
        choice = max(hopeful, key=hopeful.__getitem__)
        current = self._shape
        if current in hopeful and hopeful[choice] <= hopeful[current] * hysteresis:
            choice = current
        if choice != self._shape:
            logger.debug("tree shape %s -> %s (%.1f tok/s)", self._shape, choice, rates[choice])
        self._shape = choice
        self._tree_ahead = priced[choice][1]
        return rates[choice]

    def _hopeful_rate(self, cost: CostModel, z: float = 1.0) -> float:
        """The best speculative rate under an acceptance `z` standard errors higher, trees
        included: leaving trees for cloud-only must beat what trees could do, not chains."""
        upper = self._accept.upper(self.config.k_max + 1, z)
        return max(super()._hopeful_rate(cost, z), *self.tree_rates(cost, upper).values())

    def _probe(self) -> Decision | None:
        """On chains, every other exploration round is a tree of the best-rated shape (serial):
        trees left for chains are otherwise never run again, so their estimates, rank model
        and calibration stay what they were when trees lost, however the text or the load has
        changed since (seen: all 8 sessions of one prompt text on a loaded verifier drafting
        chains at 20.5 tokens/s while the fixed 16-node tree gave every text over 28). On trees,
        the probes stay chains of varied k (`AdaptivePolicy._probe`)."""
        if self._shape is None and self._tree_probe is not None:
            self._probe_trees = not self._probe_trees
            if self._probe_trees:
                shape = self._tree_probe
                return Decision(SPECULATIVE, shape.depth, tree=shape, probe=True, ahead=False)
        return super()._probe()

    def _speculative(self, k: int) -> Decision:
        if self._shape is None:
            return Decision(SPECULATIVE, k)
        return Decision(SPECULATIVE, self._shape.depth, tree=self._shape, ahead=self._tree_ahead)

    def __repr__(self) -> str:
        return f"TreePolicy(mode={self.mode!r}, k={self.k}, shape={self._shape})"
