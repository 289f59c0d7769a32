"""The edge side of edgespec: the draft loop, the verifier links and the Edge service.

`EdgeEngine` drafts locally and verifies through a `VerifierLink`: over gRPC (`GrpcLinks`: one
persistent VerifyStream per session) or in process (`InProcessLinks`, a verifier engine object);
it owns the committed tokens, so a verifier failure never loses or changes output.
`edge.service.serve` wraps an engine in the Edge gRPC service, `edge.http_server.serve_http` in
the OpenAI-compatible HTTP API (`edge.http_app`); `python -m edgespec.edge.server` runs both.
"""

from edgespec.edge.addresses import VerifierAssigner, make_address_provider
from edgespec.edge.channels import ChannelPool
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.grpc_link import GrpcLinks, GrpcVerifierLink
from edgespec.edge.inprocess_link import InProcessLinks, InProcessVerifierLink, VerifierBackend
from edgespec.edge.records import (
    EdgeStats,
    RoundRecord,
    SummaryEvent,
    TokensEvent,
    observation_from_record,
)
from edgespec.edge.recovery import EdgeError
from edgespec.edge.round_timing import RoundTiming
from edgespec.edge.verifier_link import LinkError, LinkFactory, Reply, SessionInfo, VerifierLink

__all__ = [
    "ChannelPool",
    "EdgeEngine",
    "EdgeError",
    "EdgeStats",
    "EngineConfig",
    "GrpcLinks",
    "GrpcVerifierLink",
    "InProcessLinks",
    "InProcessVerifierLink",
    "LinkConfig",
    "LinkError",
    "LinkFactory",
    "Reply",
    "RoundRecord",
    "RoundTiming",
    "SessionInfo",
    "SummaryEvent",
    "TokensEvent",
    "VerifierAssigner",
    "VerifierBackend",
    "VerifierLink",
    "make_address_provider",
    "observation_from_record",
]
