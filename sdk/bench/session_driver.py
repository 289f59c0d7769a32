"""Keep N SDK sessions busy against a deployment for a bounded time, and account for each one.

Each of `sessions` asyncio workers loops until the stop time: it takes the next prompt of its
rotation, dials a serving edge (the list comes from the orchestrator and follows restarts), runs
one greedy generation with the asyncio SDK and records the outcome in a `Tally`: succeeded
(compared with the target-alone reference of its prompt) or failed with the gRPC status code the
SDK raised (`EdgespecError.code`). A failure that carries no status (anything but an
`EdgespecError`) is counted apart, as it breaks the accounting
``submitted = succeeded + failed with a status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgespec.async_client import AsyncClient
from edgespec.core.demo_pair import BENCH_PROMPTS
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.errors import EdgespecError

logger = logging.getLogger(__name__)

# Extra prompts beyond the demo pair's benchmark ones: sessions differ in length and content.
EXTRA_PROMPTS = (
    "def read_config(path):\n",
    "with open(path) as f:\n",
    "for i, line in enumerate(lines):\n",
    "def __repr__(self):\n",
)
MAX_SAMPLES = 20  # error messages kept per status code


def reference_outputs(
    target: Path, max_new_tokens: int, prompts: Sequence[str] = BENCH_PROMPTS + EXTRA_PROMPTS
) -> tuple[list[list[int]], list[list[int]]]:
    """(token-id prompts, the target-alone greedy output of each), computed on the CPU."""
    tokenizer = load_tokenizer(target)
    ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    runner = ModelRunner.from_pretrained(target, device="cpu")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return ids, [list(generate_autoregressive(runner, p, params).tokens) for p in ids]


@dataclass
class Tally:
    """Every session the workers submitted, by outcome."""

    submitted: int = 0
    succeeded: int = 0
    identical: int = 0  # succeeded with exactly the target-alone tokens
    mismatches: int = 0  # succeeded with other tokens
    failed: Counter[str] = field(default_factory=Counter)  # status code name -> count
    failed_without_status: Counter[str] = field(default_factory=Counter)  # exception type
    samples: dict[str, list[str]] = field(default_factory=dict)  # code -> first messages
    # "CODE: first 80 characters of the details" -> count: which failures, not only how many
    messages: Counter[str] = field(default_factory=Counter)
    mismatch_samples: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    tokens: int = 0
    in_flight: int = 0

    def record_failure(self, key: str, edge: str, text: str) -> None:
        """Count a failure under `key` (a status code name, or "no status: <type>")."""
        if key.startswith("no status"):
            self.failed_without_status[key.partition(": ")[2]] += 1
        else:
            self.failed[key] += 1
        self.messages[f"{key}: {text.removeprefix(key + ': ')[:80]}"] += 1
        kept = self.samples.setdefault(key, [])
        if len(kept) < MAX_SAMPLES:
            kept.append(f"{edge}: {text}"[:300])

    def accounting_ok(self) -> bool:
        """submitted = succeeded + failed with a status, and nothing failed without one."""
        return (
            not self.failed_without_status
            and self.in_flight == 0
            and self.submitted == self.succeeded + sum(self.failed.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed": sum(self.failed.values()) + sum(self.failed_without_status.values()),
            "failed_by_status": dict(sorted(self.failed.items())),
            "failed_without_status": dict(self.failed_without_status),
            "accounting_ok": self.accounting_ok(),
            "identical_outputs": self.identical,
            "mismatches": self.mismatches,
            "mismatch_samples": self.mismatch_samples[:5],
            "error_samples": self.samples,
            "errors_by_message": dict(self.messages.most_common()),
            "reconnects": self.reconnects,
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class DriverConfig:
    """How the workers generate."""

    sessions: int
    duration_s: float
    max_new_tokens: int = 48
    policy: str = "fixed"
    k: int = 4
    timeout_s: float = 60.0  # each generation's deadline (the SDK's)


async def run_sessions(
    config: DriverConfig,
    prompts: Sequence[list[int]],
    references: Sequence[list[int]],
    serving_edges: Callable[[], Awaitable[list[str]]],
    tally: Tally,
) -> float:
    """Run the workers until ``config.duration_s`` has passed and every in-flight session has
    ended (each is bounded by its deadline); returns the wall time in seconds."""
    edges: list[str] = []
    stop_at = time.monotonic() + config.duration_s
    params = SamplingParams(max_new_tokens=config.max_new_tokens)

    async def refresh_edges() -> None:
        while time.monotonic() < stop_at:
            try:
                edges[:] = await serving_edges()
            except Exception as err:  # orchestrator busy or restarting: keep the last list
                logger.debug("edge list not refreshed: %s", err)
            await asyncio.sleep(1.0)

    async def one(worker: int, turn: int) -> None:
        if not edges:
            await asyncio.sleep(0.5)
            return
        p = (worker + turn) % len(prompts)
        edge = edges[(worker + turn) % len(edges)]
        tally.submitted += 1
        tally.in_flight += 1
        try:
            async with AsyncClient(edge, timeout=config.timeout_s) as client:
                # the SDK's deadline bounds the call; this bound catches a hang past it
                result = await asyncio.wait_for(
                    client.generate(
                        prompts[p], params, policy=config.policy, draft_tokens=config.k
                    ),
                    config.timeout_s + 30.0,
                )
        except EdgespecError as err:
            tally.record_failure(err.code.name, edge, str(err))
        except Exception as err:  # no status: the accounting breaks, and the run says so
            tally.record_failure(f"no status: {type(err).__name__}", edge, repr(err))
        else:
            tally.succeeded += 1
            tally.reconnects += result.stats.reconnects
            tally.tokens += len(result.token_ids)
            if result.token_ids == references[p]:
                tally.identical += 1
            else:
                tally.mismatches += 1
                if len(tally.mismatch_samples) < 5:
                    tally.mismatch_samples.append(
                        {"prompt": p, "got": result.token_ids, "want": references[p]}
                    )
        finally:
            tally.in_flight -= 1

    async def worker(i: int) -> None:
        turn = 0
        while time.monotonic() < stop_at:
            await one(i, turn)
            turn += 1

    t0 = time.monotonic()
    edges[:] = await serving_edges()
    refresher = asyncio.create_task(refresh_edges())
    try:
        await asyncio.gather(*(worker(i) for i in range(config.sessions)))
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
    return time.monotonic() - t0
