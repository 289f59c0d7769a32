"""The run of a latency benchmark: a verifier process, the link emulator between it and the
edge, warm-up and calibration, then the grid of link conditions, the in-process methods and the
varying-RTT run (see `edgespec.bench.latency`)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from edgespec.bench.latency.analysis import (
    GreedyReference,
    crossover_rtt,
    evaluate_checks,
    pooled_ek,
    summarise,
)
from edgespec.bench.latency.config import (
    ADAPTIVE_METHODS,
    LatencyBenchConfig,
    MethodSpec,
    VaryingSchedule,
    is_fixed,
    link_methods,
    varying_methods,
)
from edgespec.bench.latency.estimate import (
    Calibration,
    Progress,
    estimate_run_time,
    format_duration,
    varying_time,
)
from edgespec.bench.latency.harness import Harness
from edgespec.bench.latency.samples import RunSample
from edgespec.bench.processes import torch_threads, verifier_process
from edgespec.core.registry import policy_names
from edgespec.linkemu import LinkEmulator, LinkProfile

logger = logging.getLogger(__name__)


class _RttSwitcher:
    """Switches the emulator's RTT at the schedule's times on a thread of its own (the event loop
    runs the edge); records when each switch really happened."""

    def __init__(self, emu: LinkEmulator, schedule: VaryingSchedule, t0: float) -> None:
        self.emu, self.schedule, self.t0 = emu, schedule, t0
        self.switched: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtt-switcher", daemon=True)

    def __enter__(self) -> _RttSwitcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        for start, rtt in self.schedule.phases[1:]:
            if self._stop.wait(max(0.0, self.t0 + start - time.perf_counter())):
                return
            self.emu.set_profile(LinkProfile(rtt_ms=rtt))
            self.switched.append((time.perf_counter() - self.t0, rtt))


async def _measure(harness: Harness, config: LatencyBenchConfig, t_start: float) -> dict:
    """Warm up, estimate, then measure the grid, the in-process methods and the varying run
    (`t_start`: perf_counter at the start of the whole run, for the logged estimate)."""
    specs = [s for s in link_methods(config.fixed_ks) if config.selected(s.name)]
    missing = sorted({s.policy for s in specs} - set(policy_names()))
    if missing:
        raise ValueError(f"the edge has no policy {missing}; registered: {policy_names()}")
    emu = harness.emu
    assert emu is not None
    greedy = GreedyReference()
    n_prompts = len(config.prompts)
    colocated_ks = config.fixed_ks if config.selected("colocated") else ()

    # Warm-up and calibration at RTT 0: one full generation of every method on prompt 0.
    logger.info("warm-up at RTT 0 (one generation per method) ...")
    calib: dict[str, Calibration] = {}
    for spec in specs:
        await harness.run_link(spec, 0, 4, prepare=False)  # connect, compile shapes
        t0 = time.perf_counter()
        s = await harness.run_link(spec, 0, config.max_new_tokens)
        wall = time.perf_counter() - t0  # a warm method's warm-up generation included
        greedy.add(s)
        n_rounds = sum(1 for r in s.rounds if r.speculative) + (spec.name == "cloud_only")
        if spec.memory == "warm":
            n_rounds *= 2
        calib[spec.name] = Calibration(wall, len(s.tokens), n_rounds)
    if config.selected("edge_only_draft"):
        harness.run_edge_only(0, 4)
        s = harness.run_edge_only(0, config.max_new_tokens)
        calib["edge_only_draft"] = Calibration(s.wall_s, len(s.tokens), 0)
    for k in colocated_ks:
        s = harness.run_colocated(k, 0, config.max_new_tokens)
        calib[f"colocated_k{k}"] = Calibration(s.wall_s, len(s.tokens), 0)
    estimate = estimate_run_time(config, specs, calib)
    total = sum(estimate.values())
    spent = time.perf_counter() - t_start
    logger.info(
        "expected total run time %s: %s spent on start-up and warm-up, %s to go (grid %s over %d "
        "conditions x %d methods x %d reps x %d prompts x %d tokens, in-process %s, varying %s)",
        format_duration(spent + total),
        format_duration(spent),
        format_duration(total),
        format_duration(estimate["grid_s"]),
        len(config.conditions()),
        len(specs),
        config.reps,
        n_prompts,
        config.max_new_tokens,
        format_duration(estimate["in_process_s"]),
        format_duration(estimate["varying_s"]),
    )
    progress = Progress(total)

    rows: list[dict] = []
    link_stats: list[dict] = []
    # In-process methods: independent of the link, measured once per rep.
    in_proc: dict[str, list[RunSample]] = {}
    for rep in range(config.reps):
        names = (["edge_only_draft"] if config.selected("edge_only_draft") else []) + [
            f"colocated_k{k}" for k in colocated_ks
        ]
        for name in _rotate(names, rep):
            for p in range(n_prompts):
                if name == "edge_only_draft":
                    s = harness.run_edge_only(p, config.max_new_tokens)
                else:
                    s = harness.run_colocated(
                        int(name.removeprefix("colocated_k")), p, config.max_new_tokens
                    )
                s.rep = rep
                greedy.add(s)
                in_proc.setdefault(name, []).append(s)
            progress.step(
                n_prompts * calib[name].generation_s(config.max_new_tokens, 0.0),
                "in process %s rep %d/%d: %.1f tokens/s",
                name,
                rep + 1,
                config.reps,
                _rep_rate(in_proc[name], rep),
            )
    colocated_by_k = [
        summarise(f"colocated_k{k}", None, in_proc[f"colocated_k{k}"]) for k in colocated_ks
    ]
    for row, k in zip(colocated_by_k, colocated_ks, strict=True):
        row["k"] = k
    if "edge_only_draft" in in_proc:
        row = summarise("edge_only_draft", None, in_proc["edge_only_draft"])
        row["note"] = "the draft model alone: different output (speed only)"
        rows.append(row)
    if colocated_by_k:
        best = max(colocated_by_k, key=lambda r: r["tokens_per_s"])
        rows.append({**best, "method": "colocated"})

    everywhere: dict[str, list[RunSample]] = {}  # per method, all conditions (pooled E(k))
    for cond in config.conditions():
        emu.set_profile(cond.profile)
        # a round trip under the new link before timing
        await harness.run_link(specs[0], 0, 4, prepare=False)
        emu.reset_stats()
        samples: dict[str, list[RunSample]] = {s.name: [] for s in specs}
        for rep in range(config.reps):
            for spec in _rotate(specs, rep):
                for p in range(n_prompts):
                    s = await harness.run_link(spec, p, config.max_new_tokens)
                    s.rep = rep
                    greedy.add(s)
                    samples[spec.name].append(s)
                progress.step(
                    n_prompts * calib[spec.name].generation_s(config.max_new_tokens, cond.rtt_ms),
                    "%s %s rep %d/%d %s: %.1f tokens/s",
                    cond.case,
                    cond.profile.name,
                    rep + 1,
                    config.reps,
                    spec.name,
                    _rep_rate(samples[spec.name], rep),
                )
        stats = emu.stats()
        link_stats.append(
            {
                "case": cond.case,
                "profile": cond.profile.to_dict(),
                "rtt_ms": cond.rtt_ms,
                "emulator_rtt_ms_measured": stats.rtt_ms_measured,
            }
        )
        for name, group in samples.items():
            everywhere.setdefault(name, []).extend(group)
        for spec in specs:
            row = summarise(spec.name, cond, samples[spec.name])
            row["emulator_rtt_ms_measured"] = stats.rtt_ms_measured
            row["link_memory"] = spec.memory
            rows.append(row)

    varying = None
    if config.varying is not None:
        varying = await _measure_varying(harness, config, specs, calib, progress, greedy)
    emu.set_profile(LinkProfile(rtt_ms=0.0))

    greedy_result = greedy.result()
    return {
        "rows": rows,
        "colocated_by_k": colocated_by_k,
        "link_conditions": link_stats,
        "varying": varying,
        "checks": evaluate_checks(rows, varying, greedy_result, pooled_ek(everywhere)),
        "crossover_rtt_ms": crossover_rtt(rows),
        "estimate_s": {**estimate, "measure_s": total, "start_and_warmup_s": spent},
    }


async def _measure_varying(
    harness: Harness,
    config: LatencyBenchConfig,
    specs: Sequence[MethodSpec],
    calib: dict[str, Calibration],
    progress: Progress,
    greedy: GreedyReference,
) -> dict:
    """The varying-RTT run: one generation per method and rep while `_RttSwitcher` follows the
    schedule; tokens/s per method, the ratio to the best fixed k and the adaptive time series."""
    schedule = config.varying
    assert schedule is not None and harness.emu is not None
    emu = harness.emu
    names = varying_methods(config, specs)
    by_name = {s.name: s for s in specs}
    samples: dict[str, list[RunSample]] = {n: [] for n in names}
    series: dict[str, list[dict]] = {}
    switches: dict[str, list[tuple[float, float]]] = {}
    n = config.varying_max_new_tokens
    for rep in range(config.varying_reps):
        for name in _rotate(names, rep):
            emu.set_profile(LinkProfile(rtt_ms=schedule.phases[0][1]))
            # settle the link at the first RTT, then warm the memory there (untimed)
            await harness.run_link(by_name[name], 0, 4, prepare=False)
            await harness.prepare_memory(by_name[name])
            t0 = time.perf_counter()
            with _RttSwitcher(emu, schedule, t0) as switcher:
                s = await harness.run_link(by_name[name], 0, n, prepare=False)
            s.rep = rep
            greedy.add(s)
            samples[name].append(s)
            if rep == 0 and name in ADAPTIVE_METHODS:
                switches[name] = switcher.switched
                series[name] = [
                    {
                        "t_s": r.t_s,
                        "k": r.k,
                        "mode": r.mode,
                        "accepted": r.accepted,
                        "rtt_ms_set": schedule.rtt_at(r.t_s) if r.t_s is not None else None,
                        "network_ms": r.network_ms,
                    }
                    for r in s.rounds
                ]
            progress.step(
                varying_time(calib[name], n, schedule),
                "varying rep %d/%d %s: %.1f tokens/s",
                rep + 1,
                config.varying_reps,
                name,
                s.tokens_per_s,
            )
    tps = {name: statistics.median(x.tokens_per_s for x in samples[name]) for name in names}
    spread = {
        name: [
            min(x.tokens_per_s for x in samples[name]),
            max(x.tokens_per_s for x in samples[name]),
        ]
        for name in names
    }
    fixed = {k: v for k, v in tps.items() if is_fixed(k)}
    best_fixed = max(fixed, key=fixed.__getitem__) if fixed else None
    return {
        "schedule": [{"start_s": s, "rtt_ms": r} for s, r in schedule.phases],
        "max_new_tokens": n,
        "reps": config.varying_reps,
        "tokens_per_s": tps,
        "tokens_per_s_spread": spread,
        "spread_kind": "min_max",
        "mean_k": {
            name: (
                statistics.fmean(r.k for x in samples[name] for r in x.rounds if r.speculative)
                if any(r.speculative for x in samples[name] for r in x.rounds)
                else None
            )
            for name in names
        },
        "best_fixed": best_fixed,
        "ratio_vs_best_fixed": {
            name: tps[name] / fixed[best_fixed]
            for name in ADAPTIVE_METHODS
            if name in tps and best_fixed
        },
        "series": series,
        "switches": {
            name: [{"t_s": t, "rtt_ms": r} for t, r in sw] for name, sw in switches.items()
        },
    }


def _rotate(items: Sequence, rep: int) -> list:
    """`items` starting at position rep (mod len): each rep runs the methods in another order."""
    if not items:
        return []
    i = rep % len(items)
    return list(items[i:]) + list(items[:i])


def _rep_rate(samples: Sequence[RunSample], rep: int) -> float:
    group = [s for s in samples if s.rep == rep]
    wall = sum(s.wall_s for s in group)
    return sum(len(s.tokens) for s in group) / wall if wall else 0.0


def run_latency_bench(
    target_path: str | Path,
    draft_path: str | Path,
    config: LatencyBenchConfig | None = None,
) -> dict:
    """Run the latency benchmark (`edgespec.bench.latency`) and return its JSON-able result:
    ``rows``, ``profiles`` {compute, link}, ``varying``, ``checks``, ``crossover_rtt_ms``, the
    config and timing. Raises ValueError for a bad config or a policy the edge lacks."""
    config = config if config is not None else LatencyBenchConfig()
    target_path, draft_path = Path(target_path), Path(draft_path)
    t_start = time.perf_counter()
    extra = ["--compute-profile", config.compute_profile]
    if config.threads is not None:
        extra += ["--threads", str(config.threads)]
    with torch_threads(config.threads):
        harness = Harness(config, target_path, draft_path)
        with verifier_process(target_path, config.threads, config.start_timeout_s, extra) as addr:

            async def main() -> dict:
                harness.open_link(addr)
                try:
                    return await _measure(harness, config, t_start)
                finally:
                    await harness.close_link()

            measured = asyncio.run(main())
    profile = harness.profile
    padding = {
        role: {
            "forwards": runner.forwards,
            "overruns": getattr(runner, "overruns", 0),
            "overrun_ms": getattr(runner, "overrun_ms", 0.0),
        }
        for role, runner in (("target", harness.target), ("draft", harness.draft))
    }
    link_profiles = [c.profile.to_dict() for c in config.conditions()]
    if config.varying is not None:
        link_profiles += [
            {"varying": True, **LinkProfile(rtt_ms=r).to_dict(), "start_s": s}
            for s, r in config.varying.phases
        ]
    elapsed = time.perf_counter() - t_start
    est = measured["estimate_s"]
    logger.info(
        "done in %s (estimated %s)",
        format_duration(elapsed),
        format_duration(est["measure_s"] + est["start_and_warmup_s"]),
    )
    return {
        "bench": "latency",
        "profiles": {
            "compute": profile.to_dict(),
            "compute_emulated": profile.emulated,
            "link": link_profiles,
            "link_emulator": "user-space TCP proxy on 127.0.0.1 (edgespec.linkemu)",
        },
        "target": str(target_path),
        "draft": str(draft_path),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "config": config.to_dict(),
        "sampling": "greedy",
        # forwards of the in-process runners (co-located, edge-only) that took longer than the
        # profile models: the emulation is a lower bound on time, never faster than modelled
        "in_process_padding": padding,
        "elapsed_s": elapsed,
        **measured,
    }
