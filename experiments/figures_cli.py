"""The command line of a micro-benchmark that measures a few named figures: print them, and
write them as JSON with ``--json FILE``."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def figures_main(
    argv: list[str] | None, description: str, measure: Callable[[], dict[str, float | int]]
) -> int:
    """Parse ``--json FILE``, run `measure`, log each figure (a count as an integer) and write
    them all (exit 0)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = measure()
    for name, value in figures.items():
        logger.info("%s: %s", name, value if isinstance(value, int) else f"{value:.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0
