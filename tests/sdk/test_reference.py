"""The target alone on one machine (`edgespec.reference`, `edgespec reference`): what a seeded
distributed output is reproduced with; and the 128k-vocabulary block sizes of the sampling bench."""

from __future__ import annotations

import re

from edgespec.bench.sampling import block_bytes_at_vocab
from edgespec.cli import main
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.reference import generate_reference

PROMPT = [5, 17, 42, 99, 3, 250]


def test_reference_is_the_target_alone_and_reports_its_seed(tiny_pair):
    params = SamplingParams(temperature=0.9, max_new_tokens=10)
    first = generate_reference(PROMPT, params, tiny_pair.target_dir)
    assert first.seed is not None and len(first.token_ids) == 10
    seeded = SamplingParams(temperature=0.9, max_new_tokens=10, seed=first.seed)
    runner = ModelRunner.from_pretrained(tiny_pair.target_dir)
    assert generate_autoregressive(runner, PROMPT, seeded).tokens == first.token_ids
    assert generate_reference(PROMPT, seeded, tiny_pair.target_dir).token_ids == first.token_ids


def test_reference_command_prints_tokens_and_seed(tiny_pair, capsys):
    argv = ["reference", "hello world", "--target", str(tiny_pair.target_dir)]
    argv += ["--temperature", "1.0", "--seed", str(2**64 - 1), "--max-new-tokens", "6"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    ids = [int(t) for t in re.search(r"token ids \[([^\]]*)\]", err).group(1).split(",")]
    expected = generate_reference(
        "hello world",
        SamplingParams(temperature=1.0, seed=2**64 - 1, max_new_tokens=6),
        tiny_pair.target_dir,
    )
    assert ids == expected.token_ids and f"seed {2**64 - 1}" in err


def test_block_bytes_grow_with_the_vocabulary_only_under_rejection():
    sizes = block_bytes_at_vocab(vocab_size=5000, k=4)["block_bytes"]
    assert sizes["coupled"] <= sizes["greedy"] + 16  # token ids only
    assert sizes["rejection_dense"] >= 4 * 5000 * 4  # k rows of V float32
    assert sizes["coupled"] < sizes["rejection_top_k50"] < sizes["rejection_dense"]
