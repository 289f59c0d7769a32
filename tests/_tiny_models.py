"""Tiny random-init GPT-2 and Llama models for the core tests (no hub access, CPU, float32)."""

from __future__ import annotations

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

FAMILIES = ("gpt2", "llama")


def tiny_model(
    family: str,
    seed: int,
    vocab_size: int = 160,
    max_positions: int = 128,
    init_range: float | None = None,
):
    """A 2-layer random model in eval mode. No bos/eos ids, so HF generate never stops on its
    own. GPT-2 defaults to a wide init (0.3): at HF's 0.02 it emits one token forever; Llama
    defaults to HF's 0.02. A wider init gives more peaked next-token distributions."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=max_positions,
            initializer_range=0.3 if init_range is None else init_range,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            initializer_range=0.02 if init_range is None else init_range,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return model.eval()


def perturbed(model, rel_noise: float, seed: int):
    """A copy of `model` with Gaussian noise of `rel_noise` x each weight tensor's std added:
    a draft that agrees with the target most of the time (high acceptance)."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * (rel_noise * float(p.std())))
    return draft


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
