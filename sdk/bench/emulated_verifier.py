"""An emulated cloud GPU for the capacity benchmark: the target's greedy rows computed ahead.

Under an emulated compute profile the batching verifier pads each step to the modelled time of
ONE batched forward on the modelled GPU (`BatchRoofline`). That models the GPU only while the
real forward on this host is faster than the model. With the demo target on two shared CPU
cores, a step of 32 sessions took 1.5-3x the modelled H100 step (``verify_overrun`` in the
capacity rows), so the benchmark measured this host, not the modelled GPU.

The capacity benchmark is greedy, and greedy verification reads only rows ON the greedy path:
a chain's rows up to its first rejected token (each predicts after accepted tokens only) and
the row after the last accepted one; a tree walk's rows along the accepted path and the bonus
row. Every such row predicts the token after a prefix of prompt + the target's greedy output.
`GreedyOracle` computes those rows once per distinct prompt with the real target, exactly as
the target alone generates (`generate_autoregressive`: a prefill, then one token per forward),
keyed by the token prefix they predict after. `GreedyOracleRunner`, each session's target
runner, serves its rows from it and runs no model at all; a row off the greedy path (after a
rejected draft token, a sibling in a tree) is never read by greedy acceptance and is served as
NaN, so reading one would alter the output, which the benchmark checks for every session.
The runner is `step_padded`: the batching step charges all its sessions' rows to ONE modelled
forward, so a step costs the roofline's time of the batch, as on the modelled GPU.

Use only with greedy sessions, the prompts given, and an emulated profile (`target_runner_factory`
refuses ``real``: the rows come for free, which only an emulated time may hide).

Entry point: ``python -m edgespec.bench.emulated_verifier --oracle-prompts FILE ...`` with the
arguments of ``python -m edgespec.cloud.server``; FILE is JSON ``{"prompts": [[ids...], ...],
"max_new_tokens": N}`` (`edgespec.bench.processes.verifier_process(..., oracle_file=FILE)`
starts it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from edgespec.bench.emulated_edge import GIL_SWITCH_S, host_ids
from edgespec.cloud import server
from edgespec.core.profiles import ComputeProfile, get_profile
from edgespec.core.runner import ModelRunner, TokenIds
from edgespec.core.validation import check_int

logger = logging.getLogger(__name__)


class GreedyOracle:
    """The target's logits rows along each prompt's greedy continuation, keyed by the token
    prefix they predict after: the whole prompt and `max_new_tokens` + `extra` generated
    positions (blocks drafted ahead may reach past the last token). Built on first use, by the
    real target, one forward per token as `generate_autoregressive` runs. A proper prefix of a
    prompt has no row: only prefill chunks compute those, and their rows are not read."""

    def __init__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, extra: int) -> None:
        if not prompts:
            raise ValueError("prompts must hold at least 1 prompt, got 0")
        self.prompts = [list(p) for p in prompts]
        self.positions = check_int("max_new_tokens", max_new_tokens, 1) + check_int(
            "extra", extra, 0
        )
        self._rows: dict[tuple[int, ...], Tensor] = {}
        self._model: PreTrainedModel | None = None
        self.served = 0  # rows served from the oracle
        self.off_path = 0  # rows served as NaN (never read: off the path, or prefill chunks')

    def build(self, model: PreTrainedModel) -> None:
        """Compute the rows with `model` (once; later calls with the same model do nothing)."""
        if self._model is model:
            return
        if self._model is not None:
            raise ValueError("a GreedyOracle serves one model")
        runner = ModelRunner(model)
        for prompt in {tuple(p): p for p in self.prompts}.values():
            seq = list(prompt)
            row = runner.prefill(seq)  # (V,): as generate_autoregressive starts
            for _ in range(self.positions):
                self._rows[tuple(seq)] = row
                seq.append(int(row.argmax(-1)))
                if runner.max_length is not None and len(seq) > runner.max_length:
                    break
                row = runner.extend(seq[-1:])[0]
        self._model = model
        logger.info("greedy oracle: %d rows of %d prompts", len(self._rows), len(self.prompts))

    def rows(self, keys: Sequence[tuple[int, ...]], nan: Tensor) -> Tensor:
        """The rows (n, V) of `keys`; `nan` where a key is off the greedy paths."""
        out = [self._rows.get(key) for key in keys]
        missing = sum(row is None for row in out)
        self.served += len(out) - missing
        self.off_path += missing
        return torch.stack([nan if row is None else row for row in out])


class GreedyOracleRunner(ModelRunner):
    """A session's target runner serving `GreedyOracle` rows (see the module docstring): the
    bookkeeping of a plain runner (`length`, rollback, a tree's nodes until `keep_nodes`), no
    model forward. Not batchable; `step_padded`."""

    step_padded = True

    def __init__(self, model: PreTrainedModel, oracle: GreedyOracle) -> None:
        super().__init__(model)
        oracle.build(model)
        self.oracle = oracle
        self._nan = torch.full((self.vocab_size,), float("nan"), device=self.device)
        self._tokens: list[int] = []  # the sequence the cache would hold
        self._tree: list[tuple[int, ...]] = []  # the open tree's nodes: their paths
        self._tree_ids: list[int] = []

    @property
    def batchable(self) -> bool:
        return False

    @property
    def length(self) -> int:
        return len(self._tokens) + len(self._tree_ids)

    def reset(self) -> None:
        self._tokens, self._tree, self._tree_ids = [], [], []

    def prefill(self, ids: TokenIds) -> Tensor:
        self.reset()
        return self.extend(ids)[-1]

    def extend(self, ids: TokenIds) -> Tensor:
        new = self._host_ids(ids)
        self._close_tree()
        start = len(self._tokens)
        self._tokens.extend(new)
        keys = [tuple(self._tokens[: p + 1]) for p in range(start, len(self._tokens))]
        return self.oracle.rows(keys, self._nan)

    def rollback(self, length: int) -> None:
        self._close_tree()
        del self._tokens[check_int("length", length, 0, len(self._tokens)) :]

    def extend_tree(
        self,
        ids: Sequence[int],
        parents: Sequence[int],
        tree_start: int | None = None,
        *,
        guesses: bool = False,
    ) -> Tensor:
        """Rows of a tree fed after the sequence: node i's row predicts after the prefix and
        its path (root to node i), `parents[i]` -1 for a root (`guesses`: not used)."""
        new = self._host_ids(ids)
        if tree_start is not None and tree_start != len(self._tokens):
            raise ValueError("a verifier's tree is fed after the whole sequence")
        if len(parents) != len(new):
            raise ValueError(f"parents must hold one index per node, got {len(parents)}")
        self._close_tree()
        prefix = tuple(self._tokens)
        for token, parent in zip(new, parents, strict=True):
            if not -1 <= parent < len(self._tree):
                raise ValueError(f"parents must name earlier nodes, got {parent}")
            self._tree.append((self._tree[parent] if parent >= 0 else ()) + (token,))
        self._tree_ids = new
        return self.oracle.rows([prefix + path for path in self._tree], self._nan)

    def keep_nodes(self, start: int, nodes: Sequence[int]) -> None:
        """Keep the sequence's first `start` tokens and the open tree's `nodes` (a root path)."""
        if start != len(self._tokens) or not self._tree:
            raise ValueError(f"keep_nodes must follow a tree fed at {len(self._tokens)}")
        kept = [self._tree_ids[n] for n in nodes]
        self._close_tree()
        self._tokens.extend(kept)

    def _close_tree(self) -> None:
        self._tree, self._tree_ids = [], []

    def _host_ids(self, ids: TokenIds) -> list[int]:
        return host_ids(ids, self.vocab_size, self.max_length, len(self._tokens))


def target_runner_factory(
    profile: ComputeProfile | str, oracle: GreedyOracle
) -> Callable[[PreTrainedModel], ModelRunner]:
    """Each verifier session's runner: a `GreedyOracleRunner` of `oracle`. Raises ValueError
    for a profile that emulates no batched forward (``real``)."""
    profile = get_profile(profile)
    if not profile.emulated or profile.target_batch is None:
        raise ValueError(
            f"an emulated target needs an emulated profile with a batched forward, got "
            f"{profile.name!r}"
        )
    return lambda model: GreedyOracleRunner(model, oracle)


def main(argv: list[str] | None = None) -> int:
    """``python -m edgespec.cloud.server`` with every session's target emulated (see above)."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--oracle-prompts", required=True, type=Path)
    known, rest = own.parse_known_args(argv if argv is not None else sys.argv[1:])
    args = server.build_parser().parse_args(rest)
    # the step thread's padding sleep ends while the event loop serves dozens of streams
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        spec = json.loads(known.oracle_prompts.read_text())
        oracle = GreedyOracle(spec["prompts"], spec["max_new_tokens"], args.max_block_tokens + 1)
        factory = target_runner_factory(args.compute_profile, oracle)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return server.main(rest, runner_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
