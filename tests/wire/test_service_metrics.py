"""Prometheus metrics of both services, over the real path: a verifier and an edge gRPC server
on 127.0.0.1 with metrics registries, generations through the SDK, then the registries read."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from edgespec import AsyncClient, InvalidArgument, SamplingParams
from edgespec.cloud.service import serve as serve_verifier
from edgespec.cloud.verifier import VerifierEngine
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.service import serve as serve_edge
from edgespec.serving.edge_metrics import EdgeMetrics
from edgespec.serving.verifier_metrics import VerifierMetrics

TIMEOUT_S = 60.0


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_both_services_export_generation_metrics(tiny_pair) -> None:
    edge_reg, cloud_reg = CollectorRegistry(), CollectorRegistry()
    params = SamplingParams(max_new_tokens=12)

    async def body():
        verifier = await serve_verifier(
            VerifierEngine.from_pretrained(tiny_pair.target_dir), metrics=VerifierMetrics(cloud_reg)
        )
        engine = EdgeEngine.from_pretrained(tiny_pair.draft_dir, [verifier.address])
        edge = await serve_edge(engine, metrics=EdgeMetrics(edge_reg))
        try:
            async with AsyncClient(f"127.0.0.1:{edge.port}", timeout=TIMEOUT_S) as client:
                results = [
                    await client.generate([5, 6, 7], params, policy="fixed", draft_tokens=3),
                    await client.generate([8, 9], params, policy="cloud_only"),
                ]
                with pytest.raises(InvalidArgument):
                    await client.generate([5], params, policy="no-such-policy")
            return results, verifier.address
        finally:
            await edge.stop()
            await engine.aclose()
            await verifier.stop()

    (spec, cloud_only), verifier_address = asyncio.run(body())

    # Edge: one count per generation, per round, per draft position; nothing left in progress.
    assert value(edge_reg, "edgespec_edge_generations_total", finish_reason="length") == 2
    assert (
        value(edge_reg, "edgespec_edge_rounds_total") == spec.stats.rounds + cloud_only.stats.rounds
    )
    assert value(edge_reg, "edgespec_edge_drafted_tokens_total", position="0") >= 1
    assert (
        value(edge_reg, "edgespec_edge_accepted_tokens_total", position="0")
        == (spec.stats.accepted_per_position[0])
    )
    assert value(edge_reg, "edgespec_edge_committed_tokens_total") == 24
    assert value(edge_reg, "edgespec_edge_time_to_first_token_seconds_count") == 2
    assert value(edge_reg, "edgespec_edge_draft_length_count") >= spec.stats.rounds
    assert value(edge_reg, "edgespec_edge_active_sessions") == 0
    assert value(edge_reg, "edgespec_edge_errors_total", code="INVALID_ARGUMENT") == 1
    # What the edge learnt of its link (greedy sessions on the one verifier): the fixed-k
    # session's rounds gave an RTT, an acceptance rate and the draft and verifier times.
    link = {"verifier": verifier_address, "regime": "greedy"}
    assert 0.0 < value(edge_reg, "edgespec_edge_link_rtt_seconds", **link) < 1.0
    assert 0.0 <= value(edge_reg, "edgespec_edge_link_acceptance", **link) <= 1.0
    assert value(edge_reg, "edgespec_edge_link_draft_seconds", **link) > 0.0
    assert value(edge_reg, "edgespec_edge_link_verify_seconds", **link) > 0.0
    assert value(edge_reg, "edgespec_edge_link_cloud_only", **link) in (0.0, 1.0)
    assert value(edge_reg, "edgespec_edge_link_draft_tokens", **link) >= 1

    # Verifier: every block answered, every token it committed, sessions opened and closed.
    assert value(cloud_reg, "edgespec_verifier_blocks_total", outcome="applied") >= (
        spec.stats.rounds + 12
    )  # the cloud-only generation's 12 tokens are 12 applied steps
    assert value(cloud_reg, "edgespec_verifier_accepted_tokens_total") == spec.stats.accepted
    assert value(cloud_reg, "edgespec_verifier_sessions_opened_total") == 2
    assert value(cloud_reg, "edgespec_verifier_verify_seconds_count") >= spec.stats.rounds
    assert value(cloud_reg, "edgespec_verifier_sessions_closed_total", reason="closed") == 2
    assert value(cloud_reg, "edgespec_verifier_active_sessions") == 0
