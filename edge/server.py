"""Run an Edge server: ``python -m edgespec.edge.server --draft PATH --verifier HOST:PORT [...]``.

Loads the draft model and its tokenizer from a local checkpoint folder, serves the Edge service,
and prints exactly one line ``LISTENING <host>:<port>`` (flushed) to stdout once it accepts calls.
``--verifier`` may be repeated: sessions start on the first and fail over to the next.
``--compute-profile NAME`` (default ``real``) pads every draft forward to the profile's modelled
time (an emulated edge GPU, e.g. ``h100-70b``'s 1B-class draft); ``--policy`` and ``--pipelined``
set what a request that names no policy / does not say gets.
The OpenAI-compatible HTTP API (`edgespec.edge.http_app`) is served too, on ``--http-port``
(default 0: a free port; ``--no-http``: none) of the same host, in the same event loop, HTTPS
with the gRPC server's certificate when it has one; its base URL follows on a second line
``HTTP http(s)://<host>:<port>``. Requests name the model
``--served-model-name`` (default ``edgespec``).
SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from edgespec.core.profiles import profile_names
from edgespec.core.registry import policy_names
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.http_server import RunningHttpServer, serve_http
from edgespec.edge.service import RunningEdgeServer, serve
from edgespec.serving.edge_metrics import EdgeMetrics
from edgespec.serving.server_options import add_runtime_args, apply_threads, run_until_signal
from edgespec.serving.tls import TlsConfig

logger = logging.getLogger("edgespec.edge.server")

DEFAULT_MODEL_NAME = "edgespec"


@dataclass
class RunningEdge:
    """The edge's gRPC server and, unless turned off, its HTTP API (`http_url`)."""

    grpc: RunningEdgeServer
    http: RunningHttpServer | None

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http is not None else None

    async def stop(self, grace: float | None = 5.0) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace)


async def start_edge(
    engine: EdgeEngine,
    args: argparse.Namespace,
    tls: TlsConfig | None,
    metrics: EdgeMetrics | None,
) -> RunningEdge:
    """Start the gRPC server, then the HTTP API (unless ``--no-http``), on ``--host``."""
    running = await serve(
        engine, host=args.host, port=args.port, token=args.token, tls=tls, metrics=metrics
    )
    http = None
    if not args.no_http:
        try:
            # With --tls-cert/--tls-key the HTTP API is HTTPS with the same certificate.
            files = (args.tls_cert, args.tls_key) if tls is not None else None
            http = await serve_http(
                engine,
                args.served_model_name,
                args.host,
                args.http_port,
                token=args.token,
                tls_files=files,
            )
        except BaseException:
            await running.stop(0)
            raise
    return RunningEdge(running, http)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m edgespec.edge.server", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--draft", required=True, help="draft checkpoint folder (with its tokenizer)")
    ap.add_argument(
        "--verifier",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="verifier address; repeat for failover, tried in order",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument(
        "--http-port", type=int, default=0, help="OpenAI-compatible HTTP API port (0 = a free port)"
    )
    ap.add_argument("--no-http", action="store_true", help="serve no HTTP API")
    ap.add_argument(
        "--served-model-name",
        default=DEFAULT_MODEL_NAME,
        help="model name of the HTTP API (/v1/models, the requests' `model`)",
    )
    ap.add_argument("--token", help="bearer token clients must send")
    ap.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key")
    ap.add_argument("--tls-key", help="server private key (PEM)")
    ap.add_argument("--verifier-token", help="bearer token sent to the verifiers")
    ap.add_argument("--verifier-tls-ca", help="PEM root certificate to trust for the verifiers")
    ap.add_argument("--model-id", default="", help="model the verifiers must serve ('' = any)")
    ap.add_argument(
        "-k",
        "--draft-tokens",
        type=int,
        default=EngineConfig().default_k,
        help="default draft length",
    )
    ap.add_argument(
        "--policy",
        default=EngineConfig().default_policy,
        choices=policy_names(),
        help="draft-length policy of requests that name none",
    )
    ap.add_argument(
        "--pipelined",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig().pipelined,
        help="draft ahead while verdicts travel, for requests that do not say (default on)",
    )
    ap.add_argument(
        "--ahead-branches",
        type=int,
        default=EngineConfig().ahead_branches,
        help="pipelined chains: guesses besides the main one drafted ahead (default 3)",
    )
    ap.add_argument(
        "--ahead-branches-sent",
        type=int,
        default=EngineConfig().ahead_branches_sent,
        help="of those, how many are sent with the main guess, in its message where the "
        "verifier takes alternatives (default 3)",
    )
    ap.add_argument(
        "--compute-profile",
        default="real",
        choices=profile_names(),
        help="pad draft forwards to this profile's modelled times (default: real = no padding)",
    )
    ap.add_argument("--max-sessions", type=int, default=EngineConfig().max_sessions)
    ap.add_argument(
        "--trace-dir", default=None, help="write a msgpack per-round trace of each generation here"
    )
    ap.add_argument("--round-timeout-s", type=float, default=LinkConfig().round_timeout_s)
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument("-v", "--verbose", action="store_true")
    add_runtime_args(ap)
    return ap


async def _main(args: argparse.Namespace) -> int:
    apply_threads(args)
    link_config = LinkConfig(
        token=args.verifier_token,
        tls=TlsConfig(ca_cert=args.verifier_tls_ca) if args.verifier_tls_ca else None,
        model_id=args.model_id,
        round_timeout_s=args.round_timeout_s,
    )
    config = EngineConfig(
        default_k=args.draft_tokens,
        max_k=max(32, args.draft_tokens),
        max_sessions=args.max_sessions,
        default_policy=args.policy,
        pipelined=args.pipelined,
        ahead_branches=args.ahead_branches,
        ahead_branches_sent=args.ahead_branches_sent,
        trace_dir=args.trace_dir,
    )
    engine = EdgeEngine.from_pretrained(
        args.draft,
        args.verifier,
        link_config=link_config,
        config=config,
        device=args.device,
        compute_profile=args.compute_profile,
    )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key must be given together")
    tls = TlsConfig(args.tls_cert, args.tls_key) if args.tls_cert else None
    await run_until_signal(
        args,
        EdgeMetrics,
        lambda metrics: start_edge(engine, args, tls, metrics),
        grace_s=5.0,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_main(args))
    except (ValueError, FileNotFoundError, OSError) as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
