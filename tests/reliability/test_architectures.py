"""Every architecture, over the real gRPC path: greedy output identical to the target alone.

Eleven transformers causal-LM architectures with random weights (`support.tiny_models.ARCHS`,
sliding-window and hybrid ones among them), each as a target and a second random model of the
same architecture as its draft, sharing one tokenizer; a Verifier server on 127.0.0.1 and the
edge engine talking gRPC to it, for a fixed k, the adaptive policy and cloud-only streaming,
pipelined drafting on and off. The prompt and the generation are longer than the sliding window
(`support.tiny_models.WINDOW`), so rejected drafts are rolled back after the window has filled.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from support.servers import VerifierServerThread
from support.tiny_models import ARCHS, tiny_model, tiny_tokenizer

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent, TokensEvent

PROMPT_LEN = 20
NEW_TOKENS = 24
CASES = (("fixed", 3), ("adaptive", None), ("cloud_only", None))


async def _generate(engine: EdgeEngine, prompt: list[int], **kwargs) -> tuple[list[int], object]:
    tokens: list[int] = []
    summary = None
    async for event in engine.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS), **kwargs):
        if isinstance(event, TokensEvent):
            tokens.extend(event.tokens)
        elif isinstance(event, SummaryEvent):
            summary = event
    return tokens, summary


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical_to_target_alone(arch: str) -> None:
    tokenizer = tiny_tokenizer()
    target = tiny_model(arch, len(tokenizer), random_head=True)
    # The draft: same architecture, other weights. Acceptance is low, so nearly every round
    # rolls a rejected draft back: what the sliding-window caches could not do.
    draft = tiny_model(arch, len(tokenizer), seed=1, random_head=True)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, len(tokenizer), (PROMPT_LEN,), generator=gen).tolist()
    expected = generate_autoregressive(
        ModelRunner(target), prompt, SamplingParams(max_new_tokens=NEW_TOKENS)
    ).tokens
    # The reference itself is the model's own: Hugging Face's generate, with its own cache.
    with torch.no_grad():
        hf = target.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )
    assert hf[0, PROMPT_LEN:].tolist() == expected

    server = VerifierServerThread(VerifierEngine(target, VerifierConfig(max_block_tokens=16)))
    try:
        engine = EdgeEngine(
            draft,
            tokenizer,
            [server.address],
            link_config=LinkConfig(round_timeout_s=30.0),
            config=EngineConfig(max_retries=0, link_memory=False),
        )

        async def run_all() -> None:
            rolled_back = False
            for policy, k in CASES:
                for pipelined in (False, True):
                    tokens, summary = await _generate(
                        engine, prompt, policy=policy, k=k, pipelined=pipelined
                    )
                    assert tokens == expected, f"{arch} {policy} pipelined={pipelined}"
                    stats = summary.stats  # type: ignore[attr-defined]
                    rolled_back |= stats.drafted > stats.accepted
            assert rolled_back, "no draft was rejected: rollback untested"

        asyncio.run(run_all())
    finally:
        server.stop()
