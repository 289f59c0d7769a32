"""The edge side of edgespec: the draft loop, the Verifier link client and the Edge service.

`EdgeEngine` drafts locally and verifies over `VerifierLink` (one persistent gRPC VerifyStream per
session); it owns the committed tokens, so a verifier failure never loses or changes output.
`edge.service.serve` wraps an engine in the Edge gRPC service; `python -m edgespec.edge.server` runs one.
"""

from edgespec.edge.engine import EdgeEngine, EdgeError, EngineConfig
from edgespec.edge.link import (
    ChannelPool,
    LinkConfig,
    LinkError,
    Reply,
    RoundTiming,
    SessionInfo,
    VerifierLink,
    make_address_provider,
)
from edgespec.edge.records import (
    EdgeStats,
    RoundRecord,
    SummaryEvent,
    TokensEvent,
    observation_from_record,
)

__all__ = [
    "ChannelPool",
    "EdgeEngine",
    "EdgeError",
    "EdgeStats",
    "EngineConfig",
    "LinkConfig",
    "LinkError",
    "Reply",
    "RoundRecord",
    "RoundTiming",
    "SessionInfo",
    "SummaryEvent",
    "TokensEvent",
    "VerifierLink",
    "make_address_provider",
    "observation_from_record",
]
