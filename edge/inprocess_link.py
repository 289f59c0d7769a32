"""A verifier in this process: the `VerifierLink` rounds as direct calls, no transport.

`InProcessLinks(verifier)` is a `LinkFactory` for an `EdgeEngine` whose verifier is an object in
the same process, typically `edgespec.cloud.verifier.VerifierEngine` (the edge does not import
the cloud: `VerifierBackend` describes the methods it uses, and the real engine fits it). The
session loop runs unchanged (policies, pipelining, cloud-only streams, recovery), so a
distributed round can be stepped through in one process, in a debugger or a test.

Each reply is computed when it is read, in the order blocks were sent, as the Verifier service
does: a decode block's tokens come one `decode_next` per `receive`, and a block sent ahead is
verified only after the stream before it ended. Verifier work runs inline on the event loop.
There is no network: RTT samples are 0 and no bytes are counted.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from edgespec.core.params import SamplingParams
from edgespec.core.session import DraftBlock, Verdict
from edgespec.edge.verifier_link import (
    RETRYABLE_STATUSES,
    LinkError,
    LinkFactory,
    Reply,
    SessionInfo,
    VerifierLink,
)

logger = logging.getLogger(__name__)


class OpenedSession(Protocol):
    """What `VerifierBackend.open_session` answers (cloud's `OpenResult`)."""

    @property
    def session_id(self) -> str: ...
    @property
    def committed_len(self) -> int: ...
    @property
    def max_block_tokens(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def model_id(self) -> str: ...
    @property
    def prefill_ms(self) -> float: ...
    @property
    def compute_profile(self) -> str: ...
    @property
    def tree_blocks(self) -> bool: ...
    @property
    def block_alternatives(self) -> bool: ...
    @property
    def idle_forward_ms(self) -> float: ...


class VerifyOutcome(Protocol):
    """What `VerifierBackend.verify` / `decode_next` answer (cloud's `VerifyResult`)."""

    @property
    def outcome(self) -> enum.Enum: ...  # named APPLIED, REPLAYED or STALE
    @property
    def seq(self) -> int: ...
    @property
    def committed_len(self) -> int: ...
    @property
    def verdict(self) -> Verdict | None: ...
    @property
    def more(self) -> bool: ...


class VerifierBackend(Protocol):
    """The verifier engine methods the in-process link calls (cloud's `VerifierEngine` has them).

    Refusals raise an exception whose ``code`` is a status name (cloud's `ServiceError`).
    """

    def open_session(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
        model_id: str = "",
    ) -> OpenedSession: ...

    def verify(self, session_id: str, block: DraftBlock) -> VerifyOutcome: ...

    def decode_next(self, session_id: str, seq: int) -> VerifyOutcome: ...

    def close_session(self, session_id: str) -> bool: ...


class InProcessVerifierLink(VerifierLink):
    """One session on an in-process verifier (see the module docstring)."""

    def __init__(self, verifier: VerifierBackend, name: str = "in-process", model_id: str = ""):
        self.verifier = verifier
        self.name = name  # stands for the address (stats, link memory)
        self.model_id = model_id
        self.session: SessionInfo | None = None
        self._open = False
        self._unanswered: deque[DraftBlock] = deque()  # sent, verdict not yet read
        self._streaming: int | None = None  # seq of the decode block whose stream goes on

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def bytes_sent(self) -> int:
        return 0

    @property
    def bytes_received(self) -> int:
        return 0

    async def open(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
    ) -> SessionInfo:
        await self.close()
        try:
            opened = self.verifier.open_session(
                list(prefix_ids), params, generated, next_seq, self.model_id
            )
        except Exception as err:  # noqa: BLE001 - every refusal becomes a LinkError
            raise self._failure("open_session", err) from err
        self.session = SessionInfo(
            address=self.name,
            session_id=opened.session_id,
            committed_len=opened.committed_len,
            max_block_tokens=opened.max_block_tokens,
            vocab_size=opened.vocab_size,
            model_id=opened.model_id,
            prefill_ms=opened.prefill_ms,
            compute_profile=opened.compute_profile,
            tree_blocks=opened.tree_blocks,
            block_alternatives=opened.block_alternatives,
            idle_forward_ms=opened.idle_forward_ms,
            open_rtt_ms=0.0,
        )
        self._open = True
        if opened.committed_len != len(prefix_ids):
            await self.close()
            raise LinkError(
                f"verifier {self.name} opened the session at committed_len "
                f"{opened.committed_len}, expected {len(prefix_ids)}",
                address=self.name,
            )
        return self.session

    async def send(self, block: DraftBlock) -> tuple[float, int]:
        if not self._open:
            raise RuntimeError("link is not open; call open() first")
        self._unanswered.append(block)
        return time.perf_counter(), 0

    async def receive(self) -> Reply:
        session = self.session
        if not self._open or session is None:
            raise RuntimeError("link is not open; call open() first")
        try:
            if self._streaming is not None:
                result = self.verifier.decode_next(session.session_id, self._streaming)
            elif self._unanswered:
                block = self._unanswered.popleft()
                result = self.verifier.verify(session.session_id, block)
            else:
                raise self.protocol_error("receive() with no block awaiting a verdict")
        except LinkError:
            raise
        except Exception as err:  # noqa: BLE001 - every refusal becomes a LinkError
            raise self._failure("verify", err) from err
        self._streaming = result.seq if result.more else None
        verdict = result.verdict
        return Reply(
            seq=result.seq,
            outcome=result.outcome.name,
            verdict=verdict,
            more=result.more,
            committed_len=result.committed_len,
            verify_ms=verdict.verify_ms if verdict is not None else 0.0,
            queue_ms=0.0,
            received=time.perf_counter(),
            bytes_received=0,
        )

    def protocol_error(self, message: str) -> LinkError:
        self._abandon()
        logger.info("verifier %s: %s", self.name, message)
        return LinkError(f"verifier {self.name}: {message}", address=self.name)

    async def ping(self) -> float | None:
        return 0.0 if self._open else None

    async def close(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        """Forget the session's stream and close it on the verifier (it may be gone already)."""
        was_open, self._open = self._open, False
        self._unanswered.clear()
        self._streaming = None
        if was_open and self.session is not None:
            try:
                self.verifier.close_session(self.session.session_id)
            except Exception as err:  # noqa: BLE001 - best effort, like CloseSession
                logger.debug("close_session %s failed: %s", self.session.session_id, err)

    def _failure(self, call: str, err: Exception) -> LinkError:
        code = getattr(err, "code", None)
        if not isinstance(code, str):
            code = "INTERNAL"  # what the Verifier service answers for an unexpected failure
        self._abandon()
        logger.info("verifier %s: %s failed: %s %s", self.name, call, code, err)
        return LinkError(
            f"verifier {self.name}: {call} failed: {code}: {err}",
            address=self.name,
            code=code,
            retryable=code in RETRYABLE_STATUSES,
            details=str(err),
            retry_after_ms=getattr(err, "retry_after_ms", None),
            evicted=bool(getattr(err, "evicted", False)),
        )


class InProcessLinks(LinkFactory):
    """An `InProcessVerifierLink` to `verifier` for every generation."""

    def __init__(self, verifier: VerifierBackend, name: str = "in-process", model_id: str = ""):
        self.verifier = verifier
        self.name = name
        self.model_id = model_id

    def new_link(self, session_key: str) -> InProcessVerifierLink:
        return InProcessVerifierLink(self.verifier, self.name, self.model_id)
