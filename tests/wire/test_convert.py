"""edgespec.protos.convert: wire messages <-> core dataclasses, both directions, and the errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs
from edgespec.core.session import DraftBlock, Verdict
from edgespec.protos.convert import (
    FieldError,
    block_from_proto,
    block_to_proto,
    params_from_proto,
    params_to_proto,
    verdict_from_proto,
    verdict_to_proto,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=7, seed=2**63 - 1),
        SamplingParams(temperature=1.3, seed=0, stop_token_ids=(0, 5)),
        SamplingParams(temperature=0.5, seed=2**64 - 1),  # the whole uint64 range
    ],
)
def test_params_round_trip_exactly(params: SamplingParams) -> None:
    wire = pb.SamplingParams.FromString(params_to_proto(params).SerializeToString())
    assert params_from_proto(wire) == params


def test_params_wire_defaults() -> None:
    params = params_from_proto(pb.SamplingParams(max_new_tokens=3))
    assert (params.top_p, params.seed, params.temperature) == (1.0, None, 0.0)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"temperature": math.inf}, "params.temperature"),
        ({"top_p": -0.5}, "params.top_p"),
        ({"max_new_tokens": 0}, "params.max_new_tokens"),
        ({"stop_token_ids": [3, -1]}, "params.stop_token_ids"),
    ],
)
def test_params_errors_name_the_field(fields, path) -> None:
    msg = pb.SamplingParams(max_new_tokens=4)
    for name, value in fields.items():
        if name == "stop_token_ids":
            msg.stop_token_ids.extend(value)
        else:
            setattr(msg, name, value)
    with pytest.raises(FieldError) as info:
        params_from_proto(msg)
    assert info.value.field == path
    assert str(info.value).startswith(path)


def _round_trip(block: DraftBlock) -> DraftBlock:
    wire = block_to_proto(block, "sid").SerializeToString()
    msg = pb.DraftBlock.FromString(wire)
    assert msg.session_id == "sid"
    return block_from_proto(msg)


def test_block_without_probs_round_trips() -> None:
    block = DraftBlock(seq=3, base_len=9, tokens=(1, 2, 299))
    back = _round_trip(block)
    assert back == block and back.draft_probs is None


def test_tree_block_drafted_ahead_round_trips_its_anchor() -> None:
    block = DraftBlock(5, 12, (4, 8, 9), parents=(-1, -1, 0), anchor_token=7, anchor_prefix=(3, 2))
    back = _round_trip(block)
    assert back == block and back.anchor == (3, 2, 7)


def test_block_with_alternatives_round_trips_them_under_its_seq() -> None:
    q = torch.softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(2)), -1)
    chain = DraftBlock(6, 12, (4, 8), DraftProbs.dense(q), anchor_token=7)
    tree = DraftBlock(6, 10, (5, 1, 2), parents=(-1, -1, 0), anchor_token=3)
    block = replace(chain, alternatives=(DraftBlock(6, 11, (9,), anchor_token=2), tree))
    msg = block_to_proto(block, "sid")
    assert [a.seq for a in msg.alternatives] == [0, 0]  # the seq travels once
    back = _round_trip(block)
    assert back.identity == block.identity
    assert [a.seq for a in back.alternatives] == [6, 6]
    assert torch.equal(back.draft_probs.probs, q)
    assert back.choices[2] == tree


def test_dense_probs_round_trip_bit_exactly() -> None:
    q = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    back = _round_trip(DraftBlock(0, 4, (1, 2, 3), DraftProbs.dense(q)))
    assert back.draft_probs is not None and not back.draft_probs.is_sparse
    assert torch.equal(back.draft_probs.probs, q)


def test_sparse_probs_round_trip_and_drop_zero_padding() -> None:
    q = torch.zeros(3, 40)
    q[0, [3, 7]] = torch.tensor([0.25, 0.75])
    q[1, 5] = 1.0
    q[2, [1, 2, 30]] = torch.tensor([0.5, 0.25, 0.25])
    sparse = DraftProbs.from_probs_sparse(q)  # (3, 3), rows 0 and 1 zero-padded
    msg = block_to_proto(DraftBlock(0, 4, (3, 5, 30), sparse))
    assert list(msg.probs.sparse.row_lengths) == [2, 1, 3]  # padding not sent
    back = block_from_proto(msg).draft_probs
    assert back is not None and back.is_sparse
    assert torch.equal(back.to_dense(40), q)


def test_sparse_equal_rows_round_trip() -> None:
    q = torch.softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(1)), -1)
    q[q < q.topk(4, -1).values[:, -1:]] = 0
    q = q / q.sum(-1, keepdim=True)
    back = _round_trip(DraftBlock(0, 2, (0, 1), DraftProbs.from_probs_sparse(q))).draft_probs
    assert back is not None and tuple(back.ids.shape) == (2, 4)
    assert torch.allclose(back.to_dense(30), q)


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda m: m.tokens.extend([4, -2]), "tokens[1]"),
        (lambda m: setattr(m, "base_len", 0), "base_len"),
        (lambda m: m.probs.dense.probs.extend([0.5] * 5), "probs.dense.probs"),
        (lambda m: m.probs.sparse.row_lengths.extend([1]), "probs.sparse.row_lengths"),
        (lambda m: m.probs.sparse.row_lengths.extend([1, -1]), "probs.sparse.row_lengths"),
        (lambda m: m.probs.sparse.row_lengths.extend([1, 1]), "probs.sparse"),
        (lambda m: m.anchor_prefix.extend([3]), "anchor_prefix"),  # no anchor_token
        (lambda m: (m.anchor_prefix.extend([-3]), setattr(m, "anchor_token", 1)), "anchor_prefix"),
    ],
)
def test_block_errors_name_the_field(build, path) -> None:
    msg = pb.DraftBlock(seq=0, base_len=3)
    if path != "tokens[1]":
        msg.tokens.extend([4, 5])
    build(msg)
    with pytest.raises(FieldError) as info:
        block_from_proto(msg)
    assert info.value.field == path


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda m: m.alternatives.add(base_len=3, tokens=[1, -4]), "alternatives[0].tokens[1]"),
        (lambda m: m.alternatives.add(base_len=0), "alternatives[0].base_len"),
        (
            lambda m: (
                m.alternatives.add(base_len=3),
                m.alternatives.add(base_len=3, anchor_prefix=[2]),
            ),
            "alternatives[1].anchor_prefix",
        ),
        (lambda m: m.alternatives.add(base_len=3, seq=4), "alternatives"),
        (lambda m: m.alternatives.add(base_len=3, session_id="s"), "alternatives"),
        (lambda m: m.alternatives.add(base_len=3).alternatives.add(base_len=3), "alternatives"),
        (
            lambda m: (
                m.ClearField("tokens"),
                setattr(m, "decode_tokens", 2),
                m.alternatives.add(base_len=3),
            ),
            "alternatives",
        ),
    ],
)
def test_alternative_errors_name_the_alternative_and_its_field(build, path) -> None:
    msg = pb.DraftBlock(seq=2, base_len=3, tokens=[4, 5])
    build(msg)
    with pytest.raises(FieldError) as info:
        block_from_proto(msg)
    assert info.value.field == path
    assert str(info.value).startswith(path)


def test_verdict_names_the_guess_applied() -> None:
    verdict = Verdict(
        seq=4, accepted=1, token=9, is_bonus=False, committed_len=9, verify_ms=1.0, alternative=2
    )
    back = verdict_from_proto(pb.Verdict.FromString(verdict_to_proto(verdict).SerializeToString()))
    assert back == verdict


def test_verdict_round_trip_and_stale_refused() -> None:
    verdict = Verdict(seq=4, accepted=2, token=17, is_bonus=False, committed_len=20, verify_ms=1.5)
    msg = verdict_to_proto(verdict, pb.Verdict.REPLAYED, queue_ms=0.25)
    assert (msg.outcome, msg.queue_ms) == (pb.Verdict.REPLAYED, 0.25)
    assert verdict_from_proto(pb.Verdict.FromString(msg.SerializeToString())) == verdict
    with pytest.raises(FieldError) as info:
        verdict_from_proto(pb.Verdict(seq=4, outcome=pb.Verdict.STALE, committed_len=20))
    assert info.value.field == "outcome" and "STALE" in str(info.value)
