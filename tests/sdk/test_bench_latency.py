"""The latency benchmark: its pure summaries and checks on synthetic samples, and one quick run on
the tiny pair through the CLI (real verifier process, real edge engine, real link emulator)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgespec.bench.latency.analysis import (
    crossover_rtt,
    evaluate_checks,
    expected_tokens_from_rounds,
    per_position_acceptance,
    summarise,
)
from edgespec.bench.latency.config import LatencyBenchConfig, LinkCondition, VaryingSchedule
from edgespec.bench.latency.samples import RoundSample, RunSample
from edgespec.core.cost_model import expected_tokens
from edgespec.linkemu import LinkProfile


def _round(k: int, accepted: int, mode: str = "speculative") -> RoundSample:
    return RoundSample(
        k=k, drafted=k, accepted=accepted, mode=mode, network_ms=10.0, t_s=None, tokens=accepted + 1
    )


def test_per_position_acceptance_counts_reached_positions():
    # k=3: accepted 0 reaches position 1; accepted 1 reaches 1..2; accepted 3 reaches 1..3
    reached, accepted = per_position_acceptance([_round(3, 0), _round(3, 1), _round(3, 3)])
    assert reached == [3.0, 2.0, 1.0]
    assert accepted == [2.0, 1.0, 1.0]


def test_expected_tokens_reproduce_the_mean_at_fixed_k():
    rounds = [_round(4, a) for a in (0, 1, 4, 2, 4, 3, 0, 4)]
    e_pos, e_iid = expected_tokens_from_rounds(rounds)
    measured = sum(r.accepted + 1 for r in rounds) / len(rounds)
    assert e_pos == pytest.approx(measured)  # per-position E(k) at one k is the empirical mean
    alpha = sum(r.accepted for r in rounds) / sum(min(r.accepted + 1, 4) for r in rounds)
    assert e_iid == pytest.approx(expected_tokens(alpha, 4))
    assert expected_tokens_from_rounds([_round(0, 0, "cloud_only")]) == (None, None)


def test_summarise_row():
    cond = LinkCondition("rtt", 50.0, LinkProfile(rtt_ms=50.0))
    samples = [
        RunSample("fixed_k2", 0, [1] * 10, 1.0, [_round(2, 2), _round(2, 0)], rep=0),
        RunSample("fixed_k2", 1, [1] * 10, 2.0, [_round(2, 1)], rep=1),
        RunSample("fixed_k2", 2, [1] * 30, 1.0, [_round(2, 2)], rep=2),
    ]
    row = summarise("fixed_k2", cond, samples)
    assert row["tokens_per_s"] == 10.0 and row["tokens_per_s_spread"] == [5.0, 30.0]
    assert row["spread_kind"] == "min_max" and row["reps"] == 3
    assert row["mean_k"] == 2.0 and row["rounds"] == 4
    assert row["acceptance_rate"] == pytest.approx(5 / 8)
    assert row["mean_tokens_per_round"] == pytest.approx(9 / 4)
    assert row["rtt_ms"] == 50.0 and row["case"] == "rtt" and not row["in_process"]
    assert row["cloud_only_token_share"] == 0.0
    assert row["pipeline_hit_rate"] is None  # nothing was drafted ahead


def test_summarise_pipeline_hit_rate():
    cond = LinkCondition("rtt", 50.0, LinkProfile(rtt_ms=50.0))
    ahead = dataclasses.replace(_round(2, 2), pipelined=True)
    samples = [
        RunSample("p", 0, [1] * 6, 1.0, [_round(2, 2), ahead], pipeline_misses=1),
        RunSample("p", 1, [1] * 3, 1.0, [_round(2, 2)], rep=1, pipeline_misses=2),
    ]
    assert summarise("p", cond, samples)["pipeline_hit_rate"] == pytest.approx(1 / 4)


def _row(rtt, method, tps, case="rtt", rounds=60):
    return {
        "case": case,
        "rtt_ms": rtt,
        "method": method,
        "tokens_per_s": tps,
        "in_process": False,
        "rounds": rounds,
        "reps": 3,
        "mean_tokens_per_round": 2.0,
        "expected_tokens_per_round": 2.1,
        "expected_tokens_per_round_iid": 2.5,
    }


def test_checks_and_crossover():
    rows = [
        _row(0, "cloud_only", 30),
        _row(0, "fixed_k4", 50),
        _row(0, "heuristic", 45),
        _row(0, "adaptive", 49),
        _row(0, "adaptive_pipelined", 55),
        _row(100, "cloud_only", 30),
        _row(100, "fixed_k4", 20),
        _row(100, "heuristic", 21),
        _row(100, "adaptive", 25),
        _row(100, "adaptive_pipelined", 29),
        _row(200, "cloud_only", 29),
        _row(200, "fixed_k4", 12),
        _row(200, "adaptive", 28),
        _row(200, "adaptive_pipelined", 28),
        _row(50, "cloud_only", 10, case="jitter"),  # not a grid RTT: reported, not judged
        _row(50, "adaptive", 1, case="jitter"),
    ]
    varying = {"tokens_per_s": {"fixed_k1": 10.0, "fixed_k4": 20.0, "adaptive": 24.0}}
    greedy = {"passed": True}
    checks = evaluate_checks(rows, varying, greedy)
    a = checks["adaptive_vs_best"]
    assert a["passed_adaptive"] is False  # 25 / 30 at RTT 100
    assert a["passed_adaptive_pipelined"] is True
    assert [e["best_baseline"] for e in a["per_condition"]] == [
        "fixed_k4",
        "cloud_only",
        "cloud_only",
        "cloud_only",
    ]
    v = checks["varying_vs_fixed"]
    assert v["best_fixed"] == "fixed_k4" and v["adaptive_ratio"] == pytest.approx(1.2)
    assert v["passed_adaptive"] is True
    ek = checks["ek_agreement"]
    assert ek["passed"] is True and ek["passed_iid"] is False
    assert ek["max_rel_error"] == pytest.approx(0.1 / 2.1)
    # a row with too few rounds per generation is listed, not judged; pooled rows are judged
    few = {**_row(200, "adaptive", 28, rounds=27), "mean_tokens_per_round": 1.0}
    pooled = [{"method": "adaptive", "rel_error": 0.02, "rel_error_iid": 0.05}]
    ek = evaluate_checks([*rows, few], varying, greedy, pooled)["ek_agreement"]
    assert ek["passed"] is True and ek["rows_too_few_rounds"] == 1
    assert [e["judged"] for e in ek["rows"] if e["rtt_ms"] == 200 and e["rounds"] == 27] == [False]
    bad_pool = [{"method": "adaptive", "rel_error": 0.2, "rel_error_iid": 0.05}]
    assert evaluate_checks(rows, varying, greedy, bad_pool)["ek_agreement"]["passed"] is False
    assert checks["greedy_equality"] is greedy
    assert crossover_rtt(rows) == 100
    assert crossover_rtt([_row(0, "cloud_only", 1), _row(0, "fixed_k1", 2)]) is None


def test_config_and_schedule_validation():
    with pytest.raises(ValueError, match="reps"):
        LatencyBenchConfig(reps=0)
    with pytest.raises(ValueError, match="rtts_ms"):
        LatencyBenchConfig(rtts_ms=(-1.0,))
    with pytest.raises(ValueError, match="methods"):
        LatencyBenchConfig(methods=("fixed_k3",))
    with pytest.raises(ValueError, match="phases"):
        VaryingSchedule(((1.0, 10.0),))
    sched = VaryingSchedule(((0.0, 10.0), (4.0, 100.0), (10.0, 30.0)))
    assert [sched.rtt_at(t) for t in (0.0, 3.9, 4.0, 9.0, 50.0)] == [10, 10, 100, 100, 30]
    config = LatencyBenchConfig()
    cases = [(c.case, c.rtt_ms) for c in config.conditions()]
    assert cases[-2:] == [("jitter", 50.0), ("bandwidth", 50.0)]


def test_cli_parses_the_bench_commands():
    from edgespec.bench.latency.cli import command_line, config_from_args
    from edgespec.cli import build_parser, cmd_bench_latency, cmd_bench_link

    ap = build_parser()
    args = ap.parse_args(["bench", "latency", "--json", "r.json", "--rtts", "0,50", "--reps", "4"])
    assert args.func is cmd_bench_latency
    config = config_from_args(args)
    assert config.compute_profile == "h100-70b" and config.rtts_ms == (0.0, 50.0)
    assert config.reps == 4 and config.max_new_tokens == 64 and config.varying is not None
    assert "--rtts 0,50" in command_line(args) and "--reps 4" in command_line(args)
    quick = config_from_args(ap.parse_args(["bench", "latency", "--json", "r", "--quick"]))
    assert quick.reps == 1 and len(quick.rtts_ms) == 2
    with pytest.raises(ValueError, match="--rtts"):
        config_from_args(ap.parse_args(["bench", "latency", "--json", "r", "--rtts", "a,b"]))
    link = ap.parse_args(["bench", "link", "--json", "l.json", "--rtt", "10", "--rtt", "50"])
    assert link.func is cmd_bench_link and link.rtt == [10.0, 50.0]


@pytest.mark.slow
def test_quick_run_through_the_cli(tiny_pair, tmp_path):
    """`edgespec bench latency --quick` on the tiny pair: every method, both RTTs, the varying
    run, the checks, the plots. Asserts structure and exactness, never speed."""
    from edgespec.cli import main

    out = tmp_path / "latency.json"
    plots = tmp_path / "plots"
    argv = ["bench", "latency", "--quick", "--compute-profile", "real", "--threads", "1"]
    argv += ["--target", str(tiny_pair.target_dir), "--draft", str(tiny_pair.draft_dir)]
    argv += ["--json", str(out), "--plots", str(plots)]
    assert main(argv) == 0
    result = json.loads(out.read_text())

    assert result["profiles"]["compute"]["name"] == "real"
    assert result["profiles"]["compute_emulated"] is False
    assert {p["name"] for p in result["profiles"]["link"]} >= {"rtt0ms", "rtt20ms"}
    rows = result["rows"]
    grid = {(r["rtt_ms"], r["method"]) for r in rows if r["case"] == "rtt"}
    link_methods = {
        "cloud_only",
        "fixed_k1",
        "fixed_k2",
        "fixed_k4",
        "fixed_k8",
        "heuristic",
        "adaptive",
        "adaptive_pipelined",
        "adaptive_pipelined_cold",
        "tree_n16_d6_w2",
        "tree_n16_d6_w2_pipelined",
        "tree_n32_d8_w3",
        "tree_n64_d10_w4",
        "adaptive_tree",
    }
    assert grid == {(rtt, m) for rtt in (0.0, 20.0) for m in link_methods}
    assert {r["method"] for r in rows if r["in_process"]} == {"edge_only_draft", "colocated"}
    assert {r["case"] for r in rows} == {"rtt", "jitter", "bandwidth", "in_process"}
    keys = {"rtt_ms", "method", "tokens_per_s", "tokens_per_s_spread", "mean_k", "acceptance_rate"}
    for row in rows:
        assert keys <= set(row) and row["tokens_per_s"] > 0
    by = {(r["rtt_ms"], r["method"]): r for r in rows if r["case"] == "rtt"}
    assert by[(20.0, "fixed_k2")]["mean_k"] == 2.0
    # tree methods send trees (the tiny pair's draft cache is croppable), chains send none
    assert by[(20.0, "tree_n32_d8_w3")]["tree_round_share"] > 0.5
    assert by[(20.0, "fixed_k4")]["tree_round_share"] == 0.0
    assert by[(20.0, "tree_n32_d8_w3")]["bytes_per_accepted_token"] > 0
    assert set(result["checks"]["trees"]["per_rtt"][0]) >= {"rtt_ms", "best_tree"}
    # the adaptive rows say how their link memory was prepared (warm: one earlier session on
    # another prompt; cold: none), the others that it was left alone
    assert by[(20.0, "adaptive")]["link_memory"] == "warm"
    assert by[(20.0, "adaptive_pipelined_cold")]["link_memory"] == "cold"
    assert by[(20.0, "fixed_k2")]["link_memory"] is None
    assert by[(20.0, "fixed_k2")]["rtt_ms_measured"] >= 20.0  # the emulated delay is really there
    assert by[(20.0, "cloud_only")]["mean_k"] in (0.0, None)

    checks = result["checks"]
    assert checks["greedy_equality"]["passed"] is True, checks["greedy_equality"]
    assert checks["greedy_equality"]["compared"] > 20
    # k = 1 drafts one token every round: per-position E(k) is then the measured mean exactly
    for e in checks["ek_agreement"]["rows"]:
        if e["method"] == "fixed_k1":
            assert e["rel_error"] < 1e-9
    assert set(checks["adaptive_vs_best"]) >= {"passed_adaptive", "passed_adaptive_pipelined"}

    varying = result["varying"]
    assert set(varying["tokens_per_s"]) >= {"adaptive", "fixed_k4", "cloud_only"}
    series = varying["series"]["adaptive"]
    assert series and all(s["t_s"] is not None and s["t_s"] >= 0 for s in series)
    assert {s["rtt_ms_set"] for s in series} <= {5.0, 40.0, 10.0}
    switched = [s["rtt_ms"] for s in varying["switches"]["adaptive"]]
    assert switched == [40.0, 10.0][: len(switched)]  # as far as the generation lasted
    assert "adaptive" in varying["ratio_vs_best_fixed"]
    assert result["estimate_s"]["measure_s"] > 0

    for name in ("tokens_per_s_vs_rtt.png", "k_vs_rtt.png", "varying_rtt.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
