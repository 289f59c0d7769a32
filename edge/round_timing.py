"""Where the time of one round went, seen from the edge: `RoundTiming` and `round_timing`.

Transport-neutral: any `edgespec.edge.verifier_link.VerifierLink` reports its replies' arrival
times and the verifier's own compute and queueing; the network share is what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the interface imports this module for RoundTiming
    from edgespec.edge.verifier_link import Reply


@dataclass(frozen=True)
class RoundTiming:
    """Where the time of one round went, seen from the edge (milliseconds) and its bytes.

    network_ms = wall_ms - verify_ms - queue_ms: the wire both ways plus both sides' gRPC and
    (de)serialisation. Bytes are serialized message sizes (gRPC/HTTP2 framing not included).
    """

    wall_ms: float  # block written -> verdict read
    verify_ms: float  # verifier compute (forward + sampling), as reported by the verifier
    queue_ms: float  # time the block waited on the verifier before its forward
    network_ms: float
    bytes_sent: int
    bytes_received: int
    replayed: bool = False  # the verifier answered with the stored verdict of a resent block


def round_timing(reply: Reply, t_sent: float, bytes_sent: int) -> RoundTiming:
    """The `RoundTiming` of a block sent at `t_sent` (perf_counter) and answered by `reply`."""
    wall_ms = (reply.received - t_sent) * 1e3
    return RoundTiming(
        wall_ms=wall_ms,
        verify_ms=reply.verify_ms,
        queue_ms=reply.queue_ms,
        network_ms=wall_ms - reply.verify_ms - reply.queue_ms,
        bytes_sent=bytes_sent,
        bytes_received=reply.bytes_received,
        replayed=reply.outcome == "REPLAYED",
    )
