"""Fixtures of the cloud tests: the tiny target and in-process Verifier servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from support.servers import VerifierServerThread
from support.verifier_client import (
    TOKEN,
)

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import (
    VerifierConfig,
)
from edgespec.core.runner import ModelRunner
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model


@pytest.fixture(scope="module")
def start_server(target_model) -> Iterator[Callable[..., VerifierServerThread]]:
    """Factory: start_server(config=None, **serve_kwargs); every server stops at module end."""
    started: list[VerifierServerThread] = []

    def start(config: VerifierConfig | None = None, **serve_kwargs) -> VerifierServerThread:
        config = config or VerifierConfig(model_id="tiny-target", max_block_tokens=8)
        server = VerifierServerThread(VerifierEngine(target_model, config), **serve_kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server) -> VerifierServerThread:
    """The shared server: bearer token required, max_block_tokens 8."""
    return start_server(token=TOKEN)


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.VerifierStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.VerifierStub(channel)
