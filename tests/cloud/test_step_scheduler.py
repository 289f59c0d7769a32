"""The batching verifier's step loop (`cloud.step_scheduler.StepScheduler`) and its admission:
concurrent sessions share forwards and still get the target's own tokens; FIFO, one item per
session per step, the session and token budgets; a KV budget answered RESOURCE_EXHAUSTED with
a retry hint over gRPC; the step metrics."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from support.servers import VerifierServerThread
from support.verifier_client import DEADLINE_S, PROMPT, VerifyStream, block, open_session

from edgespec.cloud.batch_step import DecodeWork, StepStats, VerifyWork
from edgespec.cloud.step_scheduler import StepScheduler
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import RESOURCE_EXHAUSTED, Outcome, ServiceError, VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import BatchRoofline, ComputeProfile
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.protos.convert import RETRY_AFTER_METADATA_KEY
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.verifier_metrics import VerifierMetrics

NEW = 20
AUTH = ()


@contextlib.asynccontextmanager
async def _running(
    engine: VerifierEngine, on_step: Callable[[StepStats, int], None] | None = None
) -> AsyncIterator[StepScheduler]:
    """A scheduler in front of `engine` on its own model thread, its step loop running until
    the block ends (then cancelled)."""
    with ThreadPoolExecutor(1) as executor:
        scheduler = StepScheduler(engine, executor, on_step)
        task = asyncio.create_task(scheduler.run())
        try:
            yield scheduler
        finally:
            task.cancel()


async def _drive(scheduler: StepScheduler, engine, prompt, expected, rng) -> list[int]:
    """One session driven through the scheduler like an edge: blocks of random k, drafts the
    target's own tokens, some corrupted; returns the generated tokens."""
    params = SamplingParams(max_new_tokens=NEW)
    sid = engine.open_session(prompt, params).session_id
    seq = 0
    while (have := len(engine.committed(sid)) - len(prompt)) < NEW:
        k = min(rng.randint(0, 5), NEW - have - 1)
        draft = list(expected[have : have + k])
        if draft and rng.random() < 0.4:
            draft[-1] = (draft[-1] + 1) % engine.vocab_size
        result, queue_ms = await scheduler.submit(
            VerifyWork(sid, DraftBlock(seq, len(prompt) + have, tuple(draft)))
        )
        assert result.outcome is Outcome.APPLIED and queue_ms >= 0
        seq += 1
    return engine.committed(sid)[len(prompt) :]


def test_concurrent_sessions_share_forwards_and_equal_the_target(tiny_pair) -> None:
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, VerifierConfig(batch_window_ms=2.0))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (4 + 3 * i,), generator=gen).tolist() for i in range(16)]
    params = SamplingParams(max_new_tokens=NEW)
    expected = [generate_autoregressive(ModelRunner(model), p, params).tokens for p in prompts]
    steps: list[StepStats] = []

    async def main() -> list[list[int]]:
        async with _running(engine, lambda stats, depth: steps.append(stats)) as scheduler:
            return await asyncio.gather(
                *(
                    _drive(scheduler, engine, p, e, random.Random(i))
                    for i, (p, e) in enumerate(zip(prompts, expected, strict=True))
                )
            )

    outputs = asyncio.run(main())
    assert outputs == expected
    blocks = sum(s.items for s in steps)
    assert max(s.sessions for s in steps) == len(prompts)  # every session in one forward
    assert len(steps) < blocks / 4  # forwards shared, not one per block


def test_take_is_fifo_one_per_session_within_budgets(tiny_pair) -> None:
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, VerifierConfig(batch_max_sessions=3, batch_max_tokens=8))

    async def main() -> list[list[tuple[str, int]]]:
        scheduler = StepScheduler(engine, ThreadPoolExecutor(1))
        # (session, k): "a" twice (its second must wait), "b" cancelled, tokens k + 1 each
        for sid, k in (("a", 1), ("a", 0), ("b", 0), ("c", 2), ("d", 0), ("e", 6), ("f", 0)):
            task = asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(0, 1, (1,) * k)))
            )
            await asyncio.sleep(0)
            if sid == "b":
                task.cancel()
                await asyncio.sleep(0)
        taken = []
        while scheduler.queue_depth:
            step = scheduler._take()
            taken.append([(q.work.session_id, q.feed_estimate - 1) for q in step])
            for q in step:
                q.future.cancel()
        return taken

    steps = asyncio.run(main())
    # 3 sessions at most, 8 tokens at most (the first item always), order kept, "b" dropped.
    assert steps == [[("a", 1), ("c", 2), ("d", 0)], [("a", 0), ("e", 6)], [("f", 0)]]


def test_decode_work_is_one_token_per_step(tiny_pair) -> None:
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model)

    async def main() -> list[int]:
        async with _running(engine) as scheduler:
            sid = engine.open_session(PROMPT, SamplingParams(max_new_tokens=8)).session_id
            got = []
            result, _ = await scheduler.submit(
                VerifyWork(sid, DraftBlock(0, len(PROMPT), (), decode_tokens=3))
            )
            got.append(result.verdict.token)
            while result.more:
                result, _ = await scheduler.submit(DecodeWork(sid, 0))
                got.append(result.verdict.token)
            with pytest.raises(ServiceError):  # no decode block left
                await scheduler.submit(DecodeWork(sid, 0))
            return got

    tokens = asyncio.run(main())
    expected = generate_autoregressive(ModelRunner(model), PROMPT, SamplingParams(max_new_tokens=3))
    assert tokens == expected.tokens


def test_kv_budget_refuses_with_a_retry_hint_and_frees_on_close(target_model) -> None:
    # Each session reserves prompt 6 + max_new_tokens 32 + max_block_tokens 8 = 46 tokens.
    config = VerifierConfig(max_block_tokens=8, kv_budget_tokens=100, retry_after_ms=250)
    registry = CollectorRegistry()
    server = VerifierServerThread(
        VerifierEngine(target_model, config), metrics=VerifierMetrics(registry)
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            held = [open_session(stub, metadata=AUTH).session_id for _ in range(2)]
            with pytest.raises(grpc.RpcError) as info:
                open_session(stub, metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "kv_budget_tokens=100" in info.value.details()
            trailers = dict(info.value.trailing_metadata() or ())
            assert trailers[RETRY_AFTER_METADATA_KEY] == "250"
            # The running sessions are not starved: they still verify.
            with VerifyStream(stub, metadata=AUTH) as stream:
                verdict = stream.send(block(held[0], 0, len(PROMPT), [1, 2]))
            assert verdict.committed_len > len(PROMPT)
            assert server.engine.stats().refused == 1
            assert registry.get_sample_value("edgespec_verifier_kv_budget_tokens") == 100
            assert registry.get_sample_value("edgespec_verifier_kv_tokens") > len(PROMPT)
            # Two prefills (one chunk each: the sessions opened one after the other), one block.
            assert registry.get_sample_value("edgespec_verifier_forward_tokens_count") == 3
            assert registry.get_sample_value("edgespec_verifier_forward_tokens_sum") == 2 * 5 + 3
            assert registry.get_sample_value("edgespec_verifier_step_seconds_count") == 3
            assert registry.get_sample_value("edgespec_verifier_step_seconds_sum") > 0
            # a real profile models nothing
            assert registry.get_sample_value("edgespec_verifier_modelled_step_seconds_total") == 0
            stub.CloseSession(pb.CloseSessionRequest(session_id=held[1]), timeout=DEADLINE_S)
            assert open_session(stub, metadata=AUTH).session_id  # room again
    finally:
        server.stop()


def test_engine_refuses_past_the_budget_and_counts_it(target_model) -> None:
    engine = VerifierEngine(target_model, VerifierConfig(max_block_tokens=4, kv_budget_tokens=50))
    params = SamplingParams(max_new_tokens=30)
    sid = engine.open_session(PROMPT, params).session_id  # 6 + 30 + 4 = 40
    with pytest.raises(ServiceError) as info:
        engine.open_session(PROMPT, params)
    assert info.value.code == RESOURCE_EXHAUSTED and info.value.retry_after_ms == 1000
    engine.close_session(sid)
    assert engine.open_session(PROMPT, params).session_id
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        VerifierConfig(kv_budget_tokens=0)


def test_decode_streams_join_every_step(tiny_pair) -> None:
    """Four cloud-only streams whose callers take a while to come back for each token (an RPC
    writing its verdict): the next token is queued ahead, so each stream is in every step."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model)
    steps: list[StepStats] = []
    n = 10

    async def stream(scheduler: StepScheduler, prompt: list[int]) -> list[int]:
        sid = engine.open_session(prompt, SamplingParams(max_new_tokens=n)).session_id
        block0 = DraftBlock(0, len(prompt), (), decode_tokens=n)
        result, _ = await scheduler.submit(VerifyWork(sid, block0))
        tokens = [result.verdict.token]
        while result.more:
            await asyncio.sleep(0.05)  # the caller is busy elsewhere
            result, _ = await scheduler.submit(DecodeWork(sid, 0))
            tokens.append(result.verdict.token)
        return tokens

    prompts = [[7, 8, 9, i] for i in range(4)]

    async def main() -> tuple[list[list[int]], int]:
        async with _running(engine, lambda stats, depth: steps.append(stats)) as scheduler:
            outputs = await asyncio.gather(*(stream(scheduler, p) for p in prompts))
        return list(outputs), scheduler.ready_on_claim

    outputs, ready = asyncio.run(main())
    params = SamplingParams(max_new_tokens=n)
    expected = [generate_autoregressive(ModelRunner(model), p, params).tokens for p in prompts]
    assert outputs == expected
    assert sum(s.sessions for s in steps) == 4 * n  # every token once, none extra
    # A tiny step takes a few ms, the caller 50: most tokens were there when asked for.
    assert ready >= 4 * (n - 1) // 2


def test_gather_window_only_while_others_may_come(tiny_pair) -> None:
    """A 300 ms window: a lone session's block does not wait for it; with a second session
    open (and idle), the first block waits for the window."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, VerifierConfig(batch_window_ms=300.0))
    params = SamplingParams(max_new_tokens=8)

    async def timed(scheduler: StepScheduler, sid: str) -> float:
        t0 = time.perf_counter()
        await scheduler.submit(VerifyWork(sid, DraftBlock(0, len(PROMPT), ())))
        return time.perf_counter() - t0

    async def main() -> tuple[float, float]:
        async with _running(engine) as scheduler:
            alone = await timed(scheduler, engine.open_session(PROMPT, params).session_id)
            engine.open_session(PROMPT, params)  # open, but sends nothing
            waited = await timed(scheduler, engine.open_session(PROMPT, params).session_id)
            return alone, waited

    alone, waited = asyncio.run(main())
    assert alone < 0.25 <= 0.3 <= waited


def _guessing_session(tiny_pair, profile: ComputeProfile | None):
    """(engine, the target's own 8 tokens after PROMPT, a first token it would not choose):
    what the pipelined-guess tests start from."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, compute_profile=profile)
    expected = generate_autoregressive(ModelRunner(model), PROMPT, SamplingParams(max_new_tokens=8))
    return engine, expected, (expected.tokens[0] + 1) % engine.vocab_size


def test_a_superseded_stale_block_takes_no_step(tiny_pair) -> None:
    """A pipelined block whose guess missed (STALE) and the block that replaced it, queued
    together: the stale one is answered at once, the new one runs in the very next step rather
    than the one after (one step, not two)."""
    engine, expected, wrong = _guessing_session(tiny_pair, None)
    base = len(PROMPT)

    async def main() -> tuple[Outcome, Outcome, int]:
        async with _running(engine) as scheduler:
            sid = engine.open_session(PROMPT, SamplingParams(max_new_tokens=8)).session_id
            first, _ = await scheduler.submit(VerifyWork(sid, DraftBlock(0, base, (wrong,))))
            assert first.verdict.accepted == 0  # so the block drafted ahead on base + 2 missed
            steps = scheduler.steps
            ahead = asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(1, base + 2, (5,))))
            )
            fresh = asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(2, base + 1, (expected.tokens[1],))))
            )
            (stale, _), (applied, _) = await asyncio.gather(ahead, fresh)
            return stale.outcome, applied.outcome, scheduler.steps - steps

    stale, applied, steps = asyncio.run(main())
    assert (stale, applied, steps) == (Outcome.STALE, Outcome.APPLIED, 1)


def test_a_missed_guess_is_answered_between_steps_without_its_replacement(tiny_pair) -> None:
    """A block drafted ahead on a guess, queued while the block before it is in its step: once
    that step's verdict shows the guess wrong, the ahead block is answered STALE right away,
    before its edge has sent any replacement, and takes no step of its own."""
    profile = ComputeProfile("test-steps", emulated=True, target_batch=BatchRoofline(40.0))
    engine, _, wrong = _guessing_session(tiny_pair, profile)
    base = len(PROMPT)

    async def main() -> tuple[Outcome, int, int]:
        async with _running(engine) as scheduler:
            sid = engine.open_session(PROMPT, SamplingParams(max_new_tokens=8)).session_id
            steps = scheduler.steps
            first = asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(0, base, (wrong,))))
            )
            await asyncio.sleep(0.01)  # its step has started; the guess goes in the queue
            ahead = await asyncio.wait_for(
                scheduler.submit(VerifyWork(sid, DraftBlock(1, base + 2, (5,)))), 5.0
            )
            (verdict, _), (stale, _) = await first, ahead
            assert verdict.verdict.accepted == 0  # so the guess (base + 2) missed
            left = scheduler.queue_depth
            return stale.outcome, scheduler.steps - steps, left

    assert asyncio.run(main()) == (Outcome.STALE, 1, 0)


def test_guesses_that_missed_are_answered_while_another_sessions_step_runs(tiny_pair) -> None:
    """An edge that drafts several guesses ahead (`EngineConfig.ahead_branches`) sends blocks
    that name an anchor; its stream submits them one at a time. Once its pending block is
    answered, each guess that missed is answered STALE on arrival, while another session's
    step is still running, instead of each waiting for a step to end. Control: the same stale
    block without an anchor (not drafted ahead) waits for the running step."""
    profile = ComputeProfile("test-steps", emulated=True, target_batch=BatchRoofline(300.0))
    engine, expected, _ = _guessing_session(tiny_pair, profile)
    base = len(PROMPT)

    async def main() -> tuple[list[Outcome], bool, int, bool]:
        async with _running(engine) as scheduler:
            params = SamplingParams(max_new_tokens=8)
            sid = engine.open_session(PROMPT, params).session_id
            other = engine.open_session(PROMPT, params).session_id
            first, _ = await scheduler.submit(VerifyWork(sid, DraftBlock(0, base, ())))
            assert first.verdict.committed_len == base + 1
            long_step = asyncio.ensure_future(
                scheduler.submit(VerifyWork(other, DraftBlock(0, base, ())))
            )
            await asyncio.sleep(0.05)  # its 300 ms step has started
            outcomes = []
            for seq, anchor in ((1, 7), (2, 8), (3, 9)):  # guesses of the token at base
                wrong = (expected.tokens[0] + anchor) % engine.vocab_size
                guess = DraftBlock(seq, base + 1, (5,), anchor_token=wrong)
                result, _ = await scheduler.submit(VerifyWork(sid, guess))
                outcomes.append(result.outcome)
            during = not long_step.done()
            judged = scheduler.judged_at_once
            unanchored = asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(4, base + 5, (5,))))
            )
            await asyncio.sleep(0.05)
            waited = not unanchored.done() and not long_step.done()
            await asyncio.gather(long_step, unanchored)
            return outcomes, during, judged, waited

    outcomes, during, judged, waited = asyncio.run(main())
    assert outcomes == [Outcome.STALE] * 3 and during and judged == 3
    assert waited


def test_sessions_that_return_quickly_share_the_next_step(tiny_pair) -> None:
    """Two sessions beside the verifier, one back at once after each answer, one 2 ms later
    (a few ms on a loaded host), steps of 40 ms (emulated): with the default return fraction
    they share the steps; without it, they split them (measured side by side)."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    rounds = 12

    profile = ComputeProfile("test-steps", emulated=True, target_batch=BatchRoofline(40.0))

    def shared_steps(fraction: float) -> int:
        # grouping off: it would merge these steps too (test_steps_grouped_by_expected_returns)
        config = VerifierConfig(batch_return_fraction=fraction, batch_group_horizon=0.0)
        engine = VerifierEngine(model, config, compute_profile=profile)
        sizes: list[int] = []

        async def session(scheduler: StepScheduler, delay_s: float) -> None:
            params = SamplingParams(max_new_tokens=rounds + 1)
            sid = engine.open_session(PROMPT, params).session_id
            for seq in range(rounds):
                await asyncio.sleep(delay_s)
                await scheduler.submit(VerifyWork(sid, DraftBlock(seq, len(PROMPT) + seq, ())))

        async def main() -> None:
            async with _running(engine, lambda st, _: sizes.append(st.sessions)) as scheduler:
                await asyncio.gather(session(scheduler, 0.0), session(scheduler, 0.002))

        asyncio.run(main())
        return sum(size == 2 for size in sizes)

    with_window, without = shared_steps(VerifierConfig().batch_return_fraction), shared_steps(0.0)
    assert with_window >= rounds - 3  # the first returns teach the gaps
    assert without <= with_window - 3


def test_steps_grouped_by_expected_returns(tiny_pair) -> None:
    """Six sessions that come back 80 ms after each answer, steps of 40 ms (emulated, the same
    for 1 or 6 sessions), started 13 ms apart: a scheduler that starts a step as soon as it is
    free keeps them spread over ~3 steps per round; grouping by expected returns
    (`batch_group_horizon`) merges them into fewer, larger steps (measured side by side), and
    every session still commits its tokens in order."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    rounds, n = 12, 6
    profile = ComputeProfile("test-steps", emulated=True, target_batch=BatchRoofline(40.0))

    def steps_taken(horizon: float) -> int:
        config = VerifierConfig(batch_group_horizon=horizon, batch_return_fraction=0.0)
        engine = VerifierEngine(model, config, compute_profile=profile)
        sizes: list[int] = []

        async def session(scheduler: StepScheduler, start_s: float) -> int:
            params = SamplingParams(max_new_tokens=rounds + 1)
            sid = engine.open_session(PROMPT, params).session_id
            await asyncio.sleep(start_s)
            for seq in range(rounds):
                if seq:
                    await asyncio.sleep(0.08)
                block = DraftBlock(seq, len(PROMPT) + seq, ())
                result, _ = await scheduler.submit(VerifyWork(sid, block))
                assert result.outcome is Outcome.APPLIED
            return len(engine.committed(sid)) - len(PROMPT)

        async def main() -> list[int]:
            async with _running(engine, lambda st, _: sizes.append(st.sessions)) as scheduler:
                return await asyncio.gather(*(session(scheduler, 0.013 * i) for i in range(n)))

        assert asyncio.run(main()) == [rounds] * n
        return len(sizes)

    spread, grouped = steps_taken(0.0), steps_taken(1.0)
    assert spread >= 2.5 * rounds, (spread, grouped)  # ~3 steps a round
    assert grouped <= 0.8 * spread, (spread, grouped)


def test_step_times_price_a_roofline() -> None:
    """The grouping rule's step-time prediction on roofline-shaped steps (30 ms up to 130 fed
    tokens, then 0.2 ms per token): flat where the steps seen are flat, steep where they are
    compute-bound, and beyond the largest step seen the local line there extended, not one line
    through all (which would price a 300-token step at ~40 ms)."""
    from edgespec.cloud.step_scheduler import _StepTimes

    def roofline(tokens: int) -> float:
        return max(0.030, 0.0002 * tokens + 0.004)

    times = _StepTimes()
    assert times.predict(10) is None
    for tokens in list(range(20, 200, 12)) * 3:
        times.add(tokens, roofline(tokens))
    for tokens in (30, 60, 100, 150, 190):
        assert times.predict(tokens) == pytest.approx(roofline(tokens), rel=0.06)
    assert times.predict(300) == pytest.approx(roofline(300), rel=0.1)
    assert times.predict(5) == pytest.approx(0.030, rel=0.02)


def test_grouping_never_holds_back_a_pipelined_sessions_block(tiny_pair) -> None:
    """Five sessions that come back 80 ms after each answer, and one that drafts ahead (its
    next block is sent while the one before it waits or runs): grouping by expected returns
    waits for the five only while no block of the pipelined session is queued, so that
    session's blocks wait no longer with grouping than without (measured side by side), while
    it still marks the pipelined session and not the others."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    rounds, n = 10, 5
    profile = ComputeProfile("test-steps", emulated=True, target_batch=BatchRoofline(40.0))

    def pipelined_queue_ms(horizon: float) -> tuple[float, set[str], str]:
        config = VerifierConfig(batch_group_horizon=horizon, batch_return_fraction=0.0)
        engine = VerifierEngine(model, config, compute_profile=profile)

        async def returning(scheduler: StepScheduler, start_s: float) -> None:
            sid = engine.open_session(PROMPT, SamplingParams(max_new_tokens=rounds + 1)).session_id
            await asyncio.sleep(start_s)
            for seq in range(rounds):
                if seq:
                    await asyncio.sleep(0.08)
                block = DraftBlock(seq, len(PROMPT) + seq, ())
                await scheduler.submit(VerifyWork(sid, block))

        async def ahead(scheduler: StepScheduler) -> tuple[list[float], str]:
            params = SamplingParams(max_new_tokens=2 * rounds + 1)
            sid = engine.open_session(PROMPT, params).session_id
            await asyncio.sleep(0.05)  # once the others' steps have been timed

            def send(seq: int) -> asyncio.Task:
                block = DraftBlock(seq, len(PROMPT) + seq, ())  # k = 0: valid after seq - 1
                return asyncio.create_task(scheduler.submit(VerifyWork(sid, block)))

            waits, nxt = [], send(0)
            for seq in range(1, 2 * rounds):
                current, nxt = nxt, send(seq)  # the next block goes before this verdict
                result, queue_ms = await current
                assert result.outcome is Outcome.APPLIED
                waits.append(queue_ms)
                await asyncio.sleep(0.005)
            await nxt
            return waits[1:], sid  # the first was sent alone

        async def main() -> tuple[float, set[str], str]:
            async with _running(engine) as scheduler:
                others = [returning(scheduler, 0.013 * i) for i in range(n)]
                *_, (waits, sid) = await asyncio.gather(*others, ahead(scheduler))
                return sum(waits) / len(waits), set(scheduler._pipelined), sid

        return asyncio.run(main())

    plain, _, _ = pipelined_queue_ms(0.0)
    grouped, marked, sid = pipelined_queue_ms(1.0)
    assert marked == {sid}
    assert grouped <= 1.25 * plain + 5.0, (grouped, plain)


def test_a_block_that_arrived_before_the_verdict_before_it_marks_its_session(target_model) -> None:
    """A stream's handler submits its blocks one at a time, so a session drafting ahead is told
    by its block's arrival stamp (`submit(since=...)`): earlier than the end of the step that
    answered the block before it. A block sent after that verdict marks nothing."""
    engine = VerifierEngine(target_model, VerifierConfig())
    params = SamplingParams(max_new_tokens=4)

    async def main() -> tuple[set[str], str]:
        async with _running(engine) as scheduler:
            ahead, serial = (engine.open_session(PROMPT, params).session_id for _ in range(2))
            for sid in (ahead, serial):
                sent = time.perf_counter()  # before the verdict: as a block drafted ahead
                await scheduler.submit(VerifyWork(sid, DraftBlock(0, len(PROMPT), ())))
                arrived = sent if sid == ahead else time.perf_counter()
                block = DraftBlock(1, len(PROMPT) + 1, ())
                await scheduler.submit(VerifyWork(sid, block), since=arrived)
            return set(scheduler._pipelined), ahead

    marked, ahead = asyncio.run(main())
    assert marked == {ahead}


def test_step_times_prices_again_after_each_step() -> None:
    """A price is remembered only until the next step is added: the grouping rule asks for the
    same token counts many times per decision, but each step seen may move the line."""
    from edgespec.cloud.step_scheduler import _StepTimes

    times = _StepTimes()
    for _ in range(8):
        times.add(50, 0.030)
    assert times.predict(50) == pytest.approx(0.030)
    assert times.predict(50) == times.predict(50)
    for _ in range(56):
        times.add(50, 0.060)
    assert times.predict(50) == pytest.approx(0.060 * 56 / 64 + 0.030 * 8 / 64)


def test_a_queued_block_is_judged_once_per_step(tiny_pair) -> None:
    """Between two steps the scheduler looks for queued blocks that need no model work each time
    it decides (at every arrival while it groups). A block found to need work is not judged
    again until a step has ended, since only a step changes what its session has committed:
    `VerifierEngine.prepare` runs once per session's first block per step, not per decision."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model)
    calls: list[str] = []
    prepare = engine.prepare

    def counted(session_id: str, block: DraftBlock):  # noqa: ANN202 - the engine's own type
        calls.append(session_id)
        return prepare(session_id, block)

    engine.prepare = counted  # type: ignore[method-assign]

    async def main() -> list[int]:
        scheduler = StepScheduler(engine, ThreadPoolExecutor(1))
        sids = [engine.open_session(PROMPT, SamplingParams(max_new_tokens=8)).session_id]
        sids.append(engine.open_session(PROMPT, SamplingParams(max_new_tokens=8)).session_id)
        tasks = [
            asyncio.ensure_future(
                scheduler.submit(VerifyWork(sid, DraftBlock(seq, len(PROMPT), (1,))))
            )
            for sid in sids
            for seq in (0, 1)  # each session's second block waits behind its first
        ]
        await asyncio.sleep(0)
        counts = []
        for _ in range(3):
            scheduler._answer_without_work()
            counts.append(len(calls))
        scheduler.steps += 1  # a step ended: the sessions may have moved on
        scheduler._answer_without_work()
        counts.append(len(calls))
        assert scheduler.queue_depth == 4  # each first block needs work: none was answered
        for task in tasks:
            task.cancel()
        return counts

    assert asyncio.run(main()) == [2, 2, 2, 4]


def _one_session(tiny_pair, config: VerifierConfig) -> tuple[VerifierEngine, list[int], str]:
    """An engine on the tiny target, the target's own 12 tokens after PROMPT, a session."""
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    engine = VerifierEngine(model, config)
    params = SamplingParams(max_new_tokens=12)
    expected = generate_autoregressive(ModelRunner(model), PROMPT, params).tokens
    return engine, expected, engine.open_session(PROMPT, params).session_id


def _two_blocks(scheduler: StepScheduler, sid: str, expected: list[int]):
    """Blocks 0 and 1 of `expected` (3 tokens each, the second assuming the first accepted
    whole) queued at once, as a stream queues a block drafted ahead on arrival."""
    first = scheduler.enqueue(VerifyWork(sid, DraftBlock(0, len(PROMPT), expected[:3])))
    second = scheduler.enqueue(
        VerifyWork(sid, DraftBlock(1, len(PROMPT) + 4, tuple(expected[4:7])))
    )
    return first, second


def test_a_block_queued_ahead_starts_its_step_before_the_one_before_is_answered(
    tiny_pair,
) -> None:
    """Overlap: a session's next block, queued while the block before it runs (as a stream
    queues a block drafted ahead on arrival), is taken into the next step as soon as that
    block's step ends, before its caller is answered; a session whose next block is not there
    yet gets no step started early. Both blocks get the verdicts the target alone gives."""
    engine, expected, sid = _one_session(tiny_pair, VerifierConfig())

    async def main() -> None:
        async with _running(engine) as scheduler:
            first, second = _two_blocks(scheduler, sid, expected)
            result, _ = await first.result()
            assert (result.outcome, result.verdict.accepted) == (Outcome.APPLIED, 3)
            # answered after the step of `second` began: nothing is left in the queue
            assert scheduler.queue_depth == 0 and scheduler.overlapped == 1
            result, queue_ms = await second.result()
            assert (result.outcome, result.verdict.accepted) == (Outcome.APPLIED, 3)
            assert queue_ms > 0  # it waited for the first block's step
            # nothing queued when this step ended: no early start
            third = scheduler.enqueue(
                VerifyWork(sid, DraftBlock(2, len(PROMPT) + 8, tuple(expected[8:10])))
            )
            await third.result()
            assert scheduler.overlapped == 1

    asyncio.run(main())
    assert engine.committed(sid) == PROMPT + expected[:11]


def test_without_overlap_the_next_step_waits_for_the_answers(tiny_pair) -> None:
    """`batch_overlap=False`: the block queued ahead is still queued when the block before it
    is answered, and runs in the step after, with the same verdicts."""
    engine, expected, sid = _one_session(tiny_pair, VerifierConfig(batch_overlap=False))

    async def main() -> None:
        async with _running(engine) as scheduler:
            first, second = _two_blocks(scheduler, sid, expected)
            await first.result()
            assert scheduler.queue_depth == 1 and scheduler.overlapped == 0
            result, _ = await second.result()
            assert result.verdict.accepted == 3 and scheduler.overlapped == 0

    asyncio.run(main())
    assert engine.committed(sid) == PROMPT + expected[:8]


def test_a_cancelled_ticket_never_runs(tiny_pair) -> None:
    """A ticket cancelled before its step begins is dropped: its block is never verified (the
    session's committed tokens do not move), and the session's next block runs as usual."""
    engine, expected, sid = _one_session(tiny_pair, VerifierConfig())

    async def main() -> None:
        async with _running(engine) as scheduler:
            first, dropped = _two_blocks(scheduler, sid, expected)
            dropped.cancel()
            await first.result()
            assert dropped.done() and scheduler.queue_depth == 0
            assert engine.committed(sid) == PROMPT + expected[:4]
            result, _ = await scheduler.submit(
                VerifyWork(sid, DraftBlock(1, len(PROMPT) + 4, tuple(expected[4:6])))
            )
            assert result.verdict.accepted == 2

    asyncio.run(main())
    assert engine.committed(sid) == PROMPT + expected[:7]
