"""Refine a distilled draft on the target's own greedy continuations (sequence-level
distillation): ``python -m experiments.refine_draft --out DIR [--pair DIR]``.

Why: a draft is there to agree with the target on the text the target GENERATES, and that text
is not the training corpus: a small target's greedy output repeats itself, falls into loops and
set phrases that corpus windows rarely show. Token-level distillation on corpus windows
(`experiments.train_demo_models.distill_draft`) leaves the draft matching the target's
distribution on human-written text; adding the target's own continuations to the distillation
data moves the draft's agreement to where speculative decoding meets the target (the idea of
DistillSpec, Zhou et al. 2024: distil on model-generated data).

Steps:
1. teacher data: `teacher_sequences` prompts, each a random window of `prompt_tokens` tokens
   of the TRAINING split (never the held-out files, never the benchmark prompts), continued
   by the target greedily for `teacher_new_tokens` tokens (KV-cached, batched);
2. fine-tuning: the draft's loss is the same forward KL from the target's next-token
   distribution as in distillation, on batches that alternate between teacher sequences and
   corpus windows (the corpus half keeps the draft's agreement under sampling, where the
   target's text is far less repetitive);
3. evaluation before and after, on the held-out files: the acceptance rates of the model card
   (`experiments.train_demo_models.acceptance`) and the draft's bits per byte.

Writes ``DIR/draft`` (the refined draft, float16 safetensors, the pair's tokenizer) and
``DIR/refine_report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.models import load_tokenizer
from edgespec.core.runner import cache_argument
from experiments.demo_data import TrainConfig, encode_docs, split_corpus
from experiments.train_demo_models import (
    acceptance,
    batches,
    bits_per_byte,
    kl_from_target,
    lr_at,
    optimizer_for,
    save,
)

logger = logging.getLogger("edgespec.refine")


@dataclass(frozen=True)
class RefineConfig:
    """The refinement's data and schedule (defaults: the shipped draft's)."""

    teacher_sequences: int = 1536
    prompt_tokens: int = 32
    teacher_new_tokens: int = 160
    generate_batch: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 4321


SMOKE_REFINE = dict(
    teacher_sequences=8, teacher_new_tokens=16, generate_batch=4, steps=4, batch_size=2
)


@torch.no_grad()
def teacher_sequences(target, stream: torch.Tensor, rc: RefineConfig, device) -> torch.Tensor:
    """(teacher_sequences, prompt_tokens + teacher_new_tokens): random training-split windows
    continued greedily by the target."""
    target.eval()
    arg = cache_argument(target)
    gen = torch.Generator().manual_seed(rc.seed)
    starts = torch.randint(
        0, len(stream) - rc.prompt_tokens, (rc.teacher_sequences,), generator=gen
    )
    prompts = torch.stack([stream[s : s + rc.prompt_tokens] for s in starts])
    out = []
    for i in range(0, len(prompts), rc.generate_batch):
        seqs = prompts[i : i + rc.generate_batch].to(device)
        # A plain argmax loop, not `generate`: no logits processor, no stop at the end-of-text
        # token (what comes after it is still the target's greedy continuation of the text).
        step = target(seqs, use_cache=True)
        for _ in range(rc.teacher_new_tokens):
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            seqs = torch.cat([seqs, token], dim=1)
            cache = {arg: getattr(step, arg)}
            step = target(token, use_cache=True, **cache)
        out.append(seqs.cpu())
        logger.info("teacher data: %d/%d sequences", i + len(seqs), len(prompts))
    return torch.cat(out)


def refine(
    draft,
    target,
    teacher: torch.Tensor,
    stream: torch.Tensor,
    cfg: TrainConfig,
    rc: RefineConfig,
    device,
) -> list[dict]:
    """Fine-tune `draft` on the forward KL from `target`, alternating teacher and corpus
    batches; returns the loss log (every 20 steps and the last)."""
    target.eval()
    draft.train()
    gen = torch.Generator().manual_seed(rc.seed + 1)
    opt = optimizer_for(draft, rc.lr, rc.weight_decay)
    corpus = batches(stream, replace(cfg, batch_size=rc.batch_size), gen, device)
    log, t0 = [], time.perf_counter()
    for step in range(rc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, rc.steps, rc.lr, rc.warmup_steps)
        if step % 2 == 0:
            rows = torch.randint(0, len(teacher), (rc.batch_size,), generator=gen)
            inputs = teacher[rows].to(device)
        else:  # a corpus window's inputs, as in distillation
            inputs = next(corpus)[:, :-1]
        loss = kl_from_target(draft, target, inputs, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == rc.steps - 1:
            elapsed = time.perf_counter() - t0
            kind = "teacher" if step % 2 == 0 else "corpus"
            log.append(
                {"step": step, "kl": loss.item(), "batch": kind, "elapsed_s": round(elapsed, 1)}
            )
            logger.info("refine step %d/%d kl %.3f (%s)", step, rc.steps, loss.item(), kind)
    draft.eval()
    return log


def evaluate(draft, target, val_stream: torch.Tensor, bytes_per_token: float, cfg, device) -> dict:
    """The model card's acceptance rates and the draft's bits per byte, on the held-out files."""
    bpb, nats = bits_per_byte(draft, val_stream, bytes_per_token, cfg, device)
    return {**acceptance(target, draft, val_stream, cfg, device), "draft_bits_per_byte": bpb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for draft/ and the report")
    ap.add_argument("--pair", type=Path, default=None, help="folder with target/ and draft/")
    ap.add_argument("--smoke", action="store_true", help="tiny run: checks the pipeline")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    ap.add_argument("--teacher-sequences", type=int, default=None, help="teacher continuations")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    rc = RefineConfig(**SMOKE_REFINE) if args.smoke else RefineConfig()
    if args.steps is not None:
        rc = replace(rc, steps=args.steps)
    if args.teacher_sequences is not None:
        rc = replace(rc, teacher_sequences=args.teacher_sequences)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    target_path, draft_path = resolve_pair(
        args.pair / "target" if args.pair else None, args.pair / "draft" if args.pair else None
    )
    tokenizer = load_tokenizer(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path).float().to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path).float().to(device)
    train_docs, val_docs, provenance = split_corpus(cfg)
    train_stream = encode_docs(tokenizer, train_docs)
    val_stream = encode_docs(tokenizer, val_docs)
    bytes_per_token = provenance["bytes_validation"] / len(val_stream)
    if args.smoke:
        cfg = TrainConfig(eval_prompts=4, eval_new_tokens=8)
        val_stream = val_stream[: 4 * cfg.seq_len]
    draft.eval()
    before = evaluate(draft, target, val_stream, bytes_per_token, cfg, device)
    logger.info("before: %s", before)
    t0 = time.perf_counter()
    teacher = teacher_sequences(target, train_stream, rc, device)
    teacher_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    log = refine(draft, target, teacher, train_stream, cfg, rc, device)
    refine_s = time.perf_counter() - t0
    after = evaluate(draft, target, val_stream, bytes_per_token, cfg, device)
    logger.info("after: %s", after)
    save(draft, tokenizer, args.out / "draft")
    report = {
        "refine_config": asdict(rc),
        "from": str(args.pair) if args.pair else "the shipped pair (edgespec.core.demo_pair)",
        "device": str(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "corpus_sha256": provenance["corpus_sha256"],
        "teacher_tokens": int(teacher.numel()),
        "seconds": {
            "teacher_data": teacher_s,
            "refine": refine_s,
            "total": time.perf_counter() - t_start,
        },
        "held_out_before": before,
        "held_out_after": after,
        "loss_curve": log,
    }
    (args.out / "refine_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
