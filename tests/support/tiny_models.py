"""The one builder of tiny random models and tokenizers for the tests (no hub access, CPU, float32).

`tiny_model(arch, vocab_size, seed)` builds any of `ARCHS` (eleven transformers causal-LM
architectures, sliding-window and hybrid ones among them) at width 32, 2 layers, in eval mode,
deterministic in `seed` and leaving the global RNG as it was. Tests that need another shape pass
config fields as keyword overrides; the output layer can be scaled (`head_scale`) or replaced by
a unit-variance one of its own (`random_head`). `noisy_draft` makes a draft from a target,
`tiny_tokenizer` a byte-level BPE tokenizer, `hf_greedy` the Hugging Face reference output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers

TINY_VOCAB_SIZE = 300  # byte-level BPE: 256 byte tokens + 3 specials + merges
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|bos|>")
TINY_MAX_POSITIONS = 512  # the tiny pair's context
# The tiny pair's output layer is scaled by this: next-token distributions as peaked as a
# trained model's (top token ~0.3), so sampling has a clear shape.
HEAD_SCALE = 30.0
WINDOW = 8  # sliding window of the windowed architectures
# Draft = target + Gaussian noise of this std relative to each weight tensor's own spread:
# greedy acceptance ~0.8-1.0 and sampling acceptance ~0.7-0.95 on short random prompts.
DRAFT_NOISE_REL = 0.03
# The core tests' families; a random GPT-2 at HF's init (0.02) emits one token forever, so they
# build it with a wide init (PEAKED_INIT). A wider init gives more peaked next-token distributions.
FAMILIES = ("gpt2", "llama")
PEAKED_INIT = {"gpt2": 0.3}

_CORPUS = (
    "The edge drafts a few tokens and the cloud verifies them in one forward pass.",
    "Speculative decoding keeps the output of the target model exactly.",
    "A draft token is accepted with probability min(1, p / q); otherwise it is rejected.",
    "def verify(block):\n    return accepted, token\n",
    "for i in range(10):\n    print(i * i)\n",
    "Round trip time decides how many tokens are worth drafting per round.",
    "the quick brown fox jumps over the lazy dog 0123456789",
)

_NO_SPECIAL_IDS: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
_SMALL: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
    **_NO_SPECIAL_IDS,
)


def _small(**kw: Any) -> dict[str, Any]:
    return {**_SMALL, **kw}


# arch -> (config class, its fields at tiny size, the name of its max-positions field)
_ARCH_CONFIGS: dict[str, tuple[Callable[..., transformers.PretrainedConfig], dict[str, Any], str]]
_ARCH_CONFIGS = {
    "llama": (transformers.LlamaConfig, _small(), "max_position_embeddings"),
    "qwen2-sliding": (
        transformers.Qwen2Config,
        _small(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
        "max_position_embeddings",
    ),
    "qwen3": (transformers.Qwen3Config, _small(head_dim=16), "max_position_embeddings"),
    "mistral-sliding": (
        transformers.MistralConfig,
        _small(sliding_window=WINDOW),
        "max_position_embeddings",
    ),
    "gemma2": (
        transformers.Gemma2Config,
        _small(head_dim=16, sliding_window=WINDOW),
        "max_position_embeddings",
    ),
    "gemma3-hybrid": (
        transformers.Gemma3TextConfig,
        _small(head_dim=16, sliding_window=WINDOW),
        "max_position_embeddings",
    ),
    "phi3-sliding": (
        transformers.Phi3Config,
        _small(sliding_window=WINDOW),
        "max_position_embeddings",
    ),
    "gpt2": (
        transformers.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None),
        "n_positions",
    ),
    "gpt-neox": (
        transformers.GPTNeoXConfig,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        ),
        "max_position_embeddings",
    ),
    "olmo2": (transformers.Olmo2Config, _small(), "max_position_embeddings"),
    "opt": (
        transformers.OPTConfig,
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            **_NO_SPECIAL_IDS,
        ),
        "max_position_embeddings",
    ),
}
ARCHS = tuple(_ARCH_CONFIGS)


class TinyPair(NamedTuple):
    """Checkpoint folders of a target and its draft; unpacks as (target_dir, draft_dir)."""

    target_dir: Path
    draft_dir: Path


def tiny_llama(vocab_size: int, seed: int = 0, eos_token_id: int | None = None):
    """The tiny pair's target architecture: a 2-layer Llama of width 64 (4 heads, 2 KV heads,
    TINY_MAX_POSITIONS positions), its output layer scaled by HEAD_SCALE."""
    return tiny_model(
        "llama",
        vocab_size,
        seed,
        max_positions=TINY_MAX_POSITIONS,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=eos_token_id,
        head_scale=HEAD_SCALE,
    )


def tiny_pair_models():
    """(tokenizer, target, draft) of the `tiny_pair` fixture: `tiny_llama` over `tiny_tokenizer`
    (eos = the tokenizer's) and its `noisy_draft`."""
    tokenizer = tiny_tokenizer()
    target = tiny_llama(len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id)
    return tokenizer, target, noisy_draft(target)


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    max_positions: int = 256,
    init_range: float | None = None,
    **overrides: Any,
) -> transformers.PretrainedConfig:
    """The config of `tiny_model` (same arguments): `init_range` None keeps the config's own
    initializer range; `overrides` are config fields (e.g. hidden_size=64, eos_token_id=2)."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    cls, fields, positions_field = _ARCH_CONFIGS[arch]
    kwargs = {**fields, "vocab_size": vocab_size, positions_field: max_positions, **overrides}
    if init_range is not None:
        kwargs["initializer_range"] = init_range
    return cls(**kwargs)


def tiny_model(
    arch: str,
    vocab_size: int,
    seed: int = 0,
    *,
    max_positions: int = 256,
    init_range: float | None = None,
    head_scale: float | None = None,
    random_head: bool = False,
    **overrides: Any,
) -> transformers.PreTrainedModel:
    """A random-init `arch` model (2 layers, width 32 unless overridden) in eval mode,
    deterministic in `seed`; the global RNG is left as it was.

    No bos/eos/pad ids unless overridden, so HF generate never stops on its own. The output layer
    as initialised, or scaled by `head_scale` (a random model's next-token distributions are
    nearly uniform; scaling makes them peaked like a trained model's), or with `random_head` a
    unit-variance output layer of its own, untied from the input embeddings (GPT-2 and OPT tie
    them whatever the config says; their large rows would make a model repeat one token forever).
    """
    config = tiny_config(
        arch, vocab_size, max_positions=max_positions, init_range=init_range, **overrides
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        if random_head:
            head.weight = torch.nn.Parameter(torch.randn(head.weight.shape))
        if head_scale is not None:
            head.weight.mul_(head_scale)
    return model.eval()


def noisy_draft(
    target: torch.nn.Module,
    noise_rel: float = DRAFT_NOISE_REL,
    seed: int = 1,
    *,
    noise_on_constants: bool = True,
) -> torch.nn.Module:
    """A copy of `target` with Gaussian noise of std `noise_rel` times each weight tensor's std
    added (one seeded generator, tensors in parameter order): a draft that agrees with the target
    most of the time. Constant tensors (norm weights, single values) get noise of `noise_rel`
    times their mean magnitude, or with `noise_on_constants=False` none."""
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if noise_on_constants:
                spread = p.std() if p.numel() > 1 and float(p.std()) > 0 else p.abs().mean()
                p.add_(torch.randn(p.shape, generator=gen) * (noise_rel * spread))
            elif p.numel() > 1:  # a constant tensor still draws: later tensors' noise is fixed
                p.add_(torch.randn(p.shape, generator=gen) * (noise_rel * float(p.std())))
    return draft.eval()


def tiny_tokenizer(corpus: tuple[str, ...] = _CORPUS) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE `PreTrainedTokenizerFast` of TINY_VOCAB_SIZE tokens trained on `corpus`
    (any text encodes; a different corpus gives different merges and ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        bos_token=SPECIAL_TOKENS[2],
    )


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop: int | None = None) -> list[int]:
    """The reference: HF generate(do_sample=False), prompt stripped, eos = `stop` if given."""
    input_ids = torch.tensor([prompt])
    kwargs = {}
    if stop is not None:
        kwargs = {"eos_token_id": stop, "pad_token_id": stop}
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()
