"""Sampling benchmark: coupled vs rejection sampling over an emulated link, and bytes at 128k.

A verifier runs as a separate process (`python -m edgespec.cloud.server`), the edge
(`EdgeEngine`) in this one, with the link emulator (`edgespec.linkemu`) between them; both pad
their forwards to a compute profile (default ``h100-70b``: emulated, see
`edgespec.core.profiles` for the modelled devices and sources; ``real`` = this host's speed).
For each link (RTT, optional bandwidth cap) and each sampling setting (T = 1.0, T = 0.7,
top-p 0.9 at T = 1.0, and greedy as the yardstick), every prompt is generated with coupled and
with rejection sampling back to back (same seed, so host drift hits both alike), under a fixed
draft length and the adaptive policy. Per row: acceptance rate (accepted / drafted), tokens per
round (generated tokens / verification rounds, cloud-only steps counted as rounds), bytes on the
link per generated token (every message both ways, OpenSession included), tokens/s (generated
tokens / wall time, prefills included).

Bytes at a 128k vocabulary: one block of k draft tokens drafted by a random 128,000-token model,
serialized as the edge sends it (`DraftBlock` protobuf), coupled vs rejection with dense q vs
rejection with top-k 50 (sparse q) vs greedy; no network needed, the message size is the cost.

`edgespec bench sampling --json FILE` wraps `run_sampling_bench`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from edgespec.bench.link import RunTotals
from edgespec.bench.processes import torch_threads, verifier_process
from edgespec.core.drafter import Drafter
from edgespec.core.params import SAMPLERS, SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.validation import check_int
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.linkemu import LinkEmulator, LinkProfile
from edgespec.protos.convert import block_to_proto

logger = logging.getLogger(__name__)

PROMPTS = (
    "def read_config(path):\n",
    "The edge drafts a few tokens and the cloud",
    "for i in range(10):\n",
    "class Cache:\n    def __init__(self, size):\n",
)
SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7": SamplingParams(temperature=0.7),
    "top_p0.9": SamplingParams(temperature=1.0, top_p=0.9),
}
LINKS = (
    LinkProfile(rtt_ms=20.0, name="rtt20ms"),
    LinkProfile(rtt_ms=20.0, bandwidth_mbps=10.0, name="rtt20ms_10mbit"),
)
BIG_VOCAB = 128_000


def _row(totals: RunTotals) -> dict:
    """The figures of one (link, setting, policy, sampler) cell."""
    return {
        "tokens": totals.tokens,
        "acceptance_rate": totals.acceptance_rate,
        "tokens_per_round": totals.tokens_per_round,
        "bytes_per_token": totals.bytes_per_token()["total"],
        "tokens_per_s": totals.tokens_per_s,
    }


async def _run_all(
    engine: EdgeEngine,
    emu: LinkEmulator,
    links: Sequence[LinkProfile],
    prompts: Sequence[str],
    max_new_tokens: int,
    k: int,
    policies: Sequence[str],
    reps: int,
) -> list[dict]:
    """Rows: every (link, policy, setting, sampler), greedy included. Links, settings and
    samplers are interleaved per prompt, so drift of this shared host hits every variant alike."""
    totals: dict[tuple[str, str, str, str], RunTotals] = {}
    greedy = SamplingParams(max_new_tokens=max_new_tokens)
    for policy in policies:
        for rep in range(reps):
            for i, prompt in enumerate(prompts):
                seed = 1000 * rep + i
                cases = [("greedy", "-", greedy)]
                for name, base in SETTINGS.items():
                    for sampler in SAMPLERS:
                        params = replace(
                            base, max_new_tokens=max_new_tokens, seed=seed, sampler=sampler
                        )
                        cases.append((name, sampler, params))
                for link in links:
                    emu.set_profile(link)
                    for name, sampler, params in cases:
                        t0 = time.perf_counter()
                        summary = await engine.collect(prompt, params, k=k, policy=policy)
                        key = (link.name, name, policy, sampler)
                        totals.setdefault(key, RunTotals()).add(summary, time.perf_counter() - t0)
                logger.info("%s rep %d prompt %d done", policy, rep, i)
    return [
        {"link": link, "setting": name, "policy": policy, "sampler": sampler, **_row(total)}
        for (link, name, policy, sampler), total in totals.items()
    ]


def block_bytes_at_vocab(vocab_size: int = BIG_VOCAB, k: int = 4, seed: int = 0) -> dict:
    """Serialized size (bytes) of one block of `k` draft tokens from a random model with
    `vocab_size` tokens: greedy, coupled, rejection with dense q, rejection with top-k 50."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
    prompt = [1, 2, 3, 4]
    cases = {
        "greedy": SamplingParams(max_new_tokens=16),
        "coupled": SamplingParams(temperature=1.0, max_new_tokens=16, seed=seed),
        "rejection_dense": SamplingParams(
            temperature=1.0, max_new_tokens=16, seed=seed, sampler="rejection"
        ),
        "rejection_top_k50": SamplingParams(
            temperature=1.0, top_k=50, max_new_tokens=16, seed=seed, sampler="rejection"
        ),
    }
    out = {}
    with torch.inference_mode():
        for name, params in cases.items():
            block = Drafter(ModelRunner(model), prompt, params).propose(k)
            out[name] = block_to_proto(block, session_id="0" * 32).ByteSize()
    return {"vocab_size": vocab_size, "k": k, "block_bytes": out}


def run_sampling_bench(
    target_path: str | Path,
    draft_path: str | Path,
    *,
    compute_profile: str = "h100-70b",
    k: int = 4,
    max_new_tokens: int = 48,
    prompts: Sequence[str] = PROMPTS,
    reps: int = 1,
    policies: Sequence[str] = ("fixed", "adaptive"),
    links: Sequence[LinkProfile] = LINKS,
    threads: int | None = 1,
    start_timeout_s: float = 180.0,
) -> dict:
    """Run the benchmark (see the module docstring); returns its JSON-able result."""
    check_int("k", k, 1, 32)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("reps", reps, 1)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")

    async def bench(address: str) -> list[dict]:
        host, port = address.rsplit(":", 1)
        with LinkEmulator(host, int(port), LinkProfile(rtt_ms=0)) as emu:
            engine = EdgeEngine.from_pretrained(
                draft_path,
                [emu.address],
                link_config=LinkConfig(round_timeout_s=60.0),
                config=EngineConfig(link_memory=False),
                compute_profile=compute_profile,
            )
            try:
                await engine.collect(prompts[0], SamplingParams(max_new_tokens=8), k=k)  # warm
                rows = await _run_all(
                    engine, emu, links, prompts, max_new_tokens, k, policies, reps
                )
            finally:
                await engine.aclose()
        return rows

    with (
        torch_threads(threads),
        verifier_process(
            Path(target_path), threads, start_timeout_s, ["--compute-profile", compute_profile]
        ) as addr,
    ):
        rows = asyncio.run(bench(addr))
    big = block_bytes_at_vocab(k=k)
    return {
        "bench": "sampling",
        "compute_profile": compute_profile,
        "compute_profile_note": "emulated (edgespec.core.profiles)"
        if compute_profile != "real"
        else "this host's real speed",
        "target": str(target_path),
        "draft": str(draft_path),
        "k_fixed": k,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "reps": reps,
        "links": [link.to_dict() for link in links],
        "settings": {name: p.to_dict() for name, p in SETTINGS.items()},
        "link_emulator": "user-space TCP proxy on 127.0.0.1 (edgespec.linkemu)",
        "rows": rows,
        "ratios": _ratios(rows),
        "big_vocab": big,
    }


def _ratios(rows: list[dict]) -> list[dict]:
    """Per (link, policy, setting): coupled / rejection for tokens/s and bytes per token, and
    coupled bytes per token / greedy's."""
    index = {(r["link"], r["policy"], r["setting"], r["sampler"]): r for r in rows}
    out = []
    for (link, policy, setting, sampler), row in index.items():
        if sampler != "coupled":
            continue
        rej = index.get((link, policy, setting, "rejection"))
        greedy = index.get((link, policy, "greedy", "-"))
        if rej is None or greedy is None:
            continue
        out.append(
            {
                "link": link,
                "policy": policy,
                "setting": setting,
                "tokens_per_s_coupled_over_rejection": row["tokens_per_s"] / rej["tokens_per_s"],
                "bytes_per_token_coupled_over_rejection": row["bytes_per_token"]
                / rej["bytes_per_token"],
                "bytes_per_token_coupled_over_greedy": row["bytes_per_token"]
                / greedy["bytes_per_token"],
            }
        )
    return out


def print_summary(result: dict) -> None:
    """The figures, one line per row (CLI output)."""
    print(
        f"sampling bench: compute profile {result['compute_profile']} "
        f"({result['compute_profile_note']}), fixed k = {result['k_fixed']}, "
        f"{result['prompts']} prompts x {result['reps']} reps x {result['max_new_tokens']} tokens"
    )
    print(f"{'link':16} {'policy':9} {'setting':9} {'sampler':10} accept tok/round B/token tok/s")
    for r in result["rows"]:
        print(
            f"{r['link']:16} {r['policy']:9} {r['setting']:9} {r['sampler']:10} "
            f"{r['acceptance_rate']:6.2f} {r['tokens_per_round']:9.2f} "
            f"{r['bytes_per_token']:7.0f} {r['tokens_per_s']:5.1f}"
        )
    for r in result["ratios"]:
        print(
            f"{r['link']:16} {r['policy']:9} {r['setting']:9} coupled/rejection: tokens/s "
            f"{r['tokens_per_s_coupled_over_rejection']:.2f}x, bytes/token "
            f"{r['bytes_per_token_coupled_over_rejection']:.3f}x; coupled/greedy bytes/token "
            f"{r['bytes_per_token_coupled_over_greedy']:.2f}x"
        )
    big = result["big_vocab"]
    print(f"one block of k = {big['k']} at vocab {big['vocab_size']}: {big['block_bytes']} bytes")
