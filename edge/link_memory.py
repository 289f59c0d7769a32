"""What an edge remembers of each link across sessions (`EngineConfig.link_memory`).

Per (verifier address, sampling regime) the engine keeps what its sessions learnt of the link:
per-position acceptance, draft and verifier step times, RTT, queueing, the cloud-only token time,
and the mode and k the last session ended in (`edgespec.core.link_memory.PolicyMemory`). Every
session feeds it (an adaptive policy directly, any other policy through a shadow adaptive learner
that only observes), and an adaptive session starts from it: it decides from its first round
instead of spending warm-up rounds on priors, which is most of a short generation at long RTTs.
The RTT measured by each session opening on an already connected channel is one more sample.
Sessions with different sampling settings do not share acceptance (greedy and T=1 accept
differently); the last session to finish writes the memory (concurrent sessions on one link see
the same link).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from edgespec.core.link_memory import PolicyMemory
from edgespec.core.params import SamplingParams

# distinct (verifier, sampling regime) links an engine remembers; the least recently used goes
LINK_MEMORY_SIZE = 256

LinkKey = tuple[str, str]  # (verifier address, sampling regime)


def sampling_regime(params: SamplingParams) -> str:
    """The part of the sampling params that acceptance depends on: sessions sharing it (and a
    verifier) share a link memory."""
    if params.is_greedy:
        return "greedy"
    return f"{params.sampler}:t={params.temperature!r},top_k={params.top_k},top_p={params.top_p!r}"


class LinkMemory:
    """(verifier address, sampling regime) -> `PolicyMemory`, least recently written first,
    at most `size` links."""

    def __init__(self, size: int = LINK_MEMORY_SIZE) -> None:
        self.size = size
        self._links: OrderedDict[LinkKey, PolicyMemory] = OrderedDict()

    def get(self, key: LinkKey) -> PolicyMemory | None:
        return self._links.get(key)

    def __getitem__(self, key: LinkKey) -> PolicyMemory:
        return self._links[key]

    def __iter__(self) -> Iterator[LinkKey]:
        return iter(self._links)

    def __len__(self) -> int:
        return len(self._links)

    def remember(self, key: LinkKey, memory: PolicyMemory) -> None:
        """Store what a finished session learnt (an empty memory changes nothing)."""
        if memory.empty:
            return
        self._links[key] = memory
        self._links.move_to_end(key)
        while len(self._links) > self.size:
            self._links.popitem(last=False)

    def estimates(self) -> list[dict[str, Any]]:
        """One dict per link, most recent last: verifier, regime and `PolicyMemory.summary`."""
        return [
            {"verifier": verifier, "regime": regime, **memory.summary()}
            for (verifier, regime), memory in self._links.items()
        ]

    def clear(self) -> None:
        self._links.clear()
