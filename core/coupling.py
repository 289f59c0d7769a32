"""Coupled sampling: the same random noise on both sides of the link, derived from the seed.

The idea is from Daliri, Musco and Suresh (2024), "Coupling without Communication and
Drafter-Invariant Speculative Decoding". For the token at sequence position t (its index in the
whole sequence, prompt included), every token id v gets Gumbel noise g_t[v] that is a function of
(seed, t, v) alone. A model's coupled token at t is ``argmax_v (log p~_t[v] + g_t[v])``, where p~
is its distribution after temperature, top-k and top-p (`edgespec.core.sampling.processed_logits`):
by the Gumbel-max trick that is a sample of p~. The draft proposes its own coupled token; the
verifier computes the target's and accepts a draft token iff the two are equal, so the output is,
token for token, what the target alone produces with that seed, whatever the draft, the draft
length, pipelining, a failover or the replica. Only token ids cross the link.

The noise is defined by integers, so any implementation can reproduce it bit for bit:

- ``mix32`` is a 32-bit integer finaliser (xorshift-multiply rounds, constants from Chris
  Wellons' "lowbias32" search); every step is taken modulo 2**32.
- per seed: ``key = mix32(mix32(seed_lo ^ 0x9E3779B9) ^ seed_hi)`` (the seed's low and high
  32-bit halves) and ``key2 = mix32(key ^ 0x85EBCA6B)``;
- per position: ``h_t = mix32(key ^ mix32(t ^ 0xC2B2AE35))`` (t < 2**32);
- per token: ``bits = mix32(mix32(h_t ^ v) ^ key2)``, a 32-bit integer;
- ``u = (bits + 0.5) / 2**32`` (exact in float64, strictly inside (0, 1)) and
  ``g = -log(-log(u))`` in float64.

`noise_bits_reference` is the plain-Python definition; `noise_bits` the vectorised one (int64
torch ops whose every intermediate stays below 2**49, so CPU and CUDA agree bit for bit: no
device RNG, no overflow). The tests pin test vectors of both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edgespec.core.params import SEED_LIMIT, SamplingParams
from edgespec.core.sampling import processed_logits

MASK32 = 0xFFFFFFFF
POSITION_LIMIT = 2**32  # positions are hashed as 32-bit integers
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_SEED_SALT = 0x9E3779B9
_KEY2_SALT = 0x85EBCA6B
_POSITION_SALT = 0xC2B2AE35


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def _keys(seed: int) -> tuple[int, int]:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    key = _mix32_int(_mix32_int((seed & MASK32) ^ _SEED_SALT) ^ (seed >> 32))
    return key, _mix32_int(key ^ _KEY2_SALT)


def _check_position(t: int) -> None:
    if not 0 <= t < POSITION_LIMIT:
        raise ValueError(f"position must be in [0, 2**32), got {t}")


def noise_bits_reference(seed: int, position: int, token_id: int) -> int:
    """The 32 noise bits of (seed, position, token id): the definition, in plain Python ints."""
    key, key2 = _keys(seed)
    _check_position(position)
    h = _mix32_int(key ^ _mix32_int(position ^ _POSITION_SALT))
    return _mix32_int(_mix32_int(h ^ token_id) ^ key2)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow: c is split in 16-bit
    halves, so no product exceeds 2**48."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def noise_bits(
    seed: int, positions: Sequence[int], vocab_size: int, device: str | torch.device = "cpu"
) -> Tensor:
    """int64 (len(positions), vocab_size) in [0, 2**32): the noise bits of every token id at each
    position; row i equals `noise_bits_reference(seed, positions[i], v)` for every v."""
    key, key2 = _keys(seed)
    for t in positions:
        _check_position(t)
    pos = torch.tensor(list(positions), dtype=torch.int64, device=device)  # (n,)
    h = _mix32(key ^ _mix32(pos ^ _POSITION_SALT))  # (n,)
    ids = torch.arange(vocab_size, dtype=torch.int64, device=device)  # (V,)
    return _mix32(_mix32(h[:, None] ^ ids[None, :]) ^ key2)  # (n, V)


def gumbel_noise(
    seed: int, positions: Sequence[int], vocab_size: int, device: str | torch.device = "cpu"
) -> Tensor:
    """float64 (len(positions), vocab_size): standard Gumbel noise g = -log(-log(u)) with
    u = (bits + 0.5) / 2**32 from `noise_bits`."""
    bits = noise_bits(seed, positions, vocab_size, device)
    u = (bits.to(torch.float64) + 0.5) * 2.0**-32
    return -torch.log(-torch.log(u))


def coupled_tokens(
    logits: Tensor, params: SamplingParams, seed: int, positions: Sequence[int]
) -> Tensor:
    """The coupled token of each row of `logits` (n, V): long (n,).

    Row i scores sequence position `positions[i]`. Greedy params give the argmax (no noise);
    otherwise argmax(processed logits + Gumbel noise of (seed, position)), a sample of the
    processed distribution p~. `processed_logits` differs from log p~ by a per-row constant,
    which does not move the argmax.
    """
    if logits.dim() != 2 or logits.shape[0] != len(positions):
        raise ValueError(
            f"logits must be (len(positions), V) = ({len(positions)}, V), got {tuple(logits.shape)}"
        )
    if params.is_greedy:
        return logits.argmax(dim=-1)
    return coupled_scores(logits, params, seed, positions).argmax(dim=-1)


def coupled_scores(
    logits: Tensor, params: SamplingParams, seed: int, positions: Sequence[int]
) -> Tensor:
    """float64 (n, V): processed logits plus the Gumbel noise of (seed, position) for each row of
    `logits` (n, V) (sampling params only); -inf outside p~'s support. Their argmax is the
    coupled token, their order ranks a model's coupled proposals (draft trees)."""
    scores = processed_logits(logits, params).to(torch.float64)
    return scores + gumbel_noise(seed, positions, logits.shape[-1], logits.device)
