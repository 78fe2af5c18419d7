"""Tokenizers: SentencePiece `tokenizer.model` (Grok-1, Llama 2, Mistral, Mixtral) or a Hugging Face
`tokenizer.json` (Llama 3, read with the `tokenizers` library), with incremental decoding for
streaming. `add_bos` prepends the BOS id to every encoded prompt (the HF families expect it)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from runtime.errors import RuntimeInputError


class Tokenizer:
    """SentencePiece model."""

    def __init__(self, path: str | Path, bos_id: int | None = None):
        path = Path(path)
        self.bos_id = bos_id
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
        ids = list(self._sp.EncodeAsIds(text))
        return [self.bos_id] + ids if self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class JsonTokenizer:
    """Hugging Face `tokenizer.json` (byte-level BPE and friends) through `tokenizers`."""

    def __init__(self, path: str | Path, bos_id: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"tokenizer file not found: {path}")
        import tokenizers
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise RuntimeInputError(f"{path} is not a tokenizer.json: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        self.path = path
        self.bos_id = bos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, bos_id: int | None = None):
    """A tokenizer by file type: `*.json` through `tokenizers`, else SentencePiece."""
    path = Path(path)
    return (JsonTokenizer if path.suffix == ".json" else Tokenizer)(path, bos_id)


def find_tokenizer(*folders: Path) -> Path | None:
    """tokenizer.model, else tokenizer.json, in the first folder that has one."""
    for folder in folders:
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).is_file():
                return folder / name
    return None


class StreamDecoder:
    """Turns a growing list of token ids into text deltas (pieces can merge across tokens)."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids=()):
        # Decoding continues from the prompt, so a piece's leading space is not lost at the seam.
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in prefix_ids]
        self.text = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        # Hold back while the tail is an incomplete UTF-8 sequence (decoded as U+FFFD).
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):] if text.startswith(self.text) else text, text
        return delta
