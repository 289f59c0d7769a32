"""Draft-length policies by name: the one registry the edge engine, its server CLI, the benches
and the tests build policies from.

A factory is handed a `PolicySpec` (what the session asks for: a draft length, the caller's cap
on it, pipelining, the link memory, and named options) and returns a fresh policy. The built-in
names and what their factories make of a spec:

- ``"fixed"``: `FixedPolicy(k)`; option ``k``.
- ``"heuristic"``: `HeuristicPolicy(k0=k, k_max=...)`; options ``k0``, ``k_min``, ``k_max``.
- ``"adaptive"``: `AdaptivePolicy(AdaptiveConfig(k_init=k, k_max=..., pipelined=...), memory)`;
  options: the fields of `AdaptiveConfig`.
- ``"cloud_only"``: `CloudOnlyPolicy()`; option ``stream_tokens``.
- ``"tree"``: `FixedTreePolicy()`, token trees of one shape; options ``nodes``, ``depth``,
  ``width``.
- ``"adaptive_tree"``: `TreePolicy`, the adaptive policy that also chooses token-tree shapes;
  options: the fields of `AdaptiveConfig` (``explore_every`` defaults to 24 here: its chain
  probes cost a tree round's extra tokens; trees of 10-64 nodes spread the t_v(n) fit, and the
  verifier's told fixed cost bounds the cloud-only estimate that the rare probes leave loose).

A spec field left at None leaves the policy's own default; an option overrides what the factory
derives from the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edgespec.core.adaptive import AdaptiveConfig, AdaptivePolicy
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.policies import (
    CloudOnlyPolicy,
    DraftLengthPolicy,
    FixedPolicy,
    FixedTreePolicy,
    HeuristicPolicy,
)
from edgespec.core.tree_policy import TreePolicy
from edgespec.core.validation import check_int

# Blocks longer than this pay off only with acceptance near 1: a spec's `max_k` caps the
# heuristic and adaptive policies here (never below the requested k).
DEFAULT_K_MAX = 16


@dataclass(frozen=True)
class PolicySpec:
    """What a policy factory is given for one session.

    `k`: the requested draft length: k for "fixed", the starting k otherwise (None: the policy's
    default). `max_k`: the largest draft length the caller allows (the edge's
    `EngineConfig.max_k`); policies that move k stay within min(16, max_k), never below `k`
    (None: the policy's own k_max). `pipelined`: the session drafts ahead while verdicts travel.
    `memory`: what earlier sessions on this link learnt, for policies that can start from it.
    `options`: named options of the policy (see the module docstring), applied last.
    """

    k: int | None = None
    max_k: int | None = None
    pipelined: bool = False
    memory: PolicyMemory | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    ahead_branches: int = 0  # pipelined: the branches drafted ahead besides the main guess

    def __post_init__(self) -> None:
        if self.k is not None:
            check_int("k", self.k, 1)
        if self.max_k is not None:
            check_int("max_k", self.max_k, 1)
        if not isinstance(self.pipelined, bool):
            raise ValueError(f"pipelined must be a bool, got {self.pipelined!r}")
        if self.memory is not None and not isinstance(self.memory, PolicyMemory):
            raise ValueError(
                f"memory must be a PolicyMemory or None, got {type(self.memory).__name__}"
            )
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))

    @property
    def k_max(self) -> int | None:
        """The cap on k for policies that move it: min(16, max_k), never below k; None when no
        `max_k` was given."""
        if self.max_k is None:
            return None
        return max(self.k or 0, min(DEFAULT_K_MAX, self.max_k))

    def kwargs(self, **derived: object) -> dict[str, Any]:
        """Constructor arguments: `derived` (those that are not None), then `options`."""
        out: dict[str, Any] = {name: v for name, v in derived.items() if v is not None}
        out.update(self.options)
        return out


PolicyFactory = Callable[[PolicySpec], DraftLengthPolicy]


@dataclass(frozen=True)
class _Entry:
    factory: PolicyFactory
    options: tuple[str, ...]  # the option names `PolicySpec.options` may hold


def adaptive_config(spec: PolicySpec) -> AdaptiveConfig:
    """The `AdaptiveConfig` a spec asks for."""
    branches = spec.ahead_branches if spec.pipelined else 0
    return AdaptiveConfig(
        **spec.kwargs(
            k_init=spec.k, k_max=spec.k_max, pipelined=spec.pipelined, ahead_branches=branches
        )
    )


def adaptive_policy(spec: PolicySpec) -> AdaptivePolicy:
    """The "adaptive" factory: also what learns a link beside any other policy (the edge's
    shadow learner), so it is callable directly."""
    return AdaptivePolicy(adaptive_config(spec), spec.memory)


_REGISTRY: dict[str, _Entry] = {
    "fixed": _Entry(lambda spec: FixedPolicy(**spec.kwargs(k=spec.k)), ("k",)),
    "heuristic": _Entry(
        lambda spec: HeuristicPolicy(**spec.kwargs(k0=spec.k, k_max=spec.k_max)),
        ("k0", "k_min", "k_max"),
    ),
    "adaptive": _Entry(adaptive_policy, tuple(f.name for f in fields(AdaptiveConfig))),
    "cloud_only": _Entry(lambda spec: CloudOnlyPolicy(**spec.kwargs()), ("stream_tokens",)),
    "tree": _Entry(lambda spec: FixedTreePolicy(**spec.kwargs()), ("nodes", "depth", "width")),
    "adaptive_tree": _Entry(
        lambda spec: TreePolicy(
            adaptive_config(replace(spec, options={"explore_every": 24, **spec.options})),
            spec.memory,
        ),
        tuple(f.name for f in fields(AdaptiveConfig)),
    ),
}


def register_policy(name: str, factory: PolicyFactory, options: Sequence[str] = ()) -> None:
    """Make `factory(spec)` selectable as policy `name` (replacing any policy of that name);
    `options` are the names its `PolicySpec.options` may hold."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = _Entry(factory, tuple(options))


def policy_names() -> list[str]:
    """The registered policy names, sorted."""
    return sorted(_REGISTRY)


def make_policy(name: str, spec: PolicySpec | None = None, **options: object) -> DraftLengthPolicy:
    """A fresh policy by name, built from `spec` (default: `PolicySpec()`, every policy default)
    with `options` added to its options. An unknown name or option, or a bad value, raises
    `ValueError` naming it."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"policy must be one of {policy_names()}, got {name!r}")
    spec = spec if spec is not None else PolicySpec()
    if options:
        spec = replace(spec, options={**spec.options, **options})
    for key in spec.options:
        if key not in entry.options:
            raise ValueError(
                f"{key} is not an option of the {name!r} policy; allowed: "
                f"{', '.join(entry.options) or 'none'}"
            )
    return entry.factory(spec)
