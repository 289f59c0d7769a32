"""`StopText`: OpenAI stop strings on text that arrives piece by piece (pure logic)."""

from __future__ import annotations

import pytest

from edgespec.edge.http_generation import StopText


def run(stops, pieces) -> tuple[list[str], bool, str]:
    scanner = StopText(stops)
    out = [scanner.push(p) for p in pieces]
    return out, scanner.stopped, "".join(out) + scanner.flush()


def test_no_stops_releases_everything_at_once() -> None:
    out, stopped, text = run([], ["ab", "cd"])
    assert out == ["ab", "cd"] and not stopped and text == "abcd"


def test_cut_before_the_first_stop_even_across_pieces() -> None:
    out, stopped, text = run(["END"], ["hello E", "N", "D and more"])
    assert stopped and text == "hello "
    # "E" and "EN" could begin the stop string: held back, never released
    assert out == ["hello", " ", ""]


def test_the_earliest_of_several_stops_wins() -> None:
    _, stopped, text = run(["zz", "b"], ["aaab", "zz"])
    assert stopped and text == "aaa"


def test_held_back_text_comes_out_when_no_stop_follows() -> None:
    out, stopped, text = run(["xyz"], ["abcx", "y"])
    assert not stopped and out == ["ab", "c"] and text == "abcxy"


@pytest.mark.parametrize("cut", range(0, 9))
def test_any_split_of_the_text_gives_the_same_result(cut) -> None:
    full = "one\n\ntwo\n\nthree"
    _, stopped, text = run(["\n\n"], [full[:cut], full[cut:]])
    assert stopped and text == "one"
