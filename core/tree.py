"""Draft token trees: their shape, their attention mask, and the exact walk that verifies them.

A tree block holds n draft nodes; node i has a token and a parent: -1 for a child of the root
(the last committed token), else the index of an earlier node (parents precede children). A node
at depth d (a root child has depth 0) stands for the token at sequence position base + d, where
base is the committed length. One forward scores every node: each attends to the committed
prefix and to its own ancestors only (`tree_attention_mask`), at position base + depth.

Acceptance (`walk_tree`) is the chain rule applied along one path: from the root, the target's
token at the next position (its argmax when greedy, its coupled token under coupled sampling,
`edgespec.core.coupling`) is looked up among the current node's children; a child carrying it
is accepted and the walk continues from it; otherwise the target's token ends the round. Every
emitted token is therefore the target's own: the output is the target alone's, whatever the
tree (as for chains, the tree only decides how many tokens one forward commits). Rejection
sampling walks with `rejection_walk` instead (siblings tested against the residual of p).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.coupling import coupled_tokens
from edgespec.core.params import SamplingParams
from edgespec.core.sampling import categorical
from edgespec.core.validation import check_int, is_int

ROOT = -1  # the parent of a root child: the last committed token


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


@dataclass(frozen=True)
class DraftTree:
    """n draft nodes: `tokens[i]` with parent `parents[i]` (ROOT or an index < i)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        check_parents(self.parents, len(self.tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> list[int]:
        """Depth of each node (root children 0)."""
        return node_depths(self.parents)

    def children(self, node: int) -> list[int]:
        """Indices of `node`'s children (ROOT: the root's), in index order."""
        return [i for i, parent in enumerate(self.parents) if parent == node]

    def path_to(self, node: int) -> list[int]:
        """Node indices from a root child down to `node`."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def check_parents(parents: Sequence[int], n: int) -> tuple[int, ...]:
    """`parents` as a tuple if it describes a tree of `n` nodes (one entry per node, each ROOT
    or an earlier node's index), else ValueError starting with the field at fault ("parents"
    or "parents[i]") and the allowed range."""
    parents = tuple(parents)
    if len(parents) != n:
        raise ValueError(f"parents must have one entry per token ({n}), got {len(parents)}")
    for i, parent in enumerate(parents):
        if not is_int(parent) or not ROOT <= parent < i:
            raise ValueError(f"parents[{i}] must be an int in [-1, {i}), got {parent!r}")
    return parents


def node_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node of a tree given by `parents` (as in `DraftTree`; root children 0)."""
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent == ROOT else out[parent] + 1)
    return out


def chain(tokens: Sequence[int]) -> DraftTree:
    """A chain (width 1) as a tree: each token the child of the one before."""
    return DraftTree(tuple(tokens), tuple(range(-1, len(tokens) - 1)))


def tree_attention_mask(
    parents: Sequence[int], prefix_len: int, sliding_window: int | None = None
) -> Tensor:
    """Boolean (n, prefix_len + n): row i may attend to every cached prefix position and to
    node i's ancestors and itself (`parents` as in `DraftTree`, ROOT meaning the prefix).

    With `sliding_window` w, a key is also dropped when it lies w or more positions before the
    query (positions: prefix j at j, node i at prefix_len + depth_i), as a sliding layer would.
    """
    n = len(parents)
    allowed = torch.zeros(n, prefix_len + n, dtype=torch.bool)
    allowed[:, :prefix_len] = True
    depths = node_depths(parents)
    for i in range(n):
        node = i
        while node != ROOT:
            allowed[i, prefix_len + node] = True
            node = parents[node]
    if sliding_window is not None:
        query = torch.tensor(depths)[:, None] + prefix_len  # (n, 1)
        key = torch.cat([torch.arange(prefix_len), torch.tensor(depths) + prefix_len])[None]
        allowed &= (query - key) < sliding_window
    return allowed


@dataclass(frozen=True)
class TreeVerdict:
    """A tree round's outcome: the accepted nodes (a root-to-node path) and the target's token
    that ends the round (after the last accepted node); `len(path) + 1` tokens are emitted."""

    path: tuple[int, ...]
    token: int


def walk_tree(tree: DraftTree, pick: Callable[[int, int], int]) -> TreeVerdict:
    """Accept the longest root path whose tokens are the target's own.

    `pick(row, depth)` returns the target's token at depth `depth` (position base + depth) from
    logits row `row`: row 0 scores the root (the logits after the last committed token), row
    i + 1 the position after node i. Calls `pick` once per step of the walk.
    """
    node, depth = ROOT, 0
    path: list[int] = []
    while True:
        token = pick(node + 1, depth)
        match = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if match is None:
            return TreeVerdict(path=tuple(path), token=token)
        path.append(match)
        node, depth = match, depth + 1


def walk_steps(
    tree: DraftTree, path: Sequence[int]
) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """What a walk along accepted `path` showed: per step from the root, (children of the node
    stood on, rank among them of the child taken or -1 at the step that ended the walk), leaves
    skipped; and the depth of the rank-0 spine (first children) with how much of it the walk
    accepted. Children rank in index order (`grow_tree` lists a node's children best first)."""
    steps: list[tuple[int, int]] = []
    node = ROOT
    for nxt in [*path, None]:
        kids = tree.children(node)
        if kids:
            steps.append((len(kids), kids.index(nxt) if nxt is not None else -1))
        if nxt is None:
            break
        node = nxt
    spine, node = 0, ROOT
    while kids := tree.children(node):
        spine, node = spine + 1, kids[0]
    taken = 0
    while taken < len(steps) and steps[taken][1] == 0:
        taken += 1
    return tuple(steps), spine, min(taken, spine)


def rejection_walk(
    tree: DraftTree, target_probs: Tensor, draft_probs: Tensor, generator: torch.Generator | None
) -> TreeVerdict:
    """Rejection sampling over a tree whose siblings were drawn independently from one q (the
    draft's distribution at their parent), as in SpecInfer's multi-step speculative sampling.

    `target_probs` (n + 1, V): row 0 is p at the root, row i + 1 p after node i. `draft_probs`
    (n, V): row i is the q node i was drawn from (the same for siblings). At each node of the
    walk its children are tried in index order: child x is accepted with probability
    min(1, p(x) / q(x)); a rejection replaces p by the residual norm(max(p - q, 0)) for the next
    sibling. The first accepted child continues the walk; when all are rejected (or at a leaf) a
    token drawn from the current p ends it. The emitted tokens follow the target's distribution
    exactly (each step: the sibling tests are rejection sampling against i.i.d. proposals, and
    the residual is what is left of p after each). Greedy drafts are the one-hot case."""
    node = ROOT
    path: list[int] = []
    while True:
        p = target_probs[node + 1].to(torch.float64)
        taken = None
        for child in tree.children(node):
            x = tree.tokens[child]
            q = draft_probs[child].to(torch.float64)
            q = q / q.sum()
            u = float(torch.rand((), generator=generator, device=p.device, dtype=torch.float64))
            if u * float(q[x]) < float(p[x]):
                taken = child
                break
            residual = (p - q).clamp_(min=0.0)
            mass = float(residual.sum())
            # p <= q everywhere (mass 0) leaves nothing to reject into: then p(x) >= q(x) for x
            # in q's support, and the test above accepts surely; keep p for rounding's sake.
            p = residual / mass if mass > 0 else p
        if taken is None:
            return TreeVerdict(path=tuple(path), token=int(categorical(p, generator)))
        path.append(taken)
        node = taken


def target_pick(rows: Tensor, params: SamplingParams, base: int) -> Callable[[int, int], int]:
    """`walk_tree`'s pick over target logits `rows` (n + 1, V): the argmax when greedy, else the
    coupled token at position base + depth (rejection sampling walks with `rejection_walk`)."""
    if params.is_greedy:
        argmax = rows.argmax(-1).tolist()
        return lambda row, depth: argmax[row]
    if not params.is_coupled or params.seed is None:
        raise ValueError("tree verification needs greedy or seeded coupled sampling params")
    seed = params.seed

    def pick(row: int, depth: int) -> int:
        return int(coupled_tokens(rows[row][None], params, seed, [base + depth])[0])

    return pick
