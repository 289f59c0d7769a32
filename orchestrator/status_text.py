"""The orchestrator's status view as the text ``edgespec status`` prints.

The view is what `OrchestratorActor.status` returns. Plain functions over its dicts (no Ray):
nodes and their roles, each verifier and edge with its health, load and actor stats, what each
edge learnt of its verifier links, the active sessions and the recent reassignments.
"""

from __future__ import annotations

from typing import Any


def _format_link(link: dict[str, Any]) -> str:
    """One learnt link of an edge (`EdgeEngine.link_estimates`) as a status line."""

    def ms(key: str) -> str:
        return "-" if link.get(key) is None else f"{link[key]:.1f} ms"

    alpha = "-" if link.get("alpha") is None else f"{link['alpha']:.2f}"
    mode = "cloud-only" if link["mode"] == "cloud_only" else f"speculative k={link['k']}"
    return (
        f"link {link['verifier']} ({link['regime']}): rtt {ms('rtt_ms')}, acceptance {alpha}, "
        f"draft {ms('draft_ms')}/token, verify {ms('verify_ms')}; {mode}"
    )


def format_status(view: dict[str, Any]) -> str:
    """The human-readable `edgespec status` text for an orchestrator status view."""
    lines = []
    nodes = view.get("nodes", [])
    lines.append(f"nodes ({sum(n['alive'] for n in nodes)} alive of {len(nodes)})")
    for n in nodes:
        roles = [r for r in ("edge", "cloud") if n["resources"].get(r)] or (
            ["head"] if n["is_head"] else ["-"]
        )
        res = ", ".join(f"{k}={v:g}" for k, v in sorted(n["resources"].items()))
        alive = "alive" if n["alive"] else "DEAD"
        lines.append(
            f"  {n['node_id'][:12]}  {n['address']:<15} {'/'.join(roles):<6} {alive:<5} {res}"
        )
    verifier_sessions = {v["endpoint_id"]: v["load"] for v in view.get("verifiers", [])}
    total = sum(verifier_sessions.values())
    for title, kind in (("verifiers", "verifiers"), ("edges", "edges")):
        eps = view.get(kind, [])
        lines.append(f"{title} ({len(eps)})")
        for e in eps:
            flags = " draining" if e.get("draining") else ""
            stats = e.get("actor_stats", {})
            extra = ""
            if "error" in stats:
                extra = f"  stats: {stats['error']}"
            elif kind == "verifiers" and stats:
                extra = (
                    f"  open={stats.get('sessions', 0)} blocks={stats.get('applied', 0)} "
                    f"accepted={stats.get('accepted', 0)}/{stats.get('drafted', 0)}"
                )
            elif stats:
                extra = (
                    f"  active={stats.get('active_sessions', 0)} "
                    f"assigned={stats.get('assignments', 0)}"
                )
                if stats.get("http_url"):
                    extra += f" http={stats['http_url']}/v1"
            total = f" total={e.get('total_assigned', 0)}" if kind == "verifiers" else ""
            lines.append(
                f"  {e['endpoint_id']:<22} {e['address']:<21} node {e['node_id'][:8]} "
                f"{e['device']:<5} {e['health']:<11} load={e['load']:<3} "
                f"restarts={e['restarts']}{total}{flags}{extra}"
            )
            for link in stats.get("link_estimates", []) if "error" not in stats else []:
                lines.append("    " + _format_link(link))
    sessions = view.get("sessions", [])
    lines.append(f"sessions ({len(sessions)} active)")
    if total:
        share = ", ".join(f"{k}: {v}" for k, v in sorted(verifier_sessions.items()))
        lines.append(f"  per verifier: {share}")
    for s in sessions[:20]:
        lines.append(
            f"  {s['session_key']:<40} edge {s['edge_id']:<20} verifier {s['verifier_id']} "
            f"(moved {s['reassignments']}x)"
        )
    if len(sessions) > 20:
        lines.append(f"  ... {len(sessions) - 20} more")
    moves = view.get("moves", [])
    if moves:
        lines.append(f"recent reassignments ({len(moves)})")
        for m in moves[-5:]:
            lines.append(f"  {m['session_key']}: {m['from_id']} -> {m['to_id']} ({m['reason']})")
    return "\n".join(lines)
