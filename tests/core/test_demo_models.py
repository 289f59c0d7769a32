"""The shipped demo pair loads offline, is what its model card says, and its draft still agrees
with its target: acceptance on a fixed prompt set stays above the published floors
(core/demo_models/MODEL_CARD.md)."""

from __future__ import annotations

import pytest
import torch

from edgespec.core.demo_pair import DEFAULT_DRAFT, DEFAULT_TARGET
from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.models import check_pair, load_tokenizer, model_info
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner

# Published floors (MODEL_CARD.md): the bars. The measured values sit well above them.
ALPHA_GREEDY_FLOOR = 0.6
ALPHA_T1_FLOOR = 0.5

# Fixed prompts: Python of the kind the pair was trained on, written for this test.
PROMPTS = (
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "    for key, value in sorted(mapping.items()):\n        if ",
    'def read_lines(path):\n    """Return the lines of the file at path."""\n',
)
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def pair(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    tokenizer = load_tokenizer(DEFAULT_TARGET)
    target = ModelRunner.from_pretrained(DEFAULT_TARGET)
    draft = ModelRunner.from_pretrained(DEFAULT_DRAFT)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return tokenizer, target, draft, prompts


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_shipped_pair_config_matches_the_card() -> None:
    check_pair(DEFAULT_TARGET, DEFAULT_DRAFT)
    target, draft = model_info(DEFAULT_TARGET), model_info(DEFAULT_DRAFT)
    assert target.model_type == draft.model_type == "llama"
    assert target.vocab_size == draft.vocab_size == 4096
    assert draft.num_parameters * 8 <= target.num_parameters  # draft <= 1/8 of the target
    # Shipped in float16: the whole pair stays under the 40 MB budget.
    size = sum(f.stat().st_size for d in (DEFAULT_TARGET, DEFAULT_DRAFT) for f in d.iterdir())
    assert size < 40e6


@pytest.mark.slow
def test_greedy_acceptance_above_floor_and_output_exact(pair) -> None:
    """k=1 greedy rounds: accepted/drafted estimates alpha directly (one Bernoulli per round)."""
    _, target, draft, prompts = pair
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    drafted = accepted = 0
    for ids in prompts:
        spec = generate(target, draft, ids, params, k=1)
        alone = generate_autoregressive(target, ids, params)
        assert spec.tokens == alone.tokens
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
    assert accepted / drafted >= ALPHA_GREEDY_FLOOR, accepted / drafted


@pytest.mark.slow
@torch.inference_mode()
def test_sampling_acceptance_above_floor(pair) -> None:
    """alpha at temperature 1 = mean over positions of sum_x min(p(x), q(x)), on continuations
    the target itself samples (what speculative sampling meets)."""
    _, target, draft, prompts = pair
    overlaps = []
    for i, ids in enumerate(prompts):
        params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=100 + i)
        continuation = generate_autoregressive(target, ids, params).tokens
        seq = torch.tensor([ids + continuation])  # (1, L)
        start = len(ids) - 1  # logits at start.. predict the generated tokens
        p = torch.softmax(target.model(seq).logits[0, start:-1].float(), -1)  # (N, V)
        q = torch.softmax(draft.model(seq).logits[0, start:-1].float(), -1)  # (N, V)
        overlaps.append(torch.minimum(p, q).sum(-1))
    alpha = torch.cat(overlaps).mean().item()
    assert alpha >= ALPHA_T1_FLOOR, alpha
