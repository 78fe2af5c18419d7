"""Tokenizers: SentencePiece `tokenizer.model` (Grok-1, Llama 2, Mistral, Mixtral) or a Hugging Face
`tokenizer.json` (Llama 3, SmolLM, Qwen, ...: read with the `tokenizers` library), with
incremental decoding for streaming.

Special tokens are added as the tokenizer itself says, so that a text's ids equal transformers'
`AutoTokenizer.from_pretrained(folder)(text).input_ids`: a tokenizer.json adds what its
post-processor adds (a TemplateProcessing with BOS first, or nothing for byte-level BPE;
transformers 5 builds its fast tokenizers from that and ignores `add_bos_token`, see
scripts/make_tokenizer_fixtures.py); a SentencePiece model of a Hugging Face folder gets BOS
unless tokenizer_config.json says `add_bos_token: false` (`bos_id`); Grok-1's gets none.
"""

from __future__ import annotations

import json
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

    def __init__(self, path: str | Path):
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

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The text's ids with the special tokens the post-processor adds (BOS or none)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, bos_id: int | None = None):
    """A tokenizer by file type: `*.json` through `tokenizers` (its own special tokens), else
    SentencePiece with `bos_id` prepended (None: nothing)."""
    path = Path(path)
    return JsonTokenizer(path) if path.suffix == ".json" else Tokenizer(path, bos_id)


def sentencepiece_adds_bos(folder: Path) -> bool:
    """Whether a Hugging Face folder's SentencePiece tokenizer prepends BOS: its
    tokenizer_config.json's `add_bos_token`, true when absent (LlamaTokenizer's default)."""
    settings = Path(folder) / "tokenizer_config.json"
    if not settings.is_file():
        return True
    try:
        values = json.loads(settings.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RuntimeInputError(f"{settings} is not readable JSON: "
                                f"{str(e) or type(e).__name__}") from None
    if not isinstance(values, dict):
        raise RuntimeInputError(f"{settings}: expected a JSON object")
    adds = values.get("add_bos_token", True)
    if not isinstance(adds, bool):
        raise RuntimeInputError(f"{settings}: add_bos_token must be true or false, got "
                                f"{adds!r:.40}")
    return adds


def find_tokenizer(*folders: Path) -> Path | None:
    """tokenizer.json (what transformers reads when a folder has both), else tokenizer.model,
    in the first folder that has one."""
    for folder in folders:
        for name in ("tokenizer.json", "tokenizer.model"):
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
