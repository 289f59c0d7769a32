"""Recompute the analytic columns of committed capacity results in place.

`edgespec bench capacity` writes, beside each row's measured figures, analytic estimates derived
from them (``analytic_bound_tokens_per_s``, ``vs_bound``, ``cloud_sd_analytic_tokens_per_s``:
`edgespec.bench.capacity.row_estimates`). When that model is corrected (session 12: a round
commits 1 + acceptance_rate x mean_k tokens; the earlier reading of acceptance_rate as an
independent per-token alpha undercounted), the measured figures stay valid and only these
columns change. This rewrites them from each row's own method, sessions, RTT, k, mean_k,
acceptance_rate and the file's compute profile; nothing measured is touched.

    python -m experiments.recompute_capacity_estimates experiments/results/capacity/**/*.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edgespec.bench.capacity import row_estimates

logger = logging.getLogger(__name__)


def recompute(path: Path) -> int:
    """Rewrite `path`'s analytic columns; returns how many rows changed."""
    data = json.loads(path.read_text())
    profile = data["config"]["compute_profile"]
    changed = 0
    for row in data["rows"]:
        if "analytic_bound_tokens_per_s" not in row:
            continue
        bound, cloud_sd = row_estimates(
            row["method"],
            row["sessions"],
            row["rtt_ms"],
            row["k"],
            row["mean_k"],
            row["acceptance_rate"],
            profile,
        )
        new = {
            "analytic_bound_tokens_per_s": bound,
            "cloud_sd_analytic_tokens_per_s": cloud_sd,
            "vs_bound": row["replica_tokens_per_s"] / bound if bound else None,
        }
        if any(row.get(key) != value for key, value in new.items()):
            changed += 1
            row.update(new)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in args.paths:
        logger.info("%s: %d rows recomputed", path, recompute(path))


if __name__ == "__main__":
    main()
