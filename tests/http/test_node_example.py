"""examples/node (grpc-js + proto-loader, the .proto loaded at run time) against a real edge on
127.0.0.1: installed from its lock file in a temporary copy, as a new user would, its streamed
greedy output must be the target's alone (token for token)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.tiny_models import hf_greedy

from edgespec.core.runner import ModelRunner

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def verify(block):"
MAX_NEW_TOKENS = 16


@pytest.mark.slow
def test_node_example_streams_the_targets_greedy_output(edge, tiny_pair, tmp_path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed (Node 20 is on every CI machine)")
    example = tmp_path / "node"
    shutil.copytree(
        REPO / "examples" / "node", example, ignore=shutil.ignore_patterns("node_modules")
    )
    install = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {
        **os.environ,
        "EDGESPEC_PROTO": str(REPO / "protos" / "edgespec" / "v1" / "edgespec.proto"),
    }
    run = subprocess.run(
        ["node", "generate.js", edge.grpc_address, PROMPT, str(MAX_NEW_TOKENS)],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ids = [int(t) for t in re.search(r"token_ids \[([\d,]*)\]", run.stderr).group(1).split(",")]
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    tokenizer = edge.engine.tokenizer
    expected = hf_greedy(target, edge.engine.encode_prompt(PROMPT), MAX_NEW_TOKENS)
    assert ids == expected
    assert run.stdout == tokenizer.decode(expected) + "\n"
    assert f"{MAX_NEW_TOKENS} tokens (length)" in run.stderr
