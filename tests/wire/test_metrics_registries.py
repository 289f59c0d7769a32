"""Tests for the Prometheus metrics (`edgespec.serving.edge_metrics`, `.verifier_metrics` and the
`/metrics` endpoint of `.metrics`): observe rounds/blocks, scrape the text format, check values."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgespec.serving.edge_metrics import EdgeMetrics
from edgespec.serving.metrics import start_metrics_server
from edgespec.serving.verifier_metrics import VerifierMetrics


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} parsed back from the exposition text."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_edge_rounds_tokens_by_position_and_link_bytes():
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry)
    metrics.observe_round(
        drafted=4, accepted=2, rtt_ms=20.0, round_ms=25.0, bytes_sent=100, bytes_received=30
    )
    metrics.observe_round(drafted=3, accepted=3, rtt_ms=40.0, bytes_sent=80, bytes_received=30)
    metrics.observe_round(drafted=2, accepted=0, rtt_ms=0.0, committed=0)  # cut by max_new_tokens
    samples = scrape(registry)

    assert samples[("edgespec_edge_rounds_total", ())] == 3
    drafted = {
        p: samples[("edgespec_edge_drafted_tokens_total", (("position", p),))] for p in "0123"
    }
    accepted = {
        p: samples[("edgespec_edge_accepted_tokens_total", (("position", p),))] for p in "012"
    }
    assert drafted == {"0": 3, "1": 3, "2": 2, "3": 1}
    assert accepted == {"0": 2, "1": 2, "2": 1}
    assert ("edgespec_edge_accepted_tokens_total", (("position", "3"),)) not in samples
    assert samples[("edgespec_edge_committed_tokens_total", ())] == (2 + 1) + (3 + 1) + 0
    assert samples[("edgespec_edge_link_bytes_total", (("direction", "sent"),))] == 180
    assert samples[("edgespec_edge_link_bytes_total", (("direction", "received"),))] == 60

    assert samples[("edgespec_edge_draft_length_count", ())] == 3
    assert samples[("edgespec_edge_draft_length_sum", ())] == 9
    assert samples[("edgespec_edge_draft_length_bucket", (("le", "2.0"),))] == 1
    assert samples[("edgespec_edge_rtt_seconds_count", ())] == 3
    assert samples[("edgespec_edge_rtt_seconds_sum", ())] == pytest.approx(0.060)
    assert samples[("edgespec_edge_rtt_seconds_bucket", (("le", "0.025"),))] == 2
    assert samples[("edgespec_edge_round_seconds_count", ())] == 1  # measured once only


def test_edge_generations_sessions_errors_and_reconnects():
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry)
    with metrics.track_session():
        assert scrape(registry)[("edgespec_edge_active_sessions", ())] == 1
        metrics.observe_reconnect()
        metrics.observe_generation(
            finish_reason="length",
            drafted=8,
            accepted=6,
            time_to_first_token_ms=50.0,
            time_per_output_token_ms=10.0,
        )
    with pytest.raises(RuntimeError), metrics.track_session():
        raise RuntimeError("a failed generation still leaves the active count")
    metrics.observe_generation(
        finish_reason="stop",
        drafted=0,
        accepted=0,
        time_to_first_token_ms=5.0,
        time_per_output_token_ms=None,
    )
    metrics.observe_error("INVALID_ARGUMENT")
    samples = scrape(registry)

    assert samples[("edgespec_edge_active_sessions", ())] == 0
    assert samples[("edgespec_edge_reconnects_total", ())] == 1
    assert samples[("edgespec_edge_generations_total", (("finish_reason", "length"),))] == 1
    assert samples[("edgespec_edge_generations_total", (("finish_reason", "stop"),))] == 1
    assert samples[("edgespec_edge_errors_total", (("code", "INVALID_ARGUMENT"),))] == 1
    # Only the generation that drafted anything has an acceptance ratio.
    assert samples[("edgespec_edge_acceptance_ratio_count", ())] == 1
    assert samples[("edgespec_edge_acceptance_ratio_sum", ())] == pytest.approx(0.75)
    assert samples[("edgespec_edge_acceptance_ratio_bucket", (("le", "0.7"),))] == 0
    assert samples[("edgespec_edge_acceptance_ratio_bucket", (("le", "0.8"),))] == 1
    assert samples[("edgespec_edge_time_to_first_token_seconds_count", ())] == 2
    assert samples[("edgespec_edge_time_to_first_token_seconds_sum", ())] == pytest.approx(0.055)
    assert samples[("edgespec_edge_time_per_output_token_seconds_count", ())] == 1
    assert samples[("edgespec_edge_time_per_output_token_seconds_sum", ())] == pytest.approx(0.01)


def test_verifier_blocks_sessions_and_timings():
    registry = CollectorRegistry()
    metrics = VerifierMetrics(registry)
    metrics.observe_session_opened(prefill_ms=12.0)
    metrics.set_active_sessions(1)
    metrics.observe_block(outcome="applied", drafted=4, accepted=4, verify_ms=3.0, queue_ms=1.0)
    metrics.observe_block(outcome="applied", drafted=4, accepted=1, verify_ms=5.0, queue_ms=0.0)
    metrics.observe_block(outcome="replayed", drafted=4, accepted=1, verify_ms=5.0)
    metrics.observe_block(outcome="stale")
    metrics.observe_batch(1)
    metrics.observe_session_closed("idle")
    metrics.set_active_sessions(0)
    metrics.observe_error("RESOURCE_EXHAUSTED")
    samples = scrape(registry)

    blocks = {
        o: samples[("edgespec_verifier_blocks_total", (("outcome", o),))]
        for o in ("applied", "replayed", "stale")
    }
    assert blocks == {"applied": 2, "replayed": 1, "stale": 1}
    # A replay or a stale block commits nothing new: tokens and timings count applied blocks only.
    assert samples[("edgespec_verifier_drafted_tokens_total", ())] == 8
    assert samples[("edgespec_verifier_accepted_tokens_total", ())] == 5
    assert samples[("edgespec_verifier_committed_tokens_total", ())] == 7
    assert samples[("edgespec_verifier_verify_seconds_count", ())] == 2
    assert samples[("edgespec_verifier_verify_seconds_sum", ())] == pytest.approx(0.008)
    assert samples[("edgespec_verifier_queue_seconds_sum", ())] == pytest.approx(0.001)
    assert samples[("edgespec_verifier_block_tokens_count", ())] == 2
    assert samples[("edgespec_verifier_batch_size_count", ())] == 1
    assert samples[("edgespec_verifier_prefill_seconds_sum", ())] == pytest.approx(0.012)
    assert samples[("edgespec_verifier_sessions_opened_total", ())] == 1
    assert samples[("edgespec_verifier_sessions_closed_total", (("reason", "idle"),))] == 1
    assert samples[("edgespec_verifier_active_sessions", ())] == 0
    assert samples[("edgespec_verifier_errors_total", (("code", "RESOURCE_EXHAUSTED"),))] == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.observe_block(outcome="done"), "outcome must be one of"),
        (
            lambda m: m.observe_block(outcome="applied", drafted=2, accepted=3),
            "accepted <= drafted",
        ),
        (lambda m: m.observe_block(outcome="applied", drafted=1, verify_ms=-1.0), "verify_ms"),
        (lambda m: m.observe_session_closed("crashed"), "reason must be one of"),
        (lambda m: m.observe_batch(0), "batch size"),
        (lambda m: m.observe_session_opened(prefill_ms=float("nan")), "prefill_ms"),
    ],
)
def test_verifier_rejects_bad_observations(call, match):
    with pytest.raises(ValueError, match=match):
        call(VerifierMetrics(CollectorRegistry()))


def test_edge_rejects_bad_observations():
    metrics = EdgeMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="accepted <= drafted"):
        metrics.observe_round(drafted=1, accepted=2, rtt_ms=1.0)
    with pytest.raises(ValueError, match="rtt_ms"):
        metrics.observe_round(drafted=1, accepted=1, rtt_ms=-3.0)


def test_registries_are_independent_and_default_registry_untouched():
    default_before = generate_latest(REGISTRY)
    first, second = CollectorRegistry(), CollectorRegistry()
    EdgeMetrics(first).observe_round(drafted=1, accepted=1, rtt_ms=1.0)
    EdgeMetrics(second)  # a second instance in the same process: no duplicate-name error
    VerifierMetrics(first)  # edge and verifier families can share one registry
    assert scrape(first)[("edgespec_edge_rounds_total", ())] == 1
    assert scrape(second)[("edgespec_edge_rounds_total", ())] == 0
    assert b"edgespec_" not in generate_latest(REGISTRY)
    assert generate_latest(REGISTRY).count(b"\n# HELP") == default_before.count(b"\n# HELP")


def test_metrics_server_serves_the_registry_over_http():
    registry = CollectorRegistry()
    VerifierMetrics(registry).observe_block(outcome="stale")
    server = start_metrics_server(registry, port=0)
    try:
        assert server.port > 0 and server.url.endswith(f":{server.port}/metrics")
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    (sample,) = [
        s for s in families["edgespec_verifier_blocks"].samples if s.name.endswith("_total")
    ]
    assert sample.labels == {"outcome": "stale"} and sample.value == 1
    with pytest.raises(ValueError, match="port"):
        start_metrics_server(registry, port=70000)
