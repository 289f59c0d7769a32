"""What a generation reports: one `RoundRecord` per verification round (or cloud-only stream),
the running `EdgeStats`, and the events `EdgeEngine.generate` yields (`TokensEvent`, then one
`SummaryEvent`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, RoundObservation, TreeOutcome
from edgespec.edge.round_timing import RoundTiming


@dataclass(frozen=True)
class RoundRecord:
    """One round as the edge saw it (milliseconds): a verified block, or one cloud-only stream.

    `tokens` is what the round yields before any cut at a stop token or max_new_tokens: accepted
    + 1 for a speculative round (the E(k) of the draft-length model), the tokens streamed for a
    cloud-only one. `round_ms` is the session's wall time spent on the round: from the end of
    the previous round (or the block's send, if later) to its (last) verdict; with pipelining
    the block may have been drafted and sent during the previous round, so round_ms can be
    smaller than draft + network + verify.
    """

    seq: int
    k: int  # draft length the policy chose (after clipping); 0 for cloud-only
    drafted: int  # draft tokens sent (k, or fewer near max_new_tokens or after a stop token)
    accepted: int
    draft_ms: float  # draft compute for the block (a block drafted ahead: its guess too)
    round_ms: float
    apply_ms: float  # committing the verdict(s) (Drafter.apply)
    timing: RoundTiming  # link timing (cloud-only: verifier compute summed over the stream)
    attempts: int  # 1 + link failures during the round
    mode: str = SPECULATIVE  # "speculative" | "cloud_only"
    tokens: int = 0
    t_wall: float = 0.0  # time.time() when the round's (last) verdict arrived
    t_ms: float = 0.0  # the same, in ms since the generate call started
    pipelined: bool = False  # the block was drafted ahead, during the previous round, and used
    probe: bool = False  # the policy marked the decision an exploration probe
    draft_forwards: int = 0  # draft forward passes spent on the block
    tree: TreeOutcome | None = None  # a token-tree round: what its walk showed (drafted = nodes)
    # a chain that rejected a draft token: whether the verifier's token was the draft's
    # runner-up there (`Drafter.last_runner_up`)
    runner_up: bool | None = None
    # the (last) verdict read -> the round recorded: parsing it, `apply_ms`, the bookkeeping;
    # the next round's `round_ms` starts where this ends (0: not measured, `apply_ms` stands in)
    commit_ms: float = 0.0
    # Pipelining: drafting for a later block, run on the edge after this round's block was sent
    # and before its verdict was read (the read waits for it): it overlaps the verifier's work
    ahead_draft_ms: float = 0.0

    @property
    def positions(self) -> int:
        """Draft positions the round could accept: k for a chain, the depth of a tree."""
        return self.drafted if self.tree is None else self.tree.depth

    @property
    def network_ms(self) -> float:
        """Wall time of the round not explained by verifier compute and queueing (~ the RTT)."""
        return self.timing.network_ms

    @property
    def on_path_draft_ms(self) -> float:
        """The drafting on this round's own time: its block's, unless the block was drafted
        ahead (`pipelined`), during the round before, while that round's verdict travelled."""
        return 0.0 if self.pipelined else self.draft_ms

    @property
    def cycle_ms(self) -> float:
        """The round's whole wall time: the previous round recorded -> this one recorded
        (`round_ms` + `commit_ms`), so that consecutive rounds' cycles add up to the session's
        time with nothing between them."""
        return self.round_ms + (self.commit_ms or self.apply_ms)

    @property
    def awaited_compute_ms(self) -> float:
        """The compute on the round's path while its verdict was due: the longer of the
        verifier's (`verify_ms`) and the edge's drafting ahead (`ahead_draft_ms`). The two run
        at once, and the verdict is read once the drafting is done, so whichever ends later is
        the path."""
        return max(self.timing.verify_ms, self.ahead_draft_ms)

    @property
    def overhead_ms(self) -> float:
        """Framework time on the round's path: its `cycle_ms` less the compute on that path,
        the drafting on the round's own time (`on_path_draft_ms`) and `awaited_compute_ms`.
        For a block drafted ahead, subtracting its own drafting as well would count time the
        round never spent (and come out negative); not subtracting a drafting ahead that
        outlasts the forward would count draft compute as the link's."""
        return self.cycle_ms - self.on_path_draft_ms - self.awaited_compute_ms


def observation_from_record(record: RoundRecord) -> RoundObservation | None:
    """The controller's view of a round (`edgespec.core.policies.RoundObservation`), or None for
    a round it cannot learn from (a speculative round with no draft token, near the end).

    Speculative: k = the draft tokens sent, draft_ms = the time per draft forward times k, or a
    tree's levels (a block drafted ahead also paid a forward for its guessed bonus token),
    network_ms clipped at 0.
    Cloud-only: one step of `tokens` streamed tokens with the stream's summed compute and queue.
    """
    t = record.timing
    network = max(t.network_ms, 0.0)
    if record.mode == CLOUD_ONLY:
        if record.tokens < 1:
            return None
        return RoundObservation(
            k=0,
            accepted=0,
            draft_ms=0.0,
            verify_ms=max(t.verify_ms, 0.0),
            network_ms=network,
            queue_ms=max(t.queue_ms, 0.0),
            cloud_only=True,
            tokens=record.tokens,
        )
    if record.drafted < 1:
        return None
    forwards = record.drafted if record.tree is None else record.tree.levels
    per_forward = record.draft_ms / max(record.draft_forwards, forwards)
    return RoundObservation(
        k=record.drafted,
        accepted=record.accepted,
        draft_ms=max(per_forward * forwards, 0.0),
        tree=record.tree,
        verify_ms=max(t.verify_ms, 0.0),
        network_ms=network,
        queue_ms=max(t.queue_ms, 0.0),
        ahead=record.pipelined,
        runner_up=record.runner_up,
    )


@dataclass
class EdgeStats:
    """Counters of one session (mirrors `GenerateStats` on the wire, plus per-round records)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # draft tokens sent in each round
    time_to_first_token_ms: float = 0.0
    time_per_output_token_ms: float = 0.0
    bytes_sent: int = 0  # serialized bytes: blocks + OpenSession requests
    bytes_received: int = 0
    reconnects: int = 0  # sessions reopened after a link failure
    evictions: int = 0  # times the verifier evicted the session (it was reopened)
    verifier: str = ""  # address of the verifier that finished the session
    pipeline_hits: int = 0  # blocks drafted ahead and used
    pipeline_misses: int = 0  # blocks drafted ahead and dropped (the verifier answers STALE)
    cloud_only_tokens: int = 0  # tokens the verifier decoded alone
    policy: str = ""  # the policy's repr at the end of the session
    pipelined: bool = False
    compute_profile: str = "real"  # the edge's (draft) compute profile
    verifier_compute_profile: str = ""  # the verifier's, as it reported it
    warm_start: bool = False  # the adaptive policy started from the link's memory
    round_records: list[RoundRecord] = field(default_factory=list)

    def observe_round(self, record: RoundRecord) -> None:
        if record.mode == CLOUD_ONLY:
            self.cloud_only_tokens += record.tokens
        self.rounds += 1
        self.drafted += record.drafted
        self.accepted += record.accepted
        self.draft_lengths.append(record.drafted)
        grow = record.positions - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(record.positions):
            self.drafted_per_position[i] += 1
        for i in range(record.accepted):
            self.accepted_per_position[i] += 1
        self.round_records.append(record)

    @property
    def rtt_ms_mean(self) -> float:
        """Mean network time per round (wall minus verifier compute and queueing)."""
        recs = self.round_records
        return sum(r.timing.network_ms for r in recs) / len(recs) if recs else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_k(self) -> float:
        """Mean draft length chosen over the speculative rounds (0.0 when there were none)."""
        ks = [r.k for r in self.round_records if r.mode == SPECULATIVE]
        return sum(ks) / len(ks) if ks else 0.0

    @property
    def mean_tokens_per_round(self) -> float:
        """Mean of accepted + 1 over the speculative rounds (the measured E(k))."""
        recs = [r for r in self.round_records if r.mode == SPECULATIVE]
        return sum(r.tokens for r in recs) / len(recs) if recs else 0.0

    def to_dict(self) -> dict:
        """Plain JSON-able dict (round records flattened)."""
        d = asdict(self)
        d["rtt_ms_mean"] = self.rtt_ms_mean
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_k"] = self.mean_k
        d["mean_tokens_per_round"] = self.mean_tokens_per_round
        return d


@dataclass(frozen=True)
class TokensEvent:
    """Newly committed tokens, in order, and their decoded text."""

    tokens: list[int]
    text: str


@dataclass(frozen=True)
class SummaryEvent:
    """Last event of a session."""

    finish_reason: str  # "stop" | "length"
    tokens: list[int]  # every generated token (prompt excluded)
    text: str
    stats: EdgeStats
    # the seed the output was sampled with (the request's or one the edge drew); None if greedy
    seed: int | None = None


GenerateEvent = TokensEvent | SummaryEvent
