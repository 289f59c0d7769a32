"""Soak: many sessions kept busy for a long time against a local deployment.

`edgespec bench soak` brings up a local deployment on 127.0.0.1 (`local_deployment`: 2 verifiers,
2 edges), keeps ``--sessions`` greedy generations busy for ``--duration-s`` (`session_driver`;
every output is compared with the target alone), and every ``--sample-every-s`` records each
actor process's RSS (``/proc/<pid>/status``; the pid from the actor's own info) and the
sessions each engine holds. At the end it waits (bounded) for every engine to hold no session.
Figures: errors by status, RSS at start and end per actor and per service (verifier, edge) with
the growth after warm-up (from the sample at ``WARMUP_FRACTION`` of the run), sessions at the
end. Exit status 0 when nothing failed, every output was identical and no session was left.
Not for CI (10 minutes by default)::

    edgespec bench soak --sessions 64 --duration-s 600 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgespec.bench.local_deployment import LocalDeployment, LocalDeploymentConfig, rss_bytes
from edgespec.bench.session_driver import DriverConfig, Tally, reference_outputs, run_sessions
from edgespec.core.demo_pair import resolve_pair
from edgespec.core.validation import check_float, check_int

logger = logging.getLogger(__name__)

SETTLE_S = 90.0  # bound on waiting for the sessions to drain at the end
WARMUP_FRACTION = 0.2  # the RSS "after warm-up" baseline: the first sample past this share


def _service(name: str) -> str:
    return "verifier" if "verifier" in name else "edge"


async def _sample_until(
    dep: LocalDeployment, stop_at: float, every_s: float, t0: float, samples: list[dict]
) -> None:
    """Every `every_s` until `stop_at`: RSS (MiB) and open sessions of every actor."""
    while True:
        pids = await dep.pids()
        rss = {n: rss_bytes(p) for n, p in pids.items()}
        sample: dict[str, Any] = {
            "t": round(time.monotonic() - t0, 1),
            "rss_mib": {n: round(b / 2**20, 1) for n, b in rss.items() if b is not None},
            "pid": pids,
            "sessions": await dep.sessions_open(),
        }
        samples.append(sample)
        logger.info("soak sample %s", sample)
        if time.monotonic() + every_s > stop_at:
            return
        await asyncio.sleep(every_s)


def _rss_summary(samples: list[dict], duration_s: float) -> dict[str, Any]:
    """RSS at start, after warm-up and at the end, per actor and per service (sum over actors)."""
    if not samples:
        return {}
    start, end = samples[0], samples[-1]
    warm = next((s for s in samples if s["t"] >= WARMUP_FRACTION * duration_s), start)

    def per_service(sample: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, mib in sample["rss_mib"].items():
            out[_service(name)] = round(out.get(_service(name), 0.0) + mib, 1)
        return out

    services = {
        svc: {
            "start_mib": per_service(start).get(svc),
            "after_warmup_mib": per_service(warm).get(svc),
            "end_mib": per_service(end).get(svc),
        }
        for svc in ("verifier", "edge")
    }
    for figures in services.values():
        if figures["after_warmup_mib"] is not None and figures["end_mib"] is not None:
            figures["growth_after_warmup_mib"] = round(
                figures["end_mib"] - figures["after_warmup_mib"], 1
            )
    actors = {
        name: {"start_mib": start["rss_mib"].get(name), "end_mib": end["rss_mib"].get(name)}
        for name in sorted(set(start["rss_mib"]) | set(end["rss_mib"]))
    }
    # a pid that changed means the actor restarted: its RSS series is not one process's
    restarted = sorted(n for n in end["pid"] if start["pid"].get(n) != end["pid"][n])
    return {
        "per_service": services,
        "per_actor": actors,
        "warmup_sample_t": warm["t"],
        "restarted": restarted,
    }


async def _run(dep: LocalDeployment, config: DriverConfig, every_s: float, refs: tuple) -> dict:
    prompts, references = refs
    tally = Tally()
    samples: list[dict] = []
    t0 = time.monotonic()
    sampler = asyncio.create_task(_sample_until(dep, t0 + config.duration_s, every_s, t0, samples))
    wall_s = await run_sessions(config, prompts, references, dep.serving_edges, tally)
    await asyncio.gather(sampler, return_exceptions=True)
    left, settle_s = await dep.wait_sessions_zero(SETTLE_S)
    # one more sample once the load is gone
    pids = await dep.pids()
    final_rss = {n: rss_bytes(p) for n, p in pids.items()}
    samples.append(
        {
            "t": round(time.monotonic() - t0, 1),
            "rss_mib": {n: round(b / 2**20, 1) for n, b in final_rss.items() if b is not None},
            "pid": pids,
            "sessions": left,
            "after_load": True,
        }
    )
    errors = sum(tally.failed.values()) + sum(tally.failed_without_status.values())
    result = {
        "config": {
            "sessions": config.sessions,
            "duration_s": config.duration_s,
            "sample_every_s": every_s,
            "max_new_tokens": config.max_new_tokens,
            "k": config.k,
            "timeout_s": config.timeout_s,
        },
        "wall_s": round(wall_s, 1),
        **tally.to_dict(),
        "errors": errors,
        "tokens_per_s": round(tally.tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "rss": _rss_summary(samples, config.duration_s),
        "samples": samples,
        "sessions_at_end": left,
        "sessions_settle_s": round(settle_s, 1),
    }
    result["ok"] = bool(
        errors == 0
        and tally.accounting_ok()
        and tally.mismatches == 0
        and all(c == 0 for c in left.values())
    )
    return result


def run_soak(
    sessions: int = 64,
    duration_s: float = 600.0,
    sample_every_s: float = 10.0,
    *,
    max_new_tokens: int = 48,
    timeout_s: float = 60.0,
    target: Path | None = None,
    draft: Path | None = None,
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """One soak run on a fresh local deployment (torn down at the end); the JSON-ready result."""
    check_int("sessions", sessions, 1, 256)
    check_float("duration_s", duration_s, 1.0, 7200.0)
    check_float("sample_every_s", sample_every_s, 0.5)
    target_path, draft_path = resolve_pair(target, draft)
    progress("computing the target-alone references")
    refs = reference_outputs(target_path, max_new_tokens)
    config = DriverConfig(
        sessions=sessions,
        duration_s=duration_s,
        max_new_tokens=max_new_tokens,
        timeout_s=timeout_s,
    )
    with LocalDeployment(LocalDeploymentConfig(target_path, draft_path), progress) as dep:
        progress(f"soak: {sessions} sessions for {duration_s:g} s")
        result = asyncio.run(_run(dep, config, sample_every_s, refs))
    result["target"], result["draft"] = str(target_path), str(draft_path)
    return result


def print_summary(result: dict[str, Any]) -> None:
    """The run's figures on stdout."""
    cfg = result["config"]
    print(
        f"soak: {cfg['sessions']} sessions for {result['wall_s']} s: submitted "
        f"{result['submitted']}, succeeded {result['succeeded']}, errors {result['errors']} "
        f"{result['failed_by_status']}"
    )
    print(
        f"  identical to the target alone: {result['identical_outputs']}/{result['succeeded']}; "
        f"{result['tokens']} tokens ({result['tokens_per_s']}/s)"
    )
    for svc, fig in result["rss"].get("per_service", {}).items():
        print(
            f"  {svc} RSS (MiB, all replicas): start {fig['start_mib']}, after warm-up "
            f"{fig['after_warmup_mib']}, end {fig['end_mib']} "
            f"(growth after warm-up {fig.get('growth_after_warmup_mib')})"
        )
    print(f"  sessions at the end: {result['sessions_at_end']}")
    print(f"  {'OK' if result['ok'] else 'FAILED'}")


def run_from_args(args: argparse.Namespace) -> int:
    """`edgespec bench soak`: run, print the figures, write the JSON if asked; 0 when ok."""
    result = run_soak(
        args.sessions,
        args.duration_s,
        args.sample_every_s,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        target=args.target,
        draft=args.draft,
    )
    print_summary(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1
