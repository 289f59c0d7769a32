"""How often the draft's runner-up is the target's token where its top choice is not: what a
branch drafted ahead (`EngineConfig.ahead_branches`) bets on. ``python -m
experiments.draft_runner_up [--target PATH --draft PATH] [--new-tokens N] --json FILE``.

Along the target's own greedy continuation of each prompt (the demo prompts and the benchmark
prompts), at every position: the draft's top-3 tokens given the same prefix. Prints and writes
the share of positions where the target's token is the draft's top choice (greedy acceptance,
alpha), and among the others the share where it is the runner-up and the third.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from edgespec.core.demo_pair import BENCH_PROMPTS, DEMO_PROMPT
from edgespec.core.runner import ModelRunner
from experiments.pair_args import add_pair_args, draft_rows_on_target, load_pair

logger = logging.getLogger(__name__)


def runner_up_shares(
    target: ModelRunner, draft: ModelRunner, prompts: list[list[int]], new_tokens: int
) -> dict[str, float | int]:
    """Counts over the target's greedy continuations of `prompts` (see the module docstring)."""
    positions = top1 = second = third = 0
    for prompt in prompts:
        out, rows = draft_rows_on_target(target, draft, prompt, new_tokens)
        best = torch.topk(rows, 3, dim=-1).indices.tolist()
        for token, top in zip(out, best, strict=True):
            positions += 1
            top1 += token == top[0]
            second += token == top[1]
            third += token == top[2]
    misses = max(positions - top1, 1)
    return {
        "positions": positions,
        "top1_share": top1 / positions,
        "runner_up_share_of_misses": second / misses,
        "third_share_of_misses": third / misses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_args(parser)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    pair = load_pair(args)
    texts = [DEMO_PROMPT, *BENCH_PROMPTS]
    prompts = [pair.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shares = runner_up_shares(pair.target, pair.draft, prompts, args.new_tokens)
    result = {
        "target": str(pair.target_path),
        "draft": str(pair.draft_path),
        "prompts": texts,
        **shares,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    logger.info(
        "%d positions: top-1 %.3f; of the others, runner-up %.3f, third %.3f",
        shares["positions"],
        shares["top1_share"],
        shares["runner_up_share_of_misses"],
        shares["third_share_of_misses"],
    )


if __name__ == "__main__":
    main()
