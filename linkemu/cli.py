"""``python -m edgespec.linkemu``: one link emulator from the command line, run until SIGINT or
SIGTERM; its stats are logged on the way out. Options: see `main`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence

from edgespec.linkemu.emulator import LinkEmulator
from edgespec.linkemu.profile import LinkProfile

logger = logging.getLogger(__name__)

_DESCRIPTION = "User-space TCP link emulator: delay, jitter, bandwidth and faults on 127.0.0.1."


def parse_hostport(text: str, *, field: str = "address") -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises ValueError naming `field`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{field} must be HOST:PORT with PORT in [0, 65535], got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run an emulator until SIGINT/SIGTERM, then log its stats."""
    parser = argparse.ArgumentParser(prog="python -m edgespec.linkemu", description=_DESCRIPTION)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--name", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        listen_host, listen_port = parse_hostport(args.listen, field="--listen")
        upstream_host, upstream_port = parse_hostport(args.upstream, field="--upstream")
        profile = LinkProfile(
            rtt_ms=args.rtt_ms,
            jitter_ms=args.jitter_ms,
            bandwidth_mbps=args.bandwidth_mbps,
            seed=args.seed,
            name=args.name,
        )
        emu = LinkEmulator(
            upstream_host, upstream_port, profile, listen_host=listen_host, listen_port=listen_port
        )
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with emu:
        while not stop.wait(0.5):
            pass
        logger.info("linkemu stats: %s", emu.stats().to_dict())
    return 0
