"""Core throughput benchmark: our co-located speculative decoding against the target alone and
against Hugging Face's assisted generation, greedy, same models, same prompts, same process.

Every method runs `reps` times over all prompts, reps interleaved across methods so slow drift
of the machine hits all of them alike; tokens/s is total generated tokens / total wall time of a
rep, and the reported figure is the median over reps. The CLI (`edgespec bench core`) wraps
`run_core_bench`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import torch
from transformers import PreTrainedModel

from edgespec.core.generate import GenerationResult, generate, generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.validation import check_int

logger = logging.getLogger(__name__)

ModelSource: TypeAlias = str | Path | PreTrainedModel | ModelRunner


def _load(source: ModelSource, device, dtype) -> ModelRunner:
    if isinstance(source, ModelRunner):
        return source
    if isinstance(source, PreTrainedModel):
        return ModelRunner(source, device=device)
    return ModelRunner.from_pretrained(source, device=device, dtype=dtype)


def _model_info(source: ModelSource, runner: ModelRunner) -> dict:
    model = runner.model
    return {
        "source": str(source) if isinstance(source, (str, Path)) else type(model).__name__,
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": runner.vocab_size,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _assistant_config(draft: PreTrainedModel, k: int | None) -> Iterator[None]:
    """HF reads the assisted-generation knobs from the assistant's generation_config. k=None
    keeps them (None = HF's defaults: up to 20 tokens per round, stopping early when the draft's
    confidence < 0.4); an int k drafts exactly k tokens per round, like our fixed-k rows."""
    saved = copy.deepcopy(draft.generation_config)
    if k is not None:
        draft.generation_config.num_assistant_tokens = k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        draft.generation_config = saved


def _hf_generate(
    target: PreTrainedModel, prompt: list[int], max_new_tokens: int, assistant=None
) -> list[int]:
    ids = torch.tensor([prompt], device=target.device)  # (1, n)
    kwargs = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            # Generate exactly max_new_tokens, as our rows do (no stop tokens).
            min_new_tokens=max_new_tokens,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def run_core_bench(
    target: ModelSource,
    draft: ModelSource,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    ks: Iterable[int] = range(1, 9),
    reps: int = 3,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    hf_assisted_ks: Iterable[int] = (),
) -> dict:
    """Greedy tokens/s of every method on the same target/draft pair and prompts.

    target, draft: a local checkpoint path, a loaded HF model or a `ModelRunner` (same vocab).
    prompts: token-id lists (tokenising is the caller's business). max_new_tokens: tokens
    generated per prompt by every method (stop tokens disabled). ks: draft lengths of our
    speculative rows. reps: timed repetitions (median reported), after one untimed warm-up.
    hf_assisted_ks: extra HF assisted rows with exactly k draft tokens per round; the default
    HF assisted row (its own schedule) is always run.

    Returns a JSON-able dict: "methods" rows {name, k, tokens_per_s, tokens_per_s_reps,
    acceptance_rate, mean_tokens_per_round, matches_target}, where name is one of
    "target_only" (our autoregressive loop), "speculative", "hf_target_only", "hf_assisted";
    "best_vs_hf_assisted" = best speculative tokens/s / best HF assisted tokens/s;
    "speedup_vs_target_only" = best speculative / target_only; plus "config", "target", "draft".
    matches_target: every prompt's output equals our target-only output token for token.
    """
    ks = list(ks)
    hf_ks = list(hf_assisted_ks)
    prompt_ids = [list(p) for p in prompts]
    if not prompt_ids or any(not p for p in prompt_ids):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    for name, values in (("ks", ks), ("hf_assisted_ks", hf_ks)):
        for i, k in enumerate(values):
            check_int(f"{name}[{i}]", k, 1)
    check_int("reps", reps, 1)
    params = SamplingParams(max_new_tokens=max_new_tokens)  # validates max_new_tokens
    target_runner = _load(target, device, dtype)
    draft_runner = _load(draft, target_runner.device, dtype)
    if draft_runner.vocab_size != target_runner.vocab_size:
        raise ValueError(
            f"draft vocab_size must equal target vocab_size={target_runner.vocab_size}, "
            f"got {draft_runner.vocab_size}"
        )
    dev = target_runner.device
    target_model, draft_model = target_runner.model, draft_runner.model

    # name, k, run(prompt) -> (tokens, stats or None)
    Runner = Callable[[list[int]], tuple[list[int], GenerationResult | None]]
    methods: list[tuple[str, int | None, Runner]] = []

    def ours_target(p):
        r = generate_autoregressive(target_runner, p, params)
        return r.tokens, r

    methods.append(("target_only", None, ours_target))
    for k in ks:

        def ours_spec(p, k=k):
            r = generate(target_runner, draft_runner, p, params, k)
            return r.tokens, r

        methods.append(("speculative", k, ours_spec))
    methods.append(
        ("hf_target_only", None, lambda p: (_hf_generate(target_model, p, max_new_tokens), None))
    )
    for hf_k in [None, *hf_ks]:

        def hf_assisted(p, k=hf_k):
            with _assistant_config(draft_model, k):
                return _hf_generate(target_model, p, max_new_tokens, draft_model), None

        methods.append(("hf_assisted", hf_k, hf_assisted))

    outputs: dict[int, list[list[int]]] = {}
    times: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    counts: dict[int, list[int]] = {i: [] for i in range(len(methods))}
    accepted = {i: 0 for i in range(len(methods))}
    drafted = {i: 0 for i in range(len(methods))}
    rounds = {i: 0 for i in range(len(methods))}

    for _name, _k, run in methods:  # warm-up: kernels, allocator, HF's lazy setup
        run(prompt_ids[0][:8])
    for rep in range(reps):
        for i, (name, method_k, run) in enumerate(methods):
            _sync(dev)
            start = time.perf_counter()
            results = [run(p) for p in prompt_ids]
            _sync(dev)
            times[i].append(time.perf_counter() - start)
            counts[i].append(sum(len(tokens) for tokens, _ in results))
            if rep == 0:
                outputs[i] = [tokens for tokens, _ in results]
                for _, r in results:
                    if r is not None:
                        accepted[i] += r.stats.accepted
                        drafted[i] += r.stats.drafted
                        rounds[i] += r.stats.rounds
            logger.info("rep %d %s k=%s: %.3f s", rep, name, method_k, times[i][-1])

    reference = outputs[0]  # our target-only output
    rows: list[dict[str, Any]] = []
    for i, (name, row_k, _run) in enumerate(methods):
        per_rep = [n / t for n, t in zip(counts[i], times[i], strict=True)]
        is_spec = name == "speculative"
        rows.append(
            {
                "name": name,
                "k": row_k,
                "tokens_per_s": statistics.median(per_rep),
                "tokens_per_s_reps": per_rep,
                "acceptance_rate": accepted[i] / drafted[i] if is_spec and drafted[i] else None,
                "mean_tokens_per_round": (
                    (accepted[i] + rounds[i]) / rounds[i] if is_spec and rounds[i] else None
                ),
                "matches_target": outputs[i] == reference,
            }
        )
    spec_rows = [r for r in rows if r["name"] == "speculative"]
    best = max(spec_rows, key=lambda r: r["tokens_per_s"]) if spec_rows else None
    best_hf = max((r for r in rows if r["name"] == "hf_assisted"), key=lambda r: r["tokens_per_s"])
    target_only = rows[0]["tokens_per_s"]
    return {
        "config": {
            "max_new_tokens": max_new_tokens,
            "reps": reps,
            "ks": ks,
            "hf_assisted_ks": hf_ks,
            "n_prompts": len(prompt_ids),
            "prompt_lengths": [len(p) for p in prompt_ids],
            "device": str(dev),
            "torch_threads": torch.get_num_threads(),
            "decoding": "greedy",
            # The hf_assisted k=None row drafts per the draft's generation_config, by default:
            "hf_assisted_default": {
                key: getattr(draft_model.generation_config, key, None)
                for key in (
                    "num_assistant_tokens",
                    "num_assistant_tokens_schedule",
                    "assistant_confidence_threshold",
                )
            },
        },
        "target": _model_info(target, target_runner),
        "draft": _model_info(draft, draft_runner),
        "methods": rows,
        "best_speculative_k": best["k"] if best else None,
        "best_vs_hf_assisted": best["tokens_per_s"] / best_hf["tokens_per_s"] if best else None,
        "speedup_vs_target_only": best["tokens_per_s"] / target_only if best else None,
    }
