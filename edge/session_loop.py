"""The rounds of one edge session (`SessionLoop`): choose, draft, verify, apply, learn.

A round is

    choose (the draft-length policy) -> draft k tokens -> one verifier round trip
    -> apply the verdict (commit tokens, roll the draft cache back) -> yield the new tokens
    -> tell the policy what the round cost (`observation_from_record`).

Policies decide per round between a speculative round of k draft tokens and cloud-only decoding,
where the verifier decodes alone and streams its tokens (a decode block: one verdict per token,
committed and yielded as each arrives). Consecutive cloud-only chunks are requested back to back,
the next sent while the current one streams, so the stream only pays an RTT when it starts.

Pipelined drafting (`pipelined=True`): after sending block n, while its verdict travels, the loop
drafts block n+1 on the guess that block n is accepted whole (a token tree: along its likeliest
path) and that the verifier's bonus token is the draft's own next token, and sends it at once
(pipeline depth 1); block n+1 is a chain or a tree, as the policy decides. On a hit the next verdict
is already on its way; on a miss the verifier answers the block STALE (its base_len or anchor
token does not match) and the loop drafts afresh from the committed tokens. Exactness is
unchanged (the argument is in `edgespec.core.session`'s docstring).

The loop talks to the verifier through a `VerifierLink` (any transport) and recovers from link
failures through `edgespec.edge.recovery.Recovery`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from edgespec.core.adaptive import AdaptivePolicy
from edgespec.core.drafter import Drafter
from edgespec.core.params import SamplingParams
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    Decision,
    DraftLengthPolicy,
    RoundObservation,
    TreeOutcome,
)
from edgespec.core.rejection import DraftProbs
from edgespec.core.session import DraftBlock, Verdict
from edgespec.core.tree import DraftTree, TreeShape, walk_steps
from edgespec.edge.records import EdgeStats, RoundRecord, observation_from_record
from edgespec.edge.recovery import Recovery
from edgespec.edge.round_timing import RoundTiming, round_timing
from edgespec.edge.verifier_link import LinkError, Reply, VerifierLink

# Runs draft-model work: compute(fn, *args) -> fn(*args), on a worker thread or inline.
Compute = Callable[..., Awaitable[Any]]


def truncate_block(block: DraftBlock, k: int) -> DraftBlock:
    """The first k draft tokens of `block` (still a valid block: a prefix of a draft is one,
    and so are a tree's first k nodes, parents coming before their children)."""
    q = block.draft_probs
    if q is not None:
        q = (
            DraftProbs.dense(q.probs[:k])
            if q.ids is None
            else DraftProbs.sparse(q.ids[:k], q.probs[:k])
        )
    parents = block.parents[:k] if block.parents is not None else None
    return replace(block, tokens=block.tokens[:k], draft_probs=q, parents=parents)


def _timed(fn: Callable, drafter: Drafter, n: int) -> tuple[DraftBlock | None, float, int]:
    """Run a drafting call; returns its block, its wall ms and the draft forwards it ran."""
    forwards = drafter.runner.forwards
    t0 = time.perf_counter()
    block = fn(n)
    return block, (time.perf_counter() - t0) * 1e3, drafter.runner.forwards - forwards


@dataclass
class _Sent:
    """What the session knows of a proposed block until its round is recorded."""

    block: DraftBlock
    k: int  # draft length chosen (0 for a decode block)
    draft_ms: float = 0.0
    draft_forwards: int = 0
    probe: bool = False
    ahead: bool = False  # drafted (or requested) ahead, while the previous block was in flight
    t_sent: float | None = None  # perf_counter of the write on the current stream
    bytes_sent: int = 0

    @property
    def levels(self) -> int:
        """Draft forwards that grew the block (a block drafted ahead spent one more, on its
        guessed bonus token)."""
        return self.draft_forwards - int(self.ahead)


class SessionLoop:
    """The rounds of one session: policy decisions, drafting (ahead, when pipelined), sending,
    matching replies to blocks, reconnecting; yields each batch of newly committed tokens.

    Replies arrive in the order blocks were sent. A reply for a block the session dropped (a
    pipelined guess that missed) must be STALE and is skipped; anything else unexpected is a
    protocol error, handled like a broken link (reopen with the committed prefix).
    """

    def __init__(
        self,
        link: VerifierLink,
        drafter: Drafter,
        params: SamplingParams,
        policy: DraftLengthPolicy,
        pipelined: bool,
        stats: EdgeStats,
        t_start: float,
        *,
        compute: Compute,
        recovery: Recovery,
        max_k: int,
        learner: AdaptivePolicy | None = None,
        ahead_branches: int = 0,
        ahead_branches_sent: int = 0,
    ) -> None:
        """`compute(fn, *args)` runs draft-model work (the engine's worker thread or inline);
        `max_k` caps every draft length (with the verifier's `max_block_tokens`);
        `ahead_branches`, `ahead_branches_sent`: the guesses besides the main one a pipelined
        chain drafts ahead on, and how many of them go out with it (`EngineConfig`)."""
        self.compute = compute
        self.ahead_branches = ahead_branches
        self.ahead_branches_sent = ahead_branches_sent
        self.recovery = recovery
        self.max_k = max_k
        self.learner = learner  # observes every round too, unless it is the policy itself
        # Rounds the shadow learner has not seen yet: it learns while the next block travels.
        self._unobserved: list[RoundObservation] = []
        self._ping: asyncio.Future | None = None  # the RTT ping in flight (cloud-only streams)
        self.link = link
        self.drafter = drafter
        self.params = params
        self.policy = policy
        self.pipelined = pipelined
        self.stats = stats
        self.t_start = t_start
        self.blocks: dict[int, _Sent] = {}  # seq -> proposed block not yet recorded
        self.sent: set[int] = set()  # seqs written on the current stream
        self.dropped: set[int] = set()  # seqs written on the current stream, then dropped
        # Blocks that went out as alternatives of another (`DraftBlock.alternatives`): seq ->
        # (the seq of the message that carried them, their index in its `choices`).
        self.carried: dict[int, tuple[int, int]] = {}
        self.next_decision: Decision | None = None  # chosen ahead of time but not yet used
        self.failures = 0  # link failures since the last good reply (bounds the retries)
        self.waits = 0  # refusals for room since the last good reply (bounds the waits)
        self._round_failures = 0  # link failures during the current round
        self.last_end = time.perf_counter()  # when the previous round ended

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[list[int]]:
        try:
            async for new in self._rounds():
                yield new
        finally:
            self._teach_learner()
            if self._ping is not None:
                self._ping.cancel()

    async def _rounds(self) -> AsyncIterator[list[int]]:
        d = self.drafter
        while not d.finished:
            if d.pending is None:
                decision, self.next_decision = self.next_decision, None
                if decision is None:
                    decision = self.policy.choose(tokens_left=d.tokens_left)
                if decision.mode == CLOUD_ONLY:
                    block = d.propose_decode(min(decision.stream_tokens, d.tokens_left))
                    self.blocks[block.seq] = _Sent(block, 0, probe=decision.probe)
                elif (shape := self._tree_shape(decision)) is not None:
                    block, ms, forwards = await self.compute(_timed, d.propose_tree, d, shape)
                    self.blocks[block.seq] = _Sent(block, shape.depth, ms, forwards, decision.probe)
                else:
                    k = self._clip_k(decision.k)
                    block, ms, forwards = await self.compute(_timed, d.propose, d, k)
                    self.blocks[block.seq] = _Sent(block, k, ms, forwards, decision.probe)
            pending = d.pending
            assert pending is not None
            if pending.decode_tokens:
                async for new in self._decode_round(pending):
                    yield new
            else:
                yield await self._speculative_round(pending)

    def _tree_shape(self, decision: Decision) -> TreeShape | None:
        """The tree a decision drafts, its nodes capped at the verifier's max_block_tokens (a
        tree's size is the verifier's business, not max_k's); None: a chain (or no tree can be
        sent, see `_trees_ok`: then a tree decision runs as a chain of its depth)."""
        if decision.tree is None or not self._trees_ok():
            return None
        assert self.link.session is not None  # _trees_ok
        return replace(
            decision.tree, nodes=min(decision.tree.nodes, self.link.session.max_block_tokens)
        )

    def _trees_ok(self) -> bool:
        """Token trees can be sent: the verifier takes them (known once a session is open) and
        the draft's cache can be compacted to a path. Otherwise a tree decision runs as a chain
        of its depth."""
        session = self.link.session
        return session is not None and session.tree_blocks and self.drafter.runner.batchable

    def _clip_k(self, k: int) -> int:
        hi = self.max_k
        if self.link.session is not None:
            hi = min(hi, self.link.session.max_block_tokens)
        return max(0, min(int(k), hi))

    async def _failed(self, err: LinkError, what: str) -> None:
        self._round_failures += 1
        if self.recovery.is_refusal(err):  # evicted, or no room to reopen yet: wait the hint
            self.waits += 1
            await self.recovery.wait_for_room(err, self.waits, self.stats, what)
            return
        self.failures += 1
        await self.recovery.after_failure(err, self.failures, self.stats, what)

    # ---- speculative rounds -----------------------------------------------------------------

    async def _speculative_round(self, pending: DraftBlock) -> list[int]:
        d = self.drafter
        self._round_failures = 0
        ahead_ms = 0.0
        while True:
            try:
                await self._ensure_sent(pending)
                # A retried round does not write ahead: a write racing a verifier's error status
                # loses that status (see GrpcVerifierLink._write_failed).
                if self.pipelined and not self._round_failures:
                    ahead_ms = await self._send_ahead()
                reply = await self._receive_for(pending.seq)
                if reply.more:
                    raise self.link.protocol_error(
                        f"verifier streamed several verdicts for block seq={pending.seq}"
                    )
                break
            except LinkError as err:
                ahead_ms = 0.0  # the verdict finally read did not wait for that drafting
                await self._failed(err, f"round seq={pending.seq}")
        assert reply.verdict is not None
        t0 = time.perf_counter()
        new = d.apply(reply.verdict)
        apply_ms = (time.perf_counter() - t0) * 1e3
        sent = self.blocks.pop(pending.seq)
        self._after_apply()
        assert sent.t_sent is not None
        self._record(
            RoundRecord(
                seq=pending.seq,
                k=sent.k,
                drafted=len(pending.tokens),
                accepted=reply.verdict.accepted,
                tree=self._tree_outcome(pending, reply.verdict, sent.levels),
                draft_ms=sent.draft_ms,
                round_ms=(reply.received - self.last_end) * 1e3,
                apply_ms=apply_ms,
                timing=round_timing(reply, sent.t_sent, sent.bytes_sent),
                attempts=1 + self._round_failures,
                mode=SPECULATIVE,
                tokens=reply.verdict.accepted + 1,
                pipelined=sent.ahead,
                probe=sent.probe,
                draft_forwards=sent.draft_forwards,
                runner_up=d.last_runner_up,
                ahead_draft_ms=ahead_ms,
            ),
            reply,
        )
        return new

    @staticmethod
    def _tree_outcome(block: DraftBlock, verdict: Verdict, levels: int) -> TreeOutcome | None:
        """What a tree round's walk showed the policy; None for a chain or an empty tree."""
        if block.parents is None or not block.tokens:
            return None
        tree = DraftTree(block.tokens, block.parents)
        steps, spine, spine_accepted = walk_steps(tree, verdict.path or ())
        return TreeOutcome(
            levels=max(levels, 1),
            depth=block.depth,
            steps=steps,
            spine=spine,
            spine_accepted=spine_accepted,
        )

    async def _send_ahead(self) -> float:
        """Pipelining: draft the block after the pending one (a chain or a tree, as the policy
        decides, after a pending chain or tree) and send it (depth 1). Returns the drafting's
        wall ms (0.0: nothing drafted)."""
        d = self.drafter
        if self.next_decision is not None or d.ahead is not None or d.ahead_room() < 0:
            return 0.0
        decision = self.policy.choose(tokens_left=d.tokens_left)
        if decision.mode != SPECULATIVE or not decision.ahead:
            self.next_decision = decision  # taken when the pending round is over
            return 0.0
        shape = self._tree_shape(decision)
        k = shape.depth if shape is not None else self._clip_k(decision.k)
        branches = self.ahead_branches if shape is None else 0
        propose = partial(d.propose_ahead, tree=shape, branches=branches)
        block, ms, forwards = await self.compute(_timed, propose, d, k)
        if block is None:  # the guessed bonus token is a stop token: nothing to draft
            self.next_decision = decision
            return ms
        # The branches were drafted with the main guess, in the same forwards. The likeliest
        # (the earliest rejected position: the smallest base_len) go out with it, most
        # committed tokens assumed first (once one is applied the verifier finds the later
        # ones STALE); the others are sent only if the verdict shows them right
        # (`_ensure_sent`), so their rounds wait for no block before them (`ahead` False).
        likeliest = sorted(d.branches, key=lambda b: b.base_len)[: self.ahead_branches_sent]
        going = [block, *sorted(likeliest, key=lambda b: -b.base_len)]
        for ahead in (block, *d.branches):
            sent_now = ahead in going
            self.blocks[ahead.seq] = _Sent(ahead, k, ms, forwards, decision.probe, ahead=sent_now)
        session = self.link.session
        if session is not None and session.block_alternatives:
            await self._send(*going)  # one message: the verifier applies the guess that fits
        else:
            for ahead in going:
                await self._send(ahead)
        return ms

    # ---- cloud-only streams -----------------------------------------------------------------

    async def _decode_round(self, pending: DraftBlock) -> AsyncIterator[list[int]]:
        """Stream the tokens of decode block `pending`, yielding each as it is committed, and
        record the stream as one round (also when the link breaks midway: the tokens already
        committed stay, and the next round reopens the session)."""
        d = self.drafter
        sent = self.blocks[pending.seq]
        self._start_ping()
        count = 0
        verify_ms = queue_ms = apply_ms = 0.0
        bytes_received = 0
        last: Reply | None = None
        self._round_failures = 0
        while d.pending is pending and not d.finished:
            try:
                await self._ensure_sent(pending)
                if not self._round_failures:
                    await self._send_decode_ahead()
                reply = await self._receive_for(pending.seq)
            except LinkError as err:
                await self._stream_broken(err, pending)
                break
            assert reply.verdict is not None
            t0 = time.perf_counter()
            new = d.apply(reply.verdict)
            apply_ms += (time.perf_counter() - t0) * 1e3
            count += 1
            verify_ms += reply.verify_ms
            # A block requested ahead waited at the verifier behind the stream before it: that
            # wait is the previous stream's time, not this one's.
            if count > 1 or not sent.ahead:
                queue_ms += reply.queue_ms
            bytes_received += reply.bytes_received
            last = reply
            yield new
            # Both sides end a stream by the same rules (n tokens, a stop token, max_new_tokens).
            if reply.more != (d.pending is pending and not d.finished):
                mismatch = self.link.protocol_error(
                    f"the verifier's stream for block seq={pending.seq} disagrees on its length "
                    f"(token {count} of {pending.decode_tokens}, more={reply.more})"
                )
                await self._stream_broken(mismatch, pending)
                break
        self.blocks.pop(pending.seq, None)
        self._after_apply()
        if last is None or sent.t_sent is None:
            return
        start = max(self.last_end, sent.t_sent)
        wall_ms = (last.received - start) * 1e3
        timing = RoundTiming(
            wall_ms=wall_ms,
            verify_ms=verify_ms,
            queue_ms=queue_ms,
            network_ms=wall_ms - verify_ms - queue_ms,
            bytes_sent=sent.bytes_sent,
            bytes_received=bytes_received,
        )
        self._record(
            RoundRecord(
                seq=pending.seq,
                k=0,
                drafted=0,
                accepted=0,
                draft_ms=0.0,
                round_ms=wall_ms,
                apply_ms=apply_ms,
                timing=timing,
                attempts=1 + self._round_failures,
                mode=CLOUD_ONLY,
                tokens=count,
                pipelined=sent.ahead,
                probe=sent.probe,
            ),
            last,
        )
        if self.learner is not None and not d.finished:
            # what the draft would have proposed for the streamed tokens (greedy or coupled): the
            # acceptance estimate stays current without speculative probes
            matches = await self.compute(d.shadow_matches)
            if matches:
                self._teach_learner()
                self.learner.observe_shadow(matches)

    def _start_ping(self) -> None:
        """Cloud-only streams carry no RTT samples: ping the verifier once per chunk (one ping
        in flight at most) so the learner sees the link improve and can go back to speculating."""
        if self.learner is None or self._ping is not None:
            return
        self._ping = asyncio.ensure_future(self.link.ping())
        self._ping.add_done_callback(self._pinged)

    def _pinged(self, task: asyncio.Future) -> None:
        self._ping = None
        if task.cancelled() or task.exception() is not None or task.result() is None:
            return
        assert self.learner is not None
        self._teach_learner()
        self.learner.observe_rtt(task.result())

    async def _stream_broken(self, err: LinkError, pending: DraftBlock) -> None:
        """Give up the rest of a cloud-only stream (the next round reopens the session)."""
        if self.drafter.pending is pending:
            self.drafter.abandon_decode()  # drops a chunk requested ahead too
        self._forget_unsent()
        live = self.drafter.pending
        self.blocks = {live.seq: self.blocks[live.seq]} if live is not None else {}
        await self._failed(err, f"cloud-only stream seq={pending.seq}")

    async def _send_decode_ahead(self) -> None:
        """Request the next cloud-only chunk while this one streams, if the policy wants one."""
        d = self.drafter
        if self.next_decision is not None or d.decode_ahead_room() < 1:
            return
        decision = self.policy.choose(tokens_left=d.tokens_left)
        if decision.mode != CLOUD_ONLY:
            self.next_decision = decision
            return
        block = d.propose_decode_ahead(decision.stream_tokens)
        if block is None:
            self.next_decision = decision
            return
        self.blocks[block.seq] = _Sent(block, 0, probe=decision.probe, ahead=True)
        await self._send(block)

    # ---- the stream ---------------------------------------------------------------------------

    async def _ensure_sent(self, pending: DraftBlock) -> None:
        """Open the session if the link is closed (the committed prefix seeds the verifier; a
        block drafted ahead is dropped, as it may not fit the new session) and send `pending`
        unless it is on the current stream already."""
        if not self.link.is_open:
            self._forget_unsent()
            session = await self.link.open(
                self.drafter.committed,
                self.params,
                generated=len(self.drafter.generated),
                next_seq=pending.seq,
            )
            self.recovery.check_session(session, self.params)
        if pending.seq not in self.sent:
            await self._send(pending)

    def _forget_unsent(self) -> None:
        """After a broken stream: nothing is on the (next) stream; drop the blocks ahead."""
        self.drafter.drop_ahead()
        for block in self.drafter.dropped_blocks:
            self.blocks.pop(block.seq, None)
        self.sent.clear()
        self.dropped.clear()
        self.carried.clear()

    async def _send(self, block: DraftBlock, *alternatives: DraftBlock) -> None:
        """Write `block` on the stream, with `alternatives` (other guesses drafted ahead) in
        the same message: their seq is `block`'s there, and `_receive_for` maps its reply back."""
        session = self.link.session
        assert session is not None
        limit = session.max_block_tokens

        def fit(b: DraftBlock) -> DraftBlock:
            return truncate_block(b, limit) if len(b.tokens) > limit else b

        wire = fit(block)
        if alternatives:
            carried = tuple(replace(fit(b), seq=block.seq) for b in alternatives)
            wire = replace(wire, alternatives=carried)
        t_sent, nbytes = await self.link.send(wire)
        for i, member in enumerate((block, *alternatives)):
            sent = self.blocks[member.seq]
            sent.t_sent, sent.bytes_sent = t_sent, nbytes
            self.sent.add(member.seq)
            if i:
                self.carried[member.seq] = (block.seq, i)

    async def _receive_for(self, seq: int) -> Reply:
        """The next reply for block `seq`, skipping STALE replies of dropped blocks."""
        self._teach_learner()  # the block is on its way: off the round's critical path
        wire, index = self.carried.get(seq, (seq, 0))
        while True:
            reply = await self.link.receive()
            if reply.seq == wire and reply.verdict is not None:
                if reply.verdict.alternative != index:
                    raise self.link.protocol_error(
                        f"verifier applied guess {reply.verdict.alternative} of block "
                        f"seq={wire} where the committed tokens fit guess {index}"
                    )
                self.failures = self.waits = 0
                if wire == seq:
                    return reply
                del self.carried[seq]
                verdict = replace(reply.verdict, seq=seq, alternative=0)
                return replace(reply, seq=seq, verdict=verdict)
            if reply.seq in self.dropped and reply.outcome == "STALE":
                self.dropped.discard(reply.seq)
                self.sent.discard(reply.seq)
                continue
            raise self.link.protocol_error(
                f"verifier answered {reply.outcome} seq={reply.seq} "
                f"(committed_len={reply.committed_len}) while block seq={seq} awaited its verdict"
            )

    # ---- bookkeeping --------------------------------------------------------------------------

    def _after_apply(self) -> None:
        """Account for the block drafted ahead after `Drafter.apply`: used or dropped."""
        d = self.drafter
        if d.last_ahead_hit is True:
            if d.pending is not None and not d.pending.decode_tokens:
                self.stats.pipeline_hits += 1
        elif d.last_ahead_hit is False and d.dropped_ahead and not d.dropped_ahead.decode_tokens:
            self.stats.pipeline_misses += 1
        pending = d.pending
        live = None if pending is None else self.carried.get(pending.seq, (pending.seq, 0))[0]
        for block in d.dropped_blocks:
            self.blocks.pop(block.seq, None)
            wire = self.carried.pop(block.seq, (block.seq, 0))[0]
            if block.seq in self.sent:
                self.sent.discard(block.seq)
                if wire != live:  # the pending block's message answers with its verdict
                    self.sent.add(wire)
                    self.dropped.add(wire)  # its STALE reply is still to come

    def _record(self, record: RoundRecord, reply: Reply) -> None:
        now = time.perf_counter()
        since_verdict = now - reply.received  # s: reading, applying and recording the verdict
        record = replace(
            record,
            t_wall=time.time() - since_verdict,
            t_ms=(reply.received - self.t_start) * 1e3,
            commit_ms=since_verdict * 1e3,
        )
        self.last_end = now
        self.stats.observe_round(record)
        obs = observation_from_record(record)
        if obs is not None:
            self.policy.observe(obs)
            if self.learner is not None and self.learner is not self.policy:
                self._unobserved.append(obs)  # a shadow: its decisions wait for nothing

    def _teach_learner(self) -> None:
        """Hand the shadow learner the rounds recorded since it last learned, in order (before
        anything else it is told, so it sees the same sequence as if taught at once)."""
        if self._unobserved:
            assert self.learner is not None
            for obs in self._unobserved:
                self.learner.observe(obs)
            self._unobserved.clear()
