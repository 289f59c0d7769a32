"""Prometheus metrics of a verifier (cloud) replica: `VerifierMetrics`.

Units and vocabulary: see `edgespec.serving.metrics`.

Example::

    from prometheus_client import CollectorRegistry
    from edgespec.serving.verifier_metrics import VerifierMetrics

    metrics = VerifierMetrics(CollectorRegistry())
    metrics.observe_block(outcome="applied", drafted=4, accepted=4, verify_ms=3.2, queue_ms=0.1)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from edgespec.core.validation import check_int
from edgespec.serving.metrics import (
    BATCH_SIZE_BUCKETS,
    COMPUTE_BUCKETS_S,
    DRAFT_LENGTH_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    check_counts,
    metric_factories,
    ms_to_seconds,
)

BLOCK_OUTCOMES = ("applied", "replayed", "stale")
SESSION_CLOSE_REASONS = ("closed", "idle", "stream_end", "error")


class VerifierMetrics:
    """Metrics of a verifier replica: blocks and their outcomes, compute, queueing, sessions.

    Metric families (all prefixed ``edgespec_verifier_``):

    - ``blocks_total{outcome}``: blocks answered, outcome "applied" (verified and committed),
      "replayed" (a resent seq, answered from the stored verdict) or "stale" (base_len did not
      match: nothing applied).
    - ``drafted_tokens_total``, ``accepted_tokens_total``, ``committed_tokens_total``: over
      applied blocks only (a replay or a stale block commits nothing new).
    - ``block_tokens``: histogram of k per applied block.
    - ``verify_seconds``: compute per applied block (forward + sampling).
    - ``queue_seconds``: time an applied block waited before its forward began.
    - ``batch_size``: blocks verified by one target forward (1 without a batcher).
    - ``forward_tokens``: tokens fed to one batched target forward, all sessions together.
    - ``step_seconds``: wall time of one batched step that ran a forward (preparing, forward,
      acceptance); ``modelled_step_seconds_total``: under an emulated compute profile, the
      modelled time of those forwards (what each was padded to; 0 under "real"). Their ratio
      tells how far the host's own work overran the modelled GPU.
    - ``queue_depth``: work items waiting for the batching verifier's next step.
    - ``kv_tokens``: tokens held in the KV caches of all sessions; ``kv_budget_tokens``: the
      budget they are admitted against (0: none).
    - ``prefill_seconds``: OpenSession prefill time.
    - ``sessions_opened_total``; ``sessions_closed_total{reason}``: reason "closed" (by the
      edge), "idle" (reaped after the idle TTL), "stream_end", "error".
    - ``errors_total{code}``: failed RPCs by gRPC status name.
    - ``active_sessions``: sessions holding a KV cache now.
    - ``evictions_total``: sessions evicted to keep the KV budget (admission "evict");
      ``resumes_total``: evicted sessions reopened with their committed prefix.

    Example::

        metrics = VerifierMetrics(CollectorRegistry())
        metrics.observe_block(outcome="applied", drafted=4, accepted=4, verify_ms=3.2,
                              queue_ms=0.1)
        metrics.set_active_sessions(engine_session_count)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        counter, histogram = metric_factories("edgespec_verifier_", registry)

        self.registry = registry
        self.blocks = counter("blocks", "Draft blocks answered, by outcome.", ("outcome",))
        self.drafted_tokens = counter("drafted_tokens", "Draft tokens in applied blocks.")
        self.accepted_tokens = counter("accepted_tokens", "Draft tokens accepted.")
        self.committed_tokens = counter(
            "committed_tokens", "Tokens committed (accepted + recovered or bonus)."
        )
        self.block_tokens = histogram(
            "block_tokens", "Draft tokens per applied block (k).", DRAFT_LENGTH_BUCKETS
        )
        self.verify_time = histogram(
            "verify_seconds", "Verifier compute per block (forward + sampling).", COMPUTE_BUCKETS_S
        )
        self.queue_time = histogram(
            "queue_seconds", "Wait of a block before its forward began.", COMPUTE_BUCKETS_S
        )
        self.batch_size = histogram(
            "batch_size", "Blocks verified by one target forward.", BATCH_SIZE_BUCKETS
        )
        self.prefill_time = histogram(
            "prefill_seconds", "OpenSession prefill time.", COMPUTE_BUCKETS_S
        )
        self.sessions_opened = counter("sessions_opened", "Sessions opened (incl. reopens).")
        self.sessions_closed = counter("sessions_closed", "Sessions ended, by reason.", ("reason",))
        self.errors = counter("errors", "Failed RPCs, by gRPC status code.", ("code",))
        self.forward_tokens = histogram(
            "forward_tokens", "Tokens fed to one batched target forward.", TOKEN_COUNT_BUCKETS
        )
        self.step_time = histogram(
            "step_seconds", "Wall time of one batched step with a forward.", COMPUTE_BUCKETS_S
        )
        self.modelled_step_time = counter(
            "modelled_step_seconds",
            "Modelled time of the batched forwards (emulated compute profiles; 0 otherwise).",
        )
        self.queue_depth = Gauge(
            "edgespec_verifier_queue_depth",
            "Work items waiting for the next batched step.",
            registry=registry,
        )
        self.kv_tokens = Gauge(
            "edgespec_verifier_kv_tokens",
            "Tokens held in all sessions' KV caches.",
            registry=registry,
        )
        self.kv_budget_tokens = Gauge(
            "edgespec_verifier_kv_budget_tokens",
            "KV budget sessions are admitted against, in tokens (0: none).",
            registry=registry,
        )
        self.active_sessions = Gauge(
            "edgespec_verifier_active_sessions",
            "Sessions holding a KV cache.",
            registry=registry,
        )
        self.evictions = counter("evictions", "Sessions evicted to keep the KV budget.")
        self.resumes = counter("resumes", "Evicted sessions reopened with their committed prefix.")
        self._synced = (0, 0)  # the engine's (evicted, resumed) already counted

    def observe_block(
        self,
        *,
        outcome: str,
        drafted: int = 0,
        accepted: int = 0,
        verify_ms: float = 0.0,
        queue_ms: float = 0.0,
    ) -> None:
        """Record one answered block; tokens and timings count for ``"applied"`` only."""
        if outcome not in BLOCK_OUTCOMES:
            raise ValueError(f"outcome must be one of {BLOCK_OUTCOMES}, got {outcome!r}")
        self.blocks.labels(outcome=outcome).inc()
        if outcome != "applied":
            return
        check_counts(drafted, accepted)
        self.drafted_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)
        self.committed_tokens.inc(accepted + 1)
        self.block_tokens.observe(drafted)
        self.verify_time.observe(ms_to_seconds("verify_ms", verify_ms))
        self.queue_time.observe(ms_to_seconds("queue_ms", queue_ms))

    def observe_batch(self, size: int) -> None:
        """Record one target forward that verified `size` blocks (>= 1)."""
        self.batch_size.observe(check_int("batch size", size, 1))

    def observe_step(
        self,
        *,
        sessions: int,
        fed_tokens: int,
        queue_depth: int,
        kv_tokens: int,
        step_ms: float = 0.0,
        modelled_ms: float = 0.0,
    ) -> None:
        """Record one step of the batching verifier: `sessions` in its forward (0: none ran),
        `fed_tokens` fed by it, the `queue_depth` left after it and the `kv_tokens` held now;
        for a step with a forward, its wall time `step_ms` and its `modelled_ms` (emulated
        profiles, else 0)."""
        if sessions:
            self.observe_batch(sessions)
            self.forward_tokens.observe(check_int("fed_tokens", fed_tokens, 1))
            self.step_time.observe(ms_to_seconds("step_ms", step_ms))
            self.modelled_step_time.inc(ms_to_seconds("modelled_ms", modelled_ms))
        self.queue_depth.set(check_int("queue_depth", queue_depth, 0))
        self.kv_tokens.set(check_int("kv_tokens", kv_tokens, 0))

    def observe_session_opened(self, prefill_ms: float) -> None:
        """Record an OpenSession that succeeded, with its prefill time."""
        self.sessions_opened.inc()
        self.prefill_time.observe(ms_to_seconds("prefill_ms", prefill_ms))

    def observe_session_closed(self, reason: str) -> None:
        """Record a session's end; reason in ``SESSION_CLOSE_REASONS``."""
        if reason not in SESSION_CLOSE_REASONS:
            raise ValueError(f"reason must be one of {SESSION_CLOSE_REASONS}, got {reason!r}")
        self.sessions_closed.labels(reason=reason).inc()

    def observe_error(self, code: str) -> None:
        """Record a failed RPC by its gRPC status name, e.g. ``"RESOURCE_EXHAUSTED"``."""
        self.errors.labels(code=code).inc()

    def sync_sessions(self, sessions: int, evicted: int, resumed: int) -> None:
        """Set ``active_sessions`` to `sessions` and bring ``evictions_total`` and
        ``resumes_total`` up to `evicted` and `resumed` (the engine's own running totals, so
        the metrics never drift from them)."""
        self.set_active_sessions(sessions)
        done_evicted, done_resumed = self._synced
        self.evictions.inc(max(evicted - done_evicted, 0))
        self.resumes.inc(max(resumed - done_resumed, 0))
        self._synced = (max(evicted, done_evicted), max(resumed, done_resumed))

    def set_active_sessions(self, count: int) -> None:
        """Set the number of live sessions (from the engine's own count, so it never drifts)."""
        self.active_sessions.set(count)
