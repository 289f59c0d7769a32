"""Chaos under load: concurrent sessions while actors are killed and links fail.

`edgespec bench chaos` brings up a local deployment on 127.0.0.1 (`local_deployment`: 2 verifiers,
2 edges, an emulated edge<->verifier link), keeps ``--sessions`` greedy generations busy for
``--duration-s`` (`session_driver`), and meanwhile, from a seeded random schedule:

- every ~``--kill-every-s`` (0.5x-1.5x) kills one verifier or edge actor with
  ``ray.kill(no_restart=False)`` (Ray restarts it; it registers again with the orchestrator),
  waiting first until every endpoint serves, so there is always someone to fail over to;
- every ~``--fault-every-s`` faults one edge's links (`EdgeActor.link_fault`): a connection
  reset (cut, then restore after 0.2-1 s), a blackhole of 2-4 s, or a bandwidth collapse to
  ``COLLAPSED_MBPS`` for 3-6 s.

Then it waits (bounded) for every verifier and edge to hold no session and checks:
``submitted = succeeded + failed with a status`` (counted by gRPC status code), every succeeded
output identical to the target alone (`generate_autoregressive`), no session left anywhere.
Blocks resent after a fault are answered REPLAYED by the verifier, applied once: the run sums
the verifiers' ``replayed`` counters (read before each kill and at the end). Exit status 0 when
all checks hold, else 1. Example::

    edgespec bench chaos --sessions 8 --duration-s 600 --kill-every-s 20 --json run.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from edgespec.bench.local_deployment import LocalDeployment, LocalDeploymentConfig
from edgespec.bench.session_driver import DriverConfig, Tally, reference_outputs, run_sessions
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.demo_pair import resolve_pair
from edgespec.core.validation import check_float, check_int
from edgespec.linkemu import LinkProfile

logger = logging.getLogger(__name__)

COLLAPSED_MBPS = 0.05  # the bandwidth of a collapsed link (50 kbit/s)
RESTART_WAIT_S = 120.0  # bound on waiting for every endpoint to serve again
SETTLE_S = 90.0  # bound on waiting for the sessions to drain at the end
# The verifiers' session idle TTL in a chaos run. A killed edge cannot close its sessions: the
# TTL is what frees them (the deployment default, 300 s, would outlast a short run).
IDLE_TTL_S = 30.0


@dataclass(frozen=True)
class ChaosConfig:
    """A chaos run's options (the command line's)."""

    sessions: int = 8
    duration_s: float = 60.0
    kill_every_s: float = 20.0
    fault_every_s: float = 15.0  # 0 = no link faults
    seed: int = 0
    max_new_tokens: int = 48
    k: int = 4
    timeout_s: float = 60.0
    rtt_ms: float = 10.0
    # the verifiers' session idle TTL (s): frees the sessions of killed edges
    idle_ttl_s: float = IDLE_TTL_S
    # bound on waiting for every session to end at the end; above `idle_ttl_s`, it tells a
    # session freed by the TTL from one leaked for good
    settle_s: float = SETTLE_S

    def __post_init__(self) -> None:
        check_int("sessions", self.sessions, 1, 256)
        check_float("duration_s", self.duration_s, 1.0, 7200.0)
        check_float("kill_every_s", self.kill_every_s, 1.0)
        check_float("fault_every_s", self.fault_every_s, 0.0)
        check_int("seed", self.seed, 0)
        check_int("max_new_tokens", self.max_new_tokens, 1, 512)
        check_float("timeout_s", self.timeout_s, 1.0)
        check_float("idle_ttl_s", self.idle_ttl_s, 1.0)
        check_float("settle_s", self.settle_s, 0.0, 3600.0)


class _Chaos:
    """The kill and link-fault schedules, with what they did."""

    def __init__(self, dep: LocalDeployment, config: ChaosConfig, t0: float) -> None:
        self.dep = dep
        self.config = config
        self.t0 = t0
        self.rng = random.Random(config.seed)
        self.kills: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.replayed_before_kills = 0  # verifiers' `replayed` counters lost to kills

    def _now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    async def kills_until(self, stop_at: float) -> None:
        victims = self.dep.verifier_names() + self.dep.edge_names()
        while True:
            wait = self.config.kill_every_s * self.rng.uniform(0.5, 1.5)
            if time.monotonic() + wait >= stop_at:
                return
            await asyncio.sleep(wait)
            if not await self.dep.wait_all_serving(min(RESTART_WAIT_S, stop_at - time.monotonic())):
                if time.monotonic() >= stop_at:
                    return
                self.kills.append({"t": self._now(), "skipped": "not every endpoint serving"})
                continue
            victim = self.rng.choice(victims)
            if victim in self.dep.verifier_names():
                with contextlib.suppress(Exception):  # its counters are lost with it otherwise
                    stats = await self.dep.verifier_stats(victim, timeout_s=5.0)
                    self.replayed_before_kills += int(stats["replayed"])
            ray.kill(self.dep.actor(victim), no_restart=False)
            self.kills.append({"t": self._now(), "victim": victim})
            logger.info("chaos: killed %s", victim)

    async def _fault(self, edge: str, action: str, profile: dict[str, Any] | None = None) -> None:
        await asyncio.wait_for(self.dep.actor(edge).link_fault.remote(action, profile), 30.0)

    async def faults_until(self, stop_at: float) -> None:
        if self.config.fault_every_s <= 0:
            return
        while True:
            wait = self.config.fault_every_s * self.rng.uniform(0.5, 1.5)
            if time.monotonic() + wait + 6.0 >= stop_at:
                return
            await asyncio.sleep(wait)
            edge = self.rng.choice(self.dep.edge_names())
            kind = self.rng.choice(("reset", "blackhole", "bandwidth"))
            hold = {
                "reset": self.rng.uniform(0.2, 1.0),
                "blackhole": self.rng.uniform(2.0, 4.0),
                "bandwidth": self.rng.uniform(3.0, 6.0),
            }[kind]
            event: dict[str, Any] = {"t": self._now(), "edge": edge, "kind": kind, "s": hold}
            try:
                if kind == "bandwidth":
                    slow = LinkProfile(rtt_ms=self.config.rtt_ms, bandwidth_mbps=COLLAPSED_MBPS)
                    await self._fault(edge, "profile", slow.to_dict())
                else:
                    await self._fault(edge, "cut" if kind == "reset" else "blackhole")
                await asyncio.sleep(hold)
            except Exception as err:  # the edge may be restarting: the fault did not happen
                event["error"] = f"{type(err).__name__}: {err}"[:200]
            finally:
                try:
                    await self._fault(edge, "profile" if kind == "bandwidth" else "restore")
                except Exception as err:  # a restarted edge has fresh, healthy links
                    event["restore_error"] = f"{type(err).__name__}: {err}"[:200]
            self.faults.append(event)
            logger.info("chaos: link fault %s", event)


async def _run(dep: LocalDeployment, config: ChaosConfig, refs: tuple) -> dict[str, Any]:
    prompts, references = refs
    tally = Tally()
    driver = DriverConfig(
        sessions=config.sessions,
        duration_s=config.duration_s,
        max_new_tokens=config.max_new_tokens,
        k=config.k,
        timeout_s=config.timeout_s,
    )
    t0 = time.monotonic()
    chaos = _Chaos(dep, config, t0)
    stop_at = t0 + config.duration_s
    injectors = [
        asyncio.create_task(chaos.kills_until(stop_at)),
        asyncio.create_task(chaos.faults_until(stop_at)),
    ]
    wall_s = await run_sessions(driver, prompts, references, dep.serving_edges, tally)
    for task in injectors:
        task.cancel()
    await asyncio.gather(*injectors, return_exceptions=True)
    for edge in dep.edge_names():  # leave no link faulted
        with contextlib.suppress(Exception):
            await chaos._fault(edge, "restore")
            await chaos._fault(edge, "profile")
    serving = await dep.wait_all_serving(RESTART_WAIT_S)
    at_end = await dep.sessions_open()
    left, settle_s = await dep.wait_sessions_zero(config.settle_s)
    replayed_end = 0
    for name in dep.verifier_names():
        with contextlib.suppress(Exception):
            replayed_end += int((await dep.verifier_stats(name))["replayed"])
    endpoints = await dep.endpoints()
    kills = [k for k in chaos.kills if "victim" in k]
    result = {
        "config": asdict(config),
        "wall_s": round(wall_s, 1),
        "kills": len(kills),
        "kills_by_victim": {
            n: sum(k["victim"] == n for k in kills) for n in dep.verifier_names() + dep.edge_names()
        },
        "kill_events": chaos.kills,
        "link_faults": len(chaos.faults),
        "link_faults_by_kind": {
            kind: sum(f["kind"] == kind for f in chaos.faults)
            for kind in ("reset", "blackhole", "bandwidth")
        },
        "link_fault_events": chaos.faults,
        **tally.to_dict(),
        "replayed_blocks": chaos.replayed_before_kills + replayed_end,
        "restarts": {e["endpoint_id"]: e["restarts"] for e in endpoints},
        "all_serving_at_end": serving,
        # every client session had ended then: what the verifiers still held had no owner
        "sessions_when_load_ended": at_end,
        "sessions_left": left,
        "sessions_settle_s": round(settle_s, 1),
    }
    result["ok"] = bool(
        tally.accounting_ok()
        and tally.mismatches == 0
        and "UNKNOWN" not in tally.failed
        and all(c == 0 for c in left.values())
    )
    return result


def run_chaos(
    config: ChaosConfig,
    target: Path | None = None,
    draft: Path | None = None,
    progress: Any = logger.info,
) -> dict[str, Any]:
    """Run one chaos experiment on a fresh local deployment (torn down at the end); returns
    the JSON-ready result (``ok``: every check held)."""
    target_path, draft_path = resolve_pair(target, draft)
    progress("computing the target-alone references")
    refs = reference_outputs(target_path, config.max_new_tokens)
    dep_config = LocalDeploymentConfig(
        target_path,
        draft_path,
        rtt_ms=config.rtt_ms,
        extra={"verifier_config": VerifierConfig(session_idle_ttl_s=config.idle_ttl_s)},
    )
    with LocalDeployment(dep_config, progress) as dep:
        progress(f"chaos: {config.sessions} sessions for {config.duration_s:g} s")
        result = asyncio.run(_run(dep, config, refs))
    result["target"], result["draft"] = str(target_path), str(draft_path)
    return result


def print_summary(result: dict[str, Any]) -> None:
    """The run's figures on stdout."""
    cfg = result["config"]
    print(
        f"chaos: {cfg['sessions']} sessions, {result['wall_s']} s, {result['kills']} kills "
        f"{result['kills_by_victim']}, {result['link_faults']} link faults "
        f"{result['link_faults_by_kind']}"
    )
    print(
        f"  submitted {result['submitted']} = succeeded {result['succeeded']} + failed "
        f"{result['failed']} {result['failed_by_status']}"
        + (
            f" + WITHOUT status {result['failed_without_status']}"
            if result["failed_without_status"]
            else ""
        )
        + f"  (accounting {'ok' if result['accounting_ok'] else 'BROKEN'})"
    )
    print(
        f"  identical to the target alone: {result['identical_outputs']}/{result['succeeded']}"
        f" (mismatches {result['mismatches']}); replayed blocks {result['replayed_blocks']}; "
        f"reconnects {result['reconnects']}"
    )
    print(
        f"  sessions held when the load ended (no client left): {result['sessions_when_load_ended']}"
    )
    print(
        f"  sessions left: {result['sessions_left']} (after {result['sessions_settle_s']} s); "
        f"restarts {result['restarts']}"
    )
    print(f"  {'OK' if result['ok'] else 'FAILED'}")


def run_from_args(args: argparse.Namespace) -> int:
    """`edgespec bench chaos`: run, print the figures, write the JSON if asked; 0 when ok."""
    config = ChaosConfig(
        sessions=args.sessions,
        duration_s=args.duration_s,
        kill_every_s=args.kill_every_s,
        fault_every_s=args.fault_every_s,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        settle_s=args.settle_s,
        idle_ttl_s=args.idle_ttl_s,
    )
    result = run_chaos(config, args.target, args.draft, progress=logger.info)
    print_summary(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1
