"""Measure a target/draft pair the way the model card reports it: ``python -m
experiments.measure_demo_pair [--target PATH --draft PATH] --json FILE``.

Figures, all measured on the checkpoints as loaded (float32 on CPU):
- parameters of each model and their ratio;
- per-token decode time of one KV-cached sequence through ``ModelRunner`` (median of reps),
  and the draft's speed-up over the target;
- the target's validation bits per byte on the held-out files of the training split
  (the same split function as training: Python standard library sources);
- the acceptance rate alpha on held-out prompts, greedy and at temperature 1 (same definition
  as the training report: argmax agreement, and the mean of sum_x min(p, q), on the target's own
  continuations), over the training report's 48 generated tokens and over 96 (the capacity
  benchmark's length);
- greedy and temperature-0.8 samples of the target.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import check_pair, load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from experiments.demo_data import TrainConfig, encode_docs, split_corpus
from experiments.train_demo_models import acceptance, bits_per_byte

logger = logging.getLogger(__name__)

LONG_NEW_TOKENS = 96  # the capacity benchmark's generation length
SAMPLE_PROMPTS = ("import os\n", "def parse_args(argv):\n", "class Node:\n")


def decode_ms_per_token(runner: ModelRunner, new_tokens: int = 64, reps: int = 5) -> float:
    """Median over reps of the mean time to decode one token with the KV cache."""
    times = []
    for _ in range(reps):
        logits = runner.prefill(list(range(1, 17)))
        token = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(runner.extend([token])[-1].argmax())
        times.append((time.perf_counter() - t0) / new_tokens * 1000)
    return statistics.median(times)


def measure(target_path: Path, draft_path: Path) -> dict:
    check_pair(target_path, draft_path)
    tokenizer = load_tokenizer(target_path)
    target = ModelRunner.from_pretrained(target_path)
    draft = ModelRunner.from_pretrained(draft_path)
    n_target = sum(p.numel() for p in target.model.parameters())
    n_draft = sum(p.numel() for p in draft.model.parameters())

    target_ms = decode_ms_per_token(target)
    draft_ms = decode_ms_per_token(draft)

    cfg = TrainConfig()
    _, val_docs, provenance = split_corpus(cfg)
    val_stream = encode_docs(tokenizer, val_docs)
    bytes_per_token = provenance["bytes_validation"] / len(val_stream)
    device = target.device
    with torch.inference_mode():
        target_bpb, _ = bits_per_byte(target.model, val_stream, bytes_per_token, cfg, device)
        alpha = acceptance(target.model, draft.model, val_stream, cfg, device)
        # the benchmarks' generation length: greedy text of a small target loops more as it goes
        long_cfg = replace(cfg, eval_new_tokens=LONG_NEW_TOKENS)
        alpha_long = acceptance(target.model, draft.model, val_stream, long_cfg, device)

    samples = {}
    for name, temperature in (("greedy", 0.0), ("temperature_0.8", 0.8)):
        params = SamplingParams(temperature=temperature, max_new_tokens=80, seed=7)
        samples[name] = [
            p
            + tokenizer.decode(generate_autoregressive(target, tokenizer.encode(p), params).tokens)
            for p in SAMPLE_PROMPTS
        ]
    return {
        "target": str(target_path),
        "draft": str(draft_path),
        "params": {"target": n_target, "draft": n_draft, "ratio": n_draft / n_target},
        "decode_ms_per_token": {"target": target_ms, "draft": draft_ms},
        "draft_speedup": target_ms / draft_ms,
        "validation": {
            "files": provenance["files_validation"],
            "corpus_sha256": provenance["corpus_sha256"],
            "python_version": provenance["python_version"],
            "target_bits_per_byte": target_bpb,
        },
        "acceptance": alpha,
        f"acceptance_{LONG_NEW_TOKENS}_tokens": alpha_long,
        "samples": samples,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    target_path, draft_path = resolve_pair(args.target, args.draft)
    result = measure(target_path, draft_path)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    logger.info(
        "params ratio 1/%.1f, draft %.1fx faster, target %.3f bits/byte, alpha greedy %.3f, "
        "alpha T=1 %.3f -> %s",
        1 / result["params"]["ratio"],
        result["draft_speedup"],
        result["validation"]["target_bits_per_byte"],
        result["acceptance"]["alpha_greedy"],
        result["acceptance"]["alpha_t1"],
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
