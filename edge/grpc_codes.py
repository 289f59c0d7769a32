"""What a failed gRPC call to a verifier means for the edge: retry elsewhere, or replace the
connection. Used by `edgespec.edge.grpc_link`."""

from __future__ import annotations

import grpc

from edgespec.edge.verifier_link import RETRYABLE_STATUSES

# The transport-neutral list (`verifier_link.RETRYABLE_STATUSES`) as gRPC codes.
RETRYABLE_CODES = frozenset(grpc.StatusCode[name] for name in RETRYABLE_STATUSES)
# Codes that say the connection itself is suspect: the channel is replaced by a fresh one.
CONNECTION_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
