"""edgespec's transport-free core: sampling, exact rejection sampling, model runners with KV-cache
rollback, the drafter/verifier session halves, co-located generation, draft-length policies (built
by name through `registry`) and compute profiles. No Ray, no gRPC."""

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy, Estimates
from edgespec.core.cost_model import (
    CostModel,
    best_k,
    expected_tokens,
    expected_tokens_per_position,
)
from edgespec.core.drafter import Drafter
from edgespec.core.generate import (
    GenerationResult,
    SpecStats,
    generate,
    generate_autoregressive,
)
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.params import SamplingParams
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    CloudOnlyPolicy,
    Decision,
    DraftLengthPolicy,
    FixedPolicy,
    HeuristicPolicy,
    RoundObservation,
)
from edgespec.core.profiles import (
    ComputeProfile,
    ForwardCost,
    PaddedRunner,
    get_profile,
    make_runner,
    profile_names,
)
from edgespec.core.registry import PolicySpec, make_policy, policy_names, register_policy
from edgespec.core.rejection import DraftProbs, Verification, verify
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs, make_generator, sample
from edgespec.core.session import DraftBlock, StaleBlockError, Verdict
from edgespec.core.verifier import Verifier

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
    "PolicySpec",
    "RoundObservation",
    "best_k",
    "expected_tokens",
    "expected_tokens_per_position",
    "get_profile",
    "make_policy",
    "policy_names",
    "register_policy",
    "make_runner",
    "profile_names",
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
