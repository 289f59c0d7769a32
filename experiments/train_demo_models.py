"""Train the demo model pair that ships with edgespec: a target LM and a draft distilled from it.

Everything here runs offline: the corpus is the Python standard library's own source (including
``pydoc_data/topics.py``, the bundled language reference text), which every Python installation
carries. The run is seeded and records exactly which files it used (a SHA-256 of the corpus), so
that the same interpreter version reproduces the same pair.

Steps (1 and 2, the data, are in ``experiments.demo_data``):
1. corpus: ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, without ``site-packages``,
   ``test``/``tests`` folders and ``idlelib``; ~3% of files held out for validation
   (chosen by a hash of their relative path, so the split does not depend on file order);
2. a byte-level BPE tokenizer trained on the training files;
3. the target (Llama architecture) trained on next-token prediction;
4. the draft (Llama, at most 1/8 of the target's parameters) distilled from the target: its loss
   is the KL divergence from the target's next-token distribution, because agreement with the
   target (the acceptance rate) is what a draft is for, not the data likelihood;
5. evaluation (validation bits per byte, acceptance rates, per-token decode times) written to
   ``training_report.json`` beside the models.

The shipped draft was then refined on the target's own greedy continuations:
``python -m experiments.refine_draft --pair DIR --out DIR`` (see that module).

Usage::

    python -m experiments.train_demo_models --out core/demo_models
    python -m experiments.refine_draft --pair core/demo_models --out core/demo_models
    python -m experiments.train_demo_models --out /tmp/smoke --smoke   # a 1-minute pipeline check
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.demo_data import (
    EOS,
    SMOKE,
    TrainConfig,
    encode_docs,
    split_corpus,
    train_tokenizer,
)

logger = logging.getLogger("edgespec.train")


def build_llama(cfg: TrainConfig, tokenizer, hidden: int, layers: int, heads: int, ffn: int):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    # Tied embeddings are counted once (parameters() deduplicates shared tensors).
    return sum(p.numel() for p in model.parameters())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(stream: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, device):
    """Random windows of seq_len+1 tokens: (B, T+1)."""
    span = cfg.seq_len + 1
    while True:
        starts = torch.randint(0, len(stream) - span, (cfg.batch_size,), generator=gen)
        yield torch.stack([stream[s : s + span] for s in starts]).to(device)


def optimizer_for(model, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _train(
    model,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    stream,
    cfg: TrainConfig,
    device,
    *,
    steps: int,
    lr: float,
    seed: int,
    name: str,
    metric: str,
) -> list[dict]:
    """AdamW with warm-up + cosine decay and gradient clipping at 1; `loss_of(batch)` is the loss
    of one (B, seq_len + 1) batch. Logs `metric` every 20 steps and at the last."""
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer_for(model, lr, cfg.weight_decay)
    model.train()
    log, t0 = [], time.perf_counter()
    it = batches(stream, cfg, gen, device)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup_steps)
        loss = loss_of(next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t0
            log.append({"step": step, metric: loss.item(), "elapsed_s": round(elapsed, 1)})
            logger.info(
                "%s step %d/%d %s %.3f (%.0f tok/s)",
                name,
                step,
                steps,
                metric,
                loss.item(),
                (step + 1) * cfg.batch_size * cfg.seq_len / elapsed,
            )
    return log


def train_target(model, stream, cfg: TrainConfig, device) -> list[dict]:
    """Next-token cross-entropy."""

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            logits = model(batch[:, :-1]).logits  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    return _train(
        model,
        loss_of,
        stream,
        cfg,
        device,
        steps=cfg.target_steps,
        lr=cfg.target_lr,
        seed=cfg.seed,
        name="target",
        metric="loss",
    )


def kl_from_target(draft, target, inputs: torch.Tensor, device) -> torch.Tensor:
    """The draft's distillation loss on (B, T) `inputs`: the forward KL divergence from the
    target's next-token distribution (T = 1), averaged over positions."""
    with torch.no_grad(), autocast(device):
        p_logits = target(inputs).logits.float()  # (B, T, V)
    with autocast(device):
        q_logits = draft(inputs).logits.float()  # (B, T, V)
    return F.kl_div(
        F.log_softmax(q_logits, -1).flatten(0, 1),
        F.log_softmax(p_logits, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )


def distill_draft(draft, target, stream, cfg: TrainConfig, device) -> list[dict]:
    """Train the draft to match the target's next-token distribution (forward KL, T=1)."""
    target.eval()
    return _train(
        draft,
        lambda batch: kl_from_target(draft, target, batch[:, :-1], device),
        stream,
        cfg,
        device,
        steps=cfg.draft_steps,
        lr=cfg.draft_lr,
        seed=cfg.seed + 1,
        name="draft",
        metric="kl",
    )


@torch.no_grad()
def bits_per_byte(model, stream: torch.Tensor, bytes_per_token: float, cfg: TrainConfig, device):
    """Mean next-token loss over non-overlapping windows of the validation stream, in bits/byte."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    span = cfg.seq_len + 1
    for start in range(0, len(stream) - span, cfg.seq_len):
        window = stream[start : start + span].unsqueeze(0).to(device)  # (1, T+1)
        logits = model(window[:, :-1]).logits.float()
        total_nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        total_tokens += cfg.seq_len
    nats_per_token = total_nats / total_tokens
    return nats_per_token / math.log(2) / bytes_per_token, nats_per_token


@torch.no_grad()
def acceptance(target, draft, stream: torch.Tensor, cfg: TrainConfig, device) -> dict:
    """Acceptance rate alpha of the draft against the target on held-out prompts.

    Positions are those the target itself generates from each prompt (greedy for the greedy
    alpha: the fraction where the draft's argmax equals the target's; sampled at T=1 for the
    sampling alpha: the mean of sum_x min(p(x), q(x))), which is what speculative decoding sees.
    """
    target.eval()
    draft.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    prompt_len = 32
    starts = torch.randint(0, len(stream) - prompt_len, (cfg.eval_prompts,), generator=gen)
    prompts = torch.stack([stream[s : s + prompt_len] for s in starts]).to(device)  # (P, L)
    out: dict[str, float] = {}
    for mode in ("greedy", "t1"):
        seqs = prompts
        for _ in range(cfg.eval_new_tokens):  # full re-forward: simple, and the eval is small
            logits = target(seqs).logits[:, -1].float()  # (P, V)
            if mode == "greedy":
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=None)
            seqs = torch.cat([seqs, nxt], dim=1)
        region = slice(prompt_len - 1, seqs.shape[1] - 1)
        p = F.softmax(target(seqs).logits[:, region].float(), -1)  # (P, N, V)
        q = F.softmax(draft(seqs).logits[:, region].float(), -1)  # (P, N, V)
        if mode == "greedy":
            out["alpha_greedy"] = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
        else:
            out["alpha_t1"] = torch.minimum(p, q).sum(-1).mean().item()
    return out


@torch.no_grad()
def decode_ms_per_token(model, device, new_tokens: int = 64, reps: int = 3) -> float:
    """Median over reps of the mean KV-cached per-token decode time of one sequence."""
    model.eval()
    times = []
    for _ in range(reps):
        ids = torch.zeros((1, 16), dtype=torch.long, device=device)
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / new_tokens * 1000)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def samples(model, tokenizer, device, prompts: list[str], temperature: float, n: int, seed: int):
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        gen = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=0 if temperature > 0 else None,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(tokenizer.decode(gen[0]))
    return out


def save(model, tokenizer, path: Path) -> None:
    """Safetensors in float16 (halves the shipped size); loaders upcast to float32 on CPU."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for target/ and draft/")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = TrainConfig(**SMOKE) if args.smoke else TrainConfig()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()

    train_docs, val_docs, provenance = split_corpus(cfg)
    logger.info(
        "corpus: %d train / %d validation files, %.1f MB",
        provenance["files_total"] - provenance["files_validation"],
        provenance["files_validation"],
        provenance["bytes_train"] / 1e6,
    )
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    train_stream = encode_docs(tokenizer, train_docs)
    val_stream = encode_docs(tokenizer, val_docs)
    val_bytes_per_token = provenance["bytes_validation"] / len(val_stream)
    logger.info(
        "tokens: %d train, %d validation (%.2f bytes/token)",
        len(train_stream),
        len(val_stream),
        val_bytes_per_token,
    )

    target = build_llama(
        cfg, tokenizer, cfg.target_hidden, cfg.target_layers, cfg.target_heads, cfg.target_ffn
    ).to(device)
    draft = build_llama(
        cfg, tokenizer, cfg.draft_hidden, cfg.draft_layers, cfg.draft_heads, cfg.draft_ffn
    ).to(device)
    ratio = n_params(draft) / n_params(target)
    logger.info(
        "target %.2fM params, draft %.2fM params (ratio 1/%.1f)",
        n_params(target) / 1e6,
        n_params(draft) / 1e6,
        1 / ratio,
    )
    if ratio > 1 / 8 and not args.smoke:  # smoke sizes are too small for the ratio to hold
        raise SystemExit(f"draft/target parameter ratio {ratio:.3f} exceeds 1/8")

    t0 = time.perf_counter()
    target_log = train_target(target, train_stream, cfg, device)
    target_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    draft_log = distill_draft(draft, target, train_stream, cfg, device)
    draft_train_s = time.perf_counter() - t0

    target.eval()
    draft.eval()
    target_bpb, target_nats = bits_per_byte(target, val_stream, val_bytes_per_token, cfg, device)
    draft_bpb, draft_nats = bits_per_byte(draft, val_stream, val_bytes_per_token, cfg, device)
    alpha = acceptance(target, draft, val_stream, cfg, device)
    speed = {
        "target_ms_per_token": decode_ms_per_token(target, device),
        "draft_ms_per_token": decode_ms_per_token(draft, device),
    }
    speed["draft_speedup"] = speed["target_ms_per_token"] / speed["draft_ms_per_token"]
    prompts = ["import os\n", "def ", "class ", "# file: json/"]
    report = {
        "config": asdict(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "corpus": provenance,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "eos": EOS},
        "params": {"target": n_params(target), "draft": n_params(draft), "ratio": ratio},
        "train_seconds": {"target": target_train_s, "draft": draft_train_s},
        "total_seconds": time.perf_counter() - t_start,
        "validation": {
            "bytes_per_token": val_bytes_per_token,
            "target_bits_per_byte": target_bpb,
            "target_nats_per_token": target_nats,
            "draft_bits_per_byte": draft_bpb,
            "draft_nats_per_token": draft_nats,
        },
        "acceptance": alpha,
        "decode_speed_this_machine": speed,
        "samples": {
            "greedy": samples(target, tokenizer, device, prompts, 0.0, 80, cfg.seed),
            "temperature_0.8": samples(target, tokenizer, device, prompts, 0.8, 80, cfg.seed),
        },
        "loss_curves": {"target": target_log, "draft": draft_log},
    }
    save(target, tokenizer, args.out / "target")
    save(draft, tokenizer, args.out / "draft")
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "done in %.0f s: target %.3f bits/byte, alpha greedy %.3f, alpha T=1 %.3f, "
        "draft %.1fx faster",
        report["total_seconds"],
        target_bpb,
        alpha["alpha_greedy"],
        alpha["alpha_t1"],
        speed["draft_speedup"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
