"""The batching verifier's step loop: gathers ready work of many sessions into engine steps.

`StepScheduler.submit(work)` (from any RPC coroutine) queues one `Work` item and waits for its
outcome; the scheduler's loop (`run`, one task on the server's event loop) takes the queue's
items into a step and runs `edgespec.cloud.batch_step.run_step` on the ONE model thread. Rules:

- Continuous: a step starts as soon as the previous one ends if work is queued; an item that
  arrives during a step joins the next one. Only an idle scheduler waits, `batch_window_ms`
  after the first item, for others to join (a bounded gather window, never for a full batch),
  and only while some open session has nothing queued: a lone session never waits, and the
  window ends as soon as every open session has an item queued.
- FIFO with a budget: items are taken in arrival order up to `batch_max_sessions` sessions and
  `batch_max_tokens` fed tokens (the first item always runs). An item whose session already has
  one in the step waits for the next step, keeping its place, so a session's work stays in
  order. Fairness bound: an item with q items before it runs within q // batch_max_sessions +
  1 steps at most, plus one per earlier item of its own session.
- A session's first queued block that needs no model work (STALE: mostly a pipelined guess
  that the verdict just sent has shown wrong; or REPLAYED) is answered between steps, before
  the next is taken, and so is the one after it if it needs none either: a block that replaced
  a missed guess joins this step instead of waiting one more, and a session whose guess missed
  counts as away (its fresh block is on its way), not as ready. Only a session's first queued
  block is judged, since a later one may be valid once the ones before it are applied.
- A block drafted ahead (it names an anchor) that needs no model work is answered on arrival
  when nothing of its session is queued or running: its session's state cannot change first.
  A stream submits one block at a time, so an edge that sends several guesses ahead
  (`EngineConfig.ahead_branches_sent`) would otherwise wait for a step to end per guess that
  missed before the right one is even submitted.
- Quick returns share a step: after a step, the scheduler waits for the sessions of that step
  whose next items usually come back within `batch_return_fraction` of the step's time after
  their answers (e.g. edges beside the verifier), at most that long and no longer than twice
  their usual gap. Without it each such session would start a step of its own a few ms after
  the other, and the batch would split in two for good. Sessions that take longer (an RTT, a
  draft) are not waited for, and the wait costs the others at most that fraction of a step.
- Steps grouped by expected returns (`batch_group_horizon` > 0): before a step starts, the
  scheduler predicts when each session that is not queued comes back (its last answer plus its
  smoothed return gap) and the step's time (learnt from the recent steps: a kernel-weighted
  local line of wall time against fed tokens, `_StepTimes`). It delays the step until the
  j-th expected return when that raises the sessions served per unit of verifier time,
  (q + j) / (wait + step(q + j)), above starting now with the q queued, q / step(q), and
  the larger step costs at most 10%
  more than the one it would have run when the wait began; it re-decides on every arrival,
  gives up on a return a tenth of a step late, and waits at most `batch_group_horizon` steps
  in all. It never waits while a session that drafts ahead has a block queued (a session
  whose block arrived before the verdict of the one before it, `_drafted_ahead`), nor while
  a cloud-only stream's next token is queued: those sessions wait for nobody, and holding
  their blocks back cost pipelined `adaptive` edges 6-7% of a replica's tokens/s (measured,
  32 sessions at 20 and 50 ms).
  Why: a batched step costs nearly the same for 10 sessions as for 30 (the weights are read
  once), but a continuous scheduler starts a step as soon as it is free, so sessions whose
  rounds (draft + RTT) outlast a step spread over ~3 small steps, each block waiting half a
  step for the one in progress; grouped, the same sessions share fewer, larger steps.
- An item whose caller has gone (RPC cancelled) before its step is dropped without running;
  once in a step it runs to the end and its outcome is discarded.
- Cloud-only decode streams run back to back: when a step's result says a decode block has
  ``more`` tokens, the next token's `DecodeWork` is queued at once (one ahead, at the back of
  the queue), and the stream's own `submit` of it takes that item over instead of queueing
  another. So a streaming session is in every step, not every other one (its RPC writes the
  verdict meanwhile). At most one item runs ahead per stream; one whose stream has gone runs
  once, unclaimed, and the stream's decoding stops there.

Overlap: when a step ends and the next one would start without waiting (work is queued, and
neither quick returns nor grouping would hold it: grouping holds nothing while a session that
drafts ahead or a cloud-only stream has an item queued), `_finish` starts it before answering
the ended step's callers, so the model runs while the loop writes their verdicts, as a serving
engine overlaps its output processing with the next forward. A stream queues a block drafted
ahead on arrival (`enqueue`, `edgespec.cloud.eager_blocks`), so it is there to be taken.
Without it (session 19, 32 pipelined sessions, emulated h100-70b): after each ~35 ms step the
loop spent ~4 ms answering its callers and ~8 ms more in turns and waits before the next one
began, the model idle for a quarter of the time. Otherwise (and with `batch_overlap` off) `run`
starts the next step as before.

Threading: `submit` and `run` on one event loop; model work on `executor` (ONE thread), which
answers the step's callers itself (one hand-off back to the loop per step, no second one
through the step loop's task). An item submitted to an idle loop that would not wait for others
(no gather window) starts its step from `submit` itself, not one loop turn later when the step
loop's task wakes (that turn is on every lone session's round trip).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from edgespec.cloud.batch_step import DecodeWork, Outcome, StepStats, VerifyWork, Work, run_step
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import ServiceError, VerifyResult

logger = logging.getLogger(__name__)

# Event-loop turns the step loop yields after a step: enough for a stream woken by its verdict
# to write it, read its next block (already arrived) and submit it (a few turns, microseconds).
_RESUME_TURNS = 4
# Grouping waits only for returns that leave the step within this factor of the time of the
# step it would run now (the memory-bound side of the roofline, where a session more costs
# little); past it a merged step costs about what the separate ones would, and the wait is lost.
# Measured: without this bound, grouping cut 16-node trees' replica tokens/s by 9-10% at 32
# sessions and 50 ms (steps of 58 ms against 40).
_GROUP_STEP_GROWTH = 1.1


class _StepTimes:
    """Recent steps' wall time against their fed tokens: the scheduler's prediction of a
    step's time. A step costs about the same until its fed tokens make it compute-bound, then
    grows with them (a roofline), so one line through all the steps would misprice both ends.
    A token count is priced by a line through the steps of about that size (least squares
    weighted by a Gaussian kernel 20% of the count wide, slope at least 0): beyond the largest
    step seen, that line at the largest, extended; below the smallest, the smallest's time."""

    def __init__(self, size: int = 64) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=size)
        # predictions since the last `add`, by token count: the grouping rule prices the same
        # counts again at every arrival while it waits, and each fresh price is a pass over
        # all the points (about 50 us in CPython, 30 prices per decision at 32 sessions)
        self._memo: dict[int, float] = {}

    def add(self, tokens: int, seconds: float) -> None:
        self._points.append((tokens, seconds))
        self._memo.clear()

    def predict(self, tokens: int) -> float | None:
        """Seconds of a step feeding `tokens`; None before any step has run."""
        if not self._points:
            return None
        seconds = self._memo.get(tokens)
        if seconds is None:
            seconds = self._memo[tokens] = self._fit(tokens)
        return seconds

    def _fit(self, tokens: int) -> float:
        points = self._points
        low, high = min(t for t, _ in points), max(t for t, _ in points)
        at = min(max(tokens, low), high)
        width = max(4.0, 0.2 * at)
        weights = [math.exp(-(((t - at) / width) ** 2)) + 1e-12 for t, _ in points]
        total = sum(weights)
        mean_t = sum(w * t for w, (t, _) in zip(weights, points, strict=True)) / total
        mean_s = sum(w * s for w, (_, s) in zip(weights, points, strict=True)) / total
        var = sum(w * (t - mean_t) ** 2 for w, (t, _) in zip(weights, points, strict=True))
        cov = sum(
            w * (t - mean_t) * (s - mean_s) for w, (t, s) in zip(weights, points, strict=True)
        )
        slope = max(0.0, cov / var) if var > 1e-12 else 0.0
        return max(0.0, mean_s + slope * (max(tokens, low) - mean_t))


@dataclass
class _Queued:
    work: Work
    feed_estimate: int  # tokens the item will feed, for the step budget
    arrived: float  # perf_counter
    future: asyncio.Future = field(repr=False)
    started: float = 0.0  # perf_counter when its step began
    claimed: bool = True  # a caller awaits it (False: a decode token queued ahead)
    # `StepScheduler.steps` when it was last found to need model work: only a step changes
    # what its session has committed, so until the next one it needs no judging again
    needs_work_at: int = -1


class Ticket:
    """One queued item's outcome, to come (`StepScheduler.enqueue`)."""

    __slots__ = ("_queued", "_now")

    def __init__(self, queued: _Queued | None, now: VerifyResult | None) -> None:
        self._queued = queued
        self._now = now  # answered on arrival, no queue

    async def result(self) -> tuple[Any, float]:
        """The item's outcome and its queue wait in ms; raises the item's ServiceError.
        Cancelling the task that awaits this drops the item if its step has not begun."""
        if self._queued is None:
            return self._now, 0.0
        outcome = await self._queued.future
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome, max(0.0, self._queued.started - self._queued.arrived) * 1e3

    def done(self) -> bool:
        """Whether its outcome is in (awaiting `result` returns at once)."""
        return self._queued is None or self._queued.future.done()

    def cancel(self) -> None:
        """Nobody will await this ticket: drop its item unless its step has begun (then it
        runs to the end and its outcome is discarded)."""
        if self._queued is None:
            return
        future = self._queued.future
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # a failed step's error: retrieved, so asyncio logs none


class StepScheduler:
    """Queue + step loop in front of a `VerifierEngine` (see the module docstring)."""

    def __init__(
        self,
        engine: VerifierEngine,
        executor: Executor,
        on_step: Callable[[StepStats, int], None] | None = None,
    ) -> None:
        """`on_step(stats, queue_depth_left)` is called on the loop after every step (metrics)."""
        self.engine = engine
        self._executor = executor
        self._on_step = on_step
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        config = engine.config
        self.max_sessions = config.batch_max_sessions
        self.max_tokens = config.batch_max_tokens
        self.window_s = config.batch_window_ms / 1e3
        self.return_fraction = config.batch_return_fraction
        self.group_horizon = config.batch_group_horizon
        self.overlap = config.batch_overlap
        self._step_times = _StepTimes()
        self._feeds: dict[str, int] = {}  # per session: what its last item fed
        self._arrivals = 0  # items submitted so far (a wait ends on a new one)
        self._step_s = 0.0  # the wall time of the last step
        # per session: when its last item was answered, and how long its next ones took to
        # come after theirs (its return gap, smoothed)
        self._answered: dict[str, float] = {}
        self._gaps: dict[str, float] = {}
        self._last_answer: dict[str, float] = {}  # per session: when its last step ended
        # sessions seen sending a block before the verdict of the one before it (they draft
        # ahead, `_drafted_ahead`): a grouping wait would hold back their blocks
        self._pipelined: set[str] = set()
        self.steps = 0
        self._busy = False  # a step just ended with work queued: the next one starts at once
        self._idle = False  # the step loop waits for work (nothing queued, no step running)
        self._running: asyncio.Future | None = None  # done when the step running now has ended
        self._running_step: list[_Queued] = []  # that step's items
        self._step_started = 0.0  # perf_counter when it started
        self._ahead: dict[tuple[str, int], _Queued] = {}  # decode tokens queued ahead
        self.ready_on_claim = 0  # decode tokens computed ahead before their stream asked
        self.judged_at_once = 0  # blocks drafted ahead answered STALE/REPLAYED on arrival
        self.overlapped = 0  # steps started before the step before them had answered its callers

    @property
    def running(self) -> bool:
        """Whether a step is running (or its callers are being answered)."""
        return self._running is not None

    @property
    def queue_depth(self) -> int:
        """Items waiting for a step."""
        return len(self._queue)

    async def submit(self, work: Work, since: float | None = None) -> tuple[Any, float]:
        """Queue `work` and wait for its outcome: the result (a `VerifyResult`, or for a
        `PrefillWork` a `PrefillResult`) and its queue wait in ms (from `since`, a perf_counter
        time such as the block's arrival, else from now). Raises the item's ServiceError."""
        return await self.enqueue(work, since).result()

    def enqueue(self, work: Work, since: float | None = None) -> Ticket:
        """Queue `work` now and return its `Ticket` (await `Ticket.result()` for what `submit`
        returns). A stream may enqueue its next block before the one before it is answered (a
        block drafted ahead, on arrival): the scheduler keeps a session's items in order, one
        per step, so that block is queued when the step before it ends and the next step can
        start at once (see "Overlap" in the module docstring). Whoever stops waiting for a
        ticket it has not awaited must `cancel` it, so that it does not run."""
        queued = None
        if isinstance(work, DecodeWork):
            queued = self._ahead.pop((work.session_id, work.seq), None)
        else:  # a new block: whatever ran ahead of the session's last one is not wanted
            for key in [key for key in self._ahead if key[0] == work.session_id]:
                del self._ahead[key]
            if isinstance(work, VerifyWork) and self._drafted_ahead(work.session_id, since):
                self._pipelined.add(work.session_id)
            judged = self._judge_ahead_now(work)
            if judged is not None:
                return Ticket(None, judged)
        if queued is None:
            arrived = time.perf_counter() if since is None else since
            answered = self._answered.pop(work.session_id, None)
            if answered is not None:  # its return gap, smoothed (one late return is noise)
                gap = max(0.0, time.perf_counter() - answered)
                self._gaps[work.session_id] = 0.5 * (self._gaps.get(work.session_id, gap) + gap)
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            queued = _Queued(work, work.feed_estimate, arrived, future)
            self._queue.append(queued)
            self._feeds[work.session_id] = work.feed_estimate
            self._arrivals += 1
            if self._idle and (self.window_s <= 0 or not self._others_may_come()):
                # What the idle loop would do on waking, done now (it then awaits this step).
                step = self._take()
                if step:
                    self._idle = False
                    self._launch(asyncio.get_running_loop(), step)
            self._wake.set()
        else:
            queued.claimed = True
            if queued.future.done():  # it ran before its caller came: keep one ahead
                self.ready_on_claim += 1
                self._queue_ahead(work.session_id, queued.future.result())
        return Ticket(queued, None)

    def _judge_ahead_now(self, work: Work) -> VerifyResult | None:
        """The answer to a block drafted ahead (it names an anchor) that needs no model work
        (STALE or REPLAYED), given at once when nothing of its session is queued or running:
        its session's state cannot change before a step would judge it. A stream's handler
        submits one block at a time, so without this each guess that missed would wait for
        the running step to end before the block after it is even submitted (an edge that
        drafts several guesses ahead, `EngineConfig.ahead_branches`: one step per guess). None:
        it goes through the queue as any block does (and a ServiceError is raised there, in
        order)."""
        if not isinstance(work, VerifyWork) or work.block.anchor_token is None:
            return None
        sid = work.session_id
        if any(
            q.work.session_id == sid and not q.future.done()
            for q in (*self._queue, *self._running_step)
        ):
            return None
        try:
            outcome = self.engine.prepare(sid, work.block)
        except ServiceError:
            return None
        if isinstance(outcome, VerifyResult):
            self.judged_at_once += 1
            return outcome
        return None

    def _drafted_ahead(self, session_id: str, since: float | None) -> bool:
        """Whether a block of the session submitted now was sent before the verdict of the one
        before it: it arrived (`since`, its arrival stamp) before that block's step ended, or
        one of the session's blocks is still queued or running (unanswered). A stream's
        handler submits its blocks one at a time, so the arrival tells, not the submit."""
        last = self._last_answer.get(session_id)
        if since is not None and last is not None and since < last:
            return True
        return any(
            q.work.session_id == session_id
            and isinstance(q.work, VerifyWork)
            and not q.future.done()
            for q in (*self._queue, *self._running_step)
        )

    def _queue_ahead(self, session_id: str, outcome: Outcome) -> None:
        """Queue the next token of `outcome`'s decode block if it has more (one ahead)."""
        if not isinstance(outcome, VerifyResult) or not outcome.more:
            return
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        work = DecodeWork(session_id, outcome.seq)
        queued = _Queued(work, 1, time.perf_counter(), future, claimed=False)
        self._ahead[(session_id, outcome.seq)] = queued
        self._queue.append(queued)
        self._wake.set()

    async def run(self) -> None:
        """The step loop (until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._running is None and not self._queue:
                self._busy = False
                self._wake.clear()
                self._idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._idle = False
            if self._running is None:  # else `submit` has started the step already
                if not self._busy and self.window_s > 0:
                    await self._gather_window()  # idle: let others join the first item
                await self._await_group()
                step = self._take()
                if not step:
                    continue
                self._launch(loop, step)
            assert self._running is not None
            running = self._running
            await running
            if self._running is not running:
                continue  # `_finish` started the next step already (overlap): await that one
            self._running = None
            step = self._running_step
            # Let the callers just answered run before the next step is taken: a stream whose
            # next block has already arrived (a block drafted ahead, or a STALE one to skip)
            # submits it within these few loop turns and joins the very next step, instead of
            # waiting for that one to end first.
            for _ in range(_RESUME_TURNS):
                await asyncio.sleep(0)
            await self._await_returns(step)

    async def _await_returns(self, step: list[_Queued]) -> None:
        """Wait for the sessions of `step` that come back quickly as a rule (see the module
        docstring: quick returns share a step)."""
        gaps = self._quick_returns(step)

        def waiting() -> set[str]:
            return set(gaps) - {q.work.session_id for q in self._queue}

        late = waiting()
        if late:
            wait_s = min(self.return_fraction * self._step_s, 2 * max(gaps[sid] for sid in late))
            await self._wait_while(time.perf_counter() + wait_s, lambda: bool(waiting()))

    def _quick_returns(self, step: list[_Queued]) -> dict[str, float]:
        """The return gaps of the sessions of `step` that usually come back within
        `return_fraction` of a step."""
        window_s = self.return_fraction * self._step_s
        if window_s <= 0:
            return {}
        return {
            q.work.session_id: self._gaps[q.work.session_id]
            for q in step
            if self._gaps.get(q.work.session_id, float("inf")) <= window_s
        }

    async def _await_group(self) -> None:
        """Delay the next step for sessions expected back soon, while that serves more sessions
        per unit of verifier time (see the module docstring: steps grouped by expected
        returns). Returns at once when grouping is off or no step has been timed yet."""
        start = time.perf_counter()
        limit: float | None = None
        first_step_s = 0.0
        while True:
            self._answer_without_work()
            now = time.perf_counter()
            plan = self._group_plan(now, limit, first_step_s)
            if plan is None:
                return
            until, step_s = plan
            if limit is None:
                limit = start + self.group_horizon * step_s
                # the step it would have run when the wait began: the growth bound stays on
                # it, or each arrival would move it up by another 10% (16-node trees at 32
                # sessions: a block's verify time rose from 50 to 58 ms, -13% tokens/s)
                first_step_s = step_s
            if until is None:
                return
            seen = self._arrivals

            def no_arrival(seen: int = seen) -> bool:
                return self._arrivals == seen

            await self._wait_while(min(until + 0.1 * step_s, limit), no_arrival)
            if time.perf_counter() >= limit:
                return

    def _group_plan(
        self, now: float, limit: float | None, first_step_s: float
    ) -> tuple[float | None, float] | None:
        """The grouping decision at `now`: None to start the step now whatever comes (grouping
        off, nothing queued, a session queued that waits for nobody, no step timed yet), else
        (when to start it: None for now, or the expected return worth waiting for; the
        predicted time of a step of the queued work). `limit` (None: not set yet, taken as now
        + the horizon) is the latest start; `first_step_s` the step the wait began with (the
        growth bound; 0: this one)."""
        if self.group_horizon <= 0 or not self._queue:
            return None
        queued = {q.work.session_id for q in self._queue}
        if queued & self._pipelined or any(isinstance(q.work, DecodeWork) for q in self._queue):
            # a block of a session that drafts ahead (its guess, or the fresh block after
            # a miss), or a cloud-only stream's next token: its session waits for nobody
            return None
        fed = sum(self._feeds.get(sid, 1) for sid in queued)
        step_s = self._step_times.predict(fed)
        if not step_s:
            return None
        if limit is None:
            limit = now + self.group_horizon * step_s
        growth_bound = _GROUP_STEP_GROWTH * (first_step_s or step_s)
        slack = 0.1 * step_s
        expected = sorted(
            (answered + gap, sid)
            for sid, answered in self._answered.items()
            if sid not in queued
            and (gap := self._gaps.get(sid)) is not None
            and now - slack <= answered + gap <= limit
        )
        best, until = len(queued) / step_s, None
        for j, (due, sid) in enumerate(expected, 1):
            fed += self._feeds.get(sid, 1)
            step_j = self._step_times.predict(fed) or step_s
            if step_j > growth_bound:
                break  # past the roofline's knee: a merged step costs what two would
            rate = (len(queued) + j) / (max(0.0, due - now) + step_j)
            if rate > best:
                best, until = rate, due
        return until, step_s

    def _launch(self, loop: asyncio.AbstractEventLoop, step: list[_Queued]) -> None:
        """Start `step` on the model thread; `_running` is done when its callers are answered."""
        self._busy = True
        now = time.perf_counter()
        for item in step:
            item.started = now
        done: asyncio.Future = loop.create_future()
        self._running, self._running_step, self._step_started = done, step, now
        try:
            self._executor.submit(self._step_on_worker, loop, step, done)
        except RuntimeError as err:  # the executor has shut down (the server is stopping)
            self._finish(step, err, done)

    async def _gather_window(self) -> None:
        """Wait up to `window_s` while some open session has nothing queued (it may join)."""
        await self._wait_while(time.perf_counter() + self.window_s, self._others_may_come)

    async def _wait_while(self, deadline: float, pending: Callable[[], bool]) -> None:
        """Wait for queued work while `pending()` holds, until perf_counter time `deadline`."""
        while pending():
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                return

    def _step_on_worker(
        self, loop: asyncio.AbstractEventLoop, step: list[_Queued], done: asyncio.Future
    ) -> None:
        """Run one step (on the executor's thread) and hand its outcomes to the loop."""
        result: tuple[list[Outcome], StepStats] | Exception
        try:
            result = run_step(self.engine, [item.work for item in step])
        except Exception as err:  # noqa: BLE001 - run_step does not raise; be safe anyway
            logger.exception("verifier step failed")
            result = err
        try:
            loop.call_soon_threadsafe(self._finish, step, result, done)
        except RuntimeError:  # the loop has closed: nobody awaits these outcomes any more
            logger.debug("verifier step finished after its event loop closed")

    def _finish(
        self,
        step: list[_Queued],
        result: tuple[list[Outcome], StepStats] | Exception,
        done: asyncio.Future,
    ) -> None:
        """On the loop: answer the step's callers (those still waiting), then wake `run`."""
        try:
            if isinstance(result, Exception):
                for item in step:
                    if not item.future.done():
                        item.future.set_exception(result)
                return
            outcomes, stats = result
            self.steps += 1
            now = time.perf_counter()
            # the step's time: the model's and the hand-off back, not its callers' answering
            # (which overlaps the next step, or precedes it as the loop's own work)
            self._step_s = now - self._step_started
            self._step_times.add(sum(q.feed_estimate for q in step), self._step_s)
            if len(self._last_answer) > 4 * self.engine.config.max_sessions:
                # Every session ever answered has an entry in these maps, mostly closed
                # sessions': the open ones' are relearnt at their next item and return.
                self._answered.clear()
                self._gaps.clear()
                self._last_answer.clear()
                self._feeds.clear()
                self._pipelined.clear()
            queued = {q.work.session_id for q in self._queue}
            answers: list[tuple[_Queued, Outcome]] = []
            for item, outcome in zip(step, outcomes, strict=True):
                sid = item.work.session_id
                self._last_answer[sid] = now
                # a return gap is timed from the answer that leaves a session with nothing
                # queued (a block drafted ahead already waiting is no return)
                if sid in queued:
                    self._answered.pop(sid, None)
                else:
                    self._answered[sid] = now
                if not item.future.done():
                    answers.append((item, outcome))
                    if item.claimed:
                        self._queue_ahead(item.work.session_id, outcome)
            if self._on_step is not None:
                self._on_step(stats, len(self._queue))
            self._overlap(step)
            for item, outcome in answers:
                if not item.future.done():
                    item.future.set_result(outcome)
        finally:
            # Idle unless work came meanwhile: decided before the callers resume, so a block
            # sent right after this step's verdict finds the scheduler idle, as `run` would.
            self._busy = bool(self._queue) or self._running is not done
            if not done.done():
                done.set_result(None)

    def _overlap(self, step: list[_Queued]) -> None:
        """Start the next step now, before this one's callers are answered, when `run` would
        start it without waiting (see "Overlap" in the module docstring); else leave it to
        `run`."""
        if not self.overlap:
            return
        self._answer_without_work()
        if not self._queue:
            return
        if self._group_plan(time.perf_counter(), None, 0.0) is not None:
            # grouping may wait for returns: `run` decides, again at each arrival (deciding
            # once, here, merged fewer steps: the grouping test's 6 sessions ran 26-35 steps
            # where `run` takes 26)
            return
        if set(self._quick_returns(step)) - {q.work.session_id for q in self._queue}:
            return  # sessions that come back within a fraction of a step: wait for them
        following = self._take()
        if following:
            self.overlapped += 1
            self._launch(asyncio.get_running_loop(), following)

    def _others_may_come(self) -> bool:
        """Whether an open session has no item queued yet (else the window would only delay:
        a lone session pays no gather window)."""
        return self.engine.open_sessions > len({q.work.session_id for q in self._queue})

    def _answer_without_work(self) -> None:
        """Answer now, without a step, each session's first queued blocks while they need no
        model work (STALE or REPLAYED: `VerifierEngine.prepare`; see the module docstring).
        Such a block is mostly a pipelined guess that the last verdict has shown wrong; left in
        the queue it would take its session's place in the next step and push the block that
        replaced it to the one after. Called between steps (no model work runs), on the loop."""
        judged: set[str] = set()  # sessions whose first remaining block needs model work
        kept: deque[_Queued] = deque()
        now = time.perf_counter()
        for item in self._queue:
            sid = item.work.session_id
            if (
                sid not in judged
                and isinstance(item.work, VerifyWork)
                and item.needs_work_at != self.steps
                and not item.future.done()
            ):
                try:
                    outcome = self.engine.prepare(sid, item.work.block)
                except ServiceError:
                    outcome = None  # its step raises it again, in order
                if isinstance(outcome, VerifyResult):
                    item.started = now
                    item.future.set_result(outcome)
                    continue
                item.needs_work_at = self.steps
            judged.add(sid)
            kept.append(item)
        if len(kept) < len(self._queue):
            # sessions left with nothing queued are away since their last verdict
            left = {q.work.session_id for q in kept}
            for item in self._queue:
                sid = item.work.session_id
                if sid not in left and sid in self._last_answer:
                    self._answered[sid] = self._last_answer[sid]
        self._queue = kept

    def _take(self) -> list[_Queued]:
        """The next step's items: FIFO within the budget, one per session (see the rules)."""
        self._answer_without_work()
        step: list[_Queued] = []
        sessions: set[str] = set()
        tokens = 0
        kept: deque[_Queued] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # its caller has gone
                continue
            sid = item.work.session_id
            full = len(step) >= self.max_sessions or (
                step and tokens + item.feed_estimate > self.max_tokens
            )
            if full or sid in sessions:
                kept.append(item)
                continue
            step.append(item)
            sessions.add(sid)
            tokens += item.feed_estimate
        self._queue = kept
        return step
