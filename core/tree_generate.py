"""Token trees end to end with both models co-located: grow a draft tree, verify it in one target
forward, keep the accepted path's KV on both sides.

Growth (`grow_tree`) is best-first by cumulative draft log-probability, one draft forward per
level, as EAGLE-2's dynamic trees: each level expands the `width` best nodes of the one before,
and the tree sent is the `nodes` best of all proposed. Under greedy decoding a node's candidates are the draft's most likely tokens; under
coupled sampling they are its top coupled proposals (largest processed log-probability plus the
seed's Gumbel noise at that position), the list the target's coupled token is most likely in.

`generate_tree` is the co-located loop the distributed protocol will follow; its output is the
target alone's (greedy, or coupled with the same seed), whatever the tree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.coupling import coupled_scores
from edgespec.core.generate import GenerationResult, SpecStats
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.session import FINISH_LENGTH, FINISH_STOP, check_prompt_ids
from edgespec.core.tree import ROOT, DraftTree, target_pick, walk_tree
from edgespec.core.validation import check_int

# P(the target's coupled token is the draft's rank-r coupled proposal), a prior by rank.
COUPLED_RANK_PRIOR = (0.6, 0.15, 0.07, 0.04, 0.02)


@dataclass(frozen=True)
class TreeShape:
    """A tree budget: at most `nodes` nodes, `depth` levels, `width` children per node."""

    nodes: int = 16
    depth: int = 6
    width: int = 3

    def __post_init__(self) -> None:
        check_int("nodes", self.nodes, 1, 4096)
        check_int("depth", self.depth, 1, 256)
        check_int("width", self.width, 1, 64)


def _candidates(
    logits: Tensor, params: SamplingParams, position: int, width: int
) -> tuple[list[int], list[float]]:
    """The top `width` proposals of one draft row (V,) for `position` and their draft
    log-probabilities (greedy), or their prior by rank (coupled sampling)."""
    if params.is_greedy:
        logq = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logq, width)
        return best.indices.tolist(), best.values.tolist()
    assert params.seed is not None
    keyed = coupled_scores(logits[None], params, params.seed, [position])[0]
    finite = int(torch.isfinite(keyed).sum())
    top: list[int] = torch.topk(keyed, min(width, finite)).indices.tolist()
    # Under coupling the draft's q says little about which candidate the target's noisy argmax
    # lands on; the rank of the candidate's keyed score does: a fixed prior per rank (to be
    # replaced by acceptance measured per depth and rank).
    return top, [
        math.log(COUPLED_RANK_PRIOR[min(r, len(COUPLED_RANK_PRIOR) - 1)]) for r in range(len(top))
    ]


def grow_tree(
    runner: ModelRunner, committed: Sequence[int], params: SamplingParams, shape: TreeShape
) -> tuple[DraftTree, list[int | None]]:
    """Grow a draft tree after `committed` (the runner's cache must hold a prefix of it).

    Per level, the `width` best nodes of the level before (by cumulative draft log-probability;
    the root first) each propose `width` children; the level's `width` best are fed to the
    draft in one forward (tree attention) to propose the next level. At the end the `nodes`
    best of everything proposed form the tree (closed under ancestors: a child's cumulative
    log-probability never exceeds its parent's). Returns the tree and, per node, its index among
    the fed nodes (None if not fed): the draft cache holds committed + the fed nodes, in order.
    """
    logits = runner.extend(list(committed[runner.length :]))[-1:]  # (1, V): the root's row
    base = len(committed)
    tokens: list[int] = []
    parents: list[int] = []
    value: list[float] = []
    fed_of: list[int | None] = []
    fed_parents: list[int] = []
    frontier = [ROOT]
    for depth in range(shape.depth):
        level_start = len(tokens)
        for row, node in enumerate(frontier):
            ids, logq = _candidates(logits[row], params, base + depth, shape.width)
            start = 0.0 if node == ROOT else value[node]
            for t, lq in zip(ids, logq, strict=True):
                tokens.append(t)
                parents.append(node)
                value.append(start + lq)
                fed_of.append(None)
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
    # The `nodes` best, parents before children (ties: the shallower, earlier node first).
    chosen = sorted(range(len(tokens)), key=lambda i: (-value[i], i))[: shape.nodes]
    chosen.sort()
    index = {old: new for new, old in enumerate(chosen)}
    tree = DraftTree(
        tuple(tokens[i] for i in chosen),
        tuple(ROOT if parents[i] == ROOT else index[parents[i]] for i in chosen),
    )
    return tree, [fed_of[i] for i in chosen]


def generate_tree(
    target: ModelRunner,
    draft: ModelRunner,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    shape: TreeShape,
) -> GenerationResult:
    """Speculative decoding with draft trees, both models co-located: the target alone's output
    (greedy, or coupled sampling with params' seed; one is drawn when None). Resets both caches.
    """
    prompt = check_prompt_ids(prompt_ids, target.vocab_size)
    params = params.with_seed() if params.is_coupled else params
    stop = frozenset(params.stop_token_ids)
    committed = list(prompt)
    generated: list[int] = []
    stats = SpecStats()
    t0, d0 = target.forwards, draft.forwards
    target.reset()
    draft.reset()
    if len(prompt) > 1:
        target.prefill(prompt[:-1])
        draft.prefill(prompt[:-1])
    reason = None
    while reason is None:
        left = params.max_new_tokens - len(generated)
        depth = min(shape.depth, left - 1)
        if depth > 0:
            tree, fed_of = grow_tree(
                draft, committed, params, TreeShape(shape.nodes, depth, shape.width)
            )
        else:
            tree, fed_of = DraftTree((), ()), []
        # Target: the committed tokens its cache lacks (a chain), then the tree, in one forward.
        start = target.length
        missing = committed[start:]
        m = len(missing)
        parents = list(range(-1, m - 1)) + [p + m if p >= 0 else m - 1 for p in tree.parents]
        rows = target.extend_tree(missing + list(tree.tokens), parents)[m - 1 :]  # (n + 1, V)
        verdict = walk_tree(tree, target_pick(rows, params, len(committed)))
        target.keep_nodes(start, list(range(m)) + [m + i for i in verdict.path])
        if depth > 0:  # the draft cache holds committed + the first `fed` nodes
            fed_path = [fed_of[i] for i in verdict.path if fed_of[i] is not None]
            draft.keep_nodes(len(committed), fed_path)  # type: ignore[arg-type]
        stats.observe_round(len(tree), len(verdict.path))
        new = [tree.tokens[i] for i in verdict.path] + [verdict.token]
        for t in new:
            committed.append(t)
            generated.append(t)
            if t in stop:
                reason = FINISH_STOP
                break
            if len(generated) >= params.max_new_tokens:
                reason = FINISH_LENGTH
                break
    stats.target_forwards = target.forwards - t0
    stats.draft_forwards = draft.forwards - d0
    return GenerationResult(tokens=generated, finish_reason=reason, stats=stats, seed=params.seed)
