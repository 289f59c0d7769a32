"""The processes a benchmark runs besides itself: a verifier server in a subprocess, and torch's
thread count in this one (both are set per run so the edge and the verifier share the host alike).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def verifier_process(
    target: Path,
    threads: int | None,
    start_timeout_s: float,
    extra_args: Sequence[str] = (),
    oracle_file: Path | None = None,
) -> Iterator[str]:
    """`python -m edgespec.cloud.server` serving `target` on a free port (plus `extra_args`);
    with `oracle_file`, `python -m edgespec.bench.emulated_verifier --oracle-prompts FILE`
    instead (the same server, its target emulated for greedy sessions of those prompts; needs an
    emulated ``--compute-profile`` in `extra_args`).

    Yields its ``host:port`` once it printed ``LISTENING``; terminates it on exit (killed if it
    does not stop within 10 s). `threads` (not None) sets its OMP_NUM_THREADS. Raises
    RuntimeError if it does not start within `start_timeout_s`.
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-m",
        "edgespec.bench.emulated_verifier" if oracle_file else "edgespec.cloud.server",
        "--target",
        str(target),
        "--log-level",
        "WARNING",
    ]
    cmd += ["--oracle-prompts", str(oracle_file)] if oracle_file else []
    cmd += list(extra_args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=start_timeout_s)
        except queue.Empty:
            line = None
        if not line or not line.startswith("LISTENING "):
            raise RuntimeError(f"verifier did not start (first line {line!r}): {' '.join(cmd)}")
        yield line.split()[1]
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate `proc` and wait for it; killed if it does not stop within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: left as it is) inside the block,
    restored after it."""
    import torch  # here: the floor's echo servers import this module and need no torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
