"""What an adaptive policy learnt of a link, carried from one session to the next.

A policy's estimates and its final mode and k are the start of the next session on the same
link, which then decides from its first round. Generations are short (a 64-token one has ~20
rounds, fewer than the estimates need from priors), and at long RTTs one speculative round costs
more than cloud-only can gain, so a cold start is most of the cost there. The edge keeps one
memory per verifier and sampling regime (`edgespec.edge.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgespec.core.estimators import (
    AcceptanceEstimator,
    AffineFit,
    RankAcceptance,
    ReachCalibration,
    RobustLevel,
    ShapeAcceptance,
    VerifierLoad,
)
from edgespec.core.policies import Mode


@dataclass(frozen=True)
class PolicyMemory:
    """What an `AdaptivePolicy` learnt of a link (acceptance per position, t_d, RTT, t_v(n),
    queue, cloud-only token time, the verifier's load) and where it ended (mode, k): the start
    of the next session on the same link. Opaque: made by `AdaptivePolicy.memory()`, consumed by `AdaptivePolicy(config,
    memory)`; the estimators inside are private copies, never shared between sessions."""

    accept: AcceptanceEstimator
    draft: RobustLevel
    rtt: RobustLevel
    verify: AffineFit
    queue: float | None
    cloud_offset: RobustLevel
    mode: Mode
    k: int
    speculative_rounds: int  # speculative rounds behind the estimates, over all sessions
    cloud_only_steps: int
    ranks: RankAcceptance | None = None  # sibling-rank acceptance of token trees (TreePolicy)
    shapes: ShapeAcceptance | None = None  # accepted tokens per tree shape (TreePolicy)
    reach: ReachCalibration | None = None  # the rank model's calibration by depth (TreePolicy)
    load: VerifierLoad | None = None  # what the batching verifier's load cost per position
    # P(the target's token is the draft's runner-up | a rejection) as decayed (hits, trials):
    # carried by `TreePolicy` only (its trees' walks measure it every round; module
    # `edgespec.core.tree_policy`), never by the chain policy (`AdaptiveConfig.ahead_branches`)
    runner_up: tuple[float, float] | None = None

    @property
    def usable(self) -> bool:
        """Enough to decide from: a verifier-time fit and an RTT level."""
        return self.verify.has_data and self.rtt.value is not None

    def summary(self) -> dict[str, float | int | str | None]:
        """The estimates in plain numbers (ms; None where nothing was learnt yet), for
        observability: rtt_ms, alpha (pooled acceptance), draft_ms (per token), verify_ms (t_v of
        one position), mode, k, speculative_rounds, cloud_only_steps."""
        return {
            "rtt_ms": self.rtt.value,
            "alpha": self.accept.pooled() if self.accept.trials > 0 else None,
            "draft_ms": self.draft.value,
            "verify_ms": self.verify.predict(1) if self.verify.has_data else None,
            "mode": self.mode,
            "k": self.k,
            "speculative_rounds": self.speculative_rounds,
            "cloud_only_steps": self.cloud_only_steps,
        }

    @property
    def empty(self) -> bool:
        """Nothing learnt at all (no acceptance trial, no timing)."""
        return self.accept.trials == 0.0 and self.rtt.value is None and self.draft.value is None
