"""The command line that experiments on a (target, draft) pair share: ``--target`` / ``--draft``
(default: the shipped demo pair), ``--json FILE``; and loading the pair on the CPU."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.models import load_tokenizer
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
