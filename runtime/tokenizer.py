"""SentencePiece tokenizer (the Grok-1 `tokenizer.model`), with incremental decoding for streaming."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from runtime.errors import RuntimeInputError


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"tokenizer file not found: {path}")
        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise RuntimeInputError(f"{path} is not a SentencePiece model: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class StreamDecoder:
    """Turns a growing list of token ids into text deltas (pieces can merge across tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        # Hold back while the tail is an incomplete UTF-8 sequence (decoded as U+FFFD).
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):] if text.startswith(self.text) else text, text
        return delta
