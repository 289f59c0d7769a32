"""Compute profiles: how long a forward pass of each model takes, real or emulated.

An experiment runs the demo models on whatever machine it has. To study a deployment we cannot
run here (a 70B-class target on an H100, a 1B-class draft on an edge GPU), an *emulated* profile
pads every forward pass to a modelled time: `PaddedRunner` runs the real (small) model, so every
token is real and exactness is untouched, then sleeps for whatever the model's time leaves. Only
timing is emulated; an emulated profile says so (`emulated=True`) wherever it is reported.

The time model of one forward over n new tokens is affine, ``base_ms + per_token_ms * n``, for
four kinds of pass: target verification/decoding, target prefill, draft decoding, draft prefill.
Padding gives a LOWER bound: when the real compute is slower than the model (a loaded host), the
pass takes its real time and the runner counts an overrun.

Profiles (`get_profile(name)`):

- ``real``: no padding; the models as they run here.
- ``h100-70b``: a 70B-class target on one H100 SXM, a 1B-class draft on an edge GPU. Numbers
  (decode is memory-bandwidth bound: each forward streams every weight once):

  * target decode/verify: 70B parameters in FP8/INT8 = 70 GB; H100 SXM HBM3 bandwidth
    3.35 TB/s -> 70 / 3350 s = 20.9 ms at peak. Kernels reach ~80-85 % of peak bandwidth
    (~25 ms), plus KV-cache reads, kernel launches and sampling: about 30 ms per forward.
    Verifying a block of n positions adds compute: 2 * 70e9 = 140 GFLOP per position, at a
    realistic ~700 TFLOP/s of the 1979 dense FP8 TFLOP/s ~0.2 ms per position; the weights are
    read once however many positions there are, so the cost stays ~30 ms + 0.2 ms * n for the
    block sizes used here (n <= 33).
  * target prefill: compute bound, ~0.2 ms per prompt token on top of one weight pass (30 ms).
  * draft decode: a 1.2B-parameter model (Llama-3.2-1B class) in FP16 = 2.5 GB; an edge GPU
    with 300-400 GB/s (RTX 3060 / 4060 Ti: 360 / 288 GB/s; Jetson AGX Orin: 205 GB/s) reads it
    in 6-9 ms at peak, ~7 ms at 80 % of 360 GB/s: 6 ms + 0.1 ms per token fed (a draft forward
    feeds 1-2 tokens).
  * draft prefill: 6 ms + 0.05 ms per prompt token (2.4 GFLOP per token at ~50 TFLOP/s).

  * a BATCHED target forward (`BatchRoofline`, used by the batching verifier): one step over B
    sessions, session b with P_b tokens cached and n_b fed, is memory- or compute-bound,
    whichever is slower (a roofline), plus a fixed overhead:
    ``overhead_ms + max(weights_ms + kv_ms_per_token * sum_b (P_b + n_b),
    compute_ms_per_token * sum_b n_b)``. Weights are read once per forward: 70 GB at an
    effective 2.68 TB/s (80 % of 3.35 TB/s) = 26.1 ms; overhead 3.9 ms (launches, sampling:
    a one-session step of a few tokens costs the 30 ms above). Each session's KV is read once:
    Llama-3-70B has 80 layers x 8 KV heads x 128 dims x 2 (K and V) = 163,840 values per token,
    1 byte each in FP8 = 160 KiB, 6.1e-5 ms per cached token at 2.68 TB/s (32 sessions of 1000
    tokens: 2 ms). Compute: 0.2 ms per fed token as above; attention's own FLOPs (2.6 MFLOP
    per query-key pair, ~2 % of a token's 140 GFLOP at 1000 cached tokens) are left out. The
    bound crosses from memory to compute at ~130 fed tokens per step.

- ``h100-70b-cloud-draft``: cloud-side speculative decoding on the same H100: the target as in
  ``h100-70b``, and the 1B-class draft beside it on the verifier's GPU (the edge drafts nothing,
  its draft forwards cost 0). A batched step of B sessions first runs max_b k_b draft forwards,
  each ``3.9 ms + max(26.1 ms * r, 0.2 ms * r * B)`` with r = 1.2 / 70 (the draft's weights and
  FLOPs per token scaled by its parameter count; launches and sampling as the target's), then
  the target forward. The draft's prefill and KV reads are left out.

  Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM: 3.35 TB/s HBM3, 1979 TFLOPS dense FP8);
  NVIDIA GeForce RTX 3060 / 4060 Ti and Jetson AGX Orin specifications (memory bandwidth);
  Meta Llama 3.2 1B model card (1.24B parameters); the Llama-3-70B config (80 layers,
  8 KV heads, head dim 128); the roofline model of Williams et al. 2009; the memory-bound decode argument of Pope et
  al. 2022, "Efficiently Scaling Transformer Inference", and Leviathan et al. 2023. These are
  modelled times, not measurements.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor
from transformers import PreTrainedModel

from edgespec.core.runner import ModelRunner, TokenIds
from edgespec.core.validation import check_ms

logger = logging.getLogger(__name__)

__all__ = [
    "BatchRoofline",
    "cloud_draft_profile",
    "ComputeProfile",
    "ForwardCost",
    "PaddedRunner",
    "get_profile",
    "make_runner",
    "pad_until",
    "profile_names",
]


@dataclass(frozen=True)
class ForwardCost:
    """Modelled time of one forward pass over n new tokens: base_ms + per_token_ms * n."""

    base_ms: float = 0.0
    per_token_ms: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_ms", check_ms("base_ms", self.base_ms))
        object.__setattr__(self, "per_token_ms", check_ms("per_token_ms", self.per_token_ms))

    def ms(self, n_tokens: int) -> float:
        """Modelled milliseconds of a forward feeding `n_tokens` (>= 1) tokens."""
        return self.base_ms + self.per_token_ms * n_tokens

    @property
    def is_zero(self) -> bool:
        return self.base_ms == 0.0 and self.per_token_ms == 0.0


@dataclass(frozen=True)
class BatchRoofline:
    """Modelled time of ONE target forward over a batch of sessions (a roofline): weights read
    once, each session's KV read once, compute per fed token; the slower of memory and compute,
    plus a fixed overhead. See the module docstring for the h100-70b numbers."""

    overhead_ms: float = 0.0  # launches, sampling: paid once per forward
    weights_ms: float = 0.0  # reading every weight once
    kv_ms_per_token: float = 0.0  # reading one cached (or written) token's keys/values
    compute_ms_per_token: float = 0.0  # matmul FLOPs of one fed token

    def __post_init__(self) -> None:
        for name in ("overhead_ms", "weights_ms", "kv_ms_per_token", "compute_ms_per_token"):
            object.__setattr__(self, name, check_ms(name, getattr(self, name)))

    def ms(self, rows: Sequence[tuple[int, int]]) -> float:
        """Modelled milliseconds of a forward over `rows`: per session (tokens cached before the
        forward, tokens fed), each fed count >= 1."""
        kv_tokens = sum(cached + fed for cached, fed in rows)
        fed_tokens = sum(fed for _, fed in rows)
        memory = self.weights_ms + self.kv_ms_per_token * kv_tokens
        return self.overhead_ms + max(memory, self.compute_ms_per_token * fed_tokens)


@dataclass(frozen=True)
class ComputeProfile:
    """Forward-time models of the target and the draft (verification/decoding and prefill).

    `emulated`: forwards are padded to the modelled times (results must say so); False means
    the models run at their real speed and every cost is zero (no padding). `sources` justifies
    the numbers (free text, reported with results).
    """

    name: str
    emulated: bool
    target: ForwardCost = ForwardCost()  # verify a block / decode a token, per forward
    target_prefill: ForwardCost = ForwardCost()
    draft: ForwardCost = ForwardCost()  # one draft forward (1-2 tokens fed)
    draft_prefill: ForwardCost = ForwardCost()
    # A batched target forward (the batching verifier's step); None: not emulated (no padding).
    target_batch: BatchRoofline | None = None
    # The draft's batched forward on the verifier's own GPU (cloud-side speculative decoding:
    # the edge sends no draft work of its own). When set, a batched step also pays, before its
    # target forward, max_b(fed_b - 1) draft forwards over its B sessions (one token each).
    cloud_draft: BatchRoofline | None = None
    description: str = ""
    sources: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.emulated, bool):
            raise ValueError(f"emulated must be a bool, got {self.emulated!r}")
        for role in ("target", "target_prefill", "draft", "draft_prefill"):
            if not isinstance(getattr(self, role), ForwardCost):
                raise ValueError(f"{role} must be a ForwardCost, got {getattr(self, role)!r}")
        for name in ("target_batch", "cloud_draft"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, BatchRoofline):
                raise ValueError(f"{name} must be a BatchRoofline or None, got {value!r}")
        if self.cloud_draft is not None and self.target_batch is None:
            raise ValueError("cloud_draft needs target_batch (it adds to the batched step)")

    def costs(self, role: str) -> tuple[ForwardCost, ForwardCost]:
        """(forward cost, prefill cost) of `role`, "target" or "draft"."""
        if role == "target":
            return self.target, self.target_prefill
        if role == "draft":
            return self.draft, self.draft_prefill
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}")

    def target_step_ms(self, rows: Sequence[tuple[int, int]]) -> float:
        """Modelled milliseconds of one batched target forward over `rows` (per session: tokens
        cached, tokens fed); 0 when the profile models no batched forward."""
        if self.target_batch is None:
            return 0.0
        step = self.target_batch.ms(rows)
        drafted = max((fed - 1 for _, fed in rows), default=0)
        if self.cloud_draft is not None and drafted > 0:
            step += drafted * self.cloud_draft.ms([(0, 1)] * len(rows))
        return step

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for result files)."""
        return asdict(self)


_H100_70B_SOURCES = (
    "Modelled, not measured. Target: 70B params FP8/INT8 = 70 GB read per forward; H100 SXM "
    "HBM3 3.35 TB/s -> 20.9 ms at peak, ~25 ms at 80-85% of peak, + KV reads, launches, "
    "sampling ~ 30 ms per forward; + ~0.2 ms per verified position (140 GFLOP each at "
    "~700 of 1979 dense FP8 TFLOP/s). Draft: 1.2B params FP16 = 2.5 GB on an edge GPU with "
    "300-400 GB/s (RTX 3060 360 GB/s, RTX 4060 Ti 288 GB/s, Jetson AGX Orin 205 GB/s) ~ 6-7 ms "
    "per forward. Sources: NVIDIA H100 datasheet; NVIDIA RTX 3060/4060 Ti and Jetson AGX Orin "
    "specifications; Llama 3.2 1B model card; Pope et al. 2022 (Efficiently Scaling Transformer "
    "Inference) for memory-bound decoding."
)

# A 1.2B-parameter draft (Llama-3.2-1B class) beside the 70B target on the same H100: its
# weights and FLOPs per token scale by 1.2 / 70 (KV reads ignored); launches and sampling cost
# the target's per-forward overhead.
_CLOUD_DRAFT_RATIO = 1.2 / 70.0
_H100_TARGET_BATCH = BatchRoofline(
    overhead_ms=3.9,
    weights_ms=70e9 / 2.68e12 * 1e3,  # 26.1 ms: 70 GB at 80 % of 3.35 TB/s
    kv_ms_per_token=163_840 / 2.68e12 * 1e3,  # 6.1e-5 ms
    compute_ms_per_token=0.2,
)

_H100_70B = ComputeProfile(
    name="h100-70b",
    emulated=True,
    target=ForwardCost(base_ms=30.0, per_token_ms=0.2),
    target_prefill=ForwardCost(base_ms=30.0, per_token_ms=0.2),
    draft=ForwardCost(base_ms=6.0, per_token_ms=0.1),
    draft_prefill=ForwardCost(base_ms=6.0, per_token_ms=0.05),
    target_batch=_H100_TARGET_BATCH,
    description="EMULATED: 70B-class target on one H100 SXM (FP8), 1B-class draft on an "
    "edge GPU (FP16)",
    sources=_H100_70B_SOURCES,
)

_PROFILES: dict[str, ComputeProfile] = {
    "real": ComputeProfile(
        name="real",
        emulated=False,
        description="the models as they run on this machine (no padding)",
        sources="measured: no padding is applied",
    ),
    "h100-70b": _H100_70B,
    # the same GPU and target, the draft beside it: the edge drafts nothing
    "h100-70b-cloud-draft": replace(
        _H100_70B,
        name="h100-70b-cloud-draft",
        draft=ForwardCost(),
        draft_prefill=ForwardCost(),
        cloud_draft=replace(
            _H100_TARGET_BATCH,
            weights_ms=_H100_TARGET_BATCH.weights_ms * _CLOUD_DRAFT_RATIO,  # 0.45 ms
            kv_ms_per_token=0.0,
            compute_ms_per_token=_H100_TARGET_BATCH.compute_ms_per_token * _CLOUD_DRAFT_RATIO,
        ),
        description="EMULATED: cloud-side speculative decoding, the 70B-class target and its "
        "1B-class draft on one H100 SXM (h100-70b's roofline; the draft's forwards scaled to "
        "1.2B parameters, paid in the verifier's steps; the edge drafts nothing)",
    ),
}


def cloud_draft_profile(name: str) -> str | None:
    """The name of `name`'s cloud-side speculative decoding variant (its draft on the
    verifier's GPU, `ComputeProfile.cloud_draft`): `name` itself if it is one, else
    ``<name>-cloud-draft`` if known; None otherwise."""
    for candidate in (name, f"{name}-cloud-draft"):
        profile = _PROFILES.get(candidate)
        if profile is not None and profile.cloud_draft is not None:
            return candidate
    return None


def profile_names() -> list[str]:
    """Names `get_profile` knows."""
    return sorted(_PROFILES)


def get_profile(name: str | ComputeProfile) -> ComputeProfile:
    """The profile named `name` ("real", "h100-70b"); a `ComputeProfile` is returned as is."""
    if isinstance(name, ComputeProfile):
        return name
    profile = _PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        raise ValueError(f"compute profile must be one of {profile_names()}, got {name!r}")
    return profile


class PaddedRunner(ModelRunner):
    """A `ModelRunner` whose every `prefill`/`extend`/`extend_tree` takes at least its modelled
    time (a tree forward costs what a block of as many tokens does).

    It runs the real model (outputs unchanged), then sleeps for what the model's time leaves
    (`cost.ms(n)` for n tokens fed, `prefill_cost` for a prefill). When the real forward alone
    takes longer, nothing is added and the pass counts as an overrun (`overruns`,
    `overrun_ms`): the emulation is then slower than modelled, never faster. On a CUDA device the
    forward is synchronised before it is timed.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cost: ForwardCost,
        prefill_cost: ForwardCost | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model, device=device)
        self.cost = cost
        self.prefill_cost = prefill_cost if prefill_cost is not None else cost
        self.padded_ms = 0.0  # total sleep added
        self.overruns = 0  # forwards whose real time exceeded the model
        self.overrun_ms = 0.0  # total excess of those
        self.modelled_ms = 0.0  # total modelled time of every forward
        self.wall_ms = 0.0  # total time they took, padding (and a sleep's lateness) included

    def prefill(self, ids: TokenIds) -> Tensor:
        t0 = time.perf_counter()
        out = super().prefill(ids)
        self._pad(t0, self.prefill_cost.ms(self._count(ids)))
        return out

    def extend(self, ids: TokenIds) -> Tensor:
        t0 = time.perf_counter()
        out = super().extend(ids)
        self._pad(t0, self.cost.ms(self._count(ids)))
        return out

    def extend_tree(
        self,
        ids: Sequence[int],
        parents: Sequence[int],
        tree_start: int | None = None,
        *,
        guesses: bool = False,
    ) -> Tensor:
        t0 = time.perf_counter()
        out = super().extend_tree(ids, parents, tree_start, guesses=guesses)
        self._pad(t0, self.cost.ms(len(ids)))
        return out

    @staticmethod
    def _count(ids: TokenIds) -> int:
        return int(ids.numel()) if isinstance(ids, Tensor) else len(ids)

    def _pad(self, t0: float, target_ms: float) -> None:
        left_ms = pad_until(t0, target_ms, self.device)
        if left_ms > 0:
            self.padded_ms += left_ms
        elif target_ms > 0:
            self.overruns += 1
            self.overrun_ms -= left_ms
        self.modelled_ms += target_ms
        self.wall_ms += (time.perf_counter() - t0) * 1e3


def pad_until(t0: float, target_ms: float, device: torch.device) -> float:
    """Sleep until `target_ms` after perf_counter time `t0` (a CUDA device is synchronised
    first, so its work is counted). Returns the ms slept, or minus the ms by which the work
    already overran `target_ms` (nothing slept)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    left_ms = target_ms - (time.perf_counter() - t0) * 1e3
    if left_ms > 0:
        time.sleep(left_ms / 1e3)
    elif target_ms > 0:
        logger.debug("forward overran its modelled %.2f ms by %.2f ms", target_ms, -left_ms)
    return left_ms


def measure_idle_forward_ms(runner: ModelRunner, repeats: int = 5) -> float:
    """The fixed cost of one forward with nothing else in it: the median wall time of a
    one-token forward after an 8-token context, `repeats` times (the first, warm-up, dropped;
    a CUDA device synchronised). Leaves the runner's cache empty."""
    runner.reset()
    runner.prefill([0] * 8)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        runner.extend([0])
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        times.append((time.perf_counter() - t0) * 1e3)
        runner.rollback(8)
    runner.reset()
    return statistics.median(times[1:])


def make_runner(
    model: PreTrainedModel,
    profile: ComputeProfile | str | None,
    role: str,
    device: str | torch.device | None = None,
) -> ModelRunner:
    """A runner for `model` playing `role` ("target" or "draft") under `profile`: a plain
    `ModelRunner` when the profile pads nothing (None = "real"), else a `PaddedRunner`."""
    profile = get_profile(profile if profile is not None else "real")
    cost, prefill = profile.costs(role)
    if cost.is_zero and prefill.is_zero:
        return ModelRunner(model, device=device)
    return PaddedRunner(model, cost, prefill, device=device)
