"""The measuring harness of a latency run: the models, the edge engine and the link emulator
of one run, and one measured generation of any method at a time."""

from __future__ import annotations

import time
from pathlib import Path

from edgespec.bench.latency.config import LatencyBenchConfig, MethodSpec
from edgespec.bench.latency.samples import RoundCounts, RunSample, round_sample
from edgespec.core.generate import generate, generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import get_profile, make_runner
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent
from edgespec.linkemu import LinkEmulator, LinkProfile


class Harness:
    """Holds the models, engine and emulator of one run and measures methods one at a time."""

    def __init__(self, config: LatencyBenchConfig, target_path: Path, draft_path: Path) -> None:
        self.config = config
        self.profile = get_profile(config.compute_profile)
        self.target_path, self.draft_path = target_path, draft_path
        self.tokenizer = load_tokenizer(draft_path)
        self.prompt_ids = [
            list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in config.prompts
        ]
        self.warmup_ids = list(
            self.tokenizer(config.warmup_prompt, add_special_tokens=False)["input_ids"]
        )
        # In-process runners (colocated, edge-only); the edge engine keeps its own draft.
        self.target = make_runner(
            ModelRunner.from_pretrained(target_path).model, self.profile, "target"
        )
        self.draft = make_runner(
            ModelRunner.from_pretrained(draft_path).model, self.profile, "draft"
        )
        self.engine: EdgeEngine | None = None
        self.emu: LinkEmulator | None = None

    # -- link methods ---------------------------------------------------------------------------

    def open_link(self, verifier_address: str) -> None:
        """Start the link emulator in front of `verifier_address` (RTT 0) and the edge engine
        behind it."""
        host, port = verifier_address.rsplit(":", 1)
        self.emu = LinkEmulator(host, int(port), LinkProfile(rtt_ms=0.0))
        self.emu.start()
        self.engine = EdgeEngine.from_pretrained(
            self.draft_path,
            [self.emu.address],
            link_config=LinkConfig(round_timeout_s=self.config.round_timeout_s),
            config=EngineConfig(max_k=32),
            compute_profile=self.config.compute_profile,
        )

    async def close_link(self) -> None:
        """Close the engine and stop the emulator (either may be missing)."""
        if self.engine is not None:
            await self.engine.aclose()
        if self.emu is not None:
            self.emu.stop()

    async def prepare_memory(self, spec: MethodSpec) -> None:
        """Set the engine's link memory up as `spec.memory` says (see the package docstring)."""
        assert self.engine is not None
        if spec.memory is not None:
            self.engine.forget_links()
        if spec.memory == "warm":
            await self.engine.collect(
                self.warmup_ids,
                SamplingParams(max_new_tokens=self.config.max_new_tokens),
                k=spec.k,
                policy=spec.edge_policy(),
                pipelined=spec.pipelined,
            )

    async def run_link(
        self, spec: MethodSpec, prompt_index: int, max_new_tokens: int, prepare: bool = True
    ) -> RunSample:
        """One measured generation, after `prepare_memory` unless `prepare` is False."""
        assert self.engine is not None
        params = SamplingParams(max_new_tokens=max_new_tokens)
        if prepare:
            await self.prepare_memory(spec)
        t0 = time.perf_counter()
        summary: SummaryEvent = await self.engine.collect(
            self.prompt_ids[prompt_index],
            params,
            k=spec.k,
            policy=spec.edge_policy(),
            pipelined=spec.pipelined,
        )
        wall = time.perf_counter() - t0
        rounds = [round_sample(r) for r in summary.stats.round_records]
        return RunSample(
            spec.name,
            prompt_index,
            list(summary.tokens),
            wall,
            rounds,
            max_new_tokens=max_new_tokens,
            pipeline_misses=summary.stats.pipeline_misses,
        )

    # -- in-process methods ---------------------------------------------------------------------

    def run_edge_only(self, prompt_index: int, max_new_tokens: int) -> RunSample:
        """One greedy generation of the draft alone, in process (its output is the draft's)."""
        params = SamplingParams(max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        result = generate_autoregressive(self.draft, self.prompt_ids[prompt_index], params)
        wall = time.perf_counter() - t0
        return RunSample(
            "edge_only_draft",
            prompt_index,
            list(result.tokens),
            wall,
            max_new_tokens=max_new_tokens,
        )

    def run_colocated(self, k: int, prompt_index: int, max_new_tokens: int) -> RunSample:
        """One greedy co-located speculative generation at fixed `k`, both models in process."""
        params = SamplingParams(max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        result = generate(self.target, self.draft, self.prompt_ids[prompt_index], params, k)
        wall = time.perf_counter() - t0
        st = result.stats
        counts = RoundCounts(st.rounds, st.drafted, st.accepted, k)
        return RunSample(
            f"colocated_k{k}",
            prompt_index,
            list(result.tokens),
            wall,
            counts=counts,
            max_new_tokens=max_new_tokens,
        )
