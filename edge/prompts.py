"""Checks of a generation request's prompt and params against the draft model (tokenizer,
vocabulary, positions); each failure is a `FieldError` naming the request field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgespec.core.params import SamplingParams
from edgespec.core.validation import is_int
from edgespec.protos.convert import FieldError


def encode_prompt(
    prompt: str | Sequence[int], tokenizer: Any, vocab_size: int, add_special_tokens: bool
) -> list[int]:
    """Prompt text (encoded with `tokenizer`; None = token ids only) or token ids -> validated
    token ids. Raises `FieldError` ('prompt', 'prompt_ids', 'prompt_ids[i]')."""
    if isinstance(prompt, str):
        if not prompt:
            raise FieldError("prompt", "prompt must be a non-empty string, got ''")
        if tokenizer is None:
            raise FieldError("prompt", "prompt text needs a tokenizer; send prompt_ids")
        ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise FieldError("prompt", f"prompt must encode to >= 1 token, got {prompt!r}")
        return ids
    ids = list(prompt)
    if not ids:
        raise FieldError("prompt_ids", "prompt_ids must hold at least 1 token, got 0")
    for i, t in enumerate(ids):
        if not is_int(t) or not 0 <= t < vocab_size:
            raise FieldError(
                f"prompt_ids[{i}]",
                f"prompt_ids[{i}] must be a token id in [0, {vocab_size}), got {t!r}",
            )
    return ids


def check_length(prompt_ids: list[int], params: SamplingParams, max_length: int | None) -> None:
    """The prompt and `params.max_new_tokens` fit the draft's `max_length` positions (None =
    unbounded). Raises `FieldError` ('prompt', 'params.max_new_tokens')."""
    if max_length is None:
        return
    if len(prompt_ids) >= max_length:
        raise FieldError(
            "prompt",
            f"prompt must be shorter than the draft's {max_length} positions, "
            f"got {len(prompt_ids)} tokens",
        )
    room = max_length - len(prompt_ids)
    if params.max_new_tokens > room:
        raise FieldError(
            "params.max_new_tokens",
            f"params.max_new_tokens must be <= {room} for this {len(prompt_ids)}-token "
            f"prompt (draft max positions {max_length}), got {params.max_new_tokens}",
        )


def check_stop_ids(params: SamplingParams, vocab_size: int) -> None:
    """Every stop token id is a token of the draft's vocabulary. Raises `FieldError`
    ('params.stop_token_ids')."""
    for t in params.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise FieldError(
                "params.stop_token_ids",
                f"params.stop_token_ids must hold token ids in [0, {vocab_size}), got {t} in "
                f"{list(params.stop_token_ids)}",
            )
