"""A VerifyStream's blocks queued for a step as they arrive, not when the handler gets to them.

A pipelined edge sends block N+1 while block N is verified. The stream's handler answers its
blocks in order, one at a time; if it also submitted them one at a time, N+1 would join the
scheduler's queue only after N's verdict had been written, so the step after N's could not
start until every stream answered by N's step had written its verdict and read its next block
(at 32 sessions, ~4 ms of fan-out and ~8 ms of loop turns per ~35 ms step, the model idle).
`EagerBlocks.admit` runs in the stream's reader: it decodes each arriving block and enqueues it
at once (`StepScheduler.enqueue`, which keeps a session's items in order, one per step); the
handler then awaits its `Ticket` in turn. A block that is not enqueued on arrival is handed over
as it came, and the handler submits it as before:
- one that does not decode, or names another session: the handler meets the error in its
  place, after the verdicts of the blocks before it;
- every block after one handed over that way, or after a decode block (cloud-only streaming,
  several verdicts) that is not done yet, until the handler has dealt with it, so that a
  session's blocks reach the scheduler in the order they were sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgespec.cloud.batch_step import VerifyWork
from edgespec.cloud.decoding import stream_session
from edgespec.cloud.step_scheduler import StepScheduler, Ticket
from edgespec.core.session import DraftBlock
from edgespec.protos.convert import block_from_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb


@dataclass(frozen=True)
class Enqueued:
    """A block queued on arrival: its session (this stream's), the decoded block, its ticket."""

    session_id: str
    block: DraftBlock
    ticket: Ticket


class EagerBlocks:
    """One stream's eager admission (see the module docstring); on the stream's event loop."""

    def __init__(self, scheduler: StepScheduler) -> None:
        self._scheduler = scheduler
        self._session_id: str | None = None
        # Items that hold later blocks back until the handler is done with them (handed over
        # as they came, or a decode block still streaming).
        self._holding = 0
        self._tickets: list[Ticket] = []

    def admit(self, msg: pb.DraftBlock, arrived: float) -> Enqueued | tuple[pb.DraftBlock, float]:
        """Enqueue `msg` (arrived at perf_counter time `arrived`) if it may go now, else hand it
        over as it came."""
        if not self._holding:
            try:
                session_id = stream_session(self._session_id, msg)
                block = block_from_proto(msg)
            except Exception:  # noqa: BLE001 - the handler meets it again, in its place
                pass
            else:
                self._session_id = session_id
                if block.decode_tokens:
                    self._holding += 1
                ticket = self._scheduler.enqueue(VerifyWork(session_id, block), arrived)
                self._tickets = [t for t in self._tickets if not t.done()]
                self._tickets.append(ticket)
                return Enqueued(session_id, block, ticket)
        self._holding += 1
        return msg, arrived

    def handled(self, item: Enqueued | tuple[pb.DraftBlock, float]) -> None:
        """The handler is done with `item` (all its verdicts written)."""
        if not isinstance(item, Enqueued) or item.block.decode_tokens:
            self._holding -= 1

    def cancel(self) -> None:
        """The stream has ended: drop the blocks queued for it that no step has begun."""
        for ticket in self._tickets:
            ticket.cancel()
        self._tickets.clear()
