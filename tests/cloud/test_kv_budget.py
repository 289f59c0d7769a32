"""The KV budget given as bytes of cache or as a fraction of free memory (`cloud.kv_budget`):
the model's KV bytes per token, the budget in tokens the engine admits against (the same
RESOURCE_EXHAUSTED as a budget in tokens, over gRPC too), the server's flags, and the CUDA path
where there is a GPU."""

from __future__ import annotations

import grpc
import pytest
import torch
from support.servers import VerifierServerThread
from support.verifier_client import PROMPT, open_session
from transformers import LlamaConfig, PretrainedConfig

from edgespec.cloud.kv_budget import free_memory_bytes, kv_bytes_per_token
from edgespec.cloud.server import build_parser
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import RESOURCE_EXHAUSTED, ServiceError, VerifierConfig
from edgespec.core.params import SamplingParams
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc


def _llama(**overrides) -> LlamaConfig:
    sizes = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    return LlamaConfig(**{**sizes, **overrides})


def test_bytes_per_token_count_keys_and_values_of_every_attention_layer() -> None:
    # 3 layers x (K and V) x 2 KV heads x head_dim 64 / 8 = 8 x 4 bytes
    assert kv_bytes_per_token(_llama(), torch.float32) == 3 * 2 * 2 * 8 * 4
    assert kv_bytes_per_token(_llama(), torch.bfloat16) == 3 * 2 * 2 * 8 * 2
    assert kv_bytes_per_token(_llama(num_key_value_heads=None), torch.float32) == 3 * 2 * 8 * 8 * 4
    assert kv_bytes_per_token(_llama(head_dim=32), torch.float16) == 3 * 2 * 2 * 32 * 2


def test_layers_without_a_token_cache_are_not_counted() -> None:
    config = _llama()
    # a hybrid model: one linear-attention layer keeps a fixed state, not a cache per token
    config.layer_types = ["full_attention", "linear_attention", "sliding_attention"]
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 8 * 4


def test_a_config_without_attention_sizes_is_refused() -> None:
    config = PretrainedConfig()  # e.g. a state-space model's: no attention layers named
    with pytest.raises(ValueError, match="kv_budget_tokens instead"):
        kv_bytes_per_token(config, torch.float32)


def test_a_budget_in_bytes_is_admitted_against_as_tokens(target_model) -> None:
    per_token = kv_bytes_per_token(target_model.config, target_model.dtype)
    # 50 tokens and a bit: the same budget as test_step_scheduler's 50 tokens
    config = VerifierConfig(max_block_tokens=4, kv_budget_bytes=50 * per_token + per_token // 2)
    engine = VerifierEngine(target_model, config)
    assert engine.config.kv_budget_tokens == 50
    assert engine.config.kv_budget_bytes is None  # resolved: admission counts tokens
    params = SamplingParams(max_new_tokens=30)
    sid = engine.open_session(PROMPT, params).session_id  # 6 + 30 + 4 = 40 tokens reserved
    with pytest.raises(ServiceError) as info:
        engine.open_session(PROMPT, params)
    assert info.value.code == RESOURCE_EXHAUSTED and "kv_budget_tokens=50" in str(info.value)
    engine.close_session(sid)
    assert engine.open_session(PROMPT, params).session_id


def test_bytes_that_hold_no_token_are_refused(target_model) -> None:
    with pytest.raises(ValueError, match="holds no token"):
        VerifierEngine(target_model, VerifierConfig(kv_budget_bytes=1))


def test_a_fraction_of_free_memory(target_model) -> None:
    per_token = kv_bytes_per_token(target_model.config, target_model.dtype)
    engine = VerifierEngine(target_model, VerifierConfig(kv_memory_fraction=0.01))
    budget = engine.config.kv_budget_tokens
    assert budget is not None and budget > 0
    free = free_memory_bytes(torch.device("cpu"))
    # the host's available memory moves between the two reads: within half of it
    assert 0.5 * 0.01 * free / per_token < budget < 1.5 * 0.01 * free / per_token


def test_one_budget_at_most_and_each_checked() -> None:
    with pytest.raises(ValueError, match="kv_budget_tokens and kv_budget_bytes"):
        VerifierConfig(kv_budget_tokens=10, kv_budget_bytes=1000)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        VerifierConfig(kv_memory_fraction=0.0)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        VerifierConfig(kv_memory_fraction=1.5)
    with pytest.raises(ValueError, match="kv_budget_bytes"):
        VerifierConfig(kv_budget_bytes=0)


def test_server_flags() -> None:
    args = build_parser().parse_args(["--kv-budget-bytes", "4096"])
    assert (args.kv_budget_bytes, args.kv_budget_tokens, args.kv_memory_fraction) == (
        4096,
        None,
        None,
    )
    assert build_parser().parse_args(["--kv-memory-fraction", "0.8"]).kv_memory_fraction == 0.8
    with pytest.raises(SystemExit):  # argparse: not allowed with --kv-budget-tokens
        build_parser().parse_args(["--kv-budget-tokens", "10", "--kv-memory-fraction", "0.5"])


def test_a_bytes_budget_over_grpc(target_model) -> None:
    per_token = kv_bytes_per_token(target_model.config, target_model.dtype)
    # two sessions of prompt 6 + max_new_tokens 32 + max_block_tokens 8 = 46 tokens fit in 100
    config = VerifierConfig(max_block_tokens=8, kv_budget_bytes=100 * per_token)
    server = VerifierServerThread(VerifierEngine(target_model, config))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            assert [open_session(stub).session_id for _ in range(2)]
            with pytest.raises(grpc.RpcError) as info:
                open_session(stub)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "kv_budget_tokens=100" in info.value.details()
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fraction_of_a_gpus_free_memory(target_model) -> None:
    model = target_model.to("cuda")
    try:
        free, _ = torch.cuda.mem_get_info(model.device)
        engine = VerifierEngine(model, VerifierConfig(kv_memory_fraction=0.5))
        per_token = kv_bytes_per_token(model.config, model.dtype)
        assert engine.config.kv_budget_tokens == pytest.approx(0.5 * free / per_token, rel=0.1)
    finally:
        target_model.to("cpu")
