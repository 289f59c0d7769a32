"""Bad input to the Verifier service: every case answers the status that fits, naming the field
(in the details and the trailer), and the service keeps serving."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import pytest
import torch
from support.verifier_client import (
    AUTH,
    DEADLINE_S,
    GREEDY,
    PROMPT,
    VOCAB,
    VerifyStream,
    block,
    open_session,
    send_one,
)

from edgespec.cloud.verifier_types import (
    INVALID_ARGUMENT,
)
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs
from edgespec.protos.convert import FIELD_METADATA_KEY, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

# ---------------------------------------------------------------- bad input, keep serving


def _open(**fields) -> Callable[[pb_grpc.VerifierStub], object]:
    base = {"prefix_ids": PROMPT, "params": params_to_proto(GREEDY)}
    base.update(fields)
    return lambda stub: stub.OpenSession(
        pb.OpenSessionRequest(**base), timeout=DEADLINE_S, metadata=AUTH
    )


def _params(**fields) -> pb.SamplingParams:
    msg = params_to_proto(GREEDY)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def _verify(
    make_block: Callable[[str], pb.DraftBlock], params: SamplingParams = GREEDY, **open_fields
) -> Callable[[pb_grpc.VerifierStub], object]:
    """Open a fresh session, then send the one block make_block(session_id) builds."""

    def run(stub):
        opened = open_session(stub, params=params, **open_fields)
        return send_one(stub, make_block(opened.session_id))

    return run


SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=32, seed=3, sampler="rejection")
UNIFORM_Q = DraftProbs.dense(torch.full((2, VOCAB), 1.0 / VOCAB))


def _dense(sid: str, values: list[float]) -> pb.DraftBlock:
    msg = pb.DraftBlock(session_id=sid, seq=0, base_len=len(PROMPT), tokens=[1, 2])
    msg.probs.dense.probs.extend(values)
    return msg


def _sparse(sid: str, row_lengths, ids, probs) -> pb.DraftBlock:
    msg = pb.DraftBlock(session_id=sid, seq=0, base_len=len(PROMPT), tokens=[1, 2])
    msg.probs.sparse.row_lengths.extend(row_lengths)
    msg.probs.sparse.ids.extend(ids)
    msg.probs.sparse.probs.extend(probs)
    return msg


BAD_INPUTS = {
    # OpenSession
    "empty prefix": (_open(prefix_ids=[]), INVALID_ARGUMENT, "prefix_ids"),
    "prefix id >= vocab": (_open(prefix_ids=[1, 2, 3, 300]), INVALID_ARGUMENT, "prefix_ids[3]"),
    "negative prefix id": (_open(prefix_ids=[1, -4]), INVALID_ARGUMENT, "prefix_ids[1]"),
    "prefix too long": (_open(prefix_ids=[1] * 600), INVALID_ARGUMENT, "prefix_ids"),
    "params unset": (_open(params=None), INVALID_ARGUMENT, "params"),
    "temperature nan": (
        _open(params=_params(temperature=math.nan)),
        INVALID_ARGUMENT,
        "params.temperature",
    ),
    "top_p > 1": (_open(params=_params(top_p=1.5)), INVALID_ARGUMENT, "params.top_p"),
    "top_k < 0": (_open(params=_params(top_k=-1)), INVALID_ARGUMENT, "params.top_k"),
    "max_new_tokens 0": (
        _open(params=_params(max_new_tokens=0)),
        INVALID_ARGUMENT,
        "params.max_new_tokens",
    ),
    "max_new_tokens past positions": (
        _open(params=_params(max_new_tokens=600)),
        INVALID_ARGUMENT,
        "params.max_new_tokens",
    ),
    "generated >= prefix": (_open(generated=len(PROMPT)), INVALID_ARGUMENT, "generated"),
    "unknown model": (_open(model_id="llama-70b"), "NOT_FOUND", "model_id"),
    # VerifyStream
    "unknown session": (
        lambda stub: send_one(stub, pb.DraftBlock(session_id="nope", seq=0, base_len=6)),
        "NOT_FOUND",
        "session_id",
    ),
    "first block without session": (
        lambda stub: send_one(stub, pb.DraftBlock(seq=0, base_len=6)),
        INVALID_ARGUMENT,
        "session_id",
    ),
    "k > max_block_tokens": (
        _verify(lambda s: block(s, 0, 6, [1] * 9)),
        INVALID_ARGUMENT,
        "tokens",
    ),
    "draft token >= vocab": (
        _verify(lambda s: block(s, 0, 6, [1, 300])),
        INVALID_ARGUMENT,
        "tokens[1]",
    ),
    "negative draft token": (
        _verify(lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=6, tokens=[-1])),
        INVALID_ARGUMENT,
        "tokens[0]",
    ),
    "base_len 0": (
        _verify(lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=0, tokens=[1])),
        INVALID_ARGUMENT,
        "base_len",
    ),
    "more tokens than max_new_tokens allows": (
        _verify(lambda s: block(s, 0, 6, [1, 2, 3]), params=SamplingParams(max_new_tokens=3)),
        INVALID_ARGUMENT,
        "tokens",
    ),
    "sampling block without probs": (
        _verify(lambda s: block(s, 0, 6, [1, 2]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "dense probs of the wrong size": (
        _verify(lambda s: _dense(s, [0.5] * 3), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.dense.probs",
    ),
    "dense probs of the wrong vocab": (
        _verify(lambda s: _dense(s, [0.5] * 4), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "negative probs": (
        _verify(lambda s: _dense(s, [-0.5, 1.5] + [0.0] * (2 * VOCAB - 2)), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "probs not summing to 1": (
        _verify(lambda s: _dense(s, [0.9 / VOCAB] * (2 * VOCAB)), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "probs for an empty block": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                probs=pb.DraftProbs(dense=pb.DenseProbs(probs=[1.0])),
            )
        ),
        INVALID_ARGUMENT,
        "probs",
    ),
    "sparse row_lengths of the wrong count": (
        _verify(lambda s: _sparse(s, [1], [1], [1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.sparse.row_lengths",
    ),
    "sparse lengths not matching ids": (
        _verify(lambda s: _sparse(s, [1, 2], [1, 2], [1.0, 1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.sparse",
    ),
    "parents not one per token": (
        _verify(
            lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=6, tokens=[1, 2], parents=[-1])
        ),
        INVALID_ARGUMENT,
        "parents",
    ),
    "parent not an earlier node": (
        _verify(
            lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=6, tokens=[1, 2], parents=[-1, 1])
        ),
        INVALID_ARGUMENT,
        "parents[1]",
    ),
    "parent below -1": (
        _verify(
            lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=6, tokens=[1, 2], parents=[-2, 0])
        ),
        INVALID_ARGUMENT,
        "parents[0]",
    ),
    "tree deeper than max_new_tokens allows": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s, seq=0, base_len=6, tokens=[1, 2, 3, 4], parents=[-1, -1, 0, 2]
            ),
            params=SamplingParams(max_new_tokens=3),
        ),
        INVALID_ARGUMENT,
        "parents",
    ),
    "tree with more nodes than max_block_tokens": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s, seq=0, base_len=6, tokens=[1] * 9, parents=[-1] * 9
            )
        ),
        INVALID_ARGUMENT,
        "tokens",
    ),
    "alternative with an id >= vocab": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                tokens=[1],
                alternatives=[pb.DraftBlock(base_len=5, tokens=[2, 300])],
            )
        ),
        INVALID_ARGUMENT,
        "alternatives[0].tokens[1]",
    ),
    "alternative longer than max_block_tokens": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                tokens=[1],
                alternatives=[pb.DraftBlock(base_len=5), pb.DraftBlock(base_len=4, tokens=[1] * 9)],
            )
        ),
        INVALID_ARGUMENT,
        "alternatives[1].tokens",
    ),
    "alternative without probs under rejection sampling": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                tokens=[1],
                probs=pb.DraftProbs(dense=pb.DenseProbs(probs=[1.0 / VOCAB] * VOCAB)),
                alternatives=[pb.DraftBlock(base_len=5, tokens=[2])],
            ),
            params=SAMPLING,
        ),
        INVALID_ARGUMENT,
        "alternatives[0].probs",
    ),
    "alternative with a seq of its own": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                alternatives=[pb.DraftBlock(seq=1, base_len=5)],
            )
        ),
        INVALID_ARGUMENT,
        "alternatives",
    ),
    "sparse id >= vocab": (
        _verify(lambda s: _sparse(s, [1, 1], [1, 300], [1.0, 1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_field_and_service_keeps_serving(server, stub, case) -> None:
    request, code, field = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as info:
        request(stub)
    assert info.value.code() == grpc.StatusCode[code]
    assert field in info.value.details()
    # the field at fault also travels as a trailer, and the details start with it (once)
    trailer = dict(info.value.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
    assert trailer is not None and trailer.startswith(field), trailer
    assert info.value.details().startswith(trailer), info.value.details()
    # the next valid request is served
    _assert_serves(stub)


def _assert_serves(stub) -> None:
    opened = open_session(stub, params=SAMPLING)
    with VerifyStream(stub) as stream:
        verdict = stream.send(block(opened.session_id, 0, len(PROMPT), [1, 2], UNIFORM_Q))
    assert verdict.outcome == pb.Verdict.APPLIED
    assert verdict.committed_len == len(PROMPT) + verdict.accepted + 1


def test_error_details_state_the_allowed_range(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _open(prefix_ids=[1, 2, 3, 300])(stub)
    assert "prefix_ids[3] must be a token id in [0, 300), got 300" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _verify(lambda s: block(s, 0, 6, [1] * 9))(stub)
    assert "max_block_tokens=8" in info.value.details() and "got 9" in info.value.details()
