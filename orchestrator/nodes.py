"""Cluster bring-up: a head plus edge and cloud worker nodes on this machine, and the state file.

Each node is a ``ray start --block`` process in its own session, so the cluster outlives the
command that started it. Worker nodes carry the custom resource ``edge`` or ``cloud``
(`orchestrator.names`). Stopping signals exactly the processes recorded in the state file (never
``ray stop``, which would stop every Ray process of the user on the machine). On a real cluster
(``ray up`` with ``deploy/ray-cluster.yaml``, or KubeRay) the nodes exist already and only
`orchestrator.deploy` runs.

State (the cluster address, the local node processes, what was deployed) is a small JSON file in
a state directory (default ``~/.edgespec``), so ``edgespec up`` / ``status`` / ``generate`` /
``down`` can be separate commands. Nothing here imports Ray.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgespec.core.validation import check_int, check_positive
from edgespec.orchestrator.names import CLOUD_RESOURCE, EDGE_RESOURCE

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("~/.edgespec")
STATE_FILE = "state.json"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """A `Progress` that says nothing."""


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
        """Write ``state.json`` in `state_dir` (created if missing); returns its path."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        """Read ``state.json`` from `state_dir`; FileNotFoundError when there is none."""
        path = state_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no edgespec cluster state in {state_dir}: run `edgespec up`")
        return cls(**json.loads(path.read_text()))


def resolve_state_dir(state_dir: str | Path | None) -> Path:
    """`state_dir`, else $EDGESPEC_STATE_DIR, else ``~/.edgespec`` (user expanded)."""
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
        for name in ("edge_nodes", "cloud_nodes", "cpus_per_node"):
            check_int(name, getattr(self, name), 1, 16)
        check_int("head_cpus", self.head_cpus, 0)
        check_int("object_store_mb", self.object_store_mb, 75)  # Ray's minimum
        check_positive("node_start_timeout_s", self.node_start_timeout_s)


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
