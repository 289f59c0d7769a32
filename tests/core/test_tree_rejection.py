"""Rejection sampling over token trees (SpecInfer-style recursive rejection over siblings): the
emitted tokens follow the target's distribution, per depth, with negative controls that show the
tests can fail.

1. The walk alone (`rejection_walk`) on synthetic distributions over 6 tokens: a root with three
   children drawn independently from q0, each child with two children drawn from q1[x]. The
   joint of the first two emitted tokens (the second from the next round's exact draw when the
   walk emitted one token only) against p0[x1] * p1[x1][x2]: chi-square. Control: the same walk
   without the residual update (a rejected sibling's mass is not removed) is rejected.
2. End to end, co-located: `generate` with rejection-sampling trees on a tiny Llama pair, the
   joint of tokens 1-2 over many seeds against the target alone's exact marginals (top_k = 4).
   Control: the verifier's walk replaced by the broken one is rejected by the same test.
"""

from __future__ import annotations

import pytest
import torch
from support.stats import chi_square_p
from support.tiny_models import noisy_draft, tiny_model

import edgespec.core.verifier as verifier_module
from edgespec.core.generate import generate
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import categorical, logits_to_probs
from edgespec.core.tree import ROOT, DraftTree, TreeShape, TreeVerdict, rejection_walk
from edgespec.core.tree_draft import grow_tree

V = 6
TRIALS = 12_000
P_MIN = 1e-3  # a correct sampler fails this with probability 1e-3 per test
P_CONTROL = 1e-6  # the broken sampler must be rejected far more firmly


def _no_residual_walk(tree, target_probs, draft_probs, generator) -> TreeVerdict:
    """A WRONG walk: siblings are tested against p itself, never against the residual."""
    node, path = ROOT, []
    while True:
        p = target_probs[node + 1].double()
        taken = None
        for child in tree.children(node):
            x = tree.tokens[child]
            q = draft_probs[child].double()
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if u * float(q[x]) < float(p[x]):
                taken = child
                break
        if taken is None:
            return TreeVerdict(tuple(path), int(categorical(p, generator)))
        path.append(taken)
        node = taken


def _joint_counts(walk, seed: int) -> tuple[dict[int, int], torch.Tensor]:
    """Counts of (x1, x2) as x1 * V + x2 over TRIALS synthetic tree rounds, and the exact joint."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q0 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # p after token x: p1[x]
    q1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    counts: dict[int, int] = {}
    for _ in range(TRIALS):
        roots = categorical(q0.expand(3, V), g).tolist()
        tokens, parents, q_rows = list(roots), [ROOT] * 3, [q0] * 3
        for i, x in enumerate(roots):
            kids = categorical(q1[x].expand(2, V), g).tolist()
            tokens += kids
            parents += [i, i]
            q_rows += [q1[x], q1[x]]
        tree = DraftTree(tuple(tokens), tuple(parents))
        target = torch.stack([p0] + [p1[t] for t in tokens])  # row i + 1: p after node i
        verdict = walk(tree, target, torch.stack(q_rows), g)
        emitted = [tree.tokens[i] for i in verdict.path] + [verdict.token]
        if len(emitted) == 1:  # the next round draws token 2 exactly from p1[x1]
            emitted.append(int(categorical(p1[emitted[0]], g)))
        key = emitted[0] * V + emitted[1]
        counts[key] = counts.get(key, 0) + 1
    return counts, (p0[:, None] * p1).flatten()


def test_tree_rejection_walk_follows_the_target_per_depth():
    counts, joint = _joint_counts(rejection_walk, seed=0)
    assert chi_square_p(counts, joint, TRIALS) > P_MIN
    first = {x: sum(c for k, c in counts.items() if k // V == x) for x in range(V)}
    assert chi_square_p(first, joint.view(V, V).sum(1), TRIALS) > P_MIN


def test_negative_control_without_the_residual_is_rejected():
    counts, joint = _joint_counts(_no_residual_walk, seed=0)
    assert chi_square_p(counts, joint, TRIALS) < P_CONTROL


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", 48, head_scale=2.0)
    return ModelRunner(target), ModelRunner(noisy_draft(target, 0.5))


def test_sampled_trees_keep_every_draw(pair):
    """Under rejection sampling no child is selected by its own draw: every expanded node keeps
    all `width` children, each with the q it was drawn from."""
    _, draft = pair
    draft.reset()
    params = SamplingParams(temperature=1.0, sampler="rejection")
    grown = grow_tree(draft, [1, 2, 3], params, TreeShape(20, 4, 3), torch.Generator())
    tree = grown.tree
    assert grown.q is not None and grown.q.shape == (len(tree), 48)
    for node in [ROOT, *range(len(tree))]:
        assert len(tree.children(node)) in (0, 3)
    assert len(tree) <= 20


RUNS = 1500
PROMPT = [5, 9, 17]
# 3 tokens: the first round drafts a tree of depth 2, so tokens 1-2 can both come from its walk
SP = SamplingParams(temperature=1.0, top_k=4, max_new_tokens=3, sampler="rejection")


def _end_to_end_counts(pair, seeds: range) -> dict[int, int]:
    target, draft = pair
    counts: dict[int, int] = {}
    for seed in seeds:
        params = SamplingParams(**{**SP.__dict__, "seed": seed})
        out = generate(target, draft, PROMPT, params, tree=TreeShape(12, 2, 3)).tokens
        counts[out[0] * 48 + out[1]] = counts.get(out[0] * 48 + out[1], 0) + 1
    return counts


def _exact_joint(target: ModelRunner) -> torch.Tensor:
    p1 = logits_to_probs(target.prefill(PROMPT), SP)
    joint = torch.zeros(48, 48)
    for x in torch.nonzero(p1).flatten().tolist():
        joint[x] = p1[x] * logits_to_probs(target.prefill([*PROMPT, x]), SP)
    return joint.flatten()


def test_rejection_trees_end_to_end_follow_the_target(pair):
    counts = _end_to_end_counts(pair, range(RUNS))
    assert chi_square_p(counts, _exact_joint(pair[0]), RUNS) > P_MIN


def test_negative_control_end_to_end(pair, monkeypatch):
    monkeypatch.setattr(verifier_module, "rejection_walk", _no_residual_walk)
    counts = _end_to_end_counts(pair, range(RUNS))
    assert chi_square_p(counts, _exact_joint(pair[0]), RUNS) < P_CONTROL
