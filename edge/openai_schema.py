"""The OpenAI-compatible request and response shapes of the edge's HTTP API (`edgespec.edge.http_app`).

`parse_request` reads a ``/v1/completions`` or ``/v1/chat/completions`` JSON body into an
`ApiRequest`, refusing (`ApiError`, HTTP 400 naming the parameter) every parameter it does not
implement rather than ignoring it; `sampling_params` is the one place request fields become
`SamplingParams`. The response bodies are `edgespec.edge.openai_responses`'.

edgespec's own knobs travel in an ``edgespec`` object of the request (``policy``,
``draft_tokens``, ``pipelined``, ``timeout_s``); its figures come back in an ``edgespec`` object of
the response (and of the last stream chunk). vLLM's ``top_k``, ``stop_token_ids`` and
``ignore_eos`` are accepted at the top level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgespec.core.params import (
    MAX_NEW_TOKENS_LIMIT,
    SAMPLER_COUPLED,
    SAMPLERS,
    SamplingParams,
)
from edgespec.core.validation import is_int

# error "type" per HTTP status, as OpenAI's API names them
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
# Accepted only at the value that means "off" (what edgespec does): any other value is refused.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "parallel_tool_calls": (False,),
    "response_format": ({"type": "text"},),
}
_SHARED = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed"}
_SHARED |= {"stop", "user", "top_k", "stop_token_ids", "ignore_eos", "edgespec"}
_COMPLETION_KEYS = _SHARED | {"prompt"}
_CHAT_KEYS = _SHARED | {"messages", "max_completion_tokens", "tool_choice"}
_EXTENSION_KEYS = {"policy", "draft_tokens", "pipelined", "timeout_s", "sampler"}
_ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """A request refused with HTTP `status`; `param` is the request parameter at fault (or None).
    `retry_after_s` (429) becomes the ``Retry-After`` header."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
        kind = _ERROR_TYPES.get(self.status, "server_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def bad(param: str, message: str) -> ApiError:
    """A 400 naming `param`; `message` starts with it."""
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class ApiRequest:
    """A validated completions or chat request. `prompt` (completions) is text or token ids;
    `messages` (chat) is [{"role", "content"}] with str contents."""

    chat: bool
    model: str
    prompt: str | list[int] = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    policy: str | None = None
    draft_tokens: int | None = None
    pipelined: bool | None = None
    timeout_s: float | None = None
    sampler: str = SAMPLER_COUPLED


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"{key} must be a finite number, got {value!r}")
    return float(value)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        limit = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(key, f"{key} must be an integer {limit}, got {value!r}")
    return int(value)


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(key, f"{key} must be true or false, got {value!r}")
    return value


def _refuse_unsupported(body: Mapping[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in _OFF_VALUES:
            if value is not None and value not in _OFF_VALUES[key]:
                raise ApiError(
                    400,
                    f"{key} is not supported by edgespec (only {_OFF_VALUES[key][0]!r}), "
                    f"got {value!r}",
                    param=key,
                    code="unsupported_parameter",
                )
        elif key not in allowed:
            raise ApiError(
                400, f"{key} is not a supported parameter", param=key, code="unsupported_parameter"
            )


def _prompt(value: Any) -> str | list[int]:
    """A completions prompt: text, token ids, or a list holding one of them."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(is_int(t) and t >= 0 for t in value):
        return [int(t) for t in value]
    raise bad(
        "prompt",
        "prompt must be a non-empty string or list of token ids (one prompt: n = 1), "
        f"got {value!r:.80}",
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", f"messages must be a non-empty list, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {_ROLES}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: text parts only
            if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{i}].content", f"messages[{i}].content: only text parts")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"messages[{i}]", f"messages[{i}] fields {sorted(extra)} are not supported")
        out.append({"role": str(m["role"]), "content": content})
    return out


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad("stop", f"stop must be a non-empty string or up to 4 of them, got {value!r:.80}")
    return tuple(stops)


def parse_request(body: Any, chat: bool) -> ApiRequest:
    """Validate a request body (parsed JSON). Raises `ApiError` 400 naming the parameter."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _refuse_unsupported(body, _CHAT_KEYS if chat else _COMPLETION_KEYS)
    if chat and body.get("tool_choice") not in (None, "none"):
        raise bad("tool_choice", "tool_choice is not supported (tools are not)")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"model must be a non-empty string, got {model!r}")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, Mapping) or set(options) - {"include_usage"}
    ):
        raise bad("stream_options", "stream_options may hold only include_usage")
    max_tokens = _int(body, "max_tokens", 1, MAX_NEW_TOKENS_LIMIT)
    if chat:
        other = _int(body, "max_completion_tokens", 1, MAX_NEW_TOKENS_LIMIT)
        if None not in (max_tokens, other) and max_tokens != other:
            raise bad("max_completion_tokens", "max_completion_tokens and max_tokens differ")
        max_tokens = max_tokens if max_tokens is not None else other
    ext = body.get("edgespec") or {}
    if not isinstance(ext, Mapping) or set(ext) - _EXTENSION_KEYS:
        raise bad("edgespec", f"edgespec may hold only {sorted(_EXTENSION_KEYS)}, got {ext!r:.80}")
    policy = ext.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise bad("edgespec.policy", f"edgespec.policy must be a string, got {policy!r}")
    sampler = ext.get("sampler", SAMPLER_COUPLED)
    if sampler not in SAMPLERS:
        raise bad(
            "edgespec.sampler", f"edgespec.sampler must be one of {list(SAMPLERS)}, got {sampler!r}"
        )
    timeout_s = _number(ext, "timeout_s", 0.0) or None
    if timeout_s is not None and timeout_s < 0:
        raise bad("edgespec.timeout_s", f"edgespec.timeout_s must be > 0, got {timeout_s}")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(is_int(t) and t >= 0 for t in stop_ids):
        raise bad("stop_token_ids", f"stop_token_ids must be token ids >= 0, got {stop_ids!r}")
    return ApiRequest(
        chat=chat,
        model=model,
        prompt="" if chat else _prompt(body.get("prompt")),
        messages=_messages(body.get("messages")) if chat else [],
        stream=bool(_bool(body, "stream")),
        include_usage=bool(_bool(options or {}, "include_usage")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0) or 0,
        seed=_int(body, "seed", 0, 2**64 - 1),
        stop=_stop(body.get("stop")),
        stop_token_ids=tuple(int(t) for t in stop_ids),
        ignore_eos=bool(_bool(body, "ignore_eos")),
        policy=policy,
        draft_tokens=_int(ext, "draft_tokens", 0),
        pipelined=_bool(ext, "pipelined"),
        timeout_s=timeout_s,
        sampler=sampler,
    )


# SamplingParams field -> the request parameter it comes from (for the 400's `param`).
PARAM_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "max_new_tokens": "max_tokens",
    "stop_token_ids": "stop_token_ids",
    "policy": "edgespec.policy",
    "draft_tokens": "edgespec.draft_tokens",
    "pipelined": "edgespec.pipelined",
    "sampler": "edgespec.sampler",
}


def sampling_params(
    req: ApiRequest, max_new_tokens: int, eos_ids: tuple[int, ...]
) -> SamplingParams:
    """The request's `SamplingParams` (the one mapping from HTTP fields): `max_new_tokens` as
    resolved by the caller, the stop token ids plus the tokenizer's `eos_ids` unless
    ``ignore_eos``; a sampled request without a seed gets one drawn here, so the response can
    report it even when a stop string ends the generation before the engine's summary.
    Raises `ApiError` 400 naming the parameter."""
    stop_ids = req.stop_token_ids
    if not req.ignore_eos:
        stop_ids += tuple(t for t in eos_ids if t not in stop_ids)
    try:
        return SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_ids,
            sampler=req.sampler,
        ).with_seed()
    except ValueError as err:
        name = str(err).split(" ", 1)[0]
        param = PARAM_NAMES.get(name)
        raise bad(param or "request", str(err).replace(name, param or name, 1)) from err


def default_max_tokens(req: ApiRequest, prompt_len: int, max_length: int | None) -> int:
    """max_tokens when the request gives none: 16 for completions (OpenAI's), the rest of the
    draft's context for chat (at least 1, so an over-long prompt gets the prompt's error)."""
    if req.max_tokens is not None:
        return req.max_tokens
    if not req.chat:
        return COMPLETIONS_DEFAULT_MAX_TOKENS
    room = (max_length - prompt_len) if max_length is not None else MAX_NEW_TOKENS_LIMIT
    return max(1, min(room, MAX_NEW_TOKENS_LIMIT))
