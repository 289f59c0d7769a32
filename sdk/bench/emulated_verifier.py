"""An emulated cloud GPU for the capacity benchmark: target rows computed once per token prefix.

Under an emulated compute profile the batching verifier pads each step to the modelled time of
ONE batched forward on the modelled GPU (`BatchRoofline`). That models the GPU only while the
real forward on this host is faster than the model; with the demo target on two shared CPU
cores, a step of 32 sessions takes 1.5-3x the modelled H100 step (``verify_overrun`` in the
capacity rows), so the benchmark measured the host, not the modelled GPU.

`TargetMemoRunner` removes that artefact without changing any token, as
`edgespec.bench.emulated_edge.MemoRunner` does for the edge devices: each session's target runner
takes its logits rows from a per-process `LogitsMemo`, keyed by the token prefix a row predicts
after (a tree's rows by the committed prefix and the whole tree), computed by the real target
the first time any session needs them (sessions with the same prompt share them; so do the
methods of one run, which verify the same prefixes) and filled into the runner's real cache
lazily. It is `step_padded`: the batching step runs it alone, yet charges its rows to the
step's ONE modelled forward, so a step costs the roofline's time of all its sessions, as it
would on the modelled GPU. Verification, acceptance and commits are the verifier's own code;
every output is still compared with the target alone by the benchmark.

Rows may differ from a forward over the session's own chunking by float rounding (as any
differently chunked forward does); greedy outputs are compared with the reference, and the
benchmark is greedy. Use only with an emulated profile (`main` refuses ``real``: sharing rows
would make the verifier faster than its real self).

Entry point: ``python -m edgespec.bench.emulated_verifier`` takes the arguments of
``python -m edgespec.cloud.server`` (`edgespec.bench.processes.verifier_process(...,
emulated_target=True)` starts it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from edgespec.bench.emulated_edge import LogitsMemo, MemoRunner
from edgespec.cloud import server
from edgespec.core.profiles import ComputeProfile, ForwardCost, get_profile
from edgespec.core.runner import ModelRunner

TARGET_MEMO_ROWS = 32768  # rows kept (demo target: 16 KiB each, 512 MiB)


class TargetMemoRunner(MemoRunner):
    """A session's target runner whose rows come from a shared `LogitsMemo` (see the module
    docstring). Not padded by itself and not batchable: the batching step runs it apart and pads
    the whole step (`step_padded`). Keeps a verified tree's accepted path (`keep_nodes`) by
    appending it to the logical sequence; the real cache refeeds it on the next miss."""

    step_padded = True

    def __init__(
        self,
        model: PreTrainedModel,
        profile: ComputeProfile,
        memo: LogitsMemo,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model, profile, memo, device=device)
        self.cost = self.prefill_cost = ForwardCost()  # the batched step pads

    @property
    def batchable(self) -> bool:
        return False

    @property
    def length(self) -> int:
        # As a plain runner's: a verified tree's nodes count until `keep_nodes` compacts them.
        return len(self._tokens) + len(self._tree)

    def keep_nodes(self, start: int, nodes: Sequence[int]) -> None:
        """Keep the committed prefix (`start` tokens) and the fed `nodes` of the tree verified
        last (indices into its feed, root to leaf)."""
        if start != self._tree_start or not self._tree:
            raise ValueError(
                f"keep_nodes must follow the tree fed at {self._tree_start}, got start={start}"
            )
        kept = [self._tree[n] for n in nodes]
        self._close_tree()
        del self._tokens[start:]
        self._tokens.extend(kept)


def target_runner_factory(
    profile: ComputeProfile | str, memo: LogitsMemo
) -> Callable[[PreTrainedModel], ModelRunner]:
    """Each verifier session's runner: a `TargetMemoRunner` sharing `memo`. Raises ValueError
    for a profile that emulates no batched forward (``real``)."""
    profile = get_profile(profile)
    if not profile.emulated or profile.target_batch is None:
        raise ValueError(
            f"an emulated target needs an emulated profile with a batched forward, got "
            f"{profile.name!r}"
        )
    return lambda model: TargetMemoRunner(model, profile, memo)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgespec.cloud.server`` with every session's target emulated (see above)."""
    args = server.build_parser().parse_args(argv)
    memo = LogitsMemo(max_rows=TARGET_MEMO_ROWS)
    try:
        factory = target_runner_factory(args.compute_profile, memo)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return server.main(argv, runner_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
