"""Stop strings, for whole texts and for text arriving in deltas.

Which occurrence wins: the one that *ends* first, and among those ending at the same place the
longest (earliest start). Ending first is what streaming can see: generation halts as soon as any
stop string is complete, so with stops ``"c"`` and ``"abcd"`` the text ``"abcd"`` stops at ``"c"``
("d" would never be generated). :func:`truncate_at_stop` uses the same rule, so streaming and
non-streaming results agree however the text is split.
"""

from __future__ import annotations

from collections.abc import Sequence


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the winning stop occurrence in ``text[start:]``, or None."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s, start)
        if i < 0:
            continue
        # Sort key: end first, then start (earlier start = longer match at the same end).
        if best is None or (i + len(s), i) < (best[1], best[0]):
            best = (i, i + len(s))
    return best


def truncate_at_stop(text: str, stops: Sequence[str], include_stop: bool) -> tuple[str, bool]:
    """Cut ``text`` at its first stop string; returns (text, whether a stop string was found)."""
    hit = _first_stop(text, stops)
    if hit is None:
        return text, False
    return text[: hit[1] if include_stop else hit[0]], True


class StopStringMatcher:
    """Streams one sequence's text, holding back what might turn out to be a stop string.

    ``feed`` returns the text safe to show now and whether a stop string was hit; after a hit the
    sequence is over, ``matched_stop`` says which stop string ended it, and further feeds return
    ``("", True)``. At the end of generation without a hit, ``flush`` returns the held-back tail.

    With ``include_stop`` nothing is held back: a stop string is then part of the output, so text
    that might begin one can be shown at once, whether or not the stop string completes.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops: tuple[str, ...] = tuple(stops)
        self.include_stop = include_stop
        self.stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text, once hit
        self._held = ""  # text received but not yet returned
        # With include_stop: the tail of returned text that may begin a stop string. Not held back,
        # but still searched, so a stop string split across deltas is found.
        self._shown_tail = ""
        # Every proper prefix of every stop string: what a held (or shown) tail may be.
        self._prefixes = {s[:n] for s in self.stops for n in range(1, len(s))}
        self._max_prefix = max((len(p) for p in self._prefixes), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        shown = len(self._shown_tail)
        text = self._shown_tail + self._held + delta
        # A stop string completed by this delta starts inside the tail kept from earlier text or in
        # the delta (that tail is the longest suffix of earlier text that could begin a stop
        # string), so searching ``text`` misses none; and none ended earlier, or it would have been
        # hit then.
        hit = _first_stop(text, self.stops)
        if hit is not None:
            self.stopped = True
            self.matched_stop = text[hit[0] : hit[1]]
            self._held = self._shown_tail = ""
            # The stop ends in the delta, so hit[1] > shown; without include_stop nothing was
            # shown and shown == 0.
            return text[shown : hit[1] if self.include_stop else hit[0]], True
        keep = self._tail_length(text)
        if self.include_stop:
            self._shown_tail = text[len(text) - keep :]
            return text[shown:], False
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        out, self._held, self._shown_tail = self._held, "", ""
        return out

    def _tail_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
