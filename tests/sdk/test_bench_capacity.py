"""`edgespec bench capacity` at smoke size: the whole path (verifier subprocesses, edge worker
processes, link emulators, metrics scrape, rows, plots) on the tiny pair, and its analytic
bound."""

from __future__ import annotations

import json

import pytest

from edgespec.bench.capacity import (
    PROMPT_LEN,
    CapacityConfig,
    _later,
    _prompts,
    _tree_widths,
    capacity_bound,
    cloud_sd_bound,
)
from edgespec.cli import main

ROW_KEYS = {
    "method",
    "sessions",
    "rtt_ms",
    "replica_tokens_per_s",
    "session_tokens_per_s_median",
    "session_tokens_per_s_p10",
    "ttft_ms_median",
    "queue_ms_median",
    "mean_batch_sessions",
}


@pytest.mark.slow
def test_capacity_smoke(tiny_pair, tmp_path) -> None:
    out = tmp_path / "capacity.json"
    status = main(
        [
            "bench", "capacity", "--target", str(tiny_pair.target_dir), "--draft",
            str(tiny_pair.draft_dir), "--json", str(out), "--plots", str(tmp_path / "plots"),
            "--sessions", "1,3", "--rtt-ms", "5", "-k", "3", "--max-new-tokens", "8",
            "--edge-processes", "2", "--methods", "cloud_only,fixed,adaptive,serial,cloud_sd",
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert status == 0
    methods = {r["method"] for r in result["rows"]}
    assert methods == {
        "cloud_only", "cloud_only_serial", "fixed_k3", "fixed_k3_serial", "adaptive", "cloud_sd_k3"
    }  # fmt: skip
    assert len(result["rows"]) == 12  # 6 methods x 2 session counts
    for row in result["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["errors"] == 0 and row["altered_outputs"] == 0
        assert row["tokens"] == 8 * row["sessions"] and row["replica_tokens_per_s"] > 0
        # each session's time is within the row's wall time
        assert row["session_tokens_per_s_sum"] >= row["replica_tokens_per_s"] * (1 - 1e-9)
        serial = row["method"].endswith("_serial")
        assert (row["mean_batch_sessions"] is None) == serial  # no batched steps when serial
        # each batched step is padded to its own modelled time: it never takes less
        assert (row["modelled_step_ms"] is None) == serial
        assert serial or row["step_ms_mean"] >= row["modelled_step_ms"] > 0
        assert serial or row["verify_overrun"] >= 1.0
        fresh = row["fresh_round_parts"]  # unpipelined: every speculative round is fresh
        assert (fresh is not None) == (not row["method"].startswith("cloud_only"))
        assert fresh is None or (fresh["tokens"] >= 1 and fresh["verify_ms"] > 0)
    assert result["edge_emulation"].startswith("EMULATED edge devices")  # default h100-70b
    assert result["verifier_emulation"].startswith("EMULATED cloud GPU")
    assert all(row["draft_real_forwards"] <= row["draft_forwards"] for row in result["rows"])
    for row in result["rows"]:
        # adaptive sessions start from what a first, unmeasured generation taught their edge
        warm = row["method"] == "adaptive"
        assert row["link_memory"] == ("warm" if warm else None)
        assert row["warm_sessions"] == (row["sessions"] if warm else 0)
        speculative = row["method"].startswith(("fixed", "adaptive"))
        assert (row["edge_draft_overrun"] or 0) >= (1.0 if speculative else 0.0)
    assert (tmp_path / "plots" / "capacity_vs_sessions.png").stat().st_size > 0
    assert (tmp_path / "plots" / "capacity_frontier.png").stat().st_size > 0


@pytest.mark.slow
def test_capacity_overload_smoke(tiny_pair, tmp_path) -> None:
    """A KV budget for two sessions at their longest, four offered, both admission modes: every
    session completes with the target alone's output; the admission figures are in the rows."""
    longest = max(len(p) for p in _prompts(tiny_pair.target_dir, 4))
    budget = 2 * (longest + 8 + 16)  # prompt + max_new_tokens + the bench's max_block_tokens
    out = tmp_path / "overload.json"
    status = main(
        [
            "bench", "capacity", "--target", str(tiny_pair.target_dir), "--draft",
            str(tiny_pair.draft_dir), "--json", str(out), "--sessions", "4", "--rtt-ms", "5",
            "-k", "3", "--max-new-tokens", "8", "--edge-processes", "2", "--methods", "fixed",
            "--kv-budget-tokens", str(budget), "--kv-admission", "reserve,evict",
            "--retry-after-ms", "50",
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert status == 0
    assert [r["kv_admission"] for r in rows] == ["reserve", "evict"]
    for row in rows:
        assert row["kv_budget_tokens"] == budget
        assert row["sessions_offered"] == row["sessions_completed"] == 4
        assert row["errors"] == 0 and row["altered_outputs"] == 0
        assert row["lost_partial_outputs"] == 0
        assert row["client_retries"] <= row["resource_exhausted_answers"]
    assert rows[0]["evictions"] == rows[0]["resumes"] == 0  # reserve never evicts


@pytest.mark.slow
def test_capacity_trees_smoke(tiny_pair, tmp_path) -> None:
    """Fixed tree shapes by name and the tree controller: outputs the target alone's, the
    shapes the sessions ran reported, and the emulated edges stood in for dead draft rows."""
    out = tmp_path / "trees.json"
    status = main(
        [
            "bench", "capacity", "--target", str(tiny_pair.target_dir), "--draft",
            str(tiny_pair.draft_dir), "--json", str(out), "--sessions", "4", "--rtt-ms", "5",
            "--max-new-tokens", "12", "--edge-processes", "2", "--methods", "tree,adaptive_tree",
            "--tree-shapes", "8x3x2,6x2x3",
        ]
    )  # fmt: skip
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert status == 0
    assert set(rows) == {"tree_n8_d3_w2", "tree_n6_d2_w3", "adaptive_tree"}
    for row in rows.values():
        assert row["errors"] == 0 and row["altered_outputs"] == 0
        assert row["draft_stand_in_rows"] is not None
    assert rows["tree_n8_d3_w2"]["tree_levels_mean"] <= 3
    assert rows["tree_n6_d2_w3"]["tree_nodes_mean"] <= 6
    assert rows["tree_n8_d3_w2"]["pipeline_hit_share"] == 0.0  # fixed trees: no drafting ahead
    assert 0.0 <= rows["adaptive_tree"]["tree_round_share"] <= 1.0
    # per kind: a fixed tree's rounds are trees (a chain only where a tree would pass the end)
    fixed = rows["tree_n8_d3_w2"]
    chains = (fixed["chain_rounds"] or {"rounds": 0})["rounds"]
    assert fixed["tree_rounds"]["rounds"] > chains and fixed["tree_rounds"]["tokens"] >= 1.0
    assert fixed["tree_rounds"]["hit_share"] == 0.0
    for row in rows.values():
        assert 0.0 <= row["kind_switch_share"] <= 1.0


def _two_sessions(tiny_pair, out) -> list[str]:
    """`edgespec bench capacity` on the tiny pair: 2 sessions, 5 ms, 12 tokens, 2 workers."""
    return [
        "bench", "capacity", "--target", str(tiny_pair.target_dir), "--draft",
        str(tiny_pair.draft_dir), "--json", str(out), "--sessions", "2", "--rtt-ms", "5",
        "--max-new-tokens", "12", "--edge-processes", "2",
    ]  # fmt: skip


@pytest.mark.slow
def test_memo_pass_leaves_no_real_draft_forward_to_the_measurement(tiny_pair, tmp_path) -> None:
    """With the memo pass, a fixed-k session redrafts exactly what its unmeasured pass did: the
    measured sessions' draft rows all come from the memo. Without it (control, in the earlier
    layout: each session's link in its edge's worker) they are computed during the
    measurement."""
    real = {}
    for flag in ("--no-memo-pass", None):
        out = tmp_path / f"memo{flag}.json"
        argv = _two_sessions(tiny_pair, out) + ["-k", "3", "--methods", "fixed"]
        assert main(argv + ([flag, "--links-in-workers"] if flag else [])) == 0
        (row,) = json.loads(out.read_text())["rows"]
        assert row["errors"] == 0 and row["altered_outputs"] == 0
        real[flag] = row["draft_real_forwards"]
    assert real["--no-memo-pass"] > 0
    assert real[None] == 0


@pytest.mark.slow
def test_tree_fill_leaves_no_real_draft_forward_to_tree_methods(tiny_pair, tmp_path) -> None:
    """Without the memo pass, a fixed tree and the tree controller measured after the tree fill
    run no real draft forward: every row their trees, chains and shadow drafts ask for was
    computed ahead. With ``--no-tree-fill`` (the control) they compute them during the
    measurement."""
    real = {}
    for flag in ("--no-tree-fill", None):
        out = tmp_path / f"fill{flag}.json"
        argv = _two_sessions(tiny_pair, out) + [
            "--no-memo-pass", "--methods", "tree,adaptive_tree", "--tree-shapes", "8x3x2",
        ]  # fmt: skip
        assert main(argv + ([flag] if flag else [])) == 0
        result = json.loads(out.read_text())
        rows = result["rows"]
        assert [r["method"] for r in rows] == ["tree_n8_d3_w2", "adaptive_tree"]
        assert all(r["errors"] == 0 and r["altered_outputs"] == 0 for r in rows)
        assert ("fill_token_trees" in result["edge_emulation"]) == (flag is None)
        real[flag] = [r["draft_real_forwards"] for r in rows]
    assert all(n > 0 for n in real["--no-tree-fill"])
    assert real[None] == [0, 0]


@pytest.mark.slow
def test_held_concurrency_runs_generations_back_to_back(tiny_pair, tmp_path) -> None:
    """`--generations 3`: each of 2 session slots runs 3 generations on rotating prompts; every
    output is the target alone's for its own prompt, and the figures count every generation."""
    out = tmp_path / "held.json"
    status = main(
        [
            "bench", "capacity", "--target", str(tiny_pair.target_dir), "--draft",
            str(tiny_pair.draft_dir), "--json", str(out), "--sessions", "2", "--rtt-ms", "5",
            "-k", "3", "--max-new-tokens", "8", "--edge-processes", "2",
            "--methods", "cloud_only,adaptive", "--generations", "3",
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert status == 0 and [r["method"] for r in rows] == ["cloud_only", "adaptive"]
    for row in rows:
        assert row["generations"] == 3 and row["sessions"] == 2
        assert row["sessions_offered"] == row["sessions_completed"] == 6
        assert row["errors"] == 0 and row["altered_outputs"] == 0
        assert row["tokens"] == 8 * 6
        # two slots' rates summed: each slot's time lies within the row's wall time
        assert row["session_tokens_per_s_sum"] >= row["replica_tokens_per_s"] * (1 - 1e-9)


def test_later_generations_rotate_through_the_prompts() -> None:
    rotation = [[10], [11], [12], [13]]
    share = [(1, [11]), (3, [13])]
    assert _later(share, rotation, 1) is None
    assert _later(share, rotation, 4) == [
        [(2, [12]), (3, [13]), (0, [10])],
        [(0, [10]), (1, [11]), (2, [12])],
    ]
    with pytest.raises(ValueError, match="generations"):
        CapacityConfig(generations=0)


def test_tree_shapes_config_is_checked() -> None:
    assert CapacityConfig().tree_shapes == ((16, 6, 2),)
    with pytest.raises(ValueError, match="tree_shapes"):
        CapacityConfig(tree_shapes=())
    with pytest.raises(ValueError, match="width"):
        CapacityConfig(tree_shapes=((8, 3, 0),))
    with pytest.raises(SystemExit):
        main(["bench", "capacity", "--json", "x.json", "--tree-shapes", "8x3"])


def test_link_memory_config_is_checked() -> None:
    assert CapacityConfig().link_memory == "warm"
    assert CapacityConfig().memo_pass and not CapacityConfig().links_in_workers
    with pytest.raises(ValueError, match="memo_pass"):
        CapacityConfig(memo_pass=1)  # type: ignore[arg-type]
    assert CapacityConfig().tree_fill
    with pytest.raises(ValueError, match="tree_fill"):
        CapacityConfig(tree_fill="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="links_in_workers"):
        CapacityConfig(links_in_workers="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="link_memory"):
        CapacityConfig(link_memory="hot")


def test_overload_config_is_checked() -> None:
    with pytest.raises(ValueError, match="kv_admissions"):
        CapacityConfig(kv_admissions=("lru",))
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        CapacityConfig(kv_budget_tokens=0)


def test_bound_grows_with_sessions_when_batched_not_when_serial() -> None:
    args = dict(rtt_ms=20.0, k=4, acceptance=0.8, profile_name="h100-70b")
    batched = [capacity_bound("fixed_k4", n, **args) for n in (1, 8, 32)]
    serial = [capacity_bound("fixed_k4_serial", n, **args) for n in (1, 8, 32)]
    assert batched[0] < batched[1] < batched[2]
    assert serial[1] == serial[2]  # the one-at-a-time verifier is saturated
    assert batched[2] > 10 * serial[2]
    assert capacity_bound("cloud_only", 32, 20.0, 0, 0.0, "h100-70b") > 20 * capacity_bound(
        "cloud_only", 1, 20.0, 0, 0.0, "h100-70b"
    )
    with pytest.raises(ValueError, match="methods"):
        CapacityConfig(methods=("nope",))


def test_bound_commits_the_measured_tokens_per_round() -> None:
    """`acceptance` is accepted per DRAFTED token (a row's acceptance_rate): a round of k
    commits 1 + acceptance * k tokens on average, whatever the per-position profile. Reading
    it as an independent per-token alpha (E = (1 - a^(k+1)) / (1 - a)) undercounts: at 0.55
    and k = 4 that is 2.1 tokens per round against the 3.2 actually committed."""
    from edgespec.core.profiles import get_profile

    profile = get_profile("h100-70b")
    step = profile.target_step_ms([(PROMPT_LEN, 5)] * 32)
    round_ms = 4 * profile.draft.ms(1) + 20.0 + step
    bound = capacity_bound("fixed_k4", 32, 20.0, 4, 0.55, "h100-70b")
    assert bound == pytest.approx(32 * (1 + 0.55 * 4) * 1e3 / round_ms)
    assert bound > 1.4 * 32 * 2.12 * 1e3 / round_ms  # not the i.i.d. reading
    cloud_step = get_profile("h100-70b-cloud-draft").target_step_ms([(PROMPT_LEN, 5)] * 32)
    assert cloud_sd_bound(32, 4, 0.55, "h100-70b") == pytest.approx(32 * 3.2 * 1e3 / cloud_step)
    with pytest.raises(ValueError, match="acceptance"):
        capacity_bound("fixed_k4", 32, 20.0, 4, 1.5, "h100-70b")


def test_cloud_side_speculative_bound() -> None:
    one, many = cloud_sd_bound(1, 4, 0.8, "h100-70b"), cloud_sd_bound(32, 4, 0.8, "h100-70b")
    assert one is not None and many is not None and many > 10 * one  # batched on the verifier
    # no RTT per round, but the draft's forwards cost the verifier's time
    assert one > capacity_bound("fixed_k4", 1, 20.0, 4, 0.8, "h100-70b")
    assert cloud_sd_bound(32, 4, 0.8, "real") is None  # no batched forward modelled


def test_cloud_side_speculative_decoding_pays_its_draft_in_the_step() -> None:
    """The cloud-draft profile: a step of B sessions verifying k-token blocks also pays k draft
    forwards over B sessions; the analytic bound of cloud_sd is that profile's."""
    from edgespec.core.profiles import cloud_draft_profile, get_profile

    base, variant = get_profile("h100-70b"), get_profile(cloud_draft_profile("h100-70b"))
    assert variant.draft.is_zero and variant.cloud_draft is not None
    rows = [(24, 5)] * 8
    draft = variant.cloud_draft.ms([(0, 1)] * 8)
    assert variant.target_step_ms(rows) == pytest.approx(base.target_step_ms(rows) + 4 * draft)
    assert variant.target_step_ms([(24, 1)] * 8) == base.target_step_ms([(24, 1)] * 8)
    assert cloud_draft_profile("real") is None
    with pytest.raises(ValueError, match="cloud_sd"):
        CapacityConfig(methods=("cloud_sd",), compute_profile="real")


def test_tree_fill_reads_the_shapes_a_registered_tree_policy_searches() -> None:
    """The token trees filled ahead are those of the policy the edges build by the method's
    registry name: the tree controller's own shapes (the default, or a policy registered with
    others), a fixed tree's one shape, and none for a policy that grows no tree."""
    from types import SimpleNamespace

    from edgespec.core.registry import _REGISTRY, register_policy
    from edgespec.core.tree import TreeShape
    from edgespec.core.tree_policy import TreeConfig, TreePolicy

    def job(policy: str, tree: tuple[int, int, int] | None = None) -> SimpleNamespace:
        return SimpleNamespace(policy=policy, tree=tree)  # the two fields _tree_widths reads

    assert _tree_widths(job("adaptive_tree")) == ((2, 3, 4), 10)
    assert _tree_widths(job("adaptive")) is None
    assert _tree_widths(job("fixed", (16, 6, 2))) == ((2,), 6)
    saved = dict(_REGISTRY)
    try:
        shapes = (TreeShape(8, 4, 2), TreeShape(12, 3, 5))
        register_policy("narrow_trees", lambda spec: TreePolicy(tree=TreeConfig(shapes=shapes)))
        assert _tree_widths(job("narrow_trees")) == ((2, 5), 4)
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
