"""Emulated edge devices (`edgespec.bench.emulated_edge`): memoized draft forwards give the plain
drafter's blocks, token for token, on a real tiny model, and the output stays the target alone's.
"""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import noisy_draft, tiny_llama
from transformers import PreTrainedModel

from edgespec.bench.emulated_edge import LogitsMemo, MemoRunner, fill_token_trees, runner_factory
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import ComputeProfile, ForwardCost
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.core.tree import TreeShape
from edgespec.core.verifier import Verifier

VOCAB = 300
# Emulated, but padding almost nothing: the test is about tokens, not time.
PROFILE = ComputeProfile(
    name="test-emulated",
    emulated=True,
    draft=ForwardCost(0.01, 0.0),
    draft_prefill=ForwardCost(0.01, 0.0),
)
PROMPTS = ([5, 17, 42, 7, 99], [5, 17, 42, 7, 99], [3, 250, 8], [5, 17, 42, 7, 100])


def _session(
    draft: ModelRunner,
    target: ModelRunner,
    prompt: list[int],
    k: int,
    ahead: bool,
    params: SamplingParams | None = None,
) -> tuple[list[DraftBlock], list[int]]:
    """One session (greedy unless `params` say otherwise), blocks verified in turn (pipelined:
    a block drafted ahead of each pending one); returns every block proposed and the output."""
    params = params if params is not None else SamplingParams(max_new_tokens=24)
    drafter = Drafter(draft, prompt, params)
    verifier = Verifier(target, prompt, params)
    blocks = []
    block = drafter.propose(k)
    while True:
        blocks.append(block)
        if ahead and (extra := drafter.propose_ahead(k)) is not None:
            blocks.append(extra)
        drafter.apply(verifier.verify(block))
        if drafter.finished:
            return blocks, drafter.generated
        block = drafter.pending if drafter.pending is not None else drafter.propose(k)


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("related", [True, False])
def test_memoized_drafting_gives_the_plain_drafters_blocks(related: bool, ahead: bool) -> None:
    target_model = tiny_llama(VOCAB, seed=0)
    # A noisy copy (long accepted runs) or an unrelated model (rejections and rollbacks).
    draft_model = noisy_draft(target_model) if related else tiny_llama(VOCAB, seed=1)
    target = ModelRunner(target_model)
    memo = LogitsMemo()
    for i, prompt in enumerate(PROMPTS):
        k = 2 + i  # sessions of one memo with different draft lengths
        expected = generate_autoregressive(target, prompt, SamplingParams(max_new_tokens=24))
        plain, plain_out = _session(ModelRunner(draft_model), target, prompt, k, ahead)
        runner = MemoRunner(draft_model, PROFILE, memo)
        memoized, memo_out = _session(runner, target, prompt, k, ahead)
        assert memoized == plain
        assert memo_out == plain_out == expected.tokens
        assert runner.length <= len(prompt) + 24 and runner.real_length <= runner.length
    stats = memo.stats()
    # The second prompt repeats the first: its forwards (and parts of others) are shared.
    assert stats.hits > 0 and stats.real_forwards < stats.forwards


@pytest.mark.parametrize("sampler", ["rejection", "coupled"])
def test_memoized_drafting_samples_the_plain_drafters_blocks(sampler: str) -> None:
    # The memo holds logits, not proposals: sampling still draws with each drafter's own
    # generator, so the same seed gives the same tokens and the same q rows.
    target_model = tiny_llama(VOCAB, seed=0)
    draft_model = noisy_draft(target_model)
    target, memo = ModelRunner(target_model), LogitsMemo()
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=11, sampler=sampler)
    for prompt in PROMPTS[:2]:  # the second one reads the first one's rows
        plain, plain_out = _session(ModelRunner(draft_model), target, prompt, 3, False, params)
        runner = MemoRunner(draft_model, PROFILE, memo)
        memoized, memo_out = _session(runner, target, prompt, 3, False, params)
        assert memo_out == plain_out
        assert [(b.seq, b.base_len, b.tokens) for b in memoized] == [
            (b.seq, b.base_len, b.tokens) for b in plain
        ]
        for a, b in zip(memoized, plain, strict=True):
            if b.draft_probs is None:
                assert a.draft_probs is None
            else:
                assert a.draft_probs is not None
                # equal up to the float rounding of differently chunked forwards
                assert torch.allclose(a.draft_probs.probs, b.draft_probs.probs, atol=1e-6)
    assert memo.stats().hits > 0


def test_memo_runner_is_a_runner_over_the_logical_sequence() -> None:
    model = tiny_llama(VOCAB, seed=0)
    plain, memo = ModelRunner(model), MemoRunner(model, PROFILE, LogitsMemo(max_rows=4))
    for runner in (plain, memo):
        runner.prefill([1, 2, 3])
        runner.extend([4, 5])
        runner.rollback(4)
        runner.extend([6])
    assert memo.length == plain.length == 5 and memo.forwards == plain.forwards == 3
    assert memo.extend([7]).argmax().item() == plain.extend([7]).argmax().item()
    assert len(memo.memo._rows) <= 4  # LRU-bounded
    with pytest.raises(ValueError, match="token ids"):
        memo.extend([VOCAB])
    assert memo.length == 6  # a rejected extend changes nothing
    with pytest.raises(NotImplementedError):
        memo.keep_nodes(6, [0])  # a tree's path is refed as committed tokens instead


def test_no_memo_without_emulation() -> None:
    assert runner_factory("real", LogitsMemo()) is None  # real edges pay their own compute
    assert runner_factory("h100-70b", LogitsMemo()) is not None


def _tree_session(
    draft: ModelRunner, target: ModelRunner, prompt: list[int], params: SamplingParams
) -> tuple[list[DraftBlock], list[int]]:
    """One session of token trees verified in turn; every block proposed and the output."""
    drafter = Drafter(draft, prompt, params)
    verifier = Verifier(target, prompt, params)
    blocks = []
    while not drafter.finished:
        block = drafter.propose_tree(TreeShape(12, 4, 3))
        blocks.append(block)
        drafter.apply(verifier.verify(block))
    return blocks, drafter.generated


@pytest.mark.parametrize("sampler", [None, "coupled"])
def test_memoized_tree_drafting_gives_the_plain_drafters_trees(sampler: str | None) -> None:
    target_model = tiny_llama(VOCAB, seed=0)
    draft_model = noisy_draft(target_model)
    target, memo = ModelRunner(target_model), LogitsMemo()
    params = SamplingParams(max_new_tokens=24)
    if sampler is not None:
        params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=5, sampler=sampler)
    for prompt in PROMPTS:  # the second prompt repeats the first: its trees come from the memo
        plain, plain_out = _tree_session(ModelRunner(draft_model), target, prompt, params)
        runner = MemoRunner(draft_model, PROFILE, memo)
        memoized, memo_out = _tree_session(runner, target, prompt, params)
        assert [(b.tokens, b.parents) for b in memoized] == [(b.tokens, b.parents) for b in plain]
        assert memo_out == plain_out == generate_autoregressive(target, prompt, params).tokens
    stats = memo.stats()
    assert stats.hits > 0 and stats.real_forwards < stats.forwards
    assert stats.real_ms > 0.0  # the real forwards' host time is counted


def _pipelined_session(
    draft: ModelRunner,
    target: ModelRunner,
    prompt: list[int],
    tree: TreeShape | None,
    branches: int = 0,
    alternate: TreeShape | None = None,
) -> tuple[list[DraftBlock], list[int], int]:
    """A greedy session drafting a block ahead of each pending one (chains of 4, with
    `branches` more guesses, or trees of `tree`); returns the blocks the verifier used, the
    output, and the blocks drafted ahead. `alternate`: every other fresh block is a token tree
    of that shape, not drafted ahead (a tree controller's serial tree rounds between chains)."""
    params = SamplingParams(max_new_tokens=24)
    drafter = Drafter(draft, prompt, params)
    verifier = Verifier(target, prompt, params)
    used, ahead, fresh = [], 0, 0

    def propose() -> DraftBlock:
        nonlocal fresh
        fresh += 1
        if alternate is not None and fresh % 2 == 0:
            return drafter.propose_tree(alternate)
        return drafter.propose(4) if tree is None else drafter.propose_tree(tree)

    block = propose()
    while True:
        used.append(block)
        serial_tree = alternate is not None and block.parents is not None
        if not serial_tree and drafter.propose_ahead(4, tree=tree, branches=branches) is not None:
            ahead += 1 + len(drafter.branches)
        drafter.apply(verifier.verify(block))
        if drafter.finished:
            return used, drafter.generated, ahead
        block = drafter.pending if drafter.pending is not None else propose()


def _distinct_sessions() -> tuple[PreTrainedModel, ModelRunner, list[list[int]], list[list[int]]]:
    """A noisy draft of a tiny target, the target's runner, prompts that share no row, and
    their references (prompt + the target's greedy output of 24 tokens)."""
    target_model = tiny_llama(VOCAB, seed=0)
    target = ModelRunner(target_model)
    params = SamplingParams(max_new_tokens=24)
    prompts = [list(p) for p in PROMPTS[2:]]  # distinct prompts: no row is shared between them
    references = [p + generate_autoregressive(target, p, params).tokens for p in prompts]
    return noisy_draft(target_model), target, prompts, references


def _walked(block: DraftBlock, reference: list[int]) -> tuple:
    """A used block as far as a greedy walk can read it: a chain's tokens up to and including
    its first one off `reference`; a tree whole."""
    if block.parents is not None:
        return block.tokens, block.parents
    tokens = []
    for i, token in enumerate(block.tokens):
        tokens.append(token)
        if block.base_len + i >= len(reference) or reference[block.base_len + i] != token:
            break
    return tuple(tokens), None


@pytest.mark.parametrize("tree", [None, TreeShape(12, 4, 3)])
def test_dead_rows_are_stood_in_without_changing_any_used_block(tree: TreeShape | None) -> None:
    """Told the references (prompt + the target's greedy output), the memo serves the rows of
    blocks drafted ahead on a guess that missed (and chain tokens after a rejected one) from a
    live prefix's row: fewer real forwards, and every block the verifier used, and the output,
    as the plain drafter's. Without references it computes them (the control)."""
    draft_model, target, prompts, references = _distinct_sessions()
    real_forwards = {}
    for told in (False, True):
        memo = LogitsMemo()
        if told:
            memo.add_references(references)
        for prompt, reference in zip(prompts, references, strict=True):
            plain, plain_out, _ = _pipelined_session(ModelRunner(draft_model), target, prompt, tree)
            runner = MemoRunner(draft_model, PROFILE, memo)
            used, out, ahead = _pipelined_session(runner, target, prompt, tree)
            assert ahead > 0
            # up to its first token off the reference: the walk rejects there, so a chain's
            # later tokens are dead (stood in); a tree on a live prefix is computed whole
            assert [_walked(b, reference) for b in used] == [_walked(b, reference) for b in plain]
            assert out == plain_out == reference[len(prompt) :]
        stats = memo.stats()
        assert (stats.stand_ins > 0) == told
        real_forwards[told] = stats.real_forwards
    assert real_forwards[True] < real_forwards[False]


@pytest.mark.parametrize("mixed", [False, True])
def test_dead_branch_nodes_are_stood_in_without_changing_any_used_block(mixed: bool) -> None:
    """Branches drafted ahead (`propose_ahead(..., branches=3)`) are a tree on a live prefix;
    the drafter feeds it as guesses (`extend_tree(..., guesses=True)`) and the memo serves the
    rows of its dead nodes from a live prefix's row, as for a chain ahead: fewer real forwards
    than computing the tree whole (the control: `stand_in_dead_nodes=False`), and every block
    the verifier used, and the output, as the plain drafter's. `mixed`: the session alternates
    such chain rounds with token trees (as the tree controller does), whose trees must still be
    the plain drafter's whole, dead nodes included."""
    draft_model, target, prompts, references = _distinct_sessions()
    tree = TreeShape(12, 4, 3) if mixed else None
    real_forwards = {}
    for stand_in in (False, True):
        memo = LogitsMemo()
        memo.add_references(references)
        for prompt, reference in zip(prompts, references, strict=True):
            plain, plain_out, _ = _pipelined_session(
                ModelRunner(draft_model), target, prompt, None, branches=3, alternate=tree
            )
            runner = MemoRunner(draft_model, PROFILE, memo, stand_in_dead_nodes=stand_in)
            used, out, ahead = _pipelined_session(
                runner, target, prompt, None, branches=3, alternate=tree
            )
            assert ahead > 0
            assert [_walked(b, reference) for b in used] == [_walked(b, reference) for b in plain]
            assert out == plain_out == reference[len(prompt) :]
            if mixed:  # token trees were grown, and each is the plain drafter's whole
                assert any(b.parents is not None for b in used)
        real_forwards[stand_in] = memo.stats().real_forwards
    assert real_forwards[True] < real_forwards[False]


@pytest.mark.parametrize("filled", [False, True])
def test_token_trees_filled_ahead_need_no_forward_during_the_sessions(filled: bool) -> None:
    """`fill_token_trees` computes ahead the rows of every greedy tree the widths can grow at
    any committed prefix: sessions growing trees of those widths (any depth up to the filled
    one, any node budget, serial or drafted ahead) then run no real draft forward, and every
    block the verifier used, and the output, is the plain drafter's. Unfilled (the control),
    the same sessions compute their trees' rows."""
    draft_model, target, prompts, references = _distinct_sessions()
    memo = LogitsMemo()
    memo.add_references(references)
    if filled:
        ran = fill_token_trees(memo, draft_model, references, [len(p) for p in prompts], (2, 3), 5)
        assert ran > 0 and memo.stats().real_forwards == ran
    before = memo.stats().real_forwards
    for tree, alternate in ((TreeShape(12, 4, 3), None), (None, TreeShape(7, 5, 2))):
        for prompt, reference in zip(prompts, references, strict=True):
            plain, plain_out, _ = _pipelined_session(
                ModelRunner(draft_model), target, prompt, tree, branches=3, alternate=alternate
            )
            runner = MemoRunner(draft_model, PROFILE, memo)
            used, out, _ = _pipelined_session(
                runner, target, prompt, tree, branches=3, alternate=alternate
            )
            assert any(b.parents is not None for b in used)
            assert [_walked(b, reference) for b in used] == [_walked(b, reference) for b in plain]
            assert out == plain_out == reference[len(prompt) :]
    during = memo.stats().real_forwards - before
    assert (during == 0) == filled, during


def test_a_memoized_row_is_not_replaced_by_a_recomputation() -> None:
    """The first row stored for a prefix is the one served from then on, however often a later
    forward recomputes it: a tree grown from it stays the tree the next session grows."""
    memo = LogitsMemo()
    first, again = torch.zeros(2, 5), torch.ones(2, 5)
    memo.put([7, 8, 9], 1, first, 1.0, 0)  # rows after (7, 8) and (7, 8, 9)
    memo.put([7, 8, 9, 4], 2, again, 1.0, 0)  # recomputes (7, 8, 9), adds (7, 8, 9, 4)
    rows = memo.get_rows([(7, 8), (7, 8, 9), (7, 8, 9, 4)])
    assert rows is not None
    assert [float(r.sum()) for r in rows] == [0.0, 0.0, 5.0]
    assert memo.stats().real_forwards == 2 and memo.stats().misses == 4
