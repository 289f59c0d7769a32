"""Draft token trees in the core (issue 14, first step): the tree's shape and attention mask,
the exact walk, tree forwards in the runner (logits equal to running each path alone, the
accepted path kept in the cache), and co-located tree decoding equal to the target alone for
every architecture, greedy and coupled sampling, sliding-window models past their window."""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import ARCHS, WINDOW, noisy_draft, tiny_model

from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.tree import ROOT, DraftTree, TreeShape, chain, tree_attention_mask, walk_tree

V = 64
PROMPT = list(range(3, 3 + 2 * WINDOW + 4))  # longer than the sliding window


def test_tree_shape_and_validation():
    tree = DraftTree((10, 11, 12, 13), (ROOT, ROOT, 0, 2))
    assert tree.depths == [0, 0, 1, 2]
    assert tree.children(ROOT) == [0, 1] and tree.children(0) == [2]
    assert tree.path_to(3) == [0, 2, 3]
    assert chain([5, 6, 7]).parents == (ROOT, 0, 1)
    with pytest.raises(ValueError, match=r"parents\[1\]"):
        DraftTree((1, 2), (ROOT, 1))
    with pytest.raises(ValueError, match="one entry per token"):
        DraftTree((1, 2), (ROOT,))


def test_attention_mask_sees_prefix_and_ancestors_only():
    allowed = tree_attention_mask([ROOT, ROOT, 0], prefix_len=2)
    assert allowed.tolist() == [
        [True, True, True, False, False],
        [True, True, False, True, False],
        [True, True, True, False, True],
    ]
    # window 2: node 2 (position 3) sees positions 2 and 3 only
    windowed = tree_attention_mask([ROOT, ROOT, 0], prefix_len=2, sliding_window=2)
    assert windowed[2].tolist() == [False, False, True, False, True]


def test_walk_follows_the_targets_tokens():
    tree = DraftTree((10, 11, 12, 13), (ROOT, ROOT, 1, 2))
    wanted = {0: 11, 2: 12, 3: 13, 4: 99}  # row -> the target's token there
    verdict = walk_tree(tree, lambda row, depth: wanted[row])
    assert verdict.path == (1, 2, 3) and verdict.token == 99
    assert walk_tree(tree, lambda row, depth: 7).path == ()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "mistral-sliding"])
def test_tree_forward_equals_each_path_alone_and_keeps_a_path(arch):
    model = tiny_model(arch, V, head_scale=3.0)
    runner = ModelRunner(model)
    tree = DraftTree((10, 11, 12, 13, 14), (ROOT, ROOT, 0, 2, 1))
    runner.prefill(PROMPT)
    start = runner.length
    rows = runner.extend_tree(list(tree.tokens), list(tree.parents))
    alone = ModelRunner(model)
    for i in range(len(tree)):
        path = [tree.tokens[j] for j in tree.path_to(i)]
        expected = alone.prefill(PROMPT + path)
        assert torch.allclose(rows[i], expected, atol=1e-4), (arch, i)
    runner.keep_nodes(start, tree.path_to(3))  # keep 10 -> 12 -> 13
    assert runner.length == len(PROMPT) + 3
    after = runner.extend([7])[0]
    assert torch.allclose(after, alone.prefill(PROMPT + [10, 12, 13, 7]), atol=1e-4)


CROPPABLE = [a for a in ARCHS if ModelRunner(tiny_model(a, V)).rollback_mode == "crop"]


@pytest.mark.parametrize("arch", CROPPABLE)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=30),
        SamplingParams(temperature=1.0, max_new_tokens=30, seed=2**64 - 1),
        SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=30, seed=4),
    ],
    ids=["greedy", "coupled-t1", "coupled-t0.7-topp"],
)
def test_tree_decoding_is_the_target_alone(arch, params):
    target = tiny_model(arch, V, head_scale=3.0)
    draft = noisy_draft(target, 0.3)
    t, d = ModelRunner(target), ModelRunner(draft)
    expected = generate_autoregressive(t, PROMPT, params).tokens
    for shape in (TreeShape(8, 4, 2), TreeShape(24, 6, 3)):
        result = generate(t, d, PROMPT, params, tree=shape)
        assert result.tokens == expected, (arch, shape)
        assert result.stats.accepted > 0
