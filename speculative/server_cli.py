"""Command-line options both servers (`python -m cloud.server`, `python -m edge.server`) share:
torch threads and the Prometheus metrics port. Edge and cloud import each other never, so what
they share lives here."""

from __future__ import annotations

import argparse


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
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
