"""What choosing one level's draft tokens costs the edge's CPU:
``python -m experiments.draft_picks_cost --json FILE``.

A pipelined edge drafting ahead with branches feeds several rows per level (the main guess and
each branch) and picks, per row, the draft's token and its runner-up (`Drafter._picks`). This
times that pick for a level of 5 rows over the shipped demo draft's vocabulary, greedy, one
torch thread, seeded logits, on the code it runs; to compare two versions run it in both
checkouts back to back (this host is shared). Prints and writes the mean microseconds.
"""

from __future__ import annotations

import timeit

import torch

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.drafter import Drafter
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from experiments.figures_cli import figures_main


def measure(rows: int = 5, calls: int = 3000) -> dict[str, float]:
    """Mean microseconds of `Drafter._picks` on `rows` rows of the demo draft's vocabulary."""
    torch.set_num_threads(1)
    _, draft = resolve_pair(None, None)
    runner = ModelRunner.from_pretrained(draft, device="cpu")
    drafter = Drafter(runner, [1, 2, 3, 4], SamplingParams(max_new_tokens=32))
    logits = torch.randn(rows, runner.vocab_size, generator=torch.Generator().manual_seed(0))
    positions = list(range(5, 5 + rows))
    seconds = timeit.timeit(lambda: drafter._picks(logits, positions), number=calls) / calls
    return {"vocab": runner.vocab_size, "rows": rows, "picks_us": seconds * 1e6}


def main(argv: list[str] | None = None) -> int:
    return figures_main(argv, __doc__.splitlines()[0], measure)


if __name__ == "__main__":
    raise SystemExit(main())
