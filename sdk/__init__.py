"""edgespec: distributed edge-cloud speculative decoding.

A small draft model on an edge node proposes blocks of tokens; the large target model in the
cloud verifies each block in one forward pass. The output is exactly the target's.

This package is the public face: the client SDK for an edge node's ``Edge`` service.

Example::

    from edgespec import Client, SamplingParams

    with Client("127.0.0.1:50051") as client:
        result = client.generate("def read_config(path):\\n", SamplingParams(max_new_tokens=32))
        print(result.text, result.stats.acceptance_rate)

The SDK names are imported on first use (PEP 562), so ``import edgespec`` and the CLI's
``--help`` stay fast: `SamplingParams` comes from the core package, which imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "AsyncClient": "edgespec.async_client",
    "AsyncGenerationStream": "edgespec.async_client",
    "Client": "edgespec.client",
    "GenerationStream": "edgespec.client",
    "GenerationStats": "edgespec.results",
    "Result": "edgespec.results",
    "TokenChunk": "edgespec.results",
    "TlsConfig": "edgespec.serving.tls",
    "DeadlineExceeded": "edgespec.errors",
    "EdgespecError": "edgespec.errors",
    "Internal": "edgespec.errors",
    "InvalidArgument": "edgespec.errors",
    "NotFound": "edgespec.errors",
    "ResourceExhausted": "edgespec.errors",
    "Unauthenticated": "edgespec.errors",
    "Unavailable": "edgespec.errors",
    "SamplingParams": "edgespec.core.params",
}

__all__ = [
    "AsyncClient",
    "AsyncGenerationStream",
    "Client",
    "DeadlineExceeded",
    "EdgespecError",
    "GenerationStats",
    "GenerationStream",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Result",
    "SamplingParams",
    "TlsConfig",
    "TokenChunk",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

if TYPE_CHECKING:
    from edgespec.async_client import AsyncClient, AsyncGenerationStream
    from edgespec.client import Client, GenerationStream
    from edgespec.core.params import SamplingParams
    from edgespec.errors import (
        DeadlineExceeded,
        EdgespecError,
        Internal,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
    )
    from edgespec.results import GenerationStats, Result, TokenChunk
    from edgespec.serving.tls import TlsConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgespec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
