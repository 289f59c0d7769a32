"""Draft-length controllers: how many tokens the edge drafts per round, or whether to let the
cloud decode alone.

Vocabulary. A *round* sends a block of `k` draft tokens to the verifier and gets back a verdict:
`accepted` draft tokens (0..k) plus one token of the verifier's own, so a round commits
`accepted + 1` tokens. A *cloud-only step* is the alternative mode: the verifier decodes on its own
and streams the tokens back; the edge drafts nothing.

The model (DESIGN.md, "Adaptive draft length"), all times in milliseconds:

    E(k) = 1 + sum_{j=1..k} prod_{i=1..j} p_i          expected tokens committed per round
    T(k) = k * t_d + RTT + q + t_v(k + 1)              one round, drafting and verifying in series
    t_v(n) = a + b * n                                 verifier forward over n positions
    rate(k) = E(k) / T(k)                              committed tokens per ms

`p_i` is P(draft token i accepted | tokens 1..i-1 accepted). With one rate for every position,
p_i = alpha, E(k) reduces to (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al. 2023,
`expected_tokens`). The adaptive controller keeps the per-position form: conditional acceptance is
not constant in practice (reaching position i selects the easy contexts, so later positions are
often accepted more readily), and with a hard first position and easy later ones the i.i.d. model
fitted to the same rounds picks a far too short block. Positions seen rarely or never are shrunk
towards a pooled rate, so k beyond the longest block observed is extrapolated sensibly rather
than with noise; with i.i.d. acceptance the two forms agree.

Cloud-only decoding streams one token per verifier forward, back to back: the tokens overlap the
network except the first, which pays one RTT whenever the stream (re)starts. Its steady rate is
1 / t_c with t_c = t_v(1) + q, corrected by an offset learnt from cloud-only steps once there are
any. `AdaptivePolicy` compares speculative decoding with cloud-only *as it runs it*: a cycle of
`cloud_probe_every` streamed steps, one speculative probe (to keep the estimates fresh) and one RTT
to restart the stream afterwards; at long RTTs those restarts matter.

Estimators (all updated from each round's `RoundObservation`):
- acceptance: forgotten per-position counts with a Beta prior pulling each position towards a
  pooled rate, and a change-point test (likelihood ratio of the last rounds against the older
  counts) that rebuilds the counts from the rounds after a shift;
- t_d (per draft token), RTT: robust levels (Huber-style EWMA) that shrug off single spikes but jump
  to the new level after `shift_rounds` consecutive samples far off on the same side;
- t_v(n) = a + b*n: least squares with forgetting, a small ridge prior on b, the same shift rule;
  exploration probes at k/2 and k+/-1 keep n varied so b (and t_v(1), hence t_c) stay identified;
- queue: plain EWMA (the mean wait is what costs throughput).

k moves to the best k only when the predicted gain beats `k_hysteresis`; the mode switches when
the other mode beats the current one by `mode_hysteresis` (leaving speculative decoding is judged
on an optimistic acceptance, one standard error up, so thin evidence does not end it).
`FixedPolicy`, `HeuristicPolicy` (k += 2 when a block is accepted whole, k -= 1 otherwise) and
`CloudOnlyPolicy` (the verifier decodes alone) are the baselines to compare against.
`simulate` runs any policy against a synthetic environment drawn from the same model (Bernoulli
acceptance, jittery timings, level shifts by round); tests and the experiments harness use it.

Across sessions (`PolicyMemory`): a policy's estimates and its final mode and k are the start of
the next session on the same link, which then decides from its first round. Generations are
short (a 64-token one has ~20 rounds, fewer than the estimates need from priors), and at long
RTTs one speculative round costs more than cloud-only can gain, so a cold start is most of the
cost there. The edge keeps one memory per verifier and sampling regime (`edge.engine`).

While cloud-only, nothing is drafted, but the policy need not go blind: `observe_shadow` takes
what the draft would have proposed for the streamed tokens (under greedy decoding a draft token
is accepted iff it equals the committed token, so these are exact acceptance outcomes), and
`observe_rtt` takes pings. With both arriving, scheduled probes are skipped: the link getting
better shows in the pings, easier text in the shadow rounds.

Pipelined drafting (`CostModel.pipelined`, `AdaptiveConfig.pipelined`): while block n's verdict
travels, the edge guesses its bonus token and drafts block n+1 after it (pipeline depth 1). Block
n+1 is used (a *hit*) with probability h(k) = p_1 * ... * p_k * p_{k+1}: every draft token
accepted and the bonus equal to the draft's guess, which for greedy decoding is exactly the
event that a (k+1)-th draft token would have been accepted (for sampling, p_{k+1} approximates
P(bonus == guess)). A run of hits sends a block every (k + 1) * t_d + RTT + q + t_v(k + 1) per
two blocks, as each block is drafted while the one before it travels; a miss costs a fresh serial
round. So, as an approximation that ignores the order of hits and misses:

    T_hit(k)  = max(((k + 1) * t_d + RTT + q + t_v(k + 1)) / 2, (k + 1) * t_d, t_v(k + 1) + q)
    T_pipe(k) = h(k) * T_hit(k) + (1 - h(k)) * T(k)

(the second and third terms of the max: the edge drafts k + 1 tokens per block and the verifier
verifies one block at a time, whatever the overlap). Round observations of a pipelined session are
the same as serial ones: network_ms of a block drafted ahead is still measured from its own send,
and the verifier's queue_ms counts the time it waited behind the block before it.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

Mode = Literal["speculative", "cloud_only"]
SPECULATIVE: Mode = "speculative"
CLOUD_ONLY: Mode = "cloud_only"
K_LIMIT = 256  # no policy drafts more per round; the verifier caps blocks far below this anyway


# ---------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a draft length is always a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return int(value)


def _check_float(
    name: str, value: object, in_range: Callable[[float], bool], allowed: str
) -> float:
    if not _is_real(value) or not math.isfinite(value) or not in_range(float(value)):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return float(value)


def _check_ms(name: str, value: object) -> float:
    return _check_float(name, value, lambda v: v >= 0.0, ">= 0 (milliseconds)")


def _check_prob(name: str, value: object) -> float:
    return _check_float(name, value, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


# ---------------------------------------------------------------------------------------------
# the model


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - alpha^(k+1)) / (1 - alpha): expected tokens one round commits when each of the
    `k` draft tokens is accepted independently with probability `alpha` (the accepted prefix plus
    the verifier's own token). Continuous at alpha = 1, where it is k + 1; alpha = 0 gives 1."""
    alpha = _check_prob("alpha", alpha)
    k = _check_int("k", k, 0)
    if alpha > 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_tokens_per_position(accept_probs: Sequence[float], k: int) -> float:
    """E(k) = 1 + sum_{j<=k} prod_{i<=j} p_i with `accept_probs[i-1]` = P(accept position i |
    positions before it accepted). Needs at least k probabilities; equals `expected_tokens` when
    they are all the same."""
    k = _check_int("k", k, 0)
    if len(accept_probs) < k:
        raise ValueError(
            f"accept_probs must hold at least k={k} probabilities, got {len(accept_probs)}"
        )
    total, reach = 1.0, 1.0
    for i in range(k):
        reach *= _check_prob(f"accept_probs[{i}]", accept_probs[i])
        total += reach
    return total


@dataclass(frozen=True)
class CostModel:
    """Mean timings of one session, in milliseconds: what a round and a cloud-only token cost.

    Speculative round with k draft tokens (serial: draft, send, queue, verify, answer):
        T(k) = k * draft_ms + rtt_ms + queue_ms + verify_ms(k + 1)
    Cloud-only streaming: one token per `cloud_token_ms`, which defaults to
    verify_ms(1) + queue_ms (a one-position forward per token; the RTT overlaps the stream).
    """

    draft_ms: float  # t_d: edge time per draft token
    rtt_ms: float  # network time of one round (both ways, serialisation included)
    verify_base_ms: float  # a in t_v(n) = a + b*n: fixed cost of a verifier forward
    verify_per_token_ms: float  # b: cost per position verified
    queue_ms: float = 0.0  # mean wait at the verifier before the forward (batching, load)
    cloud_token_ms: float | None = None  # cloud-only time per token; None => verify_ms(1) + queue
    pipelined: bool = False  # the edge drafts the next block while a verdict travels (depth 1)

    def __post_init__(self) -> None:
        if not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be a bool, got {self.pipelined!r}")
        for name in ("draft_ms", "rtt_ms", "verify_base_ms", "verify_per_token_ms", "queue_ms"):
            object.__setattr__(self, name, _check_ms(name, getattr(self, name)))
        if self.cloud_token_ms is not None:
            value = _check_float(
                "cloud_token_ms", self.cloud_token_ms, lambda v: v > 0.0, "> 0 (milliseconds)"
            )
            object.__setattr__(self, "cloud_token_ms", value)

    def verify_ms(self, positions: int) -> float:
        """t_v(n): one verifier forward over `positions` = k + 1 positions."""
        return self.verify_base_ms + self.verify_per_token_ms * positions

    def round_ms(self, k: int) -> float:
        """T(k): wall time of one serial speculative round drafting `k` tokens."""
        return k * self.draft_ms + self.rtt_ms + self.queue_ms + self.verify_ms(k + 1)

    def pipelined_hit_ms(self, k: int) -> float:
        """T_hit(k): mean time per round in a run of pipeline hits (module docstring)."""
        verify = self.verify_ms(k + 1) + self.queue_ms
        drafting = (k + 1) * self.draft_ms
        return max((drafting + self.rtt_ms + verify) / 2.0, drafting, verify)

    def expected_round_ms(self, k: int, hit_prob: float) -> float:
        """Mean time per round at draft length `k`: T(k) when not pipelined, else T_pipe(k) with
        `hit_prob` = P(the next block, drafted ahead, is used)."""
        if not self.pipelined:
            return self.round_ms(k)
        h = _check_prob("hit_prob", hit_prob)
        return h * self.pipelined_hit_ms(k) + (1.0 - h) * self.round_ms(k)

    def cloud_ms_per_token(self) -> float:
        """t_c: steady-state time per token when the cloud decodes alone and streams."""
        if self.cloud_token_ms is not None:
            return self.cloud_token_ms
        return self.verify_ms(1) + self.queue_ms

    def speculative_rate(self, accept: float | Sequence[float], k: int) -> float:
        """Committed tokens per second at draft length `k`; `accept` is a single alpha or the
        per-position acceptance probabilities (at least k of them)."""
        if isinstance(accept, Sequence):
            tokens = expected_tokens_per_position(accept, k)
            # h(k): all k accepted, and p_{k+1} (the last probability given when absent)
            p_next = accept[k] if len(accept) > k else (accept[-1] if accept else 1.0)
            hit = math.prod(accept[:k]) * p_next
        else:
            tokens = expected_tokens(accept, k)
            hit = accept ** (k + 1)
        return 1e3 * tokens / max(self.expected_round_ms(k, min(max(hit, 0.0), 1.0)), 1e-9)

    def cloud_rate(self) -> float:
        """Tokens per second when the cloud decodes alone."""
        return 1e3 / max(self.cloud_ms_per_token(), 1e-9)


def _rates(cost: CostModel, accept_probs: Sequence[float], k_min: int, k_max: int) -> list[float]:
    """Tokens per second for k = k_min..k_max, E(k) accumulated in one pass (unchecked input).
    A pipelined cost model also reads p_{k+1} (accept_probs[k], the last one when absent)."""
    rates = []
    tokens, reach = 1.0, 1.0
    n = len(accept_probs)
    for k in range(1, k_max + 1):
        reach *= accept_probs[k - 1]
        tokens += reach
        if k >= k_min:
            if cost.pipelined:
                hit = reach * accept_probs[min(k, n - 1)]
                time_ms = cost.expected_round_ms(k, min(hit, 1.0))
            else:
                time_ms = cost.round_ms(k)
            rates.append(1e3 * tokens / max(time_ms, 1e-9))
    return rates


def best_k(
    cost: CostModel, accept: float | Sequence[float], k_min: int = 1, k_max: int = 16
) -> int:
    """The k in [k_min, k_max] maximising E(k) / T(k) (the smallest such k on a tie); `accept` is
    one alpha for every position or the per-position probabilities (at least k_max of them)."""
    k_min = _check_int("k_min", k_min, 1, K_LIMIT)
    k_max = _check_int("k_max", k_max, k_min, K_LIMIT)
    if isinstance(accept, Sequence):
        if len(accept) < k_max:
            raise ValueError(
                f"accept must hold at least k_max={k_max} probabilities, got {len(accept)}"
            )
        probs = [_check_prob(f"accept[{i}]", p) for i, p in enumerate(accept[:k_max])]
    else:
        probs = [_check_prob("accept", accept)] * k_max
    rates = _rates(cost, probs, k_min, k_max)
    return k_min + max(range(len(rates)), key=rates.__getitem__)


# ---------------------------------------------------------------------------------------------
# what crosses the policy boundary


@dataclass(frozen=True)
class RoundObservation:
    """What the edge measured for one round (or one cloud-only step), fed to `observe`.

    Speculative round: `k` >= 1 draft tokens, `accepted` of them accepted; it commits
    accepted + 1 tokens. `network_ms` is the round's wall time from sending the block to receiving
    the verdict, less `verify_ms` and `queue_ms` (both reported by the verifier), i.e. the RTT plus
    serialisation.

    Cloud-only step: `cloud_only=True`, k = accepted = 0, `tokens` >= 1 streamed tokens;
    `verify_ms` is the verifier's compute for all of them, `queue_ms` their total wait, and
    `network_ms` whatever wall time the compute does not explain (about one RTT for the first step
    of a stream, about 0 after).
    """

    k: int  # draft tokens in the block (0 for a cloud-only step)
    accepted: int  # draft tokens accepted, 0..k
    draft_ms: float  # edge time spent drafting the whole block
    verify_ms: float  # verifier compute for the round
    network_ms: float  # round wall - verify - queue
    queue_ms: float = 0.0  # time the block waited at the verifier before its forward
    cloud_only: bool = False  # this was a cloud-only decode step, not a speculative round
    tokens: int | None = None  # tokens committed; None => accepted + 1 (speculative) or 1

    def __post_init__(self) -> None:
        if not isinstance(self.cloud_only, bool):
            raise ValueError(f"cloud_only must be a bool, got {self.cloud_only!r}")
        for name in ("draft_ms", "verify_ms", "network_ms", "queue_ms"):
            object.__setattr__(self, name, _check_ms(name, getattr(self, name)))
        if self.cloud_only:
            _check_int("k", self.k, 0, 0)
            _check_int("accepted", self.accepted, 0, 0)
            tokens = 1 if self.tokens is None else _check_int("tokens", self.tokens, 1)
        else:
            k = _check_int("k", self.k, 1, K_LIMIT)
            accepted = _check_int("accepted", self.accepted, 0, k)
            tokens = accepted + 1
            if self.tokens is not None and self.tokens != tokens:
                raise ValueError(
                    f"tokens must equal accepted + 1 = {tokens} for a speculative round, "
                    f"got {self.tokens!r}"
                )
        object.__setattr__(self, "tokens", tokens)


@dataclass(frozen=True)
class Decision:
    """What the edge does next.

    `speculative`: draft `k` >= 1 tokens and send them for verification. `cloud_only`: ask the
    verifier to decode `stream_tokens` tokens on its own and stream them (k = 0), then ask again.
    `probe` marks an exploration round (a k or a mode other than the one the policy currently
    judges best, chosen to keep its estimates fresh); it is reported, never required to be acted
    on differently.
    """

    mode: Mode
    k: int
    stream_tokens: int = 0  # cloud_only: tokens to stream before asking again; else 0
    probe: bool = False

    def __post_init__(self) -> None:
        if self.mode == SPECULATIVE:
            _check_int("k", self.k, 1, K_LIMIT)
            _check_int("stream_tokens", self.stream_tokens, 0, 0)
        elif self.mode == CLOUD_ONLY:
            _check_int("k", self.k, 0, 0)
            _check_int("stream_tokens", self.stream_tokens, 1)
        else:
            raise ValueError(f"mode must be 'speculative' or 'cloud_only', got {self.mode!r}")
        if not isinstance(self.probe, bool):
            raise ValueError(f"probe must be a bool, got {self.probe!r}")


@runtime_checkable
class DraftLengthPolicy(Protocol):
    """Per session: `choose` before each round, `observe` once its verdict is in.

    `observe` takes any round, including one the policy did not choose (e.g. a block drafted
    ahead); policies never assume the two calls alternate.
    """

    def choose(self) -> Decision: ...

    def observe(self, obs: RoundObservation) -> None: ...


# ---------------------------------------------------------------------------------------------
# baseline policies


class FixedPolicy:
    """Always drafts `k` tokens; ignores what it observes."""

    def __init__(self, k: int = 4) -> None:
        self.k = _check_int("k", k, 1, K_LIMIT)

    def choose(self) -> Decision:
        return Decision(SPECULATIVE, self.k)

    def observe(self, obs: RoundObservation) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedPolicy(k={self.k})"


class HeuristicPolicy:
    """The acceptance heuristic: k += 2 after a block accepted whole, k -= 1 after any rejection,
    within [k_min, k_max]. It reacts to acceptance only and never sees the link."""

    def __init__(self, k0: int = 4, k_min: int = 1, k_max: int = 16) -> None:
        self.k_min = _check_int("k_min", k_min, 1, K_LIMIT)
        self.k_max = _check_int("k_max", k_max, self.k_min, K_LIMIT)
        self.k = _check_int("k0", k0, self.k_min, self.k_max)

    def choose(self) -> Decision:
        return Decision(SPECULATIVE, self.k)

    def observe(self, obs: RoundObservation) -> None:
        if obs.cloud_only:
            return
        if obs.accepted == obs.k:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)

    def __repr__(self) -> str:
        return f"HeuristicPolicy(k={self.k}, k_min={self.k_min}, k_max={self.k_max})"


STREAM_ALL = 1 << 20  # CloudOnlyPolicy's default chunk: more than any generation, i.e. one stream


class CloudOnlyPolicy:
    """The cloud-only baseline: the verifier decodes alone and streams, `stream_tokens` tokens per
    request (the edge clips a chunk to the tokens left, so the default is one stream for the
    whole generation, paying one RTT). Drafts nothing; ignores what it observes."""

    def __init__(self, stream_tokens: int = STREAM_ALL) -> None:
        self.stream_tokens = _check_int("stream_tokens", stream_tokens, 1)

    def choose(self) -> Decision:
        return Decision(CLOUD_ONLY, 0, stream_tokens=self.stream_tokens)

    def observe(self, obs: RoundObservation) -> None:
        pass

    def __repr__(self) -> str:
        return f"CloudOnlyPolicy(stream_tokens={self.stream_tokens})"


# ---------------------------------------------------------------------------------------------
# estimators


class _RunDetector:
    """Flags a level shift: `rounds` consecutive surprises on the same side."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.side = 0
        self.count = 0

    def push(self, side: int) -> bool:
        """`side` is +1 (surprisingly high), -1 (low) or 0; True when a shift is confirmed."""
        if side == 0:
            self.side, self.count = 0, 0
            return False
        if side == self.side:
            self.count += 1
        else:
            self.side, self.count = side, 1
        if self.count >= self.rounds:
            self.side, self.count = 0, 0
            return True
        return False

    @property
    def pending(self) -> bool:
        """A run of surprises has started and not yet been confirmed or broken."""
        return self.count > 0

    def clear(self) -> None:
        self.side, self.count = 0, 0


class _RobustLevel:
    """Robust online level of a noisy timing, quick to follow a persistent shift.

    Huber-style EWMA: a sample within `threshold` deviations moves the level by `gain` times its
    residual; a farther one moves it as if it were exactly `threshold` deviations away, so one
    spike barely registers. The deviation is an EWMA of clipped absolute residuals (like TCP's
    RTTVAR), floored at `rel_floor` of the level so a perfectly steady signal does not make every
    wobble an outlier. `shift_rounds` consecutive outliers on the same side are a level shift: the
    level jumps to their median.
    """

    def __init__(
        self, gain: float, threshold: float, shift_rounds: int, rel_floor: float = 0.03
    ) -> None:
        self.gain = gain
        self.threshold = threshold
        self.rel_floor = rel_floor
        self.value: float | None = None
        self.dev = 0.0
        self.shifts = 0  # level shifts detected so far
        self._detector = _RunDetector(shift_rounds)
        self._run: list[float] = []

    def _scale(self) -> float:
        assert self.value is not None
        return max(self.dev, self.rel_floor * abs(self.value), 1e-3)

    @property
    def pending(self) -> bool:
        return self._detector.pending

    def update(self, x: float) -> bool:
        """Add one sample; True when it completed a level shift."""
        if self.value is None:
            self.value = x
            self.dev = 0.1 * abs(x)  # a guess, corrected by the next samples
            return False
        residual = x - self.value
        limit = self.threshold * self._scale()
        side = 0 if abs(residual) <= limit else (1 if residual > 0 else -1)
        if side != self._detector.side:
            self._run = []
        if side:
            self._run.append(x)
        if self._detector.push(side):
            new = statistics.median(self._run)
            spread = statistics.fmean(abs(v - new) for v in self._run)
            self.value, self.dev = new, max(self.dev, spread)
            self._run = []
            self.shifts += 1
            return True
        clipped = max(-limit, min(limit, residual))
        self.value += self.gain * clipped
        self.dev += self.gain * (abs(clipped) - self.dev)
        return False

    def settled(self) -> _RobustLevel:
        """A copy with no shift pending (what a new session starts from)."""
        out = copy.deepcopy(self)
        out._detector.clear()
        out._run = []
        return out


class _AffineFit:
    """y = a + b*x by exponentially forgotten least squares, with a small ridge prior pulling b
    towards `b_prior` so the slope stays defined while x barely varies (k held steady), and a and
    b clamped at >= 0. Residual outliers are clipped (Huber) and a run of them on one side is a
    shift: most of the old data is forgotten so the fit re-converges in a few rounds."""

    def __init__(
        self,
        decay: float,
        gain: float,
        threshold: float,
        shift_rounds: int,
        ridge: float = 1.0,
        b_prior: float = 0.0,
    ) -> None:
        self.decay = decay
        self.gain = gain
        self.threshold = threshold
        self.ridge = ridge
        self.b_prior = b_prior
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.a = self.b = 0.0
        self.dev = 0.0
        self.shifts = 0
        self._detector = _RunDetector(shift_rounds)

    @property
    def has_data(self) -> bool:
        return self.w > 0.0

    @property
    def pending(self) -> bool:
        return self._detector.pending

    def predict(self, x: float) -> float:
        return self.a + self.b * x

    def update(self, x: float, y: float) -> None:
        if self.has_data:
            residual = y - self.predict(x)
            limit = self.threshold * max(self.dev, 0.03 * abs(self.predict(x)), 1e-3)
            side = 0 if abs(residual) <= limit else (1 if residual > 0 else -1)
            if self._detector.push(side):
                self._scale_stats(0.05)
                self.shifts += 1
            elif side:
                y = self.predict(x) + side * limit
                residual = side * limit
            self.dev += self.gain * (min(abs(residual), limit) - self.dev)
        else:
            self.dev = 0.1 * abs(y)
        self._scale_stats(self.decay)
        self.w += 1.0
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y
        self._solve()

    def settled(self) -> _AffineFit:
        """A copy with no shift pending (what a new session starts from)."""
        out = copy.deepcopy(self)
        out._detector.clear()
        return out

    def _scale_stats(self, factor: float) -> None:
        self.w *= factor
        self.sx *= factor
        self.sy *= factor
        self.sxx *= factor
        self.sxy *= factor

    def _solve(self) -> None:
        # normal equations of sum w (y - a - b x)^2 + ridge (b - b_prior)^2
        sxx = self.sxx + self.ridge
        sxy = self.sxy + self.ridge * self.b_prior
        det = self.w * sxx - self.sx * self.sx
        a = (self.sy * sxx - self.sx * sxy) / det
        b = (self.w * sxy - self.sx * self.sy) / det
        if b < 0.0:
            a, b = self.sy / self.w, 0.0
        if a < 0.0:
            a, b = 0.0, max(0.0, sxy / sxx)
        self.a, self.b = a, b


class _Counts:
    """Exponentially forgotten per-position counts: reached[i], accepted[i] for position i+1."""

    def __init__(self) -> None:
        self.reached: list[float] = []
        self.accepted: list[float] = []

    def copy(self) -> _Counts:
        out = _Counts()
        out.reached, out.accepted = list(self.reached), list(self.accepted)
        return out

    def add(self, k: int, accepted: int, decay: float = 1.0) -> None:
        """A round drafting k and accepting m reached positions 1..min(m+1, k), accepted 1..m;
        older counts are first multiplied by `decay`."""
        if decay != 1.0:
            self.scale(decay)
        reached = min(accepted + 1, k)
        grow = reached - len(self.reached)
        if grow > 0:
            self.reached.extend([0.0] * grow)
            self.accepted.extend([0.0] * grow)
        for i in range(reached):
            self.reached[i] += 1.0
        for i in range(accepted):
            self.accepted[i] += 1.0

    def totals(self) -> tuple[float, float]:
        return sum(self.reached), sum(self.accepted)

    def scale(self, factor: float) -> None:
        self.reached = [v * factor for v in self.reached]
        self.accepted = [v * factor for v in self.accepted]


def _bernoulli_g(n: float, s: float, p: float) -> float:
    """Likelihood-ratio statistic (G, ~chi-square with 1 dof) of s successes in n trials against
    rate p; 0 when there are no trials."""
    if n <= 0.0:
        return 0.0
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    g = 0.0
    if s > 0.0:
        g += s * math.log(s / (n * p))
    if n - s > 0.0:
        g += (n - s) * math.log((n - s) / (n * (1.0 - p)))
    return 2.0 * g


class _AcceptanceEstimator:
    """P(accept position i | reached i), i = 1.., from exponentially forgotten counts.

    Position i's estimate is (accepted_i + w * prior_i) / (reached_i + w): a Beta prior of weight
    w = `position_weight`. For position 1 it is centred on the pooled rate over all positions,
    (accepted + w0 * alpha_prior) / (reached + w0); for positions >= 2 on the pooled rate of
    positions >= 2 (the *continuation* rate). Rarely reached positions, and those never reached,
    thus fall back to the continuation rate: position 1 is the one that differs most (it is the
    only one not conditioned on an acceptance just before it), and mixing it into the prior of the
    deep positions would drag their extrapolation towards it.

    Shifts (acceptance collapsing on a new kind of text, or coming back) are found by a
    generalised likelihood-ratio test. The last `SHIFT_WINDOW` rounds are held apart from the
    older counts (the estimate uses both): for every m, the successes of the last m rounds are
    tested against what the older counts expect of the positions those rounds reached (G
    statistic, chi-square with 1 dof, scaled by n_older / (n_older + n) for the older estimate's
    own uncertainty; lumping the positions into one binomial is conservative). If the largest G
    exceeds `shift_g`, the counts are rebuilt from those m rounds alone, the best guess of what
    came after the change. Testing against the older counts only matters: tested against an
    estimate that absorbs each new round, a shift chases itself and is never called.
    """

    SHIFT_WINDOW = 16  # recent rounds kept apart and searched for a change point
    # a shift needs this many positions reached after it: G is anti-conservative on a handful of
    # trials at extreme rates (4 rejections in a row at p = 0.9 would already count)
    SHIFT_MIN_TRIALS = 8

    def __init__(
        self,
        alpha_prior: float,
        alpha_weight: float,
        position_weight: float,
        decay: float,
        shift_g: float,
    ) -> None:
        self.alpha_prior = alpha_prior
        self.alpha_weight = alpha_weight
        self.position_weight = position_weight
        self.decay = decay
        self.shift_g = shift_g
        self.older = _Counts()  # rounds that have left the window, forgotten by `decay`
        self.recent: deque[tuple[int, int]] = deque()  # (k, accepted), oldest first
        self.g = 0.0  # largest G of the last update
        self.shifts = 0

    def _counts(self) -> _Counts:
        counts = self.older.copy()
        for k, accepted in self.recent:
            counts.add(k, accepted)
        return counts

    @property
    def trials(self) -> float:
        """Forgotten count of positions reached: the weight of evidence behind the estimate."""
        return self._counts().totals()[0]

    def pooled(self) -> float:
        """Acceptance rate over all positions (the alpha of the i.i.d. model)."""
        return self._pooled(self._counts())

    def probs(self, k: int) -> list[float]:
        """Estimated acceptance probabilities of positions 1..k."""
        return self._probs(self._counts(), k)

    def _pooled(self, counts: _Counts) -> float:
        n, s = counts.totals()
        return (s + self.alpha_weight * self.alpha_prior) / (n + self.alpha_weight)

    def _probs(self, counts: _Counts, k: int) -> list[float]:
        pooled = self._pooled(counts)
        # continuation rate: positions >= 2, shrunk towards the pooled rate
        later_n, later_s = sum(counts.reached[1:]), sum(counts.accepted[1:])
        later = (later_s + self.alpha_weight * pooled) / (later_n + self.alpha_weight)
        w = self.position_weight
        out = []
        for i in range(k):
            prior = pooled if i == 0 else later
            if i < len(counts.reached):
                out.append((counts.accepted[i] + w * prior) / (counts.reached[i] + w))
            else:
                out.append(prior)
        return out

    def upper(self, k: int) -> list[float]:
        """`probs(k)` raised by one standard error of the pooled rate: an optimistic estimate."""
        counts = self._counts()
        n = counts.totals()[0] + self.alpha_weight
        pooled = self._pooled(counts)
        up = math.sqrt(pooled * (1.0 - pooled) / n)
        return [min(p + up, 1.0) for p in self._probs(counts, k)]

    @property
    def pending(self) -> bool:
        """The recent rounds disagree with the estimate, though not yet enough to call a shift."""
        return self.g > self.shift_g / 4.0

    def settled(self, max_trials: float) -> _AcceptanceEstimator:
        """A copy for a new session: every round in the older counts, scaled down to at most
        `max_trials` positions reached (so the new session's own rounds can overrule what earlier
        sessions saw, on a text of another kind), no shift pending."""
        out = copy.deepcopy(self)
        counts = out._counts()
        n = counts.totals()[0]
        if n > max_trials:
            counts.scale(max_trials / n)
        out.older, out.recent, out.g = counts, deque(), 0.0
        return out

    def update(self, k: int, accepted: int) -> None:
        if len(self.recent) == self.SHIFT_WINDOW:
            self.older.add(*self.recent.popleft(), decay=self.decay)
        self.recent.append((k, accepted))
        expect = self._probs(self.older, max(km for km, _ in self.recent))
        n_older = self.older.totals()[0] + self.alpha_weight
        n = s = expected = 0.0
        self.g, since = 0.0, 0
        for m, (km, am) in enumerate(reversed(self.recent), 1):
            reached = min(am + 1, km)
            n += reached
            s += am
            expected += sum(expect[:reached])
            # the older estimate is uncertain too: the variance of a difference of two rates
            # scales the statistic by n_older / (n_older + n)
            g = _bernoulli_g(n, s, expected / n) * n_older / (n_older + n)
            if g > self.g and n >= self.SHIFT_MIN_TRIALS:
                self.g, since = g, m
        if self.g > self.shift_g:
            self.older, kept = _Counts(), list(self.recent)[-since:]
            for km, am in kept:
                self.older.add(km, am)
            self.recent.clear()
            self.g = 0.0
            self.shifts += 1
            logger.info("acceptance shifted to %.2f (last %d rounds)", self.pooled(), since)


# ---------------------------------------------------------------------------------------------
# the adaptive policy


@dataclass(frozen=True)
class AdaptiveConfig:
    """Knobs of `AdaptivePolicy`. The defaults suit RTTs of 5-200 ms and rounds of tens of ms;
    every field is validated on construction (`ValueError` naming it)."""

    k_min: int = 1  # shortest block drafted, >= 1
    k_max: int = 16  # longest block drafted, k_min..256
    k_init: int | None = None  # k before any observation; None => 4 clipped to [k_min, k_max]
    warmup_rounds: int = 4  # speculative rounds at k_init before k follows the estimates
    cloud_warmup_rounds: int = 6  # speculative rounds before cloud-only may be chosen (the
    # t_v(n) fit and RTT estimate are usable by then; the switch still needs a clear win)
    alpha_prior: float = 0.6  # prior acceptance rate, in (0, 1)
    alpha_prior_weight: float = 2.0  # pseudo-trials behind alpha_prior in the pooled rate, > 0
    position_prior_weight: float = 12.0  # pseudo-trials pulling each position to the pooled rate
    # (position 1) or the pooled rate of positions >= 2 (the others); > 0
    acceptance_decay: float = 0.99  # per-round forgetting of acceptance counts, in (0, 1]
    timing_gain: float = 0.1  # EWMA gain of the timing levels (t_d, RTT, queue), in (0, 1]
    verify_decay: float = 0.99  # per-round forgetting of the t_v(n) fit, in (0, 1]
    shift_threshold: float = 3.0  # a sample this many deviations off is an outlier
    shift_rounds: int = 3  # consecutive same-side outliers that make a level shift
    acceptance_shift_g: float = 20.0  # G statistic (chi-square, 1 dof) of a shift in acceptance
    k_hysteresis: float = 0.02  # k moves only if the best k's predicted rate beats it by this
    mode_hysteresis: float = 0.05  # likewise for switching between speculative and cloud-only
    explore_every: int = 8  # every N-th speculative round probes k/2, k+1, k-1, k+1; 0 => never
    allow_cloud_only: bool = True  # may fall back to cloud-only decoding
    cloud_chunk_tokens: int = 8  # tokens per cloud-only step
    cloud_probe_every: int = 8  # cloud-only steps between speculative probes
    cloud_probe_k: int = 4  # probes from cloud-only mode draft at least this many (to learn alpha)
    pipelined: bool = False  # the edge drafts ahead while verdicts travel: use T_pipe(k)
    memory_trials: float = 48.0  # a session started from `PolicyMemory` carries at most this
    # many acceptance trials over (> 0): enough to decide from the first round, few enough that
    # its own rounds overrule them within a few dozen positions

    def __post_init__(self) -> None:
        k_min = _check_int("k_min", self.k_min, 1, K_LIMIT)
        k_max = _check_int("k_max", self.k_max, k_min, K_LIMIT)
        if self.k_init is None:
            object.__setattr__(self, "k_init", min(max(4, k_min), k_max))
        else:
            _check_int("k_init", self.k_init, k_min, k_max)
        _check_int("warmup_rounds", self.warmup_rounds, 0)
        _check_int("cloud_warmup_rounds", self.cloud_warmup_rounds, 0)
        _check_float("alpha_prior", self.alpha_prior, lambda v: 0.0 < v < 1.0, "in (0, 1)")
        for name in ("alpha_prior_weight", "position_prior_weight"):
            _check_float(name, getattr(self, name), lambda v: v > 0.0, "> 0")
        for name in ("acceptance_decay", "timing_gain", "verify_decay"):
            _check_float(name, getattr(self, name), lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _check_float("shift_threshold", self.shift_threshold, lambda v: v > 0.0, "> 0")
        _check_int("shift_rounds", self.shift_rounds, 1)
        _check_float("acceptance_shift_g", self.acceptance_shift_g, lambda v: v > 0.0, "> 0")
        for name in ("k_hysteresis", "mode_hysteresis"):
            _check_float(name, getattr(self, name), lambda v: v >= 0.0, ">= 0")
        if self.explore_every != 0:
            _check_int("explore_every", self.explore_every, 2)
        if not isinstance(self.allow_cloud_only, bool):
            raise ValueError(f"allow_cloud_only must be a bool, got {self.allow_cloud_only!r}")
        _check_int("cloud_chunk_tokens", self.cloud_chunk_tokens, 1)
        _check_int("cloud_probe_every", self.cloud_probe_every, 1)
        _check_int("cloud_probe_k", self.cloud_probe_k, 1, K_LIMIT)
        if not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be a bool, got {self.pipelined!r}")
        _check_float("memory_trials", self.memory_trials, lambda v: v > 0.0, "> 0")


@dataclass(frozen=True)
class PolicyMemory:
    """What an `AdaptivePolicy` learnt of a link (acceptance per position, t_d, RTT, t_v(n),
    queue, cloud-only token time) and where it ended (mode, k): the start of the next session on
    the same link. Opaque: made by `AdaptivePolicy.memory()`, consumed by `AdaptivePolicy(config,
    memory)`; the estimators inside are private copies, never shared between sessions."""

    accept: _AcceptanceEstimator
    draft: _RobustLevel
    rtt: _RobustLevel
    verify: _AffineFit
    queue: float | None
    cloud_offset: _RobustLevel
    mode: Mode
    k: int
    speculative_rounds: int  # speculative rounds behind the estimates, over all sessions
    cloud_only_steps: int

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


@dataclass(frozen=True)
class Estimates:
    """A snapshot of `AdaptivePolicy`'s beliefs, for logs and experiment records."""

    accept_probs: tuple[float, ...]  # P(accept position i | reached i), i = 1..k_max
    alpha: float  # pooled acceptance rate
    cost: CostModel  # estimated timings (cloud_token_ms set: the cloud-only estimate)
    speculative_rounds: int  # rounds observed
    cloud_only_steps: int  # cloud-only steps observed
    level_shifts: int  # shifts detected by any estimator (acceptance, t_d, RTT, t_v)


_PROBE_CYCLE = (0, 1, -1, 1)  # exploration steps around k; 0 => k/2 (see _probe_k)
# acceptance estimates resting on fewer trials than this are probed more often in cloud-only mode
_CONFIDENT_TRIALS = 32.0


class AdaptivePolicy:
    """Picks the k maximising estimated E(k)/T(k), or cloud-only when that is faster.

    Per `choose`: for the first `warmup_rounds` observed rounds k stays at `k_init`; afterwards
    the best k under the current estimates replaces the current one only if its predicted rate is
    higher by `k_hysteresis`. After `cloud_warmup_rounds` rounds the mode may switch, when the
    other mode's predicted rate is higher by `mode_hysteresis`; to leave speculative decoding,
    cloud-only must also beat it under an acceptance one standard error higher.

    Exploration is scheduled, so deterministic. Speculative mode: every `explore_every`-th round
    is a probe at k/2, k+1, k-1, k+1 in turn (the neighbours show the acceptance one position past
    k; the far probe keeps the t_v(n) slope identified). Cloud-only mode: every
    `cloud_probe_every`-th step is one speculative round at max(k, `cloud_probe_k`), every other
    step while the acceptance estimate rests on few trials, and straight away again while an
    estimator has a shift pending, so that a return of good conditions is confirmed within a few
    probes (fast probing only while the optimistic speculative rate could beat cloud-only).
    Probes are marked `Decision.probe`.

    Observations: a speculative round updates every estimate; a cloud-only step only the cloud
    per-token time (its `network_ms` is the stream's first-token latency or ~0, not an RTT
    sample). `observe_rtt` takes RTT samples from elsewhere (a session's open, pings).

    Warm start: given a usable `PolicyMemory` (what an earlier session on the same link learnt)
    the policy starts from its estimates (acceptance capped at `memory_trials` trials), its mode
    and its k, and decides from the first round: no warm-up, no cloud warm-up. Short generations
    are where this matters: a 64-token generation has ~20 rounds, fewer than the estimates need to
    settle, and at long RTTs a single speculative round costs more than cloud-only could gain.
    """

    def __init__(
        self, config: AdaptiveConfig | None = None, memory: PolicyMemory | None = None
    ) -> None:
        self.config = config if config is not None else AdaptiveConfig()
        c = self.config
        if memory is not None and not isinstance(memory, PolicyMemory):
            raise ValueError(f"memory must be a PolicyMemory or None, got {type(memory).__name__}")
        self._accept = _AcceptanceEstimator(
            c.alpha_prior,
            c.alpha_prior_weight,
            c.position_prior_weight,
            c.acceptance_decay,
            c.acceptance_shift_g,
        )
        self._draft = _RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._rtt = _RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._verify = _AffineFit(c.verify_decay, c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._queue: float | None = None  # plain EWMA: the mean wait is what costs throughput
        # cloud-only time per token, as an offset over the speculative side's t_v(1) + queue so
        # that it follows the verifier's load seen through the probes
        self._cloud_offset = _RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._k = c.k_init
        self._mode: Mode = SPECULATIVE
        self._spec_rounds = 0
        self._cloud_steps_seen = 0
        self._since_explore = 0
        self._probes = 0  # exploration probes issued, indexes _PROBE_CYCLE
        self._cloud_steps = 0  # cloud-only steps since the last probe
        self._shadow_tail: list[bool] = []  # matches of a shadow round still open
        self._shadow_rounds = 0  # shadow rounds counted (observe_shadow)
        self._rtt_samples = 0  # RTT samples from outside rounds (observe_rtt)
        self._fresh = (0, 0)  # (shadow rounds, RTT samples) when the last probe was chosen
        self._warm = memory is not None and memory.usable
        if memory is not None:
            # whatever was learnt is a better start than the priors; but without a verifier-time
            # fit and an RTT there is nothing to decide from yet: warm-up as usual
            self._accept = memory.accept.settled(c.memory_trials)
            self._accept.decay = c.acceptance_decay
            self._draft, self._rtt = memory.draft.settled(), memory.rtt.settled()
            self._verify = memory.verify.settled()
            self._queue = memory.queue
            self._cloud_offset = memory.cloud_offset.settled()
        if self._warm:
            assert memory is not None
            self._k = min(max(memory.k, c.k_min), c.k_max)
            self._mode = memory.mode if c.allow_cloud_only else SPECULATIVE
            self._spec_rounds = memory.speculative_rounds
            self._cloud_steps_seen = memory.cloud_only_steps

    @property
    def warm(self) -> bool:
        """Started from a usable `PolicyMemory`."""
        return self._warm

    def memory(self) -> PolicyMemory:
        """A snapshot of what this policy has learnt, for the next session on the same link."""
        return PolicyMemory(
            accept=copy.deepcopy(self._accept),
            draft=copy.deepcopy(self._draft),
            rtt=copy.deepcopy(self._rtt),
            verify=copy.deepcopy(self._verify),
            queue=self._queue,
            cloud_offset=copy.deepcopy(self._cloud_offset),
            mode=self._mode,
            k=self._k,
            speculative_rounds=self._spec_rounds,
            cloud_only_steps=self._cloud_steps_seen,
        )

    # -- estimates ------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        """The draft length the policy currently judges best (probes aside)."""
        return self._k

    @property
    def mode(self) -> Mode:
        return self._mode

    def _cost(self) -> CostModel | None:
        if not (self._verify.has_data and self._rtt.value is not None):
            return None
        spec = CostModel(
            draft_ms=max(self._draft.value or 0.0, 0.0),
            rtt_ms=max(self._rtt.value, 0.0),
            verify_base_ms=self._verify.a,
            verify_per_token_ms=self._verify.b,
            queue_ms=self._queue or 0.0,
            pipelined=self.config.pipelined,
        )
        cloud = spec.cloud_ms_per_token() + (self._cloud_offset.value or 0.0)
        return replace(spec, cloud_token_ms=max(cloud, 1e-3))

    def estimates(self) -> Estimates | None:
        """Current beliefs; None until a speculative round has been observed."""
        cost = self._cost()
        if cost is None:
            return None
        return Estimates(
            accept_probs=tuple(self._accept.probs(self.config.k_max)),
            alpha=self._accept.pooled(),
            cost=cost,
            speculative_rounds=self._spec_rounds,
            cloud_only_steps=self._cloud_steps_seen,
            level_shifts=self._accept.shifts
            + self._draft.shifts
            + self._rtt.shifts
            + self._verify.shifts,
        )

    def _spec_surprised(self) -> bool:
        return (
            self._accept.pending or self._draft.pending or self._rtt.pending or self._verify.pending
        )

    # -- the protocol ---------------------------------------------------------------------------

    def observe(self, obs: RoundObservation) -> None:
        if obs.cloud_only:
            self._cloud_steps_seen += 1
            cost = self._cost()
            if cost is not None:  # before any speculative round there is nothing to offset
                per_token = (obs.verify_ms + obs.queue_ms) / obs.tokens
                if self._cloud_offset.update(per_token - cost.verify_ms(1) - cost.queue_ms):
                    logger.info("cloud-only token time shifted to %.2f ms", per_token)
            return
        self._spec_rounds += 1
        self._shadow_tail = []  # a real round in between: the open shadow round is not contiguous
        self._accept.update(obs.k, obs.accepted)
        if self._draft.update(obs.draft_ms / obs.k):
            logger.info("draft time shifted to %.2f ms/token", self._draft.value)
        self._verify.update(obs.k + 1, obs.verify_ms)
        if self._rtt.update(obs.network_ms):
            logger.info("RTT shifted to %.1f ms", self._rtt.value)
        g = self.config.timing_gain
        self._queue = (
            obs.queue_ms if self._queue is None else self._queue + g * (obs.queue_ms - self._queue)
        )

    def observe_shadow(self, matches: Sequence[bool]) -> None:
        """Acceptance outcomes seen without rounds: for consecutive committed tokens, whether
        the draft would have proposed each (greedy: `Drafter.shadow_matches`). They are cut into
        the rounds the current k would have made (a round accepts the run of matches from its
        first position, up to k, and the next round starts after its bonus token) and counted like
        real ones; an unfinished round carries over to the next call. Only the acceptance
        estimate learns from them; cloud-only mode then needs its probes for nothing but the
        timings, and skips them while RTT samples arrive too (`observe_rtt`)."""
        k = self._cloud_probe_k() if self._mode == CLOUD_ONLY else self._k
        seq = self._shadow_tail + [bool(m) for m in matches]
        i = 0
        while True:
            run = 0
            while run < k and i + run < len(seq) and seq[i + run]:
                run += 1
            if run < k and i + run >= len(seq):
                break  # the round's end is not committed yet
            self._accept.update(k, run)
            self._shadow_rounds += 1
            i += run + 1  # accepted tokens, then the bonus token (no draft position)
            if i >= len(seq):
                break
        self._shadow_tail = seq[i:]

    def observe_rtt(self, rtt_ms: float) -> None:
        """An RTT measured outside a round (e.g. a keepalive ping): keeps the RTT estimate current
        while the session decodes cloud-only."""
        self._rtt_samples += 1
        if self._rtt.update(_check_ms("rtt_ms", rtt_ms)):
            logger.info("RTT shifted to %.1f ms", self._rtt.value)

    def choose(self) -> Decision:
        c = self.config
        cost = self._cost()
        if cost is None or (not self._warm and self._spec_rounds < c.warmup_rounds):
            return Decision(SPECULATIVE, self._k)

        accept = self._accept.probs(c.k_max + 1)  # p_{k_max+1}: the pipelined hit rate
        ks = range(c.k_min, c.k_max + 1)
        rates = dict(zip(ks, _rates(cost, accept, c.k_min, c.k_max), strict=True))
        k_best = max(rates, key=rates.__getitem__)
        if rates[k_best] > rates[self._k] * (1.0 + c.k_hysteresis):
            logger.debug(
                "k %d -> %d (%.1f -> %.1f tok/s)", self._k, k_best, rates[self._k], rates[k_best]
            )
            self._k = k_best
        spec_rate, cloud_rate = rates[self._k], self._cloud_mode_rate(cost, accept)

        if c.allow_cloud_only and (self._warm or self._spec_rounds >= c.cloud_warmup_rounds):
            # Leaving speculative decoding is judged on an optimistic acceptance (one standard
            # error up): speculative rounds are where the evidence comes from, so thin evidence
            # (early on, or just after a shift) keeps the session there until it is conclusive.
            if self._mode == SPECULATIVE and cloud_rate > spec_rate * (1.0 + c.mode_hysteresis):
                hopeful = self._hopeful_rate(cost)
                if cloud_rate > hopeful:
                    logger.info("to cloud-only: %.1f > %.1f tok/s", cloud_rate, hopeful)
                    self._mode, self._cloud_steps = CLOUD_ONLY, 0
            elif self._mode == CLOUD_ONLY and spec_rate > cloud_rate * (1.0 + c.mode_hysteresis):
                logger.info(
                    "to speculative (k=%d): %.1f > %.1f tok/s", self._k, spec_rate, cloud_rate
                )
                self._mode, self._since_explore = SPECULATIVE, 0

        if self._mode == CLOUD_ONLY:
            every = c.cloud_probe_every
            if self._accept.trials < _CONFIDENT_TRIALS and self._hopeful_rate(cost) > cloud_rate:
                # thin evidence (counts just rebuilt after a shift) that could still favour
                # speculating: firm it up quickly (when even the optimistic rate loses, the
                # probes would only cost round trips)
                every = min(every, 2)
            # Shadow acceptance and RTT samples since the last probe keep the estimates a probe
            # would refresh current (t_d and t_v change with the hardware's load, not the text
            # or the link): then the probe would only cost a round trip.
            if self._cloud_steps >= every or self._spec_surprised():
                informed = (
                    self._shadow_rounds > self._fresh[0] and self._rtt_samples > self._fresh[1]
                )
                self._cloud_steps = 0
                self._fresh = (self._shadow_rounds, self._rtt_samples)
                if not informed:
                    return Decision(SPECULATIVE, self._cloud_probe_k(), probe=True)
            self._cloud_steps += 1
            return Decision(CLOUD_ONLY, 0, stream_tokens=c.cloud_chunk_tokens)

        self._since_explore += 1
        if c.explore_every and self._since_explore >= c.explore_every:
            self._since_explore = 0
            k = self._probe_k()
            if k != self._k:
                return Decision(SPECULATIVE, k, probe=True)
        return Decision(SPECULATIVE, self._k)

    def _hopeful_rate(self, cost: CostModel) -> float:
        """The best speculative rate under an acceptance one standard error higher."""
        c = self.config
        return max(_rates(cost, self._accept.upper(c.k_max + 1), c.k_min, c.k_max))

    def _cloud_probe_k(self) -> int:
        c = self.config
        return min(max(self._k, c.cloud_probe_k, c.k_min), c.k_max)

    def _cloud_mode_rate(self, cost: CostModel, accept: Sequence[float]) -> float:
        """Tokens per second of cloud-only mode as this policy runs it: per cycle,
        `cloud_probe_every` steps of streamed tokens, one speculative probe, and one RTT to
        restart the stream after the probe. At long RTTs the restarts are what make cloud-only
        slower than its raw 1 / t_c."""
        c = self.config
        streamed = c.cloud_probe_every * c.cloud_chunk_tokens
        k = self._cloud_probe_k()
        tokens = streamed + expected_tokens_per_position(accept, k)
        # the probe is a fresh round after a stream: serial, whether pipelined or not
        time_ms = cost.rtt_ms + streamed * cost.cloud_ms_per_token() + cost.round_ms(k)
        return 1e3 * tokens / time_ms

    def _probe_k(self) -> int:
        """The next exploration k: k/2, k+1, k-1, k+1, in turn. The neighbours cost little
        and show the acceptance one position past k; the far probe spreads the block lengths the
        t_v(n) fit sees, which pins its slope and its value at n = 1 (the cloud-only estimate)
        far better than +/-1 alone."""
        c = self.config
        step = _PROBE_CYCLE[self._probes % len(_PROBE_CYCLE)]
        self._probes += 1
        k = (self._k + 1) // 2 if step == 0 else self._k + step
        if not c.k_min <= k <= c.k_max:
            k = self._k - step if step else self._k
        return min(max(k, c.k_min), c.k_max)

    def __repr__(self) -> str:
        return f"AdaptivePolicy(mode={self._mode!r}, k={self._k})"


# ---------------------------------------------------------------------------------------------
# construction by name


_POLICIES: dict[str, Callable[..., DraftLengthPolicy]] = {
    "fixed": FixedPolicy,
    "heuristic": HeuristicPolicy,
    "adaptive": lambda **kw: AdaptivePolicy(AdaptiveConfig(**kw)),
    "cloud_only": CloudOnlyPolicy,
}
_POLICY_OPTIONS = {
    "fixed": ("k",),
    "heuristic": ("k0", "k_min", "k_max"),
    "adaptive": tuple(f.name for f in fields(AdaptiveConfig)),
    "cloud_only": ("stream_tokens",),
}


def make_policy(name: str, **options: object) -> DraftLengthPolicy:
    """A fresh policy by name: "fixed" (k), "heuristic" (k0, k_min, k_max), "adaptive" (the
    fields of `AdaptiveConfig`) or "cloud_only" (stream_tokens). An unknown name or option, or a
    bad value, raises `ValueError` naming it."""
    if name not in _POLICIES:
        raise ValueError(f"policy must be one of {sorted(_POLICIES)}, got {name!r}")
    allowed = _POLICY_OPTIONS[name]
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"{key} is not an option of the {name!r} policy; allowed: {', '.join(allowed)}"
            )
    return _POLICIES[name](**options)


# ---------------------------------------------------------------------------------------------
# simulation


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
                tuple(_check_prob(f"alpha[{i}]", a) for i, a in enumerate(self.alpha)),
            )
        else:
            object.__setattr__(self, "alpha", _check_prob("alpha", self.alpha))
        if not isinstance(self.cost, CostModel):
            raise ValueError(f"cost must be a CostModel, got {type(self.cost).__name__}")
        _check_ms("rtt_jitter_ms", self.rtt_jitter_ms)
        _check_prob("rtt_spike_prob", self.rtt_spike_prob)
        _check_ms("rtt_spike_ms", self.rtt_spike_ms)
        _check_float("timing_noise", self.timing_noise, lambda v: 0.0 <= v < 1.0, "in [0, 1)")

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
    observation: RoundObservation
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
) -> SimResult:
    """Run `policy` for `rounds` decisions against `env` (or `env(i)` for decision i, to change
    conditions mid-run). Deterministic given `seed`; the policy sees exactly what an edge would
    measure. Tokens are counted as committed (no stop tokens, no max length)."""
    rounds = _check_int("rounds", rounds, 0)
    seed = _check_int("seed", seed, 0)
    seeds = random.Random(seed)
    trace: list[SimRound] = []
    tokens, time_ms = 0, 0.0
    streaming = False  # a cloud-only stream is open (its first-token RTT is paid)

    for i in range(rounds):
        e = env(i) if callable(env) else env
        # One stream per round, so runs of different policies with the same seed see the same
        # luck round by round (common random numbers): comparisons between them are much less
        # noisy than their throughputs.
        rng = random.Random(seeds.getrandbits(64))
        decision = policy.choose()
        rtt = e.cost.rtt_ms + (rng.gauss(0.0, e.rtt_jitter_ms) if e.rtt_jitter_ms else 0.0)
        if e.rtt_spike_prob and rng.random() < e.rtt_spike_prob:
            rtt += e.rtt_spike_ms
        rtt = max(rtt, 0.0)
        if decision.mode == CLOUD_ONLY:
            n = decision.stream_tokens
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
            k = decision.k
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
