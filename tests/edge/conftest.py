"""Fixtures of the edge tests: the tiny pair loaded once per module (the draft model with its
tokenizer, the target runner), an in-process Verifier server over gRPC, and real server
subprocesses for the tests over a real link."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.servers import EDGE_TOKEN, VERIFIER_TOKEN, ServerProcess, VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.models import load_tokenizer
from edgespec.core.runner import ModelRunner


@pytest.fixture(scope="module")
def draft(tiny_pair):
    """(draft model, tokenizer), loaded once; each test builds its own EdgeEngine over them."""
    model = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return model, load_tokenizer(tiny_pair.draft_dir)


@pytest.fixture(scope="module")
def target(tiny_pair) -> ModelRunner:
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu")


@pytest.fixture(scope="module")
def grpc_verifier(target) -> Iterator[VerifierServerThread]:
    """A Verifier server over the target (blocks of up to 16 tokens) in this process, on a
    background event loop."""
    server = VerifierServerThread(VerifierEngine(target.model, VerifierConfig(max_block_tokens=16)))
    yield server
    server.stop()


def _verifier_args(target_dir: Path) -> list[str]:
    return ["edgespec.cloud.server", "--target", str(target_dir), "--token", VERIFIER_TOKEN]


@pytest.fixture(scope="module")
def servers(tiny_pair, tmp_path_factory) -> Iterator[dict[str, ServerProcess]]:
    """`python -m` subprocesses: 'main', the shared verifier; 'victim', a verifier the failover
    test kills; 'edge', an Edge server (bearer token EDGE_TOKEN) over 'main'. Started in
    parallel; every verifier takes VERIFIER_TOKEN."""
    logs = tmp_path_factory.mktemp("server_logs")
    started = {
        "main": ServerProcess(_verifier_args(tiny_pair.target_dir), logs / "main.log"),
        "victim": ServerProcess(_verifier_args(tiny_pair.target_dir), logs / "victim.log"),
    }
    try:
        main_address = started["main"].wait_listening()
        started["edge"] = ServerProcess(
            [
                "edgespec.edge.server",
                "--draft",
                str(tiny_pair.draft_dir),
                "--verifier",
                main_address,
                "--token",
                EDGE_TOKEN,
                "--verifier-token",
                VERIFIER_TOKEN,
            ],
            logs / "edge.log",
        )
        started["victim"].wait_listening()
        started["edge"].wait_listening()
        yield started
    finally:
        for server in started.values():
            server.stop()
