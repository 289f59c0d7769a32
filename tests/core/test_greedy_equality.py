"""Greedy speculative decoding reproduces HF `generate(do_sample=False)` token for token.

Tiny random GPT-2 and Llama targets, three drafts each: an unrelated random model (acceptance
near 0: every round is a rejection), a noisy copy of the target (mixed: multi-token acceptance
and rejections), and the target itself (acceptance 1: every round ends with a bonus token).
"""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import FAMILIES, PEAKED_INIT, hf_greedy, noisy_draft, tiny_model

from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner

N_NEW = 21  # not a multiple of k+1 for most k: the limit falls inside a round's natural block
PROMPT_LENS = (1, 7, 30)
KS = range(1, 9)
NOISE = {"gpt2": 0.03, "llama": 0.07}  # relative weight noise giving a mixed acceptance rate


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    init = PEAKED_INIT.get(name)
    target = tiny_model(name, 160, seed=0, max_positions=128, init_range=init)
    drafts = {
        "random": ModelRunner(tiny_model(name, 160, seed=1, max_positions=128, init_range=init)),
        "noisy": ModelRunner(noisy_draft(target, NOISE[name], seed=2, noise_on_constants=False)),
        "same": ModelRunner(target),
    }
    gen = torch.Generator().manual_seed(3)
    prompts = {n: torch.randint(0, 160, (n,), generator=gen).tolist() for n in PROMPT_LENS}
    refs = {n: hf_greedy(target, prompts[n], N_NEW) for n in PROMPT_LENS}
    return {
        "name": name,
        "model": target,
        "target": ModelRunner(target),
        "drafts": drafts,
        "prompts": prompts,
        "refs": refs,
    }


def test_autoregressive_matches_hf(family):
    for n in PROMPT_LENS:
        result = generate_autoregressive(
            family["target"], family["prompts"][n], SamplingParams(max_new_tokens=N_NEW)
        )
        assert result.tokens == family["refs"][n]
        assert result.finish_reason == "length"
        assert result.stats.target_forwards == N_NEW  # prefill + one forward per later token


# The unrelated random draft rejects nearly every round: ~5x the time of the others.
@pytest.mark.parametrize(
    "draft_kind", [pytest.param("random", marks=pytest.mark.slow), "noisy", "same"]
)
@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_speculative_matches_hf(family, draft_kind, prompt_len):
    target, draft = family["target"], family["drafts"][draft_kind]
    prompt, ref = family["prompts"][prompt_len], family["refs"][prompt_len]
    params = SamplingParams(max_new_tokens=N_NEW)
    for k in KS:
        result = generate(target, draft, prompt, params, k)
        assert result.tokens == ref, f"k={k}"
        assert result.finish_reason == "length"
        stats = result.stats
        # Each round commits accepted + 1 tokens and nothing is wasted at the end.
        assert stats.accepted + stats.rounds == N_NEW
        assert max(stats.drafted_per_position, default=0) <= stats.rounds
        if draft_kind == "same":
            assert stats.acceptance_rate == 1.0
            # Full blocks of k+1 tokens, the last one shortened to land exactly on N_NEW.
            assert stats.rounds == -(-N_NEW // (k + 1))
        if draft_kind == "random":
            assert stats.acceptance_rate < 0.3


def test_noisy_draft_exercises_multi_token_acceptance(family):
    """The noisy draft gives partial acceptance: some rounds accept several tokens, some reject."""
    target, draft = family["target"], family["drafts"]["noisy"]
    prompt = family["prompts"][7]
    result = generate(target, draft, prompt, SamplingParams(max_new_tokens=N_NEW), k=4)
    stats = result.stats
    assert 0.2 < stats.acceptance_rate < 1.0
    assert stats.accepted_per_position[1] > 0  # two or more draft tokens accepted in a round
    assert stats.accepted < stats.drafted  # and some rejections


@pytest.mark.parametrize("draft_kind", ["random", "noisy", "same"])
def test_stop_token_mid_sequence(family, draft_kind):
    """A stop token the target really emits ends generation right after it, as in HF generate,
    also when it lands among accepted draft tokens (the round's extra tokens are dropped)."""
    prompt, ref = family["prompts"][7], family["refs"][7]
    # First token whose first occurrence is in the middle of the greedy output.
    index = next(i for i in range(5, N_NEW - 3) if ref[i] not in ref[:i])
    stop = ref[index]
    expected = hf_greedy(family["model"], prompt, N_NEW, stop=stop)
    assert expected == ref[: index + 1]
    params = SamplingParams(max_new_tokens=N_NEW, stop_token_ids=(stop,))
    auto = generate_autoregressive(family["target"], prompt, params)
    assert auto.tokens == expected and auto.finish_reason == "stop"
    for k in KS:
        result = generate(family["target"], family["drafts"][draft_kind], prompt, params, k)
        assert result.tokens == expected, f"k={k}"
        assert result.finish_reason == "stop"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_short_limits(family, max_new_tokens):
    """Limits smaller than a block: the draft drafts at most tokens_left - 1 tokens."""
    prompt, ref = family["prompts"][7], family["refs"][7]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for k in (1, 4, 8):
        result = generate(family["target"], family["drafts"]["same"], prompt, params, k)
        assert result.tokens == ref[:max_new_tokens]
        assert result.finish_reason == "length"
        assert result.stats.drafted <= max_new_tokens - 1


def test_k_zero_is_target_alone(family):
    prompt, ref = family["prompts"][7], family["refs"][7]
    result = generate(
        family["target"], family["drafts"]["noisy"], prompt, SamplingParams(max_new_tokens=N_NEW), 0
    )
    assert result.tokens == ref
    assert result.stats.drafted == 0
    assert result.stats.draft_forwards <= 1  # the draft's prompt prefill only
    assert result.stats.rounds == N_NEW
