"""Link benchmark: what the edge-cloud link costs per round, per token and at real RTTs.

A verifier runs as a separate process (`python -m edgespec.cloud.server`), the edge (`EdgeEngine`) in this
one; both use the real models (compute profile "real"). Three measurements:

1. RTT 0 (edge connected straight to the verifier): per-round *framework overhead*
   (`RoundRecord.overhead_ms`) = the round's cycle (previous round recorded -> this one
   recorded, `cycle_ms`) - the drafting on that time - the compute the verdict waited for,
   where drafting is `Drafter.propose` (none for a block drafted ahead during the round before:
   pipelined) and the compute waited for is the longer of the `verify_ms` the verifier reports
   (forward + acceptance) and the drafting ahead the edge ran beside it before reading the
   verdict (`ahead_draft_ms`; `overhead_ms_p50_forward_only` subtracts the forward alone, as
   before session 24, and `ahead_outlasts_forward_share` says how often the two differ). What
   is left is everything the framework adds: conversions, serialisation, gRPC both ways, the
   verifier's executor hand-off (its `queue_ms`), committing the verdict and the bookkeeping
   of the round (records, the policy, the streamed text). Reported as the median over all
   rounds (`overhead_ms_p50`; goal < 1 ms), over the *fresh* rounds alone
   (`overhead_ms_p50_fresh`: drafted, sent and verified one after the other, every guess
   drafted ahead having missed) and over those whose block was drafted ahead, with the parts of
   a fresh round, once with the engine's defaults (pipelined, three guesses drafted ahead as
   branches; one session: drafting on the event loop) and once drafting on the worker thread
   (as with many sessions). Both against the batching verifier (the default); with
   `compare_serial`, the first engine also against a second verifier process run with
   ``--no-batching`` (one block per forward, one session at a time), interleaved with the
   others, and the ratio of the two.
   The floor under it, interleaved with the same reps: a bare grpc.aio echo stream
   (`edgespec.bench.grpc_floor`) whose answer waits the verifier's median forward, on a worker
   thread as the verifier's does (`grpc_floor_ms`), and what the fresh rounds cost above it
   (`overhead_fresh_above_floor_ms`): edgespec's own share, both services' Python.
2. Bytes on the wire per accepted token (serialized messages both ways, OpenSession included;
   every output token is one the verifier accepted): greedy (no draft probabilities), sampling
   with top-k truncation (sparse q) and sampling without truncation (dense q, k x V floats).
3. Tokens/s at emulated RTTs through `edgespec.linkemu.LinkEmulator`, with the RTT each round
   really saw (`rtt_ms_measured`: median per-round network time at the edge = wall - verify -
   queue) and the delay the emulator reports it added.

Tokens/s is total generated tokens / total wall time of the generations (prefills and TTFT
included). The host's load average (1, 5, 15 min) at the start and the end is recorded too: on
a shared host every figure above moves with it. `edgespec bench link --json FILE` wraps
`run_link_bench`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from edgespec.bench.grpc_floor import FloorClient, floor_servers, quantile
from edgespec.bench.processes import torch_threads, verifier_process
from edgespec.core.params import SamplingParams
from edgespec.core.validation import check_int
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import RoundRecord, SummaryEvent
from edgespec.linkemu import LinkEmulator, LinkProfile

logger = logging.getLogger(__name__)

OVERHEAD_GOAL_MS = 1.0
# The bare grpc.aio floor, interleaved with the RTT-0 reps (`edgespec.bench.grpc_floor`): round
# trips per mode per rep, after a warm-up whose answers wait a typical forward.
FLOOR_ROUNDS_PER_REP = 60
FLOOR_WARMUP = 20
FLOOR_WORK_MS = 10.0
DEFAULT_PROMPTS = (
    "def read_config(path):\n",
    "The edge drafts a few tokens and the cloud",
    "for i in range(10):\n",
)
# Sampling settings for the bytes measurement: truncated (sparse q) and untruncated (dense q).
# Rejection sampling: the edge sends q (coupled sampling, the default, sends ids only; its bytes
# are `edgespec bench sampling`'s subject).
SAMPLING_SPARSE = SamplingParams(temperature=1.0, top_k=50, sampler="rejection")
SAMPLING_DENSE = SamplingParams(temperature=1.0, sampler="rejection")


def _round_summary(records: list[RoundRecord]) -> dict:
    med = statistics.median
    fresh_records = [r for r in records if not r.pipelined]
    fresh = [r.overhead_ms for r in fresh_records]
    piped = [r.overhead_ms for r in records if r.pipelined]
    return {
        "rounds": len(records),
        "pipelined_share": sum(r.pipelined for r in records) / len(records),
        "overhead_ms_p50": med(r.overhead_ms for r in records),
        "overhead_ms_p90": quantile([r.overhead_ms for r in records], 0.9),
        "overhead_ms_p50_fresh": med(fresh) if fresh else None,
        "overhead_ms_p50_pipelined": med(piped) if piped else None,
        # the rule before session 24: the forward alone subtracted, as if no drafting ahead
        # could outlast it (then its excess counts as overhead)
        "overhead_ms_p50_forward_only": med(
            r.cycle_ms - r.on_path_draft_ms - r.timing.verify_ms for r in records
        ),
        "ahead_outlasts_forward_share": sum(r.ahead_draft_ms > r.timing.verify_ms for r in records)
        / len(records),
        "round_ms_p50": med(r.cycle_ms for r in records),
        "draft_ms_p50": med(r.draft_ms for r in records),
        "verify_ms_p50": med(r.timing.verify_ms for r in records),
        "queue_ms_p50": med(r.timing.queue_ms for r in records),
        "network_ms_p50": med(r.timing.network_ms for r in records),
        "apply_ms_p50": med(r.apply_ms for r in records),
        # The split of a fresh round's overhead: the edge's own share (everything outside
        # drafting and the link call) and the link's (wall of the call minus the compute it
        # waited for, the forward or the drafting ahead beside it: gRPC both ways, the wire,
        # the verifier service's hand-offs). A block drafted ahead was
        # sent during the round before and waited there for that round's step: its call
        # overlaps two rounds and splits neither.
        "edge_overhead_ms_p50": med(
            r.cycle_ms - r.draft_ms - r.timing.wall_ms for r in fresh_records
        )
        if fresh_records
        else None,
        "link_overhead_ms_p50": med(r.timing.wall_ms - r.awaited_compute_ms for r in fresh_records)
        if fresh_records
        else None,
    }


class RunTotals:
    """Totals over a set of generations (shared by the link and sampling benchmarks)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.rounds = 0
        self.wall_s = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.drafted = 0
        self.accepted = 0
        self.records: list[RoundRecord] = []

    def add(self, summary: SummaryEvent, wall_s: float) -> None:
        st = summary.stats
        self.tokens += len(summary.tokens)
        self.rounds += st.rounds
        self.wall_s += wall_s
        self.bytes_sent += st.bytes_sent
        self.bytes_received += st.bytes_received
        self.drafted += st.drafted
        self.accepted += st.accepted
        self.records.extend(st.round_records)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def bytes_per_token(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "total": (self.bytes_sent + self.bytes_received) / n,
            "sent": self.bytes_sent / n,
            "received": self.bytes_received / n,
        }


async def _generate_all(
    engine: EdgeEngine,
    prompts: Sequence[str],
    params: SamplingParams,
    k: int,
    reps: int,
    policy: str = "fixed",
    runs: RunTotals | None = None,
) -> RunTotals:
    """`reps` passes over `prompts` (sampling seeds differ per run), added to `runs`."""
    runs = runs if runs is not None else RunTotals()
    for rep in range(reps):
        for i, prompt in enumerate(prompts):
            p = params if params.is_greedy else replace(params, seed=1000 * rep + i)
            t0 = time.perf_counter()
            summary = await engine.collect(prompt, p, k=k, policy=policy)
            runs.add(summary, time.perf_counter() - t0)
    return runs


def run_link_bench(
    target_path: str | Path,
    draft_path: str | Path,
    *,
    k: int = 4,
    max_new_tokens: int = 64,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    reps: int = 3,
    rtts_ms: Sequence[float] = (10.0, 50.0, 100.0),
    rtt_reps: int = 1,
    threads: int | None = 1,
    include_cloud_only: bool = False,
    start_timeout_s: float = 180.0,
    compare_serial: bool = True,
    pipelined: bool = True,
) -> dict:
    """Run the link benchmark (see the module docstring) and return its JSON-able result.

    `reps`: passes over `prompts` at RTT 0 (and for the bytes); `rtt_reps`: passes per emulated
    RTT. `threads`: torch intra-op threads for the edge (this process) and the verifier process,
    both on this host (None = torch's default). `include_cloud_only`: also time the cloud-only
    baseline (k = 0, one verifier forward per token) at each RTT. `compare_serial`: also measure
    the RTT-0 overhead against a ``--no-batching`` verifier (`rtt0_no_batching`). `pipelined`
    False: the edges draft nothing ahead (every round fresh), which isolates the framework's
    share from drafting that runs beside the verifier's forward on the same host.
    """
    check_int("k", k, 1, 32)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    for name, value in (("reps", reps), ("rtt_reps", rtt_reps), ("max_new_tokens", max_new_tokens)):
        check_int(name, value, 1)
    greedy = SamplingParams(max_new_tokens=max_new_tokens)
    sparse = replace(SAMPLING_SPARSE, max_new_tokens=max_new_tokens)
    dense = replace(SAMPLING_DENSE, max_new_tokens=max_new_tokens)

    async def bench(address: str, serial_address: str | None, floor_ports: dict[str, int]) -> dict:
        host, port = address.rsplit(":", 1)
        result: dict = {}
        # The engine as a user runs it (pipelined, guesses drafted ahead as branches).
        defaults = EngineConfig(pipelined=pipelined)
        engine = EdgeEngine.from_pretrained(
            draft_path, [address], link_config=LinkConfig(round_timeout_s=30.0), config=defaults
        )
        threaded = EdgeEngine(
            engine.model,
            engine.tokenizer,
            [address],
            link_config=engine.link_config,
            config=replace(defaults, draft_in_thread=True),
        )
        # The same edge against the one-at-a-time verifier (None: not compared).
        serial = None
        if serial_address is not None:
            serial = EdgeEngine(
                engine.model,
                engine.tokenizer,
                [serial_address],
                link_config=engine.link_config,
                config=defaults,
            )
        floor = FloorClient(floor_ports)
        try:
            # Warm-up: kernels for every shape the prompts need, channels connected.
            await _generate_all(engine, prompts, greedy, k, 1)
            await _generate_all(threaded, prompts[:1], greedy, k, 1)
            if serial is not None:
                await _generate_all(serial, prompts, greedy, k, 1)
            await floor.rounds(FLOOR_WARMUP, FLOOR_WORK_MS, record=False)
            runs, runs_thread, runs_serial = RunTotals(), RunTotals(), RunTotals()
            work_ms = FLOOR_WORK_MS
            for _ in range(reps):  # interleaved, so drift of the host hits all alike
                await _generate_all(engine, prompts, greedy, k, 1, runs=runs)
                # the floor's answers wait what the verifier's forwards took so far
                work_ms = statistics.median(r.timing.verify_ms for r in runs.records)
                await floor.rounds(FLOOR_ROUNDS_PER_REP, work_ms)
                await _generate_all(threaded, prompts, greedy, k, 1, runs=runs_thread)
                if serial is not None:
                    await _generate_all(serial, prompts, greedy, k, 1, runs=runs_serial)
            rtt0 = _round_summary(runs.records)
            rtt0.update(tokens_per_s=runs.tokens_per_s, acceptance_rate=runs.acceptance_rate)
            result["rtt0"] = rtt0
            result["rtt0_draft_on_worker_thread"] = _round_summary(runs_thread.records)
            result["overhead_ms_p50"] = rtt0["overhead_ms_p50"]
            floor_ms = floor.summary()
            result["grpc_floor_ms"] = {"work_ms": work_ms, **floor_ms}
            if rtt0["overhead_ms_p50_fresh"] is not None:
                result["overhead_fresh_above_floor_ms"] = (
                    rtt0["overhead_ms_p50_fresh"] - floor_ms["thread"]["p50"]
                )
            if serial is not None:
                rtt0_serial = _round_summary(runs_serial.records)
                rtt0_serial["tokens_per_s"] = runs_serial.tokens_per_s
                result["rtt0_no_batching"] = rtt0_serial
                result["overhead_p50_batched_over_no_batching"] = (
                    rtt0["overhead_ms_p50"] / rtt0_serial["overhead_ms_p50"]
                )

            per_token = {"greedy": runs.bytes_per_token()}
            for name, params in (("sampling", sparse), ("sampling_dense", dense)):
                per_token[name] = (
                    await _generate_all(engine, prompts, params, k, 1)
                ).bytes_per_token()
            result["bytes_per_accepted_token"] = {n: v["total"] for n, v in per_token.items()}
            result["bytes_per_accepted_token_detail"] = per_token

            rows = []
            with LinkEmulator(host, int(port), LinkProfile(rtt_ms=0)) as emu:
                via = EdgeEngine(
                    engine.model,
                    engine.tokenizer,
                    [emu.address],
                    link_config=engine.link_config,
                    config=defaults,
                )
                try:
                    for rtt in rtts_ms:
                        emu.set_profile(LinkProfile(rtt_ms=rtt))
                        await _generate_all(via, prompts[:1], greedy, k, 1)  # reconnect, warm
                        emu.reset_stats()
                        spec = await _generate_all(via, prompts, greedy, k, rtt_reps)
                        link = emu.stats()
                        row = {
                            "rtt_ms_set": rtt,
                            "rtt_ms_measured": statistics.median(
                                r.timing.network_ms for r in spec.records
                            ),
                            "emulator_added_rtt_ms": link.rtt_ms_measured,
                            "tokens_per_s": spec.tokens_per_s,
                            "rounds": len(spec.records),
                            "acceptance_rate": spec.acceptance_rate,
                        }
                        if include_cloud_only:
                            cloud = await _generate_all(
                                via, prompts, greedy, k, rtt_reps, policy="cloud_only"
                            )
                            row["cloud_only_tokens_per_s"] = cloud.tokens_per_s
                        rows.append(row)
                        logger.info("rtt %.0f ms: %.1f tokens/s", rtt, row["tokens_per_s"])
                finally:
                    await via.aclose()
            result["rtt"] = rows
        finally:
            await floor.aclose()
            if serial is not None:
                await serial.aclose()
            await threaded.aclose()
            await engine.aclose()
        return result

    target = Path(target_path)
    load_start = os.getloadavg()  # the host is shared: say how busy it was
    with ExitStack() as stack:
        stack.enter_context(torch_threads(threads))
        addr = stack.enter_context(verifier_process(target, threads, start_timeout_s))
        serial_addr = None
        if compare_serial:
            serial_addr = stack.enter_context(
                verifier_process(target, threads, start_timeout_s, ["--no-batching"])
            )
        floor_ports = stack.enter_context(floor_servers())
        measured = asyncio.run(bench(addr, serial_addr, floor_ports))
    return {
        "bench": "link",
        "compute_profile": "real",
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "target": str(target_path),
        "draft": str(draft_path),
        "k": k,
        "pipelined": pipelined,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "reps": reps,
        "rtt_reps": rtt_reps,
        "torch_threads": threads,
        "overhead_goal_ms": OVERHEAD_GOAL_MS,
        "sampling_params": {"sampling": sparse.to_dict(), "sampling_dense": dense.to_dict()},
        "link_emulator": "user-space TCP proxy on 127.0.0.1 (edgespec.linkemu)",
        "load_avg_1_5_15_min": {"start": list(load_start), "end": list(os.getloadavg())},
        **measured,
    }


def print_summary(result: dict) -> None:
    """The link benchmark's headline figures on stdout."""
    r0 = result["rtt0"]
    load = result["load_avg_1_5_15_min"]
    print(
        f"host load average (1 min): {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end"
    )
    print(
        f"RTT 0: overhead p50 {r0['overhead_ms_p50']:.3f} ms/round (goal < {OVERHEAD_GOAL_MS} ms), "
        f"draft {r0['draft_ms_p50']:.2f} ms, verify {r0['verify_ms_p50']:.2f} ms, "
        f"{r0['tokens_per_s']:.1f} tokens/s"
    )
    piped = r0["overhead_ms_p50_pipelined"]
    print(
        f"  overhead p90 {r0['overhead_ms_p90']:.3f} ms; rounds whose block was drafted ahead: "
        + (f"p50 {piped:.3f} ms" if piped is not None else "none")
    )
    print(
        f"  drafting ahead outlasted the forward in {r0['ahead_outlasts_forward_share']:.0%} of "
        f"the rounds; the forward alone subtracted: p50 {r0['overhead_ms_p50_forward_only']:.3f} ms"
    )
    floor = result["grpc_floor_ms"]
    fresh = r0["overhead_ms_p50_fresh"]
    fresh_text = "-"
    if fresh is not None:
        fresh_text = (
            f"{fresh:.3f} ms (edge {r0['edge_overhead_ms_p50']:.3f} ms, link: gRPC + verifier "
            f"service {r0['link_overhead_ms_p50']:.3f} ms)"
        )
    print(
        f"  fresh rounds ({1 - r0['pipelined_share']:.0%} of them: drafted, sent, verified in "
        f"turn): p50 {fresh_text}"
        f"; bare grpc.aio floor (same run, {floor['work_ms']:.1f} ms of work per answer): "
        f"{floor['thread']['p50']:.3f} ms with the model thread's hand-off, "
        f"{floor['inline']['p50']:.3f} ms without"
    )
    if "overhead_fresh_above_floor_ms" in result:
        print(
            f"  edgespec's own share (fresh p50 - floor with hand-off): "
            f"{result['overhead_fresh_above_floor_ms']:.3f} ms"
        )
    serial = result.get("rtt0_no_batching")
    if serial is not None:
        print(
            f"  --no-batching verifier (same run): overhead p50 {serial['overhead_ms_p50']:.3f} "
            f"ms, p90 {serial['overhead_ms_p90']:.3f} ms; batched / no-batching p50 "
            f"{result['overhead_p50_batched_over_no_batching']:.2f}"
        )
    print("bytes per accepted token:", json.dumps(result["bytes_per_accepted_token"]))
    for row in result["rtt"]:
        print(
            f"RTT {row['rtt_ms_set']:g} ms (measured {row['rtt_ms_measured']:.1f}): "
            f"{row['tokens_per_s']:.1f} tokens/s"
        )
