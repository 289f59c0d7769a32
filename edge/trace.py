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
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

from edgespec.core.params import SamplingParams
from edgespec.edge.records import EdgeStats, RoundRecord
from edgespec.edge.round_timing import RoundTiming

logger = logging.getLogger(__name__)

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


def write_generation_trace(
    folder: str | Path,
    stats: EdgeStats,
    params: SamplingParams,
    finish_reason: str,
    n_tokens: int,
) -> Path | None:
    """One trace file per generation in `folder` (created if needed), named by time and a
    random suffix; returns its path. A failure to write is logged and answers None, never
    raised: the generation itself succeeded."""
    folder = Path(folder)
    path = folder / f"trace-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.msgpack"
    meta = {
        "params": params.to_dict(),
        "finish_reason": finish_reason,
        "tokens": n_tokens,
        "policy": stats.policy,
        "verifier": stats.verifier,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return write_trace(path, stats.round_records, meta)
    except (OSError, TypeError, ValueError) as err:
        logger.warning("could not write the round trace %s: %s", path, err)
        return None
