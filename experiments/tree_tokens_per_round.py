"""Tokens per target forward, chains against draft trees, co-located on the demo pair:
``python -m experiments.tree_tokens_per_round --json FILE``.

For greedy decoding and coupled sampling (T = 1, seed 7), over the first 4 bench prompts of 64
tokens each: the mean tokens each target forward commits (accepted + 1) for chains of k = 2, 4,
6, 8 (`edgespec.core.generate.generate`) and trees of 16, 32 and 64 nodes
(`edgespec.core.generate.generate` with a tree shape). Every output equals the target alone's (checked).
No link and no timing: this is the acceptance side of issue 14 only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edgespec.core.demo_pair import BENCH_PROMPTS, resolve_pair
from edgespec.core.generate import GenerationResult, generate, generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.tree import TreeShape

logger = logging.getLogger(__name__)
SHAPES = (TreeShape(16, 6, 2), TreeShape(32, 8, 3), TreeShape(64, 8, 4))
CHAIN_KS = (2, 4, 6, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    target_path, draft_path = resolve_pair(None, None)
    tokenizer = load_tokenizer(target_path)
    target = ModelRunner.from_pretrained(target_path)
    draft = ModelRunner.from_pretrained(draft_path)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in BENCH_PROMPTS[:4]]
    result: dict = {"prompts": len(prompts), "max_new_tokens": 64, "rows": []}
    settings = {
        "greedy": SamplingParams(max_new_tokens=64),
        "coupled_t1": SamplingParams(temperature=1.0, max_new_tokens=64, seed=7),
    }
    for name, params in settings.items():
        expected = [generate_autoregressive(target, p, params).tokens for p in prompts]

        def mean_tokens(run, method: str, params=params, expected=expected) -> float:
            accepted = rounds = 0
            for prompt, want in zip(prompts, expected, strict=True):
                out: GenerationResult = run(prompt)
                if out.tokens != want:
                    raise RuntimeError(f"{method} differs from the target alone")
                accepted += out.stats.accepted
                rounds += out.stats.rounds
            return (accepted + rounds) / rounds

        for k in CHAIN_KS:
            value = mean_tokens(
                lambda p, k=k, sp=params: generate(target, draft, p, sp, k=k), f"k={k}"
            )
            result["rows"].append(
                {"setting": name, "method": f"chain_k{k}", "tokens_per_forward": value}
            )
        for shape in SHAPES:
            method = f"tree_{shape.nodes}n_d{shape.depth}_w{shape.width}"
            value = mean_tokens(
                lambda p, s=shape, sp=params: generate(target, draft, p, sp, tree=s), method
            )
            result["rows"].append({"setting": name, "method": method, "tokens_per_forward": value})
        logger.info("%s done", name)
    for row in result["rows"]:
        print(f"{row['setting']:11} {row['method']:18} {row['tokens_per_forward']:.2f}")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
