"""The verifier's KV budget in tokens, from bytes of cache or from the device's free memory.

`VerifierConfig` takes the budget as tokens (`kv_budget_tokens`), as bytes of KV cache
(`kv_budget_bytes`), or as a fraction of the memory free once the model is loaded
(`kv_memory_fraction`: on a GPU what the weights left, `torch.cuda.mem_get_info`; on a CPU the
host's available memory). Admission counts tokens (`cloud.sessions`), so bytes are converted
with the model's KV bytes per token (`kv_bytes_per_token`): per attention layer, a key and a
value of `num_key_value_heads * head_dim` elements of the model's dtype.

Layers that keep no per-token cache (state-space or linear-attention layers of hybrid models,
named in the config's ``layer_types``) are not counted. A sliding-window layer is counted as if
it kept every token: it keeps at most its window per session, so the budget in tokens is then
conservative (sessions hold fewer bytes than it allows for), never over memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

# `layer_types` entries of layers that cache K and V for every token they attend to
_KV_LAYER_TYPES = frozenset(
    {"attention", "full_attention", "sliding_attention", "chunked_attention"}
)
_MEMINFO = Path("/proc/meminfo")


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes in a model of `config` whose cache is `dtype`
    (module docstring). Raises ValueError when the config names no attention layer sizes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        raise ValueError(
            f"{type(config).__name__} names no num_hidden_layers / num_attention_heads: "
            "give kv_budget_tokens instead"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    types = getattr(text, "layer_types", None)
    if types:
        layers = sum(1 for t in types if t in _KV_LAYER_TYPES)
    element = torch.empty((), dtype=dtype).element_size()
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * element


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for caches on `device` now: a CUDA device's free memory, else the host's
    available memory (``MemAvailable``; free pages where /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def kv_budget_tokens(
    model: PreTrainedModel, budget_bytes: int | None, memory_fraction: float | None
) -> int:
    """The budget in tokens: `budget_bytes`, or else `memory_fraction` of the free memory of
    the model's device, over the model's KV bytes per token (one of the two must be given).
    Raises ValueError when the bytes hold not even one token."""
    per_token = kv_bytes_per_token(model.config, model.dtype)
    if budget_bytes is None:
        assert memory_fraction is not None
        free = free_memory_bytes(model.device)
        budget_bytes = int(free * memory_fraction)
        logger.info(
            "KV budget: %.2f of %.1f GiB free on %s", memory_fraction, free / 2**30, model.device
        )
    budget = budget_bytes // per_token
    if budget < 1:
        raise ValueError(
            f"the KV budget of {budget_bytes} bytes holds no token of this model "
            f"({per_token} bytes of KV cache per token)"
        )
    logger.info("KV budget: %d tokens (%d bytes per token)", budget, per_token)
    return int(budget)
