"""What the pipelining tests share: tiny target/draft pairs whose guesses both hit and miss,
their prompts and sampling params, and the exact joint distribution of a model's first sampled
tokens (the reference of the rejection-sampling chi-square tests)."""

from __future__ import annotations

import torch
from support.tiny_models import noisy_draft, tiny_model

from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs

V = 64
PROMPTS = ([7, 20, 13, 42, 9, 50, 3], [5, 6, 7], [25, 17, 5, 8, 1])
GREEDY = SamplingParams(max_new_tokens=24)
COUPLED = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7)

# (architecture, its options, the draft's noise): pairs whose guesses both hit and miss
PAIRS = {"llama": ({}, 0.2), "gpt2": ({"random_head": True}, 0.1)}

# rejection sampling: three tokens of a small vocabulary, over many seeds
SAMPLED = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=4, sampler="rejection")
SAMPLED_PROMPT = [5, 9, 17]
RUNS = 1200
SAMPLED_V = 24


def pair_runners(name: str) -> tuple[ModelRunner, ModelRunner]:
    """(target, draft) runners of the pair `name` of PAIRS."""
    options, noise = PAIRS[name]
    target = tiny_model(name, V, head_scale=3.0, **options)
    return ModelRunner(target), ModelRunner(noisy_draft(target, noise))


def joint_of_three(runner: ModelRunner) -> torch.Tensor:
    """The exact joint distribution of the model's first 3 tokens after SAMPLED_PROMPT under
    SAMPLED (flattened: index (x * SAMPLED_V + y) * SAMPLED_V + z)."""
    exact = torch.zeros(SAMPLED_V**3)
    p1 = logits_to_probs(runner.prefill(SAMPLED_PROMPT), SAMPLED)
    for x in torch.nonzero(p1).flatten().tolist():
        p2 = logits_to_probs(runner.prefill([*SAMPLED_PROMPT, x]), SAMPLED)
        for y in torch.nonzero(p2).flatten().tolist():
            p3 = logits_to_probs(runner.prefill([*SAMPLED_PROMPT, x, y]), SAMPLED)
            lo = (x * SAMPLED_V + y) * SAMPLED_V
            exact[lo : lo + SAMPLED_V] = p1[x] * p2[y] * p3
    return exact
