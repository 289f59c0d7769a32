"""Every architecture, over the real gRPC path: greedy output identical to the target alone.

Eleven transformers causal-LM architectures with random weights (sliding-window and hybrid
ones among them), each as a target and a second random model of the same architecture as its
draft, sharing one tokenizer; a
Verifier server on 127.0.0.1 and the edge engine talking gRPC to it, for a fixed k, the adaptive
policy and cloud-only streaming, pipelined drafting on and off. The prompt and the generation are
longer than the sliding window, so rejected drafts are rolled back after the window has filled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch
import transformers
from conftest import VerifierServerThread, build_tiny_tokenizer

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent, TokensEvent

WINDOW = 8  # sliding window of the windowed architectures: far shorter than prompt + output
PROMPT_LEN = 20
NEW_TOKENS = 24

_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def _configs(vocab: int) -> dict[str, Callable[[], transformers.PretrainedConfig]]:
    """Architecture name -> a config factory (vocabulary `vocab`, 2 layers, width 32)."""
    small = {**_SMALL, "vocab_size": vocab}
    return {
        "llama": lambda: transformers.LlamaConfig(**small),
        "qwen2-sliding": lambda: transformers.Qwen2Config(
            **small, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0
        ),
        "qwen3": lambda: transformers.Qwen3Config(**small, head_dim=16),
        "mistral-sliding": lambda: transformers.MistralConfig(**small, sliding_window=WINDOW),
        "gemma2": lambda: transformers.Gemma2Config(**small, head_dim=16, sliding_window=WINDOW),
        "gemma3-hybrid": lambda: transformers.Gemma3TextConfig(
            **small, head_dim=16, sliding_window=WINDOW
        ),
        "phi3-sliding": lambda: transformers.Phi3Config(**small, sliding_window=WINDOW),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=256,
            bos_token_id=None,
            eos_token_id=None,
        ),  # fmt: skip
        "gpt-neox": lambda: transformers.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        ),  # fmt: skip
        "olmo2": lambda: transformers.Olmo2Config(**small),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        ),  # fmt: skip
    }


ARCHS = tuple(_configs(300))
CASES = (("fixed", 3), ("adaptive", None), ("cloud_only", None))


def _build(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        # A unit-variance output layer of its own: next-token distributions as peaked as a
        # trained model's. Untied from the input embeddings (GPT-2 and OPT tie them whatever the
        # config says), whose large rows would otherwise make a model repeat one token forever.
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.randn(head.weight.shape))
    return model.eval()


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
    tokenizer = build_tiny_tokenizer()
    target = _build(_configs(len(tokenizer))[arch]())
    # The draft: same architecture, other weights. Acceptance is low, so nearly every round
    # rolls a rejected draft back: what the sliding-window caches could not do.
    draft = _build(_configs(len(tokenizer))[arch](), seed=1)
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
