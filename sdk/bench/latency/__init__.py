"""Latency benchmark: tokens/s against the link's RTT for every way of serving a generation.

One verifier process (``python -m edgespec.cloud.server --compute-profile P --threads 1``) serves the whole
run; the edge (`edge.engine.EdgeEngine`, draft padded by the same profile) runs in this process and
reaches the verifier through `edgespec.linkemu.LinkEmulator`, whose profile is swapped per
condition. Methods:

- ``cloud_only``: policy ``cloud_only`` through the edge; the verifier decodes alone and streams.
- ``fixed_k1`` ... ``fixed_k8``: distributed speculative decoding, the same k every round.
- ``heuristic``: k += 2 after a block accepted whole, k -= 1 otherwise (starts at k = 4).
- ``adaptive``: the E(k)/T(k) controller (may switch to cloud-only), starts at k = 4.
- ``adaptive_pipelined``: the same with pipelined drafting (the next block drafted and sent while
  a verdict travels).
- ``adaptive_pipelined_cold``: adaptive + pipelined with no link memory at all (every session
  starts from priors): the first session an edge ever runs on a link.
- ``tree_n<n>_d<d>_w<w>``: token trees of one shape every round; the smallest shape also as
  ``..._pipelined`` (the next tree drafted on the pending tree's guessed path while its verdict
  travels). ``adaptive_tree``: the tree controller (trees, chains or cloud-only), pipelined.

Link memory. An edge learns each link across sessions (`EngineConfig.link_memory`): an adaptive
session starts from the estimates (acceptance, timings, mode, k) the earlier sessions on the same
verifier left. A deployed edge serves many sessions per link, so the adaptive rows measure that
warm state, prepared without touching the measured text: before each measured adaptive
generation the engine forgets every link and runs one unmeasured generation of the *warm-up
prompt* (``warmup_prompt``, not among ``prompts``) with the same method over the same link. The
cold row shows what the very first session costs.
- ``colocated``: `edgespec.core.generate.generate` with both models in this process, both padded by
  the compute profile, no link at all. Run at every k of ``fixed_ks``; the row is the best of them
  by median tokens/s (its ``k`` field says which; ``colocated_by_k`` holds all of them).
- ``edge_only_draft``: the draft model alone, padded by the profile: what the edge produces without
  the cloud. Its *output differs* (the draft's, not the target's): speed only.

The two in-process methods do not depend on the link: they are measured once per rep and reported
in rows with ``rtt_ms`` 0 and ``in_process`` true.

Conditions: every RTT of ``rtts_ms`` (case ``"rtt"``), plus a jitter case (RTT 50 +/- 10 ms: 40 ms
fixed plus U[0, 10] ms per direction) and a bandwidth case (RTT 50 ms, 2 Mbit/s each way). Within a
condition the reps are interleaved across methods (and the method order rotates per rep), so slow
drift of the shared machine hits every method alike. A rep is one greedy generation of
``max_new_tokens`` per prompt (the same prompts every rep, so greedy reps repeat the same tokens and
differ only in timing, and every method's median is over the same work); its tokens/s is generated
tokens / wall time (prefill and time to first token included). Rows report the median over reps
and the spread as ``[min, max]`` over reps (``spread_kind``: "min_max").

Per-round figures, from the edge's round records (speculative rounds only):

- ``mean_k``: mean draft length chosen; ``acceptance_rate``: accepted / drafted;
- ``mean_tokens_per_round``: mean of accepted + 1 (tokens a round commits before truncation at
  max_new_tokens or a stop token, as `SpecStats.mean_tokens_per_round`);
- ``expected_tokens_per_round``: E(k) = 1 + sum_j prod_{i<=j} p_i averaged over the rounds' draft
  lengths, with p_i the measured conditional acceptance at position i (pooled over the reps). With
  one k for every round this reproduces the measured mean by construction (it checks the
  bookkeeping); with varying k (heuristic, adaptive) it tests the per-position model.
- ``expected_tokens_per_round_iid``: E(k) = (1 - a^(k+1)) / (1 - a) (Leviathan et al. 2023) with a
  the conditional acceptance rate accepted / reached (positions whose predecessors were all
  accepted; accepted / drafted would count positions after a rejection, which the i.i.d. model does
  not): the model's own test.

The time-varying run (``varying``): one long generation per method while a timer thread switches
the emulator's RTT (default 10 ms, 100 ms after 2.5 s, 30 ms after 6 s), for adaptive (and
pipelined), each fixed k and cloud-only; the adaptive methods' rounds as a time series of
(t, k, mode, RTT).

``checks`` evaluates the issue's criteria on the rows of this run: adaptive (and adaptive +
pipelined) >= 0.95 x the best of {every fixed k, cloud-only} at every RTT; on the varying run
adaptive >= 1.15 x the best fixed k; measured mean tokens per round within 10% of E(k) (per row
with at least 15 rounds per generation, fewer cannot resolve 10%, and per method over all its
rounds pooled across conditions: ``pooled_ek``); greedy
equality of every distributed method and colocated with cloud-only (the target alone) per prompt.
``crossover_rtt_ms``: the smallest grid RTT from which on cloud-only beats the best always-
speculating method (fixed k, heuristic); null if it never does.

Runtime: after a warm-up pass at RTT 0, the harness logs the expected total (each method's warm-up
wall time plus one RTT per round it took), and progress with an ETA. The defaults (h100-70b
profile, 9 link conditions x 8 link methods x 3 reps x one 64-token generation; varying run 1 rep x
360 tokens x 7 methods) are sized for about 10-15 minutes on a 2-core machine: the padded forward
times dominate, and the range is the draft's acceptance rate (0.85 -> 0.5). A trial on the tiny
test pair (h100-70b profile) took 10m50s against an estimate of 9m38s: the estimate runs ~10% low.
Quick mode (`LatencyBenchConfig.quick`) takes seconds on tiny models.

CLI: ``edgespec bench latency --json FILE --plots DIR`` (see `edgespec.cli`).

Modules: `config` (what a run measures), `harness` (one measured generation of any method),
`samples` (what a generation leaves), `analysis` (rows, E(k), checks), `estimate` (run time and
progress), `run` (`run_latency_bench`), `cli` (the command's glue).
"""

from edgespec.bench.latency.config import LatencyBenchConfig
from edgespec.bench.latency.run import run_latency_bench

__all__ = ["LatencyBenchConfig", "run_latency_bench"]
