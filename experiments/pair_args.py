"""What experiments on a (target, draft) pair share: the command line (``--target`` /
``--draft``, default the shipped demo pair, and ``--json FILE``), loading the pair on the CPU,
and the draft's predictions along the target's own greedy text (`draft_rows_on_target`)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner


@dataclass(frozen=True)
class LoadedPair:
    """The pair an experiment runs on, and where it came from (for its JSON)."""

    target_path: Path
    draft_path: Path
    tokenizer: Any
    target: ModelRunner
    draft: ModelRunner


def add_pair_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--target``, ``--draft`` and the required ``--json``."""
    parser.add_argument("--target", default=None, help="target folder (default: the demo one)")
    parser.add_argument("--draft", default=None, help="draft folder (default: the demo one)")
    parser.add_argument("--json", required=True, help="write the results here")


def load_pair(args: argparse.Namespace) -> LoadedPair:
    """Log to stderr at INFO, run torch on one thread (the host is shared), load the pair."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    target_path, draft_path = resolve_pair(args.target, args.draft)
    return LoadedPair(
        target_path,
        draft_path,
        load_tokenizer(target_path),
        ModelRunner.from_pretrained(target_path, device="cpu"),
        ModelRunner.from_pretrained(draft_path, device="cpu"),
    )


def draft_rows_on_target(
    target: ModelRunner, draft: ModelRunner, prompt: list[int], new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """The target's greedy continuation of `prompt` (`new_tokens` tokens), and the draft's
    logits for each of its tokens given the prompt and the continuation before it: one
    teacher-forced forward, row i predicting token i of the continuation."""
    out = generate_autoregressive(target, prompt, SamplingParams(max_new_tokens=new_tokens)).tokens
    with torch.no_grad():  # row j of the forward predicts token j + 1 of the sequence
        rows = draft.model(torch.tensor([[*prompt, *out[:-1]]])).logits[0]
    return out, rows[len(prompt) - 1 :].float()
