"""Byte-level BPE tokenizers saved minbpe-style as a pickle (Palm's `Encoder.save`, github
SrijanSriv211/Palm src/encoder.py): {"pattern": str, "special": {str: id}, "vocab": {id: bytes}}.

Read safely: the unpickler resolves no global at all (plain dicts, strings, ints and bytes are
all such a file holds), so a crafted file is refused when it names one, before anything runs.

Encoding, as the Encoder does with allowed_special="all" (what its sample.py uses):
  1. the text is split at the special tokens (alternatives in the file's order), each one its
     id; the rest is split into chunks by `pattern` (the `regex` module: GPT-4's pattern needs
     \\p{L} and possessive quantifiers);
  2. each chunk's UTF-8 bytes are ids; scanning from the left, the first adjacent pair whose
     concatenated bytes are a vocab entry is merged into that entry's id (the last id with
     those bytes), and the scan starts again from the left, until no pair merges. Pairs left
     of a merge were already found unmergeable and have not changed, so resuming one position
     left of it gives the same ids in linear rather than quadratic time.
Decoding joins the ids' bytes (a special token's UTF-8) and decodes with errors="replace"; an
id the file does not have (the model's vocab may be larger) decodes to U+FFFD, where the
Encoder would raise.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from runtime.errors import RuntimeInputError

REPLACEMENT = "\ufffd".encode()  # what an unknown id decodes to
_CORRUPT = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, UnicodeDecodeError, RecursionError)


class _PlainUnpickler(pickle.Unpickler):
    """Builds plain containers, strings, numbers and bytes only: every global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        raise RuntimeInputError(f"refusing to load tokenizer {self._path}: it references "
                                f"{module}.{name}; a minbpe tokenizer holds only plain types")

    def persistent_load(self, pid):
        raise RuntimeInputError(f"refusing to load tokenizer {self._path}: it uses persistent "
                                f"ids; a minbpe tokenizer holds only plain types")


def is_pickle(path: Path) -> bool:
    """Whether a file starts like a pickle of protocol 2 or later (PROTO opcode)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= 5


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked(values, path: Path) -> tuple[str, dict, dict]:
    """(pattern, special, vocab) of an unpickled file, or one error naming what is wrong."""
    where = f"tokenizer {path}"
    if not isinstance(values, dict) or set(values) != {"pattern", "special", "vocab"}:
        found = sorted(map(str, values))[:6] if isinstance(values, dict) else \
            type(values).__name__
        raise RuntimeInputError(f"{where}: expected a dict of pattern, special and vocab (a "
                                f"minbpe Encoder.save file), got {found}")
    pattern, special, vocab = values["pattern"], values["special"], values["vocab"]
    if not isinstance(pattern, str):
        raise RuntimeInputError(f"{where}: pattern must be a string")
    if not isinstance(vocab, dict) or not all(
            _int(i) and isinstance(b, bytes) and b for i, b in vocab.items()):
        raise RuntimeInputError(f"{where}: vocab must map ids to non-empty bytes")
    if any(vocab.get(i) != bytes([i]) for i in range(256)):
        raise RuntimeInputError(f"{where}: vocab must map each id 0..255 to its own byte")
    if not isinstance(special, dict) or not all(
            isinstance(s, str) and s and _int(i) for s, i in special.items()):
        raise RuntimeInputError(f"{where}: special must map non-empty strings to ids")
    return pattern, special, vocab


class MinBPETokenizer:
    """A minbpe-style pickled tokenizer (Palm's encoder): encode and decode as it does."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"tokenizer file not found: {path}")
        self.path = path
        try:
            with open(path, "rb") as f:
                values = _PlainUnpickler(f, path).load()
                trailing = f.read(1)
        except _CORRUPT as e:
            raise RuntimeInputError(f"tokenizer {path} is not a readable pickle: "
                                    f"{type(e).__name__}") from None
        if trailing:
            raise RuntimeInputError(f"tokenizer {path}: unexpected bytes after the pickle")
        pattern, self.special, self.vocab = _checked(values, path)
        self._ids = {b: i for i, b in self.vocab.items()}  # bytes -> id, the last one wins
        self._names = {i: s for s, i in self.special.items()}
        try:  # GPT-4's split pattern needs \p{..} classes and possessive quantifiers
            import regex
        except ImportError:
            raise RuntimeInputError(f"tokenizer {path}: reading a minbpe tokenizer needs the "
                                    f"`regex` package (pip install regex)") from None
        try:
            self._chunks = regex.compile(pattern)
            self._specials = regex.compile(
                "(" + "|".join(regex.escape(s) for s in self.special) + ")") \
                if self.special else None
        except regex.error as e:
            raise RuntimeInputError(f"tokenizer {path}: pattern does not compile: {e}") from None

    @property
    def vocab_size(self) -> int:
        return max([*self.vocab, *self._names]) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`, special tokens written in it included (no BOS: Palm adds none)."""
        del add_special_tokens  # nothing to add
        parts = self._specials.split(text) if self._specials else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # a captured special token
                ids.append(self.special[part])
            else:
                for chunk in self._chunks.findall(part):
                    ids.extend(self._merged(list(chunk.encode("utf-8"))))
        return ids

    def _merged(self, ids: list[int]) -> list[int]:
        """The leftmost-first merging of one chunk's byte ids (see the module docstring)."""
        i = 0
        while i + 1 < len(ids):
            merged = self._ids.get(self.vocab[ids[i]] + self.vocab[ids[i + 1]])
            if merged is None:
                i += 1
                continue
            ids[i:i + 2] = [merged]
            i = max(i - 1, 0)
        return ids

    def decode(self, ids) -> str:
        parts = []
        for i in ids:
            i = int(i)
            piece = self.vocab.get(i)
            if piece is None:
                name = self._names.get(i)
                piece = name.encode("utf-8") if name is not None else REPLACEMENT
            parts.append(piece)
        return b"".join(parts).decode("utf-8", errors="replace")
