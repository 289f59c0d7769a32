"""What a latency run measures: the methods, link conditions, RTT schedule and sizes
(`LatencyBenchConfig`), validated on construction. See `edgespec.bench.latency` for the design."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edgespec.core.demo_pair import BENCH_PROMPTS
from edgespec.core.policies import DraftLengthPolicy
from edgespec.core.registry import PolicySpec, make_policy
from edgespec.core.validation import check_float, check_int, check_ms
from edgespec.linkemu import LinkProfile

DEFAULT_RTTS_MS = (0.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0)
DEFAULT_FIXED_KS = (1, 2, 4, 8)
# Python, like the demo pair's corpus (not taken from it). One prompt by default: the run time
# goes to repetitions and to generations long enough for the adaptive policy to settle.
DEFAULT_PROMPTS = BENCH_PROMPTS[:1]
# the generation that warms the link memory before a measured adaptive one: another text
DEFAULT_WARMUP_PROMPT = BENCH_PROMPTS[-1]
IN_PROCESS_METHODS = ("edge_only_draft", "colocated")
# the methods the checks judge against the best of fixed k and cloud-only
ADAPTIVE_METHODS = ("adaptive", "adaptive_pipelined", "adaptive_tree")
# Fixed tree shapes measured (nodes, depth, width): small, medium and large node budgets.
DEFAULT_TREE_SHAPES = ((16, 6, 2), (32, 8, 3), (64, 10, 4))
INITIAL_K = 4  # k0 of the heuristic and k_init of the adaptive policy


@dataclass(frozen=True)
class MethodSpec:
    """How the edge runs one link method: policy name, k handed to it, pipelined drafting."""

    name: str
    policy: str
    k: int
    pipelined: bool = False
    # link memory before each measured generation: "warm" (forget, then one warm-up generation
    # of the warm-up prompt), "cold" (forget), None (left as it is: the policy does not read it)
    memory: str | None = None
    options: tuple[tuple[str, int], ...] = ()  # the policy's named options (a tree's shape)

    def edge_policy(self) -> str | DraftLengthPolicy:
        """What the edge is handed: the policy name, or the policy built with `options`."""
        if not self.options:
            return self.policy
        return make_policy(self.policy, PolicySpec(k=self.k, options=dict(self.options)))


def link_methods(
    fixed_ks: Sequence[int], tree_shapes: Sequence[tuple[int, int, int]] = DEFAULT_TREE_SHAPES
) -> tuple[MethodSpec, ...]:
    """Every method that goes through the edge and the emulated link, in report order."""
    trees = tuple(
        MethodSpec(
            f"tree_n{n}_d{d}_w{w}{'_pipelined' if pipelined else ''}",
            "tree",
            INITIAL_K,
            pipelined=pipelined,
            options=(("nodes", n), ("depth", d), ("width", w)),
        )
        for n, d, w in tree_shapes
        # the smallest shape also pipelined: the next block drafted on its guessed path
        for pipelined in ((False, True) if (n, d, w) == tree_shapes[0] else (False,))
    )
    return (
        MethodSpec("cloud_only", "cloud_only", INITIAL_K),
        *(MethodSpec(f"fixed_k{k}", "fixed", k) for k in fixed_ks),
        MethodSpec("heuristic", "heuristic", INITIAL_K),
        MethodSpec("adaptive", "adaptive", INITIAL_K, memory="warm"),
        MethodSpec("adaptive_pipelined", "adaptive", INITIAL_K, pipelined=True, memory="warm"),
        MethodSpec("adaptive_pipelined_cold", "adaptive", INITIAL_K, pipelined=True, memory="cold"),
        *trees,
        # trees where they pay, else pipelined chains or cloud-only (the tree controller)
        MethodSpec("adaptive_tree", "adaptive_tree", INITIAL_K, pipelined=True, memory="warm"),
    )


@dataclass(frozen=True)
class LinkCondition:
    """One link setting the grid measures: `case` is "rtt", "jitter" or "bandwidth"; `rtt_ms` is
    the nominal mean RTT the rows report (jitter: the fixed part + both directions' mean draws)."""

    case: str
    rtt_ms: float
    profile: LinkProfile


@dataclass(frozen=True)
class VaryingSchedule:
    """RTT switched on a timer during one generation: `phases` = ((start_s, rtt_ms), ...), the
    first starting at 0; the last lasts until the generation ends."""

    phases: tuple[tuple[float, float], ...] = ((0.0, 10.0), (2.5, 100.0), (6.0, 30.0))

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError(
                f"phases must hold at least one (start_s, rtt_ms), got {self.phases!r}"
            )
        for i, (start, rtt) in enumerate(self.phases):
            check_float(f"phases[{i}] start_s", start, 0.0)
            check_ms(f"phases[{i}] rtt_ms", rtt)
        if self.phases[0][0] != 0.0:
            raise ValueError(f"phases must start at 0.0 s, got {self.phases!r}")
        starts = [s for s, _ in self.phases]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"phases must have increasing start times, got {self.phases!r}")

    def rtt_at(self, t_s: float) -> float:
        """The scheduled RTT at `t_s` seconds after the generation started."""
        rtt = self.phases[0][1]
        for start, value in self.phases:
            if t_s >= start:
                rtt = value
        return rtt


@dataclass(frozen=True)
class LatencyBenchConfig:
    """Everything a latency run varies. `quick()` is the smoke-test size."""

    compute_profile: str = (
        "real"  # edgespec.core.profiles name, applied to edge, verifier, in-process
    )
    rtts_ms: tuple[float, ...] = DEFAULT_RTTS_MS
    reps: int = 3
    max_new_tokens: int = 64
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    warmup_prompt: str = DEFAULT_WARMUP_PROMPT  # warms the link memory (see the package doc)
    fixed_ks: tuple[int, ...] = DEFAULT_FIXED_KS
    # None = all; else a subset of the link methods and IN_PROCESS_METHODS by name
    methods: tuple[str, ...] | None = None
    jitter_case: LinkProfile | None = LinkProfile(rtt_ms=40.0, jitter_ms=10.0, seed=0)
    bandwidth_case: LinkProfile | None = LinkProfile(rtt_ms=50.0, bandwidth_mbps=2.0)
    varying: VaryingSchedule | None = VaryingSchedule()
    # long enough that the fastest method reaches the last phase
    varying_max_new_tokens: int = 360
    varying_reps: int = 1
    threads: int | None = 1  # torch threads here and in the verifier process
    round_timeout_s: float = 30.0
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        for name in ("reps", "max_new_tokens", "varying_max_new_tokens", "varying_reps"):
            check_int(name, getattr(self, name), 1)
        if not self.rtts_ms:
            raise ValueError(
                f"rtts_ms must be a non-empty list of RTTs in [0, 10000] ms, got {self.rtts_ms!r}"
            )
        for i, rtt in enumerate(self.rtts_ms):
            check_float(f"rtts_ms[{i}]", rtt, 0.0, 10_000.0, unit="(milliseconds)")
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts must be non-empty strings, got {self.prompts!r}")
        if not isinstance(self.warmup_prompt, str) or not self.warmup_prompt:
            raise ValueError(
                f"warmup_prompt must be a non-empty string, got {self.warmup_prompt!r}"
            )
        if self.warmup_prompt in self.prompts:
            raise ValueError("warmup_prompt must not be one of prompts (it would be measured text)")
        if not self.fixed_ks:
            raise ValueError(f"fixed_ks must hold at least one k in [1, 32], got {self.fixed_ks!r}")
        for i, k in enumerate(self.fixed_ks):
            check_int(f"fixed_ks[{i}]", k, 1, 32)
        if self.methods is not None:
            known = {m.name for m in link_methods(self.fixed_ks)} | set(IN_PROCESS_METHODS)
            unknown = sorted(set(self.methods) - known)
            if unknown or not self.methods:
                raise ValueError(
                    f"methods must be a non-empty subset of {sorted(known)}, got {self.methods!r}"
                )

    @classmethod
    def quick(cls, compute_profile: str = "real", **overrides: Any) -> LatencyBenchConfig:
        """Smoke size: 2 RTTs, 1 rep, one prompt, 16-token generations, a short varying run."""
        base: dict[str, Any] = dict(
            compute_profile=compute_profile,
            rtts_ms=(0.0, 20.0),
            reps=1,
            max_new_tokens=16,
            jitter_case=LinkProfile(rtt_ms=15.0, jitter_ms=5.0, seed=0),
            bandwidth_case=LinkProfile(rtt_ms=20.0, bandwidth_mbps=2.0),
            varying=VaryingSchedule(((0.0, 5.0), (0.3, 40.0), (0.6, 10.0))),
            varying_max_new_tokens=64,
            varying_reps=1,
        )
        base.update(overrides)
        return cls(**base)

    def conditions(self) -> list[LinkCondition]:
        """The link conditions in run order: every grid RTT, then jitter and bandwidth cases."""
        out = [LinkCondition("rtt", float(r), LinkProfile(rtt_ms=float(r))) for r in self.rtts_ms]
        if self.jitter_case is not None:
            j = self.jitter_case
            out.append(LinkCondition("jitter", j.rtt_ms + j.jitter_ms, j))
        if self.bandwidth_case is not None:
            out.append(LinkCondition("bandwidth", self.bandwidth_case.rtt_ms, self.bandwidth_case))
        return out

    def selected(self, name: str) -> bool:
        """Whether method `name` is measured in this run."""
        return self.methods is None or name in self.methods

    def to_dict(self) -> dict:
        """Every field, JSON-ready (link profiles as their dicts)."""
        d = asdict(self)
        d["jitter_case"] = self.jitter_case.to_dict() if self.jitter_case else None
        d["bandwidth_case"] = self.bandwidth_case.to_dict() if self.bandwidth_case else None
        return d


def is_fixed(method: str) -> bool:
    """Whether `method` is one of the fixed-k link methods (``fixed_k<k>``)."""
    return method.startswith("fixed_k")


def is_fixed_tree(method: str) -> bool:
    """Whether `method` is one of the fixed tree-shape link methods (``tree_n<n>_d<d>_w<w>``)."""
    return method.startswith("tree_n")


def varying_methods(config: LatencyBenchConfig, specs: Sequence[MethodSpec]) -> list[str]:
    """The methods of `specs` the varying-RTT run measures: adaptive, cloud-only, fixed k."""
    keep = set(ADAPTIVE_METHODS) | {"cloud_only"}
    return [s.name for s in specs if s.name in keep or is_fixed(s.name)]
