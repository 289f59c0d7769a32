"""What the verifier's event loop spends on two per-block and per-decision chores:
``python -m experiments.verifier_loop_cost --json FILE``.

- The grouping rule's step prices (`cloud.step_scheduler._StepTimes`): one decision prices the
  step of 30 candidate groupings and prices them again at each of 5 arrivals while it waits,
  right after a step ended (so no price from before that step is still good).
- `protos.convert.block_from_proto` of a pipelined block with 3 alternatives (the branches
  `adaptive` sends with its main guess), as the verifier decodes every block it reads.

Prints and writes the mean time of each (ms per decision, us per block). It measures the code it
runs; to compare two versions run it in both checkouts back to back (this host is shared).
"""

from __future__ import annotations

import random
import timeit

from edgespec.cloud.step_scheduler import _StepTimes
from edgespec.core.session import DraftBlock
from edgespec.protos.convert import block_from_proto, block_to_proto
from experiments.figures_cli import figures_main


def measure(decisions: int = 200, blocks: int = 5000) -> dict[str, float]:
    """The two figures (see the module docstring), seeded."""
    rng = random.Random(0)
    times = _StepTimes()
    for _ in range(64):
        times.add(rng.randint(20, 200), 0.03 + rng.random() * 0.005)
    feds = [40 + 3 * j for j in range(30)]

    def decision() -> None:
        times.add(90, 0.031)  # a step ended: every price is new
        for _ in range(5):
            for fed in feds:
                times.predict(fed)

    alts = tuple(
        DraftBlock(
            seq=5, base_len=40 + i, tokens=(1, 2, 3, 4), anchor_token=7, anchor_prefix=(3,) * i
        )
        for i in range(3)
    )
    msg = block_to_proto(
        DraftBlock(seq=5, base_len=41, tokens=(11, 12, 13, 14), anchor_token=9, alternatives=alts)
    )
    return {
        "grouping_decision_ms": timeit.timeit(decision, number=decisions) / decisions * 1e3,
        "block_from_proto_3_alternatives_us": timeit.timeit(
            lambda: block_from_proto(msg), number=blocks
        )
        / blocks
        * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    return figures_main(argv, __doc__.splitlines()[0], measure)


if __name__ == "__main__":
    raise SystemExit(main())
