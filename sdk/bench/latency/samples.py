"""What one measured generation leaves for the report: its tokens, wall time and rounds."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgespec.edge.records import RoundRecord


@dataclass(frozen=True)
class RoundSample:
    """The parts of a `RoundRecord` the report uses."""

    k: int
    drafted: int
    accepted: int
    mode: str  # "speculative" | "cloud_only"
    network_ms: float
    t_s: float | None  # seconds since the generation started (when its verdict arrived)
    tokens: int = 0  # tokens the round yielded (cloud-only: streamed) before any cut at the end
    # draft positions it could accept (a tree: its depth); None: `drafted`
    positions: int | None = None
    bytes_sent: int = 0  # bytes the edge sent for the round's block
    tree: bool = False  # the block was a token tree (drafted = its nodes)
    pipelined: bool = False  # the block was drafted ahead, during the round before, and used

    @property
    def depth(self) -> int:
        """Draft positions the round could accept: k for a chain, the depth of a tree."""
        return self.drafted if self.positions is None else self.positions

    @property
    def speculative(self) -> bool:
        return self.mode != "cloud_only" and self.drafted > 0


@dataclass(frozen=True)
class RoundCounts:
    """Aggregate speculative-round counts, for generations without per-round records (the
    co-located core keeps counts only)."""

    rounds: int
    drafted: int
    accepted: int
    k: int  # the fixed draft length


@dataclass
class RunSample:
    """One generation of one method: its output, wall time and rounds."""

    method: str
    prompt_index: int
    tokens: list[int]
    wall_s: float
    rounds: list[RoundSample] = field(default_factory=list)
    counts: RoundCounts | None = None  # instead of `rounds` (co-located)
    rep: int = 0
    max_new_tokens: int = 0
    pipeline_misses: int = 0  # blocks drafted ahead and dropped (the used ones: `rounds`)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0


def round_sample(record: RoundRecord) -> RoundSample:
    """The report's view of one edge round record."""
    return RoundSample(
        k=record.k,
        drafted=record.drafted,
        accepted=record.accepted,
        mode=record.mode,
        network_ms=record.timing.network_ms,
        t_s=record.t_ms / 1e3,
        tokens=record.tokens,
        positions=record.positions,
        bytes_sent=record.timing.bytes_sent,
        tree=record.tree is not None,
        pipelined=record.pipelined,
    )
