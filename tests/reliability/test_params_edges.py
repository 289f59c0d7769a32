"""Sampling parameters at the edges of their ranges (issue 11, defects 4 and 6).

Defect 4: a temperature or top_p above 0 but below float32's smallest positive value (1e-300,
5e-324) is defined, never a crash: such a temperature is greedy, such a top_p keeps the top token
only; checked on the core sampling function and on generations through the Edge service.
Defect 6: `seed` takes the whole uint64 range of the wire; `stop_token_ids` outside the draft's
vocabulary are refused by the edge with INVALID_ARGUMENT naming the field and the range.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from support.reliability_stack import DEADLINE_S, Stack

from edgespec import Client, InvalidArgument
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample
from edgespec.core.session import derive_seed

TINY = (1e-300, 5e-324, 1e-46)  # > 0, below float32's smallest positive value (~1.4e-45)
PROMPT = [250, 17, 5, 88, 7, 200, 13, 42, 99, 150, 3, 60]


@pytest.fixture(scope="module")
def models(tiny_pair):
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu")
    draft = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return target, draft, load_tokenizer(tiny_pair.draft_dir)


@pytest.fixture(scope="module")
def stack(models) -> Iterator[Stack]:
    target, draft, tokenizer = models
    stack = Stack(target.model, draft, tokenizer)
    yield stack
    stack.stop()


# ---------------------------------------------------------------- core


@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperature_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.is_greedy and params.temperature == 0.0
    logits = torch.tensor([[0.5, 3.0, 3.0, -1.0], [1.0, -2.0, 0.0, 0.9]])
    probs = logits_to_probs(logits, params)
    assert torch.equal(probs, logits_to_probs(logits, SamplingParams()))
    assert sample(probs, make_generator(0)).tolist() == [1, 0]


@pytest.mark.parametrize("top_p", TINY)
def test_tiny_top_p_keeps_the_top_token(top_p):
    params = SamplingParams(temperature=1.0, top_p=top_p)
    logits = torch.tensor([[0.5, 3.0, 2.0, -1.0], [1.0, -2.0, 0.0, 0.9]])
    probs = logits_to_probs(logits, params)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert sample(probs, make_generator(1)).tolist() == [1, 0]


def test_smallest_float32_temperature_still_samples_from_the_argmax():
    """2**-149 is float32's smallest positive value: defined (not greedy), and as sharp."""
    params = SamplingParams(temperature=2.0**-149)
    assert not params.is_greedy
    probs = logits_to_probs(torch.tensor([[0.5, 3.0, 2.0, -1.0]]), params)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**63, 2**64 - 1])
def test_seed_takes_the_whole_uint64_range(seed):
    params = SamplingParams(temperature=1.0, seed=seed)
    assert params.seed == seed
    a = torch.rand(3, generator=make_generator(seed))
    assert torch.equal(a, torch.rand(3, generator=make_generator(seed)))  # deterministic
    assert 0 <= derive_seed(seed, "draft") < 2**64


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_seed_outside_uint64_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 18446744073709551615\]"):
        SamplingParams(seed=seed)
    with pytest.raises(ValueError, match="seed"):
        make_generator(seed)


# ---------------------------------------------------------------- through the Edge service


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": t} for t in TINY[:2]]
    + [{"temperature": 1.0, "top_p": p, "seed": 3} for p in TINY[:2]]
    + [{"temperature": 0.8, "seed": 2**64 - 1}, {"temperature": 0.8, "seed": 2**63}],
)
def test_edge_generates_with_extreme_params(stack, models, kwargs):
    """No UNKNOWN / INTERNAL: the generation completes; a tiny temperature or top_p (with any
    temperature) gives the target's greedy output."""
    target = models[0]
    params = SamplingParams(max_new_tokens=12, **kwargs)
    with Client(stack.edge.address, timeout=DEADLINE_S) as client:
        result = client.generate(PROMPT, params, policy="fixed", draft_tokens=3)
    assert len(result.token_ids) == 12
    if params.is_greedy or params.top_p < 1e-45:
        greedy = generate_autoregressive(target, PROMPT, SamplingParams(max_new_tokens=12))
        assert list(result.token_ids) == greedy.tokens
    assert stack.drained()


@pytest.mark.parametrize("stop", [[300], [5, 100_000]])
def test_edge_refuses_stop_token_ids_outside_the_vocabulary(stack, stop):
    params = SamplingParams(max_new_tokens=4, stop_token_ids=tuple(stop))
    with Client(stack.edge.address, timeout=DEADLINE_S) as client:
        with pytest.raises(InvalidArgument) as info:
            client.generate(PROMPT, params)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.field == "params.stop_token_ids"
        assert "[0, 300)" in info.value.details
        # still serving
        assert len(client.generate(PROMPT, SamplingParams(max_new_tokens=3)).token_ids) == 3
