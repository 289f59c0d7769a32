"""The local deployment's start-up retry (`start_with_retry`): a Ray node that timed out during
start-up is started once more; nothing else is retried. Pure logic: the start-up is a callable
here, the real path runs in tests/reliability/test_chaos.py."""

from __future__ import annotations

import pytest

from edgespec.bench.local_deployment import start_with_retry

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")
GCS_TIMEOUT = RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")


class Starts:
    """Fails with the given errors in turn, then returns "node"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "node"


@pytest.mark.parametrize("timeout", [TIMEOUT, GCS_TIMEOUT])
def test_a_start_up_timeout_is_tried_once_more(timeout: Exception) -> None:
    start = Starts(timeout)
    assert start_with_retry(start, "the head") == "node"
    assert start.calls == 2


def test_two_timeouts_are_raised() -> None:
    start = Starts(TIMEOUT, TIMEOUT)
    with pytest.raises(Exception, match="timed out during startup"):
        start_with_retry(start, "the head")
    assert start.calls == 2


def test_other_failures_are_not_retried() -> None:
    start = Starts(ValueError("bad resources"))
    with pytest.raises(ValueError, match="bad resources"):
        start_with_retry(start, "the head")
    assert start.calls == 1
