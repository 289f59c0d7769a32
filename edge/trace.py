"""Per-round trace files: what each verification round of one generation cost, in msgpack.

A trace is one msgpack stream: a header map, then one map per round (a `RoundRecord`, its link
timing nested under ``timing``). msgpack keeps the files small and fast to write on the edge's
hot path (a few hundred bytes per round), and any language reads them::

    header, records = read_trace("trace.msgpack")
    ks = [r.k for r in records]

Written by the edge engine after each generation when `EngineConfig.trace_dir` is set
(``python -m edgespec.edge.server --trace-dir DIR``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

from edgespec.edge.link import RoundTiming
from edgespec.edge.records import RoundRecord

TRACE_FORMAT = "edgespec-round-trace"
TRACE_VERSION = 1


def write_trace(
    path: str | Path, records: Sequence[RoundRecord], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write `records` (in round order) to `path` with a header holding `meta` (msgpack-able
    values: str, numbers, bools, lists, maps). Returns the path."""
    path = Path(path)
    # The format fields come last so that no meta key can mask them.
    header = {**(meta or {}), "format": TRACE_FORMAT, "version": TRACE_VERSION}
    header["rounds"] = len(records)
    packer = msgpack.Packer()
    with path.open("wb") as f:
        f.write(packer.pack(header))
        for record in records:
            f.write(packer.pack(dataclasses.asdict(record)))
    return path


def read_trace(path: str | Path) -> tuple[dict[str, Any], list[RoundRecord]]:
    """Read a trace: (header, records). ValueError when the file is not a trace of a version
    this code reads, or is cut short."""
    with Path(path).open("rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        try:
            header = next(unpacker)
        except StopIteration:
            raise ValueError(f"{path}: empty file, not an edgespec trace") from None
        if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: not an edgespec trace (format {TRACE_FORMAT!r} expected)")
        if header.get("version") != TRACE_VERSION:
            raise ValueError(
                f"{path}: trace version {header.get('version')!r}, this code reads {TRACE_VERSION}"
            )
        records = []
        for item in unpacker:
            timing = RoundTiming(**item.pop("timing"))
            records.append(RoundRecord(timing=timing, **item))
    if len(records) != header["rounds"]:
        raise ValueError(
            f"{path}: header says {header['rounds']} rounds, file holds {len(records)}"
        )
    return header, records
