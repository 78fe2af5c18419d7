"""Stop strings: whether a request's streamed text has reached one, in O(1) per token.

Each request's text streams through a StreamDecoder (a few ids decoded per token, not the whole
output) and only its tail, where a stop string completed by the new text can lie, is searched.
Every process of a multi-host run decides alike: each has the tokenizer and the stop strings.
"""

from __future__ import annotations

from typing import Hashable, Optional

from runtime.tokenizer import StreamDecoder


class StopStrings:
    """The stop strings of the requests in flight, by key: reached(key, token) is an on_token
    for Engine.serve (True ends the request with finish_reason "stop")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stops: dict[Hashable, tuple[str, ...]] = {}
        self.decoders: dict[Hashable, StreamDecoder] = {}  # for requests with stop strings
        self.tails: dict[Hashable, str] = {}  # their text's last (longest stop - 1) characters

    def add(self, key: Hashable, stop: tuple[str, ...]) -> None:
        if stop:
            self.stops[key] = stop

    def reached(self, key: Hashable, token: int) -> bool:
        stop = self.stops.get(key)
        if not stop:
            return False
        decoder = self.decoders.get(key) or self.decoders.setdefault(
            key, StreamDecoder(self.tokenizer))
        try:
            text = self.tails.get(key, "") + decoder.push(token)
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode matches nothing
            return False
        keep = max(map(len, stop)) - 1
        self.tails[key] = text[len(text) - keep:] if keep else ""
        return any(s in text for s in stop)

    def finished(self, key: Hashable) -> None:
        self.stops.pop(key, None)
        self.decoders.pop(key, None)
        self.tails.pop(key, None)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> Optional[int]:
    """Where the earliest stop string starts in text (None: none does)."""
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None
