"""Unit tests of the orchestrator's registry: assignment, load, health, draining, reassignment.

Pure logic (no Ray, no gRPC): `orchestrator.registry.Registry` with an injected clock; and its
health checks (`orchestrator.health.HealthChecker`, no Ray) against in-process gRPC servers.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgespec.orchestrator.health import HealthChecker
from edgespec.orchestrator.registry import (
    EDGE,
    NOT_SERVING,
    SERVING,
    UNREACHABLE,
    VERIFIER,
    NoEdgeAvailable,
    NoVerifierAvailable,
    Registry,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_registry(verifiers: int = 2, edges: int = 2) -> Registry:
    reg = Registry(clock=FakeClock())
    for i in range(verifiers):
        reg.register(f"v{i}", VERIFIER, f"10.0.0.{i + 1}:5000{i}", node_id=f"n{i}")
    for i in range(edges):
        reg.register(f"e{i}", EDGE, f"10.0.1.{i + 1}:6000{i}")
    return reg


def loads(reg: Registry) -> dict[str, int]:
    return {e.endpoint_id: e.load for e in reg.endpoints(VERIFIER)}


def test_new_sessions_go_to_the_least_loaded_verifier_and_alternate() -> None:
    reg = make_registry(verifiers=2)
    got = [reg.assign(f"s{i}", "e0").endpoint_id for i in range(16)]
    assert got[:4] == ["v0", "v1", "v0", "v1"]
    assert loads(reg) == {"v0": 8, "v1": 8}


def test_release_frees_load_and_next_session_fills_the_gap() -> None:
    reg = make_registry(verifiers=3)
    for i in range(6):
        reg.assign(f"s{i}", "e0")
    assert loads(reg) == {"v0": 2, "v1": 2, "v2": 2}
    on_v1 = [r.session_key for r in reg.sessions() if r.verifier_id == "v1"]
    assert all(reg.release(key) for key in on_v1)
    assert not reg.release(on_v1[0])  # already released
    assert loads(reg) == {"v0": 2, "v1": 0, "v2": 2}
    assert reg.assign("new", "e0").endpoint_id == "v1"


def test_unhealthy_verifier_gets_no_sessions_and_its_sessions_move() -> None:
    reg = make_registry(verifiers=2)
    for i in range(4):
        reg.assign(f"s{i}", "e0")
    moves = reg.set_health("v0", UNREACHABLE)
    assert {m.session_key for m in moves} == {"s0", "s2"}
    assert all(m.to_id == "v1" and m.reason == "unhealthy" for m in moves)
    assert loads(reg) == {"v0": 0, "v1": 4}
    assert reg.assign("s9", "e0").endpoint_id == "v1"
    # The edge of a moved session reconnects and is handed the verifier it was moved to.
    assert reg.assign("s0", "e0").endpoint_id == "v1"
    # Back to health: new sessions go to the empty replica again.
    reg.set_health("v0", SERVING)
    assert reg.assign("s10", "e0").endpoint_id == "v0"


def test_session_asking_again_moves_off_the_verifier_that_failed_it() -> None:
    reg = make_registry(verifiers=2)
    first = reg.assign("s", "e0").endpoint_id
    # Health checks have not noticed anything yet; the edge's stream broke, it asks again.
    second = reg.assign("s", "e0").endpoint_id
    assert second != first
    assert loads(reg)[first] == 0 and loads(reg)[second] == 1
    assert [(m.from_id, m.to_id, m.reason) for m in reg.moves] == [(first, second, "failed")]
    # Both failed it: the least bad option is still an answer, not an error.
    third = reg.assign("s", "e0").endpoint_id
    assert third in ("v0", "v1")
    assert sum(loads(reg).values()) == 1


def test_single_verifier_failing_a_session_is_retried() -> None:
    reg = make_registry(verifiers=1)
    assert reg.assign("s", "e0").endpoint_id == "v0"
    assert reg.assign("s", "e0").endpoint_id == "v0"  # restarted in place: same replica
    assert loads(reg) == {"v0": 1}


def test_drain_moves_sessions_and_stops_new_ones() -> None:
    reg = make_registry(verifiers=3)
    for i in range(6):
        reg.assign(f"s{i}", "e0")
    moves = reg.drain("v2")
    assert len(moves) == 2 and all(m.to_id in ("v0", "v1") for m in moves)
    assert loads(reg) == {"v0": 3, "v1": 3, "v2": 0}
    assert {reg.assign(f"n{i}", "e0").endpoint_id for i in range(4)} == {"v0", "v1"}
    reg.undrain("v2")
    assert reg.assign("after", "e0").endpoint_id == "v2"
    with pytest.raises(ValueError, match="only verifiers"):
        reg.drain("e0")


def test_no_verifier_available_is_a_typed_error() -> None:
    reg = make_registry(verifiers=2)
    reg.set_health("v0", NOT_SERVING)
    reg.drain("v1")
    with pytest.raises(NoVerifierAvailable, match="2 registered, 0 healthy"):
        reg.assign("s", "e0")
    empty = Registry()
    with pytest.raises(NoVerifierAvailable):
        empty.assign("s", "e0")
    with pytest.raises(NoEdgeAvailable):
        empty.pick_edge()


def test_evacuation_with_no_other_verifier_keeps_the_session_recorded() -> None:
    reg = make_registry(verifiers=1)
    reg.assign("s", "e0")
    moves = reg.set_health("v0", UNREACHABLE)
    assert [(m.from_id, m.to_id) for m in moves] == [("v0", None)]
    reg.set_health("v0", SERVING)  # restarted: the session's edge reconnects to it
    assert reg.assign("s", "e0").endpoint_id == "v0"


def test_reregistration_replaces_the_address_and_counts_restarts() -> None:
    reg = make_registry(verifiers=1)
    reg.assign("s", "e0")
    reg.set_health("v0", UNREACHABLE)
    ep = reg.register("v0", VERIFIER, "10.0.0.9:7000")
    assert ep.address == "10.0.0.9:7000" and ep.healthy
    assert reg.snapshot()["verifiers"][0]["restarts"] == 1
    with pytest.raises(ValueError, match="kind of endpoint 'v0' is 'verifier'"):
        reg.register("v0", EDGE, "10.0.0.9:7001")


def test_exclude_by_address_or_id() -> None:
    reg = make_registry(verifiers=2)
    addr_v0 = reg.endpoint("v0").address
    assert reg.assign("a", "e0", exclude=[addr_v0]).endpoint_id == "v1"
    assert reg.assign("b", "e0", exclude=["v1"]).endpoint_id == "v0"
    # Excluding everything still answers (fallback) only for a session that failed; a new one
    # with every verifier excluded has none.
    with pytest.raises(NoVerifierAvailable):
        reg.assign("c", "e0", exclude=["v0", "v1"])


def test_pick_edge_is_least_loaded_and_healthy() -> None:
    reg = make_registry(verifiers=2, edges=2)
    reg.assign("s0", "e0")
    assert reg.pick_edge().endpoint_id == "e1"
    reg.set_health("e1", UNREACHABLE)
    assert reg.pick_edge().endpoint_id == "e0"
    assert reg.edge_loads() == {"e0": 1, "e1": 0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"endpoint_id": "", "kind": VERIFIER, "address": "h:1"}, "endpoint_id"),
        ({"endpoint_id": "x", "kind": "gpu", "address": "h:1"}, "kind must be one of"),
        ({"endpoint_id": "x", "kind": EDGE, "address": "nohost"}, "address must be 'host:port'"),
        ({"endpoint_id": "x", "kind": EDGE, "address": "h:99999"}, r"port in \[1, 65535\]"),
    ],
)
def test_bad_registrations_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Registry().register(**kwargs)


def test_bad_health_and_unknown_endpoint() -> None:
    reg = make_registry()
    with pytest.raises(ValueError, match="health must be one of"):
        reg.set_health("v0", "GREEN")
    with pytest.raises(KeyError, match="'nope' is not registered"):
        reg.set_health("nope", SERVING)


def test_unregister_moves_sessions_and_snapshot_is_plain_data() -> None:
    import json

    reg = make_registry(verifiers=2)
    for i in range(4):
        reg.assign(f"s{i}", "e1")
    moves = reg.unregister("v1")
    assert len(moves) == 2 and all(m.to_id == "v0" for m in moves)
    snap = reg.snapshot()
    json.dumps(snap)  # JSON-able
    assert [v["endpoint_id"] for v in snap["verifiers"]] == ["v0"]
    assert snap["verifiers"][0]["load"] == 4
    assert {e["endpoint_id"]: e["load"] for e in snap["edges"]} == {"e0": 0, "e1": 4}
    assert len(snap["sessions"]) == 4


def test_sessions_of_a_restarted_or_dead_edge_are_released() -> None:
    reg = Registry(clock=FakeClock(), edge_expiry_checks=2)
    for i in range(2):
        reg.register(f"v{i}", VERIFIER, f"10.0.0.{i + 1}:5000")
    reg.register("e0", EDGE, "10.0.1.1:6000")
    reg.register("e1", EDGE, "10.0.1.2:6000")
    for i in range(4):
        reg.assign(f"a{i}", "e0")
        reg.assign(f"b{i}", "e1")
    assert loads(reg) == {"v0": 4, "v1": 4}
    # e0's actor restarted: its old sessions (alternate ones: all on v0) died with it.
    reg.register("e0", EDGE, "10.0.1.1:6001")
    assert loads(reg) == {"v0": 0, "v1": 4}
    assert {r.edge_id for r in reg.sessions()} == {"e1"}
    # e1 fails one check: kept (a blip); two in a row: released.
    reg.set_health("e1", UNREACHABLE)
    assert len(reg.sessions()) == 4
    reg.set_health("e1", UNREACHABLE)
    assert reg.sessions() == [] and loads(reg) == {"v0": 0, "v1": 0}
    with pytest.raises(ValueError, match="edge_expiry_checks must be an int >= 1"):
        Registry(edge_expiry_checks=0)


def _node(resources: dict, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": resources}


@pytest.mark.parametrize(
    ("nodes", "replicas", "expected"),
    [
        ([_node({"cloud": 1, "GPU": 1}), _node({"cloud": 1, "GPU": 1})], 2, 1.0),
        ([_node({"cloud": 1, "GPU": 1}), _node({"cloud": 1, "GPU": 1})], 4, 0.5),
        ([_node({"cloud": 1, "GPU": 8})], 2, 1.0),
        ([_node({"cloud": 1, "GPU": 1}), _node({"cloud": 1})], 2, 0.0),  # one CPU-only node
        ([_node({"cloud": 1})], 1, 0.0),
        ([_node({"edge": 1, "GPU": 1}), _node({"cloud": 1})], 1, 0.0),  # GPU on another role
        ([_node({"cloud": 1, "GPU": 1}), _node({"cloud": 1}, alive=False)], 1, 1.0),
        ([], 1, 0.0),
    ],
)
def test_gpus_per_actor_only_where_every_node_of_the_role_has_one(nodes, replicas, expected):
    from edgespec.orchestrator.deploy import gpus_per_actor

    assert gpus_per_actor(nodes, "cloud", replicas) == expected


def test_capacity_check_names_the_field_and_the_limit():
    from edgespec.orchestrator.deploy import check_capacity

    nodes = [_node({"cloud": 1, "CPU": 2}), _node({"cloud": 1, "CPU": 2}), _node({"edge": 1})]
    check_capacity(nodes, "cloud", 4, 1.0, "verifiers")  # 2 per node fits
    check_capacity(nodes, "cloud", 40, 0.0, "verifiers")  # no CPU asked: no limit
    with pytest.raises(ValueError, match=r"verifiers must be <= 4 .* got 5"):
        check_capacity(nodes, "cloud", 5, 1.0, "verifiers")
    with pytest.raises(RuntimeError, match="no alive node with the custom resource 'gpu-edge'"):
        check_capacity(nodes, "gpu-edge", 1, 1.0, "edges")


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, str]:
    """A gRPC server with only the standard health service, on a free local port."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def test_health_checks_move_sessions_off_a_verifier_that_stops_serving() -> None:
    async def scenario() -> None:
        (s0, h0, a0), (s1, _, a1) = await _health_server(), await _health_server()
        try:
            reg = Registry()
            reg.register("v0", VERIFIER, a0)
            reg.register("v1", VERIFIER, a1)
            reg.register("v2", VERIFIER, f"127.0.0.1:{_unused_port()}")  # nothing listens
            reg.register("e0", EDGE, a1)
            checker = HealthChecker(reg, interval_s=0.1, timeout_s=1.0)
            await checker.check_all()
            health_of = {e.endpoint_id: e.health for e in reg.endpoints()}
            assert health_of == {"v0": SERVING, "v1": SERVING, "v2": UNREACHABLE, "e0": SERVING}
            v2_address = reg.endpoint("v2").address
            assert checker.last_error(v2_address).startswith("UNAVAILABLE")
            assert checker.last_error(a0) == ""
            assert reg.assign("s1", "e0").endpoint_id == "v0"

            await h0.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await checker.check_all()
            assert reg.endpoint("v0").health == NOT_SERVING
            assert loads(reg) == {"v0": 0, "v1": 1, "v2": 0}  # the session moved at once

            # a verifier that left: its channel is closed and its probe forgotten
            reg.unregister("v2")
            await checker.check_all()
            assert checker.last_error(v2_address) == ""
        finally:
            await s0.stop(None)
            await s1.stop(None)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"interval_s": 0}, "interval_s"), ({"timeout_s": -1}, "timeout_s")]
)
def test_health_checker_settings_name_the_field(kwargs: dict, field: str) -> None:
    settings = {"interval_s": 1.0, "timeout_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=f"{field} must be a finite number > 0"):
        HealthChecker(Registry(), **settings)


def test_verifier_spec_holds_the_engines_config() -> None:
    from edgespec.cloud.verifier import VerifierConfig
    from edgespec.orchestrator.verifier_actor import VerifierSpec

    assert VerifierSpec("/models/target").config == VerifierConfig()  # one default per setting
    spec = VerifierSpec("/models/target", config=VerifierConfig(max_block_tokens=8))
    assert spec.config.max_block_tokens == 8
    with pytest.raises(ValueError, match="config must be a VerifierConfig"):
        VerifierSpec("/models/target", config={"max_block_tokens": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"metrics_port must be an int in \[0, 65535\]"):
        VerifierSpec("/models/target", metrics_port=70000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"verifiers": 0}, r"verifiers must be an int in \[1, 64\], got 0"),
        ({"edges": True}, r"edges must be an int in \[1, 64\], got True"),
        ({"max_restarts": -2}, "max_restarts must be an int >= -1, got -2"),
        ({"actor_num_cpus": -1.0}, "actor_num_cpus must be a finite number >= 0"),
        ({"edge_num_gpus": "1"}, "edge_num_gpus must be a finite number >= 0"),
    ],
)
def test_deploy_spec_names_the_bad_field(kwargs: dict, match: str) -> None:
    from edgespec.orchestrator.deploy import DeploySpec

    with pytest.raises(ValueError, match=match):
        DeploySpec.simple("/models/target", "/models/draft", **kwargs)
