"""One HTTP request's generation: `EdgeEngine.generate` events -> the text the client sees.

`StopText` finds OpenAI ``stop`` strings in the decoded text: the text is cut before the first
stop string and the generation ends there; text that could still become a stop string is held
back until it cannot. `HttpGeneration` drives the engine (the same entry the gRPC servicer
uses): it decodes the committed tokens without the stop token that ended them (OpenAI returns
no end-of-text marker), applies the stop strings and an optional deadline, and closes the
engine's generation (and so its verifier session) whenever it stops early or its consumer goes
away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from edgespec.core.params import SamplingParams
from edgespec.edge.detokenize import TextStream
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import EdgeStats, SummaryEvent, TokensEvent
from edgespec.edge.recovery import EdgeError


class StopText:
    """Text pushed piece by piece, released up to the first of `stops` (none: all of it)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # a stop's proper prefix
        self.text = ""
        self.released = 0  # text[:released] was handed out
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add `piece`; return the text now safe to release (cut before a stop string)."""
        if self.stopped:
            return ""
        self.text += piece
        start = max(0, self.released - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            end = min(found)
        else:
            end = max(self.released, len(self.text) - self.hold)
        out = self.text[self.released : end]
        self.released = end
        return out

    def flush(self) -> str:
        """At the end of the generation: the held-back text (no stop string came)."""
        if self.stopped:
            return ""
        out = self.text[self.released :]
        self.released = len(self.text)
        return out


class HttpGeneration:
    """Runs one generation for the HTTP API; iterate `pieces()` once, then read the outcome:
    `finish_reason` ("stop" | "length"), `completion_tokens` (committed tokens, those after a
    stop string's cut included), `stats` (None when a stop string ended it early)."""

    def __init__(
        self,
        engine: EdgeEngine,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        stops: Sequence[str] = (),
        policy: str | None = None,
        draft_tokens: int | None = None,
        pipelined: bool | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.policy = policy
        self.draft_tokens = draft_tokens
        self.pipelined = pipelined
        self.timeout_s = timeout_s
        self.stop_text = StopText(stops)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.stats: EdgeStats | None = None

    async def pieces(self) -> AsyncGenerator[str, None]:
        """The reply's text, piece by piece (never an empty piece). Raises what the engine
        raises (`FieldError`, `EdgeError`), and `EdgeError` DEADLINE_EXCEEDED past the timeout."""
        stop_ids = set(self.params.stop_token_ids)
        detok = TextStream(self.engine.tokenizer)
        kept: list[int] = []
        events = self.engine.generate(
            self.prompt_ids,
            self.params,
            k=self.draft_tokens,
            policy=self.policy,
            pipelined=self.pipelined,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s if self.timeout_s else None
        # aclosing: stopping early (a stop string, a deadline, a client gone) ends the engine's
        # generation now, which closes its verifier session.
        async with contextlib.aclosing(events):
            while True:
                try:
                    if deadline is None:
                        event = await events.__anext__()
                    else:
                        left = max(deadline - loop.time(), 0.0)
                        event = await asyncio.wait_for(events.__anext__(), left)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise EdgeError(
                        "DEADLINE_EXCEEDED",
                        f"the generation did not finish within edgespec.timeout_s="
                        f"{self.timeout_s:g} s",
                    ) from None
                if isinstance(event, TokensEvent):
                    self.completion_tokens += len(event.tokens)
                    # A stop token is always the last one: the text leaves it out.
                    new = [t for t in event.tokens if t not in stop_ids]
                    kept += new
                    piece = self.stop_text.push(detok.push(new))
                    if piece:
                        yield piece
                    if self.stop_text.stopped:
                        self.finish_reason = "stop"
                        return
                elif isinstance(event, SummaryEvent):
                    self.finish_reason = event.finish_reason
                    self.stats = event.stats
        # Text the incremental decoder still held (an unfinished character) comes out whole.
        if self.engine.tokenizer is not None:
            whole = self.engine.tokenizer.decode(kept)
            if whole.startswith(self.stop_text.text):
                piece = self.stop_text.push(whole[len(self.stop_text.text) :])
                if self.stop_text.stopped:
                    self.finish_reason = "stop"
                if piece:
                    yield piece
        tail = self.stop_text.flush()
        if tail:
            yield tail
