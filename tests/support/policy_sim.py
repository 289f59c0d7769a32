"""A synthetic environment to run draft-length policies against (tests only).

`simulate` runs any policy against sessions drawn from the cost model
(`edgespec.core.cost_model`): Bernoulli acceptance, jittery timings, level shifts by round. The
policy sees exactly what an edge would measure, and runs are deterministic given a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgespec.core.cost_model import CostModel, best_k
from edgespec.core.policies import CLOUD_ONLY, Decision, DraftLengthPolicy, Mode, RoundObservation
from edgespec.core.validation import check_float, check_int, check_ms, check_prob


@dataclass(frozen=True)
class SimEnv:
    """A synthetic session drawn from the model: Bernoulli acceptance, timings around `cost`.

    `alpha` is one acceptance probability for every position, or one per position (the last
    repeats beyond the tuple). The RTT of each round is cost.rtt_ms plus Gaussian jitter
    (sd `rtt_jitter_ms`, clipped at 0) plus, with probability `rtt_spike_prob`, a spike of
    `rtt_spike_ms` (a retransmit). Drafting and verifying times get multiplicative Gaussian noise
    of relative sd `timing_noise`. A cloud-only step streams its tokens at cost.cloud_ms_per_token()
    each and pays one RTT when the stream starts (after a speculative round).
    """

    alpha: float | tuple[float, ...]
    cost: CostModel
    rtt_jitter_ms: float = 0.0
    rtt_spike_prob: float = 0.0
    rtt_spike_ms: float = 0.0
    timing_noise: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.alpha, Sequence):
            if not self.alpha:
                raise ValueError("alpha must hold at least one probability, got ()")
            object.__setattr__(
                self,
                "alpha",
                tuple(check_prob(f"alpha[{i}]", a) for i, a in enumerate(self.alpha)),
            )
        else:
            object.__setattr__(self, "alpha", check_prob("alpha", self.alpha))
        if not isinstance(self.cost, CostModel):
            raise ValueError(f"cost must be a CostModel, got {type(self.cost).__name__}")
        check_ms("rtt_jitter_ms", self.rtt_jitter_ms)
        check_prob("rtt_spike_prob", self.rtt_spike_prob)
        check_ms("rtt_spike_ms", self.rtt_spike_ms)
        check_float("timing_noise", self.timing_noise, 0, 1, hi_open=True)

    def accept_probs(self, k: int) -> list[float]:
        """True P(accept position i | reached i), i = 1..k."""
        if isinstance(self.alpha, tuple):
            return [self.alpha[min(i, len(self.alpha) - 1)] for i in range(k)]
        return [self.alpha] * k

    def best_k(self, k_min: int = 1, k_max: int = 16) -> int:
        """The optimal draft length under the true parameters."""
        return best_k(self.cost, self.accept_probs(k_max), k_min, k_max)

    def speculative_rate(self, k: int) -> float:
        """True expected tokens per second at draft length k."""
        return self.cost.speculative_rate(self.accept_probs(k), k)


@dataclass(frozen=True)
class SimRound:
    """One simulated decision: what the policy chose, what it then observed, what it cost."""

    decision: Decision
    observation: RoundObservation | None  # None: a round that only verified (the last token)
    wall_ms: float  # time the round (or cloud-only step) took, drafting included


@dataclass(frozen=True)
class SimResult:
    """A simulated run: every round, and the committed tokens and wall time they add up to."""

    rounds: tuple[SimRound, ...] = field(repr=False)
    tokens: int
    time_ms: float

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.tokens / self.time_ms if self.time_ms > 0 else 0.0

    @property
    def ks(self) -> list[int]:
        """The k of every round (0 for cloud-only steps)."""
        return [r.decision.k for r in self.rounds]

    @property
    def modes(self) -> list[Mode]:
        return [r.decision.mode for r in self.rounds]


def _noisy(rng: random.Random, value: float, rel: float) -> float:
    return value * max(0.0, 1.0 + rng.gauss(0.0, rel)) if rel else value


def simulate(
    policy: DraftLengthPolicy,
    env: SimEnv | Callable[[int], SimEnv],
    rounds: int,
    seed: int = 0,
    max_tokens: int | None = None,
) -> SimResult:
    """Run `policy` for `rounds` decisions against `env` (or `env(i)` for decision i, to change
    conditions mid-run). Deterministic given `seed`; the policy sees exactly what an edge would
    measure. Tokens are counted as committed (no stop tokens). With `max_tokens`, the run is one
    generation of that many tokens (ending early when they are committed): the policy is told
    the tokens left, and, as the edge does, a round drafts at most the tokens left less one (none:
    a round that only verifies, not observed) and a stream is cut at the tokens left."""
    rounds = check_int("rounds", rounds, 0)
    seed = check_int("seed", seed, 0)
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 1)
    seeds = random.Random(seed)
    trace: list[SimRound] = []
    tokens, time_ms = 0, 0.0
    streaming = False  # a cloud-only stream is open (its first-token RTT is paid)

    for i in range(rounds):
        left = None if max_tokens is None else max_tokens - tokens
        if left is not None and left <= 0:
            break
        e = env(i) if callable(env) else env
        # One stream per round, so runs of different policies with the same seed see the same
        # luck round by round (common random numbers): comparisons between them are much less
        # noisy than their throughputs.
        rng = random.Random(seeds.getrandbits(64))
        decision = policy.choose() if left is None else policy.choose(tokens_left=left)
        rtt = e.cost.rtt_ms + (rng.gauss(0.0, e.rtt_jitter_ms) if e.rtt_jitter_ms else 0.0)
        if e.rtt_spike_prob and rng.random() < e.rtt_spike_prob:
            rtt += e.rtt_spike_ms
        rtt = max(rtt, 0.0)
        if decision.mode == CLOUD_ONLY:
            n = decision.stream_tokens if left is None else min(decision.stream_tokens, left)
            verify = _noisy(rng, n * e.cost.cloud_ms_per_token(), e.timing_noise)
            network = 0.0 if streaming else rtt
            streaming = True
            obs = RoundObservation(
                k=0,
                accepted=0,
                draft_ms=0.0,
                verify_ms=verify,
                network_ms=network,
                cloud_only=True,
                tokens=n,
            )
            wall = verify + network
        else:
            streaming = False
            k = decision.k if left is None else min(decision.k, left - 1)
            if k == 0:  # one token left: a round of the verifier's token alone
                wall = rtt + e.cost.queue_ms + _noisy(rng, e.cost.verify_ms(1), e.timing_noise)
                trace.append(SimRound(decision, None, wall))
                tokens += 1
                time_ms += wall
                continue
            accepted = 0
            for p in e.accept_probs(k):
                if rng.random() >= p:
                    break
                accepted += 1
            draft = _noisy(rng, k * e.cost.draft_ms, e.timing_noise)
            verify = _noisy(rng, e.cost.verify_ms(k + 1), e.timing_noise)
            queue = e.cost.queue_ms
            obs = RoundObservation(
                k=k,
                accepted=accepted,
                draft_ms=draft,
                verify_ms=verify,
                network_ms=rtt,
                queue_ms=queue,
            )
            wall = draft + rtt + queue + verify
        policy.observe(obs)
        trace.append(SimRound(decision, obs, wall))
        tokens += obs.tokens
        time_ms += wall
    return SimResult(rounds=tuple(trace), tokens=tokens, time_ms=time_ms)


def noisy_env(
    alpha: float | tuple[float, ...] = 0.8,
    draft_ms: float = 2.0,
    rtt_ms: float = 20.0,
    verify_base_ms: float = 20.0,
    verify_per_token_ms: float = 1.0,
    **noise: float,
) -> SimEnv:
    """A session with realistic noise: RTT jitter of 10% + 1 ms, 3% timing noise."""
    noise.setdefault("rtt_jitter_ms", 0.1 * rtt_ms + 1.0)
    noise.setdefault("timing_noise", 0.03)
    cost = CostModel(draft_ms, rtt_ms, verify_base_ms, verify_per_token_ms)
    return SimEnv(alpha, cost, **noise)


def exploited_ks(result: SimResult, start: int = 0, stop: int | None = None) -> list[int]:
    """k of the non-probe rounds in [start, stop): what the policy judged best (0: cloud-only)."""
    return [r.decision.k for r in result.rounds[start:stop] if not r.decision.probe]


def k_changes(ks: list[int]) -> int:
    """How many times k changed from one round to the next."""
    return sum(1 for a, b in zip(ks, ks[1:], strict=False) if a != b)
