"""The target alone, on this machine: the reference any distributed output can be checked against.

Under greedy decoding and coupled sampling a distributed generation is, token for token, what
`generate_reference` returns for the same prompt and params (coupled: the same seed; take it
from `Result.seed` when the edge drew it). It runs `edgespec.core.generate.generate_autoregressive`
(the coupled sampler the verifier uses) on the target checkpoint, one forward per token.

Example::

    from edgespec import Client, SamplingParams
    from edgespec.reference import generate_reference

    params = SamplingParams(temperature=0.8, max_new_tokens=32)
    with Client("127.0.0.1:50051") as client:
        result = client.generate("def f(x):", params)
    local = generate_reference("def f(x):", replace(params, seed=result.seed))
    assert local.token_ids == result.token_ids
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgespec.core.demo_pair import resolve_pair
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner


@dataclass(frozen=True)
class ReferenceResult:
    """The target alone's generation: tokens (prompt excluded), their text, why it stopped and
    the seed it was sampled with (None when greedy)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int | None


def generate_reference(
    prompt: str | Sequence[int],
    params: SamplingParams,
    target: str | Path | None = None,
    device: str = "cpu",
    add_special_tokens: bool = False,
) -> ReferenceResult:
    """Generate with the target checkpoint `target` (default: the shipped demo target) alone.

    `prompt` is text (encoded as the edge encodes it: `add_special_tokens` as in the edge's
    EngineConfig, False by default) or token ids. A coupled
    sampling request without a seed gets one drawn, returned in the result. Raises ValueError for
    bad params or prompt ids.
    """
    target_path, _ = resolve_pair(str(target) if target is not None else None, None)
    tokenizer = load_tokenizer(target_path)
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    else:
        prompt_ids = list(prompt)
    runner = ModelRunner.from_pretrained(target_path, device=device)
    result = generate_autoregressive(runner, prompt_ids, params)
    return ReferenceResult(
        text=tokenizer.decode(result.tokens),
        token_ids=result.tokens,
        finish_reason=result.finish_reason,
        seed=result.seed,
    )
