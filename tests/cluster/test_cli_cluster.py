"""`edgespec up && edgespec generate "..." && edgespec status && edgespec down`, as a user runs it,
and the `openai` client on the HTTP URL that `up` prints.

Each command is a separate process (the cluster must outlive the one that started it), with its
own state directory; the smallest local cluster (a head, one edge node, one cloud node) and the
tiny test pair keep it short. `down` must leave none of the cluster's processes behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _edgespec(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "edgespec.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_generate_status_down(tiny_pair, tmp_path):
    state_dir = tmp_path / "state"
    common = ["--state-dir", str(state_dir)]
    up = _edgespec(
        "up",
        "--target",
        str(tiny_pair.target_dir),
        "--draft",
        str(tiny_pair.draft_dir),
        "--edge-nodes=1",
        "--cloud-nodes=1",
        "--verifiers=1",
        "--edges=1",
        *common,
    )
    state_file = state_dir / "state.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "starting the head node" in up.stderr  # progress is shown
        assert "edgespec-verifier-0" in up.stdout and "edgespec-edge-0" in up.stdout
        state = json.loads(state_file.read_text())
        assert state["local"] and len(state["pids"]) == 3  # head + edge node + cloud node

        gen = _edgespec("generate", "def verify(block):", "--max-new-tokens", "12", *common)
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert gen.stdout.startswith("def verify(block):")
        assert "12 tokens (length)" in gen.stderr

        # The edge's OpenAI-compatible API, at the URL `up` printed: the same greedy text as
        # the gRPC path (`edgespec generate`), streamed.
        (base_url,) = re.findall(r"http (http://\S+/v1)", up.stdout)
        client = openai.OpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)
        stream = client.completions.create(
            model="edgespec",
            prompt="def verify(block):",
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},  # as `edgespec generate`, which has no stop id
        )
        text = "".join(chunk.choices[0].text for chunk in stream)
        assert gen.stdout == "def verify(block):" + text + "\n"
        chat = client.chat.completions.create(
            model="edgespec",
            messages=[{"role": "user", "content": "def f(x):"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        assert [c.choices[0].finish_reason for c in chat][-1] in ("stop", "length")

        status = _edgespec("status", *common)
        assert status.returncode == 0, status.stderr[-3000:]
        assert "nodes (3 alive of 3)" in status.stdout
        assert "edgespec-verifier-0" in status.stdout and "SERVING" in status.stdout
        assert "sessions (0 active)" in status.stdout
        assert f"http={base_url}" in status.stdout

        as_json = json.loads(_edgespec("status", "--json", *common).stdout)
        # one session per generation: `edgespec generate` and the two over HTTP
        assert as_json["verifiers"][0]["total_assigned"] == 3
    finally:
        down = _edgespec("down", *common)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not state_file.exists()
    assert not any(_alive(pid) for pid in state["pids"])
    # Without a cluster, the commands fail with one clear line, not a traceback.
    again = _edgespec("status", *common)
    assert again.returncode == 2 and "edgespec up" in again.stderr
    assert "Traceback" not in again.stderr
