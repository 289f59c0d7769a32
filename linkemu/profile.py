"""What the emulated link does (`LinkProfile`) and what it really did (`LinkStats`): the
emulator's data, JSON-ready for result files."""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Sequence
from typing import Any

from edgespec.core.validation import check_int, check_ms, check_positive


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """What the emulated link does to every chunk, per direction. Immutable; swap whole profiles.

    Each direction adds ``rtt_ms / 2`` plus a per-chunk uniform draw from ``[0, jitter_ms]``, so the
    mean added round trip is ``rtt_ms + jitter_ms``. Jitter never reorders bytes (see `edgespec.linkemu`).
    """

    rtt_ms: float = 0.0  # added round-trip delay; each direction gets half
    jitter_ms: float = 0.0  # per-chunk extra one-way delay ~ U[0, jitter_ms]
    bandwidth_mbps: float | None = None  # per-direction capacity, 10^6 bit/s; None = unlimited
    seed: int | None = None  # seeds the jitter draws; None = fresh entropy
    name: str = ""  # label for result files; "" = derived from the numbers, e.g. "rtt50ms_jit5ms"

    def __post_init__(self) -> None:
        check_ms("rtt_ms", self.rtt_ms)
        check_ms("jitter_ms", self.jitter_ms)
        if self.bandwidth_mbps is not None:
            check_positive("bandwidth_mbps", self.bandwidth_mbps)
        if self.seed is not None:
            check_int("seed", self.seed)
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        parts = [f"rtt{self.rtt_ms:g}ms"]
        if self.jitter_ms:
            parts.append(f"jit{self.jitter_ms:g}ms")
        if self.bandwidth_mbps is not None:
            parts.append(f"bw{self.bandwidth_mbps:g}mbps")
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (for result files)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkProfile:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LinkProfile fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class DirectionStats:
    """Chunks one direction carried and the one-way delay it actually added to them.

    Delay fields are None when no chunk has been carried.
    """

    chunks: int
    bytes: int
    delay_ms_mean: float | None
    delay_ms_p50: float | None
    delay_ms_p95: float | None
    delay_ms_max: float | None


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """What the link really did since start (or the last :meth:`LinkEmulator.reset_stats`)."""

    profile: LinkProfile  # the profile in force when the stats were taken
    uplink: DirectionStats  # client -> upstream
    downlink: DirectionStats  # upstream -> client
    rtt_ms_measured: float | None  # uplink p50 + downlink p50; None until both carried a chunk
    connections_accepted: int  # connections forwarded upstream
    connections_refused: int  # reset because the link was cut or the upstream refused
    connections_active: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sorted sequence."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def direction_stats(chunks: int, nbytes: int, delays: array) -> DirectionStats:
    """Stats of one direction from its chunk and byte counts and per-chunk delays (seconds)."""
    if not delays:
        return DirectionStats(chunks, nbytes, None, None, None, None)
    ms = sorted(d * 1000.0 for d in delays)
    return DirectionStats(
        chunks=chunks,
        bytes=nbytes,
        delay_ms_mean=sum(ms) / len(ms),
        delay_ms_p50=percentile(ms, 50),
        delay_ms_p95=percentile(ms, 95),
        delay_ms_max=ms[-1],
    )
