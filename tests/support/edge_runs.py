"""Driving the edge engine in tests: one generation collected, and a policy that follows a
script of decisions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgespec.core.params import SamplingParams
from edgespec.core.policies import Decision, RoundObservation
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent, TokensEvent


async def collect(
    engine: EdgeEngine,
    prompt: Sequence[int],
    params: SamplingParams,
    on_first: Callable[[], object] | None = None,
    **kwargs,
) -> SummaryEvent:
    """One generation's summary, checked to hold exactly the tokens streamed before it;
    `on_first()` runs when the first tokens arrive (e.g. to kill a verifier mid-generation)."""
    streamed: list[int] = []
    summary = None
    async for event in engine.generate(prompt, params, **kwargs):
        if isinstance(event, TokensEvent):
            if not streamed and on_first is not None:
                on_first()
            streamed.extend(event.tokens)
        else:
            assert isinstance(event, SummaryEvent)
            summary = event
    assert summary is not None and summary.tokens == streamed
    return summary


class ScriptedPolicy:
    """Cycles through fixed decisions (e.g. speculative rounds, trees and cloud-only chunks
    mixed) and keeps what it observes and the tokens left it is told."""

    def __init__(self, decisions: list[Decision]) -> None:
        self.decisions = decisions
        self.i = 0
        self.observed: list[RoundObservation] = []
        self.told: list[int | None] = []  # the tokens_left of each choose

    def choose(self, tokens_left: int | None = None) -> Decision:
        self.told.append(tokens_left)
        decision = self.decisions[self.i % len(self.decisions)]
        self.i += 1
        return decision

    def observe(self, obs: RoundObservation) -> None:
        self.observed.append(obs)
