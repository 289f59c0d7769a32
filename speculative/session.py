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

from speculative.params import SamplingParams
from speculative.rejection import DraftProbs, Verification, verify
from speculative.runner import ModelRunner
from speculative.sampling import logits_to_probs, make_generator, sample

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

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, 0)
        _check_int("base_len", self.base_len, 1)
        tokens = tuple(self.tokens)
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"tokens must hold only ints >= 0, got {t!r}")
        object.__setattr__(self, "tokens", tokens)


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

    `draft_params` (default: `params`) is how the draft chooses its tokens. Any choice is exact
    because the block carries the distribution q each token was drawn from; a truncated one
    (top_k / top_p) makes q sparse and cheap to send. Stopping rules always come from `params`.

    The drafter takes over `runner`: its cache is reset and then holds this session's prefix.
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
        self._generator = make_generator(derive_seed(params.seed, "draft"), runner.device)
        runner.reset()
        if len(self.committed) > 1:
            runner.prefill(self.committed[:-1])

    @property
    def tokens_left(self) -> int:
        """Tokens still allowed by max_new_tokens."""
        return self.params.max_new_tokens - len(self.generated)

    def propose(self, k: int) -> DraftBlock:
        """Draft up to `k` tokens extending `committed` (k >= 0); returns the block to verify.

        Drafts min(k, tokens_left - 1) tokens: the verdict always adds one token of the target's
        own, so drafting more could never be used. Drafting also ends early after a stop token.
        Runs one draft forward per draft token; the token ids come to the host once per block
        (greedy drafting syncs only then; sampling adds whatever logits_to_probs/sample sync).
        """
        _check_int("k", k, 0)
        if self.finished:
            raise RuntimeError(f"session finished ({self.finish_reason}); nothing to propose")
        if self._pending is not None:
            raise RuntimeError(f"block seq={self._pending.seq} awaits its verdict; apply it first")
        n = min(k, self.tokens_left - 1)
        tokens: list[int] = []
        q_rows: Tensor | None = None
        if n > 0:
            tokens, q_rows = self._draft(n)
        draft_probs = None
        if q_rows is not None:
            if _truncates(self.draft_params):
                draft_probs = DraftProbs.from_probs_sparse(q_rows)
            else:
                draft_probs = DraftProbs.dense(q_rows)
        block = DraftBlock(
            seq=self._next_seq,
            base_len=len(self.committed),
            tokens=tuple(tokens),
            draft_probs=draft_probs,
        )
        self._pending = block
        return block

    def _draft(self, n: int) -> tuple[list[int], Tensor | None]:
        """Sample n draft tokens; returns them and q (n', V) (None when drafting greedily)."""
        runner, dparams = self.runner, self.draft_params
        greedy = dparams.is_greedy
        # Feed what the cache lacks of the committed tokens (1 token, or 2 after a full accept).
        logits = runner.extend(self.committed[runner.length :])[-1]  # (V,)
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
        prefix that is still valid.
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
        expected_len = block.base_len + verdict.accepted + 1
        if verdict.committed_len != expected_len:
            raise ValueError(
                f"verdict committed_len must be {expected_len}, got {verdict.committed_len}"
            )
        self._pending = None
        self._next_seq += 1
        # Draft cache holds committed + draft tokens fed so far; keep only the accepted part.
        self.runner.rollback(min(self.runner.length, block.base_len + verdict.accepted))
        new = [*block.tokens[: verdict.accepted], verdict.token]
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
                if (block.base_len, block.tokens) != (last.base_len, last.tokens):
                    raise ValueError(f"seq {block.seq} was already used by a different block")
                return None
            raise StaleBlockError(block.seq, block.base_len, self.committed_len, last.seq)
        if block.base_len != self.committed_len:
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
        # new last committed token (result.token) is the one fed first next round.
        self.runner.rollback(block.base_len + result.accepted)
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
