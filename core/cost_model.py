"""The cost model of speculative rounds: expected tokens per round, time per round, and the
draft length that maximises their ratio.

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
`expected_tokens`). The adaptive policy (`edgespec.core.adaptive`) keeps the per-position form:
conditional acceptance is not constant in practice (reaching position i selects the easy
contexts, so later positions are often accepted more readily), and with a hard first position
and easy later ones the i.i.d. model fitted to the same rounds picks a far too short block.

Cloud-only decoding streams one token per verifier forward, back to back: the tokens overlap the
network except the first, which pays one RTT whenever the stream (re)starts. Its steady rate is
1 / t_c with t_c = t_v(1) + q (`CostModel.cloud_ms_per_token`).

Pipelined drafting (`CostModel.pipelined`): while block n's verdict travels, the edge guesses its
bonus token and drafts block n+1 after it (pipeline depth 1). Block n+1 is used (a *hit*) with
probability h(k) = p_1 * ... * p_k * p_{k+1}: every draft token accepted and the bonus equal to
the draft's guess, which for greedy decoding is exactly the event that a (k+1)-th draft token
would have been accepted (for sampling, p_{k+1} approximates P(bonus == guess)). A run of hits
sends a block every (k + 1) * t_d + RTT + q + t_v(k + 1) per two blocks, as each block is drafted
while the one before it travels; a miss costs a fresh serial round. So, as an approximation that
ignores the order of hits and misses:

    T_hit(k)  = max(((k + 1) * t_d + RTT + q + t_v(k + 1)) / 2, (k + 1) * t_d, t_v(k + 1) + q)
    T_pipe(k) = h(k) * T_hit(k) + (1 - h(k)) * (T(k) + max((k + 1) * t_d - RTT - q - t_v(k + 1), 0))

(the second and third terms of the max: the edge drafts k + 1 tokens per block and the verifier
verifies one block at a time, whatever the overlap; the miss's last term: the block drafted ahead
is still being drafted when the verdict returns on a short round trip, and the fresh round waits
for it). A token tree of L levels and n nodes is
priced the same way with k = L draft forwards and n + 1 verified positions (`positions`), its
hit probability that of its guessed path (`edgespec.core.tree_policy`). Round observations of a
pipelined session are the same as serial ones: network_ms of a block drafted ahead is still
measured from its own send, and the verifier's queue_ms counts the time it waited behind the
block before it.

A finite generation. The rates above are steady-state. Committing the last n tokens takes
about n / E(k) rounds plus `overshoot_rounds` (the last round is cut at the tokens left, but
costs a whole round), and a pipelined session's first round is serial. Streaming them
cloud-only costs RTT + n * t_c. At long RTTs, where a round costs several cloud-only tokens,
the difference decides short generations (`edgespec.core.adaptive`, `tokens_left`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgespec.core.validation import check_float, check_int, check_ms, check_prob

K_LIMIT = 256  # no policy drafts more per round; the verifier caps blocks far below this anyway


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = (1 - alpha^(k+1)) / (1 - alpha): expected tokens one round commits when each of the
    `k` draft tokens is accepted independently with probability `alpha` (the accepted prefix plus
    the verifier's own token). Continuous at alpha = 1, where it is k + 1; alpha = 0 gives 1."""
    alpha = check_prob("alpha", alpha)
    k = check_int("k", k, 0)
    if alpha > 1.0 - 1e-9:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_tokens_per_position(accept_probs: Sequence[float], k: int) -> float:
    """E(k) = 1 + sum_{j<=k} prod_{i<=j} p_i with `accept_probs[i-1]` = P(accept position i |
    positions before it accepted). Needs at least k probabilities; equals `expected_tokens` when
    they are all the same."""
    k = check_int("k", k, 0)
    if len(accept_probs) < k:
        raise ValueError(
            f"accept_probs must hold at least k={k} probabilities, got {len(accept_probs)}"
        )
    total, reach = 1.0, 1.0
    for i in range(k):
        reach *= check_prob(f"accept_probs[{i}]", accept_probs[i])
        total += reach
    return total


def overshoot_rounds(accept_probs: Sequence[float], k: int) -> float:
    """Rounds of `k` beyond n / E(k) that committing n tokens takes, for large n: the last
    round is cut at n (the edge drafts at most the tokens left less one) but costs a whole
    round. Renewal theory with X = tokens per round: the sum first reaches n after
    (n + E[overshoot]) / E[X] rounds, E[overshoot] -> E[X (X - 1)] / (2 E[X]) for integer X
    (exact for a constant X: (X - 1) / 2); so E[X (X - 1)] / (2 E[X]^2) rounds more.
    P(X > j) is the reach of position j, so E[X] = sum_j reach_j and
    E[X^2] = sum_j (2 j + 1) reach_j over j = 0..k. Unvalidated (a policy calls it per round)."""
    mean, square, reach = 1.0, 1.0, 1.0
    for j in range(1, k + 1):
        reach *= accept_probs[j - 1]
        mean += reach
        square += (2 * j + 1) * reach
    return (square - mean) / (2.0 * mean * mean)


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
    # Pipelined chains with branches ahead (`Drafter.propose_ahead`): guesses that position
    # p = 1..ahead_branches is rejected for the draft's runner-up (p = k + 1: the bonus), each
    # true with P(the target's token is the runner-up | a rejection) = runner_up.
    ahead_branches: int = 0
    runner_up: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be a bool, got {self.pipelined!r}")
        check_int("ahead_branches", self.ahead_branches, 0)
        check_prob("runner_up", self.runner_up)
        for name in ("draft_ms", "rtt_ms", "verify_base_ms", "verify_per_token_ms", "queue_ms"):
            object.__setattr__(self, name, check_ms(name, getattr(self, name)))
        if self.cloud_token_ms is not None:
            value = check_float(
                "cloud_token_ms", self.cloud_token_ms, 0, lo_open=True, unit="(milliseconds)"
            )
            object.__setattr__(self, "cloud_token_ms", value)

    def verify_ms(self, positions: int) -> float:
        """t_v(n): one verifier forward over `positions` = k + 1 positions."""
        return self.verify_base_ms + self.verify_per_token_ms * positions

    # `positions` (default k + 1): the positions verified, a token tree's nodes + 1 (with k its
    # levels, the draft forwards that grow it).

    def round_ms(self, k: int, positions: int | None = None) -> float:
        """T(k): wall time of one serial speculative round drafting `k` tokens (or levels)."""
        n = k + 1 if positions is None else positions
        return k * self.draft_ms + self.rtt_ms + self.queue_ms + self.verify_ms(n)

    def pipelined_hit_ms(self, k: int, positions: int | None = None) -> float:
        """T_hit(k): mean time per round in a run of pipeline hits (module docstring)."""
        verify = self.verify_ms(k + 1 if positions is None else positions) + self.queue_ms
        drafting = (k + 1) * self.draft_ms
        return max((drafting + self.rtt_ms + verify) / 2.0, drafting, verify)

    def expected_round_ms(self, k: int, hit_prob: float, positions: int | None = None) -> float:
        """Mean time per round at draft length `k`: T(k) when not pipelined, else T_pipe(k) with
        `hit_prob` = P(the next block, drafted ahead, is used)."""
        serial = self.round_ms(k, positions)
        if not self.pipelined:
            return serial
        h = check_prob("hit_prob", hit_prob)
        verdict = serial - k * self.draft_ms  # the verdict's return: RTT + q + t_v
        overrun = max((k + 1) * self.draft_ms - verdict, 0.0)
        return h * self.pipelined_hit_ms(k, positions) + (1.0 - h) * (serial + overrun)

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
            hit = self.hit_probability(accept, k)
        else:
            tokens = expected_tokens(accept, k)
            hit = self.hit_probability([accept] * (k + 1), k)
        return 1e3 * tokens / max(self.expected_round_ms(k, min(max(hit, 0.0), 1.0)), 1e-9)

    def hit_probability(self, accept: Sequence[float], k: int) -> float:
        """h(k): P(a block drafted ahead of a chain of `k` is used), `accept` the per-position
        acceptance (p_{k+1}: the last one when absent). The main guess comes true when all k
        are accepted and the bonus is the draft's guess (p_{k+1} stands for that); a branch at
        p <= ahead_branches when positions 1..p-1 are accepted, p is not (for p = k + 1: the
        bonus is not the guess) and the target's token is the draft's runner-up there."""
        return _hits(self, accept, k, k)[-1]

    def cloud_rate(self) -> float:
        """Tokens per second when the cloud decodes alone."""
        return 1e3 / max(self.cloud_ms_per_token(), 1e-9)


def speculative_rates(
    cost: CostModel, accept_probs: Sequence[float], k_min: int, k_max: int
) -> list[float]:
    """Tokens per second for k = k_min..k_max, E(k) accumulated in one pass. The input is not
    validated (`AdaptivePolicy` calls this every round). A pipelined cost model also reads
    p_{k+1} (accept_probs[k], the last one when absent)."""
    rates = []
    tokens, reach = 1.0, 1.0
    hits = _hits(cost, accept_probs, 1, k_max) if cost.pipelined else []
    for k in range(1, k_max + 1):
        reach *= accept_probs[k - 1]
        tokens += reach
        if k >= k_min:
            if cost.pipelined:
                time_ms = cost.expected_round_ms(k, min(hits[k - 1], 1.0))
            else:
                time_ms = cost.round_ms(k)
            rates.append(1e3 * tokens / max(time_ms, 1e-9))
    return rates


def _hits(cost: CostModel, accept: Sequence[float], k_lo: int, k_hi: int) -> list[float]:
    """h(k) (`CostModel.hit_probability`) for k = k_lo..k_hi, in one pass (unvalidated)."""
    out = []
    n = len(accept)
    reach, branched = 1.0, 0.0  # P(positions 1..p accepted); P(a branch's guess came true)
    branches, up = cost.ahead_branches, cost.runner_up
    for k in range(1, k_hi + 1):
        p = accept[min(k - 1, n - 1)] if n else 1.0
        if k <= branches:
            branched += reach * (1.0 - p) * up
        reach *= p
        if k >= k_lo:
            bonus = accept[min(k, n - 1)] if n else 1.0
            extra = reach * (1.0 - bonus) * up if branches > k else 0.0
            out.append(min(reach * bonus + branched + extra, 1.0))
    return out


def best_k(
    cost: CostModel, accept: float | Sequence[float], k_min: int = 1, k_max: int = 16
) -> int:
    """The k in [k_min, k_max] maximising E(k) / T(k) (the smallest such k on a tie); `accept` is
    one alpha for every position or the per-position probabilities (at least k_max of them)."""
    k_min = check_int("k_min", k_min, 1, K_LIMIT)
    k_max = check_int("k_max", k_max, k_min, K_LIMIT)
    if isinstance(accept, Sequence):
        if len(accept) < k_max:
            raise ValueError(
                f"accept must hold at least k_max={k_max} probabilities, got {len(accept)}"
            )
        probs = [check_prob(f"accept[{i}]", p) for i, p in enumerate(accept[:k_max])]
    else:
        probs = [check_prob("accept", accept)] * k_max
    rates = speculative_rates(cost, probs, k_min, k_max)
    return k_min + max(range(len(rates)), key=rates.__getitem__)
