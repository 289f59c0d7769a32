"""The two transport-free halves of one speculative-decoding session.

`Drafter` (edge half) owns the committed token history and the draft model: it proposes a
`DraftBlock` of draft tokens and applies the `Verdict` that comes back. `Verifier` (cloud half)
owns the target model's KV cache for the session: it scores a block in one forward pass and decides
how many draft tokens are accepted plus one token of its own (the recovered token on a rejection,
the bonus token when every draft token is accepted). The edge and cloud packages wrap these in
gRPC; `generate.generate` wires them directly (co-located).

Cache convention on both sides: a runner's cache holds a prefix of the committed tokens, at most
all but the last one. Every forward feeds the committed tokens the cache lacks (usually just the
last one) followed by the new tokens, so one forward yields the logits for every position needed.
(The draft's cache may also hold draft tokens still awaiting their verdict; `apply` rolls it back
to the part that was committed.)

Two extensions of the plain round:

- **Cloud-only decoding** (`Drafter.propose_decode`): a block with no draft tokens and
  ``decode_tokens = n`` asks the verifier to decode n tokens alone. The verifier answers with one
  verdict per token (`Verifier.continue_decode` after the first); each is a k = 0 round, its token
  drawn from the target's own distribution, so the output is the target's.
- **Pipelined drafting** (`Drafter.propose_ahead`): while block n's verdict travels, the drafter
  guesses the verdict's bonus token g (the draft's most likely next token after the whole block)
  and drafts block n+1 after it, with ``base_len = base_n + k_n + 1`` and ``anchor_token = g``.
  The verifier applies block n+1 only if its committed length is base_len AND its last committed
  token is g; otherwise the block is stale (no forward, nothing changes). On the verdict of
  block n, the drafter keeps block n+1 (a *hit*: every draft token accepted and the bonus equals
  g) or drops it and rolls its cache back to the committed prefix (a *miss*).

  Why this is exact. Greedy: a block is verified against the target's argmax whatever its
  origin, and only on the prefix it names, so the committed tokens are the target's. Sampling:
  the bonus token of block n is drawn by the verifier from p exactly, independently of g (the
  guess only decides whether block n+1 is used). Block n+1 proceeds only if the committed prefix
  ends in g, which is the prefix its draft tokens were drawn on, each from its own q (sent with
  the block) with the draft's randomness, independent of the verifier's draws. So conditioned on
  the committed prefix, block n+1 is an ordinary block drafted from q on that prefix, and
  rejection sampling against p commits tokens distributed as the target alone would produce
  them. A dropped block consumed only draft randomness, which no committed token depends on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs, Verification, verify
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"  # a stop token was generated (it is part of the output)
FINISH_LENGTH = "length"  # max_new_tokens were generated


class StaleBlockError(Exception):
    """A block was drafted on a prefix the verifier has moved past (or an older seq was resent).

    Not a `ValueError`: the block is well formed, just late; services answer it as stale.
    """

    def __init__(self, seq: int, base_len: int, committed_len: int, last_seq: int | None) -> None:
        super().__init__(
            f"stale block: seq={seq} base_len={base_len}, verifier committed_len={committed_len} "
            f"last seq={last_seq}"
        )
        self.seq = seq
        self.base_len = base_len
        self.committed_len = committed_len
        self.last_seq = last_seq


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


@dataclass(frozen=True)
class DraftBlock:
    """Draft tokens proposed by the edge for one verification round (edge -> cloud)."""

    seq: int  # round sequence number: 0 for the first block, +1 per block
    base_len: int  # committed length (prompt + generated) the draft tokens extend
    tokens: tuple[int, ...]  # the draft tokens, k >= 0 of them
    # The distributions the draft tokens were drawn from; None for greedy drafting (q one-hot).
    draft_probs: DraftProbs | None = None
    # Cloud-only streaming: k = 0 and the verifier decodes this many tokens alone (0 = a round).
    decode_tokens: int = 0
    # Pipelined drafting: the token assumed at position base_len - 1 (the guessed bonus token of
    # the block before); the block is stale unless the verifier's last token is this. None = any.
    anchor_token: int | None = None

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, 0)
        _check_int("base_len", self.base_len, 1)
        tokens = tuple(self.tokens)
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"tokens must hold only ints >= 0, got {t!r}")
        object.__setattr__(self, "tokens", tokens)
        _check_int("decode_tokens", self.decode_tokens, 0)
        if self.decode_tokens and tokens:
            raise ValueError(
                f"decode_tokens must be 0 for a block with draft tokens (k = {len(tokens)}), "
                f"got {self.decode_tokens}"
            )
        if self.anchor_token is not None:
            _check_int("anchor_token", self.anchor_token, 0)

    @property
    def identity(self) -> tuple:
        """What defines the block (a resend must match it); q is excluded (a re-decoded copy)."""
        return (self.base_len, self.tokens, self.decode_tokens, self.anchor_token)


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer to one `DraftBlock` (cloud -> edge)."""

    seq: int  # seq of the block this answers
    accepted: int  # draft tokens accepted, 0..k
    token: int  # recovered token (accepted < k) or bonus token (accepted == k)
    is_bonus: bool
    committed_len: int  # verifier's committed length after this verdict: base_len + accepted + 1
    verify_ms: float  # verifier compute time for the block (prepare + forward + rejection)

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, 0)
        _check_int("accepted", self.accepted, 0)
        _check_int("token", self.token, 0)
        _check_int("committed_len", self.committed_len, 1)
        if not isinstance(self.is_bonus, bool):
            raise ValueError(f"is_bonus must be a bool, got {self.is_bonus!r}")
        if not (isinstance(self.verify_ms, (int, float)) and math.isfinite(self.verify_ms)) or (
            self.verify_ms < 0
        ):
            raise ValueError(f"verify_ms must be a finite number >= 0, got {self.verify_ms!r}")


def derive_seed(seed: int | None, role: str) -> int | None:
    """A per-role seed from the session seed, so the draft and target streams are independent.

    None stays None (nondeterministic). Result is in [0, 2**63).
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("prompt_ids must hold at least 1 token, got 0")
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_ids must be ints in [0, {vocab_size}), got {t!r}")
    return prompt


def _truncates(params: SamplingParams) -> bool:
    """True when params restrict sampling to a subset of the vocabulary (sparse q is smaller)."""
    return params.top_k > 0 or params.top_p < 1.0


class Drafter:
    """Edge half of a session: the committed token history plus the draft model and its cache.

    One round: `block = propose(k)`, send it, then `apply(verdict)`. `apply` enforces the
    stopping rules so that `generated` equals what the target alone would produce: it stops after
    a stop token (kept in the output) or after `params.max_new_tokens` tokens, dropping any
    committed overshoot.

    Cloud-only decoding: `block = propose_decode(n)`, then `apply` each of its (up to n) verdicts;
    the block stays `pending` until its last token is committed. Pipelined drafting: with a block
    pending, `propose_ahead(k)` drafts the next one on the guess that the pending one is accepted
    whole (see the module docstring); `apply` of the pending block's verdict then either makes it
    the pending block (`last_ahead_hit` True) or drops it (`dropped_ahead`). At most one block
    ahead (pipeline depth 1).

    `draft_params` (default: `params`) is how the draft chooses its tokens. Any choice is exact
    because the block carries the distribution q each token was drawn from; a truncated one
    (top_k / top_p) makes q sparse and cheap to send. Stopping rules always come from `params`.

    Seqs are allocated when a block is proposed (0, 1, 2, ...): a dropped block's seq is never
    reused. The drafter takes over `runner`: its cache is reset and then holds this session's
    prefix.
    """

    def __init__(
        self,
        runner: ModelRunner,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        draft_params: SamplingParams | None = None,
    ) -> None:
        self.runner = runner
        self.params = params
        self.draft_params = draft_params if draft_params is not None else params
        self.committed: list[int] = check_prompt_ids(prompt_ids, runner.vocab_size)
        self.generated: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self._stop = frozenset(params.stop_token_ids)
        self._next_seq = 0
        self._pending: DraftBlock | None = None
        self._ahead: DraftBlock | None = None
        self._decoded = 0  # tokens committed so far by the pending decode block
        # Outcome of the last `apply` for the block drafted ahead: True = it became the pending
        # block, False = dropped (also in `dropped_ahead`), None = there was none.
        self.last_ahead_hit: bool | None = None
        self.dropped_ahead: DraftBlock | None = None
        self._generator = make_generator(derive_seed(params.seed, "draft"), runner.device)
        runner.reset()
        if len(self.committed) > 1:
            runner.prefill(self.committed[:-1])

    @property
    def tokens_left(self) -> int:
        """Tokens still allowed by max_new_tokens."""
        return self.params.max_new_tokens - len(self.generated)

    @property
    def pending(self) -> DraftBlock | None:
        """The block awaiting its verdict (None between rounds)."""
        return self._pending

    @property
    def ahead(self) -> DraftBlock | None:
        """The block drafted ahead of the pending one, if any."""
        return self._ahead

    @property
    def next_seq(self) -> int:
        """Seq the next proposed block gets."""
        return self._next_seq

    def _new_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _check_can_propose(self) -> None:
        if self.finished:
            raise RuntimeError(f"session finished ({self.finish_reason}); nothing to propose")
        if self._pending is not None:
            raise RuntimeError(f"block seq={self._pending.seq} awaits its verdict; apply it first")

    def propose(self, k: int) -> DraftBlock:
        """Draft up to `k` tokens extending `committed` (k >= 0); returns the block to verify.

        Drafts min(k, tokens_left - 1) tokens: the verdict always adds one token of the target's
        own, so drafting more could never be used. Drafting also ends early after a stop token.
        Runs one draft forward per draft token; the token ids come to the host once per block
        (greedy drafting syncs only then; sampling adds whatever logits_to_probs/sample sync).
        """
        _check_int("k", k, 0)
        self._check_can_propose()
        n = min(k, self.tokens_left - 1)
        tokens: list[int] = []
        q_rows: Tensor | None = None
        if n > 0:
            # Feed what the cache lacks of the committed tokens (1 token, or 2 after a full accept).
            logits = self.runner.extend(self.committed[self.runner.length :])[-1]  # (V,)
            tokens, q_rows = self._draft(logits, n)
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=len(self.committed),
            tokens=tuple(tokens),
            draft_probs=self._draft_probs(q_rows),
        )
        self._pending = block
        return block

    def propose_decode(self, n: int) -> DraftBlock:
        """A cloud-only block: the verifier decodes `n` tokens alone (1 <= n <= tokens_left) and
        answers with one verdict per token. No draft work."""
        self._check_can_propose()
        _check_int("n", n, 1)
        if n > self.tokens_left:
            raise ValueError(f"n must be <= tokens_left={self.tokens_left}, got {n}")
        block = DraftBlock(
            seq=self._new_seq(), base_len=len(self.committed), tokens=(), decode_tokens=n
        )
        self._pending = block
        self._decoded = 0
        return block

    def shadow_matches(self) -> list[bool]:
        """Greedy drafting only: what the draft would have proposed for the tokens committed
        since its cache was last fed, without a round trip (cloud-only streaming uses this to keep
        the acceptance estimate current).

        Feeds the committed tokens the draft cache lacks, all but the last (the cache stays a
        prefix of `committed`, as `propose` expects), and returns, for each token those forwards
        predict, whether the draft's argmax equals the committed token. Under greedy decoding
        that is exactly the accept/reject outcome a draft token at that position would have had
        (a draft token is accepted iff it equals the target's argmax, i.e. the committed token),
        so runs of True are the accepted runs of speculative rounds on this text. Returns [] when
        drafting samples, a block with draft tokens is pending or drafted ahead (the cache then
        holds drafts), or nothing is new. Outputs are unaffected: the cache only gains tokens
        `propose` would feed anyway.
        """
        if not self.draft_params.is_greedy or self.finished:
            return []
        for block in (self._pending, self._ahead):
            if block is not None and block.tokens:
                return []
        start = self.runner.length
        feed = self.committed[start:-1]
        if not feed:
            return []
        predicted = self.runner.extend(feed).argmax(-1).tolist()  # row i predicts start + i + 1
        return [p == t for p, t in zip(predicted, self.committed[start + 1 :], strict=True)]

    def ahead_room(self) -> int:
        """Draft tokens a block drafted ahead of the pending one could hold now; -1 when none can
        be drafted (no speculative block pending, one already ahead, or the pending block, if
        accepted whole, ends the session). 0 means a block of the guessed bonus token alone."""
        block = self._pending
        if block is None or block.decode_tokens or self._ahead is not None or self.finished:
            return -1
        if block.tokens and block.tokens[-1] in self._stop:
            return -1
        # If the pending block is accepted whole, it commits k + 1 tokens (the last is the guess).
        left_after = self.tokens_left - len(block.tokens) - 1
        return left_after - 1 if left_after >= 1 else -1

    def propose_ahead(self, k: int) -> DraftBlock | None:
        """Pipelined drafting: guess the pending block's bonus token g (the draft's argmax after
        the whole block) and draft up to `k` tokens after it; returns that block (seq = the next
        seq, base_len = pending base_len + k_pending + 1, anchor_token = g), or None when no
        block can go ahead (see `ahead_room`, or g is a stop token: the session would end).

        Costs one draft forward for g plus one per draft token. g is an argmax even when sampling:
        it is only a guess (it decides whether the block is used, never what is committed), and
        the most likely token is the best guess of the bonus token.
        """
        _check_int("k", k, 0)
        room = self.ahead_room()
        if room < 0:
            return None
        pending = self._pending
        assert pending is not None
        runner = self.runner
        context = self.committed + list(pending.tokens)  # the prefix if pending is accepted whole
        # The guess needs the logits after the context's last token: feed at least that one (after
        # `drop_ahead` the cache may hold the whole context already).
        fed = min(runner.length, len(context) - 1)
        if fed < runner.length:
            runner.rollback(fed)
        logits = runner.extend(context[fed:])[-1]  # (V,) predicts the bonus token
        guess = int(logits.argmax())
        if guess in self._stop:
            return None
        n = min(k, room)
        tokens: list[int] = []
        q_rows: Tensor | None = None
        if n > 0:
            logits = runner.extend([guess])[-1]  # (V,)
            tokens, q_rows = self._draft(logits, n)
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=len(context) + 1,
            tokens=tuple(tokens),
            draft_probs=self._draft_probs(q_rows),
            anchor_token=guess,
        )
        self._ahead = block
        return block

    def decode_ahead_room(self) -> int:
        """Tokens a decode block requested ahead of the pending decode block could ask for now
        (0: none can be; the pending one is not a decode block, or it ends the session)."""
        block = self._pending
        if block is None or not block.decode_tokens or self._ahead is not None or self.finished:
            return 0
        return max(self.tokens_left - (block.decode_tokens - self._decoded), 0)

    def propose_decode_ahead(self, n: int) -> DraftBlock | None:
        """Cloud-only streaming without gaps: the decode block that follows the pending decode
        block (base_len = where the pending one ends), to be sent while the pending one streams,
        so the verifier goes on decoding without waiting a round trip. Asks for min(n,
        `decode_ahead_room()`) tokens; None when that is 0. Used (`apply` makes it pending) once
        the pending block has streamed all its tokens, dropped if the session ends first."""
        _check_int("n", n, 1)
        room = self.decode_ahead_room()
        if room < 1:
            return None
        pending = self._pending
        assert pending is not None
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=pending.base_len + pending.decode_tokens,
            tokens=(),
            decode_tokens=min(n, room),
        )
        self._ahead = block
        return block

    def drop_ahead(self) -> DraftBlock | None:
        """Forget the block drafted ahead (e.g. before resending the pending one on a new
        session); returns it. The draft cache is rolled back to committed + pending drafts."""
        ahead, self._ahead = self._ahead, None
        pending = self._pending
        if ahead is not None and pending is not None:
            keep = pending.base_len + len(pending.tokens)
            self.runner.rollback(min(self.runner.length, keep))
        return ahead

    def abandon_decode(self) -> DraftBlock | None:
        """Give up on a pending decode block (and a decode block requested ahead of it) after a
        broken stream; the tokens already applied stay committed. Returns the pending block. A
        pending speculative block is kept (it is resent)."""
        block = self._pending
        if block is None or not block.decode_tokens:
            return None
        self._pending = None
        self._ahead = None
        return block

    def _draft_probs(self, q_rows: Tensor | None) -> DraftProbs | None:
        if q_rows is None:
            return None
        if _truncates(self.draft_params):
            return DraftProbs.from_probs_sparse(q_rows)
        return DraftProbs.dense(q_rows)

    def _draft(self, logits: Tensor, n: int) -> tuple[list[int], Tensor | None]:
        """Sample n draft tokens, the first from `logits` (V,) (which predict the position after
        the cache); returns them and q (n', V) (None when drafting greedily). Every drafted token
        but the last is fed to the cache."""
        runner, dparams = self.runner, self.draft_params
        greedy = dparams.is_greedy
        picked: list[Tensor] = []  # 0-dim long tensors, kept on device until the end
        q: list[Tensor] = []  # (V,) each
        for i in range(n):
            if greedy:
                tok = logits.argmax(-1)
            else:
                probs = logits_to_probs(logits, dparams)  # (V,)
                tok = sample(probs, self._generator)
                q.append(probs)
            picked.append(tok)
            if i < n - 1:
                logits = runner.extend(tok.view(1))[0]  # (V,)
        tokens = torch.stack(picked).tolist()  # the one sync of the block
        # Nothing after a stop token can be part of the output: cut the block there.
        for i, t in enumerate(tokens):
            if t in self._stop:
                tokens = tokens[: i + 1]
                break
        q_rows = torch.stack(q[: len(tokens)]) if q else None  # (n', V)
        return tokens, q_rows

    def apply(self, verdict: Verdict) -> list[int]:
        """Commit the verdict of the pending block; returns the newly committed tokens.

        Appends the accepted draft tokens and the verdict's token, stopping after a stop token or
        at max_new_tokens (overshoot is dropped), then rolls the draft cache back to the longest
        prefix that is still valid. A decode block's verdicts commit one token each. With a block
        drafted ahead, a hit makes it the pending block (its drafts stay in the cache); a miss
        drops it.
        """
        block = self._pending
        if block is None:
            raise RuntimeError("no block awaits a verdict")
        if verdict.seq != block.seq:
            raise ValueError(f"verdict seq must be {block.seq}, got {verdict.seq}")
        if verdict.accepted > len(block.tokens):
            raise ValueError(
                f"verdict accepted must be in [0, {len(block.tokens)}], got {verdict.accepted}"
            )
        base = len(self.committed)  # == block.base_len, except within a decode stream
        expected_len = base + verdict.accepted + 1
        if verdict.committed_len != expected_len:
            raise ValueError(
                f"verdict committed_len must be {expected_len}, got {verdict.committed_len}"
            )
        self.last_ahead_hit = None
        self.dropped_ahead = None
        out = self._commit([*block.tokens[: verdict.accepted], verdict.token])
        if block.decode_tokens:
            # Nothing was drafted: the cache still holds a prefix of the committed tokens.
            self._decoded += 1
            if self.finished or self._decoded >= block.decode_tokens:
                ahead, self._ahead = self._ahead, None
                hit = ahead is not None and not self.finished
                if ahead is not None:
                    self.last_ahead_hit = hit
                self._pending = ahead if hit else None
                self.dropped_ahead = None if hit else ahead
                self._decoded = 0
            return out
        ahead, self._ahead = self._ahead, None
        hit = (
            ahead is not None
            and not self.finished
            and verdict.accepted == len(block.tokens)
            and verdict.token == ahead.anchor_token
        )
        if ahead is not None:
            self.last_ahead_hit = hit
        if hit:
            # The cache holds committed + the ahead block's drafts: still a valid prefix.
            self._pending = ahead
            return out
        self._pending = None
        self.dropped_ahead = ahead
        # Draft cache holds committed + draft tokens fed so far; keep only the accepted part.
        self.runner.rollback(min(self.runner.length, base + verdict.accepted))
        return out

    def _commit(self, new: list[int]) -> list[int]:
        out: list[int] = []
        for t in new:
            out.append(t)
            if t in self._stop:
                self._finish(FINISH_STOP)
                break
            if len(self.generated) + len(out) >= self.params.max_new_tokens:
                self._finish(FINISH_LENGTH)
                break
        self.committed.extend(out)
        self.generated.extend(out)
        return out

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason


@dataclass(frozen=True)
class PendingVerify:
    """A validated block ready for the target forward (the 'prepare' step's output)."""

    block: DraftBlock
    feed: list[int]  # tokens to append to the target cache: missing committed + draft tokens
    start_len: int  # target cache length before the forward
    started: float  # perf_counter at prepare, for verify_ms


class Verifier:
    """Cloud half of ONE session: the target runner's cache, committed length and last verdict.

    `verify(block)` = `prepare(block)` -> `runner.extend(pending.feed)` -> `complete(pending,
    logits)`; the steps are separate so a batcher can run one forward for many sessions.
    The verifier's random draws use their own generator, seeded from `params.seed`. It takes
    over `runner` (cache reset). Stopping rules are the drafter's business: the verifier commits
    whatever it verifies, so its history may run past the drafter's truncated output.
    """

    def __init__(
        self, runner: ModelRunner, prompt_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self.runner = runner
        self.params = params
        self._tokens: list[int] = check_prompt_ids(prompt_ids, runner.vocab_size)
        self._generator = make_generator(derive_seed(params.seed, "target"), runner.device)
        self._last_block: DraftBlock | None = None
        self.last_verdict: Verdict | None = None
        runner.reset()
        if len(self._tokens) > 1:
            runner.prefill(self._tokens[:-1])

    @property
    def committed_len(self) -> int:
        """Prompt + generated tokens the verifier has committed."""
        return len(self._tokens)

    @property
    def committed(self) -> list[int]:
        """A copy of the committed tokens."""
        return list(self._tokens)

    def verify(self, block: DraftBlock) -> Verdict:
        """Verify one block and commit its outcome; returns the verdict.

        A resent block (same seq as the last one, same content) returns the cached verdict and
        changes nothing. Raises `StaleBlockError` for a block drafted on another prefix
        (`base_len != committed_len`) or older than the last one; `ValueError` for a malformed one.
        """
        pending = self.prepare(block)
        if pending is None:
            assert self.last_verdict is not None
            return self.last_verdict
        logits = self.runner.extend(pending.feed)  # (len(feed), V)
        return self.complete(pending, logits)

    def prepare(self, block: DraftBlock) -> PendingVerify | None:
        """Check the block against the session state; None means 'resend: reuse last_verdict'."""
        last = self._last_block
        if last is not None and block.seq <= last.seq:
            if block.seq == last.seq:
                # Compare what defines the block; q may be a re-decoded copy (tensors).
                if block.identity != last.identity:
                    raise ValueError(f"seq {block.seq} was already used by a different block")
                return None
            raise StaleBlockError(block.seq, block.base_len, self.committed_len, last.seq)
        anchored = block.anchor_token is None or block.anchor_token == self._tokens[-1]
        if block.base_len != self.committed_len or not anchored:
            # A pipelined block drafted on a guess that did not come true lands here too.
            raise StaleBlockError(
                block.seq, block.base_len, self.committed_len, last.seq if last else None
            )
        k = len(block.tokens)
        vocab = self.runner.vocab_size
        for t in block.tokens:
            if t >= vocab:
                raise ValueError(f"tokens must be ints in [0, {vocab}), got {t}")
        if block.draft_probs is not None:
            block.draft_probs.validate(k, vocab)
        start = self.runner.length
        feed = self._tokens[start:] + list(block.tokens)
        return PendingVerify(block=block, feed=feed, start_len=start, started=time.perf_counter())

    def continue_decode(self) -> PendingVerify:
        """The next step of the last block, a cloud-only decode block that `complete` has applied
        at least once: a one-position forward (k = 0) whose token is drawn from p alone. How many
        steps a block gets (decode_tokens, fewer after a stop token or at max_new_tokens) is the
        caller's business; every step's verdict carries the block's seq."""
        block = self._last_block
        if block is None or not block.decode_tokens:
            raise RuntimeError("the last block is not a decode block; nothing to continue")
        start = self.runner.length
        return PendingVerify(
            block=block, feed=self._tokens[start:], start_len=start, started=time.perf_counter()
        )

    def complete(self, pending: PendingVerify, logits: Tensor) -> Verdict:
        """Run acceptance on the target logits of the block and commit the outcome.

        `logits` (len(feed), V) from the forward over `pending.feed`; its last k+1 rows score the
        k draft tokens and the position after them.
        """
        block = pending.block
        k = len(block.tokens)
        rows = logits[-(k + 1) :]  # (k+1, V)
        result = self._accept(block, rows)
        # Cache now holds committed + all k draft tokens; keep committed + accepted ones, so the
        # new last committed token (result.token) is the one fed first next round. (The committed
        # length is block.base_len, except within a decode stream, where it grows every step.)
        self.runner.rollback(len(self._tokens) + result.accepted)
        self._tokens.extend(block.tokens[: result.accepted])
        self._tokens.append(result.token)
        verdict = Verdict(
            seq=block.seq,
            accepted=result.accepted,
            token=result.token,
            is_bonus=result.is_bonus,
            committed_len=len(self._tokens),
            verify_ms=(time.perf_counter() - pending.started) * 1e3,
        )
        self._last_block = block
        self.last_verdict = verdict
        return verdict

    def _accept(self, block: DraftBlock, rows: Tensor) -> Verification:
        k = len(block.tokens)
        if self.params.is_greedy:
            # Greedy target: p is one-hot at the argmax, so a draft token is accepted iff it is the
            # argmax and the recovered/bonus token is the argmax, whatever q was. Same result as
            # rejection.verify on one-hot rows, without building (k+1, V) probabilities.
            target = rows.argmax(-1).tolist()  # (k+1,)
            accepted = 0
            while accepted < k and block.tokens[accepted] == target[accepted]:
                accepted += 1
            return Verification(accepted=accepted, token=target[accepted], is_bonus=accepted == k)
        target_probs = logits_to_probs(rows, self.params)  # (k+1, V)
        draft_tokens = torch.tensor(block.tokens, dtype=torch.long, device=rows.device)  # (k,)
        return verify(draft_tokens, target_probs, block.draft_probs, self._generator)
