"""ModelRunner cache semantics and the Drafter/Verifier protocol rules."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from support.tiny_models import FAMILIES, PEAKED_INIT, noisy_draft, tiny_model

from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs, verify
from edgespec.core.runner import ModelRunner, cache_argument
from edgespec.core.sampling import logits_to_probs
from edgespec.core.session import DraftBlock, StaleBlockError, Verdict
from edgespec.core.verifier import Verifier

V = 160


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    init = PEAKED_INIT.get(request.param)
    target = tiny_model(request.param, V, seed=0, max_positions=128, init_range=init)
    return target, noisy_draft(target, 0.05, seed=2, noise_on_constants=False)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- ModelRunner


def test_cache_argument_follows_the_forward_signature():
    class Renamed:  # transformers >= 5.24: forward(cache=...)
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Original:  # before: forward(past_key_values=...)
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert cache_argument(Renamed()) == "cache"
    assert cache_argument(Original()) == "past_key_values"


def test_forwards_warn_nothing(models):
    # a deprecated argument (e.g. past_key_values on transformers >= 5.24) would warn here
    runner = ModelRunner(models[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.prefill(_ids(5, 0))
        runner.extend(_ids(3, 1))
        runner.rollback(6)
        runner.extend(_ids(2, 2))
    assert runner.length == 8


def test_extend_matches_full_forward(models):
    model = models[0]
    runner = ModelRunner(model)
    ids = _ids(20, 0)
    with torch.inference_mode():
        full = model(torch.tensor([ids])).logits[0]  # (20, V)
    logits = runner.extend(ids)
    assert logits.shape == (20, V) and logits.dtype == torch.float32
    assert torch.allclose(logits, full, atol=1e-5)
    assert runner.length == 20 and runner.forwards == 1
    last = runner.prefill(ids)
    assert last.shape == (V,) and runner.length == 20 and runner.forwards == 2
    assert torch.allclose(last, full[-1], atol=1e-5)


@pytest.mark.parametrize("keep", [0, 1, 10, 19])
def test_rollback_then_extend_equals_fresh_run(models, keep):
    """Extend with junk, roll back, extend with the real tokens: same logits as a fresh run."""
    runner = ModelRunner(models[0])
    ids = _ids(20, 1)
    fresh = ModelRunner(models[0]).extend(ids)  # (20, V)
    runner.prefill(ids[:keep] or ids[:1])
    runner.rollback(keep)
    runner.extend(_ids(6, 2))
    runner.extend(_ids(3, 3))
    runner.rollback(keep)
    assert runner.length == keep
    again = runner.extend(ids[keep:])  # (20 - keep, V)
    assert runner.length == 20
    assert torch.allclose(again, fresh[keep:], atol=1e-5)
    # And once more after a rollback into the middle of what was just extended.
    runner.rollback((keep + 20) // 2)
    tail = runner.extend(ids[runner.length :])
    assert torch.allclose(tail, fresh[20 - tail.shape[0] :], atol=1e-5)


def test_rollback_and_extend_validation(models):
    runner = ModelRunner(models[0])
    runner.extend([1, 2, 3])
    for bad in (-1, 4, True, 1.0):
        with pytest.raises(ValueError, match="length"):
            runner.rollback(bad)
    with pytest.raises(ValueError, match="at least 1"):
        runner.extend([])
    with pytest.raises(ValueError, match=r"\[0, 160\)"):
        runner.extend([V])
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        runner.extend(list(range(126)))
    assert runner.length == 3  # refused calls change nothing


def test_from_pretrained_forces_float32_on_cpu(tmp_path, monkeypatch, models):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = models[0]
    copy.deepcopy(model).to(torch.float16).save_pretrained(tmp_path)
    runner = ModelRunner.from_pretrained(tmp_path, device="cpu", dtype=torch.float16)
    assert runner.model.dtype == torch.float32 and runner.device.type == "cpu"
    ids = _ids(5, 4)
    logits = runner.extend(ids)
    reference = ModelRunner(model).extend(ids)
    assert torch.allclose(logits, reference, atol=0.05)  # only the fp16 rounding of the weights
    with pytest.raises(ValueError, match="path"):
        ModelRunner.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------- protocol


def _pair(models, params, prompt):
    target, draft = ModelRunner(models[0]), ModelRunner(models[1])
    return Drafter(draft, prompt, params), Verifier(target, prompt, params)


def test_resent_block_returns_same_verdict_and_applies_once(models):
    params = SamplingParams(max_new_tokens=20)
    prompt = _ids(7, 5)
    drafter, verifier = _pair(models, params, prompt)
    block = drafter.propose(4)
    first = verifier.verify(block)
    state = (verifier.committed_len, verifier.runner.length, verifier.runner.forwards)
    resent = dataclasses.replace(block)  # an equal copy, as a retransmission would decode
    assert verifier.verify(resent) == first
    assert verifier.verify(block) == first
    assert (verifier.committed_len, verifier.runner.length, verifier.runner.forwards) == state
    drafter.apply(first)
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose(4)))
    expected = generate_autoregressive(ModelRunner(models[0]), prompt, params).tokens
    assert drafter.generated == expected
    assert verifier.committed[: len(drafter.committed)] == drafter.committed


def test_reused_seq_with_other_tokens_is_refused(models):
    drafter, verifier = _pair(models, SamplingParams(max_new_tokens=20), _ids(7, 6))
    block = drafter.propose(3)
    verifier.verify(block)
    forged = dataclasses.replace(block, tokens=tuple((t + 1) % V for t in block.tokens))
    with pytest.raises(ValueError, match="seq"):
        verifier.verify(forged)


def test_stale_blocks_are_refused_without_changing_state(models):
    params = SamplingParams(max_new_tokens=30)
    prompt = _ids(7, 7)
    drafter, verifier = _pair(models, params, prompt)
    first = drafter.propose(3)
    drafter.apply(verifier.verify(first))
    second = drafter.propose(3)
    state = (verifier.committed_len, verifier.runner.length, verifier.committed)
    # Drafted on an old prefix (as pipelined drafting would when a verdict rejected tokens).
    stale = dataclasses.replace(second, base_len=first.base_len)
    with pytest.raises(StaleBlockError) as info:
        verifier.verify(stale)
    assert info.value.committed_len == verifier.committed_len
    assert info.value.base_len == first.base_len
    assert (verifier.committed_len, verifier.runner.length, verifier.committed) == state
    drafter.apply(verifier.verify(second))  # the session goes on
    # A seq older than the last verified one, even on the current prefix.
    with pytest.raises(StaleBlockError):
        verifier.verify(dataclasses.replace(first, base_len=verifier.committed_len))
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose(3)))
    assert (
        drafter.generated == generate_autoregressive(ModelRunner(models[0]), prompt, params).tokens
    )


def test_drafter_rejects_inconsistent_verdicts(models):
    drafter, verifier = _pair(models, SamplingParams(max_new_tokens=20), _ids(7, 8))
    block = drafter.propose(3)
    verdict = verifier.verify(block)
    with pytest.raises(ValueError, match="seq"):
        drafter.apply(dataclasses.replace(verdict, seq=verdict.seq + 1))
    with pytest.raises(ValueError, match="committed_len"):
        drafter.apply(dataclasses.replace(verdict, committed_len=verdict.committed_len + 1))
    with pytest.raises(ValueError, match="accepted"):
        drafter.apply(dataclasses.replace(verdict, accepted=4, committed_len=block.base_len + 5))
    with pytest.raises(RuntimeError, match="apply"):
        drafter.propose(3)
    assert drafter.apply(verdict)  # the real verdict still applies


def test_finished_drafter_refuses_to_propose(models):
    drafter, verifier = _pair(models, SamplingParams(max_new_tokens=2), _ids(3, 9))
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose(5)))
    assert drafter.finish_reason == "length" and len(drafter.generated) == 2
    with pytest.raises(RuntimeError, match="finished"):
        drafter.propose(1)


def test_greedy_fast_path_equals_rejection_verify(models):
    """The verifier's greedy shortcut gives what rejection.verify gives on one-hot rows."""
    params = SamplingParams(max_new_tokens=50)
    gen = torch.Generator().manual_seed(10)
    for trial in range(20):
        prompt = _ids(5, 100 + trial)
        verifier = Verifier(ModelRunner(models[0]), prompt, params)
        k = trial % 6
        logits = torch.randn(k + 1, V, generator=gen)  # (k+1, V)
        target_tokens = logits.argmax(-1).tolist()
        # Agree with the target on a prefix of random length, then disagree.
        agree = int(torch.randint(0, k + 1, (), generator=gen))
        tokens = target_tokens[:agree] + [(t + 1) % V for t in target_tokens[agree:k]]
        block = DraftBlock(seq=0, base_len=len(prompt), tokens=tuple(tokens))
        pending = verifier.prepare(block)
        assert pending is not None and pending.feed == [prompt[-1], *tokens]
        verifier.runner.extend(pending.feed)
        verdict = verifier.complete(pending, logits)
        expected = verify(torch.tensor(tokens), logits_to_probs(logits, params), None)
        assert (verdict.accepted, verdict.token, verdict.is_bonus) == (
            expected.accepted,
            expected.token,
            expected.is_bonus,
        )
        assert verdict.committed_len == len(prompt) + verdict.accepted + 1


@pytest.mark.parametrize(
    ("params", "sparse"),
    [
        (SamplingParams(temperature=1.0, seed=1, sampler="rejection"), False),
        (SamplingParams(temperature=0.8, top_k=5, seed=1, sampler="rejection"), True),
        (SamplingParams(temperature=1.0, top_p=0.5, seed=1, sampler="rejection"), True),
    ],
)
def test_rejection_sampled_blocks_carry_q(models, params, sparse):
    drafter = Drafter(ModelRunner(models[1]), _ids(7, 11), params)
    block = drafter.propose(4)
    q = block.draft_probs
    assert isinstance(q, DraftProbs) and q.is_sparse == sparse
    k = len(block.tokens)
    assert k == 4
    q.validate(k, V)
    dense = q.to_dense(V)  # (k, V)
    assert bool((dense[torch.arange(k), torch.tensor(block.tokens)] > 0).all())
    if params.top_k:
        assert q.probs.shape == (k, params.top_k)


def test_greedy_blocks_carry_no_q(models):
    drafter = Drafter(ModelRunner(models[1]), _ids(7, 12), SamplingParams())
    assert drafter.propose(4).draft_probs is None


def test_greedy_drafting_for_a_sampling_target(models):
    """draft_params decouples how the draft picks tokens from the target's sampling: greedy
    drafting sends no q (one-hot) and the session still runs to its limit, reproducibly."""
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    outputs = []
    for _ in range(2):
        drafter, verifier = _pair(models, params, _ids(7, 14))
        drafter = Drafter(drafter.runner, _ids(7, 14), params, draft_params=SamplingParams())
        while not drafter.finished:
            block = drafter.propose(3)
            assert block.draft_probs is None
            drafter.apply(verifier.verify(block))
        outputs.append(drafter.generated)
    assert len(outputs[0]) == 12 and outputs[0] == outputs[1]


def test_verifier_validates_blocks(models):
    prompt = _ids(7, 13)
    verifier = Verifier(
        ModelRunner(models[0]), prompt, SamplingParams(temperature=1.0, sampler="rejection")
    )
    with pytest.raises(ValueError, match="tokens"):
        verifier.verify(DraftBlock(seq=0, base_len=7, tokens=(V,)))
    bad_q = DraftProbs.dense(torch.full((2, V), 0.5 / V))  # rows sum to 0.5
    with pytest.raises(ValueError, match="sum to 1"):
        verifier.verify(DraftBlock(seq=0, base_len=7, tokens=(1, 2), draft_probs=bad_q))
    assert verifier.committed_len == 7 and verifier.last_verdict is None


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (DraftBlock, {"seq": -1, "base_len": 1, "tokens": ()}, "seq"),
        (DraftBlock, {"seq": 0, "base_len": 0, "tokens": ()}, "base_len"),
        (DraftBlock, {"seq": 0, "base_len": 1, "tokens": (1, -2)}, "tokens"),
        (DraftBlock, {"seq": True, "base_len": 1, "tokens": ()}, "seq"),
        (
            Verdict,
            {"seq": 0, "accepted": -1, "token": 1, "is_bonus": False, "committed_len": 2,
             "verify_ms": 1.0},
            "accepted",
        ),
        (
            Verdict,
            {"seq": 0, "accepted": 0, "token": 1, "is_bonus": False, "committed_len": 2,
             "verify_ms": float("nan")},
            "verify_ms",
        ),
    ],
)  # fmt: skip
def test_boundary_dataclasses_validate(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_block_tokens_list_becomes_tuple():
    assert DraftBlock(seq=0, base_len=3, tokens=[4, 5]).tokens == (4, 5)


def test_apply_truncates_after_a_stop_token_among_accepted_tokens(models, monkeypatch):
    """A block whose accepted tokens run past a stop token (propose normally cuts blocks there;
    a pipelined drafter may not): apply keeps the output up to the stop token only."""
    target, _ = models
    prompt = _ids(7, 15)
    free = generate_autoregressive(ModelRunner(target), prompt, SamplingParams(max_new_tokens=12))
    stop = free.tokens[2]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))
    expected = generate_autoregressive(ModelRunner(target), prompt, params).tokens
    drafter = Drafter(ModelRunner(target), prompt, params)  # draft == target: all accepted
    verifier = Verifier(ModelRunner(target), prompt, params)
    monkeypatch.setattr(drafter, "_stop", frozenset())  # propose does not cut at the stop token
    block = drafter.propose(8)
    monkeypatch.undo()
    verdict = verifier.verify(block)
    assert verdict.accepted == 8
    assert drafter.apply(verdict) == expected == free.tokens[: free.tokens.index(stop) + 1]
    assert drafter.finished and drafter.finish_reason == "stop"


# ---------------------------------------------------------------- shadow acceptance


def _decode(drafter: Drafter, verifier: Verifier, n: int) -> None:
    """Stream n cloud-only tokens into the drafter, as the edge does."""
    block = drafter.propose_decode(n)
    drafter.apply(verifier.verify(block))
    for _ in range(n - 1):
        pending = verifier.continue_decode()
        logits = verifier.runner.extend(pending.feed)
        drafter.apply(verifier.complete(pending, logits))


def test_shadow_matches_are_the_greedy_acceptance_outcomes(models):
    """After cloud-only tokens, shadow_matches says for each one whether the draft would have
    proposed it: exactly the draft's argmax given the committed prefix (what a speculative
    round would have accepted); it feeds the cache like propose would, so the rounds after it,
    and the output, are unchanged."""
    params = SamplingParams(max_new_tokens=40)
    prompt = _ids(7, 11)
    drafter, verifier = _pair(models, params, prompt)
    drafter.apply(verifier.verify(drafter.propose(3)))  # a speculative round first
    start = len(drafter.committed)
    _decode(drafter, verifier, 12)
    matches = drafter.shadow_matches()
    committed = drafter.committed
    # the draft's own argmax at every position, from a fresh runner over the whole prefix
    fresh = ModelRunner(models[1]).extend(committed).argmax(-1).tolist()
    expected = [fresh[j - 1] == committed[j] for j in range(start, len(committed))]
    assert matches == expected and len(matches) == 12
    assert 0 < sum(matches) < 12  # a perturbed draft: some hits, some misses
    assert drafter.shadow_matches() == []  # nothing new
    _decode(drafter, verifier, 5)
    assert len(drafter.shadow_matches()) == 5  # continues where it stopped, no gap
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose(4)))
    reference = generate_autoregressive(ModelRunner(models[0]), prompt, params).tokens
    assert drafter.generated == reference


def test_shadow_matches_only_for_greedy_drafting_with_no_drafts_in_the_cache(models):
    sampled, prompt = (
        SamplingParams(temperature=1.0, max_new_tokens=20, seed=1, sampler="rejection"),
        _ids(5, 12),
    )
    drafter, verifier = _pair(models, sampled, prompt)
    _decode(drafter, verifier, 4)
    assert drafter.shadow_matches() == []  # q-sampled drafts are not decided by the noise
    drafter, verifier = _pair(models, SamplingParams(max_new_tokens=20), prompt)
    _decode(drafter, verifier, 4)
    block = drafter.propose(3)  # its drafts are in the cache now
    assert drafter.shadow_matches() == []
    drafter.apply(verifier.verify(block))


def test_drafting_ahead_again_after_drop_ahead(models):
    """A failover drops the block drafted ahead (drop_ahead) and resends the pending one; the
    next block drafted ahead must start from the same guess, and the output stays exact."""
    params = SamplingParams(max_new_tokens=24)
    prompt = _ids(6, 21)
    drafter, verifier = _pair(models, params, prompt)
    pending = drafter.propose(3)
    first = drafter.propose_ahead(2)
    assert first is not None
    assert drafter.drop_ahead() == first and drafter.ahead is None
    again = drafter.propose_ahead(2)
    assert again is not None and again.anchor_token == first.anchor_token
    assert again.tokens == first.tokens and again.seq > first.seq
    drafter.apply(verifier.verify(pending))
    if drafter.pending is again:  # the guess held: verify the block drafted ahead too
        drafter.apply(verifier.verify(again))
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose(3)))
    assert (
        drafter.generated == generate_autoregressive(ModelRunner(models[0]), prompt, params).tokens
    )
