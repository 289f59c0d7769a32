"""Run a Verifier server: ``python -m edgespec.cloud.server --target PATH [--port 0] [--token T]``.

``--compute-profile NAME`` (default ``real``) pads every target forward to the profile's modelled
time (e.g. ``h100-70b``: a 70B-class target on one H100, emulated); ``--threads N`` sets torch's
intra-op threads. ``--no-batching`` verifies one block per forward, one session at a time (the
reference the capacity benchmark compares the batching verifier with); ``--kv-budget-tokens N``
admits sessions against a KV budget.

Loads the target checkpoint (default: the shipped demo target), serves it, and prints exactly one
line to stdout, ``LISTENING <host>:<port>`` (flushed), once it accepts connections; scripts and
tests wait for that line. Logs go to stderr. SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from transformers import PreTrainedModel

from edgespec.cloud.service import serve
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import KV_ADMISSIONS, VerifierConfig
from edgespec.core.profiles import profile_names
from edgespec.core.runner import ModelRunner
from edgespec.serving.server_options import add_runtime_args, apply_threads, run_until_signal
from edgespec.serving.tls import TlsConfig
from edgespec.serving.verifier_metrics import VerifierMetrics

logger = logging.getLogger("edgespec.cloud.server")

TOKEN_ENV = "EDGESPEC_VERIFIER_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m edgespec.cloud.server", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--target", help="target checkpoint folder (default: the shipped demo target)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    ap.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    ap.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'authorization: Bearer <token>' on every RPC but health (env {TOKEN_ENV})",
    )
    defaults = VerifierConfig()
    ap.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    ap.add_argument("--max-block-tokens", type=int, default=defaults.max_block_tokens)
    ap.add_argument("--max-prefix-tokens", type=int, default=None)
    ap.add_argument("--idle-ttl", type=float, default=defaults.session_idle_ttl_s, help="seconds")
    ap.add_argument(
        "--no-batching",
        action="store_true",
        help="one block per target forward, one session at a time (the reference verifier)",
    )
    ap.add_argument("--batch-max-sessions", type=int, default=defaults.batch_max_sessions)
    ap.add_argument(
        "--batch-return-fraction",
        type=float,
        default=defaults.batch_return_fraction,
        help="wait after a step for sessions that come back within this fraction of a step",
    )
    ap.add_argument(
        "--batch-group-horizon",
        type=float,
        default=defaults.batch_group_horizon,
        help="wait up to this many steps for sessions expected back when it serves more per step",
    )
    ap.add_argument(
        "--no-batch-overlap",
        action="store_true",
        help="start each step only after the verdicts of the one before are handed over",
    )
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument(
        "--kv-budget-tokens", type=int, default=None, help="KV tokens all sessions may hold"
    )
    budget.add_argument(
        "--kv-budget-bytes",
        type=int,
        default=None,
        help="the KV budget as bytes of cache (converted with the model's KV bytes per token)",
    )
    budget.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=None,
        help="the KV budget as this fraction of the memory free once the model is loaded (a "
        "GPU's free memory, a CPU host's available memory)",
    )
    ap.add_argument(
        "--kv-admission",
        default=defaults.kv_admission,
        choices=KV_ADMISSIONS,
        help="reserve: admit by each session's most, never evict; evict: admit by what "
        "sessions hold, evict the newest when a step would pass the budget (their edges reopen)",
    )
    ap.add_argument(
        "--retry-after-ms",
        type=int,
        default=defaults.retry_after_ms,
        help="back-off hint of a refused OpenSession and of an evicted session",
    )
    ap.add_argument("--model-id", default="", help="name served (default: the folder name)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    ap.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    ap.add_argument("--tls-key", help="PEM private key")
    ap.add_argument(
        "--compute-profile",
        default="real",
        choices=profile_names(),
        help="pad target forwards to this profile's modelled times (default: real = no padding)",
    )
    ap.add_argument("--log-level", default="INFO")
    add_runtime_args(ap)
    return ap


async def _run(
    args: argparse.Namespace,
    runner_factory: Callable[[PreTrainedModel], ModelRunner] | None = None,
) -> None:
    from edgespec.core.demo_pair import DEFAULT_TARGET

    apply_threads(args)
    config = VerifierConfig(
        model_id=args.model_id,
        max_sessions=args.max_sessions,
        max_block_tokens=args.max_block_tokens,
        max_prefix_tokens=args.max_prefix_tokens,
        session_idle_ttl_s=args.idle_ttl,
        device=args.device,
        batching=not args.no_batching,
        batch_max_sessions=args.batch_max_sessions,
        batch_return_fraction=args.batch_return_fraction,
        batch_group_horizon=args.batch_group_horizon,
        batch_overlap=not args.no_batch_overlap,
        kv_budget_tokens=args.kv_budget_tokens,
        kv_budget_bytes=args.kv_budget_bytes,
        kv_memory_fraction=args.kv_memory_fraction,
        kv_admission=args.kv_admission,
        retry_after_ms=args.retry_after_ms,
    )
    engine = VerifierEngine.from_pretrained(
        args.target or DEFAULT_TARGET,
        config,
        compute_profile=args.compute_profile,
        runner_factory=runner_factory,
    )
    engine.calibrate_idle_forward()  # before any session: what sessions measure load against
    tls = TlsConfig(args.tls_cert, args.tls_key) if args.tls_cert else None
    await run_until_signal(
        args,
        VerifierMetrics,
        lambda metrics: serve(
            engine, host=args.host, port=args.port, token=args.token, tls=tls, metrics=metrics
        ),
        grace_s=2.0,
    )


def main(
    argv: list[str] | None = None,
    runner_factory: Callable[[PreTrainedModel], ModelRunner] | None = None,
) -> int:
    """Serve until a signal; `runner_factory` (for benchmarks) builds each session's target
    runner (see `VerifierEngine`). Returns the exit status."""
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        build_parser().error("--tls-cert and --tls-key go together")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_run(args, runner_factory))
    except (ValueError, OSError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
