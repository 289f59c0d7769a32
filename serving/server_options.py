"""Command-line options and the run loop both servers share (`python -m edgespec.cloud.server`,
`python -m edgespec.edge.server`): torch threads, the Prometheus metrics port, and serving until
SIGTERM/SIGINT. Edge and cloud never import each other, so what they share lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from edgespec.core.validation import check_int
from edgespec.serving.metrics import serve_metrics

logger = logging.getLogger(__name__)


def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    """Add ``--threads`` and ``--metrics-port`` to a server's parser."""
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    ap.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (0 = a free one; default: none)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from ``--threads`` (ValueError below 1).

    A small model gains little from intra-op threads, and on a busy host every parallel region
    waits for its slowest (descheduled) thread.
    """
    if args.threads is None:
        return
    threads = check_int("--threads", args.threads, 1)
    import torch  # lazily: torch takes seconds to import, and --help should not wait for it

    torch.set_num_threads(threads)


async def run_until_signal(
    args: argparse.Namespace,
    metrics_cls: Callable[[CollectorRegistry], Any],
    start: Callable[[Any], Awaitable[Any]],
    grace_s: float,
) -> None:
    """Serve until SIGTERM/SIGINT: start the ``--metrics-port`` endpoint (if asked), the server
    (``start(metrics)``, returning an object with ``.port`` and ``async stop(grace)``), print the
    ``LISTENING host:port`` line that launchers and tests read (then ``HTTP <url>`` when the
    object has an ``http_url``), then stop both on a signal.
    `metrics_cls` is EdgeMetrics or VerifierMetrics (built on a fresh registry)."""
    metrics = metrics_server = None
    if args.metrics_port is not None:
        metrics, metrics_server = serve_metrics(metrics_cls, args.metrics_port, host=args.host)
    running = await start(metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {args.host}:{running.port}", flush=True)
    http_url = getattr(running, "http_url", None)
    if http_url:
        print(f"HTTP {http_url}", flush=True)
    await stop.wait()
    logger.info("stopping")
    await running.stop(grace=grace_s)
    if metrics_server is not None:
        metrics_server.stop()
