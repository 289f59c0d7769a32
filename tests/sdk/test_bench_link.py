"""The link benchmark on a tiny pair (real verifier processes, real gRPC on 127.0.0.1, the link
emulator) and the bare grpc.aio floor it is read against."""

from __future__ import annotations

import json

import pytest

from edgespec.bench.grpc_floor import run as run_floor
from edgespec.bench.link import print_summary, run_link_bench


def test_floor_subtracts_the_work_and_measures_both_hand_offs():
    result = run_floor(rounds=15, work_ms=20.0, warmup=3)
    floor = result["rtt_minus_work_ms"]
    assert set(floor) == {"thread", "inline"}
    for q in floor.values():
        assert q["rounds"] == 15
        # a round trip costs something, and far less than the 20 ms slept before each answer
        # (which the client subtracts: were it counted, p50 would exceed 20)
        assert 0 < q["p50"] < 10.0 and q["p50"] <= q["p90"]
    json.dumps(result)


@pytest.mark.parametrize("pipelined", [True, False])
def test_link_bench_reports_overhead_fresh_rounds_and_the_floor(tiny_pair, capsys, pipelined):
    result = run_link_bench(
        tiny_pair.target_dir,
        tiny_pair.draft_dir,
        k=3,
        max_new_tokens=12,
        prompts=("hello edge", "verify this"),
        reps=1,
        rtts_ms=(10.0,),
        compare_serial=False,
        pipelined=pipelined,
    )
    json.dumps(result)
    r0 = result["rtt0"]
    assert result["pipelined"] is pipelined
    if not pipelined:  # every round drafted, sent and verified in turn
        assert r0["pipelined_share"] == 0 and r0["overhead_ms_p50_pipelined"] is None
        assert r0["overhead_ms_p50_fresh"] == r0["overhead_ms_p50"]
        # nothing drafted beside a forward: the two rules agree
        assert r0["ahead_outlasts_forward_share"] == 0
        assert r0["overhead_ms_p50_forward_only"] == r0["overhead_ms_p50"]
    # per round, the longer of the forward and the drafting ahead is at least the forward
    assert r0["overhead_ms_p50_forward_only"] >= r0["overhead_ms_p50"]
    assert r0["rounds"] > 0 and 0 <= r0["pipelined_share"] <= 1
    # framework time is never negative: a block drafted ahead does not subtract its drafting
    assert r0["overhead_ms_p50"] > 0
    if r0["overhead_ms_p50_fresh"] is not None:
        floor = result["grpc_floor_ms"]["thread"]["p50"]
        assert result["overhead_fresh_above_floor_ms"] == r0["overhead_ms_p50_fresh"] - floor
    assert result["grpc_floor_ms"]["work_ms"] > 0
    assert {"thread", "inline"} <= set(result["grpc_floor_ms"])
    assert result["rtt"][0]["rtt_ms_set"] == 10.0 and result["rtt"][0]["tokens_per_s"] > 0
    print_summary(result)
    out = capsys.readouterr().out
    assert "bare grpc.aio floor" in out and "drafting ahead outlasted the forward" in out
