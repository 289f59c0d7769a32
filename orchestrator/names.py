"""The names every part of the control plane agrees on: Ray namespace, actor names, node roles.

Plain constants and functions (no Ray import), shared by the actors, `orchestrator.deploy` and
`orchestrator.nodes`.
"""

from __future__ import annotations

NAMESPACE = "edgespec"  # Ray namespace of every edgespec actor
ORCHESTRATOR_NAME = "edgespec-orchestrator"

# Custom resources that mark a node's role: a node declares ``edge: 1`` or ``cloud: 1``.
EDGE_RESOURCE = "edge"
CLOUD_RESOURCE = "cloud"


def verifier_name(i: int) -> str:
    """The Ray actor name (and registry endpoint id) of verifier replica `i`."""
    return f"edgespec-verifier-{i}"


def edge_name(i: int) -> str:
    """The Ray actor name (and registry endpoint id) of edge `i`."""
    return f"edgespec-edge-{i}"
