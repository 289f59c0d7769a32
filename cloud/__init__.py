"""edgespec's cloud side: the verifier engine (target model, one KV cache per session) and the
Verifier gRPC service around it. Run one with ``python -m edgespec.cloud.server --target PATH``."""

from edgespec.cloud.service import RunningServer, serve
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import (
    EngineStats,
    OpenResult,
    Outcome,
    ServiceError,
    VerifierConfig,
    VerifyResult,
)

__all__ = [
    "EngineStats",
    "OpenResult",
    "Outcome",
    "RunningServer",
    "ServiceError",
    "VerifierConfig",
    "VerifierEngine",
    "VerifyResult",
    "serve",
]
