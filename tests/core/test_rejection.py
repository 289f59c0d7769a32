"""DraftProbs, verify's contract and input checks; the statistics are in test_rejection_stats."""

import math

import pytest
import torch

from edgespec.core.params import SamplingParams
from edgespec.core.rejection import (
    DraftProbs,
    Verification,
    recovered_probs,
    rejection_sample,
    verify,
)
from edgespec.core.sampling import logits_to_probs, make_generator, sample

V = 20
K = 3


def _probs(rows: int, params: SamplingParams, seed: int) -> torch.Tensor:
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2
    return logits_to_probs(logits, params)  # (rows, V)


# ---------------------------------------------------------------- DraftProbs


def test_sparse_round_trips_to_dense():
    q = _probs(K, SamplingParams(temperature=1.0, top_k=4), seed=0)
    sparse = DraftProbs.from_probs_sparse(q)
    assert sparse.is_sparse and sparse.ids.shape == (K, 4) and sparse.probs.shape == (K, 4)
    assert torch.equal(sparse.to_dense(V), q)
    sparse.validate(K, V)
    dense = DraftProbs.dense(q)
    assert not dense.is_sparse and torch.equal(dense.to_dense(V), q)
    dense.validate(K, V)


def test_from_probs_sparse_pads_shorter_rows_with_zeros():
    q = torch.zeros(2, V)
    q[0, [1, 5, 9]] = torch.tensor([0.5, 0.3, 0.2])
    q[1, 7] = 1.0
    sparse = DraftProbs.from_probs_sparse(q)
    assert sparse.probs.shape == (2, 3)
    assert sparse.probs[1].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(sparse.to_dense(V), q)
    sparse.validate(2, V)


def test_sparse_with_repeated_ids_sums_them():
    sparse = DraftProbs.sparse(torch.tensor([[2, 2, 0]]), torch.tensor([[0.25, 0.25, 0.5]]))
    sparse.validate(1, 4)
    assert sparse.to_dense(4).tolist() == [[0.5, 0.0, 0.5, 0.0]]


def test_empty_block():
    DraftProbs.dense(torch.zeros(0, V)).validate(0, V)
    DraftProbs.from_probs_sparse(torch.zeros(0, V)).validate(0, V)


def _dense_q():
    return _probs(K, SamplingParams(temperature=1.0), seed=1)


def _with(q: torch.Tensor, value: float) -> torch.Tensor:
    q[1, 2] = value
    return q


INVALID_DRAFT_PROBS = [
    ("shape", lambda: DraftProbs.dense(_dense_q()[:, :-1])),
    ("shape", lambda: DraftProbs.dense(_dense_q()[:-1])),
    ("float", lambda: DraftProbs.dense((_dense_q() > 0.1).long())),
    ("finite", lambda: DraftProbs.dense(_with(_dense_q(), math.nan))),
    ("finite", lambda: DraftProbs.dense(_with(_dense_q(), math.inf))),
    ("finite", lambda: DraftProbs.dense(_with(_dense_q(), -math.inf))),
    (">= 0", lambda: DraftProbs.dense(_dense_q() - 0.01)),
    ("sum to 1", lambda: DraftProbs.dense(_dense_q() * 1.01)),
    (
        "ids must have the shape",
        lambda: DraftProbs.sparse(torch.zeros(K, 2).long(), torch.ones(K, 1)),
    ),
    ("integer", lambda: DraftProbs.sparse(torch.zeros(K, 1), torch.ones(K, 1))),
    ("\\[0, 20\\)", lambda: DraftProbs.sparse(torch.full((K, 1), V), torch.ones(K, 1))),
    ("\\[0, 20\\)", lambda: DraftProbs.sparse(torch.full((K, 1), -1), torch.ones(K, 1))),
    ("k = 3", lambda: DraftProbs.sparse(torch.zeros(K + 1, 1).long(), torch.ones(K + 1, 1))),
]


@pytest.mark.parametrize(("message", "build"), INVALID_DRAFT_PROBS)
def test_validate_names_the_problem(message, build):
    with pytest.raises(ValueError, match=f"draft_probs.*{message}"):
        build().validate(K, V)


def test_validate_tolerates_float16_rounding():
    q16 = _dense_q().half()
    DraftProbs.dense(q16).validate(K, V)
    DraftProbs.from_probs_sparse(q16).validate(K, V)


def test_draft_probs_must_hold_tensors():
    with pytest.raises(ValueError, match="draft_probs.probs"):
        DraftProbs.dense([[1.0]])  # type: ignore[arg-type]


# ---------------------------------------------------------------- verify: greedy


def test_greedy_all_accepted_gives_bonus_without_random_draws():
    p = _probs(K + 1, SamplingParams(), seed=2)  # one-hot rows
    g = make_generator(0)
    state = g.get_state()
    v = verify(p[:K].argmax(-1), p, None, g)
    assert v == Verification(accepted=K, token=int(p[K].argmax()), is_bonus=True)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("mismatch", range(K))
def test_greedy_first_mismatch_is_replaced_by_target_argmax(mismatch):
    p = _probs(K + 1, SamplingParams(), seed=3)
    target = p.argmax(-1)
    draft = target[:K].clone()
    draft[mismatch] = (draft[mismatch] + 1) % V
    v = verify(draft.tolist(), p, None)  # a plain list of ints is accepted too
    assert v == Verification(accepted=mismatch, token=int(target[mismatch]), is_bonus=False)


def test_greedy_target_with_sampled_draft_emits_the_argmax():
    p = _probs(K + 1, SamplingParams(), seed=4)
    q = _probs(K, SamplingParams(temperature=1.0), seed=5)
    g = make_generator(1)
    for _ in range(50):
        draft = sample(q, g)
        v = verify(draft, p, DraftProbs.dense(q), g)
        target = p.argmax(-1)
        assert torch.equal(draft[: v.accepted], target[: v.accepted])
        assert v.token == int(target[v.accepted])


def test_zero_draft_tokens_give_a_bonus_token_from_the_only_row():
    p = _probs(1, SamplingParams(temperature=1.0, top_k=1), seed=6)
    v = verify(torch.zeros(0, dtype=torch.long), p, None)
    assert v == Verification(accepted=0, token=int(p[0].argmax()), is_bonus=True)
    v = verify([], p, DraftProbs.dense(torch.zeros(0, V)))
    assert v.is_bonus and v.accepted == 0


# ---------------------------------------------------------------- verify: sampling


def test_draft_equal_to_target_is_always_accepted():
    p = _probs(K + 1, SamplingParams(temperature=1.0), seed=7)
    g = make_generator(2)
    for _ in range(100):
        assert verify(sample(p[:K], g), p, DraftProbs.dense(p[:K]), g).accepted == K


def test_draft_token_the_target_never_emits_is_always_rejected():
    p = _probs(K + 1, SamplingParams(temperature=1.0, top_k=3), seed=8)
    q = _probs(K, SamplingParams(temperature=1.0), seed=9)
    impossible = int((p[0] == 0).nonzero()[0])
    g = make_generator(3)
    for _ in range(100):
        v = verify([impossible, 0, 0], p, DraftProbs.dense(q), g)
        assert v.accepted == 0 and not v.is_bonus
        assert p[0, v.token] > 0  # the recovered token is one the target can emit


@pytest.mark.parametrize("form", ["dense", "sparse", "greedy"])
def test_verify_is_rejection_sample_with_a_batch_of_one(form):
    params = SamplingParams(temperature=0.9, top_p=0.9)
    p = _probs(K + 1, params, seed=10)
    q = _probs(K, params, seed=11)
    draft_probs = {
        "dense": DraftProbs.dense(q),
        "sparse": DraftProbs.from_probs_sparse(q),
        "greedy": None,
    }[form]
    for seed in range(30):
        draft = sample(q, make_generator(100 + seed))
        v = verify(draft, p, draft_probs, make_generator(seed))
        q_batch = None if draft_probs is None else q[None]
        accepted, token = rejection_sample(draft[None], p[None], q_batch, make_generator(seed))
        assert (v.accepted, v.token, v.is_bonus) == (int(accepted), int(token), int(accepted) == K)


def test_sparse_and_dense_q_give_identical_verdicts():
    params = SamplingParams(temperature=1.0, top_k=5)
    p, q = _probs(K + 1, params, seed=12), _probs(K, params, seed=13)
    for seed in range(30):
        draft = sample(q, make_generator(200 + seed))
        dense = verify(draft, p, DraftProbs.dense(q), make_generator(seed))
        sparse = verify(draft, p, DraftProbs.from_probs_sparse(q), make_generator(seed))
        assert dense == sparse


def test_unnormalised_q_within_tolerance_is_renormalised():
    params = SamplingParams(temperature=1.0)
    p, q = _probs(K + 1, params, seed=14), _probs(K, params, seed=15)
    draft = sample(q, make_generator(0))
    exact = verify(draft, p, DraftProbs.dense(q), make_generator(1))
    scaled = verify(draft, p, DraftProbs.dense(q * 1.0005), make_generator(1))
    assert exact == scaled


def test_recovered_probs():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.3, 0.1, 0.4])
    assert torch.allclose(recovered_probs(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    # p <= q everywhere: rejection cannot happen in exact arithmetic; p is returned
    assert torch.equal(recovered_probs(p, p), p)
    batched = recovered_probs(torch.stack([p, p]), torch.stack([q, p]))  # (2, 4)
    assert torch.allclose(batched[0], torch.tensor([0.75, 0.0, 0.25, 0.0]))
    assert torch.equal(batched[1], p)


# ---------------------------------------------------------------- verify: input checks

P = _probs(K + 1, SamplingParams(temperature=1.0), seed=16)
INVALID_VERIFY = [
    ("target_probs must be 2-D", lambda: verify([1, 2, 3], P[0], None)),
    ("k\\+1 = 4 rows", lambda: verify([1, 2, 3], P[:3], None)),
    ("draft_tokens must be 1-D", lambda: verify(torch.zeros(1, 3).long(), P, None)),
    ("draft_tokens must be integer", lambda: verify([1.0, 2.0, 3.0], P, None)),
    ("draft_tokens must be token ids in \\[0, 20\\)", lambda: verify([1, 20, 3], P, None)),
    ("draft_tokens must be token ids", lambda: verify([1, -1, 3], P, None)),
    ("draft_probs", lambda: verify([1, 2, 3], P, DraftProbs.dense(P[:2]))),
    ("draft_probs", lambda: verify([1, 2, 3], P, DraftProbs.dense(P[:3] * 2))),
]


@pytest.mark.parametrize(("message", "call"), INVALID_VERIFY)
def test_verify_rejects_bad_input_naming_it(message, call):
    with pytest.raises(ValueError, match=message):
        call()
