"""The draft side of token trees: grow a draft tree from the draft model's distribution.

Growth (`grow_tree`) is best-first by cumulative draft log-probability, one draft forward per
level, as EAGLE-2's dynamic trees: each level expands the `width` best nodes of the one before,
and the tree sent is the `nodes` best of all proposed. Under greedy decoding a node's candidates are the draft's most likely tokens; under
coupled sampling they are its top coupled proposals (largest processed log-probability plus the
seed's Gumbel noise at that position), the list the target's coupled token is most likely in.

`Drafter.propose_tree` sends the tree as one block; `Verifier` scores it in one target forward
and walks it exactly (`edgespec.core.tree`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.coupling import coupled_scores
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import categorical, logits_to_probs
from edgespec.core.tree import ROOT, DraftTree, TreeShape

# P(the target's coupled token is the draft's rank-r coupled proposal), a prior by rank.
COUPLED_RANK_PRIOR = (0.6, 0.15, 0.07, 0.04, 0.02)


@dataclass(frozen=True)
class GrownTree:
    """A drafted tree: the tree, per node its index among the nodes fed to the draft (None if
    not fed: the draft cache holds committed + the fed nodes, in order), under rejection
    sampling the q each node was drawn from (n, V) (None otherwise), and `guess`: the path
    (node indices, root child first) to the deepest level's node of highest cumulative draft
    log-probability (ties: the earliest node), the walk a block drafted ahead bets on."""

    tree: DraftTree
    fed_of: list[int | None]
    q: Tensor | None = None
    guess: tuple[int, ...] = ()


def _candidates(
    logits: Tensor,
    params: SamplingParams,
    position: int,
    width: int,
    generator: torch.Generator | None,
) -> tuple[list[int], list[float], Tensor | None]:
    """Proposals of one draft row (V,) for `position`: the top `width` and their draft
    log-probabilities (greedy); the top `width` coupled proposals and their prior by rank
    (coupled sampling); or `width` independent draws from q, their log q and q (rejection)."""
    if params.is_greedy:
        logq = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logq, width)
        return best.indices.tolist(), best.values.tolist(), None
    if not params.is_coupled:
        q = logits_to_probs(logits, params)  # (V,)
        drawn = categorical(q.expand(width, -1), generator)  # (width,) i.i.d.
        return drawn.tolist(), torch.log(q[drawn]).tolist(), q
    assert params.seed is not None
    keyed = coupled_scores(logits[None], params, params.seed, [position])[0]
    finite = int(torch.isfinite(keyed).sum())
    top: list[int] = torch.topk(keyed, min(width, finite)).indices.tolist()
    # Under coupling the draft's q says little about which candidate the target's noisy argmax
    # lands on; the rank of the candidate's keyed score does: a fixed prior per rank.
    prior = [
        math.log(COUPLED_RANK_PRIOR[min(r, len(COUPLED_RANK_PRIOR) - 1)]) for r in range(len(top))
    ]
    return top, prior, None


def grow_tree(
    runner: ModelRunner,
    committed: Sequence[int],
    params: SamplingParams,
    shape: TreeShape,
    generator: torch.Generator | None = None,
) -> GrownTree:
    """Grow a draft tree after `committed` (the runner's cache must hold a prefix of it).

    Per level, the `width` best nodes of the level before (by cumulative draft log-probability;
    the root first) each propose `width` children; the level's `width` best are fed to the
    draft in one forward (tree attention) to propose the next level. Greedy and coupled: at the
    end the `nodes` best of everything proposed form the tree (closed under ancestors: a child's
    cumulative log-probability never exceeds its parent's). Rejection sampling (children drawn
    from q with `generator`): a node's children are never selected by their own draws, which
    would bias them away from q; every proposed child is kept, and growth stops before a
    node's children would pass the `nodes` budget.
    """
    sampling = not (params.is_greedy or params.is_coupled)
    logits = runner.extend(list(committed[runner.length :]))[-1:]  # (1, V): the root's row
    base = len(committed)
    tokens: list[int] = []
    parents: list[int] = []
    value: list[float] = []
    fed_of: list[int | None] = []
    q_rows: list[Tensor] = []
    fed_parents: list[int] = []
    frontier = [ROOT]
    for depth in range(shape.depth):
        level_start = len(tokens)
        for row, node in enumerate(frontier):
            if sampling and len(tokens) + shape.width > shape.nodes:
                break
            ids, logq, q = _candidates(logits[row], params, base + depth, shape.width, generator)
            start = 0.0 if node == ROOT else value[node]
            for t, lq in zip(ids, logq, strict=True):
                tokens.append(t)
                parents.append(node)
                value.append(start + lq)
                fed_of.append(None)
                if q is not None:
                    q_rows.append(q)
        level = range(level_start, len(tokens))
        frontier = sorted(level, key=lambda i: -value[i])[: shape.width]
        if depth + 1 == shape.depth or not frontier:
            break
        frontier.sort()
        for i in frontier:
            fed_of[i] = len(fed_parents)
            parent = parents[i]
            fed_parents.append(ROOT if parent == ROOT else fed_of[parent])  # type: ignore[arg-type]
        logits = runner.extend_tree([tokens[i] for i in frontier], fed_parents, tree_start=base)
    if sampling:
        chosen = list(range(len(tokens)))
    else:
        # The `nodes` best, parents before children (ties: the shallower, earlier node first).
        chosen = sorted(range(len(tokens)), key=lambda i: (-value[i], i))[: shape.nodes]
        chosen.sort()
    index = {old: new for new, old in enumerate(chosen)}
    tree = DraftTree(
        tuple(tokens[i] for i in chosen),
        tuple(ROOT if parents[i] == ROOT else index[parents[i]] for i in chosen),
    )
    q = torch.stack([q_rows[i] for i in chosen]) if sampling and chosen else None
    return GrownTree(tree, [fed_of[i] for i in chosen], q, _likeliest_path(tree, chosen, value))


def _likeliest_path(
    tree: DraftTree, chosen: Sequence[int], value: Sequence[float]
) -> tuple[int, ...]:
    """The path to the deepest level's node of highest value (`value` by grown index, `chosen`
    mapping the tree's nodes to it); () for an empty tree."""
    if not chosen:
        return ()
    depths = tree.depths
    node = min(range(len(chosen)), key=lambda j: (-depths[j], -value[chosen[j]], j))
    path = []
    while node != ROOT:
        path.append(node)
        node = tree.parents[node]
    return tuple(reversed(path))
