"""How the draft's greedy acceptance depends on the depth in a block: P(position i accepted |
positions 1..i-1 accepted), what the adaptive policy's per-position estimates stand for.
``python -m experiments.depth_acceptance [--target PATH --draft PATH] [--new-tokens N]
[--depth K] --json FILE``.

Along the target's own greedy continuation of each benchmark prompt, every position starts a
block. Under greedy decoding a block of draft tokens is accepted up to its first token that is
not the target's, and while every earlier one was accepted the draft saw exactly the target's
text: so the draft's top-1 token at position j given the target's prefix (`greedy_matches`,
one teacher-forced forward) decides position j of every block that reaches it. Counts per
depth follow from runs of matches (`depth_counts`); no block is generated.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from edgespec.core.demo_pair import BENCH_PROMPTS
from edgespec.core.runner import ModelRunner
from experiments.pair_args import add_pair_args, draft_rows_on_target, load_pair

logger = logging.getLogger(__name__)


def greedy_matches(
    target: ModelRunner, draft: ModelRunner, prompt: list[int], new_tokens: int
) -> list[bool]:
    """For each token of the target's greedy continuation of `prompt` (`new_tokens` of them):
    whether the draft's top-1 token, given the prompt and the continuation before it, is it."""
    out, rows = draft_rows_on_target(target, draft, prompt, new_tokens)
    picks = rows.argmax(-1).tolist()
    return [pick == token for pick, token in zip(picks, out, strict=True)]


def depth_counts(matches: Sequence[bool], depth: int) -> tuple[list[int], list[int]]:
    """(reached, accepted) per depth 1..`depth` over blocks starting at every position with
    `depth` positions after it: a block reaches depth i when positions 1..i-1 were accepted,
    and accepts it when the match there is true."""
    reached, accepted = [0] * depth, [0] * depth
    for start in range(len(matches) - depth + 1):
        for i in range(depth):
            reached[i] += 1
            if not matches[start + i]:
                break
            accepted[i] += 1
    return reached, accepted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(parser)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args(argv)
    pair = load_pair(args)
    reached, accepted = [0] * args.depth, [0] * args.depth
    for text in BENCH_PROMPTS:
        prompt = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
        matches = greedy_matches(pair.target, pair.draft, prompt, args.new_tokens)
        r, a = depth_counts(matches, args.depth)
        reached = [x + y for x, y in zip(reached, r, strict=True)]
        accepted = [x + y for x, y in zip(accepted, a, strict=True)]
    rates = [a / r if r else None for a, r in zip(accepted, reached, strict=True)]
    result = {
        "target": str(pair.target_path),
        "draft": str(pair.draft_path),
        "prompts": list(BENCH_PROMPTS),
        "new_tokens": args.new_tokens,
        "reached": reached,
        "accepted": accepted,
        "accept_given_reached": rates,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    for i, (rate, n) in enumerate(zip(rates, reached, strict=True), 1):
        logger.info("depth %2d: %s of %d reached", i, "-" if rate is None else f"{rate:.3f}", n)


if __name__ == "__main__":
    main()
