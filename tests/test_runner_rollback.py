"""ModelRunner rollback is exact past a sliding window, by crop and by recompute.

A rollback after the window has filled used to raise (transformers refuses to crop a sliding
layer that dropped positions); the runner now keeps full layers, or re-runs the kept tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from edgespec.core.runner import ModelRunner

WINDOW = 4

CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=WINDOW,
    ),  # fmt: skip
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
    ),  # fmt: skip
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request: pytest.FixtureRequest) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()


@pytest.mark.parametrize("mode", ["auto", "crop", "recompute"])
def test_rollback_past_the_window_is_exact(model, mode: str) -> None:
    ids = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].float()  # (24, V), one plain forward
    runner = ModelRunner(model, rollback_mode=mode)
    runner.prefill(ids[:6])
    runner.extend(ids[6:14])  # past the window
    runner.rollback(10)  # drop 4 tokens, as a rejected draft
    assert runner.length == 10
    runner.extend([5, 6, 7])  # a different continuation, then rolled back too
    runner.rollback(10)
    logits = runner.extend(ids[10:])
    torch.testing.assert_close(logits, reference[10:], atol=1e-4, rtol=1e-4)
    assert runner.length == 24


def test_rollback_mode_is_checked(model) -> None:
    with pytest.raises(ValueError, match="rollback_mode must be one of"):
        ModelRunner(model, rollback_mode="bogus")
