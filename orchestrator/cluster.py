"""Bring-up and teardown: a local multi-node Ray cluster, and the edgespec actors on any cluster.

Two layers:

- **Nodes** (`start_local_cluster` / `stop_local_cluster`): a head plus edge and cloud worker
  nodes on this machine, each a ``ray start --block`` process in its own session, so the cluster
  outlives the command that started it. Worker nodes carry the custom resources ``edge`` or
  ``cloud``. Stopping signals exactly the processes recorded in the state file (never
  ``ray stop``, which would stop every Ray process of the user on the machine). On a real
  cluster (``ray up`` with ``deploy/ray-cluster.yaml``, or KubeRay) the nodes exist already and
  only the next layer runs.
- **Actors** (`deploy` / `teardown`): the named, detached `OrchestratorActor`, N `VerifierActor`
  replicas on ``cloud`` nodes and M `EdgeActor`s on ``edge`` nodes, with restart policies; GPUs
  are requested where the nodes of that role have them.

State (the cluster address, the local node processes, what was deployed) is a small JSON file in
a state directory (default ``~/.edgespec``), so ``edgespec up`` / ``status`` / ``generate`` /
``down`` can be separate commands.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgespec.edge.config import EngineConfig
from edgespec.orchestrator.actors import (
    NAMESPACE,
    ORCHESTRATOR_NAME,
    OrchestratorActor,
    OrchestratorConfig,
    VerifierActor,
    VerifierSpec,
)
from edgespec.orchestrator.edge_actor import EdgeActor, EdgeSpec

logger = logging.getLogger(__name__)

EDGE_RESOURCE = "edge"
CLOUD_RESOURCE = "cloud"
# Each actor asks for this share of its role's resource: the resource marks the node's role
# (a node declares ``edge: 1``), and a small share lets several replicas share a node.
ROLE_SHARE = 0.01
DEFAULT_STATE_DIR = Path("~/.edgespec")
STATE_FILE = "state.json"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def verifier_name(i: int) -> str:
    return f"edgespec-verifier-{i}"


def edge_name(i: int) -> str:
    return f"edgespec-edge-{i}"


# ---------------------------------------------------------------- deployment spec


@dataclass(frozen=True)
class DeploySpec:
    """What `deploy` starts."""

    verifier: VerifierSpec
    edge: EdgeSpec
    verifiers: int = 2  # verifier replicas (on `cloud` nodes)
    edges: int = 2  # edges (on `edge` nodes)
    max_restarts: int = 3  # per actor; Ray restarts a dead actor up to this many times
    max_task_retries: int = 3  # actor method calls retried across a restart
    actor_num_cpus: float = 1.0  # logical CPUs each model actor holds
    # GPUs per actor; None = auto: a GPU share where every node of the role has GPUs, else 0.
    verifier_num_gpus: float | None = None
    edge_num_gpus: float | None = None
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)

    def __post_init__(self) -> None:
        for name in ("verifiers", "edges"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise ValueError(f"{name} must be an int in [1, 64], got {v!r}")
        for name in ("max_restarts", "max_task_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < -1:
                raise ValueError(f"{name} must be an int >= -1 (-1 = unlimited), got {v!r}")
        for name in ("actor_num_cpus", "verifier_num_gpus", "edge_num_gpus"):
            v = getattr(self, name)
            if v is None and name != "actor_num_cpus":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")

    @classmethod
    def simple(
        cls,
        target_path: str | Path,
        draft_path: str | Path,
        *,
        verifiers: int = 2,
        edges: int = 2,
        link: dict[str, Any] | None = None,
        default_k: int | None = None,
        default_policy: str | None = None,
        compute_profile: str = "real",
        **kwargs: Any,
    ) -> DeploySpec:
        """A spec from the two checkpoint folders and the usual knobs (`compute_profile`: the
        `edgespec.core.profiles` name both roles run under; `default_k` / `default_policy`
        None: the edge engine's defaults)."""
        engine = EngineConfig()
        engine = replace(
            engine,
            default_k=default_k if default_k is not None else engine.default_k,
            default_policy=default_policy if default_policy is not None else engine.default_policy,
        )
        return cls(
            verifier=VerifierSpec(target_path=str(target_path), compute_profile=compute_profile),
            edge=EdgeSpec(
                draft_path=str(draft_path),
                link=link,
                engine=engine,
                compute_profile=compute_profile,
            ),
            verifiers=verifiers,
            edges=edges,
            **kwargs,
        )

    def actor_names(self) -> tuple[str, ...]:
        return tuple(verifier_name(i) for i in range(self.verifiers)) + tuple(
            edge_name(i) for i in range(self.edges)
        )


# ---------------------------------------------------------------- connecting


def connect(address: str | None = None) -> None:
    """Connect this process to a Ray cluster (idempotent). `address` None = a new local Ray.

    The actors import ``edgespec`` from the workers' environment: every node has it installed.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
        include_dashboard=False if address is None else None,
    )


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def get_orchestrator():
    """The orchestrator actor's handle. Raises ValueError when none is deployed."""
    import ray

    return ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)


# ---------------------------------------------------------------- deploy / teardown


def gpus_per_actor(nodes: list[dict[str, Any]], resource: str, replicas: int) -> float:
    """GPUs each of `replicas` actors of a role asks for, from `ray.nodes()`-style records.

    Every alive node carrying the role's `resource` has a GPU: one GPU per actor, or an equal
    share when there are more actors than GPUs. Any node of the role without one: 0 (the actors
    run on CPU, and can be placed on any node of the role).
    """
    role_nodes = [n for n in nodes if n["Alive"] and n["Resources"].get(resource, 0) > 0]
    gpus = [n["Resources"].get("GPU", 0.0) for n in role_nodes]
    if not role_nodes or min(gpus) <= 0:
        return 0.0
    return min(1.0, sum(gpus) / replicas)


def check_capacity(
    nodes: list[dict[str, Any]], resource: str, replicas: int, num_cpus: float, field: str
) -> None:
    """Raise ValueError naming `field` when the role's alive nodes cannot hold `replicas` actors
    of `num_cpus` CPUs each (Ray would leave the extra actors pending forever)."""
    role_nodes = [n for n in nodes if n["Alive"] and n["Resources"].get(resource, 0) > 0]
    if not role_nodes:
        raise RuntimeError(
            f"the cluster has no alive node with the custom resource {resource!r}; start one "
            f"with `ray start --address=... --resources='{{\"{resource}\": 1}}'`"
        )
    if num_cpus <= 0:
        return
    fits = sum(int(n["Resources"].get("CPU", 0) // num_cpus) for n in role_nodes)
    if replicas > fits:
        raise ValueError(
            f"{field} must be <= {fits} on this cluster ({len(role_nodes)} '{resource}' nodes, "
            f"{num_cpus:g} CPU per actor), got {replicas}"
        )


def _role_gpus(resource: str, replicas: int) -> float:
    import ray

    return gpus_per_actor(ray.nodes(), resource, replicas)


def _head_affinity():
    """Soft placement on the head node (the orchestrator belongs with the control plane)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for n in ray.nodes():
        if n["Alive"] and "node:__internal_head__" in n["Resources"]:
            return NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=True)
    return "DEFAULT"


@dataclass
class Deployment:
    """Handles of what `deploy` started."""

    spec: DeploySpec
    orchestrator: Any
    verifiers: list[Any]
    edges: list[Any]
    infos: dict[str, dict[str, Any]]  # actor name -> ready() info (address, node, device)

    def edge_addresses(self) -> list[str]:
        return [self.infos[edge_name(i)]["address"] for i in range(self.spec.edges)]

    def verifier_addresses(self) -> list[str]:
        return [self.infos[verifier_name(i)]["address"] for i in range(self.spec.verifiers)]


def deploy(spec: DeploySpec, progress: Progress = _quiet, timeout_s: float = 600.0) -> Deployment:
    """Start the orchestrator, the verifiers and the edges; return once every endpoint serves.

    Needs `connect` first. Raises RuntimeError when a role has no node, ValueError when its
    nodes cannot hold the replicas, TimeoutError when the actors are not ready within
    `timeout_s` (model loading included).
    """
    import ray

    nodes = ray.nodes()
    check_capacity(nodes, CLOUD_RESOURCE, spec.verifiers, spec.actor_num_cpus, "verifiers")
    check_capacity(nodes, EDGE_RESOURCE, spec.edges, spec.actor_num_cpus, "edges")
    common = {
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": spec.max_restarts,
        "max_task_retries": spec.max_task_retries,
    }
    orch_config = OrchestratorConfig(
        health_interval_s=spec.orchestrator.health_interval_s,
        health_timeout_s=spec.orchestrator.health_timeout_s,
        actor_names=spec.actor_names(),
    )
    progress("starting the orchestrator")
    orchestrator = (
        ray.remote(OrchestratorActor)
        .options(
            name=ORCHESTRATOR_NAME,
            num_cpus=0,
            scheduling_strategy=_head_affinity(),
            max_concurrency=1000,
            **common,
        )
        .remote(orch_config)
    )
    ray.get(orchestrator.endpoints.remote(), timeout=timeout_s)

    v_gpus = (
        spec.verifier_num_gpus
        if spec.verifier_num_gpus is not None
        else _role_gpus(CLOUD_RESOURCE, spec.verifiers)
    )
    e_gpus = (
        spec.edge_num_gpus
        if spec.edge_num_gpus is not None
        else _role_gpus(EDGE_RESOURCE, spec.edges)
    )
    progress(
        f"starting {spec.verifiers} verifier(s) on '{CLOUD_RESOURCE}' nodes "
        f"({'GPU ' + format(v_gpus, 'g') if v_gpus else 'CPU'}) and {spec.edges} edge(s) on "
        f"'{EDGE_RESOURCE}' nodes ({'GPU ' + format(e_gpus, 'g') if e_gpus else 'CPU'})"
    )

    def start(actor_cls, name: str, resource: str, gpus: float, actor_spec):
        """One model actor, spread over the nodes that declare `resource`."""
        return (
            ray.remote(actor_cls)
            .options(
                name=name,
                resources={resource: ROLE_SHARE},
                num_cpus=spec.actor_num_cpus,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",
                **common,
            )
            .remote(name, actor_spec)
        )

    verifiers = [
        start(VerifierActor, verifier_name(i), CLOUD_RESOURCE, v_gpus, spec.verifier)
        for i in range(spec.verifiers)
    ]
    edges = [
        start(EdgeActor, edge_name(i), EDGE_RESOURCE, e_gpus, spec.edge) for i in range(spec.edges)
    ]
    names = spec.actor_names()
    refs = {a.ready.remote(): name for a, name in zip(verifiers + edges, names, strict=True)}
    infos: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = sorted(refs[r] for r in pending)
            raise TimeoutError(f"actors not ready within {timeout_s:g} s: {waiting}")
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            info = ray.get(ref)
            infos[refs[ref]] = info
            progress(
                f"  {refs[ref]} serving on {info['address']} "
                f"({info['device']}, node {info['node_id'][:8]})  [{len(infos)}/{len(names)}]"
            )
    # The orchestrator has every registration; one health round marks them SERVING.
    ray.get(orchestrator.check_now.remote(), timeout=timeout_s)
    return Deployment(spec, orchestrator, verifiers, edges, infos)


def teardown(names: tuple[str, ...] | None = None) -> list[str]:
    """Kill the edgespec actors (the orchestrator's and the given names); returns those killed.

    Needs `connect` first. Actors that do not exist are skipped.
    """
    import ray

    killed = []
    todo = list(names or ())
    with contextlib.suppress(Exception):
        orch = get_orchestrator()
        for ep in ray.get(orch.endpoints.remote(), timeout=10):
            if ep["endpoint_id"] not in todo:
                todo.append(ep["endpoint_id"])
    todo.append(ORCHESTRATOR_NAME)
    for name in todo:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(actor, no_restart=True)
        killed.append(name)
    return killed


def status() -> dict[str, Any]:
    """The orchestrator's view (nodes, endpoints, sessions, load). Needs `connect` first."""
    import ray

    return ray.get(get_orchestrator().status.remote(), timeout=30)


# ---------------------------------------------------------------- state file


@dataclass
class ClusterState:
    """What `edgespec up` leaves for the next commands."""

    address: str  # Ray cluster address (GCS host:port)
    local: bool  # True: the nodes below were started by us and are stopped by `down`
    pids: list[int] = field(default_factory=list)  # `ray start --block` processes, head first
    temp_dir: str = ""
    started_at: float = 0.0
    # Environment every process talking to this cluster needs (e.g. RAY_AUTH_MODE=token).
    env: dict[str, str] = field(default_factory=dict)
    deployed: dict[str, Any] = field(default_factory=dict)  # the DeploySpec, as plain data

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        path = state_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no edgespec cluster state in {state_dir}: run `edgespec up`")
        return cls(**json.loads(path.read_text()))


def connect_state(state: ClusterState) -> None:
    """`connect` to the cluster a state file describes, with the environment it needs."""
    changed = any(os.environ.get(k) != v for k, v in state.env.items())
    os.environ.update(state.env)
    if changed and "ray._raylet" in sys.modules:
        # Ray reads RAY_AUTH_MODE into its config when it is imported; refresh the config, as
        # ray.init does itself when it turns token authentication on.
        import ray._raylet

        ray._raylet.Config.initialize("")
    connect(state.address)


def resolve_state_dir(state_dir: str | Path | None) -> Path:
    return Path(state_dir or os.environ.get("EDGESPEC_STATE_DIR") or DEFAULT_STATE_DIR).expanduser()


# ---------------------------------------------------------------- local nodes


@dataclass(frozen=True)
class LocalClusterConfig:
    """A head plus edge and cloud worker nodes on this machine."""

    edge_nodes: int = 2
    cloud_nodes: int = 2
    cpus_per_node: int = 2  # logical CPUs each worker node declares
    head_cpus: int = 1
    object_store_mb: int = 80  # per node
    node_start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name, lo in (("edge_nodes", 1), ("cloud_nodes", 1), ("cpus_per_node", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 16:
                raise ValueError(f"{name} must be an int in [{lo}, 16], got {v!r}")
        if self.object_store_mb < 75:
            raise ValueError(
                f"object_store_mb must be >= 75 (Ray's minimum), got {self.object_store_mb}"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def _local_env() -> dict[str, str]:
    """Environment of the local nodes and their clients.

    Token authentication: Ray's head turns it on by itself when ``~/.ray/auth_token`` exists,
    but a joining node does not, so the mode is set explicitly for every process (the user's
    RAY_AUTH_MODE wins) and the token is generated if missing.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode == "token":
        subprocess.run(
            [_ray_executable(), "get-auth-token", "--generate"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "RAY_AUTH_MODE": mode},
            timeout=60,
        )
    return {"RAY_AUTH_MODE": mode}


def _start_node(
    args: list[str], log_path: Path, timeout_s: float, extra_env: dict[str, str]
) -> subprocess.Popen:
    """Start one `ray start --block` node and wait until it says the runtime started.

    Nodes start one at a time: Ray names a node's sockets after the files already present, so
    nodes starting together on one machine can pick the same socket and fail.
    """
    cmd = [
        _ray_executable(),
        "start",
        "--block",
        "--disable-usage-stats",
        # Every node on one machine needs its own agent and metrics ports.
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        *args,
    ]
    env = {**os.environ, **extra_env}
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {proc.returncode}; see {log_path}:\n"
                + log_path.read_text()[-2000:]
            )
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return proc
        time.sleep(0.5)
    _stop_pids([proc.pid], timeout_s=10)
    raise TimeoutError(f"ray node did not start within {timeout_s:g} s; see {log_path}")


def start_local_cluster(
    state_dir: Path, config: LocalClusterConfig | None = None, progress: Progress = _quiet
) -> ClusterState:
    """Start a head and the edge and cloud nodes on this machine; save and return the state.

    Raises RuntimeError if a cluster recorded in `state_dir` is still running.
    """
    config = config if config is not None else LocalClusterConfig()
    with contextlib.suppress(FileNotFoundError):
        old = ClusterState.load(state_dir)
        if old.local and any(_alive(p) for p in old.pids):
            raise RuntimeError(
                f"a local cluster from {state_dir} is running at {old.address}; "
                "`edgespec down` first"
            )
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    # Ray's socket paths must stay short (AF_UNIX limit), so its temp dir lives under /tmp.
    temp_dir = f"/tmp/edgespec-ray-{os.getuid()}-{os.getpid()}"
    port = _free_port()
    common = [f"--object-store-memory={config.object_store_mb * 1024 * 1024}"]
    t0 = time.monotonic()
    pids: list[int] = []
    env = _local_env()
    state = ClusterState(
        address=f"127.0.0.1:{port}",
        local=True,
        pids=pids,
        temp_dir=temp_dir,
        started_at=time.time(),
        env=env,
    )
    try:
        progress("starting the head node")
        head = _start_node(
            [
                "--head",
                f"--port={port}",
                f"--num-cpus={config.head_cpus}",
                "--include-dashboard=false",
                f"--temp-dir={temp_dir}",
                *common,
            ],
            logs / "head.log",
            config.node_start_timeout_s,
            env,
        )
        pids.append(head.pid)
        state.save(state_dir)
        roles = [EDGE_RESOURCE] * config.edge_nodes + [CLOUD_RESOURCE] * config.cloud_nodes
        for i, role in enumerate(roles):
            progress(f"starting {role} node {i + 1}/{len(roles)}")
            proc = _start_node(
                [
                    f"--address={state.address}",
                    f"--num-cpus={config.cpus_per_node}",
                    f"--resources={json.dumps({role: 1})}",
                    *common,
                ],
                logs / f"{role}-{i}.log",
                config.node_start_timeout_s,
                env,
            )
            pids.append(proc.pid)
            state.save(state_dir)
    except BaseException:
        _stop_pids(pids, timeout_s=30)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / STATE_FILE).unlink()
        raise
    progress(f"local cluster up at {state.address} ({time.monotonic() - t0:.0f} s)")
    return state


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a child of ours that exited is reaped here)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: started by an earlier command
        pass
    else:
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_pids(pids: list[int], timeout_s: float = 60.0) -> None:
    """SIGTERM each `ray start --block` process (it stops its node's processes), worker nodes
    first; SIGKILL the process group of any that outlives `timeout_s`."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    for pid in pids:
        if _alive(pid):
            logger.warning("node process %d did not stop within %g s; killing it", pid, timeout_s)
        # Each node was started as the leader of its own process group (start_new_session), so
        # the group holds exactly that node's processes: kill any that outlived their leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def stop_local_cluster(state: ClusterState, timeout_s: float = 60.0) -> None:
    """Stop the node processes recorded in `state` (only those) and remove Ray's temp dir."""
    if state.local:
        _stop_pids(state.pids, timeout_s=timeout_s)
        if state.temp_dir.startswith("/tmp/edgespec-ray-"):
            shutil.rmtree(state.temp_dir, ignore_errors=True)
