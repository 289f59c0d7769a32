"""Fixtures of the HTTP API tests: the tiny draft (with its tokenizer), a real Verifier server
over the tiny target, and a real edge (gRPC + HTTP) dialing it, all on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.edge_stack import EdgeStack
from support.servers import VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.models import load_tokenizer
from edgespec.core.runner import ModelRunner


@pytest.fixture(scope="module")
def draft(tiny_pair):
    model = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return model, load_tokenizer(tiny_pair.draft_dir)


@pytest.fixture(scope="module")
def verifier(tiny_pair) -> Iterator[VerifierServerThread]:
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    server = VerifierServerThread(VerifierEngine(target, VerifierConfig(max_block_tokens=16)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edge(draft, verifier) -> Iterator[EdgeStack]:
    stack = EdgeStack(draft, [verifier.address])
    yield stack
    stack.stop()
