"""What crosses the policy boundary, and the baseline policies.

Per session the edge asks its `DraftLengthPolicy` for a `Decision` before each round (a
speculative round of k draft tokens, or a chunk of cloud-only decoding, where the verifier decodes
alone and streams its tokens) and tells it what the round cost (`RoundObservation`) once the
verdict is in. `FixedPolicy`, `HeuristicPolicy` (k += 2 when a block is accepted whole, k -= 1
otherwise) and `CloudOnlyPolicy` (the verifier decodes alone) are the baselines the adaptive
policy (`edgespec.core.adaptive`) is compared against; `edgespec.core.registry` builds any of
them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from edgespec.core.cost_model import K_LIMIT
from edgespec.core.tree import TreeShape
from edgespec.core.validation import check_int, check_ms

Mode = Literal["speculative", "cloud_only"]

SPECULATIVE: Mode = "speculative"
CLOUD_ONLY: Mode = "cloud_only"


@dataclass(frozen=True)
class TreeOutcome:
    """What a token-tree round showed, for a policy that learns tree shapes.

    `levels`: draft forwards spent growing the tree; `depth`: the tree's depth in levels (the
    most tokens one walk can accept). `steps`: one entry per step of
    the verifier's walk from the root, (children of the node the walk stood on, the sibling rank
    of the child it took, or -1 when the target's token was none of them); a step at a leaf is
    not listed (nothing to learn). `spine`: the depth of the rank-0 path (always the first
    child), the chain a chain round of the same draft would have sent; `spine_accepted`: how
    many of its tokens the walk accepted (the chain round's accepted count).
    """

    levels: int
    depth: int
    steps: tuple[tuple[int, int], ...]
    spine: int
    spine_accepted: int

    def __post_init__(self) -> None:
        check_int("levels", self.levels, 1, K_LIMIT)
        check_int("depth", self.depth, 1, K_LIMIT)
        check_int("spine", self.spine, 0, K_LIMIT)
        check_int("spine_accepted", self.spine_accepted, 0, self.spine)
        for children, rank in self.steps:
            check_int("children", children, 1)
            check_int("rank", rank, -1, children - 1)
        object.__setattr__(self, "steps", tuple(self.steps))


@dataclass(frozen=True)
class RoundObservation:
    """What the edge measured for one round (or one cloud-only step), fed to `observe`.

    Speculative round: `k` >= 1 draft tokens, `accepted` of them accepted; it commits
    accepted + 1 tokens. `network_ms` is the round's wall time from sending the block to receiving
    the verdict, less `verify_ms` and `queue_ms` (both reported by the verifier), i.e. the RTT plus
    serialisation.

    Cloud-only step: `cloud_only=True`, k = accepted = 0, `tokens` >= 1 streamed tokens;
    `verify_ms` is the verifier's compute for all of them, `queue_ms` their total wait, and
    `network_ms` whatever wall time the compute does not explain (about one RTT for the first step
    of a stream, about 0 after).
    """

    k: int  # draft tokens in the block (0 for a cloud-only step)
    accepted: int  # draft tokens accepted, 0..k
    draft_ms: float  # edge time spent drafting the whole block
    verify_ms: float  # verifier compute for the round
    network_ms: float  # round wall - verify - queue
    queue_ms: float = 0.0  # time the block waited at the verifier before its forward
    cloud_only: bool = False  # this was a cloud-only decode step, not a speculative round
    tokens: int | None = None  # tokens committed; None => accepted + 1 (speculative) or 1
    # A token-tree round: k is its node count, accepted its path length, draft_ms all levels.
    tree: TreeOutcome | None = None
    # The block was drafted ahead, during the round before it (a pipeline hit): it reached the
    # verifier while its own predecessor was pending, so its queue_ms includes that wait.
    ahead: bool = False
    # A chain round that rejected a draft token: whether the verifier's token there was the
    # draft's runner-up (what a branch drafted ahead bets on); None: no rejection, or unknown.
    runner_up: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cloud_only, bool):
            raise ValueError(f"cloud_only must be a bool, got {self.cloud_only!r}")
        for name in ("draft_ms", "verify_ms", "network_ms", "queue_ms"):
            object.__setattr__(self, name, check_ms(name, getattr(self, name)))
        if self.cloud_only:
            check_int("k", self.k, 0, 0)
            check_int("accepted", self.accepted, 0, 0)
            tokens = 1 if self.tokens is None else check_int("tokens", self.tokens, 1)
        else:
            k = check_int("k", self.k, 1, K_LIMIT)
            accepted = check_int("accepted", self.accepted, 0, k)
            tokens = accepted + 1
            if self.tokens is not None and self.tokens != tokens:
                raise ValueError(
                    f"tokens must equal accepted + 1 = {tokens} for a speculative round, "
                    f"got {self.tokens!r}"
                )
        object.__setattr__(self, "tokens", tokens)


@dataclass(frozen=True)
class Decision:
    """What the edge does next.

    `speculative`: draft `k` >= 1 tokens and send them for verification. `cloud_only`: ask the
    verifier to decode `stream_tokens` tokens on its own and stream them (k = 0), then ask again.
    `probe` marks an exploration round (a k or a mode other than the one the policy currently
    judges best, chosen to keep its estimates fresh); it is reported, never required to be acted
    on differently. `ahead` False: a pipelined session does not draft this block ahead of the
    pending block's verdict (the policy judges that drafting ahead costs more than it saves); it
    is drafted once the verdict is in.
    """

    mode: Mode
    k: int
    stream_tokens: int = 0  # cloud_only: tokens to stream before asking again; else 0
    probe: bool = False
    # speculative: draft a token tree of this shape (k = its depth), where the session can (a
    # verifier with tree_blocks, a croppable draft cache); a chain of k otherwise
    tree: TreeShape | None = None
    ahead: bool = True

    def __post_init__(self) -> None:
        if self.mode == SPECULATIVE:
            check_int("k", self.k, 1, K_LIMIT)
            check_int("stream_tokens", self.stream_tokens, 0, 0)
        elif self.mode == CLOUD_ONLY:
            check_int("k", self.k, 0, 0)
            check_int("stream_tokens", self.stream_tokens, 1)
        else:
            raise ValueError(f"mode must be 'speculative' or 'cloud_only', got {self.mode!r}")
        if not isinstance(self.probe, bool):
            raise ValueError(f"probe must be a bool, got {self.probe!r}")
        if not isinstance(self.ahead, bool):
            raise ValueError(f"ahead must be a bool, got {self.ahead!r}")
        if self.tree is not None:
            if self.mode != SPECULATIVE or not isinstance(self.tree, TreeShape):
                raise ValueError(
                    f"tree must be a TreeShape of a speculative decision, got {self.tree!r}"
                )
            check_int("k", self.k, self.tree.depth, self.tree.depth)


@runtime_checkable
class DraftLengthPolicy(Protocol):
    """Per session: `choose` before each round, `observe` once its verdict is in.

    `observe` takes any round, including one the policy did not choose (e.g. a block drafted
    ahead); policies never assume the two calls alternate. `choose` may be told `tokens_left`:
    at most that many tokens remain to be generated (max_new_tokens less what is committed; a
    block still pending is not subtracted, and a stop token may end the generation sooner);
    None when no bound is known. A policy may ignore it.
    """

    def choose(self, tokens_left: int | None = None) -> Decision: ...

    def observe(self, obs: RoundObservation) -> None: ...


# ---------------------------------------------------------------------------------------------
# baseline policies


class FixedPolicy:
    """Always drafts `k` tokens; ignores what it observes."""

    def __init__(self, k: int = 4) -> None:
        self.k = check_int("k", k, 1, K_LIMIT)

    def choose(self, tokens_left: int | None = None) -> Decision:
        return Decision(SPECULATIVE, self.k)

    def observe(self, obs: RoundObservation) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedPolicy(k={self.k})"


class HeuristicPolicy:
    """The acceptance heuristic: k += 2 after a block accepted whole, k -= 1 after any rejection,
    within [k_min, k_max]. It reacts to acceptance only and never sees the link."""

    def __init__(self, k0: int = 4, k_min: int = 1, k_max: int = 16) -> None:
        self.k_min = check_int("k_min", k_min, 1, K_LIMIT)
        self.k_max = check_int("k_max", k_max, self.k_min, K_LIMIT)
        self.k = check_int("k0", k0, self.k_min, self.k_max)

    def choose(self, tokens_left: int | None = None) -> Decision:
        return Decision(SPECULATIVE, self.k)

    def observe(self, obs: RoundObservation) -> None:
        if obs.cloud_only:
            return
        if obs.accepted == obs.k:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)

    def __repr__(self) -> str:
        return f"HeuristicPolicy(k={self.k}, k_min={self.k_min}, k_max={self.k_max})"


class FixedTreePolicy:
    """Always drafts a token tree of one shape (the tree counterpart of `FixedPolicy`)."""

    # The default: the shape that measured fastest on the demo pair from 0 to 50 ms RTT.
    def __init__(self, nodes: int = 16, depth: int = 6, width: int = 2) -> None:
        self.shape = TreeShape(nodes, depth, width)

    def choose(self, tokens_left: int | None = None) -> Decision:
        return Decision(SPECULATIVE, self.shape.depth, tree=self.shape)

    def observe(self, obs: RoundObservation) -> None:
        pass

    def __repr__(self) -> str:
        s = self.shape
        return f"FixedTreePolicy(nodes={s.nodes}, depth={s.depth}, width={s.width})"


STREAM_ALL = 1 << 20  # CloudOnlyPolicy's default chunk: more than any generation, i.e. one stream


class CloudOnlyPolicy:
    """The cloud-only baseline: the verifier decodes alone and streams, `stream_tokens` tokens per
    request (the edge clips a chunk to the tokens left, so the default is one stream for the
    whole generation, paying one RTT). Drafts nothing; ignores what it observes."""

    def __init__(self, stream_tokens: int = STREAM_ALL) -> None:
        self.stream_tokens = check_int("stream_tokens", stream_tokens, 1)

    def choose(self, tokens_left: int | None = None) -> Decision:
        return Decision(CLOUD_ONLY, 0, stream_tokens=self.stream_tokens)

    def observe(self, obs: RoundObservation) -> None:
        pass

    def __repr__(self) -> str:
        return f"CloudOnlyPolicy(stream_tokens={self.stream_tokens})"
