"""Where a gRPC link finds its verifier: address providers and per-session assigners.

A session's link asks for an address each time it opens (first, and after every failure). The
answer comes from an `AddressProvider`: a list of 'host:port' (in order, wrapping around:
primary first, then failovers) or a callable returning the next address to try, or from a
`VerifierAssigner`, which is told which session asks and when it ends (an orchestrator that
balances sessions over verifiers and moves one whose verifier failed it).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

AddressProvider = Sequence[str] | Callable[[], str]


@runtime_checkable
class VerifierAssigner(Protocol):
    """Assigns each session a verifier (e.g. `edgespec.orchestrator.edge_host`)."""

    async def assign(self, session_key: str) -> str:
        """The address session `session_key` should (re)connect to. Asked again by the same
        session, it means the previous verifier failed it."""
        ...

    def release(self, session_key: str) -> None:
        """Session `session_key` ended: whatever it held is free (must not raise)."""
        ...


def make_address_provider(addresses: AddressProvider) -> Callable[[], str]:
    """A callable returning the next verifier address to try.

    A sequence yields its addresses in order, wrapping around (primary first, then failovers);
    a callable is returned unchanged.
    """
    if callable(addresses):
        return addresses
    if isinstance(addresses, str) or not addresses:
        raise ValueError(
            f"addresses must be a non-empty list of 'host:port' or a callable, got {addresses!r}"
        )
    for i, a in enumerate(addresses):
        if not isinstance(a, str) or ":" not in a:
            raise ValueError(f"addresses[{i}] must be 'host:port', got {a!r}")
    cycle = itertools.cycle(list(addresses))
    return lambda: next(cycle)


def session_addresses(
    verifiers: AddressProvider | VerifierAssigner, session_key: str
) -> Callable[[], Awaitable[str]]:
    """The address source of one session: a list gives each session its own cursor (primary
    first); a callable is shared by all sessions; an assigner is asked for `session_key`."""
    if isinstance(verifiers, VerifierAssigner):
        assigner = verifiers

        async def assigned() -> str:
            return await assigner.assign(session_key)

        return assigned
    nxt = make_address_provider(verifiers if callable(verifiers) else list(verifiers))

    async def provided() -> str:
        return nxt()

    return provided
