"""The edge's OpenAI-compatible HTTP API: a Starlette app over the same `EdgeEngine.generate`
entry the gRPC ``Generate`` servicer uses (`edgespec.edge.http_generation`).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
events, one ``data: <json>`` chunk per piece of text, the finish chunk with the ``edgespec``
figures, the usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``),
``GET /v1/models`` (the one model this edge serves), ``GET /health`` (no token needed).

Errors are OpenAI's JSON shape (`openai_schema.ApiError`): 400 naming the parameter (bad value
or unsupported parameter), 401 (the edge has a token and the ``Authorization: Bearer`` header
does not carry it), 404 (another model), 429 with ``Retry-After`` (the edge or every verifier
full), 503 (no verifier reachable), 504 (``edgespec.timeout_s`` passed), 500 (a fault of the
edge or a verifier). A failure after a stream started ends it with one ``data: {"error": ...}``
event and no ``[DONE]``. A client that disconnects ends its generation and verifier session.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgespec.edge.chat_template import chat_prompt
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.http_generation import HttpGeneration
from edgespec.edge.openai_responses import chunk, new_id, response_body, usage
from edgespec.edge.openai_schema import (
    PARAM_NAMES,
    ApiError,
    ApiRequest,
    default_max_tokens,
    parse_request,
    sampling_params,
)
from edgespec.edge.recovery import EdgeError
from edgespec.protos.convert import FieldError

logger = logging.getLogger(__name__)

# EdgeError codes (gRPC status names) -> HTTP status
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def api_error(err: Exception, chat: bool) -> ApiError:
    """The HTTP error for what the engine raised (`FieldError`, `EdgeError`, anything else)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, FieldError):
        # The engine names gRPC fields ("params.max_new_tokens", "prompt_ids[3]"): the client
        # is told the HTTP parameter ("max_tokens", "prompt[3]").
        name = err.field.split(".", 1)[-1].split("[", 1)[0]
        if err.field.startswith("prompt") and chat:  # the rendered messages' tokens
            param = label = "messages"
        elif err.field.startswith("prompt"):
            param = "prompt"
            label = param + err.field.partition("[")[1] + err.field.partition("[")[2]
        else:
            param = label = PARAM_NAMES.get(name, err.field)
        message = str(err)
        if message.startswith(err.field):
            message = label + message[len(err.field) :]
        return ApiError(400, message, param=param, code="invalid_value")
    if isinstance(err, EdgeError):
        status = _HTTP_STATUS.get(err.code, 500)
        retry = math.ceil(err.retry_after_ms / 1e3) if err.retry_after_ms is not None else None
        return ApiError(status, str(err), code=err.code.lower(), retry_after_s=retry)
    logger.error("HTTP generation failed unexpectedly", exc_info=err)
    return ApiError(500, f"edge internal error: {type(err).__name__}: {err}", code="internal")


def error_response(err: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def sse(data: Any) -> bytes:
    """One server-sent event: ``data: <compact json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Stream(StreamingResponse):
    """A StreamingResponse that closes its body generator however the response ends (a client
    gone cancels the send loop: the generation must end now, not when it is collected)."""

    def __init__(self, body: AsyncGenerator[bytes, None]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()


class OpenAiApi:
    """The routes' handlers over one engine; `model` is the name /v1/models reports and requests
    must name; `token` (None = open) is required as ``Authorization: Bearer <token>``."""

    def __init__(self, engine: EdgeEngine, model: str, token: str | None = None) -> None:
        self.engine = engine
        self.model = model
        self._expected = f"Bearer {token}".encode() if token else None

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ]
        )

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise ApiError(
                401,
                "the Authorization header must be 'Bearer <token>' with this edge's token",
                code="invalid_api_key",
            )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_sessions": self.engine.active_sessions})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as err:
            return error_response(err)
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "edgespec"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            self._authorize(request)
            try:
                body = await request.json()
            except ValueError as err:
                raise ApiError(
                    400, f"the request body is not JSON: {err}", code="invalid_json"
                ) from err
            req = parse_request(body, chat)
            gen = self._start(req)
            if req.stream:
                return await self._stream(req, gen)
            text = "".join([piece async for piece in gen.pieces()])
        except Exception as err:  # noqa: BLE001 - every failure becomes an HTTP status
            return error_response(api_error(err, chat))
        assert gen.finish_reason is not None
        use = usage(len(gen.prompt_ids), gen.completion_tokens)
        return JSONResponse(
            response_body(
                req, new_id(chat), text, gen.finish_reason, use, gen.stats, gen.params.seed
            )
        )

    def _start(self, req: ApiRequest) -> HttpGeneration:
        if req.model != self.model:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this edge serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        tokenizer = self.engine.tokenizer
        prompt = chat_prompt(tokenizer, req.messages) if req.chat else req.prompt
        prompt_ids = self.engine.encode_prompt(prompt)
        max_new = default_max_tokens(req, len(prompt_ids), self.engine.max_length)
        eos = getattr(tokenizer, "eos_token_id", None)
        params = sampling_params(req, max_new, (eos,) if isinstance(eos, int) else ())
        return HttpGeneration(
            self.engine,
            prompt_ids,
            params,
            stops=req.stop,
            policy=req.policy,
            draft_tokens=req.draft_tokens,
            pipelined=req.pipelined,
            timeout_s=req.timeout_s,
        )

    async def _stream(self, req: ApiRequest, gen: HttpGeneration) -> Response:
        """Start the stream once the first piece (or the end) is there: a request refused
        before any token (bad value, full, unreachable) gets its HTTP status, not a 200."""
        pieces = gen.pieces()
        try:
            first: str | None = await pieces.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await pieces.aclose()
            raise
        return _Stream(self._events(req, gen, pieces, first))

    async def _events(
        self,
        req: ApiRequest,
        gen: HttpGeneration,
        pieces: AsyncGenerator[str, None],
        first: str | None,
    ) -> AsyncGenerator[bytes, None]:
        rid = new_id(req.chat)
        try:
            if req.chat:  # the first chunk carries the role
                yield sse(chunk(req, rid, first or "", first=True))
            elif first is not None:
                yield sse(chunk(req, rid, first))
            if first is not None:
                async for piece in pieces:
                    yield sse(chunk(req, rid, piece))
        except Exception as err:  # noqa: BLE001 - headers are sent: the error is an event
            yield sse(api_error(err, req.chat).body())
            return
        finally:
            await pieces.aclose()
        yield sse(chunk(req, rid, finish=gen.finish_reason, stats=gen.stats, seed=gen.params.seed))
        if req.include_usage:
            yield sse(chunk(req, rid, use=usage(len(gen.prompt_ids), gen.completion_tokens)))
        yield sse("[DONE]")
