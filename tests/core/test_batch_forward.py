"""`extend_batch`: one forward for many sequences equals each sequence's own `extend`.

Every architecture in `support.tiny_models.ARCHS` (sliding-window and hybrid ones included),
ragged cache lengths (0 included) and ragged feeds, then a rollback and a second batched step,
so the keys each runner took from the batch are checked by what follows them."""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import ARCHS, tiny_model

from edgespec.core.batch_forward import extend_batch
from edgespec.core.runner import ModelRunner

# (tokens cached before, tokens fed): past the sliding window (8), ragged, one fresh cache.
SHAPES = ((0, 13), (20, 3), (5, 1), (17, 9), (30, 5))
TOL = 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_equals_each_sequence_alone(arch: str) -> None:
    model = tiny_model(arch, 300, random_head=True)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 300, (p + n + 6,), generator=gen).tolist() for p, n in SHAPES]
    alone = [ModelRunner(model) for _ in SHAPES]
    batched = [ModelRunner(model) for _ in SHAPES]
    for (p, _), ids, a, b in zip(SHAPES, seqs, alone, batched, strict=True):
        if p:
            a.prefill(ids[:p])
            b.prefill(ids[:p])
    feeds = [ids[p : p + n] for (p, n), ids in zip(SHAPES, seqs, strict=True)]
    for round_ in range(2):
        got = extend_batch(batched, feeds)
        for a, b, feed, logits in zip(alone, batched, feeds, got, strict=True):
            want = a.extend(feed)
            assert logits.shape == want.shape
            assert torch.allclose(logits, want, atol=TOL, rtol=0), (arch, round_)
            assert torch.equal(logits.argmax(-1), want.argmax(-1))
            assert b.length == a.length
        # Drop the last fed token (a rejected draft) and feed it again plus 4 more.
        for a, b in zip(alone, batched, strict=True):
            a.rollback(a.length - 1)
            b.rollback(b.length - 1)
        feeds = [ids[a.length : a.length + 5] for ids, a in zip(seqs, alone, strict=True)]


def test_bad_batches_are_refused() -> None:
    model = tiny_model("llama", 300)
    runner = ModelRunner(model)
    with pytest.raises(ValueError, match="distinct"):
        extend_batch([runner, runner], [[1], [2]])
    with pytest.raises(ValueError, match="at least 1 token"):
        extend_batch([runner, ModelRunner(model)], [[1], []])
    with pytest.raises(ValueError, match="non-empty"):
        extend_batch([], [])
    with pytest.raises(ValueError, match="token ids"):
        extend_batch([runner], [[300]])
    other = ModelRunner(tiny_model("llama", 300, seed=1))
    with pytest.raises(ValueError, match="share one model"):
        extend_batch([runner, other], [[1], [2]])
