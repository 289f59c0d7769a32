"""Sampling parameters shared by the draft side and the target side.

`SamplingParams` crosses every boundary (SDK -> edge -> cloud), so it validates itself on
construction and converts to and from a plain JSON-able dict for the wire.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from edgespec.core.validation import check_float, check_int, is_int

MAX_NEW_TOKENS_LIMIT = 1_000_000
SEED_LIMIT = 2**64  # seeds are 0 <= seed < 2**64: the wire's uint64 range
# float32's smallest positive value (a subnormal). Logits are float32, so a temperature below it
# would divide by 0 there: such a temperature is greedy (the limit of sampling as t -> 0).
FLOAT32_TINY = 2.0**-149
# How a sampled (temperature > 0) token is verified: "coupled" (both sides derive the same noise
# from the seed; only token ids cross the link; the output is the target alone's with that seed)
# or "rejection" (the edge sends the draft distribution q; exact in distribution only).
SAMPLER_COUPLED = "coupled"
SAMPLER_REJECTION = "rejection"
SAMPLERS = (SAMPLER_COUPLED, SAMPLER_REJECTION)


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into the next token; identical for drafting and verifying.

    Every field is validated in `__post_init__`; a bad value raises `ValueError` naming the
    field, the value and the allowed range. Numbers are normalised (`temperature=1` becomes
    `1.0`, a list of stop ids becomes a tuple) so equal params compare equal.
    """

    # 0 => greedy (argmax); else logits are divided by it. A value below FLOAT32_TINY is read
    # as 0 (greedy).
    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens; 0 => disabled
    # keep the smallest set with mass >= top_p, in (0, 1]; 1 => disabled; the top token is
    # always kept (a top_p too small for float32 keeps only it)
    top_p: float = 1.0
    max_new_tokens: int = 64  # generated tokens at most, 1..1_000_000
    seed: int | None = None  # None => nondeterministic; else 0 <= seed < 2**64
    stop_token_ids: tuple[int, ...] = ()  # generation stops after emitting any of these
    # How sampled tokens are verified (see SAMPLERS); ignored when greedy.
    sampler: str = SAMPLER_COUPLED

    def __post_init__(self) -> None:
        # frozen: normalised values are written back with object.__setattr__.
        set_ = object.__setattr__
        # int bounds: the message reads "in (0, 1]", not "in (0.0, 1.0]"
        temperature = check_float("temperature", self.temperature, 0)
        set_(self, "temperature", 0.0 if temperature < FLOAT32_TINY else temperature)
        set_(self, "top_p", check_float("top_p", self.top_p, 0, 1, lo_open=True))
        set_(self, "top_k", check_int("top_k", self.top_k, 0))
        max_new = check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS_LIMIT)
        set_(self, "max_new_tokens", max_new)
        if self.seed is not None:
            set_(self, "seed", check_int("seed", self.seed, 0, SEED_LIMIT - 1))
        set_(self, "stop_token_ids", _check_stop_ids(self.stop_token_ids))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0): no randomness at all."""
        return self.temperature == 0.0

    @property
    def is_coupled(self) -> bool:
        """True when sampled tokens are verified by coupling (the draft sends no q)."""
        return not self.is_greedy and self.sampler == SAMPLER_COUPLED

    def with_seed(self) -> SamplingParams:
        """These params, with a seed drawn from OS entropy when sampling without one, so every
        sampled output can be reproduced (the seed is reported with it); greedy params and
        seeded ones are returned unchanged."""
        if self.is_greedy or self.seed is not None:
            return self
        return replace(self, seed=secrets.randbits(64))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats, ints, None, a list) with every field."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "stop_token_ids": list(self.stop_token_ids),
            "sampler": self.sampler,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"SamplingParams.from_dict needs a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in d if key not in known)
        if unknown:
            raise ValueError(
                f"unknown SamplingParams field(s) {unknown}; allowed fields are {sorted(known)}"
            )
        return cls(**d)


def _check_stop_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"stop_token_ids must be a list or tuple of ints >= 0, got {type(value).__name__}"
        )
    for token in value:
        if not is_int(token) or token < 0:
            raise ValueError(f"stop_token_ids must hold only ints >= 0, got {token!r} in {value!r}")
    return tuple(int(token) for token in value)
