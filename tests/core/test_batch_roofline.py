"""The batch-aware compute profile: `BatchRoofline` (weights once per forward, each session's KV,
compute per fed token) and the h100-70b numbers it is given."""

from __future__ import annotations

import time

import pytest

from edgespec.core.profiles import BatchRoofline, ComputeProfile, get_profile, pad_until

H100 = get_profile("h100-70b")


def test_one_session_costs_what_the_per_forward_model_says() -> None:
    # A 4-token block on a 500-token cache: ~30 ms, the affine model's 30 + 0.2 * 5 within 1 ms.
    one = H100.target_step_ms([(500, 5)])
    assert abs(one - H100.target.ms(5)) < 1.0


def test_weights_are_read_once_per_forward() -> None:
    one = H100.target_step_ms([(500, 5)])
    batch = H100.target_step_ms([(500, 5)] * 16)
    # 16 sessions (80 tokens fed: memory-bound) cost about one forward: only their KV is added.
    assert one < batch < 1.2 * one
    kv_ms = H100.target_batch.kv_ms_per_token * 15 * 505
    assert batch == pytest.approx(one + kv_ms)


def test_compute_bound_past_the_ridge() -> None:
    roof = H100.target_batch
    fed = 64 * 8  # 512 tokens fed: 102 ms of compute > 26 ms of weights
    assert H100.target_step_ms([(0, 8)] * 64) == pytest.approx(
        roof.overhead_ms + roof.compute_ms_per_token * fed
    )


def test_real_profile_pads_nothing_and_bad_values_are_refused() -> None:
    assert get_profile("real").target_step_ms([(10, 3)]) == 0.0
    with pytest.raises(ValueError, match="weights_ms"):
        BatchRoofline(weights_ms=-1.0)
    with pytest.raises(ValueError, match="target_batch"):
        ComputeProfile(name="x", emulated=True, target_batch=3.0)  # type: ignore[arg-type]


def test_pad_until_sleeps_the_rest_or_reports_the_overrun() -> None:
    import torch

    t0 = time.perf_counter()
    slept = pad_until(t0, 20.0, torch.device("cpu"))
    assert slept > 0 and (time.perf_counter() - t0) * 1e3 >= 20.0
    assert pad_until(time.perf_counter() - 0.05, 10.0, torch.device("cpu")) < 0
