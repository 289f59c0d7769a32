"""edgespec's transport-free core: sampling, exact rejection sampling, model runners with KV-cache
rollback, the drafter/verifier session halves and co-located generation. No Ray, no gRPC."""

from speculative.generate import (
    GenerationResult,
    SpecStats,
    generate,
    generate_autoregressive,
)
from speculative.params import SamplingParams
from speculative.rejection import DraftProbs, Verification, verify
from speculative.runner import ModelRunner
from speculative.sampling import logits_to_probs, make_generator, sample
from speculative.session import (
    DraftBlock,
    Drafter,
    StaleBlockError,
    Verdict,
    Verifier,
)

__all__ = [
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
