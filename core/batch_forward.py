"""One forward pass for many sequences: each `ModelRunner` appends its own tokens to its own cache.

`extend_batch(runners, feeds)` is what `runner.extend(feed)` is for one sequence, for B sequences
of ragged cache lengths P_b and ragged feeds n_b, in ONE model forward. The sequences' caches stay
per runner (a `DynamicCache` of full layers each, so a rejected draft is still cropped exactly,
sliding-window models included); for the forward they are stacked into one batched cache:

    row b, kv index:  [ left pad (L - P_b) | cached P_b | fed n_b | right pad (N - n_b) ]
    L = max P_b, N = max n_b;  input_ids (B, N) right-padded;  attention_mask (B, L + N)
    marks the cached and fed tokens;  position_ids (B, N) = P_b + arange(N).

Left-padding the cache and right-padding the feed keeps every row's real tokens contiguous, so
the kv-index distance between two real tokens is their position distance: causal and
sliding-window masks, which transformers builds on kv indices, treat each row as if it ran alone.
Padded keys are masked out; padded queries (the right pad) see real keys before them (never a
fully masked row) and their logits are dropped. After the forward, each runner appends the keys
and values of its n_b fed tokens, sliced from the batched cache.

Why not transformers' `PagedAttentionCache` (continuous batching): its sliding-window allocator
is a ring buffer of the window, so a rejected draft overwrites keys that a rollback needs back
(the reason `ModelRunner` keeps full layers), it has no per-request truncation, and it comes with
its own scheduler and request state machine. Stacking costs one copy of the batch's KV per
forward; that is the price of exact rollback on every architecture here.

Exactness: every real query attends to exactly the keys it would alone, at the same positions;
results equal the one-sequence forward up to float rounding (batched matmuls may sum in another
order), the same tolerance `extend` over k tokens already has against k one-token forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from edgespec.core.runner import ModelRunner, additive_mask
from edgespec.core.tree import node_depths, tree_attention_mask

__all__ = ["extend_batch"]


@torch.inference_mode()
def extend_batch(
    runners: Sequence[ModelRunner],
    feeds: Sequence[Sequence[int]],
    parents: Sequence[Sequence[int] | None] | None = None,
) -> list[Tensor]:
    """Append feeds[b] (n_b >= 1 token ids) to runners[b]'s cache, all in ONE forward pass.

    All runners must wrap the same model and be `batchable`, and be distinct. Returns, per
    runner, logits (n_b, V) float32 (row i predicts the token after feeds[b][i]), as
    `runner.extend(feeds[b])` would (but without a `PaddedRunner`'s padding: whoever batches
    pads the whole step). One runner runs its own forward (`ModelRunner.extend`, or
    `extend_tree` for a tree, as the one-at-a-time verifier does): a batch of one needs no
    stacked copy of its cache.

    `parents[b]`, when given and not None, makes row b a token tree, as
    `runner.extend_tree(feeds[b], parents[b])` would run it: each fed token attends to the
    cache and to its own ancestors, at position P_b + depth. The step then takes a 4D mask
    (one per attention kind, sliding windows applied by position) instead of the 2D one.
    """
    if len(runners) != len(feeds) or not runners:
        raise ValueError(
            f"runners and feeds must be non-empty and as many, got {len(runners)}, {len(feeds)}"
        )
    first = runners[0]
    model = first.model
    if len({id(r) for r in runners}) != len(runners):
        raise ValueError("runners must be distinct (one row per sequence)")
    for r in runners:
        if r.model is not model or not r.batchable:
            raise ValueError("runners must share one model and be batchable ('crop' mode)")
    fed = [list(f) for f in feeds]
    for f in fed:
        if not f:
            raise ValueError("every feed must hold at least 1 token, got 0")
        if len(fed) > 1:
            first._as_input(f)  # validates the ids (range, ints); extend does it for one
    trees = list(parents) if parents is not None else [None] * len(runners)
    if len(trees) != len(runners):
        raise ValueError(
            f"parents must have one entry per runner ({len(runners)}), got {len(trees)}"
        )
    if len(runners) == 1:
        # A lone session (the common case at low load) pays no copy of its whole cache per step.
        if trees[0] is not None:
            return [ModelRunner.extend_tree(first, fed[0], trees[0])]
        return [ModelRunner.extend(first, fed[0])]
    device = first.device
    lengths = [r.length for r in runners]  # P_b
    sizes = [len(f) for f in fed]  # n_b
    rows, past, width = len(runners), max(lengths), max(sizes)  # B, L, N
    input_ids = torch.zeros((rows, width), dtype=torch.long, device=device)  # (B, N)
    mask = torch.zeros((rows, past + width), dtype=torch.long, device=device)  # (B, L + N)
    for b, f in enumerate(fed):
        input_ids[b, : sizes[b]] = torch.tensor(f, dtype=torch.long, device=device)
        mask[b, past - lengths[b] : past + sizes[b]] = 1
    position_ids = torch.tensor(lengths, device=device).view(-1, 1) + torch.arange(
        width, device=device
    )  # (B, N)
    attention: Tensor | dict[str, Tensor] = mask
    if any(t is not None for t in trees):
        for b, tree in enumerate(trees):
            if tree is not None:
                if len(tree) != sizes[b]:
                    raise ValueError(
                        f"parents[{b}] must have one entry per fed token ({sizes[b]}), "
                        f"got {len(tree)}"
                    )
                depths = torch.tensor(node_depths(tree), device=device)
                position_ids[b, : sizes[b]] = lengths[b] + depths
        attention = _tree_step_mask(first, lengths, sizes, trees, position_ids)
    if first.max_length is not None:
        # Only padded queries can run past the model's positions (a real one is checked by
        # append_kv below): clamp them so a learned position table is not indexed out of range.
        position_ids = position_ids.clamp(max=first.max_length - 1)
    cache = (
        DynamicCache(ddp_cache_data=_stacked(runners, lengths, past)) if past else DynamicCache()
    )
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=0,
        **{first._cache_arg: cache},
    )
    cache = getattr(out, first._cache_arg)
    logits = out.logits.float()  # (B, N, V)
    results = []
    for b, runner in enumerate(runners):
        new = slice(past, past + sizes[b])
        runner.append_kv(
            [
                (layer.keys[b : b + 1, :, new], layer.values[b : b + 1, :, new])
                for layer in cache.layers
            ],
            sizes[b],
        )
        results.append(logits[b, : sizes[b]])
    return results


def _tree_step_mask(
    runner: ModelRunner,
    lengths: Sequence[int],
    sizes: Sequence[int],
    trees: Sequence[Sequence[int] | None],
    position_ids: Tensor,
) -> Tensor | dict[str, Tensor]:
    """The additive 4D mask (B, 1, N, L + N) of a step with tree rows, per attention kind
    (`ModelRunner.attention_windows`), over the stacked layout of `extend_batch`.

    Row b, real query i (position pos_bi): the cached keys [L - P_b, L) at positions 0..P_b-1,
    and the fed keys of its ancestors and itself (a chain row: every fed key up to i), each
    dropped when w or more positions before the query under a window w. A padded query sees
    its own key only (never a fully masked row; its logits are dropped)."""
    rows, width = position_ids.shape
    past = max(lengths)
    device = position_ids.device
    # ancestor-or-self among the fed tokens: (B, N, N), padded rows see themselves only
    related = torch.eye(width, dtype=torch.bool, device=device).repeat(rows, 1, 1)
    for b, tree in enumerate(trees):
        n = sizes[b]
        if tree is None:
            related[b, :n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        else:
            related[b, :n, :n] = tree_attention_mask(tree, 0).to(device)
    cached = torch.zeros(rows, width, past, dtype=torch.bool, device=device)
    key_pos = torch.zeros(rows, past + width, dtype=torch.long, device=device)
    for b in range(rows):
        cached[b, : sizes[b], past - lengths[b] :] = True
        key_pos[b, past - lengths[b] : past] = torch.arange(lengths[b], device=device)
    key_pos[:, past:] = position_ids
    allowed = torch.cat([cached, related], dim=-1)  # (B, N, L + N)
    distance = position_ids[:, :, None] - key_pos[:, None, :]  # query pos - key pos

    def for_window(w: int | None) -> Tensor:
        # every query keeps its own key (distance 0), so no row is fully masked
        return additive_mask(allowed if w is None else allowed & (distance < w))[:, None]

    windows = runner.attention_windows()
    if isinstance(windows, dict):
        return {kind: for_window(w) for kind, w in windows.items()}
    return for_window(windows)


def _stacked(
    runners: Sequence[ModelRunner], lengths: Sequence[int], past: int
) -> list[tuple[Tensor, Tensor]]:
    """The runners' caches as one batch: per layer (keys, values), each (B, H, L, D), row b's
    P_b tokens right-aligned at [L - P_b, L) and zeros before them."""
    caches = [r.kv_layers() for r in runners]
    template = next(c for c in caches if c)
    stacked = []
    for index, (keys, values) in enumerate(template):
        heads, dim = keys.shape[1], keys.shape[3]
        k_all = keys.new_zeros((len(runners), heads, past, dim))
        v_all = values.new_zeros((len(runners), heads, past, values.shape[3]))
        for b, cache in enumerate(caches):
            if lengths[b]:
                k_b, v_b = cache[index]
                k_all[b, :, past - lengths[b] :] = k_b[0]
                v_all[b, :, past - lengths[b] :] = v_b[0]
        stacked.append((k_all, v_all))
    return stacked
