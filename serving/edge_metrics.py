"""Prometheus metrics of an edge (drafting) node: `EdgeMetrics`.

Ratios are best derived from the counters in PromQL, e.g. the edge's acceptance rate and the
acceptance rate at block position 0 over five minutes::

    sum(rate(edgespec_edge_accepted_tokens_total[5m]))
      / sum(rate(edgespec_edge_drafted_tokens_total[5m]))
    rate(edgespec_edge_accepted_tokens_total{position="0"}[5m])
      / rate(edgespec_edge_drafted_tokens_total{position="0"}[5m])

`edgespec_edge_acceptance_ratio` is in addition a histogram of each finished generation's
acceptance rate (how acceptance spreads across requests). Units and vocabulary: see
`edgespec.serving.metrics`.

Example::

    from prometheus_client import CollectorRegistry
    from edgespec.serving.edge_metrics import EdgeMetrics
    from edgespec.serving.metrics import start_metrics_server

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

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Gauge

from edgespec.serving.metrics import (
    DRAFT_LENGTH_BUCKETS,
    LATENCY_BUCKETS_S,
    RATIO_BUCKETS,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    check_counts,
    metric_factories,
    ms_to_seconds,
)


class EdgeMetrics:
    """Metrics of an edge node: rounds, draft tokens and their acceptance, the link, sessions.

    Metric families (all prefixed ``edgespec_edge_``):

    - ``rounds_total``: verification rounds (round trips to the verifier).
    - ``drafted_tokens_total{position}``, ``accepted_tokens_total{position}``: draft tokens sent
      and accepted, by position in their block (0 = first draft token of the block).
    - ``committed_tokens_total``: tokens committed to outputs (accepted + recovered/bonus).
    - ``draft_length``: histogram of k per round.
    - ``rtt_seconds``: network time per round (round wall time minus verifier queue + compute).
    - ``round_seconds``: round wall time seen by the edge, one round recorded to the next
      (`RoundRecord.cycle_ms`: drafting on that time, the link call, committing the verdict).
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
        counter, histogram = metric_factories("edgespec_edge_", registry)

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
            "Round wall time at the edge, one round recorded to the next.",
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
        check_counts(drafted, accepted)
        self.rounds.inc()
        for position in range(drafted):
            self.drafted_tokens.labels(position=str(position)).inc()
        for position in range(accepted):
            self.accepted_tokens.labels(position=str(position)).inc()
        self.committed_tokens.inc(accepted + 1 if committed is None else committed)
        self.draft_length.observe(drafted)
        self.rtt.observe(ms_to_seconds("rtt_ms", rtt_ms))
        if round_ms is not None:
            self.round_time.observe(ms_to_seconds("round_ms", round_ms))
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
        check_counts(drafted, accepted)
        self.generations.labels(finish_reason=finish_reason).inc()
        if drafted:
            self.acceptance_ratio.observe(accepted / drafted)
        self.ttft.observe(ms_to_seconds("time_to_first_token_ms", time_to_first_token_ms))
        if time_per_output_token_ms is not None:
            self.tpot.observe(ms_to_seconds("time_per_output_token_ms", time_per_output_token_ms))

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
