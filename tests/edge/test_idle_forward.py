"""The verifier's fixed cost of a forward alone, announced at OpenSession: measured by a real
verifier at its start, its profile's under an emulated one; the edge's policies measure the
verifier's load against it (`AdaptivePolicy.observe_verifier_idle`), also on real hardware."""

from __future__ import annotations

import grpc
import pytest
from support.verifier_client import open_session

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import get_profile
from edgespec.edge.engine import _idle_forward_ms
from edgespec.edge.verifier_link import SessionInfo
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc


def test_a_real_verifier_measures_it_an_emulated_one_models_it(target) -> None:
    real = VerifierEngine(target.model, VerifierConfig())
    assert real.idle_forward_ms == 0.0  # not known until measured: nothing runs unasked
    assert 0.0 < real.calibrate_idle_forward() == real.idle_forward_ms < 1000.0
    opened = real.open_session([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert opened.idle_forward_ms == real.idle_forward_ms
    emulated = VerifierEngine(target.model, VerifierConfig(), compute_profile="h100-70b")
    assert emulated.idle_forward_ms == get_profile("h100-70b").target.base_ms
    assert emulated.calibrate_idle_forward() == emulated.idle_forward_ms  # the profile's kept


def test_it_is_announced_over_grpc(grpc_verifier) -> None:
    grpc_verifier.engine.calibrate_idle_forward()
    with grpc.insecure_channel(grpc_verifier.address) as channel:
        response = open_session(pb_grpc.VerifierStub(channel))
    assert response.idle_forward_ms == pytest.approx(grpc_verifier.engine.idle_forward_ms)
    assert response.idle_forward_ms > 0


def _info(**fields) -> SessionInfo:
    return SessionInfo("v:1", "s", 3, 8, 100, "m", 0.0, **fields)


def test_the_edge_takes_the_announced_cost_else_the_profiles() -> None:
    assert _idle_forward_ms(_info(compute_profile="real", idle_forward_ms=4.5)) == 4.5
    # an older verifier announces nothing: an emulated profile still says it, a real one not
    assert _idle_forward_ms(_info(compute_profile="h100-70b")) == 30.0
    assert _idle_forward_ms(_info(compute_profile="real")) is None
    assert _idle_forward_ms(_info(compute_profile="some-future-profile")) is None
    assert _idle_forward_ms(None) is None
