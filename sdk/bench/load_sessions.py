"""Concurrent SDK sessions across edges and verifiers: errors, balance and (optionally) exactness.

Starts `sessions` generations at once with the asyncio SDK, spread round-robin over the edges;
each edge asks the orchestrator for a verifier per session (least loaded). Reports the errors,
how many sessions each verifier finished (from each session's summary, cross-checked with the
orchestrator's assignment counters), the peak number of sessions the orchestrator saw on each
verifier at once, and the balance:

    imbalance = (max - min) / mean  over the verifiers' session counts;  balanced: <= 0.25

Against a running deployment (``edgespec up``)::

    edgespec bench load --sessions 16 --json runs/load_sessions.json

or self-contained (a local cluster of 2 edge and 2 cloud nodes, torn down at the end)::

    edgespec bench load --up --target T --draft D --json runs/load_sessions.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from edgespec.async_client import AsyncClient
from edgespec.core.demo_pair import resolve_pair
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.validation import check_int
from edgespec.linkemu import LinkProfile
from edgespec.orchestrator import connection, deploy, nodes
from edgespec.orchestrator.names import NAMESPACE

logger = logging.getLogger(__name__)

BALANCE_LIMIT = 0.25
PROMPTS = (
    "def read_config(path):\n",
    "class Cache:\n    def __init__(self, size):\n",
    "import os\nimport sys\n\n",
    "for key, value in items.items():\n",
    '"""Return the list of files under path."""\n',
    "    if not isinstance(value, int):\n",
    "with open(path) as f:\n",
    "def __repr__(self):\n",
)


def imbalance(counts: Sequence[int]) -> float:
    """(max - min) / mean of per-verifier session counts; 0 = perfectly even."""
    if not counts or sum(counts) == 0:
        return 0.0
    return (max(counts) - min(counts)) / statistics.fmean(counts)


class _LoadSampler:
    """Polls the orchestrator's per-verifier load while the sessions run (peak concurrency)."""

    def __init__(self, orchestrator, interval_s: float = 0.1) -> None:
        self.orchestrator = orchestrator
        self.interval_s = interval_s
        self.peak: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load-sampler")

    def __enter__(self) -> _LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                eps = ray.get(self.orchestrator.endpoints.remote("verifier"), timeout=5)
            except Exception as err:  # a sample lost is not an error of the run
                logger.debug("load sample failed: %s", err)
            else:
                self.samples += 1
                for e in eps:
                    self.peak[e["endpoint_id"]] = max(self.peak[e["endpoint_id"]], e["load"])
            self._stop.wait(self.interval_s)


async def _one_session(edge: str, prompt: str | list[int], params, policy: str, k: int, timeout_s):
    async with AsyncClient(edge, timeout=timeout_s) as client:
        return await client.generate(prompt, params, policy=policy, draft_tokens=k)


async def _run_sessions(edges, prompts, params, policy, k, timeout_s):
    calls = [
        _one_session(edges[i % len(edges)], prompts[i], params, policy, k, timeout_s)
        for i in range(len(prompts))
    ]
    return await asyncio.gather(*calls, return_exceptions=True)


def run_load_sessions(
    orchestrator,
    *,
    sessions: int = 16,
    prompts: Sequence[str | list[int]] = PROMPTS,
    max_new_tokens: int = 32,
    policy: str = "fixed",
    k: int = 4,
    timeout_s: float = 120.0,
    expected: dict[int, list[int]] | None = None,
) -> dict[str, Any]:
    """Run `sessions` concurrent greedy generations through the deployment of `orchestrator`.

    Needs a Ray connection (`orchestrator.connection.connect`). Session i uses prompts[i % len]
    and edge i % edges. `expected`: session index -> the target-alone tokens; sessions whose
    output differs are counted in ``mismatches``. Returns the JSON-ready result.
    """
    check_int("sessions", sessions, 1)
    edges_info = ray.get(orchestrator.endpoints.remote("edge"), timeout=30)
    verifiers_before = ray.get(orchestrator.endpoints.remote("verifier"), timeout=30)
    serving = [e for e in edges_info if e["health"] == "SERVING"]
    edges = [e["address"] for e in serving]
    edge_ids = [e["endpoint_id"] for e in serving]
    if not edges:
        raise RuntimeError(f"no serving edge among {[e['endpoint_id'] for e in edges_info]}")
    session_prompts = [prompts[i % len(prompts)] for i in range(sessions)]
    params = SamplingParams(max_new_tokens=max_new_tokens)

    with _LoadSampler(orchestrator) as sampler:
        t0 = time.perf_counter()
        results = asyncio.run(_run_sessions(edges, session_prompts, params, policy, k, timeout_s))
        wall_s = time.perf_counter() - t0

    verifiers_after = ray.get(orchestrator.endpoints.remote("verifier"), timeout=30)
    by_address = {v["address"]: v["endpoint_id"] for v in verifiers_after}
    # With an emulated link the edge dials the emulator in front of the verifier: map it back.
    for e in edges_info:
        actor = ray.get_actor(e["endpoint_id"], namespace=NAMESPACE)
        stats = ray.get(actor.stats.remote(), timeout=30)
        for verifier_address, link in stats.get("links", {}).items():
            by_address[link["via"]] = by_address.get(verifier_address, verifier_address)

    errors: list[str] = []
    per_verifier: Counter[str] = Counter({v["endpoint_id"]: 0 for v in verifiers_after})
    per_edge: Counter[str] = Counter()
    mismatches = 0
    tokens = 0
    reconnects = 0
    for i, res in enumerate(results):
        if isinstance(res, BaseException):
            errors.append(f"session {i}: {type(res).__name__}: {res}")
            continue
        tokens += len(res.token_ids)
        reconnects += res.stats.reconnects
        per_verifier[by_address.get(res.stats.verifier, res.stats.verifier)] += 1
        per_edge[edge_ids[i % len(edges)]] += 1
        if expected is not None and i in expected and res.token_ids != expected[i]:
            mismatches += 1
    before = {v["endpoint_id"]: v["total_assigned"] for v in verifiers_before}
    assigned = {
        v["endpoint_id"]: v["total_assigned"] - before.get(v["endpoint_id"], 0)
        for v in verifiers_after
    }
    counts = [per_verifier[v["endpoint_id"]] for v in verifiers_after]
    result = {
        "sessions": sessions,
        "edges": len(edges),
        "verifiers": len(verifiers_after),
        "max_new_tokens": max_new_tokens,
        "policy": policy,
        "k": k,
        "errors": len(errors),
        "error_messages": errors[:10],
        "per_verifier_sessions": dict(per_verifier),
        "per_verifier_assigned": assigned,  # the orchestrator's count (reassignments included)
        "per_verifier_peak_load": dict(sampler.peak),
        "load_samples": sampler.samples,
        "per_edge_sessions": dict(per_edge),
        "imbalance": imbalance(counts),
        "balance_limit": BALANCE_LIMIT,
        "balanced": imbalance(counts) <= BALANCE_LIMIT,
        "reconnects": reconnects,
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
    }
    if expected is not None:
        result["mismatches"] = mismatches
    return result


def _reference(target: Path, prompts: list, sessions: int, max_new_tokens: int):
    """Token-id prompts and the target-alone greedy output of each session (for --check)."""
    tokenizer = load_tokenizer(target)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    runner = ModelRunner.from_pretrained(target, device="cpu")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs = [generate_autoregressive(runner, p, params).tokens for p in ids]
    return ids, {i: outputs[i % len(ids)] for i in range(sessions)}


def print_summary(result: dict[str, Any]) -> None:
    """Errors, balance and throughput of a run on stdout."""
    print(
        f"{result['sessions']} sessions over {result['edges']} edges / {result['verifiers']} "
        f"verifiers: {result['errors']} errors, {result['reconnects']} reconnects"
    )
    print(f"  sessions per verifier: {result['per_verifier_sessions']}")
    print(f"  peak concurrent load:  {result['per_verifier_peak_load']}")
    print(f"  sessions per edge:     {result['per_edge_sessions']}")
    ok = "balanced" if result["balanced"] else "NOT balanced"
    print(f"  imbalance {result['imbalance']:.3f} ({ok}, limit {result['balance_limit']})")
    print(
        f"  {result['tokens']} tokens in {result['wall_s']:.2f} s = {result['tokens_per_s']:.1f}/s"
    )
    if "mismatches" in result:
        print(f"  outputs different from the target alone: {result['mismatches']}")


def run_from_args(args: argparse.Namespace) -> int:
    """`edgespec bench load`: run with its options (bringing a local cluster up and down with
    --up), print the summary, write the JSON if asked. Exit status 0 when every session
    succeeded and the verifiers were balanced, else 1."""
    state = None
    if args.up:
        target, draft = resolve_pair(args.target, args.draft)
        state_dir = Path(tempfile.mkdtemp(prefix="edgespec-load-"))
        state = nodes.start_local_cluster(state_dir, progress=logger.info)
        connection.connect_state(state)
        link = LinkProfile(rtt_ms=args.rtt_ms).to_dict() if args.rtt_ms is not None else None
        spec = deploy.DeploySpec.simple(target, draft, verifiers=2, edges=2, link=link)
        deploy.deploy(spec, progress=logger.info)
    else:
        loaded = nodes.ClusterState.load(nodes.resolve_state_dir(args.state_dir))
        target = Path(loaded.deployed.get("target", ""))  # read only with --check
        connection.connect_state(loaded)
    try:
        prompts: list[str | list[int]] = list(PROMPTS)
        expected = None
        if args.check:
            prompts, expected = _reference(target, prompts, args.sessions, args.max_new_tokens)
        result = run_load_sessions(
            connection.get_orchestrator(),
            sessions=args.sessions,
            prompts=prompts,
            max_new_tokens=args.max_new_tokens,
            policy=args.policy,
            k=args.k,
            timeout_s=args.timeout,
            expected=expected,
        )
    finally:
        if state is not None:
            deploy.teardown()
            connection.disconnect()
            nodes.stop_local_cluster(state)
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            connection.disconnect()
    print_summary(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors"] == 0 and result["balanced"] else 1
