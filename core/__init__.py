"""edgespec's transport-free core: sampling, exact rejection sampling, model runners with KV-cache
rollback, the drafter/verifier session halves, co-located generation, draft-length controllers and
compute profiles. No Ray, no gRPC."""

from edgespec.core.controller import (
    CLOUD_ONLY,
    SPECULATIVE,
    AdaptiveConfig,
    AdaptivePolicy,
    CloudOnlyPolicy,
    CostModel,
    Decision,
    DraftLengthPolicy,
    Estimates,
    FixedPolicy,
    HeuristicPolicy,
    PolicyMemory,
    RoundObservation,
    SimEnv,
    SimResult,
    best_k,
    expected_tokens,
    expected_tokens_per_position,
    make_policy,
    simulate,
)
from edgespec.core.generate import (
    GenerationResult,
    SpecStats,
    generate,
    generate_autoregressive,
)
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import (
    ComputeProfile,
    ForwardCost,
    PaddedRunner,
    get_profile,
    make_runner,
    profile_names,
)
from edgespec.core.rejection import DraftProbs, Verification, verify
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample
from edgespec.core.session import (
    DraftBlock,
    Drafter,
    StaleBlockError,
    Verdict,
    Verifier,
)

__all__ = [
    "CLOUD_ONLY",
    "SPECULATIVE",
    "AdaptiveConfig",
    "AdaptivePolicy",
    "CloudOnlyPolicy",
    "ComputeProfile",
    "CostModel",
    "Decision",
    "DraftLengthPolicy",
    "Estimates",
    "FixedPolicy",
    "ForwardCost",
    "HeuristicPolicy",
    "PaddedRunner",
    "PolicyMemory",
    "RoundObservation",
    "SimEnv",
    "SimResult",
    "best_k",
    "expected_tokens",
    "expected_tokens_per_position",
    "get_profile",
    "make_policy",
    "make_runner",
    "profile_names",
    "simulate",
    "DraftBlock",
    "DraftProbs",
    "Drafter",
    "GenerationResult",
    "ModelRunner",
    "SamplingParams",
    "SpecStats",
    "StaleBlockError",
    "Verdict",
    "Verification",
    "Verifier",
    "generate",
    "generate_autoregressive",
    "logits_to_probs",
    "make_generator",
    "sample",
    "verify",
]
