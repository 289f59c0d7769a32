"""The one policy registry (edgespec.core.registry): what each built-in name builds from a session
spec (the edge engine's use) and from bare options (make_policy's), and custom registrations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.policy_sim import SimEnv, simulate

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.cost_model import CostModel
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    CloudOnlyPolicy,
    Decision,
    FixedPolicy,
    HeuristicPolicy,
)
from edgespec.core.registry import (
    _REGISTRY,
    PolicySpec,
    adaptive_policy,
    make_policy,
    policy_names,
    register_policy,
)


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_built_in_names() -> None:
    assert policy_names() == [
        "adaptive",
        "adaptive_tree",
        "cloud_only",
        "fixed",
        "heuristic",
        "tree",
    ]


def test_bare_names_build_each_policy_with_its_defaults() -> None:
    fixed = make_policy("fixed")
    assert isinstance(fixed, FixedPolicy) and fixed.k == 4
    heuristic = make_policy("heuristic")
    assert isinstance(heuristic, HeuristicPolicy)
    assert (heuristic.k, heuristic.k_min, heuristic.k_max) == (4, 1, 16)
    adaptive = make_policy("adaptive")
    assert isinstance(adaptive, AdaptivePolicy) and adaptive.config == AdaptiveConfig()
    assert not adaptive.warm
    cloud = make_policy("cloud_only")
    assert isinstance(cloud, CloudOnlyPolicy) and cloud.choose().mode == CLOUD_ONLY


def test_adaptive_options_keep_the_configs_own_derivations() -> None:
    # no k in the spec: k_init is derived by AdaptiveConfig from k_min / k_max
    policy = make_policy("adaptive", k_max=2)
    assert isinstance(policy, AdaptivePolicy) and policy.config.k_init == 2
    policy = make_policy("adaptive", k_min=6, k_max=9)
    assert isinstance(policy, AdaptivePolicy) and policy.config.k_init == 6


def test_a_session_spec_builds_what_the_edge_engine_asks_for() -> None:
    spec = PolicySpec(k=3, max_k=32, pipelined=True)
    assert spec.k_max == 16  # longer blocks pay off only with acceptance near 1
    assert make_policy("fixed", spec).choose() == Decision(SPECULATIVE, 3)
    heuristic = make_policy("heuristic", spec)
    assert isinstance(heuristic, HeuristicPolicy) and (heuristic.k, heuristic.k_max) == (3, 16)
    adaptive = make_policy("adaptive", spec)
    assert isinstance(adaptive, AdaptivePolicy)
    assert (adaptive.config.k_init, adaptive.config.k_max, adaptive.config.pipelined) == (
        3,
        16,
        True,
    )
    assert isinstance(make_policy("cloud_only", spec), CloudOnlyPolicy)


def test_spec_k_max_is_capped_by_max_k_and_never_below_k() -> None:
    assert PolicySpec(k=4, max_k=8).k_max == 8
    assert PolicySpec(k=24, max_k=32).k_max == 24
    assert PolicySpec(k=4).k_max is None
    heuristic = make_policy("heuristic", PolicySpec(k=24, max_k=32))
    assert isinstance(heuristic, HeuristicPolicy) and heuristic.k_max == 24


def test_options_override_what_the_spec_derives() -> None:
    policy = make_policy("adaptive", PolicySpec(k=4, max_k=32), k_max=8, allow_cloud_only=False)
    assert isinstance(policy, AdaptivePolicy)
    assert (policy.config.k_max, policy.config.allow_cloud_only) == (8, False)
    spec = PolicySpec(k=4, options={"k": 7})
    assert make_policy("fixed", spec).choose().k == 7


def test_adaptive_policy_starts_from_the_link_memory() -> None:
    env = SimEnv(0.8, CostModel(2.0, 20.0, 20.0, 1.0))
    learnt = adaptive_policy(PolicySpec(k=4, max_k=32))
    simulate(learnt, env, 60, seed=1)
    memory = learnt.memory()
    assert memory.usable
    warm = make_policy("adaptive", PolicySpec(k=4, max_k=32, memory=memory))
    assert isinstance(warm, AdaptivePolicy) and warm.warm


def test_errors_name_the_policy_or_option() -> None:
    with pytest.raises(
        ValueError, match=r"^policy must be one of \['adaptive', 'adaptive_tree', 'cloud_only'"
    ):
        make_policy("greedy")
    with pytest.raises(ValueError, match="^stream_tokens is not an option of the 'fixed' policy"):
        make_policy("fixed", stream_tokens=3)
    with pytest.raises(ValueError, match="^k0 is not an option of the 'fixed' policy"):
        make_policy("fixed", PolicySpec(options={"k0": 3}))
    with pytest.raises(ValueError, match="^k must be"):
        PolicySpec(k=0)
    with pytest.raises(ValueError, match="^max_k must be"):
        PolicySpec(max_k=True)
    with pytest.raises(ValueError, match="^pipelined must be a bool"):
        PolicySpec(pipelined=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^memory must be a PolicyMemory"):
        PolicySpec(memory="warm")  # type: ignore[arg-type]


def test_register_policy(restore_registry: None) -> None:
    seen: list[PolicySpec] = []

    def factory(spec: PolicySpec) -> FixedPolicy:
        seen.append(spec)
        return FixedPolicy(int(spec.options.get("depth", 1)))  # type: ignore[call-overload]

    register_policy("shallow", factory, options=("depth",))
    assert "shallow" in policy_names()
    assert make_policy("shallow").choose().k == 1
    assert make_policy("shallow", PolicySpec(k=5, max_k=8), depth=2).choose().k == 2
    assert seen[-1].k == 5 and seen[-1].max_k == 8
    with pytest.raises(ValueError, match="^k is not an option of the 'shallow' policy"):
        make_policy("shallow", k=3)
    with pytest.raises(ValueError, match="^name must be a non-empty str"):
        register_policy("", factory)
    with pytest.raises(ValueError, match="^factory must be callable"):
        register_policy("broken", "not a factory")  # type: ignore[arg-type]
