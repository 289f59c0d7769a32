"""Session identity for the edge engine's address provider (used by `EdgeActor`).

`edge.engine.EdgeEngine` asks a provider callable for a verifier address whenever a session opens
or reopens, without saying which session asks. The orchestrator needs to know: a second request
from the same session means its verifier failed it (the session moves), and a session's end frees
its verifier's load. `SessionScopedEngine` gives each `generate` call a `SessionSlot` in a context
variable; tasks the engine starts for the session inherit it (asyncio copies the context into new
tasks), so the provider reads the session's key with `current_session()`, and the slot's
`on_end` callback runs when the generation ends, however it ends.

Imported lazily (it imports torch through the edge engine).
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from edgespec.edge.engine import EdgeEngine

_SESSION: contextvars.ContextVar[SessionSlot | None] = contextvars.ContextVar(
    "edgespec_edge_session", default=None
)


@dataclass
class SessionSlot:
    """One generation's identity, as the address provider sees it."""

    key: str
    assigned: bool = False  # the provider asked the orchestrator for it at least once


def current_session() -> SessionSlot | None:
    """The slot of the generation running in this context, None outside one."""
    return _SESSION.get()


class SessionScopedEngine(EdgeEngine):
    """`EdgeEngine` whose every `generate` runs with its own `SessionSlot` in context.

    `on_session_end(key)` (set by the owner) is called once a generation that was assigned a
    verifier ends: finished, failed or cancelled.
    """

    key_prefix: str = "session"
    on_session_end: Callable[[str], None] | None = None

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        slot = SessionSlot(key=f"{self.key_prefix}/{uuid.uuid4().hex[:12]}")
        # Set in the caller's (the RPC task's) context, so tasks the engine creates for the
        # session inherit the slot. No reset: the RPC's task and its context end with the call.
        _SESSION.set(slot)
        try:
            async for event in super().generate(*args, **kwargs):
                yield event
        finally:
            if slot.assigned and self.on_session_end is not None:
                self.on_session_end(slot.key)
