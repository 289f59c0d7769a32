"""The OpenAI-compatible response bodies and stream chunks of the edge's HTTP API, with the
``edgespec`` object that reports a generation's figures (see `edgespec.edge.http_app`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from edgespec.edge.openai_schema import ApiRequest
from edgespec.edge.records import EdgeStats


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def edgespec_figures(stats: EdgeStats | None, seed: int | None = None) -> dict[str, Any] | None:
    """What the response's ``edgespec`` object reports of the generation: the seed a sampled
    output was drawn with (send it back to reproduce the output) and the engine's figures
    (absent when a stop string ended the generation before the engine's summary); None when
    there is neither."""
    if stats is None:
        return None if seed is None else {"seed": seed}
    return {
        "seed": seed,
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate,
        "draft_lengths": list(stats.draft_lengths),
        "rtt_ms_mean": stats.rtt_ms_mean,
        "cloud_only_tokens": stats.cloud_only_tokens,
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
        "reconnects": stats.reconnects,
        "pipeline_hits": stats.pipeline_hits,
        "pipeline_misses": stats.pipeline_misses,
        "time_to_first_token_ms": stats.time_to_first_token_ms,
        "verifier": stats.verifier,
        "policy": stats.policy,
    }


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    message = {"role": "assistant", "content": text}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def response_body(
    req: ApiRequest,
    rid: str,
    text: str,
    finish: str,
    use: dict[str, int],
    stats: EdgeStats | None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The whole (non-streamed) completion or chat completion (``edgespec`` null when a stop
    string ended the generation before its summary)."""
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [_choice(req.chat, text, finish, delta=False)],
        "usage": use,
        "edgespec": edgespec_figures(stats, seed),
    }


def chunk(
    req: ApiRequest,
    rid: str,
    text: str = "",
    finish: str | None = None,
    *,
    first: bool = False,
    stats: EdgeStats | None = None,
    use: dict[str, int] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """One stream chunk: text (the chat's first carries the role), the finish (with the
    ``edgespec`` figures), or, with `use`, the usage chunk (no choices)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [] if use is not None else [_choice(req.chat, text, finish, delta=True)],
    }
    if req.chat and first and use is None:
        body["choices"][0]["delta"] = {"role": "assistant", "content": text}
    if use is not None:
        body["usage"] = use
    elif req.include_usage:
        body["usage"] = None
    figures = edgespec_figures(stats, seed)
    if finish is not None and figures is not None:
        body["edgespec"] = figures
    return body
