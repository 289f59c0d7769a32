"""Chat messages -> prompt token ids, for ``/v1/chat/completions``.

A tokenizer with a chat template (``tokenizer.chat_template``) renders the messages with it and
the generation prompt (`apply_chat_template`); the rendered text already holds the template's
special tokens, so it is encoded without adding more. A tokenizer without one, like the shipped
demo pair's, gets `FALLBACK_TEMPLATE`: each message as ``<role>: <content>`` on its own line,
then ``assistant:`` for the reply, e.g.::

    system: You complete Python code.
    user: def fib(n):
    assistant:

(encoded like a text prompt of the gRPC service, with `EngineConfig.add_special_tokens`).
"""

from __future__ import annotations

from typing import Any

from edgespec.protos.convert import FieldError

FALLBACK_TEMPLATE = "{role}: {content}\n"  # each message; then FALLBACK_GENERATION_PROMPT
FALLBACK_GENERATION_PROMPT = "assistant:"


def render_fallback(messages: list[dict[str, str]]) -> str:
    """The messages in `FALLBACK_TEMPLATE`, ending with the generation prompt."""
    body = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return body + FALLBACK_GENERATION_PROMPT


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str | list[int]:
    """The prompt to generate from: token ids rendered by the tokenizer's own chat template, or
    the fallback's text (the engine encodes it). Raises `FieldError` ('messages') when there is
    no tokenizer or its template fails on these messages."""
    if tokenizer is None:
        raise FieldError("messages", "messages need a tokenizer; this edge has none")
    if not getattr(tokenizer, "chat_template", None):
        return render_fallback(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template's own errors (jinja) are the request's
        raise FieldError("messages", f"messages could not be rendered: {err}") from err
    return list(tokenizer.encode(text, add_special_tokens=False))
