"""The verifier engine called directly: error codes and fields, validation of its config."""

from __future__ import annotations

import math

import pytest
import torch
from support.verifier_client import (
    GREEDY,
    PROMPT,
    VOCAB,
    target_continuation,
)

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    Outcome,
    ServiceError,
    VerifierConfig,
)
from edgespec.core.rejection import DraftProbs
from edgespec.core.session import DraftBlock

# ---------------------------------------------------------------- the engine, directly


def test_engine_errors_carry_code_and_field(target_model) -> None:
    engine = VerifierEngine(target_model, VerifierConfig(max_block_tokens=4))
    with pytest.raises(ServiceError) as info:
        engine.open_session([1, 2, 999], GREEDY)
    assert (info.value.code, info.value.field) == (INVALID_ARGUMENT, "prefix_ids[2]")
    with pytest.raises(ServiceError) as info:
        engine.verify("missing", DraftBlock(0, 1, (1,)))
    assert (info.value.code, info.value.field) == (NOT_FOUND, "session_id")
    opened = engine.open_session(PROMPT, GREEDY)
    result = engine.verify(opened.session_id, DraftBlock(0, len(PROMPT), (1, 2)))
    assert result.outcome is Outcome.APPLIED and result.verdict is not None
    stale = engine.verify(opened.session_id, DraftBlock(1, len(PROMPT), (1, 2)))
    assert stale.outcome is Outcome.STALE and stale.verdict is None
    stats = engine.stats()
    assert (stats.sessions, stats.applied, stats.stale, stats.drafted) == (1, 1, 1, 2)


def test_greedy_block_with_probs_is_validated_then_ignored(target_model) -> None:
    engine = VerifierEngine(target_model)
    cont = target_continuation(target_model, PROMPT, GREEDY)
    sid = engine.open_session(PROMPT, GREEDY).session_id
    q = DraftProbs.dense(torch.full((3, VOCAB), 1.0 / VOCAB))
    result = engine.verify(sid, DraftBlock(0, len(PROMPT), tuple(cont[:3]), q))
    assert result.verdict is not None and result.verdict.accepted == 3
    bad = DraftProbs.dense(torch.full((2, VOCAB), 2.0 / VOCAB))
    with pytest.raises(ServiceError) as info:
        engine.verify(sid, DraftBlock(1, len(PROMPT) + 4, tuple(cont[4:6]), bad))
    assert info.value.field == "probs"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_block_tokens": True}, "max_block_tokens"),
        ({"session_idle_ttl_s": math.nan}, "session_idle_ttl_s"),
        ({"max_prefix_tokens": 0}, "max_prefix_tokens"),
    ],
)
def test_config_validation(fields, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        VerifierConfig(**fields)


def test_max_prefix_tokens_must_fit_the_model(target_model) -> None:
    with pytest.raises(ValueError, match="max_prefix_tokens must be <= 511"):
        VerifierEngine(target_model, VerifierConfig(max_prefix_tokens=512))


# ---------------------------------------------------------------- token trees


def test_tree_block_verdict_names_its_path_and_a_resend_replays_it(target_model) -> None:
    """A tree whose second root child and that child's child are the target's next tokens: the
    verdict's path is those nodes, the cache keeps only them (a chain continues exactly), and
    the same block resent gets the same verdict."""
    engine = VerifierEngine(target_model)
    cont = target_continuation(target_model, PROMPT, GREEDY)
    wrong = (cont[0] + 1) % VOCAB
    sid = engine.open_session(PROMPT, GREEDY).session_id
    tree = DraftBlock(0, len(PROMPT), (wrong, cont[0], wrong, cont[1]), parents=(-1, -1, 0, 1))
    result = engine.verify(sid, tree)
    assert result.verdict is not None
    assert (result.verdict.path, result.verdict.token) == ((1, 3), cont[2])
    assert engine.verify(sid, tree).outcome is Outcome.REPLAYED
    after = engine.verify(sid, DraftBlock(1, len(PROMPT) + 3, tuple(cont[3:6])))
    assert after.verdict is not None and after.verdict.accepted == 3
    assert engine.committed(sid)[len(PROMPT) :] == cont[:7]


def test_tree_block_on_a_target_that_cannot_verify_trees(target_model) -> None:
    engine = VerifierEngine(target_model)
    engine.tree_blocks = False  # as for a target whose cache cannot be compacted to a path
    opened = engine.open_session(PROMPT, GREEDY)
    assert opened.tree_blocks is False
    with pytest.raises(ServiceError) as info:
        engine.verify(opened.session_id, DraftBlock(0, len(PROMPT), (1, 2), parents=(-1, -1)))
    assert (info.value.code, info.value.field) == ("FAILED_PRECONDITION", "parents")
    assert engine.stats().sessions == 1  # the session is still open and usable
