"""`experiments.depth_acceptance`: counts per depth from runs of matches, and the shortcut it
rests on (one teacher-forced draft forward) against drafting every block for real, on tiny
random Llamas."""

from __future__ import annotations

from support.tiny_models import noisy_draft, tiny_llama

from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from experiments.depth_acceptance import depth_counts, greedy_matches


def test_depth_counts_by_hand() -> None:
    matches = [True, True, False, True, False, True]
    # blocks of depth 2 start at 0..4: TT, TF, FT, TF, FT
    assert depth_counts(matches, 2) == ([5, 3], [3, 1])
    assert depth_counts([True] * 4, 3) == ([2, 2, 2], [2, 2, 2])
    assert depth_counts([False] * 4, 3) == ([2, 0, 0], [0, 0, 0])


def _pair() -> tuple[ModelRunner, ModelRunner]:
    """The tests' tiny Llama and a draft noisy enough to agree with it often, not always."""
    target = tiny_llama(32)
    return ModelRunner(target, "cpu"), ModelRunner(noisy_draft(target, 0.3), "cpu")


def test_matches_decide_what_drafted_blocks_accept() -> None:
    target, draft = _pair()
    prompt, new, depth = [3, 7, 1, 9], 24, 4
    matches = greedy_matches(target, draft, prompt, new)
    assert 0 < sum(matches) < len(matches)  # the check below means something
    text = (
        prompt + generate_autoregressive(target, prompt, SamplingParams(max_new_tokens=new)).tokens
    )
    reached, accepted = [0] * depth, [0] * depth
    for start in range(new - depth + 1):  # draft each block for real from the target's prefix
        at = len(prompt) + start
        block = generate_autoregressive(
            draft, text[:at], SamplingParams(max_new_tokens=depth)
        ).tokens
        for i in range(depth):
            reached[i] += 1
            if block[i] != text[at + i]:
                break
            accepted[i] += 1
    assert depth_counts(matches, depth) == (reached, accepted)
