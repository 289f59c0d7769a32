"""What one decision of the tree controller costs the edge's CPU:
``python -m experiments.tree_policy_cost --json FILE``.

A `TreePolicy` (the ``adaptive_tree`` registry policy, the shape grid capped at 16 nodes as the
capacity benchmark's verifier caps blocks, and uncapped) is fed a seeded run of 300 synthetic
rounds on a loaded link (trees walked with random sibling ranks, chains with random acceptance;
no model, no wall clock in the inputs). Printed and written: the median and mean wall time of
`choose()` and `observe()`, serial and pipelined, and, in the same run, the time to price the
shape grid as the policy does (each width's beam grown and ranked once, rank probabilities
tabulated) against pricing each shape on its own with the rank model queried per node, which is
how it was priced before (the ratio is the speed-up). Both pricings must agree (checked).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

from edgespec.core.policies import RoundObservation, TreeOutcome
from edgespec.core.registry import PolicySpec, make_policy
from edgespec.core.tree_policy import TreePolicy, beam_reach

logger = logging.getLogger(__name__)
ROUNDS = 300


def _run(pipelined: bool, cap: int | None, seed: int = 0) -> tuple[TreePolicy, dict[str, float]]:
    """Feed one policy ROUNDS rounds; returns it and its choose/observe timings (ms)."""
    rng = random.Random(seed)
    policy = make_policy("adaptive_tree", PolicySpec(k=4, max_k=16, pipelined=pipelined))
    assert isinstance(policy, TreePolicy)
    if cap is not None:
        policy.limit_nodes(cap)
    policy.observe_verifier_idle(30.0)
    choose, observe = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        decision = policy.choose()
        choose.append(time.perf_counter() - t0)
        if decision.mode == "cloud_only":
            obs = RoundObservation(0, 0, 0.0, 31.0, 55.0, 10.0, cloud_only=True, tokens=4)
        elif decision.tree is not None:
            shape = decision.tree
            steps, accepted = [], 0
            for _depth in range(shape.depth):
                rank = rng.choice((0, 0, 0, 1, -1))
                children = min(shape.width, 2)
                steps.append((children, rank if rank < children else -1))
                if steps[-1][1] < 0:
                    break
                accepted += 1
            tree = TreeOutcome(shape.depth, shape.depth, tuple(steps), shape.depth, accepted)
            obs = RoundObservation(
                shape.nodes, accepted, 6.0 * shape.depth, 38.0, 55.0, 15.0, tree=tree
            )
        else:
            accepted = rng.randint(0, decision.k)
            obs = RoundObservation(decision.k, accepted, 6.0 * decision.k, 33.0, 55.0, 15.0)
        t0 = time.perf_counter()
        policy.observe(obs)
        observe.append(time.perf_counter() - t0)
    ms = {
        "choose_ms_median": 1e3 * statistics.median(choose),
        "choose_ms_mean": 1e3 * statistics.fmean(choose),
        "observe_ms_median": 1e3 * statistics.median(observe),
    }
    return policy, ms


def _pricing(policy: TreePolicy, repeats: int = 200) -> dict[str, float]:
    """The grid priced as the policy does, and shape by shape with the rank model queried per
    node (the reach of each must agree); median ms of each over `repeats`."""
    estimates = policy.estimates()
    assert estimates is not None
    accept = policy._accept.probs(policy.config.k_max + 1)  # as `choose` asks for them
    shapes = policy.tree_config.shapes

    def untabulated(d: int, r: int) -> float:
        return policy._ranks.prob(d, r, accept[min(d, len(accept) - 1)])

    tabulated = policy._prob(accept)
    for shape in shapes:
        own = beam_reach(untabulated, shape.depth, shape.width, shape.nodes)
        assert own == beam_reach(tabulated, shape.depth, shape.width, shape.nodes)
    grid, each = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy._tree_rates(estimates.cost, accept, 0.0)
        grid.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for shape in shapes:
            beam_reach(untabulated, shape.depth, shape.width, shape.nodes)
        each.append(time.perf_counter() - t0)
    out = {"grid_ms": 1e3 * statistics.median(grid), "per_shape_ms": 1e3 * statistics.median(each)}
    out["speedup"] = out["per_shape_ms"] / out["grid_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for cap in (16, None):
        for pipelined in (False, True):
            policy, ms = _run(pipelined, cap)
            row = {
                "node_cap": cap,
                "pipelined": pipelined,
                "shapes": len(policy.tree_config.shapes),
            }
            row |= ms | _pricing(policy)
            rows.append(row)
            logger.info(
                "cap %s pipelined %s: choose %.3f ms (median), observe %.3f ms; pricing the grid "
                "%.3f ms against %.3f ms shape by shape (%.1fx)",
                cap, pipelined, row["choose_ms_median"], row["observe_ms_median"],
                row["grid_ms"], row["per_shape_ms"], row["speedup"],
            )  # fmt: skip
    Path(args.json).write_text(json.dumps({"rounds": ROUNDS, "rows": rows}, indent=2) + "\n")
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
