"""What a `Generate` call gives back, and how the response stream becomes it.

`TokenChunk` (tokens as they are committed), `Result` and its `GenerationStats` (the finished
generation) are the SDK's public result types. `StreamAssembler` turns the server stream into
them and checks the protocol; `StreamState` is what the blocking and the asyncio stream share
(the assembler, the result or the error, whether the stream has ended).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgespec.errors import EdgespecError, Internal
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb


@dataclass
class TokenChunk:
    """Tokens the edge committed since the previous chunk, in order, and the text they add.

    The edge decodes incrementally: a character split across tokens is held back until it is
    complete, so a chunk's ``text`` may be empty, and the chunks' texts concatenate to a prefix
    of `Result.text` (shorter only when the output ends inside a character, which `Result.text`
    shows as U+FFFD). `Result.text` is the authoritative decoding of all the tokens.
    """

    ids: list[int]
    text: str


@dataclass
class GenerationStats:
    """How one generation went, as measured by the edge.

    Vocabulary as everywhere in edgespec: the edge drafts tokens in rounds; the verifier accepts
    a prefix of each block and adds one token of its own (recovered or bonus).
    """

    rounds: int = 0  # verification rounds (edge -> cloud -> edge round trips)
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the verifier accepted
    acceptance_rate: float = 0.0  # accepted / drafted; 0.0 when nothing was drafted
    # acceptance_rate_per_position[i]: accepted / drafted among draft tokens at block position i
    acceptance_rate_per_position: list[float] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # k of each round, in order
    rtt_ms: float = 0.0  # mean network time per round (round wall time minus verifier compute)
    time_to_first_token_ms: float = 0.0
    time_per_output_token_ms: float = 0.0
    bytes_sent: int = 0  # on the edge -> verifier link
    bytes_received: int = 0  # on the verifier -> edge link
    reconnects: int = 0  # verifier sessions reopened after a failure
    verifier: str = ""  # address of the verifier that finished the generation
    pipeline_hits: int = 0  # blocks drafted ahead (pipelined) that turned out live
    pipeline_misses: int = 0  # blocks drafted ahead that were discarded
    cloud_only_tokens: int = 0  # tokens the verifier decoded alone (cloud-only mode)

    @classmethod
    def from_proto(cls, stats: pb.GenerateStats) -> GenerationStats:
        """Build from the wire form, deriving the acceptance rates from the counts."""
        drafted_pp = list(stats.drafted_per_position)
        accepted_pp = list(stats.accepted_per_position)
        return cls(
            rounds=stats.rounds,
            drafted=stats.drafted,
            accepted=stats.accepted,
            acceptance_rate=stats.accepted / stats.drafted if stats.drafted else 0.0,
            acceptance_rate_per_position=[
                a / d if d else 0.0 for a, d in zip(accepted_pp, drafted_pp, strict=False)
            ],
            drafted_per_position=drafted_pp,
            accepted_per_position=accepted_pp,
            draft_lengths=list(stats.draft_lengths),
            rtt_ms=stats.rtt_ms_mean,
            time_to_first_token_ms=stats.time_to_first_token_ms,
            time_per_output_token_ms=stats.time_per_output_token_ms,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            reconnects=stats.reconnects,
            pipeline_hits=stats.pipeline_hits,
            pipeline_misses=stats.pipeline_misses,
            cloud_only_tokens=stats.cloud_only_tokens,
            verifier=stats.verifier,
        )


@dataclass
class Result:
    """A finished generation: the generated tokens (prompt excluded), their text, and stats.

    ``finish_reason`` is ``"stop"`` (a stop token was generated; it is included in
    ``token_ids``) or ``"length"`` (``max_new_tokens`` reached). ``seed`` is the seed a sampled
    output was drawn with (the request's, or one the edge drew): the same request with that seed
    reproduces it, and so does `edgespec.reference.generate_reference` on one machine under
    coupled sampling. None when greedy.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    seed: int | None = None


class StreamAssembler:
    """Turns the response stream into chunks and the final `Result`, checking the protocol:
    token events, then exactly one summary whose token_ids are the chunks' ids, then the end."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.summary: pb.Summary | None = None

    def add(self, response: pb.GenerateResponse) -> TokenChunk | None:
        if self.summary is not None:
            raise Internal("protocol error: the server sent a message after the summary")
        event = response.WhichOneof("event")
        if event == "tokens":
            ids = list(response.tokens.ids)
            self.ids.extend(ids)
            return TokenChunk(ids=ids, text=response.text) if ids else None
        if event == "summary":
            self.summary = response.summary
            return None
        raise Internal("protocol error: the server sent a response with neither tokens nor summary")

    def finish(self) -> Result:
        summary = self.summary
        if summary is None:
            raise Internal("protocol error: the stream ended without a summary")
        if list(summary.token_ids) != self.ids:
            raise Internal(
                f"protocol error: the summary's {len(summary.token_ids)} token ids differ from "
                f"the {len(self.ids)} streamed ones"
            )
        return Result(
            text=summary.text,
            token_ids=list(summary.token_ids),
            finish_reason=summary.finish_reason,
            stats=GenerationStats.from_proto(summary.stats),
            seed=summary.seed if summary.HasField("seed") else None,
        )


class StreamState:
    """What the sync and async streams share: the assembler, the result or error, done-ness."""

    def __init__(self) -> None:
        self._assembler = StreamAssembler()
        self._result: Result | None = None
        self._error: EdgespecError | None = None
        self._closed = False

    @property
    def done(self) -> bool:
        """True once the stream has ended: finished, failed or closed."""
        return self._result is not None or self._error is not None or self._closed

    @property
    def result(self) -> Result:
        """The final `Result`, available once the iteration has ended normally.

        Raises the stream's `EdgespecError` if it failed, and `RuntimeError` if the stream has
        not been read to the end (or was closed early).
        """
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._closed:
                raise RuntimeError("the stream was closed before it finished: no result")
            raise RuntimeError(
                "the stream has not finished: iterate it to the end before reading .result"
            )
        return self._result

    def _fail(self, err: EdgespecError) -> EdgespecError:
        self._error = err
        return err
