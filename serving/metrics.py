"""What the edge and verifier metrics share: the histogram buckets, the factory of prefixed
metric families, unit conversion, and the Prometheus ``/metrics`` HTTP endpoint.

The metric classes themselves are `edgespec.serving.edge_metrics.EdgeMetrics` and
`edgespec.serving.verifier_metrics.VerifierMetrics`. Each registers its families on the
`CollectorRegistry` it is given, never on prometheus_client's global default registry, so tests
and several servers in one process keep their numbers apart; a server owns one registry and
exposes it with `start_metrics_server` (or `serve_metrics`, which makes both).

Vocabulary as in `edgespec.core.rejection`: per round the edge sends a block of k **draft
tokens**; the verifier **accepts** a prefix of them and adds one token of its own (the
**recovered** token on a rejection, the **bonus** token when all were accepted), so a round
commits accepted + 1 tokens.

Units: the ``observe_*`` methods take milliseconds (``*_ms``, as the services measure and the wire
carries them); the exported metrics are in seconds, as Prometheus names demand.

Example::

    from edgespec.serving.edge_metrics import EdgeMetrics
    from edgespec.serving.metrics import serve_metrics

    metrics, server = serve_metrics(EdgeMetrics, port=9400)  # http://127.0.0.1:9400/metrics
    metrics.observe_round(drafted=4, accepted=3, rtt_ms=21.0, round_ms=30.0)
    server.stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from edgespec.core.validation import check_ms, check_port

logger = logging.getLogger(__name__)

M = TypeVar("M")

# Network time per round: 5-200 ms WAN links, sub-ms on 127.0.0.1.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
# Model compute (a forward pass, a prefill, a queue wait): sub-ms for tiny models to seconds.
COMPUTE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
DRAFT_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def metric_factories(
    prefix: str, registry: CollectorRegistry
) -> tuple[Callable[..., Counter], Callable[..., Histogram]]:
    """counter(name, doc, labels=()) and histogram(name, doc, buckets), named `prefix + name`
    and registered in `registry`."""

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{prefix}{name}", doc, labels, registry=registry)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{prefix}{name}", doc, buckets=buckets, registry=registry)

    return counter, histogram


def check_counts(drafted: int, accepted: int) -> None:
    """A round's (or a block's) counts: 0 <= accepted <= drafted, else ValueError."""
    if drafted < 0 or not 0 <= accepted <= drafted:
        raise ValueError(
            f"need 0 <= accepted <= drafted, got drafted={drafted!r}, accepted={accepted!r}"
        )


def ms_to_seconds(name: str, ms: float) -> float:
    """A duration observed in milliseconds (finite, >= 0; ValueError naming `name`) in seconds."""
    return check_ms(name, ms) / 1000.0


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint (see `start_metrics_server`)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_server(
    registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1"
) -> MetricsServer:
    """Serve `registry` in the Prometheus text format on ``http://host:port/metrics``.

    Runs in a daemon thread. ``port=0`` picks a free port (read it from the result). The
    default host is loopback only; pass ``host="0.0.0.0"`` for a scraper on another machine.

    Example::

        server = start_metrics_server(registry, port=0)
        print(server.url)   # http://127.0.0.1:41234/metrics
        server.stop()
    """
    check_port("port", port)  # 0 = any free port
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("serving metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host=host, port=bound, _server=server, _thread=thread)


def serve_metrics(
    metrics_cls: Callable[[CollectorRegistry], M], port: int, host: str = "127.0.0.1"
) -> tuple[M, MetricsServer]:
    """A fresh registry with `metrics_cls`'s families (EdgeMetrics or VerifierMetrics), served on
    ``http://host:port/metrics``: what a server's ``--metrics-port`` flag sets up."""
    registry = CollectorRegistry()
    metrics = metrics_cls(registry)
    return metrics, start_metrics_server(registry, port=port, host=host)
