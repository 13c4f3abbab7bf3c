"""Stop strings: hand-checked cuts, and streaming == non-streaming for every split of the text."""

from __future__ import annotations

import itertools

import pytest

from qwen35.engine.stop import StopStringMatcher, truncate_at_stop


def _splits(text: str):
    """Every way of cutting ``text`` into non-empty consecutive deltas (2**(len-1) of them)."""
    n = len(text)
    for mask in range(1 << max(n - 1, 0)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        yield [text[a:b] for a, b in itertools.pairwise(cuts)]


def _stream(stops, include, deltas, check_holdback=None):
    """Feeds deltas; returns (shown text, hit). Checks the invariants at every step."""
    m = StopStringMatcher(stops, include)
    shown, fed = "", ""
    for d in deltas:
        fed += d
        out, hit = m.feed(d)
        shown += out
        if hit:
            return shown, True
        if check_holdback is not None:
            check_holdback(fed, shown)
    return shown + m.flush(), False


# (text, stops): multi-character stops, "ab"/"abc" overlapping, a partial "abc" that fails ("abx"),
# a stop that is a suffix of another ("bc"/"abc"), a stop inside a longer one ("c"/"abcd"), repeated
# letters where the match is not where the first partial match began ("aab", "aaab"), unicode.
CASES = [
    ("xxabxabcyy", ["abc"]),
    ("xxabxabcyy", ["ab", "abc"]),
    ("xxabxabcyy", ["abc", "bc"]),
    ("zzabcdzz", ["abcd", "c"]),
    ("aaaabzz", ["aab"]),
    ("aaaabzz", ["aaab", "ab"]),
    ("abababac", ["abac"]),
    ("hello world", ["wor", "lo w"]),
    ("no stop here", ["xyz", "hello"]),
    ("endswithpart ab", ["abc"]),
    ("ümläut→end", ["→e", "äu"]),
    ("abc", ["abc"]),
    ("a", ["a"]),
    ("", ["a"]),
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stops", CASES)
def test_streaming_equals_non_streaming_for_every_split(text, stops, include):
    expected = truncate_at_stop(text, stops, include)
    max_prefix = max(len(s) for s in stops) - 1
    prefixes = {s[:n] for s in stops for n in range(1, len(s))}

    def check_holdback(fed, shown):
        # Never shows text it might have to take back, and holds back no more than could begin a
        # stop string (without include_stop) / nothing (with it).
        assert expected[0].startswith(shown)
        assert fed.startswith(shown)
        held = fed[len(shown):]
        if include:
            assert held == ""
        else:
            assert len(held) <= max_prefix
            assert held == "" or held in prefixes

    for deltas in _splits(text):
        assert _stream(stops, include, deltas, check_holdback) == expected, deltas


@pytest.mark.parametrize(
    "text,stops,include,expected",
    [
        ("xxabxabcyy", ["abc"], False, ("xxabx", True)),
        ("xxabxabcyy", ["abc"], True, ("xxabxabc", True)),
        # "ab" completes before "abc" could: generation would stop there.
        ("xxabcyy", ["abc", "ab"], False, ("xx", True)),
        ("xxabcyy", ["abc", "ab"], True, ("xxab", True)),
        # Same end: the longer (earlier-starting) one wins.
        ("xxabcyy", ["bc", "abc"], False, ("xx", True)),
        ("xxabcyy", ["bc", "abc"], True, ("xxabc", True)),
        # "c" ends before "abcd" does.
        ("zzabcdzz", ["abcd", "c"], False, ("zzab", True)),
        ("zzabcdzz", ["abcd", "c"], True, ("zzabc", True)),
        ("aaaabzz", ["aab"], False, ("aa", True)),
        ("no stop", ["xyz"], False, ("no stop", False)),
        ("no stop", [], True, ("no stop", False)),
        ("stop", ["stop"], False, ("", True)),
    ],
)
def test_truncate_at_stop_by_hand(text, stops, include, expected):
    assert truncate_at_stop(text, stops, include) == expected


def test_partial_stop_is_held_then_released_when_it_fails():
    m = StopStringMatcher(["abc"], include_stop=False)
    assert m.feed("xa") == ("x", False)
    assert m.feed("b") == ("", False)  # "ab" could still become "abc"
    assert m.feed("x") == ("abx", False)  # it did not
    assert m.feed("ab") == ("", False)
    assert m.feed("cz") == ("", True)  # nothing after the last shown text
    assert m.matched_stop == "abc"
    assert m.feed("more") == ("", True)  # finished
    assert m.flush() == ""


def test_stop_split_across_deltas_with_include_stop():
    m = StopStringMatcher(["abc"], include_stop=True)
    assert m.feed("xa") == ("xa", False)  # shown at once: a stop string would be shown anyway
    assert m.feed("b") == ("b", False)
    assert m.feed("cdef") == ("c", True)
    assert m.matched_stop == "abc"


def test_matched_stop_is_the_winning_one():
    m = StopStringMatcher(["abcd", "c", "zz"], include_stop=False)
    assert m.matched_stop is None
    assert m.feed("xab") == ("x", False)
    assert m.feed("cd") == ("ab", True)
    assert m.matched_stop == "c"


def test_flush_returns_held_tail_without_a_hit():
    m = StopStringMatcher(["</answer>"], include_stop=False)
    assert m.feed("done </ans") == ("done ", False)
    assert m.flush() == "</ans"


def test_no_stops_passes_text_through():
    m = StopStringMatcher([], include_stop=False)
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""], include_stop=False)
