"""The edgespec actors on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine).

One cluster for the module: a head, 2 nodes with the custom resource ``edge`` and 2 with ``cloud``;
deployed on it: the orchestrator, 2 verifier replicas and 2 edges (tiny random Llama pair), with an
emulated 20 ms RTT link between edges and verifiers so that a generation lasts long enough to be
interrupted. Clients are the real SDK (`edgespec.Client`) over gRPC.

Order matters: the tests that kill actors come last (actors restart, and later tests wait for the
replacements to register).
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")

LINK_RTT_MS = 20.0
OBJECT_STORE_BYTES = 80 * 1024 * 1024
PROMPTS = [[5, 17, 42, 99, 3], [120, 7, 7, 250], [33, 34, 35], [201, 11, 64, 64, 9, 1]]


def _wait_for(predicate, what: str, timeout_s: float = 90.0, interval_s: float = 0.25):
    """Poll `predicate` until it returns a truthy value (bounded); returns that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def deployment(tiny_pair):
    from ray.cluster_utils import Cluster

    from edgespec.linkemu import LinkProfile
    from edgespec.orchestrator import connection, deploy
    from edgespec.orchestrator.orchestrator_actor import OrchestratorConfig

    rc = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES,
        },
    )
    try:
        for role in ("edge", "edge", "cloud", "cloud"):
            rc.add_node(num_cpus=2, resources={role: 1}, object_store_memory=OBJECT_STORE_BYTES)
        rc.wait_for_nodes()
        connection.connect(rc.address)
        spec = deploy.DeploySpec.simple(
            tiny_pair.target_dir,
            tiny_pair.draft_dir,
            verifiers=2,
            edges=2,
            link=LinkProfile(rtt_ms=LINK_RTT_MS).to_dict(),
            orchestrator=OrchestratorConfig(health_interval_s=0.5, health_timeout_s=1.0),
        )
        dep = deploy.deploy(spec, timeout_s=600)
        yield dep
    finally:
        try:
            if ray.is_initialized():
                deploy.teardown()
        finally:
            connection.disconnect()
            rc.shutdown()


@pytest.fixture(scope="module")
def target_alone(tiny_pair):
    """prompt tuple + max_new_tokens -> the target's greedy tokens (the reference output)."""
    from edgespec.core.generate import generate_autoregressive
    from edgespec.core.params import SamplingParams
    from edgespec.core.runner import ModelRunner

    runner = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu")
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            params = SamplingParams(max_new_tokens=max_new_tokens)
            cache[key] = generate_autoregressive(runner, prompt, params).tokens
        return cache[key]

    return reference


def _status(dep) -> dict:
    return ray.get(dep.orchestrator.status.remote(with_actor_stats=False), timeout=30)


def _actor(name: str):
    from edgespec.orchestrator.names import NAMESPACE

    return ray.get_actor(name, namespace=NAMESPACE)


def _all_serving(dep) -> dict | None:
    view = _status(dep)
    eps = view["verifiers"] + view["edges"]
    ok = len(eps) == dep.spec.verifiers + dep.spec.edges and all(
        e["health"] == "SERVING" for e in eps
    )
    return view if ok and not view["sessions"] else None


def _edge_address(dep, i: int) -> str:
    view = _status(dep)
    return next(e["address"] for e in view["edges"] if e["endpoint_id"] == f"edgespec-edge-{i}")


def test_each_actor_runs_on_a_node_of_its_kind(deployment):
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert sum(1 for r in resources.values() if r.get("edge")) == 2
    assert sum(1 for r in resources.values() if r.get("cloud")) == 2
    for name, info in deployment.infos.items():
        role = "cloud" if name.startswith("edgespec-verifier") else "edge"
        assert resources[info["node_id"]].get(role, 0) >= 1, (name, resources[info["node_id"]])
        assert info["device"] == "cpu"  # no GPU on these nodes: the model runs on the CPU
    view = _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING")
    assert {v["endpoint_id"] for v in view["verifiers"]} == {
        "edgespec-verifier-0",
        "edgespec-verifier-1",
    }
    assert sum(n["alive"] for n in view["nodes"]) == 5


def test_sdk_generation_equals_the_target_alone(deployment, target_alone):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams

    for i, prompt in enumerate(PROMPTS[:2]):
        with Client(_edge_address(deployment, i % 2), timeout=60) as client:
            result = client.generate(
                prompt, SamplingParams(max_new_tokens=40), policy="fixed", draft_tokens=4
            )
        assert result.token_ids == target_alone(prompt, 40)
        assert result.stats.reconnects == 0
        assert result.stats.rounds < 40  # speculative: several tokens per round trip


def test_each_actor_serves_prometheus_metrics(deployment):
    import urllib.request

    for name, info in deployment.infos.items():
        url = info["metrics_url"]
        assert url.startswith("http://") and url.endswith("/metrics"), (name, url)
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        family = "edgespec_verifier_" if name.startswith("edgespec-verifier") else "edgespec_edge_"
        assert f"{family}active_sessions" in text, (name, text[:300])


def test_16_concurrent_sessions_zero_errors_and_balanced(deployment, target_alone):
    from edgespec.bench.load_sessions import run_load_sessions

    _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING, no sessions")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    expected = {i: target_alone(p, 24) for i, p in enumerate(prompts)}
    result = run_load_sessions(
        deployment.orchestrator,
        sessions=16,
        prompts=prompts,
        max_new_tokens=24,
        expected=expected,
        timeout_s=120,
    )
    assert result["errors"] == 0, result["error_messages"]
    assert result["mismatches"] == 0
    assert result["per_edge_sessions"] and len(result["per_edge_sessions"]) == 2
    assert sum(result["per_verifier_sessions"].values()) == 16
    assert result["balanced"], result  # (max - min) / mean <= 0.25
    # Each session was released at its end: no load left behind.
    _wait_for(lambda: _all_serving(deployment), "sessions released")


def test_drained_verifier_gets_no_new_sessions(deployment):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams

    orch = deployment.orchestrator
    ray.get(orch.drain.remote("edgespec-verifier-0"), timeout=30)
    try:
        before = {v["endpoint_id"]: v["total_assigned"] for v in _status(deployment)["verifiers"]}
        with Client(_edge_address(deployment, 0), timeout=60) as client:
            for prompt in PROMPTS[:3]:
                client.generate(prompt, SamplingParams(max_new_tokens=8), policy="fixed")
        after = {v["endpoint_id"]: v["total_assigned"] for v in _status(deployment)["verifiers"]}
        assert after["edgespec-verifier-0"] == before["edgespec-verifier-0"]
        assert after["edgespec-verifier-1"] == before["edgespec-verifier-1"] + 3
    finally:
        ray.get(orch.undrain.remote("edgespec-verifier-0"), timeout=30)


def test_drain_with_stop_moves_a_running_session_with_the_same_output(deployment, target_alone):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams

    _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING, no sessions")
    orch = deployment.orchestrator
    prompt, n = PROMPTS[1], 160
    with Client(_edge_address(deployment, 1), timeout=120) as client:
        stream = client.stream(
            prompt, SamplingParams(max_new_tokens=n), policy="fixed", draft_tokens=2
        )
        with stream:
            first = next(stream)
            (session,) = _status(deployment)["sessions"]
            drained = session["verifier_id"]
            # Out of rotation, its session reassigned, its server stopped: the edge reconnects.
            moves = ray.get(orch.drain.remote(drained, stop=True, grace_s=0.0), timeout=30)
            assert [m["from_id"] for m in moves] == [drained] and moves[0]["to_id"] != drained
            ids = list(first.ids) + [t for chunk in stream for t in chunk.ids]
        result = stream.result
    assert ids == result.token_ids == target_alone(prompt, n)
    assert result.stats.reconnects >= 1
    # Bring the drained replica back: a restart serves again, then it rejoins the rotation.
    ray.kill(_actor(drained), no_restart=False)
    ray.get(orch.undrain.remote(drained), timeout=30)
    _wait_for(lambda: _all_serving(deployment), f"{drained} to serve again")


def test_restarted_orchestrator_rebuilds_its_registry(deployment):
    started = _status(deployment)["orchestrator"]["started_at"]
    ray.kill(deployment.orchestrator, no_restart=False)
    _wait_for(
        lambda: _status(deployment)["orchestrator"]["started_at"] != started,
        "a new orchestrator instance",
    )
    view = _wait_for(lambda: _all_serving(deployment), "the endpoints to register again")
    names = {e["endpoint_id"] for e in view["verifiers"] + view["edges"]}
    assert names == set(deployment.spec.actor_names())


def test_status_view_names_nodes_endpoints_and_load(deployment):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams
    from edgespec.orchestrator import deploy
    from edgespec.orchestrator.status_text import format_status

    with Client(_edge_address(deployment, 0), timeout=120) as client:
        client.generate(PROMPTS[0], SamplingParams(max_new_tokens=8))
    _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING, no sessions")
    text = format_status(deploy.status())
    assert "nodes (5 alive of 5)" in text
    for name in deployment.spec.actor_names():
        assert name in text
    assert "SERVING" in text and "sessions (0 active)" in text
    # the edge that served says what it learnt of its verifier link
    assert "link " in text and "(greedy): rtt " in text and "acceptance " in text


def test_verifier_killed_mid_generation_completes_with_the_same_output(deployment, target_alone):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams

    _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING, no sessions")
    prompt, n = PROMPTS[2], 200
    restarts = {v["endpoint_id"]: v["restarts"] for v in _status(deployment)["verifiers"]}
    with Client(_edge_address(deployment, 0), timeout=120) as client:
        stream = client.stream(
            prompt, SamplingParams(max_new_tokens=n), policy="fixed", draft_tokens=2
        )
        with stream:
            first = next(stream)  # the session is open on a verifier and generating
            sessions = _status(deployment)["sessions"]
            assert len(sessions) == 1
            victim = sessions[0]["verifier_id"]
            ray.kill(_actor(victim), no_restart=False)  # dies now; Ray restarts it
            ids = list(first.ids) + [t for chunk in stream for t in chunk.ids]
        result = stream.result
    assert ids == result.token_ids == target_alone(prompt, n)
    assert result.stats.reconnects >= 1
    # The killed replica restarts and registers its new endpoint.
    view = _wait_for(
        lambda: (
            (v := _all_serving(deployment))
            and {e["endpoint_id"]: e["restarts"] for e in v["verifiers"]}[victim]
            == restarts[victim] + 1
            and v
        ),
        f"{victim} to restart and register again",
    )
    assert any(m["from_id"] == victim for m in view["moves"])


def test_edge_killed_sdk_gets_a_typed_error_then_the_restarted_edge_serves(
    deployment, target_alone
):
    from edgespec.client import Client
    from edgespec.core.params import SamplingParams
    from edgespec.errors import EdgespecError, Unavailable

    _wait_for(lambda: _all_serving(deployment), "every endpoint SERVING, no sessions")
    prompt, n = PROMPTS[3], 200
    old_address = _edge_address(deployment, 1)
    timeout_s = 60.0
    with Client(old_address, timeout=timeout_s) as client:
        stream = client.stream(
            prompt, SamplingParams(max_new_tokens=n), policy="fixed", draft_tokens=1
        )
        t0 = time.monotonic()
        with stream:
            next(stream)
            ray.kill(_actor("edgespec-edge-1"), no_restart=False)
            with pytest.raises(EdgespecError) as caught:
                for _ in stream:
                    pass
        elapsed = time.monotonic() - t0
    # A clean typed error (the connection to the edge is gone), not the deadline running out.
    assert isinstance(caught.value, Unavailable), repr(caught.value)
    assert elapsed < timeout_s
    # The edge restarts on a new port; the orchestrator hands it out, and it serves.
    _wait_for(
        lambda: _all_serving(deployment) and _edge_address(deployment, 1) != old_address,
        "edgespec-edge-1 to restart and register again",
    )
    with Client(_edge_address(deployment, 1), timeout=60) as client:
        result = client.generate(prompt, SamplingParams(max_new_tokens=30), policy="fixed")
    assert result.token_ids == target_alone(prompt, 30)
