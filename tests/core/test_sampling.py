"""logits_to_probs, make_generator and sample."""

import math

import pytest
import torch

from edgespec.core.params import SamplingParams
from edgespec.core.sampling import categorical, logits_to_probs, make_generator, sample

V = 100


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3  # (6, V)


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=10),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.5),
]


@pytest.mark.parametrize("params", PARAMS)
def test_rows_sum_to_one_float32(logits, params):
    probs = logits_to_probs(logits, params)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-6)
    assert bool((probs >= 0).all())


@pytest.mark.parametrize("params", PARAMS)
def test_works_on_1d_and_2d(logits, params):
    batched = logits_to_probs(logits, params)  # (6, V)
    for i in range(logits.shape[0]):
        assert torch.allclose(logits_to_probs(logits[i], params), batched[i], atol=1e-7)


def test_greedy_is_one_hot_at_argmax(logits):
    probs = logits_to_probs(logits, SamplingParams())
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([1.0, 5.0, 2.0, 5.0, 5.0])
    assert logits_to_probs(logits, SamplingParams()).tolist() == [0, 1, 0, 0, 0]


def test_temperature_one_is_softmax(logits):
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(probs, torch.softmax(logits, -1), atol=1e-6)
    probs = logits_to_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1), atol=1e-6)


def test_temperature_sharpens_and_flattens(logits):
    def entropy(t):
        p = logits_to_probs(logits, SamplingParams(temperature=t))
        return -(p * p.clamp_min(1e-30).log()).sum(-1)

    cold, warm, hot = entropy(0.3), entropy(1.0), entropy(3.0)
    assert bool((cold < warm).all()) and bool((warm < hot).all())
    assert bool((hot < math.log(V)).all())


def test_tiny_temperature_does_not_overflow(logits):
    probs = logits_to_probs(logits * 1e30, SamplingParams(temperature=1e-30))
    assert bool(torch.isfinite(probs).all())
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("top_k", [1, 5, 37, V - 1])
def test_top_k_keeps_exactly_k_largest(logits, top_k):
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=top_k))
    assert ((probs > 0).sum(-1) == top_k).all()
    kept = probs > 0
    expected = torch.zeros_like(kept).scatter_(-1, logits.topk(top_k, -1).indices, True)
    assert torch.equal(kept, expected)
    # the kept tokens keep their relative odds: softmax restricted to them
    restricted = torch.softmax(logits.masked_fill(~kept, -math.inf), -1)
    assert torch.allclose(probs, restricted, atol=1e-6)


def test_top_k_disabled_at_zero_or_at_least_vocab(logits):
    full = logits_to_probs(logits, SamplingParams(temperature=1.0))
    for k in (0, V, V + 10):
        assert torch.equal(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=k)), full)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([3.0, 2.0, 2.0, 1.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, True, False]


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_minimal_nucleus(logits, top_p):
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    full = torch.softmax(logits, -1)
    for row, p in zip(full, probs, strict=True):
        order = row.argsort(descending=True)
        cum = row[order].cumsum(0)
        # the smallest n with mass >= top_p (computed independently, in float64 to be safe)
        n = int((row[order].double().cumsum(0) < top_p).sum()) + 1
        n = min(n, V)
        kept = p > 0
        assert int(kept.sum()) == n
        assert bool(kept[order[:n]].all())  # it is the n most likely tokens
        assert float(cum[n - 1]) >= top_p - 1e-6
        if n > 1:
            assert float(cum[n - 2]) < top_p  # one fewer would not reach top_p
        assert torch.allclose(p[kept], row[kept] / row[kept].sum(), atol=1e-6)


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([0.0, 0.0, 0.0, 5.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert probs.tolist() == [0, 0, 0, 1]


def test_top_p_applies_to_the_top_k_renormalised_remainder():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # Alone, top_p=0.5 needs two tokens (0.4 < 0.5); after top_k=2 the first holds 4/7 >= 0.5.
    alone = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert (alone > 0).tolist() == [True, True, False, False]
    both = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert both.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_p_keeps_ties_at_the_boundary_together():
    # top_p=0.5 would stop after one of the two equal tokens; both stay, whatever the sort did.
    logits = torch.tensor([2.0, 2.0, 1.0, -5.0])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.3))
    assert (probs > 0).tolist() == [True, True, False, False]
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.3))
    assert probs.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_top_p_with_sorted_topk_shortcut_matches_full_sort(logits):
    # No ties: top-p works on the top_k values only; compare with top_k then a separate pass.
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.7)
    probs = logits_to_probs(logits, params)
    scaled = logits / 0.8
    kth = scaled.topk(30, -1).values[:, -1:]
    scaled = scaled.masked_fill(scaled < kth, -math.inf)
    expected = logits_to_probs(scaled, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(probs, expected, atol=1e-6)


def test_minus_inf_logits_get_zero_probability():
    logits = torch.tensor([0.0, -math.inf, 1.0, -math.inf])
    for params in PARAMS:
        probs = logits_to_probs(logits, params)
        assert probs[1] == 0 and probs[3] == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_logits_raise(bad):
    logits = torch.zeros(2, 5)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="logits"):
        logits_to_probs(logits, SamplingParams(temperature=1.0))


def test_all_minus_inf_row_raises():
    with pytest.raises(ValueError, match="logits"):
        logits_to_probs(torch.full((3,), -math.inf), SamplingParams())


def test_seeded_sampling_is_reproducible(logits):
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))
    draws = [sample(probs, make_generator(1234)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert draws[0].shape == (6,) and draws[0].dtype == torch.long
    many = [tuple(sample(probs, make_generator(s)).tolist()) for s in range(10)]
    assert len(set(many)) > 1  # different seeds give different draws


def test_sample_shapes(logits):
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))
    g = make_generator(0)
    assert sample(probs[0], g).shape == ()
    assert sample(probs.view(2, 3, V), g).shape == (2, 3)


def test_sample_greedy_is_argmax_and_draws_nothing(logits):
    probs = logits_to_probs(logits, SamplingParams())
    g = make_generator(5)
    state = g.get_state()
    assert torch.equal(sample(probs, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_sample_never_draws_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0]).expand(20_000, 6)
    draws = sample(probs, make_generator(3))
    assert set(draws.tolist()) == {1, 4}
    assert abs(float((draws == 1).float().mean()) - 0.5) < 0.02


def test_categorical_frequencies():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = categorical(probs.expand(50_000, 4), make_generator(0))
    freq = torch.bincount(draws, minlength=4).double() / 50_000
    assert torch.allclose(freq, probs.double(), atol=0.01)
    assert freq[1] == 0


def test_categorical_rejects_rows_without_mass():
    with pytest.raises(ValueError, match="probs"):
        categorical(torch.zeros(2, 3), None)


def test_make_generator():
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert isinstance(make_generator(None), torch.Generator)
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            make_generator(bad)
