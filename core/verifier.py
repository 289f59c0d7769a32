"""The cloud half of a speculative-decoding session: the target model's cache for one session.

`Verifier` scores a `DraftBlock` in one target forward and answers with a `Verdict` (the accepted
draft tokens plus one token of its own); the protocol and why it is exact are in
`edgespec.core.session`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.coupling import coupled_tokens
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import Verification, verify
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator
from edgespec.core.session import (
    DraftBlock,
    StaleBlockError,
    Verdict,
    check_prompt_ids,
    derive_seed,
)
from edgespec.core.tree import ROOT, DraftTree, rejection_walk, target_pick, walk_tree


@dataclass(frozen=True)
class PendingVerify:
    """A validated block ready for the target forward (the 'prepare' step's output)."""

    block: DraftBlock
    feed: list[int]  # tokens to append to the target cache: missing committed + draft tokens
    start_len: int  # target cache length before the forward
    started: float  # perf_counter at prepare, for verify_ms
    # A tree block: the parent of every fed token (`edgespec.core.tree.DraftTree` convention,
    # the missing committed tokens a chain before the tree's nodes); None for a chain.
    parents: list[int] | None = None
    # The block as sent, when `block` is one of its alternatives (`DraftBlock.resolve`), and
    # which: a resend is compared with the whole message.
    sent: DraftBlock | None = None
    alternative: int = 0


class Verifier:
    """Cloud half of ONE session: the target runner's cache, committed length and last verdict.

    `verify(block)` = `prepare(block)` -> `runner.extend(pending.feed)` -> `complete(pending,
    logits)`; the steps are separate so a batcher can run one forward for many sessions.
    Coupled sampling (`params.is_coupled`): the target's token at each position is its coupled
    token (`edgespec.core.coupling`, with `params.seed`; one is drawn when None) and a draft
    token is accepted iff it equals it, so the output is the target alone's with that seed;
    blocks must carry no q. Rejection sampling: the random draws use their own generator,
    seeded from `params.seed`. It takes over `runner` (cache reset). Stopping rules are the drafter's business: the verifier commits
    whatever it verifies, so its history may run past the drafter's truncated output.
    """

    def __init__(
        self,
        runner: ModelRunner,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prefill: bool = True,
    ) -> None:
        """`prefill=False` leaves the cache empty: the first block's feed then holds every
        committed token the cache lacks, or a batcher fills the cache first, in chunks."""
        self.runner = runner
        params = params.with_seed() if params.is_coupled else params
        self.params = params
        self._tokens: list[int] = check_prompt_ids(prompt_ids, runner.vocab_size)
        self._generator = make_generator(derive_seed(params.seed, "target"), runner.device)
        self._last_block: DraftBlock | None = None
        self.last_verdict: Verdict | None = None
        runner.reset()
        if prefill and len(self._tokens) > 1:
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
        return self.complete(pending, self.forward(pending))

    def forward(self, pending: PendingVerify) -> Tensor:
        """The target forward over `pending.feed` (tree attention for a tree block): logits
        (len(feed), V)."""
        if pending.parents is not None:
            return self.runner.extend_tree(pending.feed, pending.parents)
        return self.runner.extend(pending.feed)

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
        sent = block
        chosen = block.resolve(self._tokens)
        if chosen is None:
            # A pipelined block drafted on a guess that did not come true lands here too.
            raise StaleBlockError(
                block.seq, block.base_len, self.committed_len, last.seq if last else None
            )
        alternative, block = chosen
        k = len(block.tokens)
        vocab = self.runner.vocab_size
        for t in block.tokens:
            if t >= vocab:
                raise ValueError(f"tokens must be ints in [0, {vocab}), got {t}")
        if block.draft_probs is not None:
            if self.params.is_coupled:
                raise ValueError(
                    "draft_probs must be absent under coupled sampling (params.sampler "
                    "'coupled'): the verifier needs only the draft tokens"
                )
            block.draft_probs.validate(k, vocab)
        start = self.runner.length
        missing = self._tokens[start:]
        parents = None
        if block.parents is not None:
            if self.runner.rollback_mode != "crop":
                raise ValueError("parents: this target's cache cannot verify token trees")
            m = len(missing)
            parents = list(range(-1, m - 1)) + [p + m if p >= 0 else m - 1 for p in block.parents]
        return PendingVerify(
            block=block,
            feed=missing + list(block.tokens),
            start_len=start,
            started=time.perf_counter(),
            parents=parents,
            sent=sent,
            alternative=alternative,
        )

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
        path: tuple[int, ...] | None = None
        if block.parents is not None:
            result, path = self._walk_tree(pending, rows)
            accepted = [block.tokens[i] for i in path]
        else:
            result = self._accept(block, rows)
            # Cache now holds committed + all k draft tokens; keep committed + accepted ones, so
            # the new last committed token (result.token) is the one fed first next round. (The
            # committed length is block.base_len, except within a decode stream, where it grows
            # every step.)
            self.runner.rollback(len(self._tokens) + result.accepted)
            accepted = list(block.tokens[: result.accepted])
        self._tokens.extend(accepted)
        self._tokens.append(result.token)
        verdict = Verdict(
            seq=block.seq,
            accepted=result.accepted,
            token=result.token,
            is_bonus=result.is_bonus,
            committed_len=len(self._tokens),
            verify_ms=(time.perf_counter() - pending.started) * 1e3,
            path=path,
            alternative=pending.alternative,
        )
        self._last_block = pending.sent or block
        self.last_verdict = verdict
        return verdict

    def _walk_tree(
        self, pending: PendingVerify, rows: Tensor
    ) -> tuple[Verification, tuple[int, ...]]:
        """A tree block's outcome and accepted path: the exact walk over rows (n + 1, V) (row 0
        scores the root, row i + 1 the position after node i); the cache keeps the committed
        tokens and the accepted path only. `is_bonus`: the walk ran off the tree (a leaf was
        accepted), so the token is a bonus, not a correction."""
        block = pending.block
        assert block.parents is not None
        tree = DraftTree(block.tokens, block.parents)
        if self.params.is_greedy or self.params.is_coupled:
            walk = walk_tree(tree, target_pick(rows, self.params, len(self._tokens)))
        else:  # rejection sampling: the nodes' q came with the block
            vocab = rows.shape[-1]
            q = (
                block.draft_probs.to_dense(vocab).to(rows.device)
                if block.draft_probs is not None
                else torch.nn.functional.one_hot(
                    torch.tensor(block.tokens, device=rows.device, dtype=torch.long), vocab
                ).float()
            )
            walk = rejection_walk(tree, logits_to_probs(rows, self.params), q, self._generator)
        m = len(pending.feed) - len(tree)  # committed tokens fed before the tree
        self.runner.keep_nodes(pending.start_len, list(range(m)) + [m + i for i in walk.path])
        last = walk.path[-1] if walk.path else ROOT
        result = Verification(
            accepted=len(walk.path), token=walk.token, is_bonus=not tree.children(last)
        )
        return result, walk.path

    def _accept(self, block: DraftBlock, rows: Tensor) -> Verification:
        k = len(block.tokens)
        if self.params.is_greedy or self.params.is_coupled:
            # Greedy target: p is one-hot at the argmax, so a draft token is accepted iff it is the
            # argmax and the recovered/bonus token is the argmax, whatever q was. Same result as
            # rejection.verify on one-hot rows, without building (k+1, V) probabilities.
            # Coupled: the target's token at each position is fixed by its logits and the seed's
            # noise alone, so accepting while the draft agrees commits exactly those tokens.
            if self.params.is_greedy:
                target = rows.argmax(-1).tolist()  # (k+1,)
            else:
                assert self.params.seed is not None  # with_seed() above
                positions = range(len(self._tokens), len(self._tokens) + k + 1)
                target = coupled_tokens(rows, self.params, self.params.seed, positions).tolist()
            accepted = 0
            while accepted < k and block.tokens[accepted] == target[accepted]:
                accepted += 1
            return Verification(accepted=accepted, token=target[accepted], is_bonus=accepted == k)
        target_probs = logits_to_probs(rows, self.params)  # (k+1, V)
        draft_tokens = torch.tensor(block.tokens, dtype=torch.long, device=rows.device)  # (k,)
        return verify(draft_tokens, target_probs, block.draft_probs, self._generator)
