"""The batching verifier's step (`cloud.batch_step.run_step`) called directly, many sessions per
forward: greedy outputs identical to the target alone (ragged k, decode blocks, every
architecture incl. sliding-window ones), per-item answers (STALE, REPLAYED, errors) unchanged,
and rejection sampling still exact with sessions batched together (chi-square)."""

from __future__ import annotations

import random

import pytest
import torch
from support.stats import chi_square_p
from support.tiny_models import ARCHS, noisy_draft, tiny_model

from edgespec.cloud.batch_step import DecodeWork, PrefillResult, PrefillWork, VerifyWork, run_step
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import INVALID_ARGUMENT, Outcome, ServiceError, VerifierConfig
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import get_profile
from edgespec.core.rejection import DraftProbs
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs
from edgespec.core.session import DraftBlock

NEW = 24


def _run_greedy_sessions(model, prompts: list[list[int]], seed: int) -> tuple[list, list, list]:
    """Open one greedy session per prompt and drive them all, one `run_step` per round, with
    drafts that are the target's own tokens corrupted at random (ragged k in 0..6) or cloud-only
    decode blocks; returns (outputs, the target alone's outputs, sessions per forward)."""
    engine = VerifierEngine(model, VerifierConfig(max_sessions=128, max_block_tokens=8))
    params = SamplingParams(max_new_tokens=NEW)
    expected = [generate_autoregressive(ModelRunner(model), p, params).tokens for p in prompts]
    sids = [engine.open_session(p, params).session_id for p in prompts]
    rng = random.Random(seed)
    seqs = [0] * len(sids)
    decoding: dict[int, int] = {}  # session index -> seq of its decode block with tokens left
    sizes = []
    while True:
        work, owners = [], []
        for i, sid in enumerate(sids):
            have = engine.committed(sid)[len(prompts[i]) :]
            left = NEW - len(have)
            if left <= 0:
                continue
            if i in decoding:
                work.append(DecodeWork(sid, decoding[i]))
            elif rng.random() < 0.2:
                n = rng.randint(1, left)
                work.append(
                    VerifyWork(
                        sid, DraftBlock(seqs[i], len(prompts[i]) + len(have), (), decode_tokens=n)
                    )
                )
            else:
                k = min(rng.randint(0, 6), left - 1)
                draft = list(expected[i][len(have) : len(have) + k])
                if draft and rng.random() < 0.5:
                    draft[rng.randrange(k)] = rng.randrange(engine.vocab_size)
                base = len(prompts[i]) + len(have)
                work.append(VerifyWork(sid, DraftBlock(seqs[i], base, tuple(draft))))
            owners.append(i)
        if not work:
            break
        outcomes, stats = run_step(engine, work)
        sizes.append(stats.sessions)
        for i, item, outcome in zip(owners, work, outcomes, strict=True):
            assert not isinstance(outcome, ServiceError), outcome
            assert outcome.outcome is Outcome.APPLIED
            if isinstance(item, VerifyWork):
                seqs[i] += 1
            if outcome.more:
                decoding[i] = outcome.seq
            else:
                decoding.pop(i, None)
    outputs = [engine.committed(sid)[len(p) :][:NEW] for sid, p in zip(sids, prompts, strict=True)]
    return outputs, expected, sizes


def test_64_greedy_sessions_in_one_forward_equal_the_target_alone(tiny_pair) -> None:
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    gen = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(0, 300, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 40, (64,), generator=gen)
    ]
    outputs, expected, sizes = _run_greedy_sessions(model, prompts, seed=0)
    assert outputs == expected
    assert sizes[0] == 64  # every session's first block in ONE forward


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_batched_equals_the_target_alone(arch: str) -> None:
    """Eight sessions of ragged lengths, prompts and generations past the sliding window."""
    model = tiny_model(arch, 300, random_head=True)
    gen = torch.Generator().manual_seed(11)
    prompts = [
        torch.randint(0, 300, (n,), generator=gen).tolist() for n in (1, 3, 9, 12, 17, 20, 26, 33)
    ]
    outputs, expected, sizes = _run_greedy_sessions(model, prompts, seed=1)
    assert outputs == expected
    assert max(sizes) == len(prompts)


def test_stale_replayed_and_bad_items_answered_alone(tiny_pair) -> None:
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, VerifierConfig(max_block_tokens=4))
    greedy = SamplingParams(max_new_tokens=16)
    a, b, c = (engine.open_session([5, 6, 7], greedy).session_id for _ in range(3))
    first, _ = run_step(
        engine, [VerifyWork(a, DraftBlock(0, 3, (1,))), VerifyWork(b, DraftBlock(0, 3, ()))]
    )
    assert all(o.outcome is Outcome.APPLIED for o in first)
    outcomes, stats = run_step(
        engine,
        [
            VerifyWork(a, DraftBlock(0, 3, (1,))),  # resent: REPLAYED, the same verdict
            VerifyWork(b, DraftBlock(1, 3, (2,))),  # drafted on an old prefix: STALE
            VerifyWork(c, DraftBlock(0, 3, (1, 2, 3, 4, 5))),  # k > max_block_tokens
        ],
    )
    assert outcomes[0].outcome is Outcome.REPLAYED and outcomes[0].verdict == first[0].verdict
    assert outcomes[1].outcome is Outcome.STALE
    assert isinstance(outcomes[2], ServiceError) and outcomes[2].code == INVALID_ARGUMENT
    assert outcomes[2].field == "tokens"
    assert stats.sessions == 0  # nothing needed a forward
    with pytest.raises(ValueError, match="one item per session"):
        run_step(engine, [VerifyWork(a, DraftBlock(1, 5, ())), DecodeWork(a, 0)])


def test_rejection_sampling_exact_with_sessions_batched() -> None:
    """600 sampling sessions on one prompt, 64 per forward, each with a 2-token draft from a
    uniform q: the first emitted token (accepted draft or recovered) must follow the target's
    p at that position. Chi-square, alpha 1e-4; fixed seeds, so deterministic."""
    vocab = 16
    model = tiny_model("llama", vocab, head_scale=4.0)
    prompt = [3, 1, 4, 1, 5]
    runs = 600
    engine = VerifierEngine(model, VerifierConfig(max_sessions=runs))
    p0 = logits_to_probs(ModelRunner(model).prefill(prompt), SamplingParams(temperature=1.0))
    q = torch.full((2, vocab), 1.0 / vocab)
    draws = torch.Generator().manual_seed(5)
    observed: dict[int, int] = {}
    for start in range(0, runs, 64):
        work = []
        for seed in range(start, min(start + 64, runs)):
            params = SamplingParams(
                temperature=1.0, max_new_tokens=8, seed=seed, sampler="rejection"
            )
            sid = engine.open_session(prompt, params).session_id
            tokens = tuple(torch.randint(0, vocab, (2,), generator=draws).tolist())
            work.append(VerifyWork(sid, DraftBlock(0, len(prompt), tokens, DraftProbs.dense(q))))
        outcomes, stats = run_step(engine, work)
        assert stats.sessions == len(work)
        for item, outcome in zip(work, outcomes, strict=True):
            verdict = outcome.verdict
            first = item.block.tokens[0] if verdict.accepted else verdict.token
            observed[first] = observed.get(first, 0) + 1
    assert chi_square_p(observed, p0, runs) > 1e-4


def test_prefill_in_chunks_batched_with_other_work(tiny_pair) -> None:
    """A session opened without prefill fills its cache 16 tokens a step, in the same forwards
    as another session's blocks; both then generate exactly the target's tokens."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model)
    params = SamplingParams(max_new_tokens=6)
    gen = torch.Generator().manual_seed(4)
    long_prompt = torch.randint(0, 300, (40,), generator=gen).tolist()
    short_prompt = [9, 8, 7]
    busy = engine.open_session(short_prompt, params).session_id
    fresh = engine.open_session(long_prompt, params, prefill=False).session_id
    assert engine.session(fresh).verifier.runner.length == 0
    lefts, seq = [], 0
    while True:
        base = len(engine.committed(busy))
        work = [PrefillWork(fresh, 16), VerifyWork(busy, DraftBlock(seq, base, ()))]
        outcomes, stats = run_step(engine, work)
        assert isinstance(outcomes[0], PrefillResult)
        lefts.append(outcomes[0].left)
        seq += 1
        if outcomes[0].left == 0:
            break
        assert stats.sessions == 2 and stats.fed_tokens == 16 + 1
    assert lefts == [23, 7, 0]  # 39 prefix tokens (the last one is fed by the first block)
    assert run_step(engine, [PrefillWork(fresh, 16)])[0] == [PrefillResult(0)]  # nothing left
    for sid, prompt in ((fresh, long_prompt), (busy, short_prompt)):
        while len(engine.committed(sid)) - len(prompt) < 6:
            committed = engine.committed(sid)
            seq_now = engine.session(sid).verifier.last_verdict
            nxt = 0 if seq_now is None else seq_now.seq + 1
            run_step(engine, [VerifyWork(sid, DraftBlock(nxt, len(committed), ()))])
        want = generate_autoregressive(ModelRunner(model), prompt, params).tokens
        assert engine.committed(sid)[len(prompt) :] == want


def test_coupled_sampling_sessions_batched_equal_the_target_alone() -> None:
    """16 coupled-sampling sessions, each its own seed and Drafter (a noisy copy of the target,
    ragged k), verified 16 per forward: every output is the target alone's with its seed."""
    model = tiny_model("llama", 64, head_scale=3.0)
    draft_model = noisy_draft(model, 0.3)
    engine = VerifierEngine(model, VerifierConfig(max_sessions=32, max_block_tokens=8))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    rng = random.Random(3)
    sessions = []
    for seed in range(16):
        params = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=NEW, seed=2**63 + seed)
        sid = engine.open_session(prompt, params).session_id
        sessions.append((sid, Drafter(ModelRunner(draft_model), prompt, params), params))
    accepted = 0
    while any(not d.finished for _, d, _ in sessions):
        live = [(sid, d) for sid, d, _ in sessions if not d.finished]
        work = [VerifyWork(sid, d.propose(rng.randint(1, 5))) for sid, d in live]
        outcomes, stats = run_step(engine, work)
        assert stats.sessions == len(work)
        for (_, drafter), outcome in zip(live, outcomes, strict=True):
            drafter.apply(outcome.verdict)
            accepted += outcome.verdict.accepted
    for _, drafter, params in sessions:
        expected = generate_autoregressive(ModelRunner(model), prompt, params).tokens
        assert drafter.generated == expected
    assert accepted > 0


@pytest.mark.parametrize("profile", ["real", "h100-70b"])
def test_a_step_reports_its_wall_time_and_its_modelled_time(tiny_pair, profile: str) -> None:
    """An emulated step is padded to the roofline time of ITS OWN rows and says so
    (`StepStats.modelled_ms`, the capacity benchmark's overrun against it); a real one models
    nothing."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, VerifierConfig(max_block_tokens=8), compute_profile=profile)
    params = SamplingParams(max_new_tokens=NEW)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    sids = [engine.open_session(p, params).session_id for p in prompts]
    feeds = [(1, 2, 3), (4,)]  # ragged: 4 and 2 tokens fed with the last committed
    work = [
        VerifyWork(sid, DraftBlock(0, len(p), feed))
        for sid, p, feed in zip(sids, prompts, feeds, strict=True)
    ]
    rows = [(len(p) - 1, len(feed) + 1) for p, feed in zip(prompts, feeds, strict=True)]
    _, stats = run_step(engine, work)
    modelled = get_profile(profile).target_step_ms(rows) if profile != "real" else 0.0
    assert stats.modelled_ms == pytest.approx(modelled)
    assert stats.step_ms >= stats.forward_ms >= stats.modelled_ms
    assert (stats.modelled_ms > 0) == (profile != "real")
