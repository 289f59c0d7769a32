"""How long a latency run will take, from each method's warm-up generation, and its progress
log with an ETA. The estimate runs ~10% low (see `edgespec.bench.latency`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgespec.bench.latency.config import (
    IN_PROCESS_METHODS,
    LatencyBenchConfig,
    MethodSpec,
    VaryingSchedule,
    varying_methods,
)

logger = logging.getLogger(__name__)


class Progress:
    """Counts units of planned work (seconds of estimated run time) and logs an ETA."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.done_s = 0.0
        self.t0 = time.perf_counter()

    def step(self, estimated_s: float, message: str, *args: object) -> None:
        """Count `estimated_s` of planned work as done; log `message % args` with the progress."""
        self.done_s += estimated_s
        elapsed = time.perf_counter() - self.t0
        pace = elapsed / self.done_s if self.done_s > 0 else 1.0
        eta = max(0.0, (self.total_s - self.done_s) * pace)
        logger.info(
            "[%3.0f%% | %s elapsed, ETA %s] " + message,
            100.0 * min(self.done_s / self.total_s, 1.0) if self.total_s else 100.0,
            format_duration(elapsed),
            format_duration(eta),
            *args,
        )


def format_duration(seconds: float) -> str:
    """``"12m05s"``: `seconds` rounded to whole seconds."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


@dataclass(frozen=True)
class Calibration:
    """A method's warm-up generation at RTT 0: wall time and the RTT-paying rounds it took."""

    wall_s: float
    tokens: int
    rounds: int

    def generation_s(self, tokens: int, rtt_ms: float) -> float:
        """Estimated wall time of a `tokens`-token generation at `rtt_ms`: RTT-0 time plus one RTT
        per round (and one for the session opening). Adaptive methods take fewer, longer rounds at
        high RTT, so this errs high for them."""
        scale = tokens / max(self.tokens, 1)
        return self.wall_s * scale + (self.rounds * scale + 1) * rtt_ms / 1e3


def estimate_run_time(
    config: LatencyBenchConfig, specs: Sequence[MethodSpec], calib: dict[str, Calibration]
) -> dict[str, float]:
    """Seconds the grid (per condition), in-process methods and varying run should take."""
    per_prompt = config.max_new_tokens
    n_prompts = len(config.prompts)
    grid = 0.0
    for cond in config.conditions():
        for spec in specs:
            c = calib[spec.name]
            grid += config.reps * n_prompts * c.generation_s(per_prompt, cond.rtt_ms)
        grid += 0.5  # warm generation after each profile switch
    in_proc = sum(
        config.reps * n_prompts * c.generation_s(per_prompt, 0.0)
        for name, c in calib.items()
        if name in IN_PROCESS_METHODS or name.startswith("colocated_k")
    )
    varying = 0.0
    if config.varying is not None:
        sched = config.varying
        for name in varying_methods(config, specs):
            varying += config.varying_reps * varying_time(
                calib[name], config.varying_max_new_tokens, sched
            )
    return {"grid_s": grid, "in_process_s": in_proc, "varying_s": varying}


def varying_time(c: Calibration, tokens: int, sched: VaryingSchedule) -> float:
    """Integrate the calibrated per-token time through the RTT schedule until `tokens` are done."""
    t, done = 0.0, 0.0
    phases = list(sched.phases) + [(math.inf, sched.phases[-1][1])]
    for (start, rtt), (end, _) in zip(phases, phases[1:], strict=False):
        per_token = c.generation_s(tokens, rtt) / tokens
        room = (end - start) / per_token
        if done + room >= tokens:
            return t + (tokens - done) * per_token
        done += room
        t = end
    return t
