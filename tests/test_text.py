"""Streaming detokenization and stop strings, on the real tokenizer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.text.codec import TextCodec
from services.text.detokenizer import IncrementalDetokenizer
from services.text.stop_strings import StopStringMatcher

SAMPLES = ["Hello, world!", "ünïcödé 日本語 🎉🎉 mixed", "  spaces\tand\nnewlines  ", "emoji 👩‍👩‍👧‍👦 family", "a"]


def test_streamed_text_equals_whole_decode_and_never_breaks_utf8(model_dir):
    codec = TextCodec(model_dir)
    for text in SAMPLES:
        ids = codec.encode(text)
        detokenizer = IncrementalDetokenizer(codec.tokenizer)
        pieces = [detokenizer.push([token]) for token in ids] + [detokenizer.flush()]
        assert all("\ufffd" not in piece for piece in pieces), pieces
        assert "".join(pieces) == text


def test_multibyte_character_split_over_tokens_is_held_back(model_dir):
    codec = TextCodec(model_dir)
    ids = codec.encode("🎉")
    assert len(ids) > 1  # byte-level BPE splits this emoji
    detokenizer = IncrementalDetokenizer(codec.tokenizer)
    assert [detokenizer.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.push(ids[-1:]) == "🎉"


def test_stop_string_split_across_deltas_is_never_shown():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc S") == ("abc ", False)
    assert matcher.push("TO") == ("", False)
    assert matcher.push("P and more") == ("", True)


def test_the_stop_string_that_completes_first_wins():
    matcher = StopStringMatcher(["abcd", "c"])
    assert matcher.push("ab") == ("", False)
    assert matcher.push("cd") == ("ab", True)


def test_partial_stop_released_when_it_does_not_complete():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("x </e") == ("x ", False)
    assert matcher.push("mphasis>") == ("</emphasis>", False)
    assert matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcSTOP ", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6),
       stops=st.lists(st.text(alphabet="abcSTOP", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_matcher_equals_cutting_the_whole_text(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher, emitted, stopped = StopStringMatcher(stops), "", False
    for start, end in zip(bounds, bounds[1:]):
        out, stopped = matcher.push(text[start:end])
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    # Generation stops as soon as any stop string is complete: find the earliest end.
    ends = [(end, end - len(s)) for end in range(len(text) + 1) for s in stops if text[:end].endswith(s)]
    assert emitted == (text[: min(ends)[1]] if ends else text)
    assert stopped == bool(ends)
