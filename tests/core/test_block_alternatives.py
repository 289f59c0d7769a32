"""Several guesses in one block (`DraftBlock.alternatives`): the rules of the dataclass, the
verifier's choice (`DraftBlock.resolve`: the first guess whose base_len and anchor fit the
committed tokens), and that applying a guess carried as an alternative is applying it alone
(same verdict, same committed tokens, same target cache), on tiny random models. A resend of
the whole message replays its verdict; one that changes the alternatives is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support.pipelining import GREEDY, PROMPTS, pair_runners

from edgespec.core.drafter import Drafter
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock, StaleBlockError
from edgespec.core.verifier import Verifier


def test_alternatives_share_the_seq_and_carry_none_of_their_own() -> None:
    guess = DraftBlock(3, 5, (1,), anchor_token=2)
    with pytest.raises(ValueError, match=r"alternatives\[0\]"):
        DraftBlock(3, 6, (1,), alternatives=(replace(guess, seq=4),))
    with pytest.raises(ValueError, match=r"alternatives\[0\]"):
        DraftBlock(3, 6, (1,), alternatives=(replace(guess, alternatives=(guess,)),))
    with pytest.raises(ValueError, match="decode block"):
        DraftBlock(3, 6, (), decode_tokens=2, alternatives=(guess,))
    block = DraftBlock(3, 6, (1,), alternatives=(guess,))
    assert block.choices == (DraftBlock(3, 6, (1,)), guess)
    # a resend must carry the same guesses
    assert block.identity != DraftBlock(3, 6, (1,)).identity


def test_resolve_takes_the_guess_the_committed_tokens_fit() -> None:
    committed = [5, 6, 7, 8]
    main = DraftBlock(3, 4, (1,), anchor_token=9)  # right length, wrong anchor
    short = DraftBlock(3, 3, (2,), anchor_token=7)  # assumes one token fewer
    fitting = DraftBlock(3, 4, (2, 4), anchor_token=8, anchor_prefix=(7,))
    block = replace(main, alternatives=(short, fitting))
    assert block.resolve(committed) == (2, fitting)
    assert block.resolve(committed[:3]) == (1, short)
    assert replace(main, alternatives=(short,)).resolve(committed) is None
    assert DraftBlock(3, 4, (1,)).resolve(committed) == (0, DraftBlock(3, 4, (1,)))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_guess_carried_as_an_alternative_is_applied_as_if_sent_alone(prompt) -> None:
    """Block 0 is verified; block 1 carries, besides a main guess that cannot fit, the guess
    that does (drafted on the committed tokens) among others that do not. Its verdict is the
    one that guess gets alone from a second verifier in the same state, it names the guess,
    and both verifiers then hold the same tokens and score the next block alike."""
    target, draft = pair_runners("llama")
    with_alternatives = Verifier(target, prompt, GREEDY)
    alone = Verifier(ModelRunner(target.model), prompt, GREEDY)  # a cache of its own
    drafter = Drafter(draft, prompt, GREEDY)
    first = drafter.propose(3)
    for verifier in (with_alternatives, alone):
        verdict = verifier.verify(first)
    drafter.apply(verdict)
    committed = drafter.committed
    fitting = drafter.propose(3)  # drafted on the committed tokens: seq 1
    wrong_len = DraftBlock(1, len(committed) + 1, (3, 4), anchor_token=2)
    wrong_anchor = DraftBlock(1, len(committed), (3,), anchor_token=(committed[-1] + 1) % 50)
    block = replace(wrong_len, alternatives=(wrong_anchor, fitting))

    got = with_alternatives.verify(block)
    expected = alone.verify(fitting)
    assert got.alternative == 2 and expected.alternative == 0
    assert replace(got, alternative=0, verify_ms=0.0) == replace(expected, verify_ms=0.0)
    assert with_alternatives.committed == alone.committed
    # a resend of the whole message replays; one with other guesses is refused
    assert with_alternatives.verify(block) is got
    with pytest.raises(ValueError, match="already used"):
        with_alternatives.verify(replace(block, alternatives=(fitting,)))
    # the next block is scored alike: the caches hold the same tokens
    following = DraftBlock(2, len(alone.committed), (1, 2, 3))
    assert replace(with_alternatives.verify(following), verify_ms=0.0) == replace(
        alone.verify(following), verify_ms=0.0
    )


def test_a_block_none_of_whose_guesses_fit_is_stale() -> None:
    target, _ = pair_runners("llama")
    prompt = PROMPTS[0]
    verifier = Verifier(target, prompt, GREEDY)
    n = len(prompt)
    block = DraftBlock(0, n + 1, (1,), alternatives=(DraftBlock(0, n, (2,), anchor_token=99),))
    assert prompt[-1] != 99
    with pytest.raises(StaleBlockError):
        verifier.verify(block)
    assert verifier.committed == prompt and verifier.last_verdict is None
