"""Exact rejection sampling for speculative decoding (Leviathan et al. 2023, Chen et al. 2023).

Vocabulary, used everywhere in edgespec (the same as vLLM's rejection sampler):

- **draft tokens** x_0..x_{k-1}: proposed by the draft model, x_i drawn from q_i.
- **accepted**: in order, x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), where p_i
  is the target's distribution at that position; the first rejection ends the round.
- **recovered token**: on the first rejection, at position i, a token drawn from
  norm(max(p_i - q_i, 0)) takes the place of x_i.
- **bonus token**: when all k draft tokens are accepted, one more token drawn from p_k, which the
  target computed in the same forward pass.

A round thus emits `accepted + 1` tokens, and the emitted sequence follows the target's
distribution exactly, whatever q is, as long as q is the distribution x was really drawn from.
Greedy drafting sends no q: it is one-hot at the draft token.

`rejection_sample` is the math, batched over independent rounds (the statistical tests run tens
of thousands of rounds at once through it); `verify` is the per-round entry point, a thin
wrapper that validates its inputs and calls it with a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from edgespec.core.sampling import categorical, is_one_hot

# Draft rows must sum to 1 within this; it leaves room for q sent over the wire in float16.
PROB_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a bool
class DraftProbs:
    """Distribution(s) the draft tokens were drawn from, one row per draft token.

    Exactly one of two forms:
    - dense: `probs` (k, V) float, `ids` None;
    - sparse: `ids` (k, m) long token ids and `probs` (k, m) float, their probabilities; tokens
      not listed have probability 0. Rows may be zero-padded (prob 0, any id in range), and a
      repeated id counts the sum of its entries.
    Build with `dense`, `sparse` or `from_probs_sparse`; check with `validate` before trusting it.
    """

    probs: Tensor  # (k, V) dense or (k, m) sparse
    ids: Tensor | None = None  # (k, m) long, sparse only

    def __post_init__(self) -> None:
        if not isinstance(self.probs, Tensor):
            raise ValueError(f"draft_probs.probs must be a torch.Tensor, got {type(self.probs)}")
        if self.ids is not None and not isinstance(self.ids, Tensor):
            raise ValueError(
                f"draft_probs.ids must be a torch.Tensor or None, got {type(self.ids)}"
            )

    @staticmethod
    def dense(probs: Tensor) -> DraftProbs:
        """Dense form: `probs` (k, V)."""
        return DraftProbs(probs=probs)

    @staticmethod
    def sparse(ids: Tensor, probs: Tensor) -> DraftProbs:
        """Sparse form: `ids` (k, m) token ids with their `probs` (k, m)."""
        return DraftProbs(probs=probs, ids=ids)

    @staticmethod
    def from_probs_sparse(probs: Tensor) -> DraftProbs:
        """Sparse form of dense `probs` (k, V), listing each row's support (nonzero entries).

        m is the largest support of any row; shorter rows are padded with zero-probability
        entries. A top-k/top-p truncated q is small this way; a full-support q is not smaller.
        """
        if probs.dim() != 2:
            raise ValueError(
                f"draft_probs.probs must be 2-D (k, V), got shape {tuple(probs.shape)}"
            )
        m = int((probs != 0).sum(dim=-1).max()) if probs.shape[0] else 0
        values, ids = torch.topk(probs, m, dim=-1)  # (k, m) each, largest first, zeros last
        return DraftProbs(probs=values, ids=ids)

    @property
    def is_sparse(self) -> bool:
        return self.ids is not None

    def to_dense(self, vocab_size: int) -> Tensor:
        """The (k, V) float32 dense form."""
        if self.ids is None:
            if self.probs.shape[-1] != vocab_size:
                raise ValueError(
                    f"draft_probs.probs has {self.probs.shape[-1]} columns, expected the "
                    f"vocab size {vocab_size}"
                )
            return self.probs.to(torch.float32)
        dense = torch.zeros(
            (self.probs.shape[0], vocab_size), dtype=torch.float32, device=self.probs.device
        )
        return dense.scatter_add_(-1, self.ids.long(), self.probs.to(torch.float32))

    def validate(self, k: int, vocab_size: int) -> None:
        """Raise ValueError naming what is wrong unless this is k valid distributions over V tokens.

        Checks: shapes ((k, V) dense; (k, m) ids and probs sparse), dtypes, ids in [0, V),
        probabilities finite and >= 0, each row summing to 1 within 1e-3.
        """
        probs, ids = self.probs, self.ids
        if not probs.is_floating_point():
            raise ValueError(f"draft_probs.probs must be a float tensor, got dtype {probs.dtype}")
        if ids is None:
            if tuple(probs.shape) != (k, vocab_size):
                raise ValueError(
                    f"draft_probs.probs must have shape (k, V) = ({k}, {vocab_size}), "
                    f"got {tuple(probs.shape)}"
                )
        else:
            if probs.dim() != 2 or probs.shape[0] != k:
                raise ValueError(
                    f"draft_probs.probs must have shape (k, m) with k = {k}, "
                    f"got {tuple(probs.shape)}"
                )
            if ids.shape != probs.shape:
                raise ValueError(
                    f"draft_probs.ids must have the shape of draft_probs.probs "
                    f"{tuple(probs.shape)}, got {tuple(ids.shape)}"
                )
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(
                    f"draft_probs.ids must be an integer tensor, got dtype {ids.dtype}"
                )
            if ids.numel() and not bool(((ids >= 0) & (ids < vocab_size)).all()):
                raise ValueError(
                    f"draft_probs.ids must be token ids in [0, {vocab_size}), got values in "
                    f"[{int(ids.min())}, {int(ids.max())}]"
                )
        if k == 0:
            return
        sums = probs.to(torch.float32).sum(dim=-1)  # (k,); NaN and infs propagate into it
        if not bool(torch.isfinite(sums).all()):
            raise ValueError("draft_probs.probs must be finite, got NaN or inf")
        minimum = float(probs.min())
        if minimum < 0:
            raise ValueError(f"draft_probs.probs must be >= 0, got minimum {minimum}")
        worst = int((sums - 1).abs().argmax())
        if abs(float(sums[worst]) - 1) > PROB_SUM_TOLERANCE:
            raise ValueError(
                f"draft_probs.probs rows must sum to 1 within {PROB_SUM_TOLERANCE}, "
                f"row {worst} sums to {float(sums[worst])}"
            )


@dataclass(frozen=True)
class Verification:
    """Outcome of one verification round: `accepted + 1` tokens are emitted."""

    accepted: int  # draft tokens accepted, 0..k
    token: int  # the recovered token (accepted < k) or the bonus token (accepted == k)
    is_bonus: bool  # accepted == k


def verify(
    draft_tokens: Tensor | Sequence[int],
    target_probs: Tensor,
    draft_probs: DraftProbs | None,
    generator: torch.Generator | None = None,
) -> Verification:
    """Verify one block of draft tokens against the target's distributions.

    draft_tokens: (k,) token ids, k >= 0 (a sequence of ints is accepted too).
    target_probs: (k+1, V) from `logits_to_probs`; row i is p_i, the last row gives the bonus token.
    draft_probs: the q the draft tokens were drawn from, or None for deterministic (greedy)
        drafting, where q is one-hot at each draft token.
    generator: source of randomness, on target_probs' device; None uses torch's default.
    Greedy target (one-hot rows) with greedy drafting draws no random numbers at all.
    Raises ValueError naming the argument when shapes, ids or draft_probs are invalid.
    """
    if target_probs.dim() != 2:
        raise ValueError(
            f"target_probs must be 2-D (k+1, V), got shape {tuple(target_probs.shape)}"
        )
    device = target_probs.device
    vocab_size = target_probs.shape[1]
    draft_tokens = torch.as_tensor(draft_tokens, device=device)
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D (k,), got shape {tuple(draft_tokens.shape)}")
    k = draft_tokens.shape[0]
    if k and (draft_tokens.is_floating_point() or draft_tokens.dtype == torch.bool):
        raise ValueError(f"draft_tokens must be integer token ids, got dtype {draft_tokens.dtype}")
    draft_tokens = draft_tokens.long()
    if target_probs.shape[0] != k + 1:
        raise ValueError(
            f"target_probs must have k+1 = {k + 1} rows for {k} draft tokens, "
            f"got {target_probs.shape[0]}"
        )
    if k and not bool(((draft_tokens >= 0) & (draft_tokens < vocab_size)).all()):
        raise ValueError(
            f"draft_tokens must be token ids in [0, {vocab_size}), got {draft_tokens.tolist()}"
        )
    q = None
    if draft_probs is not None:
        draft_probs.validate(k, vocab_size)
        q = draft_probs.to_dense(vocab_size).to(device)[None]  # (1, k, V)
    accepted, token = rejection_sample(draft_tokens[None], target_probs[None], q, generator)
    n = int(accepted[0])
    return Verification(accepted=n, token=int(token[0]), is_bonus=n == k)


def rejection_sample(
    draft_tokens: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The rejection sampler, batched over B independent rounds; inputs are not validated.

    draft_tokens: (B, k) long. target_probs: (B, k+1, V). draft_probs: (B, k, V) dense q (rows
    need not be normalised; they are, as the draft's sampler did), or None for greedy drafting.
    Expanded (stride-0) inputs are fine. Returns `accepted` (B,) long in [0, k] and `token` (B,)
    long: the recovered token where accepted < k, else the bonus token.

    Random numbers, from `generator` on target_probs' device: B*k uniforms, then one categorical
    draw per round; none when draft_probs is None and every target row is one-hot.
    """
    batch, k = draft_tokens.shape
    if draft_probs is None and is_one_hot(target_probs):
        return _greedy_sample(draft_tokens, target_probs)

    p_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None])[..., 0]  # (B, k) p_i(x_i)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # q_i is one-hot at x_i
    else:
        draft_probs = draft_probs / draft_probs.sum(dim=-1, keepdim=True)  # (B, k, V)
        q_draft = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]  # (B, k) q_i(x_i)

    uniform = torch.rand((batch, k), generator=generator, device=target_probs.device)
    # u < p/q, written as u*q < p: no division, q == 0 cannot divide by zero, and a token the
    # target gives probability 0 is always rejected.
    accepted_mask = uniform * q_draft < p_draft  # (B, k)
    accepted = accepted_mask.long().cumprod(dim=-1).sum(dim=-1)  # (B,) leading acceptances
    rejected = accepted < k  # (B,)

    # The last token of the round comes from p at the first rejected position, minus q there
    # (the recovered token), or from p_k when all were accepted (the bonus token).
    p_row = _take_row(target_probs, accepted)  # (B, V)
    q_row = torch.zeros_like(p_row)
    if k:
        at = accepted.clamp(max=k - 1)  # (B,) any valid row where all were accepted; masked below
        if draft_probs is None:
            rejected_token = draft_tokens.gather(-1, at[:, None])  # (B, 1)
            q_row.scatter_(-1, rejected_token, 1.0)
        else:
            q_row = _take_row(draft_probs, at)
        q_row = q_row * rejected[:, None]
    token = categorical(recovered_probs(p_row, q_row), generator)  # (B,)
    return accepted, token


def recovered_probs(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """norm(max(p - q, 0)) over the last dim: what a recovered token is drawn from. (..., V).

    Where p <= q everywhere (p == q up to rounding, or q not normalised) a rejection has
    probability 0 in exact arithmetic and the residual is empty; p itself is returned there.
    """
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(
        mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), target_probs
    )


def _take_row(probs: Tensor, index: Tensor) -> Tensor:
    """probs[b, index[b], :] for every b: (B, n, V), (B,) -> (B, V)."""
    batch, _, vocab_size = probs.shape
    return probs.gather(1, index.view(batch, 1, 1).expand(batch, 1, vocab_size))[:, 0]


def _greedy_sample(draft_tokens: Tensor, target_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy target, greedy draft: accept while the draft token is the target's argmax."""
    k = draft_tokens.shape[1]
    target_tokens = target_probs.argmax(dim=-1)  # (B, k+1)
    matches = draft_tokens == target_tokens[:, :k]  # (B, k)
    accepted = matches.long().cumprod(dim=-1).sum(dim=-1)  # (B,)
    return accepted, target_tokens.gather(-1, accepted[:, None])[:, 0]
