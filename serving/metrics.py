"""Prometheus metrics of the edge (drafting) and the verifier (cloud) side.

Each class registers its metric families on the `CollectorRegistry` it is given, never on
prometheus_client's global default registry, so tests and several servers in one process keep
their numbers apart. The services own one registry each and expose it with
`start_metrics_server`.

Vocabulary as in `edgespec.core.rejection`: per round the edge sends a block of k **draft
tokens**; the verifier **accepts** a prefix of them and adds one token of its own (the
**recovered** token on a rejection, the **bonus** token when all were accepted), so a round
commits accepted + 1 tokens.

Units: the ``observe_*`` methods take milliseconds (``*_ms``, as the services measure and the wire
carries them); the exported metrics are in seconds, as Prometheus names demand.

Ratios are best derived from the counters in PromQL, e.g. the edge's acceptance rate and the
acceptance rate at block position 0 over five minutes::

    sum(rate(edgespec_edge_accepted_tokens_total[5m]))
      / sum(rate(edgespec_edge_drafted_tokens_total[5m]))
    rate(edgespec_edge_accepted_tokens_total{position="0"}[5m])
      / rate(edgespec_edge_drafted_tokens_total{position="0"}[5m])

`edgespec_edge_acceptance_ratio` is in addition a histogram of each finished generation's
acceptance rate (how acceptance spreads across requests).

Example::

    from prometheus_client import CollectorRegistry
    from edgespec.serving.metrics import EdgeMetrics, start_metrics_server

    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry)
    server = start_metrics_server(registry, port=9400)  # http://127.0.0.1:9400/metrics
    with metrics.track_session():
        metrics.observe_round(drafted=4, accepted=3, rtt_ms=21.0, round_ms=30.0)
        metrics.observe_generation(finish_reason="length", drafted=4, accepted=3,
                                   time_to_first_token_ms=35.0, time_per_output_token_ms=7.5)
    server.stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

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

BLOCK_OUTCOMES = ("applied", "replayed", "stale")
SESSION_CLOSE_REASONS = ("closed", "idle", "stream_end", "error")


def _factories(
    prefix: str, registry: CollectorRegistry
) -> tuple[Callable[..., Counter], Callable[..., Histogram]]:
    """counter(name, doc, labels=()) and histogram(name, doc, buckets), named `prefix + name`
    and registered in `registry`."""

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"{prefix}{name}", doc, labels, registry=registry)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{prefix}{name}", doc, buckets=buckets, registry=registry)

    return counter, histogram


def _check_counts(drafted: int, accepted: int) -> None:
    if drafted < 0 or not 0 <= accepted <= drafted:
        raise ValueError(
            f"need 0 <= accepted <= drafted, got drafted={drafted!r}, accepted={accepted!r}"
        )


def _seconds(name: str, ms: float) -> float:
    if not ms >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a number of milliseconds >= 0, got {ms!r}")
    return ms / 1000.0


class EdgeMetrics:
    """Metrics of an edge node: rounds, draft tokens and their acceptance, the link, sessions.

    Metric families (all prefixed ``edgespec_edge_``):

    - ``rounds_total``: verification rounds (round trips to the verifier).
    - ``drafted_tokens_total{position}``, ``accepted_tokens_total{position}``: draft tokens sent
      and accepted, by position in their block (0 = first draft token of the block).
    - ``committed_tokens_total``: tokens committed to outputs (accepted + recovered/bonus).
    - ``draft_length``: histogram of k per round.
    - ``rtt_seconds``: network time per round (round wall time minus verifier queue + compute).
    - ``round_seconds``: round wall time seen by the edge (send to verdict).
    - ``link_bytes_total{direction}``: serialized bytes on the verifier link, "sent"/"received".
    - ``reconnects_total``: verifier sessions reopened after a failure.
    - ``generations_total{finish_reason}``: finished generations ("stop" / "length").
    - ``errors_total{code}``: failed Generate calls by gRPC status name (e.g. "INVALID_ARGUMENT").
    - ``acceptance_ratio``: histogram of each finished generation's accepted / drafted.
    - ``time_to_first_token_seconds``, ``time_per_output_token_seconds``: per generation.
    - ``active_sessions``: generations in progress.
    - ``link_rtt_seconds``, ``link_acceptance``, ``link_draft_seconds``, ``link_verify_seconds``,
      ``link_cloud_only``, ``link_draft_tokens`` (gauges, labels ``verifier`` and ``regime``):
      what the edge has learnt of each verifier link (`observe_links`): RTT, pooled acceptance,
      draft time per token, verifier time of one position, whether it streams cloud-only (1) or
      speculates (0), and the draft length it would use.

    Example::

        metrics = EdgeMetrics(CollectorRegistry())
        metrics.observe_round(drafted=4, accepted=2, rtt_ms=48.0, round_ms=55.0,
                              bytes_sent=120, bytes_received=40)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        counter, histogram = _factories("edgespec_edge_", registry)

        self.registry = registry
        self.rounds = counter("rounds", "Verification rounds (edge -> verifier -> edge).")
        self.drafted_tokens = counter(
            "drafted_tokens",
            "Draft tokens sent for verification, by block position.",
            ("position",),
        )
        self.accepted_tokens = counter(
            "accepted_tokens",
            "Draft tokens the verifier accepted, by block position.",
            ("position",),
        )
        self.committed_tokens = counter(
            "committed_tokens", "Tokens committed to outputs (accepted + recovered or bonus)."
        )
        self.draft_length = histogram(
            "draft_length", "Draft tokens per round (k).", DRAFT_LENGTH_BUCKETS
        )
        self.rtt = histogram(
            "rtt_seconds",
            "Network time per round: wall time minus verifier queue and compute.",
            LATENCY_BUCKETS_S,
        )
        self.round_time = histogram(
            "round_seconds",
            "Round wall time at the edge, block sent to verdict.",
            LATENCY_BUCKETS_S,
        )
        self.link_bytes = counter(
            "link_bytes", "Serialized bytes on the verifier link.", ("direction",)
        )
        self.reconnects = counter("reconnects", "Verifier sessions reopened after a failure.")
        self.generations = counter(
            "generations", "Finished generations, by finish reason.", ("finish_reason",)
        )
        self.errors = counter("errors", "Failed Generate calls, by gRPC status code.", ("code",))
        self.acceptance_ratio = histogram(
            "acceptance_ratio",
            "Accepted / drafted tokens of each finished generation that drafted any.",
            RATIO_BUCKETS,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Time from request to the first committed token.",
            TTFT_BUCKETS_S,
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per generation.",
            TPOT_BUCKETS_S,
        )
        self.active_sessions = Gauge(
            "edgespec_edge_active_sessions", "Generations in progress.", registry=registry
        )

        def link_gauge(name: str, doc: str) -> Gauge:
            labels = ("verifier", "regime")
            return Gauge(f"edgespec_edge_link_{name}", doc, labels, registry=registry)

        self.link_gauges = {
            "rtt_ms": (link_gauge("rtt_seconds", "Learnt RTT of the link."), 1e-3),
            "alpha": (link_gauge("acceptance", "Learnt pooled acceptance rate."), 1.0),
            "draft_ms": (link_gauge("draft_seconds", "Learnt draft time per token."), 1e-3),
            "verify_ms": (
                link_gauge("verify_seconds", "Learnt verifier time of a one-position forward."),
                1e-3,
            ),
        }
        self.link_cloud_only = link_gauge(
            "cloud_only", "1 if the link's sessions would stream cloud-only, 0 if they speculate."
        )
        self.link_k = link_gauge("draft_tokens", "Draft length the link's sessions would use.")

    def observe_round(
        self,
        *,
        drafted: int,
        accepted: int,
        rtt_ms: float,
        round_ms: float | None = None,
        committed: int | None = None,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        """Record one verification round.

        Args:
            drafted: k, the draft tokens in the block (0 when the cloud decodes alone).
            accepted: draft tokens accepted, 0..drafted.
            rtt_ms: network time of the round (wall - verifier queue - verifier compute).
            round_ms: the round's wall time at the edge, if measured.
            committed: tokens committed by the round; default accepted + 1. Pass the truncated
                count when a stop token or max_new_tokens cut the round short.
            bytes_sent, bytes_received: serialized bytes of the block and the verdict.
        """
        _check_counts(drafted, accepted)
        self.rounds.inc()
        for position in range(drafted):
            self.drafted_tokens.labels(position=str(position)).inc()
        for position in range(accepted):
            self.accepted_tokens.labels(position=str(position)).inc()
        self.committed_tokens.inc(accepted + 1 if committed is None else committed)
        self.draft_length.observe(drafted)
        self.rtt.observe(_seconds("rtt_ms", rtt_ms))
        if round_ms is not None:
            self.round_time.observe(_seconds("round_ms", round_ms))
        self.link_bytes.labels(direction="sent").inc(bytes_sent)
        self.link_bytes.labels(direction="received").inc(bytes_received)

    def observe_links(self, links: list[dict]) -> None:
        """Set the link gauges from `EdgeEngine.link_estimates()` (numbers in ms as there;
        an estimate not learnt yet leaves its gauge unset)."""
        for link in links:
            labels = {"verifier": link["verifier"], "regime": link["regime"]}
            for key, (gauge, scale) in self.link_gauges.items():
                if link.get(key) is not None:
                    gauge.labels(**labels).set(link[key] * scale)
            self.link_cloud_only.labels(**labels).set(1.0 if link["mode"] == "cloud_only" else 0.0)
            self.link_k.labels(**labels).set(link["k"])

    def observe_reconnect(self) -> None:
        """Record a verifier session reopened after a failure."""
        self.reconnects.inc()

    def observe_generation(
        self,
        *,
        finish_reason: str,
        drafted: int,
        accepted: int,
        time_to_first_token_ms: float,
        time_per_output_token_ms: float | None,
    ) -> None:
        """Record a finished generation (call once, when its summary is sent).

        ``time_per_output_token_ms`` is None when the generation produced a single token. The
        acceptance-ratio histogram is observed only when something was drafted.
        """
        _check_counts(drafted, accepted)
        self.generations.labels(finish_reason=finish_reason).inc()
        if drafted:
            self.acceptance_ratio.observe(accepted / drafted)
        self.ttft.observe(_seconds("time_to_first_token_ms", time_to_first_token_ms))
        if time_per_output_token_ms is not None:
            self.tpot.observe(_seconds("time_per_output_token_ms", time_per_output_token_ms))

    def observe_error(self, code: str) -> None:
        """Record a failed Generate call by its gRPC status name, e.g. ``"INVALID_ARGUMENT"``."""
        self.errors.labels(code=code).inc()

    @contextmanager
    def track_session(self) -> Iterator[None]:
        """Count a generation as active for the duration of the ``with`` block."""
        self.active_sessions.inc()
        try:
            yield
        finally:
            self.active_sessions.dec()


class VerifierMetrics:
    """Metrics of a verifier replica: blocks and their outcomes, compute, queueing, sessions.

    Metric families (all prefixed ``edgespec_verifier_``):

    - ``blocks_total{outcome}``: blocks answered, outcome "applied" (verified and committed),
      "replayed" (a resent seq, answered from the stored verdict) or "stale" (base_len did not
      match: nothing applied).
    - ``drafted_tokens_total``, ``accepted_tokens_total``, ``committed_tokens_total``: over
      applied blocks only (a replay or a stale block commits nothing new).
    - ``block_tokens``: histogram of k per applied block.
    - ``verify_seconds``: compute per applied block (forward + sampling).
    - ``queue_seconds``: time an applied block waited before its forward began.
    - ``batch_size``: blocks verified by one target forward (1 without a batcher).
    - ``prefill_seconds``: OpenSession prefill time.
    - ``sessions_opened_total``; ``sessions_closed_total{reason}``: reason "closed" (by the
      edge), "idle" (reaped after the idle TTL), "stream_end", "error".
    - ``errors_total{code}``: failed RPCs by gRPC status name.
    - ``active_sessions``: sessions holding a KV cache now.

    Example::

        metrics = VerifierMetrics(CollectorRegistry())
        metrics.observe_block(outcome="applied", drafted=4, accepted=4, verify_ms=3.2,
                              queue_ms=0.1)
        metrics.set_active_sessions(engine_session_count)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        counter, histogram = _factories("edgespec_verifier_", registry)

        self.registry = registry
        self.blocks = counter("blocks", "Draft blocks answered, by outcome.", ("outcome",))
        self.drafted_tokens = counter("drafted_tokens", "Draft tokens in applied blocks.")
        self.accepted_tokens = counter("accepted_tokens", "Draft tokens accepted.")
        self.committed_tokens = counter(
            "committed_tokens", "Tokens committed (accepted + recovered or bonus)."
        )
        self.block_tokens = histogram(
            "block_tokens", "Draft tokens per applied block (k).", DRAFT_LENGTH_BUCKETS
        )
        self.verify_time = histogram(
            "verify_seconds", "Verifier compute per block (forward + sampling).", COMPUTE_BUCKETS_S
        )
        self.queue_time = histogram(
            "queue_seconds", "Wait of a block before its forward began.", COMPUTE_BUCKETS_S
        )
        self.batch_size = histogram(
            "batch_size", "Blocks verified by one target forward.", BATCH_SIZE_BUCKETS
        )
        self.prefill_time = histogram(
            "prefill_seconds", "OpenSession prefill time.", COMPUTE_BUCKETS_S
        )
        self.sessions_opened = counter("sessions_opened", "Sessions opened (incl. reopens).")
        self.sessions_closed = counter("sessions_closed", "Sessions ended, by reason.", ("reason",))
        self.errors = counter("errors", "Failed RPCs, by gRPC status code.", ("code",))
        self.active_sessions = Gauge(
            "edgespec_verifier_active_sessions",
            "Sessions holding a KV cache.",
            registry=registry,
        )

    def observe_block(
        self,
        *,
        outcome: str,
        drafted: int = 0,
        accepted: int = 0,
        verify_ms: float = 0.0,
        queue_ms: float = 0.0,
    ) -> None:
        """Record one answered block; tokens and timings count for ``"applied"`` only."""
        if outcome not in BLOCK_OUTCOMES:
            raise ValueError(f"outcome must be one of {BLOCK_OUTCOMES}, got {outcome!r}")
        self.blocks.labels(outcome=outcome).inc()
        if outcome != "applied":
            return
        _check_counts(drafted, accepted)
        self.drafted_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)
        self.committed_tokens.inc(accepted + 1)
        self.block_tokens.observe(drafted)
        self.verify_time.observe(_seconds("verify_ms", verify_ms))
        self.queue_time.observe(_seconds("queue_ms", queue_ms))

    def observe_batch(self, size: int) -> None:
        """Record one target forward that verified `size` blocks (>= 1)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size!r}")
        self.batch_size.observe(size)

    def observe_session_opened(self, prefill_ms: float) -> None:
        """Record an OpenSession that succeeded, with its prefill time."""
        self.sessions_opened.inc()
        self.prefill_time.observe(_seconds("prefill_ms", prefill_ms))

    def observe_session_closed(self, reason: str) -> None:
        """Record a session's end; reason in ``SESSION_CLOSE_REASONS``."""
        if reason not in SESSION_CLOSE_REASONS:
            raise ValueError(f"reason must be one of {SESSION_CLOSE_REASONS}, got {reason!r}")
        self.sessions_closed.labels(reason=reason).inc()

    def observe_error(self, code: str) -> None:
        """Record a failed RPC by its gRPC status name, e.g. ``"RESOURCE_EXHAUSTED"``."""
        self.errors.labels(code=code).inc()

    def set_active_sessions(self, count: int) -> None:
        """Set the number of live sessions (from the engine's own count, so it never drifts)."""
        self.active_sessions.set(count)


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
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535] (0 = any free port), got {port!r}")
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("serving metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(host=host, port=bound, _server=server, _thread=thread)


def serve_metrics(
    metrics_cls: type[EdgeMetrics] | type[VerifierMetrics], port: int, host: str = "127.0.0.1"
) -> tuple[EdgeMetrics | VerifierMetrics, MetricsServer]:
    """A fresh registry with `metrics_cls`'s families, served on ``http://host:port/metrics``:
    what a server's ``--metrics-port`` flag sets up."""
    registry = CollectorRegistry()
    metrics = metrics_cls(registry)
    return metrics, start_metrics_server(registry, port=port, host=host)
