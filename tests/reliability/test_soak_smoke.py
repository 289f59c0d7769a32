"""A smoke run of `edgespec bench soak` (the real soak is 64 sessions for 10 minutes, not CI)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

pytest.importorskip("ray")


def test_soak_smoke_no_errors_rss_sampled_sessions_back_to_zero():
    from edgespec.bench.soak import run_soak

    result = run_soak(sessions=4, duration_s=20.0, sample_every_s=5.0)
    assert result["errors"] == 0, result["error_samples"]
    assert result["succeeded"] >= 1
    assert result["identical_outputs"] == result["succeeded"]
    per_service = result["rss"]["per_service"]
    for service in ("verifier", "edge"):
        assert per_service[service]["start_mib"] > 0
        assert per_service[service]["end_mib"] > 0
    assert len(result["samples"]) >= 3
    assert all(n == 0 for n in result["sessions_at_end"].values()), result["sessions_at_end"]
    assert result["ok"]
