"""Pipelining with token trees (issue 14): while a tree's verdict travels, the drafter bets on
its likeliest path and the draft's bonus token after it and drafts the next block (a chain or a
tree) there. Co-located Drafter/Verifier pairs on tiny random models: the output is the target
alone's (greedy, and coupled sampling with the same seed) whatever mix of trees and chains goes
ahead, a block ahead of a missed guess is STALE at the verifier, and the draft cache after a hit
and after a miss (its length and its content: the logits it gives equal a fresh cache's). Under
rejection sampling trees go ahead as chains do: the tokens follow the target's distribution.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.pipelining import (
    COUPLED,
    GREEDY,
    PAIRS,
    PROMPTS,
    RUNS,
    SAMPLED,
    SAMPLED_PROMPT,
    SAMPLED_V,
    V,
    joint_of_three,
    pair_runners,
)
from support.stats import chi_square_p
from support.tiny_models import noisy_draft, tiny_model

from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock, StaleBlockError, Verdict
from edgespec.core.tree import ROOT, DraftTree, TreeShape
from edgespec.core.tree_draft import grow_tree
from edgespec.core.verifier import Verifier

TREE = TreeShape(nodes=10, depth=4, width=2)
WIDE = TreeShape(nodes=12, depth=3, width=3)


@pytest.fixture(scope="module", params=sorted(PAIRS))
def runners(request) -> tuple[ModelRunner, ModelRunner]:
    return pair_runners(request.param)


def _propose(drafter: Drafter, plan: TreeShape | int) -> DraftBlock:
    return drafter.propose_tree(plan) if isinstance(plan, TreeShape) else drafter.propose(plan)


def _ahead(drafter: Drafter, plan: TreeShape | int) -> DraftBlock | None:
    if isinstance(plan, TreeShape):
        return drafter.propose_ahead(plan.depth, tree=plan)
    return drafter.propose_ahead(plan)


def _pipelined(
    draft: ModelRunner, target: ModelRunner, prompt: list[int], params: SamplingParams, plans
) -> tuple[list[int], int, int]:
    """A session with a block drafted ahead of every pending one, the blocks following `plans`
    (tree shapes and chain lengths, cycled); every block ahead of a missed guess must be STALE.
    Returns the output, the hits and the misses."""
    drafter = Drafter(draft, prompt, params)
    verifier = Verifier(target, prompt, params)
    hits = misses = i = 0
    block = _propose(drafter, plans[0])
    while not drafter.finished:
        i += 1
        ahead = _ahead(drafter, plans[i % len(plans)])
        drafter.apply(verifier.verify(block))
        if ahead is not None:
            if drafter.last_ahead_hit:
                hits += 1
                assert drafter.pending is ahead
            else:
                misses += 1
                assert drafter.dropped_ahead is ahead
                with pytest.raises(StaleBlockError):
                    verifier.verify(ahead)
        if drafter.finished:
            break
        block = (
            drafter.pending
            if drafter.pending is not None
            else _propose(drafter, plans[i % len(plans)])
        )
    return drafter.generated, hits, misses


@pytest.mark.parametrize("params", [GREEDY, COUPLED], ids=["greedy", "coupled"])
@pytest.mark.parametrize(
    "plans",
    [(TREE,), (TREE, 3), (3, WIDE, TREE)],
    ids=["trees", "tree-then-chain", "chain-then-trees"],
)
def test_pipelined_trees_give_the_target_alone(runners, params, plans):
    target, draft = runners
    hits = misses = 0
    for prompt in PROMPTS:
        out, h, m = _pipelined(draft, target, prompt, params, plans)
        assert out == generate_autoregressive(target, prompt, params).tokens, prompt
        hits, misses = hits + h, misses + m
    assert hits > 0 and misses > 0  # both ways through were taken


def test_the_guess_is_the_deepest_likeliest_path(runners):
    _, draft = runners
    draft.reset()
    grown = grow_tree(draft, PROMPTS[0], GREEDY, TreeShape(nodes=14, depth=4, width=3))
    tree = grown.tree
    assert len(grown.guess) == max(tree.depths) + 1
    assert tree.path_to(grown.guess[-1]) == list(grown.guess)
    # the likeliest at its depth: no other deepest node's draft path is more probable
    runner = ModelRunner(draft.model)

    def logp(path: list[int]) -> float:
        tokens = [tree.tokens[i] for i in path]
        runner.reset()
        runner.prefill(PROMPTS[0][:-1])
        rows = runner.extend(PROMPTS[0][-1:] + tokens[:-1])
        logq = torch.log_softmax(rows.float(), dim=-1)
        return float(sum(logq[j, t] for j, t in enumerate(tokens)))

    deepest = [i for i, d in enumerate(tree.depths) if d == len(grown.guess) - 1]
    best = logp(list(grown.guess))
    assert all(logp(tree.path_to(i)) <= best + 1e-4 for i in deepest)


def _fresh_logits(draft: ModelRunner, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(draft.model)
    runner.prefill(tokens[:-1])
    return runner.extend(tokens[-1:])[-1]


def _cache_holds(drafter: Drafter, n: int) -> None:
    """The draft cache holds exactly the first `n` committed tokens: its length is n, and
    feeding the next committed token gives the logits a fresh cache gives."""
    runner, tokens = drafter.runner, drafter.committed[: n + 1]
    assert runner.length == n
    got = runner.extend(tokens[-1:])[-1]
    runner.rollback(n)
    torch.testing.assert_close(got, _fresh_logits(runner, tokens), atol=1e-4, rtol=1e-4)


def _tree_then_ahead(draft: ModelRunner, ahead: TreeShape | int):
    drafter = Drafter(draft, PROMPTS[0], GREEDY)
    pending = drafter.propose_tree(TREE)
    block = _ahead(drafter, ahead)
    assert block is not None
    return drafter, pending, block, drafter._trees[pending.seq].guess


@pytest.mark.parametrize("ahead", [WIDE, 3], ids=["tree", "chain"])
def test_a_hit_makes_the_block_ahead_pending_with_its_cache(runners, ahead):
    _, draft = runners
    drafter, pending, block, guess = _tree_then_ahead(draft, ahead)
    path_tokens = [pending.tokens[i] for i in guess]
    context = PROMPTS[0] + path_tokens
    assert block.base_len == len(context) + 1 and block.anchor_token is not None
    assert block.seq == pending.seq + 1
    assert (block.parents is not None) == isinstance(ahead, TreeShape)
    # the guessed bonus token is the draft's argmax after the guessed path
    assert block.anchor_token == int(_fresh_logits(draft, context).argmax())
    verdict = Verdict(
        seq=pending.seq,
        accepted=len(guess),
        token=block.anchor_token,
        is_bonus=True,
        committed_len=block.base_len,
        verify_ms=0.0,
        path=tuple(guess),
    )
    assert drafter.apply(verdict) == [*path_tokens, block.anchor_token]
    assert drafter.last_ahead_hit is True and drafter.pending is block
    assert drafter.committed == [*context, block.anchor_token]
    # the cache: committed + the block's fed drafts (a tree's fed nodes, a chain's k - 1)
    fed = (
        sum(f is not None for f in drafter._trees[block.seq].fed_of)
        if block.parents is not None
        else len(block.tokens) - 1
    )
    assert drafter.runner.length == block.base_len + fed
    # reject the whole block ahead: the cache is the committed prefix, valid
    path = () if block.parents is not None else None
    wrong = (block.tokens[0] + 1) % V
    drafter.apply(Verdict(block.seq, 0, wrong, False, block.base_len + 1, 0.0, path))
    _cache_holds(drafter, len(drafter.committed) - 1)


@pytest.mark.parametrize("keep", [0, 1, "all"])
def test_a_miss_drops_the_block_ahead_and_keeps_the_common_prefix(runners, keep):
    _, draft = runners
    drafter, pending, block, guess = _tree_then_ahead(draft, WIDE)
    if keep == "all":  # the guessed path accepted, but another bonus token
        path, token = tuple(guess), (block.anchor_token + 1) % V
    else:  # the walk leaves the guessed path after `keep` nodes (a sibling, or nothing)
        path = tuple(guess[:keep])
        parent = path[-1] if path else ROOT
        tree = DraftTree(pending.tokens, pending.parents)
        others = [c for c in tree.children(parent) if c != guess[keep]]
        if others:
            path += (others[0],)
        token = 0
    verdict = Verdict(
        pending.seq, len(path), token, False, pending.base_len + len(path) + 1, 0.0, path
    )
    drafter.apply(verdict)
    assert drafter.last_ahead_hit is False and drafter.dropped_ahead is block
    assert drafter.pending is None and drafter.ahead is None
    common = 0
    while common < min(len(path), len(guess)) and path[common] == guess[common]:
        common += 1
    assert common == (len(guess) if keep == "all" else keep)
    assert drafter.runner.length == pending.base_len + common
    _cache_holds(drafter, pending.base_len + common)
    # the next round feeds what the cache lacks and stays exact
    target = Verifier(ModelRunner(runners[0].model), drafter.committed, GREEDY)
    drafter.apply(target.verify(drafter.propose_tree(TREE)))


def test_drafting_a_tree_ahead_again_after_drop_ahead(runners):
    target, draft = runners
    drafter, pending, first, guess = _tree_then_ahead(draft, WIDE)
    assert drafter.drop_ahead() is first and drafter.ahead is None
    assert drafter.runner.length == pending.base_len + len(guess)
    again = _ahead(drafter, WIDE)
    assert again is not None and again.seq > first.seq
    assert (again.tokens, again.parents, again.anchor_token) == (
        first.tokens,
        first.parents,
        first.anchor_token,
    )
    verifier = Verifier(target, PROMPTS[0], GREEDY)
    drafter.apply(verifier.verify(pending))
    if drafter.pending is again:
        drafter.apply(verifier.verify(again))
    while not drafter.finished:
        drafter.apply(verifier.verify(drafter.propose_tree(TREE)))
    assert drafter.generated == generate_autoregressive(target, PROMPTS[0], GREEDY).tokens


def test_no_room_ahead_when_the_guess_ends_the_session(runners):
    _, draft = runners
    drafter = Drafter(draft, PROMPTS[1], SamplingParams(max_new_tokens=2))
    drafter.propose_tree(TREE)  # one level: its guessed node + the bonus reach max_new_tokens
    assert drafter.ahead_room() == -1 and drafter.propose_ahead(2, tree=TREE) is None
    drafter = Drafter(draft, PROMPTS[1], GREEDY)
    block = drafter.propose_tree(TREE)
    leaf = block.tokens[drafter._trees[block.seq].guess[-1]]
    assert drafter.ahead_room() > 0
    stops = SamplingParams(max_new_tokens=24, stop_token_ids=(leaf,))
    drafter = Drafter(draft, PROMPTS[1], stops)
    assert drafter.propose_tree(TREE) == block  # the same tree, whose guess ends in a stop
    assert drafter.ahead_room() == -1 and drafter.propose_ahead(2, tree=TREE) is None


# ---------------------------------------------------------------- rejection sampling


def _sampled_session(target: ModelRunner, draft: ModelRunner, seed: int) -> tuple[list[int], bool]:
    """Rejection sampling, a one-level tree (3 siblings drawn from q) and a one-level tree
    ahead of it: on a hit, token 3 comes from the tree ahead's walk. The output and whether
    the block ahead was used."""
    params = SamplingParams(**{**SAMPLED.__dict__, "seed": seed})
    drafter = Drafter(draft, SAMPLED_PROMPT, params)
    verifier = Verifier(target, SAMPLED_PROMPT, params)
    shape = TreeShape(nodes=3, depth=1, width=3)
    block = drafter.propose_tree(shape)
    ahead = drafter.propose_ahead(1, tree=shape)
    assert ahead is not None and ahead.draft_probs is not None and len(ahead.anchor) == 2
    drafter.apply(verifier.verify(block))
    hit = bool(drafter.last_ahead_hit)
    while not drafter.finished:
        pending = drafter.pending if drafter.pending is not None else drafter.propose_tree(shape)
        drafter.apply(verifier.verify(pending))
    return drafter.generated, hit


def test_pipelined_rejection_trees_follow_the_target():
    """Trees drafted ahead under rejection sampling (their nodes drawn from q on the guessed
    prefix, q sent) commit tokens distributed as the target alone's: the joint of tokens 1-3
    over many seeds against the exact one (chi-square), with the block ahead used often."""
    model = tiny_model("llama", SAMPLED_V, head_scale=2.0)
    target, draft = ModelRunner(model), ModelRunner(noisy_draft(model, 0.5))
    counts: dict[int, int] = {}
    hits = 0
    for seed in range(RUNS):
        out, hit = _sampled_session(target, draft, seed)
        key = (out[0] * SAMPLED_V + out[1]) * SAMPLED_V + out[2]
        counts[key] = counts.get(key, 0) + 1
        hits += hit
    assert hits > RUNS // 10
    assert chi_square_p(counts, joint_of_three(target), RUNS) > 1e-3


# ---------------------------------------------------------------- fuzzing the drafter

FUZZ_MODEL = tiny_model("llama", V, head_scale=3.0)
FUZZ_DRAFT = noisy_draft(FUZZ_MODEL, 0.2)
PLAN = st.one_of(
    st.integers(0, 4),
    st.builds(
        lambda d, w: TreeShape(nodes=w + (d - 1) * w * w, depth=d, width=w),
        st.integers(1, 4),
        st.integers(1, 3),
    ),
)


def _random_verdict(data, block: DraftBlock, ahead: DraftBlock | None) -> Verdict:
    """Any verdict the verifier could send: a root path (a chain's prefix), then a token; often
    the one the block ahead bets on."""
    path: list[int] = []
    if block.parents is None:
        accepted = data.draw(st.integers(0, len(block.tokens)))
    else:
        tree, node = DraftTree(block.tokens, block.parents), ROOT
        while (kids := tree.children(node)) and data.draw(st.booleans()):
            node = data.draw(st.sampled_from(kids))
            path.append(node)
        accepted = len(path)
    token = data.draw(st.integers(0, V - 1))
    if ahead is not None and ahead.anchor_prefix == tuple(block.tokens[i] for i in path):
        token = data.draw(st.sampled_from([token, ahead.anchor_token]))
    return Verdict(
        seq=block.seq,
        accepted=accepted,
        token=token,
        is_bonus=False,
        committed_len=block.base_len + accepted + 1,
        verify_ms=0.0,
        path=tuple(path) if block.parents is not None else None,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), plans=st.lists(PLAN, min_size=1, max_size=6))
def test_fuzz_drafting_ahead_keeps_the_cache_valid(data, plans):
    """Random chains and trees, each with a block drafted ahead, and random verdicts (hits and
    misses): whenever nothing is pending, the next block drafted equals a fresh drafter's on the
    same committed tokens (greedy drafting is a function of them: a stale cache entry would show)."""
    params = SamplingParams(max_new_tokens=20)
    drafter = Drafter(ModelRunner(FUZZ_DRAFT), PROMPTS[0], params)
    i = 0
    while not drafter.finished and i < 12:
        plan = plans[i % len(plans)]
        i += 1
        block = drafter.pending
        if block is None:
            block = _propose(drafter, plan)
            again = SamplingParams(max_new_tokens=drafter.tokens_left)
            fresh = _propose(Drafter(ModelRunner(FUZZ_DRAFT), drafter.committed, again), plan)
            assert (block.tokens, block.parents) == (fresh.tokens, fresh.parents)
        ahead = _ahead(drafter, plans[i % len(plans)]) if data.draw(st.booleans()) else None
        if ahead is not None and data.draw(st.booleans()):
            assert drafter.drop_ahead() is ahead
            ahead = _ahead(drafter, plans[i % len(plans)])
        drafter.apply(_random_verdict(data, block, ahead))
        assert drafter.last_ahead_hit is (None if ahead is None else drafter.pending is ahead)
        assert drafter.runner.length <= len(drafter.committed) or drafter.pending is ahead
