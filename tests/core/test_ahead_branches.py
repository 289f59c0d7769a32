"""Branches drafted ahead (`Drafter.propose_ahead(k, branches=m)`): besides the main guess (the
pending chain accepted whole, then the draft's bonus), the drafter bets that the verdict rejects
the pending chain's p-th token for the draft's runner-up there, drafts a chain after each such
guess in the same tree forwards, and sends them all; the verifier applies the one whose premise
holds and answers the others STALE. Co-located Drafter/Verifier pairs on tiny random models:
the output is the target alone's (greedy, coupled), branches turn misses into hits, every block
not used is STALE, the draft cache after a branch hit is a fresh drafter's, and under rejection
sampling the committed tokens follow the target's distribution (chi-square, with a negative
control).
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

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import CostModel, speculative_rates
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.policies import RoundObservation, TreeOutcome
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock, StaleBlockError, Verdict
from edgespec.core.tree_policy import TreePolicy
from edgespec.core.verifier import Verifier


@pytest.fixture(scope="module", params=sorted(PAIRS))
def runners(request) -> tuple[ModelRunner, ModelRunner]:
    return pair_runners(request.param)


def _session(
    draft: ModelRunner, target: ModelRunner, prompt: list[int], params: SamplingParams, m: int
) -> tuple[list[int], int, int]:
    """A pipelined session of k = 4 chains with `m` branches ahead of every pending block; each
    block ahead that is not used must be STALE at the verifier. Returns the output, the hits
    and how many of them were a branch's."""
    drafter = Drafter(draft, prompt, params)
    verifier = Verifier(target, prompt, params)
    hits = branch_hits = 0
    block = drafter.propose(4)
    while not drafter.finished:
        main = drafter.propose_ahead(4, branches=m)
        ahead = [main, *drafter.branches] if main is not None else []
        seqs = [b.seq for b in ahead]  # new seqs, in the order they are sent
        assert seqs == list(range(drafter.next_seq - len(ahead), drafter.next_seq))
        assert all(seq > block.seq for seq in seqs)
        drafter.apply(verifier.verify(block))
        for b in ahead:
            if b is not drafter.pending:
                with pytest.raises(StaleBlockError):
                    verifier.verify(b)
        if drafter.last_ahead_hit:
            hits += 1
            branch_hits += drafter.pending is not main
        if drafter.finished:
            break
        block = drafter.pending if drafter.pending is not None else drafter.propose(4)
    return drafter.generated, hits, branch_hits


@pytest.mark.parametrize("params", [GREEDY, COUPLED], ids=["greedy", "coupled"])
def test_branches_give_the_target_alone_and_more_hits(runners, params):
    target, draft = runners
    hits = {}
    for m in (0, 3, 6):
        total = branch_total = 0
        for prompt in PROMPTS:
            out, h, b = _session(draft, target, prompt, params, m)
            assert out == generate_autoregressive(target, prompt, params).tokens, (m, prompt)
            total, branch_total = total + h, branch_total + b
        hits[m] = total
        assert (branch_total > 0) == (m > 0)  # branches hit, and only when drafted
    assert hits[0] < hits[3] <= hits[6]


def test_blocks_ahead_are_sent_most_committed_tokens_first(runners):
    """The order the verifier needs: once one block ahead is applied, every later one assumes a
    shorter prefix than what is committed, so it is STALE."""
    _, draft = runners
    drafter = Drafter(draft, PROMPTS[0], GREEDY)
    pending = drafter.propose(4)
    main = drafter.propose_ahead(3, branches=5)  # 4 rejected positions + the bonus's runner-up
    assert main is not None
    blocks = [main, *drafter.branches]
    assert len(blocks) == 6
    assert [b.base_len for b in blocks] == [pending.base_len + p for p in (5, 5, 4, 3, 2, 1)]
    assert blocks[0].anchor_token != blocks[1].anchor_token
    for b in blocks[2:]:  # a branch's anchor is the draft's runner-up, not the token it drafted
        p = b.base_len - pending.base_len
        assert b.anchor_token != pending.tokens[p - 1] and len(b.tokens) == 3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), m=st.integers(1, 6), k=st.integers(1, 4))
def test_fuzz_the_cache_after_branches_is_a_fresh_drafters(data, m, k):
    """Random verdicts, often the one a block ahead bets on: a block made pending by a hit has
    the tokens a fresh drafter proposes on the committed tokens (greedy drafting is a function
    of them), and whenever nothing is pending the next block drafted equals a fresh drafter's:
    a stale cache entry would show either way."""
    params = SamplingParams(max_new_tokens=20)
    drafter = Drafter(ModelRunner(FUZZ_DRAFT), PROMPTS[0], params)
    rounds = 0
    block = drafter.propose(k)
    while not drafter.finished and rounds < 10:
        rounds += 1
        main = drafter.propose_ahead(k, branches=m)
        ahead = [main, *drafter.branches] if main is not None else []
        drafter.apply(_verdict(data, block, ahead))
        if drafter.finished:
            break
        again = SamplingParams(max_new_tokens=drafter.tokens_left)
        fresh = Drafter(ModelRunner(FUZZ_DRAFT), drafter.committed, again)
        if drafter.pending is not None:
            assert drafter.pending in ahead and drafter.last_ahead_hit
            assert drafter.pending.tokens == fresh.propose(len(drafter.pending.tokens)).tokens
            block = drafter.pending
        else:
            block = drafter.propose(k)
            assert block.tokens == fresh.propose(k).tokens


FUZZ_MODEL = tiny_model("llama", V, head_scale=3.0)
FUZZ_DRAFT = noisy_draft(FUZZ_MODEL, 0.2)


def _verdict(data, block: DraftBlock, ahead: list[DraftBlock]) -> Verdict:
    """Any verdict the verifier could send for chain `block`; often the premise of a block
    ahead."""
    if ahead and data.draw(st.booleans()):
        bet = data.draw(st.sampled_from(ahead))
        accepted, token = bet.base_len - block.base_len - 1, bet.anchor_token
    else:
        accepted = data.draw(st.integers(0, len(block.tokens)))
        token = data.draw(st.integers(0, V - 1))
    assert token is not None
    return Verdict(
        seq=block.seq,
        accepted=accepted,
        token=token,
        is_bonus=accepted == len(block.tokens),
        committed_len=block.base_len + accepted + 1,
        verify_ms=0.0,
    )


# ---------------------------------------------------------------- rejection sampling


def _sampled_session(target: ModelRunner, draft: ModelRunner, seed: int) -> tuple[list[int], bool]:
    """Rejection sampling, chains of 2 drawn from q, branches ahead of the first: the output,
    and whether a branch (not the main guess) was used."""
    params = SamplingParams(**{**SAMPLED.__dict__, "seed": seed})
    drafter = Drafter(draft, SAMPLED_PROMPT, params)
    verifier = Verifier(target, SAMPLED_PROMPT, params)
    block = drafter.propose(2)
    main = drafter.propose_ahead(2, branches=2)
    assert main is not None and all(b.draft_probs is not None for b in drafter.branches)
    drafter.apply(verifier.verify(block))
    branch_hit = drafter.pending is not None and drafter.pending is not main
    while not drafter.finished:
        pending = drafter.pending if drafter.pending is not None else drafter.propose(2)
        drafter.apply(verifier.verify(pending))
    return drafter.generated, branch_hit


def test_branches_under_rejection_sampling_follow_the_target():
    """Branch chains drawn from q on their guessed prefix (q sent) commit tokens distributed as
    the target alone's: the joint of tokens 1-3 over many seeds against the exact one
    (chi-square), with branches used often. Negative control: the same counts against the
    draft's own joint are rejected, so the test can fail."""
    model = tiny_model("llama", SAMPLED_V, head_scale=2.0)
    draft_model = noisy_draft(model, 0.5)
    target, draft = ModelRunner(model), ModelRunner(draft_model)
    counts: dict[int, int] = {}
    branch_hits = 0
    for seed in range(RUNS):
        out, hit = _sampled_session(target, draft, seed)
        key = (out[0] * SAMPLED_V + out[1]) * SAMPLED_V + out[2]
        counts[key] = counts.get(key, 0) + 1
        branch_hits += hit
    assert branch_hits > RUNS // 20
    assert chi_square_p(counts, joint_of_three(target), RUNS) > 1e-3
    assert chi_square_p(counts, joint_of_three(ModelRunner(draft_model)), RUNS) < 1e-3


# ---------------------------------------------------------------- the controller's model


def test_hit_probability_counts_the_branches_that_come_true():
    """h(k) with branches against a simulation of the events it sums: the main guess (all k
    accepted, the bonus guessed), and a branch at p <= m (positions before p accepted, p
    rejected, the target's token the runner-up; p = k + 1: the bonus missed)."""
    accept, r = [0.8, 0.7, 0.6, 0.5, 0.9], 0.7
    gen = torch.Generator().manual_seed(0)
    trials = 40_000
    u = torch.rand(trials, 6, generator=gen)
    up = torch.rand(trials, generator=gen) < r
    for k in (1, 2, 4):
        rejected_at = torch.full((trials,), k + 1)  # position of the first miss (k+1: bonus)
        ok = torch.ones(trials, dtype=torch.bool)
        for p in range(k + 1, 0, -1):
            miss = u[:, p - 1] >= accept[p - 1]
            rejected_at = torch.where(miss, torch.full_like(rejected_at, p), rejected_at)
        ok = u[:, : k + 1].lt(torch.tensor(accept[: k + 1])).all(dim=1)
        for m in range(0, k + 3):
            cost = CostModel(1.0, 20.0, 30.0, 0.2, pipelined=True, ahead_branches=m, runner_up=r)
            simulated = (ok | ((rejected_at <= m) & up)).float().mean().item()
            assert cost.hit_probability(accept, k) == pytest.approx(simulated, abs=0.01), (k, m)
            rates = speculative_rates(cost, accept, 1, 4)
            assert rates[k - 1] == pytest.approx(cost.speculative_rate(accept, k))


def test_the_policy_learns_the_runner_up_rate_and_prices_branches():
    """Rounds that rejected a token tell the adaptive policy how often the runner-up was the
    target's token; with branches ahead its pipelined rounds are priced with those hits."""
    rounds = [
        RoundObservation(4, 1, 24.0, 31.0, 22.0, 5.0, runner_up=i % 4 != 0) for i in range(40)
    ]
    rates = {}
    for m in (0, 3):
        policy = AdaptivePolicy(AdaptiveConfig(pipelined=True, ahead_branches=m))
        for obs in rounds:
            policy.observe(obs)
        cost = policy._cost()
        assert cost is not None and cost.ahead_branches == m
        assert cost.runner_up == pytest.approx(0.75, abs=0.05)
        rates[m] = cost.speculative_rate([0.6] * 8, 4)
    assert rates[3] > rates[0]


def _after_walks_of_one_hit_in_two(policy: AdaptivePolicy) -> AdaptivePolicy:
    """`policy` after 60 tree rounds whose walks take rank 1, then rank 0, then none."""
    walk = TreeOutcome(
        levels=3, depth=3, steps=((2, 1), (2, 0), (2, -1)), spine=3, spine_accepted=0
    )
    for _ in range(60):
        policy.observe(RoundObservation(6, 2, 24.0, 31.0, 22.0, 5.0, tree=walk))
    return policy


def test_tree_walks_teach_the_runner_up_rate():
    """A session that runs trees learns how often the draft's runner-up is the target's token
    from its walks (a step that left a node's draft-best child for its second is a hit, for
    another or none a miss, the best child says nothing), so that its chains' branches are
    priced right when it weighs them against trees. Each round here: rank 1, then rank 0, then
    none: one hit in two. The next session starts cautious again (none counted on)."""
    config = AdaptiveConfig(pipelined=True, ahead_branches=3)
    policy = _after_walks_of_one_hit_in_two(AdaptivePolicy(config))
    cost = policy._cost()
    assert cost is not None and cost.runner_up == pytest.approx(0.5, abs=0.05)
    assert AdaptivePolicy(config, policy.memory())._runner_up == [0.0, 2.0]


def test_the_tree_policy_carries_the_runner_up_rate_to_the_next_session():
    """The tree policy's next session on the link starts from the runner-up rate its walks
    measured (its chains' branches are priced with it from the first decision); the chain
    policy, given the same memory, still starts counting on no branch."""
    config = AdaptiveConfig(pipelined=True, ahead_branches=3)
    policy = _after_walks_of_one_hit_in_two(TreePolicy(config))
    memory = policy.memory()
    assert memory.runner_up is not None
    assert memory.runner_up[0] / memory.runner_up[1] == pytest.approx(0.5, abs=0.05)
    warm = TreePolicy(config, memory)
    cost = warm._cost()
    assert cost is not None and cost.runner_up == pytest.approx(0.5, abs=0.05)
    assert AdaptivePolicy(config, memory)._runner_up == [0.0, 2.0]
    assert AdaptivePolicy(config, policy.memory()).memory().runner_up is None


@pytest.mark.parametrize("sampler", ["greedy", "coupled", "rejection"])
def test_a_levels_picks_are_each_rows_own(sampler) -> None:
    """A level's picks (token and runner-up per row), taken for all rows at once where no row
    is drawn, are what `_choose` gives each row alone, ties included (a row of equal logits, a
    row whose top two tie); coupled rows keep their own scores, and rows drawn for rejection
    sampling their per-row draws (each with its q)."""
    params = GREEDY
    if sampler != "greedy":
        params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=3, sampler=sampler)
    drafter = Drafter(ModelRunner(FUZZ_DRAFT), PROMPTS[0], params)
    rows = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    rows[1] = 0.5  # every logit tied
    rows[2, 7] = rows[2, 30] = rows[2].max() + 1  # the top two tied
    positions = list(range(8, 14))
    for draw in (False, True):
        picks = drafter._picks(rows, positions, draw=draw)
        if draw and sampler == "rejection":
            assert all(q is not None for _, _, q in picks)
            continue
        alone = [drafter._choose(row, p, draw) for row, p in zip(rows, positions, strict=True)]
        assert picks == [(int(t), int(r), None) for t, r, _ in alone]
