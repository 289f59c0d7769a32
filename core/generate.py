"""Co-located generation: speculative decoding with both models in one process, and the
target-alone baseline it must match (greedy: token for token; sampling: in distribution)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgespec.core.coupling import coupled_tokens
from edgespec.core.drafter import Drafter
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample
from edgespec.core.session import FINISH_LENGTH, FINISH_STOP, check_prompt_ids, derive_seed
from edgespec.core.tree import TreeShape
from edgespec.core.validation import check_int
from edgespec.core.verifier import Verifier


@dataclass
class SpecStats:
    """Counters of one generation. Positions are 0-based within a block."""

    rounds: int = 0  # verification rounds (target forwards after the prefill)
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens accepted
    # accepted_per_position[i]: rounds whose draft token i was accepted; drafted_per_position[i]:
    # rounds that drafted a token i. Their ratio estimates acceptance at depth i.
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    target_forwards: int = 0
    draft_forwards: int = 0

    def observe_round(self, drafted: int, accepted: int) -> None:
        """Record one verification round that drafted `drafted` and accepted `accepted` tokens."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted must be in [0, {drafted}], got {accepted}")
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        grow = drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_tokens_per_round(self) -> float:
        """Tokens each verification round yields, accepted + 1, averaged (before any truncation
        at a stop token or max_new_tokens); the E(k) of the draft-length model."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens (prompt excluded); a final stop token is included
    finish_reason: str  # "stop" or "length"
    stats: SpecStats
    # The seed the output was sampled with (drawn when the params had none and sampling is
    # coupled, so the output can be reproduced); None for greedy or unseeded rejection sampling.
    seed: int | None = None


def generate(
    target: ModelRunner,
    draft: ModelRunner,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    k: int = 0,
    tree: TreeShape | None = None,
) -> GenerationResult:
    """Speculative decoding with both models co-located, `k` draft tokens per round (k >= 0),
    or with `tree` a draft token tree of that shape per round (k is then unused, and the stats
    count a tree round's depth as its drafted positions).

    The output equals what `generate_autoregressive(target, ...)` produces: the same tokens for
    greedy params, the same distribution when sampling. Resets both runners' caches.
    """
    check_int("k", k, 0)
    if (
        params.sampler == "rejection"
        and not params.is_greedy
        and draft.vocab_size != target.vocab_size
    ):
        # Dense q rows must be as wide as the target's probabilities.
        raise ValueError(
            f"draft vocab_size must equal target vocab_size={target.vocab_size} when sampling, "
            f"got {draft.vocab_size}"
        )
    t0, d0 = target.forwards, draft.forwards
    params = params.with_seed() if params.is_coupled else params  # one seed for both sides
    drafter = Drafter(draft, prompt_ids, params)
    verifier = Verifier(target, prompt_ids, params)
    stats = SpecStats()
    while not drafter.finished:
        block = drafter.propose(k) if tree is None else drafter.propose_tree(tree)
        verdict = verifier.verify(block)
        drafter.apply(verdict)
        stats.observe_round(block.depth, verdict.accepted)
    stats.target_forwards = target.forwards - t0
    stats.draft_forwards = draft.forwards - d0
    assert drafter.finish_reason is not None
    return GenerationResult(
        tokens=list(drafter.generated),
        finish_reason=drafter.finish_reason,
        stats=stats,
        seed=drafter.params.seed,
    )


def generate_autoregressive(
    runner: ModelRunner, prompt_ids: Sequence[int], params: SamplingParams
) -> GenerationResult:
    """The target alone: one forward per generated token (the baseline speculative decoding
    must reproduce). Stops after a stop token (kept) or max_new_tokens. Resets the cache.

    Coupled sampling: the token at each position is the coupled token
    (`edgespec.core.coupling.coupled_tokens`, the function the verifier uses), so with the same
    seed this is token for token the output of any distributed generation of these params (a
    seed is drawn when None). Rejection sampling draws from a generator seeded by `params.seed`.
    """
    prompt = check_prompt_ids(prompt_ids, runner.vocab_size)
    params = params.with_seed() if params.is_coupled else params
    stop = frozenset(params.stop_token_ids)
    generator = make_generator(derive_seed(params.seed, "target"), runner.device)
    f0 = runner.forwards
    stats = SpecStats()
    tokens: list[int] = []
    logits = runner.prefill(prompt)  # (V,)
    while True:
        if params.is_greedy:
            tok = int(logits.argmax(-1))
        elif params.is_coupled:
            assert params.seed is not None  # with_seed() above
            position = len(prompt) + len(tokens)
            tok = int(coupled_tokens(logits[None], params, params.seed, [position])[0])
        else:
            tok = int(sample(logits_to_probs(logits, params), generator))
        tokens.append(tok)
        stats.observe_round(0, 0)
        if tok in stop:
            reason = FINISH_STOP
            break
        if len(tokens) >= params.max_new_tokens:
            reason = FINISH_LENGTH
            break
        logits = runner.extend([tok])[0]  # (V,)
    stats.target_forwards = runner.forwards - f0
    return GenerationResult(tokens=tokens, finish_reason=reason, stats=stats, seed=params.seed)
