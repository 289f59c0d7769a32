"""The adaptive draft-length policy: the k maximising the estimated E(k)/T(k) of
`edgespec.core.cost_model`, or cloud-only decoding when that is faster.

`AdaptivePolicy` compares speculative decoding with cloud-only *as it runs it*: a cycle of
`cloud_probe_every` streamed steps, one speculative probe (to keep the estimates fresh) and one
RTT to restart the stream afterwards; at long RTTs those restarts matter. The cloud-only time per
token is t_v(1) + q corrected by an offset learnt from cloud-only steps once there are any. The
estimators (`edgespec.core.estimators`) learn from every round; exploration probes at k/2 and
k+/-1 keep the block lengths varied so the t_v(n) slope (and t_v(1), hence the cloud-only
estimate) stays identified; the queue is a plain EWMA (the mean wait is what costs throughput).

k moves to the best k only when the predicted gain beats `k_hysteresis`; the mode switches when
the other mode beats the current one by `mode_hysteresis` (leaving speculative decoding is judged
on an optimistic acceptance, one standard error up, so thin evidence does not end it). A policy
can start from what an earlier session on the same link learnt (`edgespec.core.link_memory`).

On a batching verifier shared with other sessions (`load_aware`), a position is priced at
what it costs every session in the forward, not at this session's own t_v slope: without that,
every session finds long blocks cheap (the forward's cost is mostly the others'), all of them
lengthen their blocks, and the shared forwards slow down for all (`VerifierLoad`). The load is
measured against the verifier's idle fixed cost, which must be told (`observe_verifier_idle`:
the edge passes what an emulated verifier's compute profile says; a verifier that announces no
such figure leaves the policy as it was).
Cloud-only is then judged the same way: the rate if every session decoded alone.

Told the tokens left (`choose(tokens_left=...)`), the policy also weighs a generation's end:
within one cloud-only cycle of it, when streaming the rest (one RTT, then t_c a token) is
expected to finish sooner than speculating to the end, the last round cut short included
(`edgespec.core.cost_model.overshoot_rounds`), it streams the rest in one chunk. The mode it
carries to the next session stays the steady one.

While cloud-only, nothing is drafted, but the policy need not go blind: `observe_shadow` takes
what the draft would have proposed for the streamed tokens (under greedy decoding a draft token
is accepted iff it equals the committed token, so these are exact acceptance outcomes), and
`observe_rtt` takes pings. With both arriving, scheduled probes are skipped: the link getting
better shows in the pings, easier text in the shadow rounds.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from edgespec.core.cost_model import (
    K_LIMIT,
    CostModel,
    expected_tokens_per_position,
    overshoot_rounds,
    speculative_rates,
)
from edgespec.core.estimators import AcceptanceEstimator, AffineFit, RobustLevel, VerifierLoad
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, Decision, Mode, RoundObservation
from edgespec.core.validation import check_float, check_int, check_ms

logger = logging.getLogger(__name__)


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
    # Pipelined: the branches the edge drafts ahead besides the main guess
    # (`EngineConfig.ahead_branches`), each used when position p's rejected token is replaced
    # by the draft's runner-up there, at the rate the rounds show (`RoundObservation.runner_up`,
    # and the walks of tree rounds). This policy does not carry it to the next session: a warm
    # session that counts on branches at once speculated at 100 ms where streaming was faster
    # (sessions 14 and 15). `TreePolicy`, whose trees outrun streaming there, carries it.
    ahead_branches: int = 0
    # Account for the verifier's load (`VerifierLoad`): when other sessions' work in the same
    # batched forwards adds more than `load_dead_zone` times the verifier's fixed cost to the
    # verify time, price each position at what it costs all of them (t_v(n) = floor +
    # n * (time - floor) / n_mean) instead of at this session's own slope b.
    load_aware: bool = True
    load_dead_zone: float = 0.25
    load_gain: float = 0.3  # EWMA gain of the load estimate, in (0, 1]
    memory_trials: float = 48.0  # a session started from `PolicyMemory` carries at most this
    # many acceptance trials over (> 0): enough to decide from the first round, few enough that
    # its own rounds overrule them within a few dozen positions

    def __post_init__(self) -> None:
        k_min = check_int("k_min", self.k_min, 1, K_LIMIT)
        k_max = check_int("k_max", self.k_max, k_min, K_LIMIT)
        if self.k_init is None:
            object.__setattr__(self, "k_init", min(max(4, k_min), k_max))
        else:
            check_int("k_init", self.k_init, k_min, k_max)
        check_int("warmup_rounds", self.warmup_rounds, 0)
        check_int("cloud_warmup_rounds", self.cloud_warmup_rounds, 0)
        check_float("alpha_prior", self.alpha_prior, 0, 1, lo_open=True, hi_open=True)
        for name in ("alpha_prior_weight", "position_prior_weight"):
            check_float(name, getattr(self, name), 0, lo_open=True)
        for name in ("acceptance_decay", "timing_gain", "verify_decay"):
            check_float(name, getattr(self, name), 0, 1, lo_open=True)
        check_float("shift_threshold", self.shift_threshold, 0, lo_open=True)
        check_int("shift_rounds", self.shift_rounds, 1)
        check_float("acceptance_shift_g", self.acceptance_shift_g, 0, lo_open=True)
        for name in ("k_hysteresis", "mode_hysteresis"):
            check_float(name, getattr(self, name), 0)
        if self.explore_every != 0:
            check_int("explore_every", self.explore_every, 2)
        if not isinstance(self.allow_cloud_only, bool):
            raise ValueError(f"allow_cloud_only must be a bool, got {self.allow_cloud_only!r}")
        check_int("cloud_chunk_tokens", self.cloud_chunk_tokens, 1)
        check_int("cloud_probe_every", self.cloud_probe_every, 1)
        check_int("cloud_probe_k", self.cloud_probe_k, 1, K_LIMIT)
        if not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be a bool, got {self.pipelined!r}")
        check_int("ahead_branches", self.ahead_branches, 0)
        check_float("memory_trials", self.memory_trials, 0, lo_open=True)
        if not isinstance(self.load_aware, bool):
            raise ValueError(f"load_aware must be a bool, got {self.load_aware!r}")
        check_float("load_dead_zone", self.load_dead_zone, 0)
        check_float("load_gain", self.load_gain, 0, 1, lo_open=True)


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
    A memory behind fewer speculative rounds than a cold session runs before it decides
    (`warmup_rounds`) only seeds the estimates, and its rounds count towards the warm-up the
    session then finishes itself. One or two rounds are no evidence to decide a session on: a
    2-token generation that paid the first forwards' one-time costs (`edgespec demo`'s warm-up)
    left a draft time ~100x the usual, the next session started cloud-only from it and, with
    shadow rounds and pings keeping its other estimates current, never drafted again.
    """

    def __init__(
        self, config: AdaptiveConfig | None = None, memory: PolicyMemory | None = None
    ) -> None:
        self.config = config if config is not None else AdaptiveConfig()
        c = self.config
        if memory is not None and not isinstance(memory, PolicyMemory):
            raise ValueError(f"memory must be a PolicyMemory or None, got {type(memory).__name__}")
        self._accept = AcceptanceEstimator(
            c.alpha_prior,
            c.alpha_prior_weight,
            c.position_prior_weight,
            c.acceptance_decay,
            c.acceptance_shift_g,
        )
        self._draft = RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._rtt = RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._verify = AffineFit(c.verify_decay, c.timing_gain, c.shift_threshold, c.shift_rounds)
        self._queue: float | None = None  # plain EWMA: the mean wait is what costs throughput
        self._load = VerifierLoad(c.load_gain, c.shift_threshold, c.shift_rounds)
        # P(the target's token is the draft's runner-up | a rejection): decayed (hits, trials),
        # a prior of none in two: no branch is counted on before rounds have shown one (a
        # session that starts optimistic on a long link speculates where it should stream)
        self._runner_up = [0.0, 2.0]
        # cloud-only time per token, as an offset over the speculative side's t_v(1) + queue so
        # that it follows the verifier's load seen through the probes
        self._cloud_offset = RobustLevel(c.timing_gain, c.shift_threshold, c.shift_rounds)
        assert c.k_init is not None  # AdaptiveConfig.__post_init__ resolves None
        self._k: int = c.k_init
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
        self._rounds_here = 0  # speculative rounds of this session (not of the memory's)
        self._finish_from: int | None = None  # tokens left when the rest went to cloud-only
        self._warm = (
            memory is not None and memory.usable and memory.speculative_rounds >= c.warmup_rounds
        )
        if memory is not None:
            # whatever was learnt is a better start than the priors; but without a verifier-time
            # fit and an RTT there is nothing to decide from yet: warm-up as usual
            self._accept = memory.accept.settled(c.memory_trials)
            self._accept.decay = c.acceptance_decay
            self._draft, self._rtt = memory.draft.settled(), memory.rtt.settled()
            self._verify = memory.verify.settled()
            self._queue = memory.queue
            self._cloud_offset = memory.cloud_offset.settled()
            if memory.load is not None:
                self._load = memory.load.settled()
            # the rounds behind those estimates count towards this session's warm-up (and the
            # next memory's): sessions too short to warm up alone add up
            self._spec_rounds = memory.speculative_rounds
            self._cloud_steps_seen = memory.cloud_only_steps
        if self._warm:
            assert memory is not None
            self._k = min(max(memory.k, c.k_min), c.k_max)
            self._mode = memory.mode if c.allow_cloud_only else SPECULATIVE

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
            load=copy.deepcopy(self._load),
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
        base, slope, queue = self._verify.a, self._verify.b, self._queue or 0.0
        if self._load.floor is not None and base < self._load.floor:
            # No forward costs less than the verifier's told idle fixed cost. The fit's intercept
            # is an extrapolation to n = 0 that a session verifying only long blocks (trees of
            # 10-64 nodes) on a noisy host leaves far off (seen: half the fixed cost, which made
            # chains of k = 1 look twice as fast as they are, and cloud-only likewise): refit the
            # slope with the intercept held there.
            base = self._load.floor
            slope = self._verify.slope_given(base)
        shared = self._load.per_position_ms(self.config.load_dead_zone)
        if self.config.load_aware and shared > 0.0:
            assert self._load.floor is not None
            # Priced per position, a serial session's wait is part of the load (`_busy_ms`). A
            # pipelined session's is not (its blocks drafted ahead wait behind its own pending
            # block): the wait of its fresh blocks, for the forward in progress when they
            # arrive, stays a cost of every round, whatever its positions.
            base, slope = self._load.floor, max(slope, shared)
            queue = queue if self.config.pipelined else 0.0
        spec = CostModel(
            draft_ms=max(self._draft.value or 0.0, 0.0),
            rtt_ms=max(self._rtt.value, 0.0),
            verify_base_ms=base,
            verify_per_token_ms=slope,
            queue_ms=queue,
            pipelined=self.config.pipelined,
            ahead_branches=self.config.ahead_branches if self.config.pipelined else 0,
            runner_up=self._runner_up[0] / self._runner_up[1],
        )
        cloud = spec.cloud_ms_per_token() + (self._cloud_offset.value or 0.0)
        if self._load.floor is not None:
            cloud = max(cloud, self._load.floor)  # a streamed token is one forward
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
            assert obs.tokens is not None  # RoundObservation.__post_init__ resolves None
            cost = self._cost()
            if cost is not None:  # before any speculative round there is nothing to offset
                per_token = (obs.verify_ms + obs.queue_ms) / obs.tokens
                if self._cloud_offset.update(per_token - cost.verify_ms(1) - cost.queue_ms):
                    logger.info("cloud-only token time shifted to %.2f ms", per_token)
            # A streamed token is one position of one forward: its time shows the verifier's
            # load too, which would otherwise stay what the last speculative round saw for as
            # long as the session streams (its scheduled probes are skipped when shadow rounds
            # and pings keep the other estimates current).
            self._load.update(1, self._busy_ms(obs) / obs.tokens, self._verify.b)
            return
        self._spec_rounds += 1
        self._rounds_here += 1
        self._shadow_tail = []  # a real round in between: the open shadow round is not contiguous
        outcomes = [obs.runner_up] if obs.runner_up is not None else []
        if obs.tree is not None:
            # A walk that left a node's draft-best child for another (or for none) is a
            # rejection where the node's second child is the draft's runner-up: what a chain's
            # branch bets on, learnt by a session that runs trees too.
            outcomes = [rank == 1 for children, rank in obs.tree.steps if children >= 2 and rank]
        decay = self.config.acceptance_decay
        for hit in outcomes:
            hits, trials = self._runner_up
            self._runner_up = [decay * hits + hit, decay * trials + 1.0]
        if obs.tree is None:
            self._accept.update(obs.k, obs.accepted)
            forwards = obs.k
        else:
            # A tree holds the chain this draft would have sent (its rank-0 spine): the chain's
            # acceptance is learnt from it, the time per draft forward from the tree's levels.
            if obs.tree.spine:
                self._accept.update(obs.tree.spine, obs.tree.spine_accepted)
            forwards = obs.tree.levels
        if self._draft.update(obs.draft_ms / forwards):
            logger.info("draft time shifted to %.2f ms/token", self._draft.value)
        self._verify.update(obs.k + 1, obs.verify_ms)
        self._load.update(obs.k + 1, self._busy_ms(obs), self._verify.b)
        if self._rtt.update(obs.network_ms):
            logger.info("RTT shifted to %.1f ms", self._rtt.value)
        if not obs.ahead:
            # A block drafted ahead waited behind its own pending block: not the verifier's
            # wait, which a fresh block shows (`_cost`).
            g = self.config.timing_gain
            q = self._queue
            self._queue = obs.queue_ms if q is None else q + g * (obs.queue_ms - q)

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
        if self._rtt.update(check_ms("rtt_ms", rtt_ms)):
            logger.info("RTT shifted to %.1f ms", self._rtt.value)

    def _busy_ms(self, obs: RoundObservation) -> float:
        """The round's time at the verifier that other sessions' work can lengthen: the forward,
        and its wait for the forwards before it. Not the wait of a pipelined session, whose
        blocks drafted ahead wait behind its own pending block (not load)."""
        return obs.verify_ms + (0.0 if self.config.pipelined else obs.queue_ms)

    def observe_verifier_idle(self, fixed_ms: float) -> None:
        """The verifier's fixed cost of one forward with no other session in it (e.g. from the
        compute profile it announces): what its load is measured against (`VerifierLoad`).
        Sessions that start together never see the verifier idle, so they cannot learn it."""
        self._load.observe_idle(check_ms("fixed_ms", fixed_ms))

    def choose(self, tokens_left: int | None = None) -> Decision:
        c = self.config
        if tokens_left is not None:
            check_int("tokens_left", tokens_left, 1)
            if self._finish_from is not None and tokens_left <= self._finish_from:
                return Decision(CLOUD_ONLY, 0, stream_tokens=tokens_left)
        self._finish_from = None  # another generation (a policy reused) decides afresh
        cost = self._cost()
        if cost is None or (not self._warm and self._spec_rounds < c.warmup_rounds):
            return self._speculative(self._k)

        accept = self._accept.probs(c.k_max + 1)  # p_{k_max+1}: the pipelined hit rate
        ks = range(c.k_min, c.k_max + 1)
        rates = dict(zip(ks, speculative_rates(cost, accept, c.k_min, c.k_max), strict=True))
        k_best = max(rates, key=rates.__getitem__)
        if rates[k_best] > rates[self._k] * (1.0 + c.k_hysteresis):
            logger.debug(
                "k %d -> %d (%.1f -> %.1f tok/s)", self._k, k_best, rates[self._k], rates[k_best]
            )
            self._k = k_best
        spec_rate = self._speculative_rate(cost, accept, rates[self._k])
        cloud_rate = self._cloud_mode_rate(cost, accept)

        if c.allow_cloud_only and (self._warm or self._spec_rounds >= c.cloud_warmup_rounds):
            # Leaving speculative decoding is judged on an optimistic acceptance (one standard
            # error up): speculative rounds are where the evidence comes from, so thin evidence
            # (early on, or just after a shift) keeps the session there until it is conclusive.
            if self._mode == SPECULATIVE and cloud_rate > spec_rate * (1.0 + c.mode_hysteresis):
                hopeful = self._hopeful_rate(cost, self._leave_z())
                if cloud_rate > hopeful:
                    logger.info("to cloud-only: %.1f > %.1f tok/s", cloud_rate, hopeful)
                    self._mode, self._cloud_steps = CLOUD_ONLY, 0
            elif self._mode == CLOUD_ONLY and spec_rate > cloud_rate * (1.0 + c.mode_hysteresis):
                logger.info(
                    "to speculative (k=%d): %.1f > %.1f tok/s", self._k, spec_rate, cloud_rate
                )
                self._mode, self._since_explore = SPECULATIVE, 0
            if (
                self._mode == SPECULATIVE
                and tokens_left is not None
                and tokens_left <= c.cloud_probe_every * c.cloud_chunk_tokens
                and self._streaming_finishes_first(cost, tokens_left, accept, spec_rate)
            ):
                logger.info("the last %d tokens cloud-only", tokens_left)
                self._finish_from = tokens_left
                return Decision(CLOUD_ONLY, 0, stream_tokens=tokens_left)

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
            probe = self._probe()
            if probe is not None:
                return probe
        return self._speculative(self._k)

    def _probe(self) -> Decision | None:
        """The exploration round due now (`explore_every`), or None to skip it: a chain of the
        next `_probe_k` when that differs from the current k."""
        k = self._probe_k()
        return Decision(SPECULATIVE, k, probe=True) if k != self._k else None

    def _speculative_rate(self, cost: CostModel, accept: Sequence[float], chain: float) -> float:
        """The speculative rate the mode decision weighs against cloud-only: that of a chain of
        the current k (`chain`, tokens/s) here; a policy with other round shapes returns its
        best."""
        return chain

    def _speculative(self, k: int) -> Decision:
        """The speculative round to run at the current best: a chain of `k` here."""
        return Decision(SPECULATIVE, k)

    def _leave_z(self) -> float:
        """Standard errors of optimism in the acceptance that leaving speculative decoding is
        judged on: one; two while the estimate rests on few trials after a level shift (seen at
        32 sessions: a few hard tokens read as a shift to 0.25 on 11 trials, sessions of that
        text streamed cloud-only for 1.5 s and came back at 0.79, ending 0.7 s after the rest)."""
        accept = self._accept
        return 2.0 if accept.shifts and accept.trials < _CONFIDENT_TRIALS else 1.0

    def _hopeful_rate(self, cost: CostModel, z: float = 1.0) -> float:
        """The best speculative rate under an acceptance `z` standard errors higher."""
        c = self.config
        upper = self._accept.upper(c.k_max + 1, z)
        return max(speculative_rates(cost, upper, c.k_min, c.k_max))

    def _streaming_finishes_first(
        self, cost: CostModel, tokens: int, accept: Sequence[float], rate: float
    ) -> bool:
        """Whether streaming the last `tokens` tokens cloud-only (one RTT to start the stream,
        then t_c each, no probe) is expected to beat speculating to the end, at `accept` and
        `rate` (tokens/s of the current round shape), by `mode_hysteresis`.

        The steady rates the mode decision weighs leave out what a generation's ends cost a
        speculative session: its last round is cut at the tokens left but costs a whole round
        (`overshoot_rounds`), and its first round has no block drafted ahead. At long RTTs a
        round is ~0.3 s, and over 64 tokens these are ~10% of the time: with a steady rate a
        few % above cloud-only's, 64-token generations at 200 ms ran at 0.69x cloud-only
        (session 21). Unlike leaving speculative decoding for good, this is judged on the
        plain estimates, not an optimistic acceptance: the mode stays what the steady rates
        say (it is carried to the next session), so no evidence is given up for good."""
        stream_ms = cost.rtt_ms + tokens * cost.cloud_ms_per_token()
        spec_ms = self._finish_ms(cost, accept, rate, tokens)
        return stream_ms * (1.0 + self.config.mode_hysteresis) < spec_ms

    def _finish_ms(self, cost: CostModel, accept: Sequence[float], rate: float, n: int) -> float:
        """Expected ms to commit the last `n` tokens speculating at `rate` tokens/s, with the
        ends' costs of chains of the current k (`_streaming_finishes_first`). The overshoot is
        a large-n figure; one token left is exactly one round that drafts nothing."""
        k = self._k
        if n == 1:
            return cost.round_ms(0)
        serial = cost.round_ms(k)
        total = 1e3 * n / max(rate, 1e-9) + overshoot_rounds(accept, k) * serial
        if self._rounds_here == 0 and cost.pipelined:
            # the first round is serial: nothing was drafted ahead of it
            hit = min(cost.hit_probability(accept, k), 1.0)
            total += max(serial - cost.expected_round_ms(k, hit), 0.0)
        return total

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
