"""Emulated edge devices for the capacity benchmark: draft forwards computed once per host.

In a real deployment every session's draft model runs on its own edge device, so the draft
compute of different sessions never competes. The capacity benchmark emulates N such devices on
a host with two shared cores; running N real draft models there would make the edges, not the
verifier, the bottleneck (each forward's Python and kernel time serializes on the host), so the
benchmark would measure the host rather than the method.

`MemoRunner` removes that artefact without changing any token. Under an EMULATED compute
profile it is the draft's runner of each session: a `PaddedRunner` (every `prefill`/`extend`
still takes at least the profile's modelled draft time, slept on the session's own thread, so
the modelled device times of different sessions overlap as they would on separate devices)
whose logits come from a per-process `LogitsMemo`: the logits row of a position depends only on
the tokens up to it, so it is keyed by that token prefix, computed by the real draft model the
first time any session of the process needs it, and reused by every later forward over the same
prefix (sessions with the same prompt share their work). The real KV cache is filled lazily:
a forward whose rows are all known runs nothing; a miss runs ONE real forward over every token
the real cache lacks. Drafting, sampling and stopping code are untouched, so each session
drafts what the plain drafter would: the same rows, up to the float rounding by which any
forward over a differently chunked prefix differs (the plain drafter's cache is chunked by its
own rounds too). Tests compare the blocks with the plain drafter's on a real model.

Blocks that cannot matter are not computed. Given the greedy output each prompt will have (its
*reference*, `LogitsMemo.add_references`), a row predicting after a token prefix that no
reference starts with belongs to a draft that the target's greedy walk rejects before it: a chain
token after a rejected one, or a whole block drafted ahead of a verdict on a guess that missed
(answered STALE, no verifier work). Such a *dead* row is stood in for by the row of its longest
live prefix, so the block keeps its usual size and timing without a real forward. A token tree
grown on a live prefix is computed whole, its dead nodes included: their rows decide which
nodes fill the tree's budget. The tree of guesses a pipelined chain drafts ahead (its branches)
is not such a tree: each guess follows its own rows, so its dead nodes are stood in for, in
every session (the drafter says which tree it feeds: `ModelRunner.extend_tree(...,
guesses=True)`). Outputs are still checked against the references, so a stand-in that
reached a committed token would show as an altered output.

A token tree's rows depend on which shape the session chose at which committed prefix, which an
adaptive tree controller decides from timings: no earlier run of the same sessions asks for the
same rows, and the rows it had not asked for were computed during the measurement, on the host
(session 16: 174-187 real forwards, 5-6 s of host time in a 17 s measurement, in `adaptive_tree`
only). Under greedy decoding a tree's fed nodes at a root are fixed by the root and the width
alone (each level feeds the `width` best of the one before, whatever the node budget or depth),
so `fill_token_trees` computes them once ahead, for every root a session can grow a tree at
(every prefix of every reference) and every width, up to the deepest level.

Use only with an emulated profile: with ``real`` nothing is padded and sharing would make the
edges faster than N real devices (`runner_factory` returns None then: plain runners).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from edgespec.core.params import SamplingParams
from edgespec.core.profiles import ComputeProfile, PaddedRunner, get_profile
from edgespec.core.runner import ModelRunner, TokenIds
from edgespec.core.tree import TreeShape
from edgespec.core.tree_draft import grow_tree
from edgespec.core.validation import check_int, is_int

# Logits rows kept per process (demo draft: 16 KiB each, 512 MiB). Token trees need room: 8
# sessions of a worker, ~1,000 node rows each per 96-token generation, warm-up and measured run,
# and the ~2,200 rows per prompt `fill_token_trees` computes ahead for widths 2-4, 10 levels.
DEFAULT_MEMO_ROWS = 32768
# The interpreter's switch interval (s) in benchmark processes that emulate devices: a thread
# whose padding sleep has ended waits for the GIL while other threads run Python, by default up
# to 5 ms per hand-over, most of a modelled 6 ms draft forward again.
GIL_SWITCH_S = 0.0005


@dataclass(frozen=True)
class MemoStats:
    """Rows served from the memo (`hits`) and computed by a real forward (`misses`), the real
    forwards run (`real_forwards`) and the logical ones the sessions asked for (`forwards`)."""

    hits: int
    misses: int
    real_forwards: int
    forwards: int
    stand_ins: int = 0  # dead rows served by a live prefix's row (module docstring)
    # host time the real forwards took (ms, summed over sessions): the draft compute the
    # emulation could not keep off this host's cores
    real_ms: float = 0.0
    # committed tokens those forwards refed first, to bring a lagging real cache to the prefix
    catchup_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class LogitsMemo:
    """Logits rows of one model keyed by the token prefix they predict after (thread-safe,
    LRU-bounded to `max_rows`). Shared by the `MemoRunner`s of one process; one model per memo.
    """

    def __init__(self, max_rows: int = DEFAULT_MEMO_ROWS) -> None:
        self.max_rows = check_int("max_rows", max_rows, 1)
        self._rows: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        # Held while a real forward runs: sessions in lockstep ask for the same prefix at the
        # same moment, and the later ones should get the first one's rows, not compute them too
        # (the wait falls within their modelled draft time, which is slept anyway).
        self.compute_lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.real_forwards = 0
        self.forwards = 0
        self.stand_ins = 0
        self.real_ms = 0.0
        self.catchup_tokens = 0
        self._live: set[tuple[int, ...]] = set()  # every prefix of every reference

    def add_references(self, sequences: Sequence[Sequence[int]]) -> None:
        """Token sequences the sessions will commit (prompt + the target's greedy output): from
        now on a row whose prefix none of them starts with is dead (module docstring)."""
        with self._lock:
            for seq in sequences:
                self._live.update(tuple(seq[:p]) for p in range(1, len(seq) + 1))

    def is_live(self, key: tuple[int, ...]) -> bool:
        """Whether a row predicting after `key` can matter: True without references."""
        return not self._live or key in self._live

    def stand_in_rows(self, keys: Sequence[tuple[int, ...]]) -> list[Tensor] | None:
        """For dead `keys`: each one's stand-in, the memoized row of its longest live prefix
        (None, and nothing counted, when one of those is not memoized)."""
        with self._lock:
            rows = [self._rows.get(self._live_prefix(key)) for key in keys]
            if any(row is None for row in rows):
                return None
            self.stand_ins += len(rows)
        return rows  # type: ignore[return-value]

    def rows_or_stand_ins(self, keys: Sequence[tuple[int, ...]]) -> list[Tensor] | None:
        """Per key its memoized row, or for a dead key not memoized its stand-in (as
        `stand_in_rows`); None (nothing counted) when a live key or a stand-in is missing."""
        with self._lock:
            rows = []
            stood_in = 0
            for key in keys:
                row = self._rows.get(key)
                if row is None and not self.is_live(key):
                    row, stood_in = self._rows.get(self._live_prefix(key)), stood_in + 1
                if row is None:
                    return None
                rows.append(row)
            self.hits += len(keys) - stood_in
            self.stand_ins += stood_in
        return rows

    def _live_prefix(self, key: tuple[int, ...]) -> tuple[int, ...]:
        """The longest proper prefix of `key` that is live (() when none is)."""
        for end in range(len(key) - 1, 0, -1):
            if key[:end] in self._live:
                return key[:end]
        return ()

    def get_rows(self, keys: Sequence[tuple[int, ...]]) -> list[Tensor] | None:
        """The rows predicting after each token sequence of `keys`, or None when any is
        unknown."""
        with self._lock:
            rows = [self._rows.get(key) for key in keys]
            if any(row is None for row in rows):
                return None
            for key in keys:
                self._rows.move_to_end(key)
            self.hits += len(keys)
        return rows  # type: ignore[return-value]

    def put(
        self, tokens: Sequence[int], start: int, logits: Tensor, ms: float, catchup: int
    ) -> None:
        """Store `logits` (n, V): row i predicts after tokens[:start + i + 1] (`put_rows`)."""
        n = int(logits.shape[0])
        self.put_rows([tuple(tokens[: start + i + 1]) for i in range(n)], logits, ms, catchup)

    def put_rows(
        self, keys: Sequence[tuple[int, ...]], logits: Tensor, ms: float, catchup: int
    ) -> None:
        """Store the rows of one real forward: `logits[i]` predicts after `keys[i]`; the
        forward took `ms` of host time and refed `catchup` committed tokens first. A key already
        memoized keeps its row: a forward that recomputes it (a catch-up, a level of a tree
        some of whose nodes were known) gives it again up to float rounding, and replacing it
        could change a tree grown from it since, which the next session growing the same tree
        would then miss (`fill_token_trees` relies on this)."""
        with self._lock:
            self.misses += int(logits.shape[0])
            self.real_forwards += 1
            self.real_ms += ms
            self.catchup_tokens += catchup
            for key, row in zip(keys, logits, strict=True):
                if key not in self._rows:
                    self._rows[key] = row.clone()
                self._rows.move_to_end(key)
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)

    def count_forward(self) -> None:
        with self._lock:
            self.forwards += 1

    def stats(self) -> MemoStats:
        with self._lock:
            return MemoStats(
                self.hits,
                self.misses,
                self.real_forwards,
                self.forwards,
                self.stand_ins,
                self.real_ms,
                self.catchup_tokens,
            )


class MemoRunner(PaddedRunner):
    """A `PaddedRunner` for ONE session whose logits come from a shared `LogitsMemo` (see the
    module docstring). `length`, `forwards` and the returned logits are those of the logical
    sequence (what a plain runner would report); the real cache holds a prefix of it
    (`real_length`). Crop-mode (attention-only) models only; no batched KV. A tree node's row is
    memoized by its token path (the prefix and its ancestors: all it attends to), like a chain
    position's; a tree's accepted path is refed as committed tokens (`keep_nodes` is not needed: `length` never counts tree nodes).
    Returned rows are shared with other sessions: callers must not modify them in place (the
    drafter does not). Sampling is unaffected: only logits are shared, each drafter draws with
    its own generator, so any sampling mode drafts what the plain drafter would.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        profile: ComputeProfile,
        memo: LogitsMemo,
        device: str | torch.device | None = None,
        stand_in_dead_nodes: bool = True,
    ) -> None:
        cost, prefill = profile.costs("draft")
        super().__init__(model, cost, prefill, device=device)
        if self.rollback_mode != "crop":
            raise ValueError(f"{type(model).__name__} needs a recomputing rollback: no memo")
        self.memo = memo
        # Dead tree nodes (on a live root) may be stood in for, as chain rows are: right for
        # the trees of guesses drafted ahead (`Drafter.propose_ahead` with branches), whose
        # dead chains are never verified, but not for a token tree (`grow_tree`), where a dead
        # node's row decides which nodes fill the budget. The drafter tells which tree it
        # feeds (`extend_tree(..., guesses=True)`), so a session that runs both (the tree
        # controller's chain rounds draft branches ahead) gets stand-ins in its guess trees
        # only. False: none at all (a control for the tests).
        self.stand_in_dead_nodes = stand_in_dead_nodes
        self._tokens: list[int] = []  # the logical sequence
        # the tree being drafted (`extend_tree`): its fed nodes after the logical sequence's
        # first `_tree_start` tokens, of which the real cache holds the first `_real_tree`
        self._tree: list[int] = []
        self._tree_start = 0
        self._real_tree = 0
        self._logical_forwards = 0

    @property
    def length(self) -> int:
        return len(self._tokens)

    @property
    def real_length(self) -> int:
        """Tokens in the real KV cache (a prefix of the logical sequence)."""
        return self._length

    @property
    def forwards(self) -> int:
        return self._logical_forwards

    @forwards.setter
    def forwards(self, value: int) -> None:
        # ModelRunner counts its real forwards here; the memo counts those.
        pass

    def reset(self) -> None:
        super().reset()
        self._tokens = []
        self._tree, self._real_tree = [], 0

    def prefill(self, ids: TokenIds) -> Tensor:
        t0 = time.perf_counter()
        new = self._host_ids(ids)
        self._tokens = []
        super().rollback(0)
        out = self._rows(new)[-1]
        self._pad(t0, self.prefill_cost.ms(len(new)))
        return out

    def extend(self, ids: TokenIds) -> Tensor:
        t0 = time.perf_counter()
        out = torch.stack(self._rows(self._host_ids(ids)))
        self._pad(t0, self.cost.ms(out.shape[0]))
        return out

    def rollback(self, length: int) -> None:
        self._close_tree()
        length = check_int("length", length, 0, len(self._tokens))
        del self._tokens[length:]
        if self._length > length:
            super().rollback(length)

    def extend_tree(
        self,
        ids: Sequence[int],
        parents: Sequence[int],
        tree_start: int | None = None,
        *,
        guesses: bool = False,
    ) -> Tensor:
        """Tree drafting (`grow_tree`, and guesses drafted ahead: `guesses`): the rows of `ids`
        fed as tree nodes after the logical sequence's first `tree_start` tokens. Under tree
        attention a node sees the prefix and its own ancestors only, so its row is the one
        predicting after that token path, shared with chains and with other trees (other
        shapes, other sessions) through the same prefix keys; a miss runs the real tree
        forward over every node the real cache lacks. Dead nodes are stood in for only in a
        tree of `guesses` (see `ModelRunner.extend_tree`)."""
        t0 = time.perf_counter()
        start = len(self._tokens) if tree_start is None else tree_start
        new = self._host_ids(ids)
        if len(parents) == len(new):  # the tree's first level: a new tree
            self._close_tree()
            self._tree_start = start
        elif start != self._tree_start or len(parents) != len(self._tree) + len(new):
            raise ValueError("extend_tree must continue the tree fed so far")
        root = tuple(self._tokens[:start])
        keys = _node_paths(root, self._tree + new, parents)[len(self._tree) :]
        self._logical_forwards += 1
        self.memo.count_forward()
        found = self.memo.get_rows(keys)
        if found is None and not self.memo.is_live(root):  # a tree no walk will reach
            found = self.memo.stand_in_rows(keys)
        elif found is None and guesses and self.stand_in_dead_nodes:
            found = self.memo.rows_or_stand_ins(keys)
        if found is None:
            with self.memo.compute_lock:
                found = self.memo.get_rows(keys)
                if found is None:
                    t_real = time.perf_counter()
                    rows, catchup = self._compute_tree(start, new, parents)
                    ms = 1e3 * (time.perf_counter() - t_real)
                    self.memo.put_rows(keys, rows, ms, catchup)
        if found is not None:
            rows = torch.stack(found)
        self._tree.extend(new)
        self._pad(t0, self.cost.ms(len(new)))
        return rows

    def _compute_tree(
        self, start: int, new: list[int], parents: Sequence[int]
    ) -> tuple[Tensor, int]:
        """The real tree forward: the real cache brought to the prefix (plus the nodes of this
        tree it holds already), then every node it lacks fed in one forward; returns the new
        nodes' rows and the committed tokens refed first."""
        if self._length < start + self._real_tree:  # nodes of this tree are missing: refeed
            ModelRunner.rollback(self, min(self._length, start))
            self._real_tree = 0
        catchup = max(start - self._length, 0)
        if catchup:
            # Only the cache is wanted here: the refed positions' rows are committed ones,
            # memoized when they were drafted, and the (n, V) head matmul over them was most
            # of a catch-up forward's time.
            self._forward(self._tokens[self._length : start], last_only=True)
        feed = self._tree[self._real_tree :] + new
        logits = ModelRunner.extend_tree(self, feed, parents, tree_start=start)
        self._real_tree = len(self._tree) + len(new)
        return logits[-len(new) :], catchup

    def _close_tree(self) -> None:
        """Forget the tree fed last (its nodes leave the real cache, which holds a prefix of
        the logical sequence again). The accepted path comes back as committed tokens."""
        if self._real_tree:
            ModelRunner.rollback(self, self._tree_start)
        self._tree, self._real_tree = [], 0

    def keep_nodes(self, start: int, nodes: Sequence[int]) -> None:
        # The drafter keeps a tree's fed path only when the cache's length shows it; this
        # runner's logical length never includes tree nodes, so the path is refed as committed
        # tokens by the next forward instead.
        raise NotImplementedError("MemoRunner refeeds a tree's path: nothing to keep")

    def append_kv(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("MemoRunner takes no batched KV")

    def _host_ids(self, ids: TokenIds) -> list[int]:
        return host_ids(ids, self.vocab_size, self.max_length, len(self._tokens))

    def _rows(self, new: list[int]) -> list[Tensor]:
        """Append `new` to the logical sequence; its rows, from the memo or one real forward
        over everything the real cache lacks."""
        self._close_tree()
        start = len(self._tokens)
        self._tokens.extend(new)
        self._logical_forwards += 1
        self.memo.count_forward()
        keys = [tuple(self._tokens[: p + 1]) for p in range(start, len(self._tokens))]
        rows = self.memo.get_rows(keys)
        if rows is not None:
            return rows
        if not any(self.memo.is_live(key) for key in keys):  # tokens no walk will accept
            rows = self.memo.stand_in_rows(keys)
            if rows is not None:
                return rows
        with self.memo.compute_lock:
            rows = self.memo.get_rows(keys)  # computed while this one waited?
            return rows if rows is not None else self._compute(start)

    def _compute(self, start: int) -> list[Tensor]:
        t_real = time.perf_counter()
        real = self._length
        logits = self._forward(self._tokens[real:], last_only=False)  # (L - real, V)
        ms = 1e3 * (time.perf_counter() - t_real)
        self.memo.put(self._tokens, real, logits, ms, start - real)
        return list(logits[start - real :])


def fill_token_trees(
    memo: LogitsMemo,
    model: PreTrainedModel,
    references: Sequence[Sequence[int]],
    starts: Sequence[int],
    widths: Sequence[int],
    depth: int,
) -> int:
    """Compute ahead into `memo` every row a greedy token tree of any of `widths` and at most
    `depth` levels asks for at any root a session can reach: committed prefix ``ref[:m]`` of
    each reference for m from its prompt's length (`starts`) to its end. Returns the real
    forwards run. Rows already memoized are kept (`LogitsMemo.put_rows`) and reused, so the
    trees grown from the memo later are these: greedy growth reads nothing but the rows
    (`grow_tree`). Greedy only: a sampled tree's nodes depend on the draws. Runs the drafter's
    own `grow_tree` on an unpadded `MemoRunner`, so the rows are keyed and computed exactly as
    a session's would be."""
    if len(references) != len(starts):
        raise ValueError(f"starts must have one entry per reference ({len(references)})")
    if not widths:
        return 0
    depth = check_int("depth", depth, 1)
    free = ComputeProfile("fill", True)  # no padding: nothing here is a device's forward
    runner = MemoRunner(model, free, memo)
    before = memo.stats().real_forwards
    greedy = SamplingParams(max_new_tokens=1)
    shapes = [TreeShape(w + (depth - 1) * w * w, depth, w) for w in sorted(set(widths))]
    for ref, start in zip(references, starts, strict=True):
        start = check_int("starts[i]", start, 1, len(ref))
        runner.reset()
        runner.prefill(list(ref))  # every committed row of the reference, one forward
        for m in range(start, len(ref) + 1):
            for shape in shapes:  # each width's whole beam
                runner.rollback(m - 1)  # grow_tree feeds the root's last token itself
                grow_tree(runner, list(ref[:m]), greedy, shape)
    return memo.stats().real_forwards - before


def _node_paths(
    prefix: Sequence[int], nodes: Sequence[int], parents: Sequence[int]
) -> list[tuple[int, ...]]:
    """Per tree node, the tokens it attends to and itself: `prefix`, its ancestors' tokens from
    the root down, its own (`parents[i]`: the index of node i's parent, or negative at the
    root)."""
    paths: list[tuple[int, ...]] = []
    base = tuple(prefix)
    for token, parent in zip(nodes, parents, strict=True):
        paths.append((paths[parent] if parent >= 0 else base) + (token,))
    return paths


def host_ids(ids: TokenIds, vocab_size: int, max_length: int | None, have: int) -> list[int]:
    """`ids` as host ints, checked as a runner with `have` tokens would check them before a
    forward (non-empty, ids in [0, vocab_size), the sequence within max_length): for the
    benchmark runners that keep a logical sequence instead of running every forward."""
    new = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if not new:
        raise ValueError("ids must hold at least 1 token, got 0")
    for t in new:
        if not is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"token ids must be ints in [0, {vocab_size}), got {t!r}")
    if max_length is not None and have + len(new) > max_length:
        raise ValueError(
            f"sequence length must be <= max_position_embeddings={max_length}, "
            f"got {have + len(new)}"
        )
    return [int(t) for t in new]


def runner_factory(
    profile: ComputeProfile | str, memo: LogitsMemo
) -> Callable[[PreTrainedModel], ModelRunner] | None:
    """The draft runner factory of an emulated edge device sharing `memo`, or None when the
    profile pads nothing (``real``: each session must then pay its real draft compute)."""
    profile = get_profile(profile)
    if not profile.emulated:
        return None
    # An emulated draft that costs the edge nothing (it runs on the verifier's GPU) is memoized
    # too: its sessions' real forwards must not queue on this host either.
    return lambda model: MemoRunner(model, profile, memo)
