"""One Hugging Face causal LM, one sequence, one KV cache that can be rolled back exactly.

`ModelRunner` is the only place that calls a model's forward. Speculative decoding needs three
things from it: a prefill, an `extend` that appends several tokens in ONE forward pass and returns
the logits of every appended position (the target scores a whole draft block at once), and a
`rollback` that drops rejected tokens from the cache so the next `extend` continues exactly as if
they had never been fed. Sampling and acceptance live elsewhere (`sampling.py`, `rejection.py`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from edgespec.core.tree import node_depths, tree_attention_mask
from edgespec.core.validation import check_int, is_int

logger = logging.getLogger(__name__)

TokenIds = Sequence[int] | Tensor


def additive_mask(allowed: Tensor) -> Tensor:
    """A boolean attention mask (True: may attend) as the additive float32 mask models take."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which `model.forward` takes and returns its KV cache: ``"cache"`` from
    transformers 5.24 on (where ``past_key_values`` still works but warns that it goes in 5.40),
    ``"past_key_values"`` before. Read from the forward's signature, so a model whose forward
    has not been migrated keeps working."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# Attention kinds whose keys/values a plain (full) `DynamicCache` layer holds exactly: the kind
# only changes the attention mask, which the model builds from its config, not from the cache.
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
ROLLBACK_MODES = ("auto", "crop", "recompute")


def _full_cache_fits(model: PreTrainedModel) -> bool:
    """Whether every layer of `model` is attention that a full `DynamicCache` can hold (no
    recurrent or linear-attention state, which has no per-token entries to crop)."""
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    return layer_types is None or set(layer_types) <= _ATTENTION_LAYER_TYPES


class ModelRunner:
    """Runs one HF `AutoModelForCausalLM` for ONE sequence with its KV cache.

    The cache is a `DynamicCache` of full layers for every attention model, sliding-window and
    hybrid ones included: a sliding-window layer that drops old positions cannot be rolled back
    once the window has filled (transformers refuses to crop it), while a full layer can, and the
    window still applies through the attention mask. The price is memory: a sliding layer keeps
    the whole sequence instead of its window. A model with other state (recurrent, linear
    attention) builds its own cache; a rollback then re-runs the kept tokens from scratch
    (`rollback_mode`): exact, at the cost of one forward over the prefix.

    Invariants:
      - `length` is the number of tokens whose keys/values are in the cache; the next token fed is
        placed at position `length` (explicit `position_ids`, so a rollback followed by an extend
        gives the same logits as a fresh run over the same tokens, up to float rounding).
      - Every call to `prefill` or `extend` runs exactly one forward pass (`forwards` counts them).
      - Logits come back as float32 on `device`, whatever the model's dtype.

    Not thread-safe: one runner serves one sequence at a time.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: str | torch.device | None = None,
        rollback_mode: str = "auto",
    ) -> None:
        """Wrap `model` (put in eval mode). `device=None` keeps the model where it is.

        `rollback_mode`: "crop" drops rejected tokens from a full `DynamicCache` (any attention
        model), "recompute" re-runs the kept tokens (any model: exact but one extra forward per
        rollback), "auto" crops where the model is attention only and recomputes otherwise.
        """
        if rollback_mode not in ROLLBACK_MODES:
            raise ValueError(
                f"rollback_mode must be one of {ROLLBACK_MODES}, got {rollback_mode!r}"
            )
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device: torch.device = model.device
        out_emb = model.get_output_embeddings()
        # The logits width is what matters to samplers; it can exceed the tokenizer's vocabulary
        # (padded embedding matrices), so read it from the output layer when there is one.
        if out_emb is not None and getattr(out_emb, "weight", None) is not None:
            self.vocab_size: int = int(out_emb.weight.shape[0])
        else:
            self.vocab_size = int(model.config.get_text_config().vocab_size)
        text_cfg = model.config.get_text_config()
        max_pos = getattr(text_cfg, "max_position_embeddings", None) or getattr(
            text_cfg, "n_positions", None
        )
        # Longest sequence the cache may hold; None when the config states no limit.
        self.max_length: int | None = int(max_pos) if max_pos else None
        self.forwards: int = 0
        self._cache: Cache | None = None  # created by the first forward
        self._cache_arg = cache_argument(model)
        self._length = 0
        if rollback_mode == "auto":
            rollback_mode = "crop" if _full_cache_fits(model) else "recompute"
        self.rollback_mode = rollback_mode
        # The tokens in the cache (1-D long, on `device`), kept in "recompute" mode only: what its
        # rollback re-runs (a crop needs no copy of them on every forward).
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ModelRunner:
        """Load a causal LM from a LOCAL checkpoint directory (never touches the model hub).

        `device=None` picks CUDA when available, else CPU. On CPU the model is always loaded in
        float32 (half precision on CPU is slow and not bit-stable across kernels); on other devices
        `dtype=None` keeps the checkpoint's saved dtype.
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path must be a local checkpoint directory, got {str(path)!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cpu":
            if dtype is not None and dtype != torch.float32:
                logger.warning("dtype %s ignored on CPU: loading %s in float32", dtype, path)
            load_dtype: torch.dtype | str = torch.float32
        else:
            load_dtype = dtype if dtype is not None else "auto"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, local_files_only=True)
        return cls(model, device=device)

    @property
    def length(self) -> int:
        """Tokens currently in the KV cache."""
        return self._length

    def reset(self) -> None:
        """Drop the whole cache (length becomes 0)."""
        self._cache = None
        self._length = 0
        self._ids = self._ids[:0]

    def prefill(self, ids: TokenIds) -> Tensor:
        """Reset the cache and run `ids` (n >= 1 tokens) through the model in one forward.

        Returns the logits predicting the token after `ids[-1]`, shape (V,), float32.
        """
        self.reset()
        return self._forward(ids, last_only=True)[-1]

    def extend(self, ids: TokenIds) -> Tensor:
        """Append `ids` (n >= 1 tokens) to the cache in ONE forward pass.

        Returns logits (n, V) float32; row i predicts the token after `ids[i]`.
        A 1-D long tensor on `device` is accepted too; then ids are not range-checked, so that
        feeding a just-sampled token does not force a device->host sync.
        """
        return self._forward(ids, last_only=False)

    def extend_tree(
        self,
        ids: Sequence[int],
        parents: Sequence[int],
        tree_start: int | None = None,
        *,
        guesses: bool = False,
    ) -> Tensor:
        """Append tree nodes `ids` (n >= 1) in ONE forward, each attending to the cache before
        `tree_start` (default: the current length) and to its own ancestors, at position
        tree_start + depth.

        `guesses`: the caller's word that the tree holds guesses drafted ahead, chains hanging
        off a prefix (`Drafter.propose_ahead` with branches), whose rows it reads only to
        continue each node's own chain, never to rank nodes against each other. This runner
        computes every row either way; a runner that approximates rows no verification can
        use (the capacity benchmark's draft memo, `edgespec.bench.emulated_edge`) may do so
        only for such a tree, since in a token tree (`grow_tree`) a node's row decides which
        nodes fill the budget.

        The tree's nodes are the cache entries from `tree_start` on (fed by earlier calls) then
        `ids`: `parents` has one entry per node of that whole tree, as in
        `edgespec.core.tree.DraftTree` (-1: a child of the token before `tree_start`).
        Returns logits (n, V) float32; row i predicts the token after ids[i]. `keep_nodes`
        compacts the cache to one path afterwards. Crop mode only (a recomputed cache has no
        per-node entries to select).
        """
        if self.rollback_mode != "crop":
            raise RuntimeError("extend_tree needs a croppable cache (rollback_mode 'crop')")
        start = self._length if tree_start is None else tree_start
        input_ids = self._as_input(ids)
        n = input_ids.shape[1]
        if not 0 <= start <= self._length or len(parents) != self._length - start + n:
            raise ValueError(
                f"parents must have one entry per tree node ({self._length - start + n}), "
                f"got {len(parents)}"
            )
        depths = node_depths(parents)[-n:]
        positions = torch.tensor(depths, device=self.device).view(1, -1) + start
        return self._forward(
            input_ids[0],
            last_only=False,
            position_ids=positions,
            mask=self._tree_mask(parents, start, n),
        )

    def attention_windows(self) -> dict[str, int | None] | int | None:
        """The sliding window each attention kind applies: an int (or None: full attention)
        when every layer is of one kind, else a dict per kind ("full_attention",
        "sliding_attention", ...). A custom (4D) mask must apply these windows itself."""
        config = self.model.config.get_text_config()
        window = getattr(config, "sliding_window", None)
        kinds = set(getattr(config, "layer_types", None) or ())
        if len(kinds) > 1:
            return {k: window if k == "sliding_attention" else None for k in kinds}
        return window if kinds != {"full_attention"} else None

    def _tree_mask(self, parents: Sequence[int], start: int, n: int) -> Tensor | dict[str, Tensor]:
        """The additive 4D tree mask of the last `n` nodes; a dict per attention kind for models
        that mix full and sliding layers (each kind gets its own window)."""

        def additive(w: int | None) -> Tensor:
            allowed = tree_attention_mask(parents, start, w)[-n:].to(self.device)
            return additive_mask(allowed)[None, None]

        windows = self.attention_windows()
        if isinstance(windows, dict):
            return {k: additive(w) for k, w in windows.items()}
        return additive(windows)

    def keep_nodes(self, start: int, nodes: Sequence[int]) -> None:
        """Keep cache entries [0, start) plus entries start + i for i in `nodes` (ascending),
        dropping the rest: after `extend_tree` at length `start`, `nodes` is the accepted path."""
        if not all(type(layer) is DynamicLayer for layer in getattr(self._cache, "layers", [])):
            raise RuntimeError(f"{type(self.model).__name__}'s cache cannot be compacted")
        keep = list(range(start)) + [start + i for i in nodes]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self._cache is not None
        for layer in self._cache.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        self._length = len(keep)

    def rollback(self, length: int) -> None:
        """Truncate the cache to its first `length` tokens (0 <= length <= self.length)."""
        length = check_int("length", length, 0, self._length)
        if length == self._length:
            return
        if length == 0:
            self.reset()
            return
        if self.rollback_mode == "recompute":
            kept = self._ids[:length]
            self.reset()
            self._forward(kept, last_only=True)
            return
        if not isinstance(self._cache, DynamicCache) or not all(
            type(layer) is DynamicLayer for layer in self._cache.layers
        ):
            raise RuntimeError(f"{type(self.model).__name__}'s cache cannot be cropped")
        # transformers >= 5 crops by a NEGATIVE count of tokens to remove (4.x accepts it too).
        self._cache.crop(length - self._length)
        self._length = length

    # True for a runner that computes its rows without a model forward of its own (a
    # benchmark's memoized target): the batching verifier runs it alone but inside the batched
    # step, and charges its rows to the step's modelled time rather than padding it apart.
    step_padded: bool = False

    @property
    def batchable(self) -> bool:
        """Whether `edgespec.core.batch_forward` may run this runner's forwards batched with
        others': its cache is (or will be) a `DynamicCache` of full layers ("crop" mode)."""
        return self.rollback_mode == "crop"

    def kv_layers(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values), each (1, H, length, D); [] while the cache is empty."""
        if self._cache is None or self._length == 0:
            return []
        return [(layer.keys, layer.values) for layer in self._cache.layers]

    def append_kv(self, layers: Sequence[tuple[Tensor, Tensor]], n: int) -> None:
        """Append keys/values of `n` tokens a batched forward computed for this sequence: per
        layer (keys, values), each (1, H, n, D). Counts as one forward (`forwards`)."""
        if not self.batchable:
            raise RuntimeError(f"a {self.rollback_mode!r} runner's cache cannot take batched KV")
        if self.max_length is not None and self._length + n > self.max_length:
            raise ValueError(
                f"sequence length must be <= max_position_embeddings={self.max_length}, "
                f"got {self._length + n}"
            )
        if self._cache is None:
            self._cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            self._cache.update(keys, values, index)
        self._length += n
        self.forwards += 1

    def _as_input(self, ids: TokenIds) -> Tensor:
        """Token ids -> (1, n) long tensor on the device, validated when given on the host."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1 or ids.numel() == 0:
                raise ValueError(
                    f"ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}"
                )
            return ids.to(device=self.device, dtype=torch.long).view(1, -1)
        ids = list(ids)
        if not ids:
            raise ValueError("ids must hold at least 1 token, got 0")
        for t in ids:
            if not is_int(t) or not 0 <= t < self.vocab_size:
                raise ValueError(f"token ids must be ints in [0, {self.vocab_size}), got {t!r}")
        return torch.tensor(ids, dtype=torch.long, device=self.device).view(1, -1)

    @torch.inference_mode()
    def _forward(
        self,
        ids: TokenIds,
        last_only: bool,
        position_ids: Tensor | None = None,
        mask: Tensor | dict[str, Tensor] | None = None,
    ) -> Tensor:
        input_ids = self._as_input(ids)  # (1, n)
        n = input_ids.shape[1]
        if self.max_length is not None and self._length + n > self.max_length:
            raise ValueError(
                f"sequence length must be <= max_position_embeddings={self.max_length}, "
                f"got {self._length + n}"
            )
        if position_ids is None:
            position_ids = torch.arange(
                self._length, self._length + n, device=self.device, dtype=torch.long
            ).view(1, -1)  # (1, n)
        extra = {} if mask is None else {"attention_mask": mask}  # a 4D mask: tree attention
        if self._cache is None and self.rollback_mode == "crop":
            # No config: every layer a full one (see the class docstring).
            self._cache = DynamicCache()
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            # Only the last row is needed after a prefill: skip the (n, V) head matmul.
            logits_to_keep=1 if last_only else 0,
            **{self._cache_arg: self._cache},
            **extra,
        )
        self._cache = getattr(out, self._cache_arg)
        if self.rollback_mode == "recompute":  # only a recomputing rollback reads them
            self._ids = torch.cat((self._ids, input_ids[0]))
        self._length += n
        self.forwards += 1
        return out.logits[0].float()  # (n, V) or (1, V)
