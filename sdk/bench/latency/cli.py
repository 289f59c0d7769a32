"""`edgespec bench latency`'s glue: a config from the parsed options, the run, its JSON file,
the command line that reproduces it and the summary printed on stdout."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from edgespec.bench.latency.analysis import ADAPTIVE_VS_BEST_MIN
from edgespec.bench.latency.config import LatencyBenchConfig
from edgespec.bench.latency.run import run_latency_bench

logger = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> LatencyBenchConfig:
    """A config from `edgespec bench latency`'s options (unset ones keep the mode's defaults)."""
    overrides: dict[str, Any] = {"threads": args.threads}
    if args.rtts:
        try:
            overrides["rtts_ms"] = tuple(float(x) for x in args.rtts.split(",") if x.strip())
        except ValueError as err:
            raise ValueError(f"--rtts must be comma-separated numbers, got {args.rtts!r}") from err
    for name in ("reps", "max_new_tokens", "varying_max_new_tokens", "varying_reps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_varying:
        overrides["varying"] = None
    if getattr(args, "methods", None):
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if getattr(args, "no_link_cases", False):
        overrides["jitter_case"] = overrides["bandwidth_case"] = None
    if args.quick:
        return LatencyBenchConfig.quick(args.compute_profile, **overrides)
    return LatencyBenchConfig(compute_profile=args.compute_profile, **overrides)


def run_from_args(args: argparse.Namespace, target: str | Path, draft: str | Path) -> dict:
    """Run with `edgespec bench latency`'s options; writes the JSON (and plots if asked)."""
    result = run_latency_bench(target, draft, config_from_args(args))
    result["command"] = command_line(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", path)
    if args.plots:
        # matplotlib: an optional dependency (the `experiments` extra), loaded only for plots
        from edgespec.bench.plots import plot_latency

        for p in plot_latency(result, args.plots):
            logger.info("wrote %s", p)
    return result


def command_line(args: argparse.Namespace) -> str:
    """The `edgespec bench latency` command that reproduces a run of these options."""
    parts = ["edgespec", "bench", "latency"]
    for name in (
        "target",
        "draft",
        "compute_profile",
        "rtts",
        "reps",
        "max_new_tokens",
        "varying_max_new_tokens",
        "varying_reps",
        "threads",
        "methods",
        "json",
        "plots",
    ):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    flags = ("quick", "no_varying", "no_link_cases")
    parts += [f"--{flag}" for flag in flags if getattr(args, flag, False)]
    return " ".join(p.replace("_", "-") if p.startswith("--") else p for p in parts)


def print_summary(result: dict) -> None:
    """Tokens/s per method and condition, then the checks, on stdout."""
    compute = result["profiles"]["compute"]
    label = compute.get("name", "?") if isinstance(compute, dict) else str(compute)
    emulated = " (emulated)" if result["profiles"]["compute_emulated"] else ""
    print(f"compute profile {label}{emulated}; tokens/s median [min, max] over reps")
    for row in result["rows"]:
        spread = row["tokens_per_s_spread"] or [float("nan")] * 2
        k = "" if row["mean_k"] is None else f" k~{row['mean_k']:.1f}"
        accepted = row.get("mean_accepted_per_round")
        k += "" if accepted is None else f" accepted/round {accepted:.2f}"
        hits = row.get("pipeline_hit_rate")
        k += "" if hits is None else f" ahead used {hits:.0%}"
        print(
            f"  {row['case']:>10} {row['link_profile']:>20} {row['method']:>24}"
            f" {row['tokens_per_s']:7.1f} [{spread[0]:.1f}, {spread[1]:.1f}]{k}"
        )
    varying = result.get("varying")
    if varying:
        print(
            "varying RTT:", json.dumps({k: round(v, 1) for k, v in varying["tokens_per_s"].items()})
        )
    checks = result["checks"]
    a = checks["adaptive_vs_best"]
    print(
        f"adaptive >= {ADAPTIVE_VS_BEST_MIN} x best: adaptive {a.get('passed_adaptive')}, "
        f"adaptive_pipelined {a.get('passed_adaptive_pipelined')}"
    )
    if "varying_vs_fixed" in checks:
        print("varying vs best fixed:", json.dumps(checks["varying_vs_fixed"]))
    print(
        f"E(k) agreement: per-position {checks['ek_agreement']['passed']}, "
        f"i.i.d. {checks['ek_agreement']['passed_iid']}; "
        f"greedy equality {checks['greedy_equality']['passed']}; "
        f"crossover RTT {result['crossover_rtt_ms']} ms"
    )
