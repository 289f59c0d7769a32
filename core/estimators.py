"""The online estimators behind `AdaptivePolicy` (`edgespec.core.adaptive`), each updated from
every round's observation:

- acceptance (`AcceptanceEstimator`): forgotten per-position counts with a Beta prior pulling each
  position towards a pooled rate, and a change-point test (likelihood ratio of the last rounds
  against the older counts) that rebuilds the counts from the rounds after a shift. Positions
  seen rarely or never are shrunk towards a pooled rate, so k beyond the longest block observed
  is extrapolated sensibly rather than with noise; with i.i.d. acceptance the per-position and
  pooled forms agree;
- t_d (per draft token), RTT (`RobustLevel`): robust levels (Huber-style EWMA) that shrug off
  single spikes but jump to the new level after `shift_rounds` consecutive samples far off on
  the same side;
- t_v(n) = a + b*n (`AffineFit`): least squares with forgetting, a small ridge prior on b, the
  same shift rule.

- the verifier's load (`VerifierLoad`): how much of a round's verify time is other sessions'
  work batched into the same forward, per token of the session's own block.

Each timing estimator has `settled()`: a copy with no shift pending, what a new session on the same link starts
from (`edgespec.core.link_memory`).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections import deque
from collections.abc import Sequence

logger = logging.getLogger(__name__)


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


class RobustLevel:
    """Robust online level of a noisy timing, quick to follow a persistent shift.

    Huber-style EWMA: a sample within `threshold` deviations moves the level by `gain` times its
    residual; a farther one moves it as if it were exactly `threshold` deviations away, so one
    spike barely registers. The deviation is an EWMA of clipped absolute residuals (like TCP's
    RTTVAR), floored at `rel_floor` of the level so a perfectly steady signal does not make every
    wobble an outlier. `shift_rounds` consecutive outliers on the same side are a level shift: the
    level jumps to their median.

    The level starts at the first sample, or with `start_rounds` > 1 at the median of the first
    `start_rounds` samples (the median of those seen so far until then): where one early sample
    can be far off (a burst), a level started from it would carry it for many samples.
    """

    def __init__(
        self,
        gain: float,
        threshold: float,
        shift_rounds: int,
        rel_floor: float = 0.03,
        start_rounds: int = 1,
    ) -> None:
        self.gain = gain
        self.threshold = threshold
        self.rel_floor = rel_floor
        self.value: float | None = None
        self.dev = 0.0
        self.shifts = 0  # level shifts detected so far
        self._detector = _RunDetector(shift_rounds)
        self._run: list[float] = []
        self._start_rounds = start_rounds
        self._first: list[float] = []  # the first samples, until `start_rounds` of them

    def _scale(self) -> float:
        assert self.value is not None
        return max(self.dev, self.rel_floor * abs(self.value), 1e-3)

    @property
    def pending(self) -> bool:
        return self._detector.pending

    def update(self, x: float) -> bool:
        """Add one sample; True when it completed a level shift."""
        if self.value is None or self._first:  # starting
            self._first.append(x)
            self.value = statistics.median(self._first)
            if len(self._first) == self._start_rounds:
                # the level and the spread about it; one sample: a guess of the spread,
                # corrected by the next samples
                spread = statistics.fmean(abs(v - self.value) for v in self._first)
                self.dev = max(spread, 0.1 * abs(self.value))
                self._first = []
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

    def settled(self) -> RobustLevel:
        """A copy with no shift pending (what a new session starts from)."""
        out = copy.deepcopy(self)
        out._detector.clear()
        out._run = []
        return out


class AffineFit:
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

    def slope_given(self, a: float) -> float:
        """The least-squares slope (same forgetting and ridge) of the fit with its intercept held
        at `a`, clamped at >= 0: for a caller who knows a bound on the intercept."""
        sxy = self.sxy - a * self.sx + self.ridge * self.b_prior
        return max(0.0, sxy / (self.sxx + self.ridge))

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

    def settled(self) -> AffineFit:
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


class VerifierLoad:
    """The verify time other sessions' work adds to this session's rounds on a batching verifier.

    Each round's time at the verifier (its forward, and the wait for the forwards before it
    when that is load) is the verifier's fixed cost (`floor`) plus what every position in those
    forwards cost. `floor` is the verifier's idle fixed cost, told by `observe_idle` (e.g. from
    its compute profile); until then nothing is estimated: a floor learnt from the rounds
    (their time less b * n) rests on the noisy slope b and on having seen the verifier idle,
    which sessions that start together never do. Levels follow the time over the floor
    (`over`, robust: `RobustLevel`), this session's own share of it (`own_ms`) and the positions
    fed (`positions`); `gain` is high, as load comes and goes within a session.

    Why it matters: with B sessions alike, each feeding n positions per forward, a compute-bound
    forward costs about floor + b * B * n, so one more position of this session costs every one
    of the B sessions b ms: b * B per position, which is (time - floor) / n. A session that saw
    only its own slope b would find long blocks cheap, every session would lengthen its blocks,
    and the shared forwards slow down for all (measured: adaptive at 16-32 sessions drafting
    twice fixed k's tokens at a lower rate). A memory-bound forward (its cost independent of
    the tokens fed) shows little time over the floor: long blocks stay cheap.

    Why robust: one round's wait can be several forwards long (a burst: 32 sessions opened
    together send their first blocks together), and as a plain average that one round priced
    every position at 4-6 times its cost for the rest of a generation (seen at 32 sessions,
    50 ms: sessions that left trees for chains and cloud-only on their first round and never
    came back). Carried from one session to the next (`PolicyMemory.load`), a burst is an
    outlier against what the link showed before; with nothing carried, the level starts as the
    median of the first `shift_rounds` rounds (a robust level started from one sample takes that
    sample as its level, and one burst as the first would again last for many rounds).
    """

    def __init__(self, gain: float, threshold: float = 3.0, shift_rounds: int = 3) -> None:
        self.gain = gain
        self.floor: float | None = None
        # time - floor, started from the median of the first `shift_rounds` rounds
        self.over = RobustLevel(gain, threshold, shift_rounds, start_rounds=shift_rounds)
        self.own_ms = 0.0  # EWMA of b * n: this session's own share of it
        self.positions = 0.0  # EWMA of n

    def observe_idle(self, fixed_ms: float) -> None:
        """The verifier's fixed cost per forward when it has nothing else to do, learnt
        elsewhere (e.g. its compute profile): the floor from now on."""
        self.floor = fixed_ms

    def update(self, positions: int, busy_ms: float, slope: float) -> None:
        """One round: `positions` fed (1 for a cloud-only token), `busy_ms` at the verifier,
        `slope` = b now (ignored until the floor is told)."""
        if self.floor is None:
            return
        over, own = max(busy_ms - self.floor, 0.0), slope * positions
        self.over.update(over)
        if self.positions == 0.0:
            self.own_ms, self.positions = own, float(positions)
            return
        self.own_ms += self.gain * (own - self.own_ms)
        self.positions += self.gain * (positions - self.positions)

    @property
    def over_ms(self) -> float:
        """The time over the floor (robust level; 0 before any round)."""
        return self.over.value or 0.0

    @property
    def excess_ms(self) -> float:
        """The others' share of the time over the floor."""
        return max(self.over_ms - self.own_ms, 0.0)

    def per_position_ms(self, dead_zone: float) -> float:
        """What one position costs all sessions in the forwards, (time - floor) / n; 0 while
        the others' share is within `dead_zone` times the floor (noise, not load)."""
        if self.floor is None or self.positions <= 0.0:
            return 0.0
        if self.excess_ms <= dead_zone * self.floor:
            return 0.0
        return self.over_ms / self.positions

    def settled(self) -> VerifierLoad:
        """A copy for a new session (no shift pending)."""
        out = copy.deepcopy(self)
        out.over = self.over.settled()
        return out


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


class AcceptanceEstimator:
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

    def upper(self, k: int, z: float = 1.0) -> list[float]:
        """`probs(k)` raised by `z` standard errors of the pooled rate: an optimistic estimate."""
        counts = self._counts()
        n = counts.totals()[0] + self.alpha_weight
        pooled = self._pooled(counts)
        up = z * math.sqrt(pooled * (1.0 - pooled) / n)
        return [min(p + up, 1.0) for p in self._probs(counts, k)]

    @property
    def pending(self) -> bool:
        """The recent rounds disagree with the estimate, though not yet enough to call a shift."""
        return self.g > self.shift_g / 4.0

    def settled(self, max_trials: float) -> AcceptanceEstimator:
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


# A priori P(the target's token is the draft's rank-r proposal | its parent was accepted), r >= 1.
RANK_PRIOR = (0.15, 0.07, 0.04, 0.02)


class RankAcceptance:
    """What token-tree walks showed: P(the target's token at depth d is the node's rank-r
    child | the walk stands on a depth-d node with more than r children), as decayed counts per
    (depth, rank) for depths < max_depth and ranks < max_rank + 1.

    `prob(d, r, prior)` shrinks the (d, r) rate towards a prior with `prior_weight`
    pseudo-trials: for rank 0 the caller's (the chain's acceptance at that position), for ranks
    >= 1 the rank's rate pooled over depths, itself starting from `RANK_PRIOR`. So a cold
    estimator reproduces the chain model plus the rank prior, and tree rounds replace both by
    what the trees actually achieved at each depth."""

    def __init__(self, max_rank: int, max_depth: int, prior_weight: float, decay: float) -> None:
        self._decay = decay
        self._weight = prior_weight
        ranks = max_rank + 1
        self._hits = [[0.0] * ranks for _ in range(max_depth)]
        self._trials = [[0.0] * ranks for _ in range(max_depth)]
        self._pooled_hits = [
            prior_weight * RANK_PRIOR[min(r, len(RANK_PRIOR)) - 1] for r in range(1, ranks)
        ]
        self._pooled_trials = [prior_weight] * max_rank

    def update(self, steps: Sequence[tuple[int, int]]) -> None:
        """One tree round's walk: per step from the root (its index is the depth), the
        children of the node stood on and the rank taken (-1: none)."""
        for table in (self._hits, self._trials):
            for row in table:
                row[:] = [v * self._decay for v in row]
        self._pooled_hits = [h * self._decay for h in self._pooled_hits]
        self._pooled_trials = [t * self._decay for t in self._pooled_trials]
        for depth, (children, rank) in enumerate(steps[: len(self._hits)]):
            for r in range(min(children, len(self._hits[depth]))):
                self._trials[depth][r] += 1.0
                self._hits[depth][r] += rank == r
                if r:
                    self._pooled_trials[r - 1] += 1.0
                    self._pooled_hits[r - 1] += rank == r

    def prob(self, depth: int, rank: int, prior: float) -> float:
        """Estimated P(target = the rank-`rank` child at `depth`); `prior` is rank 0's (ignored
        for ranks >= 1). 0 beyond the ranks tracked; the deepest row stands for deeper ones."""
        if rank >= len(self._hits[0]):
            return 0.0
        if rank:
            prior = self._pooled_hits[rank - 1] / self._pooled_trials[rank - 1]
        d = min(depth, len(self._hits) - 1)
        return (self._hits[d][rank] + self._weight * prior) / (self._trials[d][rank] + self._weight)


class ShapeAcceptance:
    """Accepted tokens per round of each token-tree shape run, as decayed sums and counts (all
    shapes decay every round, so a shape not run lately loses its weight)."""

    def __init__(self, decay: float) -> None:
        self._decay = decay
        self._sum: dict[tuple[int, ...], float] = {}
        self._rounds: dict[tuple[int, ...], float] = {}

    def update(self, shape: tuple[int, ...], accepted: int) -> None:
        for key in self._sum:
            self._sum[key] *= self._decay
            self._rounds[key] *= self._decay
        self._sum[shape] = self._sum.get(shape, 0.0) + accepted
        self._rounds[shape] = self._rounds.get(shape, 0.0) + 1.0

    def mean(self, shape: tuple[int, ...], prior: float, weight: float) -> tuple[float, float]:
        """(the mean shrunk towards `prior` with `weight` pseudo-rounds, the rounds behind it)."""
        rounds = self._rounds.get(shape, 0.0)
        return (self._sum.get(shape, 0.0) + weight * prior) / (rounds + weight), rounds


class ReachCalibration:
    """How far token-tree walks really got against what a model predicted, per depth: decayed
    sums of the walks that reached depth d + 1 (accepted > d) and of the model's predicted
    P(reach depth d + 1), for d < max_depth (deeper ones share the last row).

    `factor(d)` = (reached + w * factor(d - 1)) / (predicted + w), factor(-1) = 1: the data's
    ratio where rounds reached that deep, otherwise the ratio of the depth before. A rank model
    that treats the levels of a walk as independent over-predicts deep walks (a hard context
    stays hard), and the more so the deeper; these factors correct it where the trees ran and
    extrapolate the correction one depth at a time below them."""

    def __init__(self, max_depth: int, prior_weight: float, decay: float) -> None:
        self._decay = decay
        self._weight = prior_weight
        self._reached = [0.0] * max_depth
        self._predicted = [0.0] * max_depth

    def update(self, predicted: Sequence[float], accepted: int) -> None:
        """One tree round: the model's P(reach depth d + 1) per d before the round, the tokens
        its walk accepted."""
        self._reached = [v * self._decay for v in self._reached]
        self._predicted = [v * self._decay for v in self._predicted]
        last = len(self._reached) - 1
        for d, p in enumerate(predicted):
            row = min(d, last)
            self._predicted[row] += p
            self._reached[row] += accepted > d

    def factors(self, depth: int) -> list[float]:
        """factor(d) for d = 0 .. depth - 1."""
        out: list[float] = []
        prev = 1.0
        for d in range(depth):
            row = min(d, len(self._reached) - 1)
            prev = (self._reached[row] + self._weight * prev) / (
                self._predicted[row] + self._weight
            )
            out.append(prev)
        return out
