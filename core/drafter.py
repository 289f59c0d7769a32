"""The edge half of a speculative-decoding session: the committed tokens and the draft model.

`Drafter` proposes `DraftBlock`s (a round, a cloud-only decode request, or a block drafted ahead
of the pending one) and applies the `Verdict`s that come back; the protocol and why it is exact
are in `edgespec.core.session`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from edgespec.core.coupling import coupled_scores, coupled_tokens
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample
from edgespec.core.session import (
    FINISH_LENGTH,
    FINISH_STOP,
    DraftBlock,
    Verdict,
    check_prompt_ids,
    derive_seed,
)
from edgespec.core.tree import TreeShape
from edgespec.core.tree_draft import grow_tree
from edgespec.core.validation import check_int


@dataclass
class _TreeDraft:
    """What the drafter keeps of a tree block it proposed, until its verdict: per node its index
    among the fed nodes (`GrownTree.fed_of`), the path a block drafted ahead bets on
    (`GrownTree.guess`), and whether the cache was compacted to that path (`on_path`: it holds
    base + the whole guessed path, no other node, since a block was drafted ahead)."""

    fed_of: list[int | None]
    guess: tuple[int, ...]
    on_path: bool = False


@dataclass
class _Branch:
    """One guess of how a pending chain's verdict comes out, drafted ahead as a chain
    (`Drafter.propose_ahead` with branches). `shared`: the pending block's draft tokens it
    assumes accepted (its first `shared` fed nodes); `anchor`: the token it assumes the verdict
    adds (the draft's pick after the whole block for the main guess, else the draft's runner-up
    at the rejected position), fed as node `parent`'s child; then up to `want` draft tokens.
    `nodes`: its fed nodes after the shared ones (the anchor, then every draft token but the
    last); `position`: the sequence position the next token drafted on it takes."""

    base_len: int
    anchor: int
    shared: int
    parent: int
    want: int
    position: int
    tokens: list[int] = field(default_factory=list)
    runner_ups: list[int] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    stopped: bool = False

    def to_feed(self) -> int | None:
        """The token its next forward feeds (None: it needs no more)."""
        if not self.nodes:
            return self.anchor if self.want > 0 else None
        if len(self.tokens) < self.want and not self.stopped:
            return self.tokens[-1]
        return None


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
    whole (see `edgespec.core.session`); `apply` of the pending block's verdict then either makes it
    the pending block (`last_ahead_hit` True) or drops it (`dropped_ahead`). One block ahead per
    guess (pipeline depth 1): after a pending chain, `propose_ahead(k, branches=m)` also drafts
    `branches`, chains on the guesses that a position of the pending chain is rejected for the
    draft's runner-up there; `apply` makes the one whose guess came true pending and drops the
    rest (`dropped_blocks`). A pending tree is guessed to be accepted along its likeliest path
    (`GrownTree.guess`); the block ahead of any pending block is a chain or a tree.

    `draft_params` (default: `params`) is how the draft chooses its tokens; stopping rules always
    come from `params`. Coupled sampling (`params.is_coupled`): each draft token is the draft's
    coupled token at its position (`edgespec.core.coupling`, same seed as the verifier), blocks
    carry no q, and the output does not depend on the draft at all. Rejection sampling: any
    choice is exact because the block carries the distribution q each token was drawn from; a
    truncated one (top_k / top_p) makes q sparse and cheap to send. A coupled session without a
    seed draws one (`SamplingParams.with_seed`): exact, but only a verifier with the same seed
    accepts its drafts often.

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
        params = params.with_seed() if params.is_coupled else params
        self.params = params
        self.draft_params = draft_params if draft_params is not None else params
        self._coupled_seed = params.seed if params.is_coupled else None
        self.committed: list[int] = check_prompt_ids(prompt_ids, runner.vocab_size)
        self.generated: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self._stop = frozenset(params.stop_token_ids)
        self._next_seq = 0
        self._pending: DraftBlock | None = None
        self._ahead: DraftBlock | None = None
        self._decoded = 0  # tokens committed so far by the pending decode block
        # Per tree block proposed (pending or ahead) and not yet settled, by seq: which of its
        # nodes the draft cache holds, and its guessed path.
        self._trees: dict[int, _TreeDraft] = {}
        # Outcome of the last `apply` for the block drafted ahead: True = it became the pending
        # block, False = dropped (also in `dropped_ahead`), None = there was none.
        self.last_ahead_hit: bool | None = None
        self.dropped_ahead: DraftBlock | None = None
        # Every block drafted ahead that the last `apply` (or `drop_ahead`) dropped.
        self.dropped_blocks: list[DraftBlock] = []
        # The last `apply` of a chain that rejected a draft token: whether the verdict's token
        # was the draft's runner-up there (what a branch bets on); None otherwise.
        self.last_runner_up: bool | None = None
        # Per chain block proposed and not yet settled, by seq: the draft's runner-up at each of
        # its positions (what a branch drafted ahead bets the target's token is on a rejection).
        self._runner_ups: dict[int, list[int]] = {}
        # Blocks drafted ahead on other guesses than `_ahead`'s (`propose_ahead` with branches),
        # and per block drafted ahead then (`_ahead` too) the fed nodes of its path, after
        # `_branch_base`: what the draft cache keeps when it hits.
        self._branches: list[DraftBlock] = []
        self._branch_paths: dict[int, list[int]] = {}
        self._branch_base = 0
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
    def branches(self) -> list[DraftBlock]:
        """The blocks drafted ahead on other guesses than `ahead`'s (see `propose_ahead`),
        most committed tokens assumed first (the order they are sent in)."""
        return list(self._branches)

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
        check_int("k", k, 0)
        self._check_can_propose()
        n = min(k, self.tokens_left - 1)
        tokens: list[int] = []
        q_rows: Tensor | None = None
        runner_ups: list[int] = []
        if n > 0:
            # Feed what the cache lacks of the committed tokens (1 token, or 2 after a full accept).
            logits = self.runner.extend(self.committed[self.runner.length :])[-1]  # (V,)
            tokens, q_rows, runner_ups = self._draft(logits, n, len(self.committed))
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=len(self.committed),
            tokens=tuple(tokens),
            draft_probs=self._draft_probs(q_rows),
        )
        self._runner_ups[block.seq] = runner_ups
        self._pending = block
        return block

    def propose_tree(self, shape: TreeShape) -> DraftBlock:
        """Draft a token tree extending `committed` under the budget `shape` (see
        `edgespec.core.tree_draft.grow_tree`: best-first, one draft forward per level, tree
        attention); returns the block (tokens plus `parents`) to verify.

        Greedy drafting and coupled sampling send token ids only; rejection sampling draws each
        node's siblings independently from the draft's q and sends q per node (the verifier
        runs `edgespec.core.tree.rejection_walk`). The depth is cut to tokens_left - 1 as
        `propose` cuts k; a session with nothing to draft sends an empty tree. The draft cache
        keeps the tree's fed nodes until `apply` compacts it to the accepted path. Needs a
        croppable draft cache.
        """
        self._check_can_propose()
        block = self._tree_block(self.committed, shape, self.tokens_left - 1)
        self._pending = block
        return block

    def _tree_block(
        self, context: list[int], shape: TreeShape, room: int, anchor: tuple[int, ...] = ()
    ) -> DraftBlock:
        """Grow a tree of `shape`, its depth cut to `room`, after `context` (the cache holds a
        prefix of it) and make it a block (base_len = len(context), assuming the prefix ends with
        `anchor`); remembers its fed nodes."""
        depth = min(shape.depth, room)
        tokens: tuple[int, ...] = ()
        parents: tuple[int, ...] = ()
        q: Tensor | None = None
        grown = None
        if depth > 0:
            params = self.params if self._coupled_seed is not None else self.draft_params
            grown = grow_tree(
                self.runner, context, params, replace(shape, depth=depth), self._generator
            )
            tokens, parents, q = grown.tree.tokens, grown.tree.parents, grown.q
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=len(context),
            tokens=tokens,
            draft_probs=self._draft_probs(q),
            parents=parents,
            anchor_token=anchor[-1] if anchor else None,
            anchor_prefix=anchor[:-1],
        )
        if grown is not None:
            self._trees[block.seq] = _TreeDraft(grown.fed_of, grown.guess)
        return block

    def propose_decode(self, n: int) -> DraftBlock:
        """A cloud-only block: the verifier decodes `n` tokens alone (1 <= n <= tokens_left) and
        answers with one verdict per token. No draft work."""
        self._check_can_propose()
        check_int("n", n, 1)
        if n > self.tokens_left:
            raise ValueError(f"n must be <= tokens_left={self.tokens_left}, got {n}")
        block = DraftBlock(
            seq=self._new_seq(), base_len=len(self.committed), tokens=(), decode_tokens=n
        )
        self._pending = block
        self._decoded = 0
        return block

    def shadow_matches(self) -> list[bool]:
        """Greedy drafting or coupled sampling only: what the draft would have proposed for the tokens committed
        since its cache was last fed, without a round trip (cloud-only streaming uses this to keep
        the acceptance estimate current).

        Feeds the committed tokens the draft cache lacks, all but the last (the cache stays a
        prefix of `committed`, as `propose` expects), and returns, for each token those forwards
        predict, whether the draft's argmax equals the committed token. Under greedy decoding
        that is exactly the accept/reject outcome a draft token at that position would have had
        (a draft token is accepted iff it equals the target's argmax, i.e. the committed token),
        so runs of True are the accepted runs of speculative rounds on this text; under coupled
        sampling likewise with the coupled tokens. Returns [] when drafting samples for rejection
        sampling, a block with draft tokens is pending or drafted ahead (the cache then
        holds drafts), or nothing is new. Outputs are unaffected: the cache only gains tokens
        `propose` would feed anyway.
        """
        if self.finished or not (self.draft_params.is_greedy or self._coupled_seed is not None):
            return []
        for block in (self._pending, self._ahead):
            if block is not None and block.tokens:
                return []
        start = self.runner.length
        feed = self.committed[start:-1]
        if not feed:
            return []
        # row i predicts position start + i + 1
        predicted = self._pick(self.runner.extend(feed), start + 1).tolist()
        return [p == t for p, t in zip(predicted, self.committed[start + 1 :], strict=True)]

    def ahead_room(self) -> int:
        """Levels of draft tokens a block drafted ahead of the pending one could hold now (a
        chain's k, a tree's depth); -1 when none can be drafted (no speculative block pending,
        one already ahead, or the pending block, if accepted as guessed, ends the session). 0
        means a block of the guessed bonus token alone."""
        block = self._pending
        if block is None or block.decode_tokens or self._ahead is not None or self.finished:
            return -1
        guessed = self._guessed_tokens(block)
        if any(t in self._stop for t in guessed):
            return -1
        # If the guess holds, the pending block commits its guessed tokens + 1 (the bonus).
        left_after = self.tokens_left - len(guessed) - 1
        return left_after - 1 if left_after >= 1 else -1

    def _guessed_tokens(self, block: DraftBlock) -> list[int]:
        """The draft tokens of `block` that a block drafted ahead assumes accepted: a chain's
        all, a tree's guessed path."""
        if block.parents is None:
            return list(block.tokens)
        tree = self._trees.get(block.seq)
        return [block.tokens[i] for i in tree.guess] if tree is not None else []

    def propose_ahead(
        self, k: int, tree: TreeShape | None = None, branches: int = 0
    ) -> DraftBlock | None:
        """Pipelined drafting: guess how the pending block is accepted (a chain: whole; a tree:
        along its guessed path, `GrownTree.guess`) and its bonus token g (the draft's argmax
        after it), and draft after g up to `k` tokens, or a tree of shape `tree` (its depth cut
        to the room); returns that block (seq = the next seq, base_len = pending base_len +
        guessed tokens + 1, anchor_token = g, after a tree anchor_prefix = its guessed path's
        tokens), or None when no block can go ahead (see `ahead_room`, or g is a stop token: the
        session would end).

        Costs one draft forward for g plus a chain's one per draft token or a tree's one per
        level. A pending tree's fed nodes leave the draft cache first: it keeps the committed
        tokens and the guessed path. g is only a guess (it decides whether the block is used,
        never what is committed): under coupled sampling the draft's own coupled token (the
        best guess of the target's coupled token), else the argmax (the most likely token, the
        best guess of a sampled bonus token).

        `branches` > 0, after a pending chain (and `tree` None, a croppable draft cache): up to
        that many more chains are drafted ahead on the guesses that the verdict rejects the
        pending block's p-th draft token (p = 1, 2, ...; p = k + 1: the bonus) and adds the
        draft's runner-up there, each as a block (base_len = pending base_len + p, anchor = the
        runner-up), in `branches`, most committed tokens assumed first: at most one of these
        guesses and the main one comes true, and the verifier applies only the block whose
        premise holds (the others are STALE). A draft whose runner-up is often the target's
        token (measured: 77% of the demo pair's rejections) so turns most misses into hits.
        All the guesses are drafted together as one tree (`_propose_branches`): the same
        number of draft forwards as the main guess alone, each feeding one token per guess.
        """
        check_int("k", k, 0)
        check_int("branches", branches, 0)
        room = self.ahead_room()
        if room < 0:
            return None
        pending = self._pending
        assert pending is not None
        if branches and tree is None and self._can_branch(pending):
            return self._propose_branches(k, branches, room)
        runner = self.runner
        # the prefix if the pending block is accepted as guessed
        guessed = self._guessed_tokens(pending)
        context = self.committed + guessed
        self._onto_guess(pending)
        # The guess needs the logits after the context's last token: feed at least that one (after
        # `drop_ahead` the cache may hold the whole context already).
        fed = min(runner.length, len(context) - 1)
        if fed < runner.length:
            runner.rollback(fed)
        logits = runner.extend(context[fed:])[-1]  # (V,) predicts the bonus token
        if self._coupled_seed is not None:
            guess = int(self._pick(logits[None], len(context))[0])
        else:
            guess = int(logits.argmax())
        if guess in self._stop:
            return None
        # After a tree, the verifier must check the guessed path too: another path of its depth
        # may end in the same token.
        anchor = (*(guessed if pending.parents is not None else ()), guess)
        if tree is not None:
            self._ahead = self._tree_block([*context, guess], tree, room, anchor)
            return self._ahead
        n = min(k, room)
        tokens: list[int] = []
        q_rows: Tensor | None = None
        runner_ups: list[int] = []
        if n > 0:
            logits = runner.extend([guess])[-1]  # (V,)
            tokens, q_rows, runner_ups = self._draft(logits, n, len(context) + 1)
        block = DraftBlock(
            seq=self._new_seq(),
            base_len=len(context) + 1,
            tokens=tuple(tokens),
            draft_probs=self._draft_probs(q_rows),
            anchor_token=guess,
            anchor_prefix=anchor[:-1],
        )
        self._runner_ups[block.seq] = runner_ups
        self._ahead = block
        return block

    def _can_branch(self, pending: DraftBlock) -> bool:
        """Branches can be drafted after `pending`: a chain with draft tokens whose runner-ups
        are known, on a draft cache that can keep a tree path (and holds a token)."""
        ups = self._runner_ups.get(pending.seq)
        return (
            pending.parents is None
            and bool(pending.tokens)
            and ups is not None
            and len(ups) == len(pending.tokens)
            and self.runner.batchable
            and self.runner.length >= 1
        )

    def _propose_branches(self, k: int, count: int, room: int) -> DraftBlock | None:
        """`propose_ahead` with `count` branches (see there): the main guess and the branches
        drafted as one tree after the tokens the cache holds (the committed tokens it lacks and
        the pending chain's tokens fed again as its first nodes, the guesses' chains hanging off
        them), one draft forward per level. The host reads each level's picks (one sync per
        level, as a tree's growth does)."""
        pending = self._pending
        assert pending is not None
        runner, stop = self.runner, self._stop
        base, drafts = pending.base_len, list(pending.tokens)
        n, ups = len(drafts), self._runner_ups[pending.seq]
        start = min(runner.length, base)
        runner.rollback(start)
        chain = self.committed[start:base] + drafts  # node i: the token at position start + i
        m = len(chain)
        parents = list(range(-1, m - 1))
        feed = list(chain)
        fed: list[_Branch] = []
        for p in range(1, min(count, n) + 1):  # the target's token at position p is the runner-up
            left = self.tokens_left - p - 1  # draft tokens the session has room for after it
            if ups[p - 1] in stop or left < 1:
                continue
            shared = base - start + p - 1
            branch = _Branch(base + p, ups[p - 1], shared, shared - 1, min(k, left), base + p)
            branch.nodes.append(len(parents))
            parents.append(branch.parent)
            feed.append(branch.anchor)
            fed.append(branch)
        rows = runner.extend_tree(feed, parents, tree_start=start, guesses=True)
        # the main guess: the draft's own pick after the block, never a draw (as the single
        # guess's)
        guess, guess_up, _ = self._picks(rows[m - 1 : m], [base + n], draw=False)[0]
        if guess in stop:
            runner.rollback(start)  # the main guess ends the session: nothing goes ahead
            return None
        picks = self._picks(rows[m:], [b.position for b in fed])
        for branch, pick in zip(fed, picks, strict=True):
            self._take(branch, *pick)
        guesses = [_Branch(base + n + 1, guess, m, m - 1, min(k, room), base + n + 1)]
        if count > n and guess_up not in stop:  # the bonus's runner-up
            guesses.append(_Branch(base + n + 1, guess_up, m, m - 1, min(k, room), base + n + 1))
        guesses.extend(sorted(fed, key=lambda b: -b.base_len))
        while feeding := [b for b in guesses if b.to_feed() is not None]:
            tokens: list[int] = []
            for b in feeding:
                token = b.to_feed()
                assert token is not None
                tokens.append(token)
                parents.append(b.nodes[-1] if b.nodes else b.parent)
                b.nodes.append(len(parents) - 1)
            rows = runner.extend_tree(tokens, parents, tree_start=start, guesses=True)
            picks = self._picks(rows, [b.position for b in feeding])
            for b, pick in zip(feeding, picks, strict=True):
                self._take(b, *pick)
        blocks = []
        for b in guesses:
            q = torch.stack(b.q) if b.q else None
            block = DraftBlock(
                seq=self._new_seq(),
                base_len=b.base_len,
                tokens=tuple(b.tokens),
                draft_probs=self._draft_probs(q),
                anchor_token=b.anchor,
            )
            self._runner_ups[block.seq] = b.runner_ups
            self._branch_paths[block.seq] = list(range(b.shared)) + b.nodes
            blocks.append(block)
        self._branch_base = start
        self._ahead, self._branches = blocks[0], blocks[1:]
        return blocks[0]

    def _picks(
        self, rows: Tensor, positions: Sequence[int], draw: bool = True
    ) -> list[tuple[int, int, Tensor | None]]:
        """Per row of `rows` (m, V) predicting `positions` (m of them): the draft's token there
        (its pick; a draw from q when drafting for rejection sampling and `draw`), its
        runner-up, and q (None unless drawn)."""
        if not positions:
            return []
        if self.draft_params.is_greedy or (self._coupled_seed is None and not draw):
            # each row's pick is its argmax and its runner-up the next best logit (`_choose`'s
            # rule), from one top-2 of the whole level and its one sync, instead of an argmax,
            # a top-2 and a select per row (a fifth of a pipelined edge's busy time on a 2-core
            # host; 2.6x less for a level of 5 rows of the demo draft's vocabulary)
            top = torch.topk(rows, 2, dim=-1)
            tied = (top.values[:, 0] == top.values[:, 1]).long()[:, None]
            picks: list[tuple[int, int, Tensor | None]] = []
            for i, (first, second, tie) in enumerate(torch.cat((top.indices, tied), 1).tolist()):
                token = first
                if tie:  # argmax takes the first of equal maxima, which topk need not
                    token = int(rows[i].argmax())
                picks.append((token, second if first == token else first, None))
            return picks
        chosen: list[Tensor] = []
        q: list[Tensor | None] = []
        for row, position in zip(rows, positions, strict=True):
            token, runner_up, qi = self._choose(row, position, draw)
            chosen += [token, runner_up]
            q.append(qi)
        flat = torch.stack(chosen).tolist()  # the one sync of the level
        return [(flat[2 * i], flat[2 * i + 1], qi) for i, qi in enumerate(q)]

    def _take(self, branch: _Branch, token: int, runner_up: int, q: Tensor | None) -> None:
        """One more draft token for `branch` from its latest row (if it wants one)."""
        if len(branch.tokens) >= branch.want or branch.stopped:
            return
        branch.tokens.append(token)
        branch.runner_ups.append(runner_up)
        if q is not None:
            branch.q.append(q)
        branch.position += 1
        branch.stopped = token in self._stop

    def _choose(
        self, row: Tensor, position: int, draw: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """For `row` (V,) predicting `position`: the draft's token (its pick, `_pick`'s choice;
        a draw from q when drafting for rejection sampling and `draw`), its runner-up by the
        pick's own score (coupled: the coupled scores, computed once for both; else the
        logits), and q (None unless drawn). 0-dim tensors, on device."""
        dparams = self.draft_params
        q = None
        if dparams.is_greedy or self._coupled_seed is not None or not draw:
            seed = self._coupled_seed
            score = row
            if seed is not None and not dparams.is_greedy:
                score = coupled_scores(row[None], dparams, seed, [position])[0]
            token = score.argmax()  # what `_pick` (`coupled_tokens`) takes
        else:
            score, q = row, logits_to_probs(row, dparams)
            token = sample(q, self._generator).view(())
        top = torch.topk(score, 2).indices
        return token, torch.where(top[0] == token, top[1], top[0]), q

    def _onto_guess(self, pending: DraftBlock) -> None:
        """A pending tree's cache compacted to committed + a prefix of its guessed path (its
        fed nodes there, the leaf's left out: its logits give the guessed bonus token); the
        caller feeds the rest of the path. Nothing to do for a chain or once done."""
        tree = self._trees.get(pending.seq)
        if tree is None or tree.on_path:
            return
        base = pending.base_len
        if self.runner.length > base:  # the cache holds committed + the tree's fed nodes
            fed = [tree.fed_of[i] for i in tree.guess if tree.fed_of[i] is not None]
            self.runner.keep_nodes(base, fed[: len(tree.guess) - 1])  # type: ignore[arg-type]
        tree.on_path = True

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
        check_int("n", n, 1)
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
        self.dropped_blocks = [b for b in (ahead, *self._branches) if b is not None]
        self._forget_ahead()
        if ahead is not None and pending is not None:
            keep = pending.base_len + len(self._guessed_tokens(pending))
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

    def _pick(self, logits: Tensor, position: int) -> Tensor:
        """The draft's deterministic choice for rows `logits` (m, V) scoring positions
        position.. : coupled tokens under coupled sampling, else the argmax. long (m,)."""
        if self._coupled_seed is None:
            return logits.argmax(-1)
        positions = range(position, position + logits.shape[0])
        return coupled_tokens(logits, self.draft_params, self._coupled_seed, positions)

    def _draft(
        self, logits: Tensor, n: int, position: int
    ) -> tuple[list[int], Tensor | None, list[int]]:
        """Draft n tokens, the first from `logits` (V,) (which predict sequence position
        `position`, the one after the cache); returns them, q (n', V) (None when drafting
        greedily or coupled) and the draft's runner-up at each of their positions
        (`_choose`). Every drafted token but the last is fed to the cache."""
        runner = self.runner
        picked: list[Tensor] = []  # 0-dim long tensors, kept on device until the end
        ups: list[Tensor] = []  # the runner-up at each position, likewise
        q: list[Tensor] = []  # (V,) each
        for i in range(n):
            tok, runner_up, probs = self._choose(logits, position + i)
            if probs is not None:
                q.append(probs)
            picked.append(tok)
            ups.append(runner_up)
            if i < n - 1:
                logits = runner.extend(tok.view(1))[0]  # (V,)
        both = torch.stack(picked + ups).tolist()  # the one sync of the block
        tokens, runner_ups = both[:n], both[n:]
        # Nothing after a stop token can be part of the output: cut the block there.
        for i, t in enumerate(tokens):
            if t in self._stop:
                tokens = tokens[: i + 1]
                break
        q_rows = torch.stack(q[: len(tokens)]) if q else None  # (n', V)
        return tokens, q_rows, runner_ups[: len(tokens)]

    def apply(self, verdict: Verdict) -> list[int]:
        """Commit the verdict of the pending block; returns the newly committed tokens.

        Appends the accepted draft tokens and the verdict's token, stopping after a stop token or
        at max_new_tokens (overshoot is dropped), then rolls the draft cache back to the longest
        prefix that is still valid. A decode block's verdicts commit one token each. With a block
        drafted ahead, a hit makes it the pending block (its drafts stay in the cache); a miss
        drops it. A hit: the session goes on and the committed tokens are the prefix the block
        ahead was drafted on (the pending block accepted as guessed, a chain whole, a tree along
        its guessed path, then the guessed token), by the verifier's own rule: its base_len and
        its anchor (`DraftBlock.anchor`).
        """
        block = self._pending
        if block is None:
            raise RuntimeError("no block awaits a verdict")
        if verdict.seq != block.seq:
            raise ValueError(f"verdict seq must be {block.seq}, got {verdict.seq}")
        if verdict.accepted > block.depth:
            raise ValueError(
                f"verdict accepted must be in [0, {block.depth}], got {verdict.accepted}"
            )
        base = len(self.committed)  # == block.base_len, except within a decode stream
        expected_len = base + verdict.accepted + 1
        if verdict.committed_len != expected_len:
            raise ValueError(
                f"verdict committed_len must be {expected_len}, got {verdict.committed_len}"
            )
        self.last_ahead_hit = None
        self.dropped_ahead = None
        self.dropped_blocks = []
        ups = self._runner_ups.get(block.seq)
        rejected = block.parents is None and verdict.accepted < len(block.tokens)
        self.last_runner_up = (
            ups[verdict.accepted] == verdict.token
            if rejected and ups is not None and verdict.accepted < len(ups)
            else None
        )
        if block.parents is not None:
            return self._apply_tree(block, verdict, base)
        out = self._commit([*block.tokens[: verdict.accepted], verdict.token])
        if block.decode_tokens:
            # Nothing was drafted: the cache still holds a prefix of the committed tokens.
            self._decoded += 1
            if self.finished or self._decoded >= block.decode_tokens:
                self._settle_ahead(not self.finished)
                self._decoded = 0
            return out
        if self._branch_paths:
            if self._settle_branches():
                return out
        elif self._settle_ahead(self._ahead_fits()):
            # The cache holds committed + the ahead block's drafts: still a valid prefix.
            return out
        # Draft cache holds committed + draft tokens fed so far (after branches: the pending
        # chain's tokens are the tree's first nodes); keep only the accepted part.
        self.runner.rollback(min(self.runner.length, base + verdict.accepted))
        return out

    def _ahead_fits(self) -> bool:
        """Whether the committed tokens are the prefix the block ahead was drafted on."""
        return self._ahead is not None and self._fits(self._ahead)

    def _fits(self, block: DraftBlock) -> bool:
        """Whether the committed tokens are the prefix `block` was drafted on: the verifier's
        rule (`DraftBlock.fits`), so both sides agree on every hit."""
        return block.fits(self.committed)

    def _forget_ahead(self) -> None:
        """Nothing is drafted ahead any more: forget what was kept for the blocks ahead, all
        but the pending block's."""
        self._ahead, self._branches, self._branch_paths = None, [], {}
        live = {b.seq for b in (self._pending,) if b is not None}
        self._runner_ups = {s: u for s, u in self._runner_ups.items() if s in live}
        self._trees = {s: t for s, t in self._trees.items() if s in live}

    def _settle_branches(self) -> bool:
        """`_settle_ahead` after `propose_ahead` with branches: the block ahead whose guess
        came true, if any and the session goes on, becomes pending, and the draft cache keeps
        its path (returns True); every other block ahead is dropped."""
        blocks = [b for b in (self._ahead, *self._branches) if b is not None]
        hit = None if self.finished else next((b for b in blocks if self._fits(b)), None)
        paths, base = self._branch_paths, self._branch_base
        self.last_ahead_hit = hit is not None
        self.dropped_blocks = [b for b in blocks if b is not hit]
        self.dropped_ahead = blocks[0] if blocks and blocks[0] is not hit else None
        self._pending = hit
        self._forget_ahead()
        if hit is not None and self.runner.length > base:
            self.runner.keep_nodes(base, paths[hit.seq])
        return hit is not None

    def _settle_ahead(self, guessed: bool) -> bool:
        """After the pending block's verdict (`guessed`: it came out as the block ahead
        assumed): the block ahead, if any and the session goes on, becomes pending (a hit;
        returns True), else it is dropped and nothing is pending."""
        ahead, self._ahead = self._ahead, None
        hit = ahead is not None and guessed and not self.finished
        if ahead is not None:
            self.last_ahead_hit = hit
        self._pending = ahead if hit else None
        if not hit:
            self.dropped_ahead = ahead
            self.dropped_blocks = [ahead] if ahead is not None else []
        self._forget_ahead()
        return hit

    def _apply_tree(self, block: DraftBlock, verdict: Verdict, base: int) -> list[int]:
        """Commit a tree block's accepted path and token; the draft cache keeps the committed
        prefix and the path's fed nodes (compacted to the guessed path: their common prefix),
        or on a hit the block drafted ahead as well."""
        assert block.parents is not None
        path = verdict.path or ()
        node = -1
        for i in path:
            if not (0 <= i < len(block.tokens) and block.parents[i] == node):
                raise ValueError(f"verdict path {path} is not a root path of the block's tree")
            node = i
        out = self._commit([*(block.tokens[i] for i in path), verdict.token])
        tree = self._trees.pop(block.seq, None)
        if self._settle_ahead(self._ahead_fits()) or tree is None:
            return out
        if tree.on_path:  # the cache holds committed + the guessed path (+ what was ahead)
            # keep the guessed tokens that were committed (by token: a sampled tree's siblings
            # may repeat one)
            guessed, accepted = [block.tokens[i] for i in tree.guess], out[: len(path)]
            common = 0
            while common < min(len(accepted), len(guessed)) and accepted[common] == guessed[common]:
                common += 1
            self.runner.rollback(min(self.runner.length, base + common))
        elif self.runner.length > base:  # the cache holds committed + the fed nodes
            fed = [tree.fed_of[i] for i in path if tree.fed_of[i] is not None]
            self.runner.keep_nodes(base, fed)  # type: ignore[arg-type]
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
