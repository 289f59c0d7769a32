"""Logits processing and sampling: the one place logits become probabilities.

Both the draft side and the target side call `logits_to_probs` with the same `SamplingParams`,
so the draft distribution q and the target distribution p are built by the same rules, and the
rejection sampler (`edgespec.core.rejection`) only ever sees probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgespec.core.params import SEED_LIMIT, SamplingParams


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Turn logits `(..., V)` into float32 probabilities `(..., V)` that sum to 1 per row.

    Greedy (`temperature == 0`): one-hot at the argmax, ties going to the lowest token id.
    Otherwise the softmax of `processed_logits`.

    Raises ValueError when a row has a NaN or +inf logit or is all -inf.
    """
    if params.is_greedy:
        logits = _checked(logits)
        # argmax returns the first maximal index: ties go to the lowest id.
        top = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, top, 1.0)
    return torch.softmax(processed_logits(logits, params), dim=-1)


def processed_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Sampling params applied to logits `(..., V)`: float32 `(..., V)` whose softmax is the
    distribution to sample (non-greedy params only; greedy has no such distribution).

    In this order: divide by the temperature, keep the `top_k` largest logits, keep the smallest
    set of most likely tokens whose mass is >= `top_p` (always at least the top token); dropped
    tokens get -inf. Tokens tied with the last one kept by top-k or top-p are kept too, so the
    result never depends on how a sort orders equal values. Each row's maximum is 0.

    Raises ValueError when a row has a NaN or +inf logit or is all -inf, or params are greedy.
    """
    if params.is_greedy:
        raise ValueError("processed_logits needs sampling params (temperature > 0)")
    logits = _checked(logits)
    row_max = logits.amax(dim=-1, keepdim=True)
    # Subtracting the max first keeps a tiny temperature from overflowing to inf - inf = NaN.
    scaled = (logits - row_max) / params.temperature  # (..., V), max 0
    vocab_size = scaled.shape[-1]
    candidates = None  # (..., n) sorted descending: every logit top-p has to look at
    if 0 < params.top_k < vocab_size:
        top = torch.topk(scaled, params.top_k, dim=-1).values  # (..., top_k), sorted descending
        keep = scaled >= top[..., -1:]
        scaled = scaled.masked_fill(~keep, float("-inf"))
        if bool((keep.sum(dim=-1) == params.top_k).all()):
            candidates = top  # no ties at the k-th value: top-p need not sort all V logits
    if params.top_p < 1.0:
        if candidates is None:
            candidates = torch.sort(scaled, dim=-1, descending=True).values  # (..., V)
        scaled = _top_p_mask(scaled, candidates, params.top_p)
    return scaled


def _checked(logits: Tensor) -> Tensor:
    """float32 `logits`; ValueError unless every row is finite or -inf with a finite value."""
    logits = logits.to(torch.float32)
    row_max = logits.amax(dim=-1, keepdim=True)  # (..., 1); NaN and +inf propagate into it
    if not bool(torch.isfinite(row_max).all()):
        raise ValueError(
            "logits must be finite or -inf with at least one finite value per row; "
            "got a row with NaN, +inf or only -inf"
        )
    return logits


def _top_p_mask(scaled: Tensor, candidates: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the nucleus: the fewest top tokens with mass >= top_p.

    `candidates` (..., n) holds, sorted descending, every finite logit of `scaled` (..., V).
    """
    candidate_probs = torch.softmax(candidates, dim=-1)  # same as softmax(scaled) on them
    mass_before = torch.cumsum(candidate_probs, dim=-1) - candidate_probs  # of better tokens
    # A token is in the nucleus while the tokens before it hold less than top_p; the first
    # token has mass_before == 0 < top_p, so at least one token is always kept.
    # clamp: a top_p below float32's smallest value compares as 0, which keeps nothing.
    n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)  # (..., 1)
    threshold = candidates.gather(-1, n_keep - 1)  # (..., 1): the smallest logit kept
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device`, seeded with `seed` (an int in [0, 2**64), which
    `torch.Generator.manual_seed` takes as is), or from OS entropy when seed is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
        return generator
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    generator.manual_seed(seed)
    return generator


def is_one_hot(probs: Tensor) -> bool:
    """True when every row of `probs` `(..., V)` has exactly one nonzero entry (a greedy row)."""
    return bool(((probs != 0).sum(dim=-1) == 1).all())


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token id per row of `probs` `(..., V)`; returns long `(...)`.

    When every row is one-hot (greedy) the result is the argmax and no random numbers are
    consumed, so greedy decoding does not depend on the generator at all; else `categorical`.
    """
    if is_one_hot(probs):
        return probs.argmax(dim=-1)
    return categorical(probs, generator)


def categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one index per row of `probs` `(..., V)` (>= 0, need not be normalised): long `(...)`.

    Inverse-CDF sampling in float64: one uniform per row, located in the cumulative sums.
    Much cheaper than torch.multinomial for one draw from a large vocabulary, and exact:
    a zero-probability entry adds nothing to the cumulative sum, so no uniform can land on it,
    and u = r * total with r < 1 stays strictly below the total.
    Raises ValueError when a row has no positive, finite total mass.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (..., V)
    total = cdf[..., -1:]  # (..., 1)
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ValueError("probs must have a positive finite sum in every row")
    r = torch.rand(
        cdf.shape[:-1] + (1,), dtype=torch.float64, device=cdf.device, generator=generator
    )
    index = torch.searchsorted(cdf, r * total, right=True)  # first index with cdf > u
    return index[..., 0].clamp_(max=probs.shape[-1] - 1)  # clamp: defensive, see above
