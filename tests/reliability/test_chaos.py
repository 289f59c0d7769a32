"""Chaos under load, bounded for CI (`edgespec bench chaos` is the long run).

A local deployment (2 verifiers, 2 edges, emulated 10 ms link) serves 4 concurrent sessions for
~40 s while actors are killed (~every 12 s) and edge links fail (~every 10 s); then: every
submitted session succeeded or failed with a gRPC status, every succeeded output is the target's
own greedy output, and no verifier or edge holds a session.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

pytest.importorskip("ray")


def test_chaos_accounting_outputs_and_no_session_left():
    from edgespec.bench.chaos import ChaosConfig, run_chaos

    config = ChaosConfig(sessions=4, duration_s=40.0, kill_every_s=12.0, fault_every_s=10.0, seed=1)
    result = run_chaos(config)
    assert result["kills"] >= 1, result["kill_events"]
    assert result["link_faults"] >= 1, result["link_fault_events"]
    assert result["failed_without_status"] == {}, result["error_samples"]
    assert result["accounting_ok"], result
    assert result["submitted"] == result["succeeded"] + sum(result["failed_by_status"].values())
    assert "UNKNOWN" not in result["failed_by_status"], result["error_samples"]
    assert result["succeeded"] >= 1
    assert result["mismatches"] == 0, result["mismatch_samples"]
    assert result["identical_outputs"] == result["succeeded"]
    assert result["sessions_left"] and all(n == 0 for n in result["sessions_left"].values()), (
        result["sessions_left"]
    )
    assert result["ok"]
