"""`edgespec up && edgespec generate "..." && edgespec status && edgespec down`, as a user runs it.

Each command is a separate process (the cluster must outlive the one that started it), with its
own state directory; the smallest local cluster (a head, one edge node, one cloud node) and the
tiny test pair keep it short. `down` must leave none of the cluster's processes behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

        status = _edgespec("status", *common)
        assert status.returncode == 0, status.stderr[-3000:]
        assert "nodes (3 alive of 3)" in status.stdout
        assert "edgespec-verifier-0" in status.stdout and "SERVING" in status.stdout
        assert "sessions (0 active)" in status.stdout

        as_json = json.loads(_edgespec("status", "--json", *common).stdout)
        assert as_json["verifiers"][0]["total_assigned"] == 1
    finally:
        down = _edgespec("down", *common)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not state_file.exists()
    assert not any(_alive(pid) for pid in state["pids"])
    # Without a cluster, the commands fail with one clear line, not a traceback.
    again = _edgespec("status", *common)
    assert again.returncode == 2 and "edgespec up" in again.stderr
    assert "Traceback" not in again.stderr
