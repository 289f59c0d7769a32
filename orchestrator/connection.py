"""Connecting this process (a CLI command, a test, a benchmark) to the Ray cluster edgespec runs on.

The actors import ``edgespec`` from the workers' environment: every node has it installed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from edgespec.orchestrator.names import NAMESPACE, ORCHESTRATOR_NAME
from edgespec.orchestrator.nodes import ClusterState


def connect(address: str | None = None) -> None:
    """Connect this process to a Ray cluster (idempotent). `address` None = a new local Ray."""
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
        include_dashboard=False if address is None else None,
    )


def connect_state(state: ClusterState) -> None:
    """`connect` to the cluster a state file describes, with the environment it needs."""
    changed = any(os.environ.get(k) != v for k, v in state.env.items())
    os.environ.update(state.env)
    if changed:
        # Ray read RAY_AUTH_MODE into its config when it was imported (above); refresh the
        # config, as ray.init does itself when it turns token authentication on.
        ray._raylet.Config.initialize("")
    connect(state.address)


def disconnect() -> None:
    """Disconnect this process from Ray (no-op when not connected); the cluster keeps running."""
    if ray.is_initialized():
        ray.shutdown()


def get_orchestrator() -> Any:
    """The orchestrator actor's handle. Needs `connect`; raises ValueError when none is deployed."""
    return ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)
