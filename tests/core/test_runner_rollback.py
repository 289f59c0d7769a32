"""ModelRunner rollback is exact past a sliding window, by crop and by recompute.

A rollback after the window has filled used to raise (transformers refuses to crop a sliding
layer that dropped positions); the runner now keeps full layers, or re-runs the kept tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from support.tiny_models import tiny_model

from edgespec.core.runner import ModelRunner

WINDOW = 4
VOCAB = 64
# Fixture id -> (architecture, overrides): Gemma 2 as its config defaults it (tied embeddings,
# padding row 0), both with a 4-token sliding window.
MODELS = {
    "gemma2": ("gemma2", {"tie_word_embeddings": True, "pad_token_id": 0}),
    "mistral": ("mistral-sliding", {}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> transformers.PreTrainedModel:
    arch, overrides = MODELS[request.param]
    return tiny_model(arch, VOCAB, seed=0, sliding_window=WINDOW, **overrides)


@pytest.mark.parametrize("mode", ["auto", "crop", "recompute"])
def test_rollback_past_the_window_is_exact(model, mode: str) -> None:
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1)).tolist()
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
