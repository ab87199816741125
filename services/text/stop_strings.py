"""Stop strings over a text stream: text is released only once it cannot begin a stop string."""

from __future__ import annotations


def first_stop(text: str, stops: list[str]) -> int | None:
    """Start of the stop string that completes first in text (the longest, if several end together)."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


class StopStringMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found). Nothing follows a stop."""
        text = self._held + delta
        cut = first_stop(text, self.stops)
        if cut is not None:
            self._held = ""
            return text[:cut], True
        hold = self._longest_partial_stop(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
