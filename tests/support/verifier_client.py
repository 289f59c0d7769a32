"""A synchronous client of the Verifier service for tests: one VerifyStream driven block by
block, request builders, and the shared constants (token, prompt, deadline)."""

from __future__ import annotations

import queue
from collections.abc import Iterator

from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.protos.convert import block_to_proto, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

DEADLINE_S = 20.0  # every client call carries this deadline
TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPT = [5, 17, 42, 99, 3, 250]
VOCAB = 300  # support.tiny_models TINY_VOCAB_SIZE
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32)


class VerifyStream:
    """One VerifyStream call driven block by block: `send` waits for that block's verdict
    (`write` and `read` apart: several blocks written before their verdicts are read)."""

    def __init__(self, stub: pb_grpc.VerifierStub, metadata=AUTH) -> None:
        self._requests: queue.Queue[pb.DraftBlock | None] = queue.Queue()

        def requests() -> Iterator[pb.DraftBlock]:
            while (msg := self._requests.get()) is not None:
                yield msg

        self._call = stub.VerifyStream(requests(), timeout=DEADLINE_S, metadata=metadata)

    def send(self, msg: pb.DraftBlock) -> pb.Verdict:
        self.write(msg)
        return self.read()

    def write(self, *msgs: pb.DraftBlock) -> None:
        """Write blocks without waiting for their verdicts."""
        for msg in msgs:
            self._requests.put(msg)

    def read(self) -> pb.Verdict:
        """The next verdict of the stream."""
        return next(self._call)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()

    def __enter__(self) -> VerifyStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_one(stub, msg: pb.DraftBlock, metadata=AUTH) -> pb.Verdict:
    """Send one block on a fresh stream; returns its verdict."""
    with VerifyStream(stub, metadata=metadata) as stream:
        return stream.send(msg)


def open_session(stub, prefix=PROMPT, params=GREEDY, metadata=AUTH, **fields):
    request = pb.OpenSessionRequest(prefix_ids=prefix, params=params_to_proto(params), **fields)
    return stub.OpenSession(request, timeout=DEADLINE_S, metadata=metadata)


def block(session_id: str, seq: int, base_len: int, tokens, draft_probs=None) -> pb.DraftBlock:
    return block_to_proto(DraftBlock(seq, base_len, tuple(tokens), draft_probs), session_id)


def target_continuation(model, prompt, params) -> list[int]:
    return generate_autoregressive(ModelRunner(model), prompt, params).tokens
