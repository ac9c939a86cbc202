"""Incremental detokenization with stop strings.

Text is released only when it can no longer change: a trailing incomplete UTF-8 character
(``\\ufffd``) and any tail that could still grow into a stop string are held back. When a stop
string appears, the text ends just before it.
"""
from __future__ import annotations


def stop_at(text: str, stops: list[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


class TextStream:
    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.sent = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text safe to send, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_at(text, self.stops)
        if cut is not None:
            self.text = text[:cut]
            return self._take(len(self.text)), True
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, safe), hold, -1):
                if text[safe - k:safe] == s[:k]:
                    hold = k
                    break
        return self._take(safe - hold), False

    def flush(self) -> str:
        """Everything not yet sent (the request has finished)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta
