"""A real edge-cloud stack for the reliability tests: a Verifier server and an Edge server, each
on its own event loop in a background thread, over real gRPC on 127.0.0.1.

`Stack` wires them (tiny Llama pair from the `tiny_pair` fixture); `wait_until` polls a
condition with a bounded wait; `FailingForward` / `NanForward` inject a deterministic fault into
a real target model (its forward raises, or returns NaN logits, once the session is prefilled).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from support.servers import SERVER_DEADLINE_S, VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.service import serve as serve_edge
from edgespec.serving.verifier_metrics import VerifierMetrics

DEADLINE_S = 30.0  # every client call in these tests has at most this deadline


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 10.0, every_s: float = 0.05
) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; returns its last value."""
    end = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > end:
            return condition()
        time.sleep(every_s)


class EdgeServerThread:
    """An Edge server (edgespec.edge.service.serve) on its own event loop in a thread."""

    def __init__(self, engine: EdgeEngine, **serve_kwargs: Any) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self.run(serve_edge(engine, **serve_kwargs))
        self.address = f"127.0.0.1:{self.running.port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(SERVER_DEADLINE_S)

    def stop(self) -> None:
        self.run(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SERVER_DEADLINE_S)
        self.loop.close()


class Stack:
    """A verifier (with Prometheus metrics) and an edge in front of it."""

    def __init__(
        self,
        target_model: torch.nn.Module,
        draft_model: torch.nn.Module,
        tokenizer: Any,
        *,
        verifier_config: VerifierConfig | None = None,
        engine_config: EngineConfig | None = None,
        link_config: LinkConfig | None = None,
    ) -> None:
        self.metrics = VerifierMetrics(CollectorRegistry())
        self.verifier_engine = VerifierEngine(target_model, verifier_config)
        self.verifier = VerifierServerThread(self.verifier_engine, metrics=self.metrics)
        self.edge_engine = EdgeEngine(
            draft_model,
            tokenizer,
            [self.verifier.address],
            link_config=link_config or LinkConfig(round_timeout_s=DEADLINE_S),
            config=engine_config or EngineConfig(backoff_initial_s=0.01, backoff_max_s=0.05),
        )
        self.edge = EdgeServerThread(self.edge_engine)

    @property
    def sessions(self) -> int:
        """Sessions the verifier engine holds now."""
        return self.verifier_engine.stats().sessions

    @property
    def opened(self) -> int:
        """Sessions the verifier engine opened so far."""
        return self.verifier_engine.stats().opened

    @property
    def gauge(self) -> float:
        """The verifier's edgespec_verifier_active_sessions gauge."""
        value = self.metrics.registry.get_sample_value("edgespec_verifier_active_sessions")
        return 0.0 if value is None else value

    def drained(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) for the verifier to hold no session."""
        return wait_until(lambda: self.sessions == 0, timeout_s)

    def stop(self) -> None:
        self.edge.stop()
        self.verifier.stop()


def inject_forward_fault(
    model: torch.nn.Module,
    fault: str = "raise",
    min_len: int = 9,
    *,
    prefill: bool = False,
    delay_s: float = 0.5,
) -> torch.nn.Module:
    """A copy of a real causal LM whose forward misbehaves deterministically on every call over
    fewer than `min_len` new tokens (the blocks; a prompt's prefill is longer), or, with
    `prefill`, on every call over `min_len` tokens or more: `fault` "raise" raises RuntimeError,
    "nan" returns NaN logits, "slow" sleeps `delay_s` first. The copy's `started` event is set
    whenever such a call starts."""
    faulty = copy.deepcopy(model)
    real_forward = faulty.forward
    started = threading.Event()

    @functools.wraps(real_forward)  # keeps the signature the runner inspects
    def forward(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        hit = (input_ids.shape[-1] >= min_len) if prefill else (input_ids.shape[-1] < min_len)
        if hit:
            started.set()
            if fault == "slow":
                time.sleep(delay_s)
            elif fault == "raise":
                raise RuntimeError("injected target fault")
        out = real_forward(*args, **kwargs)
        if hit and fault == "nan":
            out.logits = torch.full_like(out.logits, float("nan"))
        return out

    faulty.forward = forward  # instance attribute: nn.Module.__call__ calls it
    faulty.started = started
    return faulty
