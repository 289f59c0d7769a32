"""The ``edgespec`` command line.

``edgespec demo`` runs the main job on the embedded defaults: a local Ray cluster (edge and cloud
nodes), the shipped demo pair, an emulated link, one generation compared with the target serving
alone. ``edgespec up / status / generate / down`` run the same cluster step by step (see
``sdk/commands.py``). ``edgespec bench ...`` runs the
benchmarks, each printing its figures and writing them to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from edgespec.commands import add_cluster_commands, params_from_args
from edgespec.commands import cmd_demo as cmd_demo_distributed
from edgespec.core.demo_pair import BENCH_PROMPTS, resolve_pair
from edgespec.core.models import check_pair, load_tokenizer
from edgespec.errors import EdgespecError

# The benchmarks and the co-located core (edgespec.bench.*, edgespec.core.generate / runner) are
# imported inside the commands that run them: they load torch and transformers (the load benchmark
# also ray), which the parser, `--help` and the cluster commands never need.

logger = logging.getLogger("edgespec")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target checkpoint folder (default: the shipped demo target)")
    p.add_argument("--draft", help="draft checkpoint folder (default: the shipped demo draft)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--seed", type=int, default=None, help="0 <= seed < 2**64 (sampling; default: drawn)"
    )
    p.add_argument(
        "--sampler",
        choices=["coupled", "rejection"],
        default="coupled",
        help="how sampled tokens are verified: coupled (reproducible from the seed, token ids "
        "only on the link) or rejection (the draft distribution on the link)",
    )


def write_json(path: str | Path, data: dict) -> None:
    """Write a result file (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    logger.info("wrote %s", path)


def cmd_demo(args: argparse.Namespace) -> int:
    """The distributed demo (edgespec.commands.cmd_demo), or with --colocated the core alone."""
    if args.colocated:
        return cmd_demo_colocated(args)
    return cmd_demo_distributed(args)


def cmd_demo_colocated(args: argparse.Namespace) -> int:
    """Co-located speculative decoding on the shipped pair, compared with the target alone."""
    # torch (see the imports at the top)
    from edgespec.core.generate import generate, generate_autoregressive
    from edgespec.core.runner import ModelRunner

    target_path, draft_path = resolve_pair(args.target, args.draft)
    check_pair(target_path, draft_path)
    logger.info("loading target %s and draft %s", target_path, draft_path)
    tokenizer = load_tokenizer(target_path)
    target = ModelRunner.from_pretrained(target_path)
    draft = ModelRunner.from_pretrained(draft_path)
    params = params_from_args(args)
    prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]

    t0 = time.perf_counter()
    spec = generate(target, draft, prompt_ids, params, k=args.draft_tokens)
    spec_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = generate_autoregressive(target, prompt_ids, params)
    alone_s = time.perf_counter() - t0

    print(args.prompt + tokenizer.decode(spec.tokens))
    print("-" * 60)
    same = "identical to" if spec.tokens == alone.tokens else "DIFFERENT from"
    print(
        f"speculative (k={args.draft_tokens}): {len(spec.tokens)} tokens, {same} the target alone"
    )
    print(
        f"  {len(spec.tokens) / spec_s:.1f} tokens/s vs {len(alone.tokens) / alone_s:.1f} "
        f"tokens/s for the target alone ({alone_s / spec_s:.2f}x); "
        f"acceptance {spec.stats.acceptance_rate:.2f}, "
        f"{spec.stats.mean_tokens_per_round:.2f} tokens per target forward"
    )
    return 0 if params.temperature > 0 or spec.tokens == alone.tokens else 1


def cmd_reference(args: argparse.Namespace) -> int:
    """The target alone on this machine (edgespec.reference): what a distributed generation with
    the same prompt, params and seed must equal under greedy or coupled sampling."""
    from edgespec.reference import generate_reference  # torch (see the imports at the top)

    params = params_from_args(args)
    result = generate_reference(args.prompt, params, args.target, device=args.device)
    print(args.prompt + result.text)
    seed = f"; seed {result.seed}" if result.seed is not None else ""
    print(
        f"{len(result.token_ids)} tokens ({result.finish_reason}) from the target alone{seed}; "
        f"token ids {result.token_ids}",
        file=sys.stderr,
    )
    return 0


def cmd_bench_core(args: argparse.Namespace) -> int:
    """Co-located core vs target alone vs HF assisted generation (edgespec.bench.core)."""
    from edgespec.bench.core import run_core_bench  # torch (see the imports at the top)

    target_path, draft_path = resolve_pair(args.target, args.draft)
    if args.draft_equals_target:
        draft_path = target_path
    check_pair(target_path, draft_path)
    tokenizer = load_tokenizer(target_path)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in BENCH_PROMPTS]
    result = run_core_bench(
        target_path,
        draft_path,
        prompts,
        max_new_tokens=args.max_new_tokens,
        ks=range(1, args.max_k + 1),
        reps=args.reps,
        hf_assisted_ks=(4,),
    )
    for row in result["methods"]:
        k = "" if row.get("k") is None else f" k={row['k']}"
        acc = row.get("acceptance_rate")
        acc_s = "" if acc is None else f"  acceptance {acc:.3f}"
        print(f"{row['name']:>24}{k:<5} {row['tokens_per_s']:8.1f} tokens/s{acc_s}")
    print(f"best ours / HF assisted generation: {result['best_vs_hf_assisted']:.3f}")
    write_json(args.json, result)
    return 0


def cmd_bench_sampling(args: argparse.Namespace) -> int:
    """Coupled vs rejection sampling over an emulated link (edgespec.bench.sampling)."""
    from edgespec.bench.sampling import LINKS, PROMPTS, print_summary, run_sampling_bench

    target_path, draft_path = resolve_pair(args.target, args.draft)
    check_pair(target_path, draft_path)
    result = run_sampling_bench(
        target_path,
        draft_path,
        compute_profile=args.compute_profile,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        reps=args.reps,
        threads=args.threads,
        prompts=PROMPTS[:1] if args.quick else PROMPTS,
        links=LINKS[:1] if args.quick else LINKS,
        policies=("fixed",) if args.quick else ("fixed", "adaptive"),
    )
    print_summary(result)
    write_json(args.json, result)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """Tokens/s vs RTT for every method (edgespec.bench.latency); JSON and optional plots."""
    from edgespec.bench.latency.cli import print_summary, run_from_args  # torch (see the top)

    target_path, draft_path = resolve_pair(args.target, args.draft)
    check_pair(target_path, draft_path)
    print_summary(run_from_args(args, target_path, draft_path))
    return 0


def cmd_bench_capacity(args: argparse.Namespace) -> int:
    """One verifier, N edges: replica and per-session tokens/s (edgespec.bench.capacity)."""
    from edgespec.bench import capacity  # torch (see the imports at the top)
    from edgespec.bench.capacity_plots import plot_capacity

    target_path, draft_path = resolve_pair(args.target, args.draft)
    check_pair(target_path, draft_path)
    methods = tuple(args.methods.split(",")) if args.methods else None
    config = capacity.CapacityConfig(
        sessions=args.sessions or capacity.CapacityConfig.sessions,
        rtts_ms=args.rtt_ms or capacity.CapacityConfig.rtts_ms,
        ks=args.k or capacity.CapacityConfig.ks,
        methods=methods or capacity.CapacityConfig.methods,
        max_new_tokens=args.max_new_tokens,
        compute_profile=args.compute_profile,
        edge_processes=args.edge_processes,
        threads=args.threads,
        memo_drafts=not args.no_draft_memo,
        emulate_target=not args.real_target_forwards,
        kv_budget_tokens=args.kv_budget_tokens,
        kv_admissions=tuple(args.kv_admission.split(",")),
        retry_after_ms=args.retry_after_ms,
        client_retries=args.client_retries,
        link_memory=args.link_memory,
        tree_shapes=args.tree_shapes or capacity.CapacityConfig.tree_shapes,
        links_in_workers=args.links_in_workers,
        memo_pass=not args.no_memo_pass,
        tree_fill=not args.no_tree_fill,
        generations=args.generations,
        batch_group_horizon=args.batch_group_horizon,
        batch_overlap=not args.no_batch_overlap,
        ahead_branches=args.ahead_branches,
        ahead_branches_sent=args.ahead_branches_sent,
    )
    result = capacity.run_capacity_bench(config, target_path, draft_path)
    capacity.print_summary(result)
    write_json(args.json, result)
    if args.plots:
        plot_capacity(result, args.plots)
    clean = all(r["errors"] == 0 and r["altered_outputs"] == 0 for r in result["rows"])
    return 0 if clean else 1


def _ints(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4) (an argparse type)."""
    return tuple(int(x) for x in text.split(",") if x)


def _tree_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """'16x6x2,16x3x4' -> ((16, 6, 2), (16, 3, 4)) (an argparse type)."""
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"a shape is NODESxDEPTHxWIDTH, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return tuple(shapes)


def _floats(text: str) -> tuple[float, ...]:
    """'20,50' -> (20.0, 50.0) (an argparse type)."""
    return tuple(float(x) for x in text.split(",") if x)


def _bench_capacity_args(p: argparse.ArgumentParser) -> None:
    """`edgespec bench capacity` options."""
    _add_model_args(p)
    p.add_argument("--json", required=True, help="result file")
    p.add_argument("--plots", help="folder for the PNG plots (none if omitted)")
    p.add_argument("--sessions", type=_ints, help="e.g. 1,2,4 (default 1..64, doubling)")
    p.add_argument("--rtt-ms", type=_floats, help="e.g. 20,50 (default 20,50)")
    p.add_argument("-k", type=_ints, help="fixed draft lengths, e.g. 2,4 (default 4)")
    p.add_argument(
        "--methods",
        help="subset of cloud_only,fixed,adaptive,adaptive_unpipelined,serial,tree,adaptive_tree,"
        "adaptive_tree_unpipelined,cloud_sd (default cloud_only,fixed,adaptive,serial)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--compute-profile", default="h100-70b", help="h100-70b (emulated) or real")
    p.add_argument("--edge-processes", type=int, default=4, help="worker processes of edges")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    p.add_argument(
        "--tree-shapes",
        type=_tree_shapes,
        help="the tree method's shapes, NODESxDEPTHxWIDTH each, e.g. 16x6x2,16x3x4 (default "
        "16x6x2)",
    )
    p.add_argument(
        "--generations",
        type=int,
        default=1,
        help="held concurrency: each session slot runs this many generations back to back, "
        "rotating through the benchmark prompts (default 1: N sessions start together, once "
        "each)",
    )
    p.add_argument(
        "--no-memo-pass",
        action="store_true",
        help="emulated profiles: measure without first running every session once unmeasured "
        "to fill the edges' draft memo (by default it is run, and what it teaches the edges is "
        "forgotten)",
    )
    p.add_argument(
        "--no-tree-fill",
        action="store_true",
        help="emulated profiles: do not compute the draft rows of every greedy token tree the "
        "tree methods can grow before they run (by default each worker does, once)",
    )
    p.add_argument(
        "--no-batch-overlap",
        action="store_true",
        help="the verifier starts each step only after the verdicts of the one before are "
        "handed over (its batch_overlap off)",
    )
    p.add_argument(
        "--batch-group-horizon",
        type=float,
        default=None,
        help="the verifier's batch_group_horizon: wait up to this many steps for sessions "
        "expected back when that serves more sessions per unit of verifier time (default: "
        "the verifier's own default)",
    )
    p.add_argument(
        "--ahead-branches",
        type=int,
        default=None,
        help="the edges' ahead_branches: guesses besides the main one that pipelined chains "
        "draft ahead on (default: the edge's own default)",
    )
    p.add_argument(
        "--ahead-branches-sent",
        type=int,
        default=None,
        help="the edges' ahead_branches_sent: of those guesses, how many are sent with the main "
        "one (default: the edge's own default)",
    )
    p.add_argument(
        "--links-in-workers",
        action="store_true",
        help="run each session's emulated link in its edge's worker process (the earlier "
        "layout, for comparison; by default the benchmark's own process runs every link)",
    )
    p.add_argument(
        "--link-memory",
        choices=("warm", "cold"),
        default="warm",
        help="adaptive methods: warm (each edge first runs one unmeasured generation with all "
        "the others, so it starts from what it learnt of the loaded link; default) or cold (its "
        "first session ever)",
    )
    p.add_argument(
        "--no-draft-memo",
        action="store_true",
        help="emulated profiles: every session runs its own real draft forwards (by default "
        "each worker computes a token prefix's draft forward once for all its sessions)",
    )
    p.add_argument(
        "--real-target-forwards",
        action="store_true",
        help="emulated profiles: the batching verifier runs every target forward for real (by "
        "default its greedy rows are computed ahead and each step is charged the modelled "
        "batched forward: edgespec.bench.emulated_verifier)",
    )
    p.add_argument(
        "--kv-budget-tokens",
        type=int,
        help="overload: the verifier's KV budget in tokens (default: none)",
    )
    p.add_argument(
        "--kv-admission",
        default="reserve",
        help="with --kv-budget-tokens: admission modes measured, e.g. none,reserve,evict (one "
        "verifier each; reserve: by each session's most; evict: by what sessions hold, "
        "evicting the newest when a step would pass the budget; none: no budget, the reference)",
    )
    p.add_argument(
        "--retry-after-ms",
        type=int,
        default=250,
        help="with --kv-budget-tokens: the verifier's retry hint to refused and evicted sessions",
    )
    p.add_argument(
        "--client-retries",
        type=int,
        default=40,
        help="retries of a session its client got RESOURCE_EXHAUSTED for (after the hint)",
    )


def cmd_bench_link(args: argparse.Namespace) -> int:
    """Per-round framework overhead, bytes per token, tokens/s at RTTs (edgespec.bench.link)."""
    from edgespec.bench.link import print_summary, run_link_bench  # torch (see the top)

    target_path, draft_path = resolve_pair(args.target, args.draft)
    check_pair(target_path, draft_path)
    result = run_link_bench(
        target_path,
        draft_path,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        reps=args.reps,
        rtts_ms=tuple(args.rtt) if args.rtt else (10.0, 50.0, 100.0),
        threads=args.threads,
        include_cloud_only=args.cloud_only,
        compare_serial=not args.batched_only,
        pipelined=not args.no_pipelining,
    )
    write_json(args.json, result)
    print_summary(result)
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    """Concurrent SDK sessions across edges and verifiers (edgespec.bench.load_sessions)."""
    from edgespec.bench.load_sessions import run_from_args  # torch and ray (see the top)

    return run_from_args(args)


def _bench_load_args(p: argparse.ArgumentParser) -> None:
    """`edgespec bench load` options."""
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--policy", default="fixed")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--state-dir", help="state dir of `edgespec up` (default ~/.edgespec)")
    p.add_argument("--up", action="store_true", help="bring up a local cluster for the run")
    p.add_argument("--target", help="with --up: target folder (default: shipped demo target)")
    p.add_argument("--draft", help="with --up: draft folder (default: shipped demo draft)")
    p.add_argument("--rtt-ms", type=float, default=None, help="with --up: emulated link RTT")
    p.add_argument(
        "--check", action="store_true", help="also compare every output with the target alone"
    )


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    """Sessions under actor kills and link faults (edgespec.bench.chaos)."""
    from edgespec.bench.chaos import run_from_args  # torch and ray (see the top)

    return run_from_args(args)


def cmd_bench_soak(args: argparse.Namespace) -> int:
    """Many sessions for a long time: errors, RSS, sessions at the end (edgespec.bench.soak)."""
    from edgespec.bench.soak import run_from_args  # torch and ray (see the top)

    return run_from_args(args)


def _bench_reliability_args(p: argparse.ArgumentParser, sessions: int, duration_s: float) -> None:
    """Options `edgespec bench chaos` and `soak` share (each on a local deployment)."""
    p.add_argument("--sessions", type=int, default=sessions, help="concurrent sessions")
    p.add_argument("--duration-s", type=float, default=duration_s, help="how long they run")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=60.0, help="each generation's deadline, s")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--target", help="target folder (default: shipped demo target)")
    p.add_argument("--draft", help="draft folder (default: shipped demo draft)")


def _bench_latency_args(p: argparse.ArgumentParser) -> None:
    """`edgespec bench latency` options."""
    _add_model_args(p)
    p.add_argument("--json", required=True, help="result file")
    p.add_argument("--plots", help="folder for the PNG plots (none if omitted)")
    p.add_argument(
        "--compute-profile",
        default="h100-70b",
        help="edgespec.core.profiles name: h100-70b (emulated, default) or real",
    )
    p.add_argument("--rtts", help="comma-separated RTTs in ms (default 0,5,10,25,50,100,200)")
    p.add_argument("--reps", type=int, help="repetitions per method and RTT (default 3)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per generation (default 64)")
    p.add_argument(
        "--varying-max-new-tokens", type=int, help="tokens of the varying-RTT run (default 360)"
    )
    p.add_argument("--varying-reps", type=int, help="repetitions of the varying run (default 1)")
    p.add_argument("--no-varying", action="store_true", help="skip the varying-RTT run")
    p.add_argument(
        "--no-link-cases", action="store_true", help="skip the jitter and bandwidth-limit cases"
    )
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all of them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    p.add_argument(
        "--quick", action="store_true", help="smoke size: 2 RTTs, 1 rep, short generations"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole `edgespec` command line: cluster commands, demo and benchmarks."""
    ap = argparse.ArgumentParser(prog="edgespec", description=__doc__.split("\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    # up / status / down / generate / demo: the cluster commands.
    demo = add_cluster_commands(sub, _add_model_args, _sampling_args)
    demo.add_argument(
        "--colocated",
        action="store_true",
        help="no cluster: both models in this process (the speculative core alone)",
    )
    demo.set_defaults(func=cmd_demo)

    ref = sub.add_parser(
        "reference",
        help="the target alone on this machine: reproduce a (seeded) distributed output",
    )
    ref.add_argument("prompt", help="prompt text")
    ref.add_argument("--target", help="target checkpoint folder (default: the shipped demo target)")
    ref.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _sampling_args(ref)
    ref.set_defaults(func=cmd_reference)

    bench = sub.add_parser("bench", help="benchmarks (print figures, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    core = bench_sub.add_parser("core", help="co-located core vs target alone vs HF assisted")
    _add_model_args(core)
    core.add_argument("--json", required=True, help="result file")
    core.add_argument("--max-new-tokens", type=int, default=96)
    core.add_argument("--max-k", type=int, default=8)
    core.add_argument("--reps", type=int, default=3)
    core.add_argument(
        "--draft-equals-target",
        action="store_true",
        help="use the target as its own draft (acceptance 1: measures our overhead)",
    )
    core.set_defaults(func=cmd_bench_core)
    latency = bench_sub.add_parser(
        "latency", help="tokens/s vs RTT: cloud-only, edge-only, co-located, fixed k, adaptive"
    )
    _bench_latency_args(latency)
    latency.set_defaults(func=cmd_bench_latency)
    capacity = bench_sub.add_parser(
        "capacity", help="one verifier, N edges: replica and per-session tokens/s per method"
    )
    _bench_capacity_args(capacity)
    capacity.set_defaults(func=cmd_bench_capacity)
    link = bench_sub.add_parser(
        "link", help="per-round overhead, bytes per token and tokens/s through the link emulator"
    )
    _add_model_args(link)
    link.add_argument("--json", required=True, help="result file")
    link.add_argument("-k", type=int, default=4, help="draft length")
    link.add_argument("--max-new-tokens", type=int, default=64)
    link.add_argument("--reps", type=int, default=3)
    link.add_argument("--rtt", type=float, action="append", help="emulated RTT, ms (repeatable)")
    link.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    link.add_argument("--cloud-only", action="store_true", help="also time cloud-only decoding")
    link.add_argument(
        "--batched-only",
        action="store_true",
        help="skip the RTT-0 comparison with a --no-batching verifier",
    )
    link.add_argument(
        "--no-pipelining",
        action="store_true",
        help="edges that draft nothing ahead: every round drafted, sent and verified in turn",
    )
    link.set_defaults(func=cmd_bench_link)
    sampling = bench_sub.add_parser(
        "sampling", help="coupled vs rejection sampling: acceptance, bytes, tokens/s per link"
    )
    _add_model_args(sampling)
    sampling.add_argument("--json", required=True, help="result file")
    sampling.add_argument("-k", type=int, default=4, help="draft length of the fixed policy")
    sampling.add_argument("--max-new-tokens", type=int, default=48)
    sampling.add_argument("--reps", type=int, default=1, help="passes over the prompts")
    sampling.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    sampling.add_argument(
        "--compute-profile", default="h100-70b", help="h100-70b (emulated, default) or real"
    )
    sampling.add_argument(
        "--quick", action="store_true", help="smoke size: 1 prompt, 1 link, fixed k only"
    )
    sampling.set_defaults(func=cmd_bench_sampling)
    load = bench_sub.add_parser(
        "load", help="concurrent sessions across edges and verifiers: errors, balance, exactness"
    )
    _bench_load_args(load)
    load.set_defaults(func=cmd_bench_load)
    chaos = bench_sub.add_parser(
        "chaos", help="sessions while verifiers and edges are killed and links fail"
    )
    _bench_reliability_args(chaos, sessions=8, duration_s=60.0)
    chaos.add_argument("--kill-every-s", type=float, default=20.0, help="mean time between kills")
    chaos.add_argument(
        "--fault-every-s", type=float, default=15.0, help="mean time between link faults; 0 = none"
    )
    chaos.add_argument("--seed", type=int, default=0, help="seeds the kill and fault schedule")
    chaos.add_argument(
        "--settle-s", type=float, default=90.0, help="bound on waiting for sessions to end"
    )
    chaos.add_argument(
        "--idle-ttl-s",
        type=float,
        default=30.0,
        help="verifiers' session idle TTL: frees the sessions of killed edges",
    )
    chaos.set_defaults(func=cmd_bench_chaos)
    soak = bench_sub.add_parser("soak", help="many sessions for long: errors, RSS over time")
    _bench_reliability_args(soak, sessions=64, duration_s=600.0)
    soak.add_argument("--sample-every-s", type=float, default=10.0, help="RSS sampling period")
    soak.set_defaults(func=cmd_bench_soak)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the `edgespec` command `argv` (default: sys.argv); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        # Expected failures (bad input, missing files, a cluster that is down, a failed call)
        # print one line; anything else is a bug and keeps its traceback.
        expected = (ValueError, FileNotFoundError, RuntimeError, TimeoutError, ConnectionError)
        if not isinstance(exc, expected + (EdgespecError,)):
            raise
        logger.error("%s: %s", type(exc).__name__, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
